"""The built-in synthetic video-QA set: real H.264/AAC mp4 clips + LLaVA-style JSONL + a BPE tokenizer.

Everything is generated on the machine, deterministically from a seed, so the default training job
and the tests need no download. Each clip shows 1-3 objects (distinct shapes among circle / square /
triangle, distinct colours among six well-separated hues) on a noisy grey background. An object may
move left / right / up / down or stay, and may appear and vanish at given times. The audio track has
0-3 beeps, each low (500 Hz) or high (1500 Hz). Some clips get a subtitle track (``.srt`` beside the
clip) that names one object — a fact that is not visible in the frames. Long clips (100-128 frames)
show one object only at the start, then others, and ask to recall the start.

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

Needs PyAV (``av``) to write the mp4s, ``tokenizers``/``transformers`` for the tokenizer, ``tqdm``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from fractions import Fraction
from typing import Any

import numpy as np

GENERATOR_VERSION = 1  # bump whenever the generated files change for the same parameters
TEXTURE_STD = 18.0  # grey levels of the default background texture
# Parameters added after sets were generated: left out of the hash at their default, so those sets stay valid.
_LATER_PARAMS = ("train_captions", "texture_std")

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
    """

    seed: int = 0
    num_train: int = 240
    num_val: int = 32
    num_test: int = 32
    size: int = 64
    fps: int = 8
    min_seconds: float = 2.0
    max_seconds: float = 4.0
    long_every: int = 8
    long_min_frames: int = 100
    long_max_frames: int = 128
    questions_per_clip: int = 3
    train_captions: bool = False
    texture_std: float = TEXTURE_STD
    multiple_choice_fraction: float = 0.5
    subtitle_fraction: float = 0.3
    audio_sample_rate: int = 16_000
    crf: int = 18
    vocab_size: int = 1024
    show_progress: bool = True

    def __post_init__(self):
        if self.size < 32 or self.size % 2:
            raise ValueError(f"size must be an even number >= 32 pixels, got {self.size}")
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


# ---------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------


def _clip_rng(cfg: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLITS.index(split), index]))


