"""The built-in synthetic video-QA set: real H.264/AAC mp4 clips + LLaVA-style JSONL + a BPE tokenizer.

Everything is generated on the machine, deterministically from a seed, so the default training job
and the tests need no download. Each clip shows 1-3 objects (distinct shapes among circle / square /
triangle, distinct colours among six well-separated hues) on a noisy grey background. An object may
move left / right / up / down or stay, and may appear and vanish at given times. In short clips (2-5.5 s)
a later object appears at a time drawn uniformly from 0.25-4 s on a 0.25 s grid, and the clip is drawn
long enough to show it for at least 1.5 s, so that no one time answers many appearance-time questions.
The audio track has 0-3 beeps, each low (500 Hz) or high (1500 Hz). Some clips get a subtitle track
(``.srt`` beside the clip) that names one object — a fact that is not visible in the frames. Long clips
(100-128 frames) show one object only at the start, then others, and ask to recall the start.

Questions (open-ended and multiple-choice) cover colour, shape, motion direction, object count,
order of appearance, appearance time (seconds), beep count, beep pitch, the subtitle fact and, in
long clips, recall of the start. Records follow the LLaVA / VideoInstruct conversation format::

    {"id": "train_000012_q1", "video": "videos/train/000012.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}],
     "question_type": "colour", "question": "...", "answer": "red",
     "choices": [...], "answer_index": 2,             # multiple choice only
     "subtitles": "videos/train/000012.srt"}          # clips with subtitles only

Paths in records are relative to the dataset root. Train / val / test clips come from disjoint seed
streams (``SeedSequence([seed, split_id, index])``). A ``manifest.json`` holding a hash of the
generation parameters marks a complete set; :func:`ensure_synthetic_dataset` skips generation when it
is present and valid.

The package: ``config`` (parameters, palette, paths), ``scene`` (sampling), ``render`` (frames, audio,
mp4, srt), ``questions`` (records), ``dataset`` (tokenizer, the set). Needs PyAV (``av``) to write the
mp4s, ``tokenizers``/``transformers`` for the tokenizer, ``tqdm``.
"""

from __future__ import annotations

from vjax.data.synthetic.config import (
    GENERATOR_VERSION,
    MOTION_ANSWERS,
    MOTIONS,
    NAMES,
    NUMBER_WORDS,
    PALETTE,
    PITCHES,
    SHAPES,
    SPECIAL_TOKENS,
    SPLITS,
    TEMPLATE_TEXT,
    TEMPLATE_TOKENS,
    TEXTURE_STD,
    SyntheticConfig,
    SyntheticPaths,
)
from vjax.data.synthetic.dataset import (
    caption_records,
    default_root,
    ensure_synthetic_dataset,
    generate_clip,
    read_scenes,
    train_tokenizer,
)
from vjax.data.synthetic.questions import (
    CAPTION_QUESTIONS,
    QUESTION_INPUTS,
    answerable,
    caption,
    caption_record,
    description,
    every_question,
)
from vjax.data.synthetic.render import patch_labels, render_audio, render_frames, write_mp4, write_srt
from vjax.data.synthetic.scene import _sample_scene

__all__ = [
    "CAPTION_QUESTIONS", "GENERATOR_VERSION", "MOTIONS", "MOTION_ANSWERS", "NAMES", "NUMBER_WORDS", "PALETTE",
    "PITCHES", "QUESTION_INPUTS", "SHAPES", "SPECIAL_TOKENS", "SPLITS", "TEMPLATE_TEXT", "TEMPLATE_TOKENS",
    "TEXTURE_STD", "SyntheticConfig", "SyntheticPaths", "_sample_scene", "answerable", "caption", "caption_record",
    "caption_records", "default_root", "description", "ensure_synthetic_dataset", "every_question", "generate_clip",
    "patch_labels", "read_scenes", "render_audio", "render_frames", "train_tokenizer", "write_mp4", "write_srt",
]
