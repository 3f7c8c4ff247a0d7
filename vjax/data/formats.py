"""Video-QA records -> the documented model batch (``vjax.models.video_llm``), for any of the seven
templates, described by a plain :class:`FormatSpec` (ints and strings — this module imports no model).

    record, frames uint8 [t, H, W, 3], audio float32 [N] | None
      frames   -> (frames / 255 - mean) / std, padded to T by repeating the last frame  [T, H, W, 3]
      frame_mask = [1] * t + [0] * (T - t)                                                [T]
      pieces   = templates.render(template, question, answer, context=VisualContext(t, times, subs, audio))
      ids, loss_mask = templates.tokenize(pieces, tokenizer, {piece: (placeholder_id, count)})
      audio    -> ImageBind fbank clips [K, mel, frames] (Video-LLaMA), audio_mask [K]
      question -> qformer_input_ids / _attention_mask [Lq] (MA-LMM's Q-Former instruction)

:func:`format_spec` builds the spec from a model's declaration (``vjax.models.spec.ModelSpec``) and config, so
chat, eval and training share one format; a user with their own model can fill a spec by hand.
:class:`VideoQAFormat` is a picklable module-level class, as Grain workers need.

:func:`score_answer` is the accuracy rule of the synthetic set: normalised exact match (lower case,
punctuation and articles dropped, whitespace collapsed); for a multiple-choice record a prediction
counts when its option letter (leading, "(B) square", or trailing, "square (B)") or its option text names the
right choice.
"""

from __future__ import annotations

import dataclasses
import os
import re
import string
from typing import Any, Mapping, Sequence

import numpy as np

from vjax.data import templates
from vjax.data.annotations import load_subtitles, minigpt4_video_subtitles
from vjax.layers.audio import imagebind_audio_features

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MARKERS = ("<video>\n", "<video>", "<image>\n", "<image>")


