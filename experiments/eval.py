r"""Evaluate a checkpoint: ``python -m experiments.eval --workdir=DIR [--data=FILE]``.

    --workdir=DIR     a training run or a converted checkpoint (then --tokenizer=DIR too)
    --data=FILE       an annotation file; default: the test split of the run's synthetic set
                      (its validation split when the set has no test split)
    --format=auto     conversations (LLaVA/VideoInstruct JSON/JSONL) | mvbench (multiple choice:
                      video, question, candidates, answer) | open_qa (MSVD/MSRVTT-QA: video, question,
                      answer); auto picks by the first record's keys
    --limit=N         the first N records only (0: all)
    --step=N          a training run's checkpoint of step N (default the newest; the report is <data name>_stepN.json,
                      so ``python -m experiments.results --curve=DIR`` tabulates a run's learning curve)
    --out=FILE        the JSON report (default <workdir>/eval/<data name>.json; <data name>_int8.json quantised)
    --quantize=int8   int8 weights with per-channel scales (vjax.layers.quant); the report records it
    --blind           control: every clip replaced by a constant grey clip of its shape (silent, no subtitles)
    --shuffled        control: videos permuted across questions; with either, accuracy should fall to the
                      chance column (the report is <data name>_blind.json / _shuffled.json)
    --nolikelihood    multiple choice by the generated letter only

Answers are generated greedily in batches with the KV cache (``vjax.generate``); prompts use the model's
template exactly as in training. Scores (:mod:`vjax.data.formats`):

* multiple choice (MVBench style): the generated option letter or option text; and, side by side, the option
  whose answer ("(B) square") the model finds most likely, as lm-eval-harness scores multiple choice
  (``vjax.eval.OptionScorer``); accuracy per task (``question_type``);
* open-ended QA (MSVD/MSRVTT-QA style): normalised exact match (lower case, no punctuation or articles);
* timestamp questions (``question_type`` in ``formats.TIMESTAMP_TYPES``): exact match, and the fraction
  within ``--timestamp_tolerance`` seconds with the mean absolute error, next to its chance level (the
  fraction that the best single time, given as every answer, would score);
* on the synthetic set, every task also per object count of the clip: a lone object needs perception only,
  several need the answer bound to the object the question names;
* beside every figure its chance level: 1 / options for multiple choice, the best constant answer of each
  task (within the group) for open questions (:func:`chance_level`).

Unreadable videos are skipped and counted; more than ``--max_bad_fraction`` (10 %) of the records, or no
record evaluated at all, fails the run (exit code 2), whatever the number of records. The report holds every
prediction; a table is printed. Errors (not a checkpoint, a missing or unreadable annotation file, too many
unreadable videos): one line, exit code 2 (the convention of :mod:`experiments.cli`).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import flags

from experiments import cli, config
from vjax import eval as vjax_eval
from vjax.pretrained import NotACheckpoint, Run, synthetic_paths

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when run as a command, so chat and eval import side by side)."""
    config.define_checkpoint_flags()
    flags.DEFINE_string("data", None, "annotation file (default: the synthetic set's test split)")
    flags.DEFINE_enum("format", "auto", ["auto", "conversations", "mvbench", "open_qa"], "annotation format")
    flags.DEFINE_string("video_root", None, "where relative video paths resolve (default: the file's folder)")
    flags.DEFINE_string("video_ext", "", "open_qa: extension appended to video names without one (e.g. .avi)")
    flags.DEFINE_integer("batch_size", 0, "generation batch (0: the run's eval.batch_size)")
    flags.DEFINE_integer("max_new_tokens", 0, "longest answer (0: the run's eval.max_new_tokens)")
    flags.DEFINE_integer("limit", 0, "evaluate the first N records only (0: all)")
    flags.DEFINE_float("timestamp_tolerance", 0.5, "seconds within which a timestamp answer counts as close "
                      "(0.5: the training issue's appearance-time target)")
    flags.DEFINE_string("out", None, "JSON report path (default <workdir>/eval/<data name>.json)")
    flags.DEFINE_bool("progress", True, "show a progress bar")
    flags.DEFINE_bool("likelihood", True, "also score multiple choice by the likelihood of each option's answer")
    flags.DEFINE_bool("blind", False, "control: every clip replaced by a constant grey clip of its shape (silent, "
                      "no subtitles); accuracy should fall to the chance column")
    flags.DEFINE_bool("shuffled", False, "control: videos permuted across questions (no question keeps its clip)")
    flags.DEFINE_float("max_bad_fraction", 0.1, "fail (exit 2) when more than this fraction of the records has "
                       "an unreadable video; a run that evaluates nothing always fails")


