"""Evaluation that measures what it claims: multiple choice scored by likelihood (checked against log-softmax of
the full logits computed here), chance levels beside every figure, and the blind / shuffled video controls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import config
from experiments import eval as eval_cmd
from vjax import eval as vjax_eval
from vjax.data import formats
from vjax.data.pipeline import LoadAndFormat
from vjax.data.synthetic import answerable, write_mp4

from tests.serve_common import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _conv(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]


def _mc(rid, video, question, choices, ai, qtype="colour"):
    prompt = question + "\nOptions:\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    answer = f"({chr(65 + ai)}) {choices[ai]}"
    return {"id": rid, "video": video, "question_type": qtype, "question": question, "choices": choices,
            "answer_index": ai, "answer": choices[ai], "conversations": _conv(prompt, answer)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_controls")
    paths = tiny_checkpoint(d, clip_shape=(24, 48, 48))
    rng = np.random.default_rng(1)
    write_mp4(str(d / "b.mp4"), rng.integers(0, 255, (24, 48, 48, 3), dtype=np.uint8), fps=8)
    write_mp4(str(d / "c.mp4"), np.full((24, 48, 48, 3), 200, np.uint8), fps=8)
    run = config.load_run(paths["ckpt"], tokenizer=paths["tokenizer"])
    return d, paths, run


def test_option_answers_render_each_choice_as_trained():
    rec = _mc(1, "v.mp4", "What colour?", ["red", "blue", "green"], 1)
    assert [vjax_eval.option_answer(rec, i) for i in range(3)] == ["(A) red", "(B) blue", "(C) green"]
    other = vjax_eval.with_answer(rec, "(C) green")
    assert formats.question_answer(other)[2] == "(C) green" and formats.question_answer(rec)[2] == "(B) blue"
    assert other["conversations"][0] == rec["conversations"][0]  # the question is untouched, the record copied
    # a record answered text first ("blue (B)", the synthetic set's mc_answer="text_letter") is scored in its style
    text_first = vjax_eval.with_answer(rec, "blue (B)")
    assert [vjax_eval.option_answer(text_first, i) for i in range(3)] == ["red (A)", "blue (B)", "green (C)"]


def test_option_likelihoods_equal_log_softmax_of_the_full_logits(tiny):
    """The scorer takes logits at the answer positions only, batches options of several records and pads the
    last batch; each score must equal the sum of log-softmax over the answer tokens computed here from the
    model's full logits, one option at a time, in float64."""
    d, _, run = tiny
    recs = [_mc(1, str(d / "a.mp4"), "What colour is the circle?", ["red", "blue", "green"], 1),
            _mc(2, str(d / "b.mp4"), "How many objects?", ["one", "two", "three", "four"], 0, "count")]
    load = LoadAndFormat(formats.VideoQAFormat(run.spec, run.tokenizer, prompt_only=True), run.sampler, run.frames)
    prompts = [load.random_map(r, np.random.default_rng(i)) for i, r in enumerate(recs)]
    scorer = vjax_eval.OptionScorer(run.module, run.spec, run.tokenizer, batch_size=3)  # 7 options: a padded batch
    got = scorer.logprobs(run.params, recs, prompts)
    assert [len(g) for g in got] == [3, 4]
    full = formats.VideoQAFormat(run.spec, run.tokenizer)
    width = 256  # every option right-padded to one length (causal: the padding changes no earlier logit): one compile
    forward = jax.jit(lambda ids, mask, frames, frame_mask: run.module.apply(
        {"params": run.params}, ids, attention_mask=mask, frames=frames, frame_mask=frame_mask).logits)
    for rec, prompt, scores in zip(recs, prompts, got):
        for i, score in enumerate(scores):
            t = int(prompt["frame_mask"].sum())
            ids, mask = full.text(vjax_eval.with_answer(rec, vjax_eval.option_answer(rec, i)), t)
            assert np.array_equal(ids[: len(prompt["input_ids"])], prompt["input_ids"])  # same prompt tokens
            assert len(ids) <= width
            padded = np.pad(ids, (0, width - len(ids)))[None]
            mask_in = (np.arange(width) < len(ids)).astype(np.int32)[None]
            logits = np.asarray(forward(padded, mask_in, prompt["frames"][None], prompt["frame_mask"][None]),
                                np.float64)[0, : len(ids)]
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            want = sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t])
            assert mask.sum() >= 4  # "(B) blue" and the end of the answer
            np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-3)
    assert scorer.choose(run.params, recs, prompts) == [int(np.argmax(g)) for g in got]


