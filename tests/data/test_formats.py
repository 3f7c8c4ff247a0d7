"""Video-QA records -> model batches: placeholders expanded, loss on the answer only, the generation
prompt is exactly the training prefix, frames normalised and padded; answer scoring."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from vjax.data import formats
from vjax.data.formats import FormatSpec, VideoQAFormat
from vjax.data.pipeline import resolve_records
from vjax.data.synthetic import SyntheticConfig, ensure_synthetic_dataset

SPECS = {
    "chat_univi": FormatSpec("chat_univi", (("video", 5, 14),), 4),
    "qwen2_vl": FormatSpec("qwen2_vl", (("video", 11, 8),), 4, stop_strings=("<|im_end|>",)),
    "minigpt4_video": FormatSpec("minigpt4_video", (("frame", 13, 4),), 4, subtitles=True),
    "cogvlm2_video": FormatSpec("cogvlm2_video", (("frame", 12, 6),), 4),
    "video_llama": FormatSpec("video_llama", (("video", 13, 6), ("audio", 13, 3)), 4, template_variant="vicuna",
                              audio_clips=2, audio_mel_bins=36, audio_frames=204),
    "ma_lmm": FormatSpec("ma_lmm", (("video", 4, 4),), 4, qformer_text_len=16),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = ensure_synthetic_dataset(tmp_path_factory.mktemp("fmt"), SyntheticConfig(
        seed=3, num_train=3, num_val=0, num_test=0, long_every=0, subtitle_fraction=1.0, show_progress=False))
    with open(paths.annotations["train"]) as f:
        recs = resolve_records([json.loads(x) for x in f], paths.root)
    return formats.TextTokenizer(paths.tokenizer_dir), recs


def _record(recs, choices: bool):
    return next(r for r in recs if bool(r.get("choices")) == choices)


@pytest.mark.parametrize("model", sorted(SPECS))
@pytest.mark.parametrize("choices", [False, True], ids=["open", "multiple_choice"])
def test_training_element_and_generation_prompt_agree(model, choices, data):
    tok, recs = data
    spec = SPECS[model]
    rec = dict(_record(recs, choices), timestamps=np.array([0.0, 0.5, 1.0]))  # 3 real frames of T = 4
    frames = np.full((3, 8, 8, 3), 255, np.uint8)
    audio = np.zeros(16000 * 3, np.float32)
    el = VideoQAFormat(spec, tok)(rec, frames, audio)
    prompt = VideoQAFormat(spec, tok, prompt_only=True)(rec, frames, audio)
    ids, mask = el["input_ids"], el["loss_mask"]
    # placeholders: one per visual token (per real frame for the per-frame templates)
    n_place = sum(int((ids == pid).sum()) for pid in {p for _, p, _ in spec.visual})
    assert n_place == spec.tokens_per_clip(3)
    # the loss covers the answer (and the template's end marker) only, and it comes last
    supervised = tok.decode(ids[mask == 1])
    assert supervised.startswith(rec["conversations"][1]["value"])
    assert mask[: int(np.argmax(mask))].sum() == 0
    # generation prompt = the training sequence up to the answer, token for token
    p = prompt["input_ids"]
    np.testing.assert_array_equal(p, ids[: len(p)])
    assert int(np.argmax(mask)) == len(p) and prompt["loss_mask"].sum() == 0
    # frames: normalised with CLIP mean/std, padded by repeating the last, masked
    assert el["frames"].shape == (4, 8, 8, 3) and el["frame_mask"].tolist() == [True, True, True, False]
    np.testing.assert_allclose(el["frames"][0, 0, 0], (1 - np.array(formats.CLIP_MEAN)) / np.array(formats.CLIP_STD),
                               rtol=1e-6)
    if spec.audio_clips:
        assert el["audio"].shape == (2, 36, 204) and el["audio_mask"].all()
    if spec.qformer_text_len:
        q = el["qformer_input_ids"][el["qformer_attention_mask"] == 1]
        assert 0 < len(q) <= spec.qformer_text_len and rec["question"] in rec["conversations"][0]["value"]
        assert rec["conversations"][0]["value"].replace("<video>\n", "").startswith(tok.decode(q))


def test_left_pad_puts_padding_before_the_prompt():
    a = {"input_ids": np.array([7, 8, 9], np.int32), "attention_mask": np.ones(3, np.int32), "x": np.zeros(2)}
    b = {"input_ids": np.array([5], np.int32), "attention_mask": np.ones(1, np.int32), "x": np.ones(2)}
    out = formats.left_pad([a, b], 4, pad_id=0)
    assert out["input_ids"].tolist() == [[0, 7, 8, 9], [0, 0, 0, 5]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert out["x"].shape == (2, 2)
    with pytest.raises(ValueError, match="exceeds"):
        formats.left_pad([a], 2)


MC = {"answer": "cyan", "choices": ["red", "blue", "cyan", "green"], "answer_index": 2}


@pytest.mark.parametrize("pred,ok", [("(C) cyan", True), ("C", True), ("(C)", True), ("cyan", True),
                                     ("The cyan.", True), ("(A) cyan", False), ("(B) blue", False), ("blue", False),
                                     ("", False), ("cyan (C)", True), ("blue (C)", True), ("cyan (A)", False),
                                     ("cyan (a)", False), ("cyan (c)", True)])
def test_multiple_choice_scored_by_letter_else_by_text(pred, ok):
    """A leading letter, else a trailing "(X)" (the text_letter style: the letter decides, as a leading one
    does), else the option text."""
    assert formats.score_answer(pred, MC) is ok


@pytest.mark.parametrize("pred,ok", [("The Red Circle!", True), ("red circle", True), ("red", False),
                                     ("a red  circle", True), ("red circles", False)])
def test_open_answers_use_normalised_exact_match(pred, ok):
    assert formats.score_answer(pred, {"answer": "the red circle"}) is ok


def test_cut_at_stop():
    assert formats.cut_at_stop(" two###Human: x", ("###", "</s>")) == "two"
    assert formats.cut_at_stop("left</s><pad>", ("###", "</s>")) == "left"


def test_prepared_audio_gives_the_same_element_and_a_wrong_shape_is_named(data):
    tok, recs = data
    spec = SPECS["video_llama"]
    fmt = VideoQAFormat(spec, tok)
    rec = dict(_record(recs, False), timestamps=np.array([0.0, 0.5]))
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    wav = np.random.default_rng(0).normal(size=16000 * 3).astype(np.float32)
    feats = fmt.prepare_audio(wav)
    assert feats.shape == (2, 36, 204)
    a, b = fmt(rec, frames, wav), fmt(rec, frames, feats)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with pytest.raises(ValueError, match=r"\(2, 36, 100\)"):
        fmt(rec, frames, feats[:, :, :100])
    assert VideoQAFormat(SPECS["chat_univi"], tok).prepare_audio(wav) is wav  # no audio branch: unchanged


def test_subtitles_follow_the_decoded_frames_of_the_record(tmp_path, data):
    """The pipeline's frame indices and fps decide which subtitle each sampled frame shows (the release's
    rule: every decoded frame up to it counts); a Mistral-sized cap is passed on from the spec."""
    tok, _ = data
    srt = tmp_path / "s.srt"
    srt.write_text("1\n00:00:00,300 --> 00:00:00,400\nquick\n\n2\n00:00:01,500 --> 00:00:02,000\nlater\n")
    rec = {"subtitles": str(srt), "timestamps": np.array([0.0, 1.0, 2.0]), "frame_indices": np.array([0, 30, 60]),
           "fps": 30.0}
    ctx = VideoQAFormat(SPECS["minigpt4_video"], tok).context(rec, 3)
    assert list(ctx.subtitles) == [None, "quick ", "later "]
    capped = dataclasses.replace(SPECS["minigpt4_video"], subtitle_words=1)
    assert list(VideoQAFormat(capped, tok).context(rec, 3).subtitles) == [None, "quick ", None]


def test_a_count_per_real_frame_count(data):
    """A model whose token count depends on the clip (Chat-UniVi: 1-2 frames are images) gives the spec a
    count for every real frame count 0..T; the prompt of a t-frame clip carries that many placeholders."""
    tok, recs = data
    table = (0, 14, 28, 14, 14)
    spec = FormatSpec("chat_univi", (("video", 5, table),), 4)
    assert spec.tokens_per_clip(2) == 28 and spec.tokens_per_clip(4) == 14 and spec.tokens_per_clip() == 28
    rec = dict(_record(recs, False))
    for t in (1, 2, 3, 4):
        ids, _ = VideoQAFormat(spec, tok).text(rec, t)
        assert int((ids == 5).sum()) == table[t]
    with pytest.raises(ValueError, match="needs num_frames \\+ 1 = 5 entries, got 3"):
        FormatSpec("chat_univi", (("video", 5, (0, 14, 28)),), 4)
