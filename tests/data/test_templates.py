"""Each model's rendered prompt equals the literal string its official code produces (strings written
out from shared/specs), and the loss mask covers exactly the answer tokens."""

from __future__ import annotations

import numpy as np
import pytest
import re

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vjax.data.templates import VisualContext, render, to_string, tokenize

Q, A = "What colour is the circle?", "red"
CTX = VisualContext(num_frames=2, frame_times=[0.0, 1.5])

LITERAL = {
    "video_llama": (
        "###Human: <Video><ImageHere></Video> The video contains 2 frames sampled at 0.0, 1.5 seconds.  "
        "What colour is the circle?###Assistant:", {"video": "<ImageHere>"}),
    "video_chatgpt": (
        "You are Video-ChatGPT, a large vision-language assistant. You are able to understand the video content "
        "that the user provides, and assist the user with a variety of tasks using natural language.Follow the "
        "instructions carefully and explain your answers in detail based on the provided video. USER: What colour "
        "is the circle?\n<vid_start>" + "<vid_patch>" * 356 + "<vid_end> ASSISTANT:", {"video": "<vid_patch>" * 356}),
    "minigpt4_video": (
        "[INST] <Img><ImageHere><Cap>the circle is called Bob<Img><ImageHere>\nWhat colour is the circle? [/INST]",
        {"frame": "<ImageHere>"}),
    "cogvlm2_video": ("<P>0<P>2Question: What colour is the circle? Answer:", {"frame": "<P>"}),
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        "<|video_pad|><|vision_end|>What colour is the circle?<|im_end|>\n<|im_start|>assistant\n",
        {"video": "<|video_pad|>"}),
    "ma_lmm": ("<Q32></s>Question: What colour is the circle? Short answer:", {"video": "<Q32>"}),
    "chat_univi": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image><image>\nWhat colour is the circle? "
        "ASSISTANT:", {"video": "<image><image>"}),
}


@pytest.mark.parametrize("model", sorted(LITERAL))
def test_prompt_equals_official_string(model):
    ctx = CTX
    if model == "minigpt4_video":
        ctx = VisualContext(num_frames=2, subtitles=["the circle is called Bob", None])
    if model == "cogvlm2_video":
        ctx = VisualContext(num_frames=2, frame_times=[0.0, 2.0])
    expected, visual = LITERAL[model]
    bos = "</s>" if model == "ma_lmm" else ""  # MA-LMM's OPT-style BOS string after the queries
    assert to_string(render(model, Q, context=ctx), visual, bos=bos) == expected


def test_video_llama_audio_and_llama2_strings():
    ctx = VisualContext(num_frames=2, frame_times=[0.0, 1.5], has_audio=True)
    expected = ("###Human: Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>."
                + " " * 17 + "Close your ears, open your eyes and you see that <Video><ImageHere></Video>." + " " * 18
                + "Now answer my question based on what you have just seen and heard. What colour is the circle?###Assistant:")
    assert to_string(render("video_llama", Q, context=ctx), {"video": "<ImageHere>", "audio": "<ImageHere>"}) == expected
    llama2 = ("[INST] <<SYS>>\n\n<</SYS>>\n\n<Video><ImageHere></Video> The video contains 2 frames sampled at 0.0, "
              "1.5 seconds.  What colour is the circle? [/INST]")
    assert to_string(render("video_llama", Q, context=CTX, variant="llama2"), {"video": "<ImageHere>"}) == llama2


@pytest.fixture(scope="module")
def word_tokenizer():
    specials = ["</s>", "###", "<|im_end|>", "<|im_start|>", "<Img>", "<Cap>", "<Video>", "</Video>", "<vid_start>",
                "<vid_end>", "<|vision_start|>", "<|vision_end|>"]
    split = pre_tokenizers.Split(Regex("|".join(re.escape(s) for s in specials)), "isolated")
    pre = pre_tokenizers.Sequence([split, pre_tokenizers.WhitespaceSplit()])
    words = {w for s in LITERAL.values() for w, _ in pre.pre_tokenize_str(s[0])} | {"red", *"0123456789"}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(sorted(words - set(vocab)))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@pytest.mark.parametrize("model", sorted(LITERAL))
def test_loss_mask_covers_only_the_answer(model, word_tokenizer):
    pieces = render(model, Q, A, context=CTX)
    ids, mask = tokenize(pieces, word_tokenizer, {"video": (3, 5), "frame": (3, 4), "audio": (3, 2)})
    assert 0 not in ids.tolist()  # every piece tokenized to known words
    supervised = word_tokenizer.convert_ids_to_tokens(ids[mask == 1].tolist())
    assert supervised in (["red", "</s>"], ["red", "###"], ["red", "<|im_end|>"])
    # everything before the answer is prompt: the mask is a single run at the end (Qwen adds "\n" after)
    runs = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    assert len(runs) == 2
    n_vis = {"frame": 8, "video": 5}
    assert (ids == 3).sum() == n_vis.get("frame" if model in ("minigpt4_video", "cogvlm2_video") else "video")


def test_minigpt4_video_release_train_and_inference_inputs(word_tokenizer):
    """The release's training input (mini_gpt4_llama_v2.py: one BOS embedding, "[INST] " + frames + "\\n" +
    question + "[/INST]", the answer + "</s>" right after) and its inference prompt (conversation template
    "<s>[INST] ... [/INST]" whose first segment also gets the tokenizer's BOS: two BOS ids)."""
    ctx = VisualContext(num_frames=2, subtitles=["the circle is called Bob ", None])
    frames = "<Img><ImageHere><Cap>the circle is called Bob <Img><ImageHere>"
    train = render("minigpt4_video", Q, A, context=ctx, variant="train")
    assert to_string(train, {"frame": "<ImageHere>"}) == f"[INST] {frames}\n{Q}[/INST]{A}</s>"
    infer = render("minigpt4_video", Q, context=ctx, variant="inference")
    assert to_string(infer, {"frame": "<ImageHere>"}, bos="<s>") == f"<s><s>[INST] {frames}\n{Q} [/INST]"
    visual = {"frame": (3, 4)}
    ids, _ = tokenize(infer, word_tokenizer, visual)
    assert ids[:3].tolist() == [1, 1, word_tokenizer.convert_tokens_to_ids("[INST]")]
    ids, mask = tokenize(train, word_tokenizer, visual)
    assert ids[0] == 1 and ids[1] != 1
    assert word_tokenizer.convert_ids_to_tokens(ids[mask == 1].tolist()) == ["red", "</s>"]
    with pytest.raises(KeyError, match="no template variant 'chat'"):
        render("minigpt4_video", Q, context=ctx, variant="chat")
