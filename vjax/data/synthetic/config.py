"""The synthetic set's parameters, vocabulary of the scenes (palette, shapes, motions) and its paths."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from vjax.data.annotations import check_mc_style


GENERATOR_VERSION = 2  # bump whenever the generated files change for the same parameters
TEXTURE_STD = 18.0  # grey levels of the default background texture
# Parameters added after sets were generated: left out of the hash at their default, so those sets stay valid.
_LATER_PARAMS = ("train_captions", "texture_std", "mc_answer")

# Six hues 60 degrees apart: a colour is recoverable from the hue of an object's mean pixel.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (225, 215, 30),
    "green": (30, 200, 40),
    "cyan": (30, 205, 215),
    "blue": (35, 60, 225),
    "magenta": (210, 40, 210),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "none")
MOTION_ANSWERS = {"left": "left", "right": "right", "up": "up", "down": "down", "none": "it stays still"}
PITCHES = {"low": 500.0, "high": 1500.0}  # Hz
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
NAMES = ("Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
         "Kira", "Lukas", "Mara", "Nico", "Olga", "Pavel")
SPLITS = ("train", "val", "test")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<video>", "<image>", "<audio>")
# Role / placeholder markers used by the chat templates of the seven models (kept atomic).
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>",
                   "<|image_pad|>", "<ImageHere>", "<AudioHere>", "<vid_patch>", "<vid_start>", "<vid_end>")
# Plain-text template pieces, added to the tokenizer's training text so they tokenize compactly.
TEMPLATE_TEXT = (
    "###Human: ", "###Assistant: ", "[INST] ", " [/INST]", "<Video><ImageHere></Video> ",
    "<Img><ImageHere>", "<Cap>", "Question: ", " Answer:", " Short answer:", "system\n", "user\n",
    "assistant\n", "USER: ", "ASSISTANT: ",
    "A chat between a curious human and an artificial intelligence assistant.",
    "You are a helpful assistant.",
    "The video contains 8 frames sampled at 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5 seconds. ",
)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Generation parameters (all of them enter the manifest hash).

    Sizes: ``size`` x ``size`` pixels, ``fps`` frames/s, short clips ``min_seconds``-``max_seconds``
    long, every ``long_every``-th clip long with ``long_min_frames``-``long_max_frames`` frames.
    ``train_captions``: each training clip also gets one ``caption`` record ("Describe the video." ->
    every object's colour, shape, motion and appearance time, in order of appearance): dense supervision
    like the video-caption pairs of the papers' first stage. Held-out splits keep questions only.
    ``texture_std``: grey levels of the static background texture (a per-clip pattern; 0 = flat grey
    with only the per-frame noise).
    ``mc_answer``: how multiple-choice answers are written (``vjax.data.annotations.MC_ANSWER_STYLES``):
    ``"letter"`` "(B) square" (MVBench's, the default) or ``"text_letter"`` "square (B)" (the text decided
    first, then its letter copied from the options).
    """

    seed: int = 0
    num_train: int = 240
    num_val: int = 32
    num_test: int = 32
    size: int = 64
    fps: int = 8
    min_seconds: float = 2.0
    max_seconds: float = 5.5
    long_every: int = 8
    long_min_frames: int = 100
    long_max_frames: int = 128
    questions_per_clip: int = 3
    train_captions: bool = False
    texture_std: float = TEXTURE_STD
    multiple_choice_fraction: float = 0.5
    mc_answer: str = "letter"
    subtitle_fraction: float = 0.3
    audio_sample_rate: int = 16_000
    crf: int = 18
    vocab_size: int = 1024
    show_progress: bool = True

    def __post_init__(self):
        if self.size < 32 or self.size % 2:
            raise ValueError(f"size must be an even number >= 32 pixels, got {self.size}")
        check_mc_style(self.mc_answer)
        if not self.texture_std >= 0:
            raise ValueError(f"texture_std must be >= 0, got {self.texture_std}")
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        if not 1.0 <= self.min_seconds <= self.max_seconds:
            raise ValueError(f"need 1 <= min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if self.long_every and not 4 * self.fps <= self.long_min_frames <= self.long_max_frames:
            raise ValueError(f"need 4 s * fps <= long_min_frames <= long_max_frames, got "
                             f"{self.long_min_frames}, {self.long_max_frames} at {self.fps} fps")
        for name in ("num_train", "num_val", "num_test", "questions_per_clip", "long_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def num_clips(self, split: str) -> int:
        """Clip count of ``split`` (one of ``train``, ``val``, ``test``)."""
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def params_hash(self) -> str:
        """sha256 of the parameters that change the output (``show_progress`` excluded)."""
        d = dataclasses.asdict(self)
        d.pop("show_progress")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _LATER_PARAMS:
            if d[name] == defaults[name]:
                d.pop(name)
        d["generator_version"] = GENERATOR_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated set lives. ``annotations``/``scenes`` map split -> JSONL file."""

    root: str
    annotations: dict[str, str]
    scenes: dict[str, str]
    tokenizer_dir: str
    manifest: str
