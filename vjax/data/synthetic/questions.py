"""Questions about a scene (open-ended and multiple choice) and its caption, as conversation records."""

from __future__ import annotations

import math

import numpy as np

from vjax.data.annotations import format_multiple_choice, option_answer
from vjax.data.synthetic.config import MOTION_ANSWERS, NAMES, NUMBER_WORDS, PALETTE, SHAPES, SyntheticConfig
from vjax.data.synthetic.scene import _clip_rng, time_step


def _fmt_seconds(t: float) -> str:
    """``1.25`` -> ``"1.25 seconds"``, ``1.0`` -> ``"1 second"``, ``0.5`` -> ``"0.5 seconds"``."""
    t = round(float(t), 3)
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
        # Options: the times of the appearance grid within the clip (0 s included): none is off the grid of the
        # answers or past the clip's end.
        step, duration = time_step(scene["fps"]), scene["num_frames"] / scene["fps"]
        add("appear_time", [f"At what time does {_describe(o)} appear?", f"When does {_describe(o)} first appear?"],
            f"at {_fmt_seconds(o['appear_s'])}",
            [f"at {_fmt_seconds(k * step)}" for k in range(math.ceil(duration / step - 1e-9))])
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


# The input each question type needs besides the frames (:meth:`vjax.data.formats.FormatSpec.inputs`): a model
# that lacks it (no audio branch, no subtitles in its template) can only guess the answer.
QUESTION_INPUTS = {"beep_count": "audio", "beep_pitch": "audio", "subtitle": "subtitles"}


def answerable(record: dict, inputs: frozenset[str] | set[str]) -> bool:
    """Whether a model perceiving ``inputs`` (``FormatSpec.inputs()``) can answer ``record`` from its clip:
    its ``question_type`` (every type of a multi-turn record's ``question_types``) needs only inputs it has."""
    types = record.get("question_types") or [record.get("question_type")]
    return all(QUESTION_INPUTS.get(t, "frames") in inputs for t in types)


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


def caption_record(scene: dict, video_rel: str, srt_rel: str | None = None) -> dict:
    """The ``caption`` record of a clip: "Describe the video." (or its variant) -> :func:`caption`."""
    question, answer = CAPTION_QUESTIONS[scene["index"] % len(CAPTION_QUESTIONS)], caption(scene)
    rec = {"id": f"{scene['split']}_{scene['index']:06d}_caption", "video": video_rel, "question_type": "caption",
           "question": question, "answer": answer,
           "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]}
    if srt_rel is not None:
        rec["subtitles"] = srt_rel
    return rec


def description(scene: dict) -> str:
    """Everything a clip shows and sounds, as text: :func:`caption`, then its beeps and its subtitle, e.g.
    ``"A red circle moves left. It beeps two times: high, then low. The subtitle says: The red circle is called
    Alice."`` (the context of the tiny LLM's text pretraining, ``experiments.pretrain``)."""
    return f"{caption(scene)} {sound_description(scene)}{subtitle_description(scene)}"


def sound_description(scene: dict) -> str:
    """What a clip sounds like, e.g. ``"It beeps two times: high, then low."``, or ``"There is no beep."``."""
    beeps = scene["beeps"]
    if not beeps:
        return "There is no beep."
    pitches = ", then ".join(b["pitch"] for b in beeps)
    return f"It beeps {NUMBER_WORDS[len(beeps)]} time{'s' if len(beeps) > 1 else ''}: {pitches}."


def subtitle_description(scene: dict) -> str:
    """``" The subtitle says: <text>"`` for a clip with a subtitle, else ``""``."""
    return f" The subtitle says: {scene['subtitle']['text']}" if scene["subtitle"] is not None else ""


def _record(c: dict, rec_id: str, cfg: SyntheticConfig, rng: np.random.Generator, video_rel: str,
            srt_rel: str | None) -> dict:
    """One candidate question as a record: multiple choice (3 distractors from its pool, shuffled) with probability
    ``cfg.multiple_choice_fraction``, else open."""
    rec = {"id": rec_id, "video": video_rel, "question_type": c["type"], "question": c["question"],
           "answer": c["answer"]}
    if rng.random() < cfg.multiple_choice_fraction and c["pool"]:
        n_distract = min(3, len(c["pool"]))
        choices = [c["answer"]] + [str(x) for x in rng.choice(c["pool"], n_distract, replace=False)]
        choices = [choices[i] for i in rng.permutation(len(choices))]
        ai = choices.index(c["answer"])
        human = f"<video>\n{format_multiple_choice(c['question'], choices, cfg.mc_answer)}"
        gpt = option_answer(choices, ai, cfg.mc_answer)
        rec.update(choices=choices, answer_index=ai)
    else:
        human, gpt = f"<video>\n{c['question']}", c["answer"]
    rec["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    if srt_rel is not None:
        rec["subtitles"] = srt_rel
    return rec


def every_question(scene: dict, cfg: SyntheticConfig, rng: np.random.Generator, video_rel: str = "") -> list[dict]:
    """Every question a scene answers unambiguously (not only the ``questions_per_clip`` a clip's records keep), each
    a record, open or multiple choice as :func:`_make_records` draws them, then the caption record: the text
    pretraining of ``experiments.pretrain`` asks all of them about one description."""
    stem = f"{scene['split']}_{scene['index']:06d}"
    out = [_record(c, f"{stem}_all{j}", cfg, rng, video_rel, None) for j, c in enumerate(_candidates(scene, rng))]
    return out + [caption_record(scene, video_rel)]


def _make_records(scene: dict, cfg: SyntheticConfig, video_rel: str, srt_rel: str | None) -> list[dict]:
    rng = _clip_rng(cfg, scene["split"], scene["index"]).spawn(1)[0]
    cands = _candidates(scene, rng)
    must = [c for c in cands if c["type"] in ("subtitle", "recall")]
    rest = [c for c in cands if c["type"] not in ("subtitle", "recall")]
    k = max(0, cfg.questions_per_clip - len(must))
    chosen = must + [rest[i] for i in sorted(rng.choice(len(rest), min(k, len(rest)), replace=False))]
    records = [_record(c, f"{scene['split']}_{scene['index']:06d}_q{j}", cfg, rng, video_rel, srt_rel)
               for j, c in enumerate(chosen)]
    if cfg.train_captions and scene["split"] == "train":  # no rng draws: the questions above are unchanged
        records.append(caption_record(scene, video_rel, srt_rel))
    return records