class TextTokenizer:
    """A thread-safe, picklable view of a Hugging Face tokenizer directory.

    ``encode(text, add_special_tokens=False)`` runs the Rust backend directly (Grain maps records on
    several threads; the Python wrapper mutates truncation state per call); the wrapper is kept for
    ``decode`` and the special ids. Pickles as its path (workers reload it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._load()

    def _load(self) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415  (loaded once per process, not per record)

        hf = AutoTokenizer.from_pretrained(self.path)
        self._hf = hf
        self._backend = getattr(hf, "backend_tokenizer", None)
        self.bos_token_id = hf.bos_token_id
        self.eos_token_id = hf.eos_token_id
        self.pad_token_id = hf.pad_token_id if hf.pad_token_id is not None else 0
        self.vocab_size = len(hf)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self._backend is not None:
            return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        """Id of a single (special) token, or None if the vocabulary lacks it."""
        i = self._hf.convert_tokens_to_ids(token)
        return None if i is None or i == self._hf.unk_token_id and token != self._hf.unk_token else int(i)


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """What a model needs from a record.

    ``visual``: ``(piece, placeholder_id, count)`` per visual piece of the template (``video``:
    count per clip; ``frame``: count per frame; ``audio``: count per clip). A ``video`` count may be a
    tuple indexed by the clip's real frame count ``t = 0..T`` where a model's token count depends on it
    (Chat-UniVi: 1-2 frames are images, longer clips have ``ceil(t / 16)`` events). ``num_frames``: the
    static frame count T. ``audio_clips`` > 0 adds ImageBind fbank clips of ``audio_mel_bins`` x
    ``audio_frames``. ``qformer_text_len`` > 0 adds the Q-Former instruction ids. ``subtitles``: pass
    each sampled frame's subtitle to the template, chosen by MiniGPT4-video's rules
    (:func:`vjax.data.annotations.minigpt4_video_subtitles`) with at most ``subtitle_words`` words shown
    (the release: 400 with Llama-2, 800 with Mistral).
    """

    template: str
    visual: tuple[tuple[str, int, int | tuple[int, ...]], ...]
    num_frames: int
    template_variant: str | None = None
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    audio_clips: int = 0
    audio_mel_bins: int = 128
    audio_frames: int = 204
    audio_sample_rate: int = 16_000
    qformer_text_len: int = 0
    subtitles: bool = False
    subtitle_words: int = 400
    stop_strings: tuple[str, ...] = ("</s>",)
    template_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        for name, _, count in self.visual:
            if isinstance(count, tuple) and len(count) != self.num_frames + 1:
                raise ValueError(f"visual piece {name!r}: a count per real frame count needs num_frames + 1 = "
                                 f"{self.num_frames + 1} entries, got {len(count)}")

    def visual_counts(self, frames: int | None = None) -> dict[str, int]:
        """Placeholder tokens per visual piece kind for a clip of ``frames`` real frames (default T)."""
        t = self.num_frames if frames is None else frames
        return {name: self._count(count, t) * (t if name == "frame" else 1) for name, _, count in self.visual}

    def piece_counts(self, frames: int) -> dict[str, int]:
        """Placeholder tokens per occurrence of each visual piece (``frame`` pieces occur once per frame)."""
        return {name: self._count(count, frames) for name, _, count in self.visual}

    def _count(self, count: int | tuple[int, ...], frames: int) -> int:
        return int(count[min(max(frames, 0), self.num_frames)]) if isinstance(count, tuple) else int(count)

    def inputs(self) -> frozenset[str]:
        """What the model perceives of a clip: ``frames`` always, ``audio`` with audio clips, ``subtitles`` when
        the template shows them. A question whose answer lies in another input can only be guessed."""
        return frozenset({"frames"} | ({"audio"} if self.audio_clips > 0 else set())
                         | ({"subtitles"} if self.subtitles else set()))

    def tokens_per_clip(self, frames: int | None = None) -> int:
        """Visual tokens of a clip of ``frames`` real frames; ``None``: the most any clip takes."""
        if frames is None:
            return max(sum(self.visual_counts(t).values()) for t in range(1, self.num_frames + 1))
        return sum(self.visual_counts(frames).values())


def format_spec(model: Any, config: Any, *, load_audio: bool = False, template_variant: str | None = None
                ) -> FormatSpec:
    """The :class:`FormatSpec` of a model from its declaration (``ModelSpec``) and config: template, visual
    pieces with their placeholder ids and counts, stop strings, audio, Q-Former text and subtitles.
    ``template_variant``: ``None`` or ``""`` for the model's default."""
    t = int(config.num_frames)
    visual = tuple((v.piece, int(getattr(config, v.id_field)), v.counts(config, t))
                   for v in model.visual if v.enabled(config, load_audio))
    kw: dict[str, Any] = {}
    if model.audio and any(name == "audio" for name, _, _ in visual):
        clips, mel, frames = getattr(config, model.audio)
        kw.update(audio_clips=int(clips), audio_mel_bins=int(mel), audio_frames=int(frames))
    if model.qformer_text:
        kw["qformer_text_len"] = int(getattr(config, model.qformer_text))
    if model.subtitles:
        kw.update(subtitles=True, subtitle_words=int(getattr(config, model.subtitle_words)) if model.subtitle_words
                  else 400)
    options = tuple(sorted(model.template_options.items()))
    return FormatSpec(model.template, visual, t, template_variant=template_variant or model.template_variant,
                      stop_strings=tuple(model.stop_strings), template_options=options, **kw)


def question_answer(record: Mapping[str, Any]) -> tuple[list[tuple[str, str]], str, str | None]:
    """``(history, question, answer)`` of a conversation record (markers such as ``<video>`` removed)."""
    conv = [c for c in record["conversations"] if c.get("from") in ("human", "gpt")]
    pairs: list[tuple[str, str | None]] = []
    for turn in conv:
        if turn["from"] == "human":
            q = turn["value"]
            for m in _MARKERS:
                q = q.replace(m, "")
            pairs.append((q.strip(), None))
        elif pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], turn["value"])
    if not pairs:
        raise ValueError(f"record {record.get('id', '?')} has no human turn")
    *history, (question, answer) = pairs
    return [(q, a or "") for q, a in history], question, answer