def test_chance_levels_count_random_letters_and_the_best_constant_answer():
    open_ = [{"question_type": "count", "answer": a, "conversations": _conv("How many?", a)}
             for a in ["one", "One.", "two", "three"]]
    mc = [_mc(i, "v", "Q", ["a", "b", "c", "d"][: k], 0) for i, k in enumerate([2, 4])]
    assert eval_cmd.chance_level(open_) == 0.5  # "one" (normalised) answers two of four
    assert eval_cmd.chance_level(mc) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert eval_cmd.chance_level(open_ + mc) == pytest.approx((2 + 0.5 + 0.25) / 6)
    assert eval_cmd.chance_level([]) == 0.0
    rep = eval_cmd.summarize(open_ + mc, ["one", "two", "two", "zero", "(B)", "(A)"], likelihood=[None] * 4 + [0, 1])
    assert rep["accuracy"]["task/count"] == {"accuracy": 0.5, "n": 4, "chance": 0.5}
    assert rep["multiple_choice"]["colour"] == {"letter": 0.5, "likelihood": 0.5, "n": 2, "chance": 0.375}
    assert [r.get("likelihood_correct") for r in rep["predictions"]] == [None] * 4 + [True, False]
    lines = eval_cmd.table(rep).splitlines()
    assert any(ln.startswith("multiple choice") for ln in lines)
    row = next(ln for ln in lines if ln.startswith("colour ") and len(ln.split()) == 5)
    assert row.split() == ["colour", "0.500", "0.500", "0.375", "2"]
    # without likelihood choices there is no such section
    plain = eval_cmd.summarize(open_ + mc, ["one"] * 6)
    assert "multiple_choice" not in plain and not any(ln.startswith("multiple choice") for ln in
                                                      eval_cmd.table(plain).splitlines())