def _sample_scene(cfg: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    """Ground truth of one clip: frame count, objects (with paths), beeps, subtitle."""
    rng = _clip_rng(cfg, split, index)
    fps, size = cfg.fps, cfg.size
    long = cfg.long_every > 0 and index % cfg.long_every == cfg.long_every - 1
    if long:
        n_frames = int(rng.integers(cfg.long_min_frames, cfg.long_max_frames + 1))
        n_obj = int(rng.integers(2, 4))
    else:
        n_frames = int(rng.integers(round(cfg.min_seconds * fps), round(cfg.max_seconds * fps) + 1))
        n_obj = int(rng.integers(1, 4))
    duration = n_frames / fps
    colours = [str(c) for c in rng.choice(list(PALETTE), n_obj, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, n_obj, replace=False)]

    # Appearance / vanishing times on a 0.5 s grid (frame = time * fps).
    half_steps = max(1, int(duration // 0.5))
    appear = [0.0] * n_obj
    vanish: list[float | None] = [None] * n_obj
    if long:
        vanish[0] = float(rng.choice([1.0, 1.5, 2.0]))
        slots = np.arange(int(vanish[0] / 0.5) + 1, max(int((duration / 2) / 0.5), int(duration / 0.5) - 2) + 1)
        n_obj = min(n_obj, 1 + len(slots))
        later = rng.choice(slots, n_obj - 1, replace=False)
        for i, t in enumerate(sorted(later), start=1):
            appear[i] = float(t) * 0.5
    else:
        slots = [s for s in range(1, max(2, half_steps // 2 + 1))]
        for i in range(1, n_obj):
            if rng.random() < 0.7 and slots:
                s = int(rng.choice(slots))
                slots.remove(s)
                appear[i] = s * 0.5
        for i in range(n_obj):
            if rng.random() < 0.2 and appear[i] + 1.5 <= duration - 0.5:
                vanish[i] = float(rng.choice(np.arange(appear[i] + 1.5, duration - 0.5 + 1e-9, 0.5)))

    radius = max(3, round(size * 0.14))
    travel = round(size * 0.35)
    margin = radius + 2
    boxes: list[tuple[float, float, float, float]] = []
    objects = []
    for i in range(n_obj):
        for attempt in range(200):
            motion = str(rng.choice(MOTIONS)) if attempt < 150 else "none"
            dx, dy = {"left": (-travel, 0), "right": (travel, 0), "up": (0, -travel), "down": (0, travel),
                      "none": (0, 0)}[motion]
            x0 = float(rng.integers(margin - min(dx, 0), size - margin - max(dx, 0)))
            y0 = float(rng.integers(margin - min(dy, 0), size - margin - max(dy, 0)))
            x1, y1 = x0 + dx, y0 + dy
            box = (min(x0, x1) - radius - 2, min(y0, y1) - radius - 2, max(x0, x1) + radius + 2,
                   max(y0, y1) + radius + 2)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        else:  # could not place without overlap: drop this and later objects
            break
        boxes.append(box)
        objects.append({
            "colour": colours[i], "shape": shapes[i], "motion": motion, "appear_s": appear[i],
            "vanish_s": vanish[i], "start_xy": [x0, y0], "end_xy": [x1, y1], "radius": radius,
        })

    n_beeps = int(rng.integers(0, 4))
    slot_count = int(duration // 0.5)
    beep_slots = sorted(int(s) for s in rng.choice(slot_count, min(n_beeps, slot_count), replace=False))
    beeps = [{"start_s": s * 0.5 + 0.1, "duration_s": 0.2, "pitch": str(rng.choice(list(PITCHES)))}
             for s in beep_slots]

    subtitle = None
    if rng.random() < cfg.subtitle_fraction:
        k = int(rng.integers(0, len(objects)))
        name = str(rng.choice(NAMES))
        start = float(np.round(rng.uniform(0.0, max(0.0, duration - 1.5)), 1))
        subtitle = {"object": k, "name": name, "start_s": start, "end_s": min(duration, start + 1.5),
                    "text": f"The {objects[k]['colour']} {objects[k]['shape']} is called {name}."}
    return {"split": split, "index": index, "num_frames": n_frames, "fps": fps, "size": size,
            "long": long, "objects": objects, "beeps": beeps, "subtitle": subtitle,
            **({"texture_std": cfg.texture_std} if cfg.texture_std != TEXTURE_STD else {})}


def _visible(obj: dict, t: float) -> bool:
    return t >= obj["appear_s"] - 1e-9 and (obj["vanish_s"] is None or t < obj["vanish_s"] - 1e-9)


def _position(obj: dict, t: float, duration: float) -> tuple[float, float]:
    end = obj["vanish_s"] if obj["vanish_s"] is not None else duration
    a = min(max((t - obj["appear_s"]) / max(end - obj["appear_s"], 1e-6), 0.0), 1.0)
    (x0, y0), (x1, y1) = obj["start_xy"], obj["end_xy"]
    return x0 + a * (x1 - x0), y0 + a * (y1 - y0)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    if shape == "triangle":  # apex up, base at cy + r, base half-width r
        h = (yy - (cy - r)) / (2 * r)
        return (h >= 0) & (h <= 1) & (np.abs(xx - cx) <= r * h)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render_frames(scene: dict, seed: int) -> np.ndarray:
    """Frames of a scene -> uint8 ``[T, size, size, 3]``: noisy grey background + objects."""
    rng = np.random.default_rng(seed)
    n, size, fps = scene["num_frames"], scene["size"], scene["fps"]
    duration = n / fps
    texture = 110.0 + rng.normal(0.0, scene.get("texture_std", TEXTURE_STD), (size, size, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    frames = np.empty((n, size, size, 3), np.uint8)
    for f in range(n):
        t = f / fps
        img = np.repeat(texture + rng.normal(0.0, 3.0, (size, size, 1)), 3, axis=2)
        for obj in scene["objects"]:
            if _visible(obj, t):
                cx, cy = _position(obj, t, duration)
                img[_shape_mask(obj["shape"], cx, cy, obj["radius"], yy, xx)] = PALETTE[obj["colour"]]
        frames[f] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def render_audio(scene: dict, sample_rate: int, seed: int) -> np.ndarray:
    """Audio of a scene -> float32 mono ``[round(duration * sample_rate)]``: faint noise + beeps."""
    rng = np.random.default_rng(seed)
    n = int(round(scene["num_frames"] / scene["fps"] * sample_rate))
    wav = rng.normal(0.0, 0.003, n)
    for b in scene["beeps"]:
        s = int(round(b["start_s"] * sample_rate))
        m = int(round(b["duration_s"] * sample_rate))
        t = np.arange(m) / sample_rate
        ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fade in/out
        wav[s : s + m] += 0.5 * ramp[: n - s] * np.sin(2 * np.pi * PITCHES[b["pitch"]] * t)[: n - s]
    return wav.astype(np.float32)


def write_mp4(path: str, frames: np.ndarray, fps: int | float, audio: np.ndarray | None = None,
              sample_rate: int = 16_000, crf: int = 18) -> None:
    """Write uint8 ``[T, H, W, 3]`` frames as H.264 yuv420p (and float32 mono audio as AAC) with PyAV.

    Written to ``path + '.tmp'`` then renamed, so an interrupted run never leaves a half file.
    """
    import av

    tmp = path + ".tmp"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(tmp, "w", format="mp4") as box:
        vs = box.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "veryfast"})
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        vs.codec_context.thread_count = 1
        as_ = None
        if audio is not None:
            as_ = box.add_stream("aac", rate=sample_rate)
            as_.layout = "mono"
        for frame in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                box.mux(pkt)
        for pkt in vs.encode():
            box.mux(pkt)
        if as_ is not None:
            wav = np.asarray(audio, np.float32).reshape(1, -1)
            for k in range(0, wav.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, k : k + 1024]), format="fltp",
                                                layout="mono")
                af.sample_rate, af.pts = sample_rate, k
                for pkt in as_.encode(af):
                    box.mux(pkt)
            for pkt in as_.encode():
                box.mux(pkt)
    os.replace(tmp, path)


def _srt_time(t: float) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def write_srt(path: str, cues: list[tuple[float, float, str]]) -> None:
    """Write ``(start_s, end_s, text)`` cues as an SRT file."""
    lines = []
    for i, (s, e, text) in enumerate(cues, start=1):
        lines += [str(i), f"{_srt_time(s)} --> {_srt_time(e)}", text, ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


def _fmt_seconds(t: float) -> str:
    return f"{t:g} second" + ("" if t == 1 else "s")


def _describe(obj: dict) -> str:
    return f"the {obj['colour']} {obj['shape']}"


def _candidates(scene: dict, rng: np.random.Generator) -> list[dict]:
    """All questions that have one unambiguous answer for this scene, with distractor pools."""
    objs = scene["objects"]
    out: list[dict] = []

    def add(qtype: str, questions: list[str], answer: str, pool: list[str]) -> None:
        out.append({"type": qtype, "question": str(rng.choice(questions)), "answer": answer,
                    "pool": [p for p in dict.fromkeys(pool) if p != answer]})

    o = objs[int(rng.integers(len(objs)))]
    add("colour", [f"What colour is the {o['shape']}?", f"Which colour does the {o['shape']} have?"],
        o["colour"], list(PALETTE))
    o = objs[int(rng.integers(len(objs)))]
    add("shape", [f"What shape is the {o['colour']} object?", f"Which shape does the {o['colour']} object have?"],
        o["shape"], list(SHAPES))
    o = objs[int(rng.integers(len(objs)))]
    add("motion", [f"In which direction does {_describe(o)} move?", f"Where does {_describe(o)} go?"],
        MOTION_ANSWERS[o["motion"]], list(MOTION_ANSWERS.values()))
    add("count", ["How many objects appear in the video?", "How many different objects are shown?"],
        NUMBER_WORDS[len(objs)], list(NUMBER_WORDS[1:5]))
    times = [x["appear_s"] for x in objs]
    if len(objs) >= 2 and len(set(times)) == len(times):
        order = sorted(range(len(objs)), key=lambda i: times[i])
        which = str(rng.choice(["first", "last"]))
        target = objs[order[0] if which == "first" else order[-1]]
        add("order", [f"Which object appears {which}?", f"Which object is the {which} to appear?"],
            _describe(target), [_describe(x) for x in objs] +
            [f"the {c} {s}" for c in PALETTE for s in SHAPES])
    late = [x for x in objs if x["appear_s"] > 0]
    if late:
        o = late[int(rng.integers(len(late)))]
        add("appear_time", [f"At what time does {_describe(o)} appear?", f"When does {_describe(o)} first appear?"],
            f"at {_fmt_seconds(o['appear_s'])}", [f"at {_fmt_seconds(k * 0.5)}" for k in range(0, 9)])
    nb = len(scene["beeps"])
    add("beep_count", ["How many beeps can be heard?", "How many times does it beep?"],
        NUMBER_WORDS[nb], list(NUMBER_WORDS[:4]))
    if nb:
        which = int(rng.integers(nb))
        ordinal = ("first", "second", "third")[which]
        q = (["Is the beep high or low?", "What is the pitch of the beep?"] if nb == 1 else
             [f"Is the {ordinal} beep high or low?", f"What is the pitch of the {ordinal} beep?"])
        add("beep_pitch", q, scene["beeps"][which]["pitch"], ["high", "low"])
    sub = scene["subtitle"]
    if sub is not None:
        o = objs[sub["object"]]
        add("subtitle", [f"What is the name of {_describe(o)}?", f"What is {_describe(o)} called?"],
            sub["name"], list(NAMES))
    if scene["long"]:
        o = objs[0]
        kind = str(rng.choice(["colour", "shape"]))
        add("recall", [f"At the start of the video an object is shown and then vanishes. What {kind} is it?"],
            o[kind], list(PALETTE) if kind == "colour" else list(SHAPES))
    return out


CAPTION_QUESTIONS = ("Describe the video.", "What happens in the video?")


def caption(scene: dict) -> str:
    """The dense caption of a scene: its objects in order of appearance, e.g. ``"A red circle moves left.
    A blue square appears at 1.5 seconds and stays still."``"""
    parts = []
    for o in sorted(scene["objects"], key=lambda x: x["appear_s"]):
        when = f" appears at {_fmt_seconds(o['appear_s'])} and" if o["appear_s"] > 0 else ""
        motion = "stays still" if o["motion"] == "none" else f"moves {o['motion']}"
        parts.append(f"A {o['colour']} {o['shape']}{when} {motion}.")
    return " ".join(parts)


def _make_records(scene: dict, cfg: SyntheticConfig, video_rel: str, srt_rel: str | None) -> list[dict]:
    rng = _clip_rng(cfg, scene["split"], scene["index"]).spawn(1)[0]
    cands = _candidates(scene, rng)
    must = [c for c in cands if c["type"] in ("subtitle", "recall")]
    rest = [c for c in cands if c["type"] not in ("subtitle", "recall")]
    k = max(0, cfg.questions_per_clip - len(must))
    chosen = must + [rest[i] for i in sorted(rng.choice(len(rest), min(k, len(rest)), replace=False))]
    records = []
    for j, c in enumerate(chosen):
        rec = {"id": f"{scene['split']}_{scene['index']:06d}_q{j}", "video": video_rel,
               "question_type": c["type"], "question": c["question"], "answer": c["answer"]}
        if rng.random() < cfg.multiple_choice_fraction and c["pool"]:
            n_distract = min(3, len(c["pool"]))
            choices = [c["answer"]] + [str(x) for x in rng.choice(c["pool"], n_distract, replace=False)]
            choices = [choices[i] for i in rng.permutation(len(choices))]
            ai = choices.index(c["answer"])
            letters = "ABCD"
            opts = "\n".join(f"({letters[i]}) {x}" for i, x in enumerate(choices))
            human = (f"<video>\n{c['question']}\nOptions:\n{opts}\n"
                     "Answer with the option's letter from the given choices directly.")
            gpt = f"({letters[ai]}) {c['answer']}"
            rec.update(choices=choices, answer_index=ai)
        else:
            human, gpt = f"<video>\n{c['question']}", c["answer"]
        rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
        if srt_rel is not None:
            rec["subtitles"] = srt_rel
        records.append(rec)
    if cfg.train_captions and scene["split"] == "train":  # no rng draws: the questions above are unchanged
        question, answer = CAPTION_QUESTIONS[scene["index"] % len(CAPTION_QUESTIONS)], caption(scene)
        rec = {"id": f"{scene['split']}_{scene['index']:06d}_caption", "video": video_rel, "question_type": "caption",
               "question": question, "answer": answer,
               "conversations": [{"from": "human", "value": f"<video>\n{question}"},
                                 {"from": "gpt", "value": answer}]}
        if srt_rel is not None:
            rec["subtitles"] = srt_rel
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 1024) -> str:
    """Train a byte-level BPE on ``texts`` and save it as an HF tokenizer directory.

    Specials ``<pad> <s> </s> <unk> <video> <image> <audio>`` get ids 0-6, then the chat-template
    markers in ``TEMPLATE_TOKENS``. Loadable with ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
    Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS) + list(TEMPLATE_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts) + list(TEMPLATE_TEXT) * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]) + list(TEMPLATE_TOKENS),
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _paths(root: str) -> SyntheticPaths:
    return SyntheticPaths(
        root=root,
        annotations={s: os.path.join(root, f"{s}.jsonl") for s in SPLITS},
        scenes={s: os.path.join(root, f"scenes_{s}.jsonl") for s in SPLITS},
        tokenizer_dir=os.path.join(root, "tokenizer"),
        manifest=os.path.join(root, "manifest.json"),
    )


def _manifest_valid(paths: SyntheticPaths, cfg: SyntheticConfig) -> bool:
    try:
        with open(paths.manifest, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, ValueError):
        return False
    if man.get("params_hash") != cfg.params_hash():
        return False
    for rel, size in man.get("files", {}).items():
        p = os.path.join(paths.root, rel)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return False
    return bool(man.get("files"))


def generate_clip(cfg: SyntheticConfig, split: str, index: int, root: str) -> tuple[dict, list[dict]]:
    """Generate one clip (mp4 + optional srt) under ``root/videos/<split>/``; returns (scene, records)."""
    scene = _sample_scene(cfg, split, index)
    base = f"videos/{split}/{index:06d}"
    render_seed = int(_clip_rng(cfg, split, index).integers(2**31))
    frames = render_frames(scene, render_seed)
    audio = render_audio(scene, cfg.audio_sample_rate, render_seed + 1)
    write_mp4(os.path.join(root, base + ".mp4"), frames, cfg.fps, audio, cfg.audio_sample_rate, cfg.crf)
    srt_rel = None
    if scene["subtitle"] is not None:
        s = scene["subtitle"]
        duration = scene["num_frames"] / scene["fps"]
        cues = [(0.0, min(0.8, s["start_s"] - 0.1), "Watch closely.")] if s["start_s"] >= 0.5 else []
        cues.append((s["start_s"], s["end_s"], s["text"]))
        if s["end_s"] + 0.3 < duration:
            cues.append((s["end_s"] + 0.1, duration, "That is all."))
        srt_rel = base + ".srt"
        write_srt(os.path.join(root, srt_rel), cues)
    return scene, _make_records(scene, cfg, base + ".mp4", srt_rel)


def ensure_synthetic_dataset(root: str | os.PathLike, config: SyntheticConfig | None = None) -> SyntheticPaths:
    """Generate the synthetic video-QA set under ``root`` unless a valid one is already there.

    Valid = ``root/manifest.json`` exists, its ``params_hash`` equals ``config.params_hash()`` and every
    listed file exists with the recorded size. Otherwise the set is (re)generated: ``videos/<split>/``,
    ``<split>.jsonl`` (QA records), ``scenes_<split>.jsonl`` (ground truth), ``tokenizer/``, and the
    manifest last. Returns the :class:`SyntheticPaths`.
    """
    cfg = config or SyntheticConfig()
    root = os.path.abspath(os.fspath(root))
    paths = _paths(root)
    if _manifest_valid(paths, cfg):
        return paths
    from tqdm.auto import tqdm

    os.makedirs(root, exist_ok=True)
    if os.path.exists(paths.manifest):
        os.remove(paths.manifest)
    for split in SPLITS:  # remove only what this generator owns
        shutil.rmtree(os.path.join(root, "videos", split), ignore_errors=True)
        os.makedirs(os.path.join(root, "videos", split))
    shutil.rmtree(paths.tokenizer_dir, ignore_errors=True)

    texts: list[str] = []
    total = sum(cfg.num_clips(s) for s in SPLITS)
    bar = tqdm(total=total, desc="synthetic video-QA", unit="clip", disable=not cfg.show_progress)
    for split in SPLITS:
        scenes, records = [], []
        for i in range(cfg.num_clips(split)):
            scene, recs = generate_clip(cfg, split, i, root)
            scenes.append(scene)
            records.extend(recs)
            bar.update(1)
        _write_jsonl(paths.annotations[split], records)
        _write_jsonl(paths.scenes[split], scenes)
        if split == "train":
            for r in records:
                texts.extend(c["value"].replace("<video>\n", "") for c in r["conversations"])
            texts.extend(s["subtitle"]["text"] for s in scenes if s["subtitle"])
    bar.close()
    train_tokenizer(texts, paths.tokenizer_dir, cfg.vocab_size)

    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if rel != "manifest.json" and not name.endswith(".tmp"):
                files[rel] = os.path.getsize(p)
    man = {"params_hash": cfg.params_hash(), "config": dataclasses.asdict(cfg),
           "generator_version": GENERATOR_VERSION, "files": dict(sorted(files.items()))}
    with open(paths.manifest + ".tmp", "w", encoding="utf-8") as f:
        json.dump(man, f, indent=1)
    os.replace(paths.manifest + ".tmp", paths.manifest)
    return paths


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)
