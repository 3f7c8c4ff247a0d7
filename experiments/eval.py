r"""Evaluate a checkpoint: ``python -m experiments.eval --workdir=DIR [--data=FILE]``.

    --workdir=DIR     a training run or a converted checkpoint (then --tokenizer=DIR too)
    --data=FILE       an annotation file; default: the test split of the run's synthetic set
                      (its validation split when the set has no test split)
    --format=auto     conversations (LLaVA/VideoInstruct JSON/JSONL) | mvbench (multiple choice:
                      video, question, candidates, answer) | open_qa (MSVD/MSRVTT-QA: video, question,
                      answer); auto picks by the first record's keys
    --limit=N         the first N records only (0: all)
    --out=FILE        the JSON report (default <workdir>/eval/<data name>.json; <data name>_int8.json quantised)
    --quantize=int8   int8 weights with per-channel scales (vjax.layers.quant); the report records it

Answers are generated greedily in batches with the KV cache (``vjax.generate``); prompts use the model's
template exactly as in training. Scores (:mod:`vjax.data.formats`):

* multiple choice (MVBench style): the option letter or the option text; accuracy per task
  (``question_type``);
* open-ended QA (MSVD/MSRVTT-QA style): normalised exact match (lower case, no punctuation or articles);
* timestamp questions (``question_type`` in ``formats.TIMESTAMP_TYPES``): exact match, and the fraction
  within ``--timestamp_tolerance`` seconds with the mean absolute error, next to its chance level (the
  fraction that the best single time, given as every answer, would score);
* on the synthetic set, every task also per object count of the clip: a lone object needs perception only,
  several need the answer bound to the object the question names.

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


def summarize(records: Sequence[dict], predictions: Sequence[str], tolerance: float = 0.5) -> dict[str, Any]:
    """Accuracy per task (``question_type``) and per kind (``multiple_choice``/``open``/``timestamp``),
    ``all``; per task and object count of the clip where records carry ``num_objects`` (the synthetic set);
    timestamp closeness; every prediction."""
    from vjax.data import formats  # noqa: PLC0415

    groups: dict[str, list[bool]] = collections.defaultdict(list)
    cross: dict[str, dict[str, list[bool]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    by_objects: dict[str, dict[str, list[bool]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    rows, errors, true_times = [], [], []
    for rec, pred in zip(records, predictions):
        ok = formats.score_answer(pred, rec)
        row = {"id": rec.get("id"), "question_type": rec.get("question_type", "unknown"), "kind": kind(rec),
               "question": formats.question_answer(rec)[1], "prediction": pred, "answer": rec.get("answer"),
               "correct": ok}
        if row["kind"] == "timestamp":
            err = formats.timestamp_error(pred, rec)
            row["abs_error_s"] = err
            errors.append(err)
            true_times.append(formats.first_seconds(str(rec.get("answer"))))
        rows.append(row)
        for g in (f"task/{row['question_type']}", f"kind/{row['kind']}", "all"):
            groups[g].append(ok)
        cross[row["question_type"]][row["kind"]].append(ok)
        if rec.get("num_objects") is not None:
            row["num_objects"] = int(rec["num_objects"])
            by_objects[row["question_type"]][str(row["num_objects"])].append(ok)
    def stats(outcomes: dict[str, list[bool]]) -> dict[str, dict[str, Any]]:
        return {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(outcomes.items())}

    report: dict[str, Any] = {"accuracy": stats(groups),
                              "task_by_kind": {t: stats(ks) for t, ks in sorted(cross.items())}}
    if by_objects:
        report["task_by_objects"] = {t: stats(ns) for t, ns in sorted(by_objects.items())}
    if errors:
        close = [e is not None and e <= tolerance for e in errors]
        named = [e for e in errors if e is not None]
        report["timestamp"] = {"n": len(errors), "tolerance_s": tolerance, "within_tolerance": float(np.mean(close)),
                               "mean_abs_error_s": float(np.mean(named)) if named else None,
                               "answers_without_time": len(errors) - len(named),
                               **_best_constant(true_times, tolerance)}
    report["predictions"] = rows
    return report


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
    """The printed summary: accuracy per group, then per task split by kind (an open answer and a
    multiple-choice letter can fail for different reasons), per task split by the clip's object count
    where known, then timestamp closeness."""
    lines = [f"{'group':<28} {'accuracy':>8} {'n':>5}"]
    acc = report["accuracy"]
    for k in sorted(acc, key=lambda k: (k == "all", not k.startswith("task/"), k)):
        lines.append(f"{k:<28} {acc[k]['accuracy']:>8.3f} {acc[k]['n']:>5}")
    cross = report.get("task_by_kind", {})
    if len({k for ks in cross.values() for k in ks}) > 1:
        lines += _task_grid("task (accuracy, n)", cross)
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
    """A blank line, then one row per task and one column per split (``{task: {split: {accuracy, n}}}``)."""
    columns = sorted({c for cs in grid.values() for c in cs}, key=key)
    lines = ["", f"{title:<20}" + "".join(f" {c:>17}" for c in columns)]
    for t, cs in grid.items():
        cells = [f"{cs[c]['accuracy']:.3f} ({cs[c]['n']:>3})" if c in cs else "-" for c in columns]
        lines.append(f"{t:<20}" + "".join(f" {c:>17}" for c in cells))
    return lines


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
             tolerance: float = 0.5, progress: bool = False, max_bad_fraction: float = 0.1) -> dict[str, Any]:
    """Generate and score ``records``; ``batch_size * 4`` records are decoded at a time (memory stays flat).

    Raises :class:`~vjax.data.validate.TooManyBadRecords` when no record could be evaluated or more than
    ``max_bad_fraction`` of them have unreadable videos (checked as records are read once 20 were seen,
    and at the end whatever their number)."""
    from vjax.data import formats  # noqa: PLC0415
    from vjax.data.pipeline import DropSkipped, LoadAndFormat  # noqa: PLC0415
    from vjax.data.validate import TooManyBadRecords  # noqa: PLC0415

    c = run.config
    fmt = SizedFormat(run) if run.frames.per_video else formats.VideoQAFormat(run.spec, run.tokenizer, prompt_only=True)
    load = LoadAndFormat(fmt, run.sampler, run.frames, c.data.load_audio, max_bad_fraction=max_bad_fraction)
    keep = DropSkipped()
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(records), desc="eval", unit="q", file=sys.stderr)
    kept, predictions, skipped = [], [], 0
    t0 = time.perf_counter()
    chunk = batch_size * 4
    for s in range(0, len(records), chunk):
        recs, prompts = [], []
        for i, rec in enumerate(records[s: s + chunk], start=s):
            p = load.random_map(rec, np.random.default_rng(i))
            if keep.filter(p):
                recs.append(rec)
                prompts.append(p)
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
        for shape, members in groups.items():
            module, spec = run.sized(shape[0], shape[1:3]) if shape else (run.module, run.spec)
            group = [prompts[i] for i in members]
            length = -(-max(len(p["input_ids"]) for p in group) // 64) * 64  # few compiled shapes
            out = vjax_eval.answer_prompts(module, run.params, group, run.tokenizer, spec, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens, length=length,
                                           progress=bar.update if bar is not None else None)
            answers.update(zip(members, out))
        predictions += [answers[i] for i in range(len(prompts))]
        kept += recs
    if bar is not None:
        bar.close()
    if not kept:
        raise TooManyBadRecords(f"nothing was evaluated: {load.skips.summary()}")
    load.skips.check()
    report = summarize(kept, predictions, tolerance)
    report.update(num_records=len(records), evaluated=len(kept), skipped_unreadable=skipped,
                  seconds=round(time.perf_counter() - t0, 2))
    return report


def main(argv: list[str]) -> int:
    cli.start_checkpoint_command(argv, "workdir")
    if not 0.0 <= FLAGS.max_bad_fraction <= 1.0:
        cli.fail(f"--max_bad_fraction must be in [0, 1], got {FLAGS.max_bad_fraction}")
    from vjax.data.validate import TooManyBadRecords  # noqa: PLC0415

    try:
        run = config.load_run(FLAGS.workdir, tokenizer=FLAGS.tokenizer, config=FLAGS.config, quantize=FLAGS.quantize)
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
                          progress=FLAGS.progress, max_bad_fraction=FLAGS.max_bad_fraction)
    except TooManyBadRecords as err:
        cli.fail(str(err))
    report = {"workdir": run.workdir, "model": run.name, "step": run.step, "data": FLAGS.data or data_name,
              "quantize": run.quantize or None, **report}
    suffix = f"_{run.quantize}" if run.quantize else ""  # an int8 report beside the float one
    out = Path(FLAGS.out) if FLAGS.out else Path(run.workdir) / "eval" / f"{data_name}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"{report['evaluated']} evaluated, {report['skipped_unreadable']} unreadable skipped, "
          f"{report['seconds']:.1f} s; report {out}", flush=True)
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