def test_shuffled_videos_leave_no_question_with_its_own_clip():
    recs = [{"id": i, "video": f"v{i // 2}.mp4", "question_type": "x", "answer": "a",
             **({"subtitles": f"v{i // 2}.srt"} if i // 2 != 1 else {})} for i in range(10)]
    out = eval_cmd.shuffle_videos(recs, seed=3)
    assert all(o["video"] != r["video"] for o, r in zip(out, recs))
    # per clip a permutation: both questions of a clip move to the same other clip, every clip used once
    moved = {r["video"]: o["video"] for o, r in zip(out, recs)}
    assert sorted(moved.values()) == sorted(moved) and len(moved) == 5
    for o in out:  # subtitles travel with their video (v1 has none)
        assert o.get("subtitles") == (None if o["video"] == "v1.mp4" else o["video"].replace(".mp4", ".srt"))
    assert [r["video"] for r in recs] == [f"v{i // 2}.mp4" for i in range(10)]  # the input is not changed
    assert eval_cmd.shuffle_videos(recs, seed=3) == out  # seeded
    with pytest.raises(ValueError, match="two distinct videos"):
        eval_cmd.shuffle_videos(recs[:2])


def test_blind_format_sees_a_grey_silent_clip_without_subtitles():
    got = {}

    def inner(record, frames, audio):
        got.update(record=record, frames=frames, audio=audio)
        return {}

    frames = np.random.default_rng(0).integers(0, 255, (3, 8, 6, 3), dtype=np.uint8)
    eval_cmd.BlindFormat(inner)({"id": 1, "subtitles": "a.srt", "timestamps": [0.0]}, frames, np.ones(16))
    assert got["frames"].shape == frames.shape and got["frames"].dtype == np.uint8
    assert np.all(got["frames"] == eval_cmd.GREY) and got["audio"] is None  # None: the format's silent clip
    assert got["record"] == {"id": 1, "timestamps": [0.0]}


def test_blind_answers_do_not_depend_on_the_clip(tiny):
    """Under --blind the same question about three different clips is one prompt: the same answer and the same
    likelihood choice; with the clips (no control) the prompts differ."""
    d, _, run = tiny
    recs = [_mc(i, str(d / v), "What colour is the circle?", ["red", "blue", "green"], i)
            for i, v in enumerate(["a.mp4", "b.mp4", "c.mp4"])]
    blind = eval_cmd.evaluate(run, recs, batch_size=2, max_new_tokens=4, control="blind")
    rows = blind["predictions"]
    assert blind["control"] == "blind" and len({r["prediction"] for r in rows}) == 1
    assert len({r["likelihood_choice"] for r in rows}) == 1
    scorer = vjax_eval.OptionScorer(run.module, run.spec, run.tokenizer, batch_size=2)
    seeing = LoadAndFormat(formats.VideoQAFormat(run.spec, run.tokenizer, prompt_only=True), run.sampler, run.frames)
    els = [seeing.random_map(r, np.random.default_rng(i)) for i, r in enumerate(recs)]
    scores = scorer.logprobs(run.params, recs, els)
    assert not np.allclose(scores[0], scores[2])  # with its clip the model's likelihoods do depend on it


def test_eval_cli_controls_write_their_own_reports(tiny, tmp_path):
    d, paths, _ = tiny
    recs = [{"video": v, "question": "What colour is the circle?", "candidates": ["red", "blue", "green"],
             "answer": "blue", "question_type": "colour"} for v in ("a.mp4", "b.mp4", "c.mp4")]
    (d / "mv.json").write_text(json.dumps(recs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "experiments.eval", f"--workdir={paths['ckpt']}", f"--tokenizer={paths['tokenizer']}",
            f"--data={d / 'mv.json'}", "--batch_size=2", "--max_new_tokens=3", "--noprogress"]
    for control in ("blind", "shuffled"):
        r = subprocess.run(base + [f"--{control}", f"--out={tmp_path / control}.json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        rep = json.loads((tmp_path / f"{control}.json").read_text())
        assert rep["control"] == control and rep["evaluated"] == 3 and "multiple_choice" in rep
        assert f"control: {control}" in r.stdout and "likelihood" in r.stdout
    r = subprocess.run(base + ["--blind", "--shuffled"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "pass one of them" in r.stderr


def test_the_test_split_table_at_the_end_of_training(tiny, capsys):
    """What ``experiments.train`` prints last on a synthetic run: every question of the test split (here 3 clips)
    scored per type with chance levels, multiple choice by letter and by likelihood, the report written."""
    d, paths, _ = tiny
    run = config.load_run(paths["ckpt"], tokenizer=paths["tokenizer"], config=paths["config"])
    want = eval_cmd.synthetic_records(eval_cmd.synthetic_paths(run.config), "test")
    assert len({r["video"] for r in want}) == 3 and any(r.get("choices") for r in want)
    report = eval_cmd.score_test_split(run, -1)
    out = capsys.readouterr().out
    assert report["evaluated"] == len(want) == report["accuracy"]["all"]["n"]
    assert f"test split: {len(want)} questions" in out and "chance" in out and "likelihood" in out
    # chat_univi hears no beeps and reads no subtitles: those questions are reported apart
    can = [answerable(r, frozenset({"frames"})) for r in want]
    assert run.spec.inputs() == {"frames"} and 0 < sum(can) < len(want)
    assert report["accuracy"]["answerable"]["n"] == sum(can) and "answerable" in out
    assert [p["answerable"] for p in report["predictions"]] == can
    saved = json.loads((Path(paths["ckpt"]) / "eval" / "synthetic_test.json").read_text())
    assert saved["data"] == "synthetic_test" and len(saved["predictions"]) == len(want)
    assert eval_cmd.score_test_split(run, 2)["evaluated"] == 2  # eval.test_records=2: the first two