# --------------------------------------------------------------------------------------------- data
def detect_format(path: str) -> str:
    """``conversations`` | ``mvbench`` | ``open_qa`` from the first record's keys."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            line = next((x for x in f if x.strip()), "{}")
            first = json.loads(line)
        else:
            data = json.load(f)
            if not isinstance(data, list) or not data:
                raise ValueError(f"{path} must hold a non-empty JSON list of records")
            first = data[0]
    if not isinstance(first, dict):
        raise ValueError(f"{path}: records must be JSON objects, got {type(first).__name__}")
    if "candidates" in first:
        return "mvbench"
    if "conversations" in first:
        return "conversations"
    if "question" in first and "answer" in first:
        return "open_qa"
    raise ValueError(f"{path}: cannot tell the format from the keys {sorted(first)}; pass --format")


def load_records(path: str, fmt: str = "auto", video_root: str | None = None, video_ext: str = "") -> list[dict]:
    from vjax.data import annotations  # noqa: PLC0415

    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "mvbench":
        return annotations.load_mvbench(path, video_root or os.path.dirname(os.path.abspath(path)))
    if fmt == "open_qa":
        return annotations.load_open_qa(path, video_root, video_ext)
    return annotations.load_conversations(path, video_root)


def synthetic_split(run: Run, split: str = "test") -> tuple[list[dict], str]:
    """Records of the run's synthetic set (``test``, or ``val`` when the set has no test clips)."""
    paths = synthetic_paths(run.config)
    for name in (split, "val"):
        recs = synthetic_records(paths, name)
        if recs:
            return recs, f"synthetic_{name}"
    raise ValueError(f"the synthetic set in {paths.root} has no test or validation records")


