"""Chat templates of the seven video LLMs, rendered as their official code renders them, and
tokenization with visual placeholders expanded and a loss mask over the answer tokens only.

A rendered conversation is a list of pieces ``(kind, value)``:
  * ``("text", s)``     prompt text (not supervised),
  * ``("target", s)``   answer text (supervised: loss mask 1),
  * ``("visual", name)`` where the model's visual tokens go (``video``, ``audio``, ``frame``).
:func:`to_string` turns pieces into the literal prompt string (with each visual piece spelled as the
official code spells its placeholder); :func:`tokenize` turns them into ids, expanding each visual
piece to ``count`` copies of the model's placeholder id.

Sources (``shared/specs``): Video-LLaMA §2.3, MiniGPT4-video §3.3, MA-LMM §4.4 (spec_qformer_family);
Video-ChatGPT §2.4, Chat-UniVi §3.5, CogVLM2-Video §4.4, Qwen2-VL §5.7 (spec_vit_family).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

Piece = tuple[str, str]

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VIDEO_CHATGPT_SYSTEM = (
    "You are Video-ChatGPT, a large vision-language assistant. You are able to understand the video "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail based on the provided video.")
QWEN_SYSTEM = "You are a helpful assistant."
VIDEO_LLAMA_AUDIO_PREFIX = (
    "Close your eyes, open your ears and you imagine only based on the sound that: ")
VIDEO_LLAMA_AUDIO_MIDDLE = "." + " " * 17 + "Close your ears, open your eyes and you see that "
VIDEO_LLAMA_AUDIO_SUFFIX = "." + " " * 18 + "Now answer my question based on what you have just seen and heard."


@dataclasses.dataclass(frozen=True)
class VisualContext:
    """What the prompt says about the visual input: frame times (s), subtitles per frame, audio."""

    num_frames: int = 8
    frame_times: Sequence[float] | None = None
    subtitles: Sequence[str | None] | None = None  # one entry per sampled frame (MiniGPT4-video)
    has_audio: bool = False


# ------------------------------------------------------------------------------------- renderers
def _video_llama(history, question, answer, ctx: VisualContext, variant: str) -> list[Piece]:
    times = ctx.frame_times if ctx.frame_times is not None else [float(i) for i in range(ctx.num_frames)]
    msg = f"The video contains {len(times)} frames sampled at {', '.join(f'{t:.1f}' for t in times)} seconds. "
    if ctx.has_audio:
        first = [("text", VIDEO_LLAMA_AUDIO_PREFIX), ("visual", "audio"), ("text", VIDEO_LLAMA_AUDIO_MIDDLE
                 + "<Video>"), ("visual", "video"), ("text", "</Video>" + VIDEO_LLAMA_AUDIO_SUFFIX + " " + question)]
    else:
        first = [("text", "<Video>"), ("visual", "video"), ("text", "</Video> " + msg + " " + question)]
    turns = [(first, answer)] if not history else [(first, history[0][1])] + [
        ([("text", q)], a) for q, a in history[1:]] + [([("text", question)], answer)]
    out: list[Piece] = []
    if variant == "llama2":
        for i, (user, ans) in enumerate(turns):
            out.append(("text", "[INST] <<SYS>>\n\n<</SYS>>\n\n" if i == 0 else "[INST] "))
            out.extend(user)
            out.append(("text", " [/INST]"))
            if ans is not None:
                out += [("text", " "), ("target", f"{ans} </s>")]
        return out
    out.append(("text", "###"))  # Vicuna v0: system "" + sep, roles Human/Assistant
    for user, ans in turns:
        out.append(("text", "Human: "))
        out.extend(user)
        out.append(("text", "###Assistant:"))
        if ans is not None:
            out += [("text", " "), ("target", f"{ans}###")]
    return out


def _vicuna_v1(system: str, user_first: list[Piece], history, question, answer) -> list[Piece]:
    """LLaVA/Vicuna v1 ``SeparatorStyle.TWO``: ``system USER: msg ASSISTANT: ans</s>USER: ...``."""
    turns = [(user_first, history[0][1] if history else answer)]
    if history:
        turns += [([("text", q)], a) for q, a in history[1:]] + [([("text", question)], answer)]
    out: list[Piece] = [("text", system + " ")] if system else []
    for user, ans in turns:
        out.append(("text", "USER: "))
        out.extend(user)
        out.append(("text", " ASSISTANT:"))
        if ans is not None:
            out += [("text", " "), ("target", f"{ans}</s>")]
    return out


def _video_chatgpt(history, question, answer, ctx, variant) -> list[Piece]:
    first_q = history[0][0] if history else question
    user = [("text", first_q + "\n<vid_start>"), ("visual", "video"), ("text", "<vid_end>")]
    system = VIDEO_CHATGPT_SYSTEM if variant != "train" else VICUNA_V1_SYSTEM
    return _vicuna_v1(system, user, history, question, answer)


def _vicuna_v1_visual_first(history, question, answer, ctx, variant, system: str = VICUNA_V1_SYSTEM) -> list[Piece]:
    """``{system} USER: <video>\n{question} ASSISTANT: {answer}</s>`` (Chat-UniVi; LLaVA-style models with
    ``system=""``: ``USER: <video>\n{question} ASSISTANT:``)."""
    first_q = history[0][0] if history else question
    user = [("visual", "video"), ("text", "\n" + first_q)]
    return _vicuna_v1(system, user, history, question, answer)


def _minigpt4_video(history, question, answer, ctx, variant) -> list[Piece]:
    """``[INST] <Img><ImageHere><Cap>subtitle <Img><ImageHere>...\n{question} [/INST]``; variants:

    * ``llama2`` (default): one BOS, ``" [/INST]"``, the answer after a space — the same text in training and
      generation (vjax's runs);
    * ``train``: the release's training input (``mini_gpt4_llama_v2.py``): one BOS, ``"[INST] "`` +
      frames + ``"\n"`` + question + ``"[/INST]"`` with the answer and ``</s>`` right after it;
    * ``inference``: the release's inference prompt (``minigpt4_video_inference.py``): the template's
      literal ``<s>`` plus the BOS the tokenizer adds to the first text segment (``get_context_emb``) —
      two BOS tokens — then ``"[INST] "`` ... ``" [/INST]"``. (The release's evaluation script differs
      once more: two spaces after ``[INST]``.)

    Frames repeated to pad a short clip get a bare ``<Img><ImageHere>`` (the training and evaluation datasets
    of the release do this; their subtitle entry is None, see ``minigpt4_video_subtitles``).
    """
    if variant not in ("llama2", "train", "inference"):
        raise KeyError(f"minigpt4_video has no template variant {variant!r}; known: llama2, train, inference")
    subs = list(ctx.subtitles or [None] * ctx.num_frames)
    inter: list[Piece] = []
    for i in range(ctx.num_frames):
        inter += [("text", "<Img>"), ("visual", "frame")]
        if i < len(subs) and subs[i]:
            inter.append(("text", f"<Cap>{subs[i]}"))
    turns = [(inter + [("text", "\n" + (history[0][0] if history else question))],
              history[0][1] if history else answer)]
    if history:
        turns += [([("text", q)], a) for q, a in history[1:]] + [([("text", question)], answer)]
    out: list[Piece] = [("bos", ""), ("bos", "")] if variant == "inference" else []
    close, gap = ("[/INST]", "") if variant == "train" else (" [/INST]", " ")
    for user, ans in turns:
        out.append(("text", "[INST] "))
        out.extend(user)
        out.append(("text", close))
        if ans is not None:
            if gap:
                out.append(("text", gap))
            out.append(("target", f"{ans}</s>"))
    return out


def _cogvlm2_video(history, question, answer, ctx, variant) -> list[Piece]:
    out: list[Piece] = []
    for i in range(ctx.num_frames):  # frame i is second i at 1 fps: timestamp token after each frame
        t = int(round(ctx.frame_times[i])) if ctx.frame_times is not None else i
        out += [("visual", "frame"), ("text", str(t))]
    text = "".join(f"Question: {q} Answer: {a}\n" for q, a in history)
    out.append(("text", text + f"Question: {question} Answer:"))
    if answer is not None:
        out += [("text", " "), ("target", answer), ("eos", "")]
    return out


def _qwen2_vl(history, question, answer, ctx, variant) -> list[Piece]:
    out: list[Piece] = [("text", f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n")]
    first = True
    for q, a in list(history) + [(question, answer)]:
        out.append(("text", "<|im_start|>user\n"))
        if first:
            out += [("text", "<|vision_start|>"), ("visual", "video"), ("text", "<|vision_end|>")]
            first = False
        out.append(("text", f"{q}<|im_end|>\n<|im_start|>assistant\n"))
        if a is not None:
            out += [("target", f"{a}<|im_end|>"), ("text", "\n")]
    return out


def _ma_lmm(history, question, answer, ctx, variant) -> list[Piece]:
    prompt = f"Question: {question} Short answer:" if variant != "demo" else f"Question: {question} Answer:"
    out: list[Piece] = [("visual", "video"), ("bos", ""), ("text", prompt)]
    if answer is not None:
        out += [("text", " "), ("target", f"{answer}</s>")]
    return out


RENDERERS = {
    "video_llama": (_video_llama, "vicuna"),
    "video_chatgpt": (_video_chatgpt, "inference"),
    "minigpt4_video": (_minigpt4_video, "llama2"),
    "cogvlm2_video": (_cogvlm2_video, "chat"),
    "qwen2_vl": (_qwen2_vl, "chat"),
    "ma_lmm": (_ma_lmm, "qa"),
    "vicuna_v1": (_vicuna_v1_visual_first, "v1"),
    "chat_univi": (_vicuna_v1_visual_first, "v1"),  # its model's name (the template is vicuna_v1)
}


def render(template: str, question: str, answer: str | None = None, *, history: Sequence[tuple[str, str]] = (),
           context: VisualContext | None = None, variant: str | None = None,
           options: Mapping[str, Any] | None = None) -> list[Piece]:
    """Render one user turn (after ``history``) with a template (a model's name works for its own).

    ``answer=None`` renders a generation prompt that ends where the model starts answering. ``options``:
    the template's keyword arguments (a model spec's ``template_options``, e.g. ``vicuna_v1``'s ``system``).
    """
    if template not in RENDERERS:
        raise KeyError(f"no chat template {template!r}; known: {sorted(RENDERERS)}")
    fn, default = RENDERERS[template]
    return fn(list(history), question, answer, context or VisualContext(), variant or default, **dict(options or {}))


def to_string(pieces: Sequence[Piece], visual_text: Mapping[str, str], *, bos: str = "", eos: str = "") -> str:
    """The literal prompt string: visual pieces spelled ``visual_text[name]``."""
    out = []
    for kind, value in pieces:
        if kind == "visual":
            out.append(visual_text[value])
        elif kind == "bos":
            out.append(bos)
        elif kind == "eos":
            out.append(eos)
        else:
            out.append(value)
    return "".join(out)


def tokenize(pieces: Sequence[Piece], tokenizer: Any, visual: Mapping[str, tuple[int, int]], *,
             add_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Ids and loss mask (``int32[L]`` each) of rendered pieces.

    ``visual[name] = (placeholder_id, count)``: each visual piece becomes ``count`` placeholder ids.
    Text is encoded piece by piece without special-token insertion (so answers tokenize the same
    in training and generation); ``add_bos`` prepends ``tokenizer.bos_token_id`` unless a ``bos``
    piece places it elsewhere (MA-LMM puts it after the visual tokens).
    """
    ids: list[int] = []
    mask: list[int] = []
    bos_id = tokenizer.bos_token_id
    if add_bos and bos_id is not None and not any(k == "bos" for k, _ in pieces):
        ids.append(bos_id)
        mask.append(0)
    for kind, value in pieces:
        if kind == "visual":
            pid, n = visual[value]
            ids += [pid] * n
            mask += [0] * n
        elif kind == "bos":
            if bos_id is not None:
                ids.append(bos_id)
                mask.append(0)
        elif kind == "eos":
            ids.append(tokenizer.eos_token_id)
            mask.append(1)
        elif value:
            toks = tokenizer.encode(value, add_special_tokens=False)
            ids += toks
            mask += [1 if kind == "target" else 0] * len(toks)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)