class VideoQAFormat:
    """``format_fn(record, frames, audio) -> dict of numpy arrays`` for :mod:`vjax.data.pipeline`.

    ``prompt_only=True`` renders the generation prompt (no answer; ``loss_mask`` all 0).
    """

    def __init__(self, spec: FormatSpec, tokenizer: TextTokenizer, prompt_only: bool = False):
        self.spec = spec
        self.tokenizer = tokenizer
        self.prompt_only = prompt_only
        self._mean = np.asarray(spec.mean, np.float32)
        self._std = np.asarray(spec.std, np.float32)

    def frames(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """uint8 ``[t, H, W, 3]`` -> normalised ``float32 [T, H, W, 3]``, ``bool [T]`` mask, real ``t``
        (more than T frames are subsampled uniformly)."""
        frames = np.asarray(frames)
        t_max = self.spec.num_frames
        if frames.shape[0] > t_max:
            frames = frames[np.linspace(0, frames.shape[0] - 1, t_max).round().astype(int)]
        t = frames.shape[0]
        x = self.normalize(frames)  # [t, H, W, 3]
        if t < t_max:
            x = np.concatenate([x, np.repeat(x[-1:], t_max - t, axis=0)])
        mask = np.arange(t_max) < t
        return x, mask, t

    def normalize(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames ``[..., H, W, 3]`` -> ``float32``, scaled to [0, 1] then normalised by the spec's mean and
        std (the model's pixel input)."""
        return (np.asarray(frames).astype(np.float32) / 255.0 - self._mean) / self._std

    def context(self, record: Mapping[str, Any], t: int) -> templates.VisualContext:
        times = record.get("timestamps")
        times = [float(x) for x in np.asarray(times)[:t]] if times is not None else None
        subs = None
        if self.spec.subtitles and isinstance(record.get("subtitles"), str) and times is not None:
            try:
                cues = load_subtitles(record["subtitles"])
            except (OSError, ValueError):
                cues = []
            indices, fps = record.get("frame_indices"), record.get("fps")
            if indices is None or not fps:  # only the sampled times known: millisecond "frames" between them
                indices, fps = [int(round(x * 1000)) for x in times], 1000.0
            subs = minigpt4_video_subtitles(cues, [int(i) for i in np.asarray(indices)[:t]], float(fps),
                                            self.spec.subtitle_words)
        return templates.VisualContext(num_frames=t, frame_times=times, subtitles=subs,
                                       has_audio=self.spec.audio_clips > 0)

    def pieces(self, record: Mapping[str, Any], t: int, subtitles: bool = True) -> list[templates.Piece]:
        """The template's pieces of ``record`` for ``t`` real frames (visual slots as ``("visual", name)``);
        ``subtitles=False`` renders no subtitle (none is read)."""
        history, question, answer = question_answer(record)
        context = self.context(record if subtitles else {k: v for k, v in record.items() if k != "subtitles"}, t)
        return templates.render(self.spec.template, question, "" if self.prompt_only else answer,
                                history=history, context=context,
                                variant=self.spec.template_variant, options=dict(self.spec.template_options))

    def text(self, record: Mapping[str, Any], t: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and loss mask ``int32 [L]`` for ``t`` real frames."""
        pieces = self.pieces(record, t)
        if self.prompt_only:  # everything before the last answer: the text that precedes it (" ") included,
            last = max(i for i, (kind, _) in enumerate(pieces) if kind == "target")  # exactly as in training
            pieces = pieces[:last]
        counts = self.spec.piece_counts(t)  # per piece occurrence: "frame" pieces repeat per frame
        visual = {name: (pid, counts[name]) for name, pid, _ in self.spec.visual}
        return templates.tokenize(pieces, self.tokenizer, visual)

    def prepare_audio(self, audio: np.ndarray | None) -> np.ndarray | None:
        """The model's audio input from a decoded mono waveform ``[N]``: ImageBind fbank clips
        ``float32 [audio_clips, audio_mel_bins, audio_frames]`` (a silent 2 s clip when ``audio`` is None);
        ``audio`` unchanged when the spec has no audio clips or it already has that 3-d shape.

        The pipeline calls this once per decoded clip, before its cache, so a clip's fbank is computed once
        rather than on every epoch (:class:`vjax.data.pipeline.LoadAndFormat`, ``audio_transform``).
        """
        s = self.spec
        if not s.audio_clips:
            return audio
        shape = (s.audio_clips, s.audio_mel_bins, s.audio_frames)
        if audio is not None and np.ndim(audio) == 3:
            if np.shape(audio) != shape:
                raise ValueError(f"audio features of shape {np.shape(audio)} do not match the spec's {shape}")
            return audio
        wav = np.zeros(s.audio_sample_rate * 2, np.float32) if audio is None else np.asarray(audio, np.float32)
        return imagebind_audio_features(wav, s.audio_sample_rate, num_clips=s.audio_clips,
                                        num_mel_bins=s.audio_mel_bins, target_length=s.audio_frames
                                        ).astype(np.float32)

    def __call__(self, record: dict, frames: np.ndarray, audio: np.ndarray | None) -> dict[str, np.ndarray]:
        """One training/eval example; ``audio`` is the decoded waveform ``[N]`` or its :meth:`prepare_audio`
        output."""
        s = self.spec
        x, mask, t = self.frames(frames)
        ids, loss_mask = self.text(record, t)
        out = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
               "frames": x, "frame_mask": mask}
        if s.audio_clips:
            feats = self.prepare_audio(audio)
            out["audio"] = feats if feats is not audio else np.array(feats)  # never hand out the cached array
            out["audio_mask"] = np.ones(s.audio_clips, bool)
        if s.qformer_text_len:
            _, question, _ = question_answer(record)
            q = self.tokenizer.encode(question)[: s.qformer_text_len]
            qids = np.full(s.qformer_text_len, self.tokenizer.pad_token_id, np.int32)
            qids[: len(q)] = q
            out["qformer_input_ids"] = qids
            out["qformer_attention_mask"] = (np.arange(s.qformer_text_len) < len(q)).astype(np.int32)
        return out


def left_pad(batch: Sequence[Mapping[str, np.ndarray]], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Stack prompt-only elements into a generation batch: ``input_ids``/``attention_mask`` left-padded
    to ``length``; every other key stacked as is."""
    out: dict[str, list] = {}
    for e in batch:
        n = e["input_ids"].shape[0]
        if n > length:
            raise ValueError(f"prompt of {n} tokens exceeds the generation length {length}")
        for k, v in e.items():
            if k == "input_ids":
                v = np.concatenate([np.full(length - n, pad_id, v.dtype), v])
            elif k in ("attention_mask", "loss_mask"):
                v = np.concatenate([np.zeros(length - n, v.dtype), v])
            out.setdefault(k, []).append(v)
    return {k: np.stack(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------- scoring
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of ``stops`` (e.g. ``</s>``, ``###``), stripped."""
    end = len(text)
    for s in stops:
        i = text.find(s)
        if s and i >= 0:
            end = min(end, i)
    return text[:end].strip()


_LETTER = re.compile(r"^\(?([A-Za-z])\)(?:\s|$)|^\(?([A-Za-z])\)?$")
_TRAILING_LETTER = re.compile(r"\s\(([A-Za-z])\)$")  # "square (B)": the text_letter answer style


def score_answer(prediction: str, record: Mapping[str, Any]) -> bool:
    """Whether ``prediction`` answers ``record`` (see the module docstring)."""
    pred = prediction.strip()
    choices = record.get("choices")
    if choices:
        ai = int(record["answer_index"])
        m = _LETTER.match(pred)
        if m:
            letter = (m.group(1) or m.group(2)).upper()
            return ord(letter) - ord("A") == ai
        m = _TRAILING_LETTER.search(pred)
        if m:
            return ord(m.group(1).upper()) - ord("A") == ai
        return normalize_answer(pred) == normalize_answer(str(choices[ai]))
    return normalize_answer(pred) == normalize_answer(str(record["answer"]))


# Question types whose answer is a time: scored by distance as well as by exact match.
TIMESTAMP_TYPES = ("appear_time", "timestamp", "temporal_grounding")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def is_timestamp_question(record: Mapping[str, Any]) -> bool:
    return str(record.get("question_type", "")) in TIMESTAMP_TYPES and not record.get("choices")


def first_seconds(text: str) -> float | None:
    """The first number in ``text`` (``"at 2.5 s"`` -> 2.5), or None."""
    m = _NUMBER.search(text)
    return float(m.group()) if m else None


def timestamp_error(prediction: str, record: Mapping[str, Any]) -> float | None:
    """``|predicted - true|`` seconds of a timestamp answer (None when the prediction names no time)."""
    pred, true = first_seconds(prediction), first_seconds(str(record["answer"]))
    if pred is None or true is None:
        return None
    return abs(pred - true)