def synthetic_records(paths, split: str) -> list[dict]:
    """The QA records of one split of a generated synthetic set (``vjax.data.synthetic.SyntheticPaths``), with
    absolute video paths and ``num_objects``: how many objects the clip shows (from the set's ground truth,
    ``scenes_<split>.jsonl``), so that accuracy can be split into lone objects, where a question needs only
    perception, and several, where the answer must be bound to the object the question names."""
    from vjax.data import pipeline  # noqa: PLC0415

    with open(paths.scenes[split], encoding="utf-8") as f:
        counts = {f"videos/{split}/{sc['index']:06d}.mp4": len(sc["objects"])
                  for sc in map(json.loads, filter(str.strip, f))}
    with open(paths.annotations[split], encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    for rec in recs:
        if rec.get("video") not in counts:
            raise ValueError(f"record {rec.get('id')!r}: video {rec.get('video')!r} is not a clip of "
                             f"{paths.scenes[split]}")
        rec["num_objects"] = counts[rec["video"]]
    return pipeline.resolve_records(recs, paths.root)


# --------------------------------------------------------------------------------------------- scoring
def kind(record: dict) -> str:
    from vjax.data import formats  # noqa: PLC0415

    if record.get("choices"):
        return "multiple_choice"
    return "timestamp" if formats.is_timestamp_question(record) else "open"


# The groups over every task: all questions, and those the model can answer from its inputs (printed last)
TOTALS = ("all", "answerable")


def summarize(records: Sequence[dict], predictions: Sequence[str], tolerance: float = 0.5,
              likelihood: Sequence[int | None] | None = None, inputs: frozenset[str] | None = None
              ) -> dict[str, Any]:
    """Accuracy per task (``question_type``) and per kind (``multiple_choice``/``open``/``timestamp``),
    ``all``; per task and object count of the clip where records carry ``num_objects`` (the synthetic set);
    timestamp closeness; every prediction. Beside every figure its chance level (:func:`chance_level`).

    ``likelihood``: per record, the option chosen by likelihood (``vjax.eval.OptionScorer``; None for records
    without choices): multiple choice is then also reported that way (``multiple_choice``: per task, the
    generated letter and the likelihood choice side by side).

    ``inputs``: what the model perceives (``FormatSpec.inputs()``); where some questions need another input (beeps
    without an audio branch, subtitles without subtitles in the template: :func:`vjax.data.synthetic.answerable`),
    the group ``answerable`` holds the others, and each prediction row says whether it was answerable."""
    from vjax.data import formats  # noqa: PLC0415
    from vjax.data.synthetic import answerable  # noqa: PLC0415

    can = [inputs is None or answerable(r, inputs) for r in records]
    partial = not all(can)

    groups: dict[str, list[int]] = collections.defaultdict(list)
    cross: dict[str, dict[str, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    by_objects: dict[str, dict[str, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    mc: dict[str, list[int]] = collections.defaultdict(list)
    rows, errors, true_times, correct = [], [], [], []
    for i, (rec, pred) in enumerate(zip(records, predictions)):
        ok = formats.score_answer(pred, rec)
        correct.append(ok)
        row = {"id": rec.get("id"), "question_type": rec.get("question_type", "unknown"), "kind": kind(rec),
               "question": formats.question_answer(rec)[1], "prediction": pred, "answer": rec.get("answer"),
               "correct": ok}
        if partial:
            row["answerable"] = can[i]
        totals = TOTALS if partial and can[i] else TOTALS[:1]  # the groups over tasks this record counts in
        if row["kind"] == "timestamp":
            err = formats.timestamp_error(pred, rec)
            row["abs_error_s"] = err
            errors.append(err)
            true_times.append(formats.first_seconds(str(rec.get("answer"))))
        if likelihood is not None and likelihood[i] is not None:
            row["likelihood_choice"] = int(likelihood[i])
            row["likelihood_correct"] = int(likelihood[i]) == int(rec["answer_index"])
            for g in (row["question_type"], *totals):
                mc[g].append(i)
        rows.append(row)
        for g in (f"task/{row['question_type']}", f"kind/{row['kind']}", *totals):
            groups[g].append(i)
        cross[row["question_type"]][row["kind"]].append(i)
        if rec.get("num_objects") is not None:
            row["num_objects"] = int(rec["num_objects"])
            by_objects[row["question_type"]][str(row["num_objects"])].append(i)

    def stats(members: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
        return {k: {"accuracy": float(np.mean([correct[i] for i in v])), "n": len(v),
                    "chance": chance_level([records[i] for i in v])} for k, v in sorted(members.items())}

    report: dict[str, Any] = {"accuracy": stats(groups),
                              "task_by_kind": {t: stats(ks) for t, ks in sorted(cross.items())}}
    if by_objects:
        report["task_by_objects"] = {t: stats(ns) for t, ns in sorted(by_objects.items())}
    if mc:
        report["multiple_choice"] = {
            g: {"letter": float(np.mean([correct[i] for i in v])),
                "likelihood": float(np.mean([rows[i]["likelihood_correct"] for i in v])),
                "n": len(v), "chance": chance_level([records[i] for i in v])}
            for g, v in sorted(mc.items(), key=lambda kv: (kv[0] in TOTALS, kv[0]))}
    if errors:
        close = [e is not None and e <= tolerance for e in errors]
        named = [e for e in errors if e is not None]
        report["timestamp"] = {"n": len(errors), "tolerance_s": tolerance, "within_tolerance": float(np.mean(close)),
                               "mean_abs_error_s": float(np.mean(named)) if named else None,
                               "answers_without_time": len(errors) - len(named),
                               **_best_constant(true_times, tolerance)}
    report["predictions"] = rows
    return report


def chance_level(records: Sequence[dict]) -> float:
    """What answering without looking scores on ``records``: a multiple-choice question counts ``1 / options``
    (a random letter); the open questions of each task count as the best constant answer of that task within
    ``records`` scores (the commonest normalised answer: e.g. "one" to every count question about lone
    objects scores 1.0). 0 for no records."""
    from vjax.data import formats  # noqa: PLC0415

    if not records:
        return 0.0
    total = 0.0
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for rec in records:
        if rec.get("choices"):
            total += 1.0 / len(rec["choices"])
        else:
            answers[str(rec.get("question_type", "unknown"))][formats.normalize_answer(str(rec["answer"]))] += 1
    total += sum(max(c.values()) for c in answers.values())
    return float(total / len(records))


def _best_constant(times: Sequence[float | None], tolerance: float) -> dict[str, Any]:
    """The chance level of the closeness figure: the one time (among the true answers) that, given as the
    answer to every timestamp question, is within ``tolerance`` of the most true times."""
    known = [t for t in times if t is not None]
    if not known:
        return {"best_constant_s": None, "best_constant_within": None}
    best = max(sorted(set(known)), key=lambda c: sum(abs(t - c) <= tolerance for t in known))
    return {"best_constant_s": best,
            "best_constant_within": float(np.mean([t is not None and abs(t - best) <= tolerance for t in times]))}


def table(report: dict) -> str:
    """The printed summary: accuracy per group beside its chance level, then per task split by kind (an open
    answer and a multiple-choice letter can fail for different reasons), multiple choice by generated letter
    and by likelihood, per task split by the clip's object count where known, then timestamp closeness.
    Grid cells read ``accuracy [chance] (n)``."""
    lines = []
    if report.get("control"):
        lines.append(f"control: {report['control']} ({CONTROLS[report['control']]})")
    lines.append(f"{'group':<28} {'accuracy':>8} {'chance':>7} {'n':>5}")
    acc = report["accuracy"]
    for k in sorted(acc, key=lambda k: (k in TOTALS, not k.startswith("task/"), k)):
        lines.append(f"{k:<28} {acc[k]['accuracy']:>8.3f} {acc[k].get('chance', float('nan')):>7.3f} "
                     f"{acc[k]['n']:>5}")
    cross = report.get("task_by_kind", {})
    if len({k for ks in cross.values() for k in ks}) > 1:
        lines += _task_grid("task", cross)
    if report.get("multiple_choice"):
        lines += ["", f"{'multiple choice':<20} {'letter':>8} {'likelihood':>10} {'chance':>7} {'n':>5}"]
        for g, m in report["multiple_choice"].items():
            lines.append(f"{g:<20} {m['letter']:>8.3f} {m['likelihood']:>10.3f} {m['chance']:>7.3f} {m['n']:>5}")
    if report.get("task_by_objects"):
        lines += _task_grid("objects in the clip", report["task_by_objects"], key=int)
    ts = report.get("timestamp")
    if ts:
        mae = "n/a" if ts["mean_abs_error_s"] is None else f"{ts['mean_abs_error_s']:.2f} s"
        lines.append(f"timestamps within {ts['tolerance_s']:g} s: {ts['within_tolerance']:.3f} "
                     f"(mean abs error {mae}, {ts['answers_without_time']} answers name no time)")
        if ts.get("best_constant_s") is not None:
            lines.append(f"  chance level: answering {ts['best_constant_s']:g} s to every one scores "
                         f"{ts['best_constant_within']:.3f}")
    return "\n".join(lines)


def _task_grid(title: str, grid: dict[str, dict[str, dict]], key=str) -> list[str]:
    """A blank line, then one row per task and one column per split (``{task: {split: {accuracy, chance,
    n}}}``); a cell reads ``accuracy [chance] (n)``."""
    columns = sorted({c for cs in grid.values() for c in cs}, key=key)
    lines = ["", f"{title:<20}" + "".join(f" {c:>20}" for c in columns)]
    for t, cs in grid.items():
        cells = [f"{cs[c]['accuracy']:.3f} [{cs[c].get('chance', float('nan')):.2f}] ({cs[c]['n']:>3})"
                 if c in cs else "-" for c in columns]
        lines.append(f"{t:<20}" + "".join(f" {c:>20}" for c in cells))
    return lines


# --------------------------------------------------------------------------------------------- controls
CONTROLS = {"blind": "every clip replaced by a constant grey clip of its shape, silent, without subtitles",
            "shuffled": "videos permuted across questions, no question keeps its clip"}
GREY = 128  # the blind clip's pixel value (uint8, before the model's normalisation)


class BlindFormat:
    """A format function that sees a constant grey clip of the decoded clip's shape instead of the clip, with a
    silent audio track and no subtitles (the ``--blind`` control): whatever it answers right comes from the
    text alone."""

    def __init__(self, inner):
        self.inner = inner
        self.prepare_audio = getattr(inner, "prepare_audio", None)

    def __call__(self, record: dict, frames: np.ndarray, audio: Any) -> dict:
        rec = {k: v for k, v in record.items() if k != "subtitles"}
        return self.inner(rec, np.full_like(np.asarray(frames), GREY), None)


class _Seen:
    """Wraps a format function and keeps the last record it formatted (with the frame times the loader added), so
    that the options of a multiple-choice question are rendered from exactly what its prompt was."""

    def __init__(self, inner):
        self.inner, self.record = inner, None
        self.prepare_audio = getattr(inner, "prepare_audio", None)

    def __call__(self, record: dict, frames: np.ndarray, audio: Any) -> dict:
        self.record = record
        return self.inner(record, frames, audio)


def shuffle_videos(records: Sequence[dict], seed: int = 0) -> list[dict]:
    """Copies of ``records`` whose videos (with their subtitles) are permuted so that no question keeps its own
    clip (the ``--shuffled`` control): the distinct videos are put in a seeded random order and each is given
    the next one's place. Needs at least two distinct videos."""
    videos = list(dict.fromkeys(str(r.get("video")) for r in records))
    if len(videos) < 2:
        raise ValueError(f"--shuffled needs at least two distinct videos, the records have {len(videos)}")
    order = [videos[i] for i in np.random.default_rng(seed).permutation(len(videos))]
    nxt = {v: order[(i + 1) % len(order)] for i, v in enumerate(order)}
    subs = {}
    for r in records:
        subs.setdefault(str(r.get("video")), r.get("subtitles"))
    out = []
    for r in records:
        new = dict(r, video=nxt[str(r.get("video"))])
        if subs.get(new["video"]) is not None:
            new["subtitles"] = subs[new["video"]]
        else:
            new.pop("subtitles", None)
        out.append(new)
    return out


# --------------------------------------------------------------------------------------------- running
class SizedFormat:
    """The prompt format of a native-resolution run: the model sized to each clip's processed frames
    (``Run.sized``), so the visual placeholders match the clip's grid."""

    def __init__(self, run: Run):
        self.run = run
        self._formats: dict = {}

    def __call__(self, record: dict, frames: np.ndarray, audio: Any) -> dict:
        from vjax.data import formats  # noqa: PLC0415

        key = (frames.shape[0], frames.shape[1:3])
        if key not in self._formats:
            self._formats[key] = formats.VideoQAFormat(self.run.sized(*key)[1], self.run.tokenizer, prompt_only=True)
        return self._formats[key](record, frames, audio)


def evaluate(run: Run, records: Sequence[dict], *, batch_size: int, max_new_tokens: int,
             tolerance: float = 0.5, progress: bool = False, max_bad_fraction: float = 0.1,
             likelihood: bool = True, control: str | None = None) -> dict[str, Any]:
    """Generate and score ``records``; ``batch_size * 4`` records are decoded at a time (memory stays flat).
    ``likelihood``: multiple choice also scored by the likelihood of each option (``vjax.eval.OptionScorer``).
    ``control``: ``"blind"`` (:class:`BlindFormat`) or ``"shuffled"`` (:func:`shuffle_videos`); each record is
    still reported with its own question, answer and object count.

    Raises :class:`~vjax.data.validate.TooManyBadRecords` when no record could be evaluated or more than
    ``max_bad_fraction`` of them have unreadable videos (checked as records are read once 20 were seen,
    and at the end whatever their number)."""
    from vjax.data import formats  # noqa: PLC0415
    from vjax.data.pipeline import DropSkipped, LoadAndFormat  # noqa: PLC0415
    from vjax.data.validate import TooManyBadRecords  # noqa: PLC0415

    if control is not None and control not in CONTROLS:
        raise ValueError(f"control must be one of {sorted(CONTROLS)}, got {control!r}")
    c = run.config
    fmt = SizedFormat(run) if run.frames.per_video else formats.VideoQAFormat(run.spec, run.tokenizer, prompt_only=True)
    seen = fmt = _Seen(fmt)
    if control == "blind":
        fmt = BlindFormat(fmt)
    sources = shuffle_videos(records) if control == "shuffled" else records  # what is decoded for each record
    scorers: dict[int, vjax_eval.OptionScorer] = {}
    load = LoadAndFormat(fmt, run.sampler, run.frames, c.data.load_audio, max_bad_fraction=max_bad_fraction)
    keep = DropSkipped()
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(records), desc="eval", unit="q", file=sys.stderr)
    kept, predictions, chosen, skipped = [], [], [], 0
    t0 = time.perf_counter()
    chunk = batch_size * 4
    for s in range(0, len(records), chunk):
        recs, prompts, formatted = [], [], []
        for i, rec in enumerate(records[s: s + chunk], start=s):
            seen.record = None
            p = load.random_map(sources[i], np.random.default_rng(i))
            if keep.filter(p):
                recs.append(rec)
                prompts.append(p)
                formatted.append(seen.record)
            else:
                skipped += 1
                if bar is not None:
                    bar.update(1)
        if not prompts:
            continue
        # Native-resolution frames (a converted Qwen2-VL): one batch per frame geometry, each with its model.
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(prompts):
            groups[p["frames"].shape if run.frames.per_video else ()].append(i)
        answers: dict[int, str] = {}
        picks: dict[int, int] = {}
        for shape, members in groups.items():
            module, spec = run.sized(shape[0], shape[1:3]) if shape else (run.module, run.spec)
            group = [prompts[i] for i in members]
            length = -(-max(len(p["input_ids"]) for p in group) // 64) * 64  # few compiled shapes
            out = vjax_eval.answer_prompts(module, run.params, group, run.tokenizer, spec, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens, length=length,
                                           progress=bar.update if bar is not None else None)
            answers.update(zip(members, out))
            mc = [i for i in members if recs[i].get("choices")]
            if likelihood and mc:
                if id(module) not in scorers:
                    scorers[id(module)] = vjax_eval.OptionScorer(module, spec, run.tokenizer, batch_size=batch_size)
                picks.update(zip(mc, scorers[id(module)].choose(run.params, [formatted[i] for i in mc],
                                                                [prompts[i] for i in mc])))
        predictions += [answers[i] for i in range(len(prompts))]
        chosen += [picks.get(i) for i in range(len(prompts))]
        kept += recs
    if bar is not None:
        bar.close()
    if not kept:
        raise TooManyBadRecords(f"nothing was evaluated: {load.skips.summary()}")
    load.skips.check()
    report = summarize(kept, predictions, tolerance, chosen if likelihood else None, inputs=run.spec.inputs())
    report.update(num_records=len(records), evaluated=len(kept), skipped_unreadable=skipped,
                  seconds=round(time.perf_counter() - t0, 2), control=control)
    return report


def write_report(run: Run, report: dict, data: str, data_name: str, out: str | None = None, *,
                 at_step: bool = False) -> Path:
    """Writes ``report`` (with the run's name, step, data and quantisation) as JSON to ``out``, by default
    ``<workdir>/eval/<data_name>[_step<N>][_int8][_blind|_shuffled].json`` (``_step<N>`` with ``at_step``: a
    checkpoint chosen by ``--step``, so a learning curve's reports stand beside the final one); returns the path."""
    report = {"workdir": run.workdir, "model": run.name, "step": run.step, "data": data,
              "quantize": run.quantize or None, **report}
    # an earlier step's report, an int8 one, or a control's, beside the plain one
    suffix = ((f"_step{run.step}" if at_step else "") + (f"_{run.quantize}" if run.quantize else "")
              + (f"_{report['control']}" if report.get("control") else ""))
    path = Path(out) if out else Path(run.workdir) / "eval" / f"{data_name}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def score_test_split(run: Run, limit: int = -1, *, progress: bool = False) -> dict | None:
    """The synthetic set's test split (its first ``limit`` questions; -1: all) answered by the trained run and
    scored as ``experiments.eval`` scores it: generated answers, multiple choice by letter and by likelihood, per
    type, per answer kind and per object count, each beside its chance level. Prints the table, writes
    ``<workdir>/eval/synthetic_test.json`` and returns the report (None when the set has no test split).
    ``experiments.train`` calls it at the end of a synthetic run (``eval.test_records``)."""
    records = synthetic_records(synthetic_paths(run.config), "test")
    if limit > 0:
        records = records[:limit]
    if not records:
        print("no test split to score (data.synthetic.num_test=0)", flush=True)
        return None
    c = run.config
    print(f"\ntest split: {len(records)} questions", flush=True)
    report = evaluate(run, records, batch_size=c.eval.batch_size, max_new_tokens=c.eval.max_new_tokens,
                        progress=progress)
    out = write_report(run, report, "synthetic_test", "synthetic_test")
    print(table(report))
    print(f"{report['evaluated']} test questions in {report['seconds']:.0f} s; report {out}", flush=True)
    return report


def main(argv: list[str]) -> int:
    cli.start_checkpoint_command(argv, "workdir")
    if not 0.0 <= FLAGS.max_bad_fraction <= 1.0:
        cli.fail(f"--max_bad_fraction must be in [0, 1], got {FLAGS.max_bad_fraction}")
    if FLAGS.blind and FLAGS.shuffled:
        cli.fail("--blind and --shuffled are two different controls: pass one of them")
    control = "blind" if FLAGS.blind else "shuffled" if FLAGS.shuffled else None
    from vjax.data.validate import TooManyBadRecords  # noqa: PLC0415

    try:
        run = config.load_run_from_flags()
    except (NotACheckpoint, config.ConfigError) as err:
        cli.fail(str(err))
    try:
        if FLAGS.data:
            if not os.path.isfile(FLAGS.data):
                cli.fail(f"--data {FLAGS.data!r} does not exist")
            records, data_name = load_records(FLAGS.data, FLAGS.format, FLAGS.video_root, FLAGS.video_ext), \
                Path(FLAGS.data).stem
        else:
            records, data_name = synthetic_split(run)
    except (ValueError, TooManyBadRecords, KeyError) as err:
        cli.fail(f"{FLAGS.data or 'synthetic set'}: {err}")
    if FLAGS.limit:
        records = records[: FLAGS.limit]
    if not records:
        cli.fail(f"no records to evaluate in {FLAGS.data or data_name}")
    if control == "shuffled" and len({r.get("video") for r in records}) < 2:
        cli.fail(f"--shuffled needs at least two distinct videos; {FLAGS.data or data_name} has one")
    c = run.config
    batch = FLAGS.batch_size or c.eval.batch_size
    new = FLAGS.max_new_tokens or c.eval.max_new_tokens
    print(f"{run.name}{'' if run.step is None else f' step {run.step}'}: {len(records)} records of {data_name}, "
          f"batch {batch}, up to {new} new tokens", flush=True)
    print(run.describe_preprocessing(), flush=True)
    if run.quantize:
        print(run.describe_weights(), flush=True)
    try:
        report = evaluate(run, records, batch_size=batch, max_new_tokens=new, tolerance=FLAGS.timestamp_tolerance,
                          progress=FLAGS.progress, max_bad_fraction=FLAGS.max_bad_fraction,
                          likelihood=FLAGS.likelihood, control=control)
    except TooManyBadRecords as err:
        cli.fail(str(err))
    out = write_report(run, report, FLAGS.data or data_name, data_name, FLAGS.out, at_step=FLAGS.step is not None)
    print(table(report))
    print(f"{report['evaluated']} evaluated, {report['skipped_unreadable']} unreadable skipped, "
          f"{report['seconds']:.1f} s; report {out}", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
