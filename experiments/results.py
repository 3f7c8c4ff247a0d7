r"""The README's results table from training runs: ``python -m experiments.results WORKDIR ... [--readme=F]``.

    python -m experiments.results workdirs/*_tiny                  # print the Markdown table
    python -m experiments.results workdirs/*_tiny --readme=README.md   # and write it into README.md

Each WORKDIR is one ``python -m experiments.train`` run on the synthetic set: its ``eval/synthetic_test.json`` (the
test split scored at the end of training, or by ``python -m experiments.eval``) and its ``run_summary.json`` (steps,
wall time, load average; written by ``experiments.train``). One row per run: the steps of stage 1 + stage 2, the
command's wall time, visual tokens per clip, all questions, those the model can answer from its inputs (no beeps
without audio, no subtitle facts without subtitles), the open questions a model answers from what it sees
(colour, shape, count), motion, multiple choice by letter and by likelihood, and the model's own skill from the
training issue (``OWN_SKILL``); every figure with its chance level in brackets.

``--curve=WORKDIR`` prints one run's learning curve instead: a row per test report of its checkpoints (``python -m
experiments.eval --workdir=WORKDIR --step=N``, with ``--blind`` / ``--shuffled`` rows for the controls), with the
mean training loss since the previous row and the validation loss logged at its step.

``--readme`` replaces what lies between the lines ``<!-- results:begin -->`` and ``<!-- results:end -->`` of that
file (a missing marker is an error naming it). A workdir without a test report is one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
REPORT = os.path.join("eval", "synthetic_test.json")
SUMMARY = "run_summary.json"  # written into the workdir by experiments.train (write_summary)


def _fig(d: dict | None) -> str:
    if not d or d.get("n", 1) == 0 or d.get("accuracy") is None:
        return "-"
    chance = d.get("chance")
    return f"{d['accuracy']:.3f}" + (f" [{chance:.2f}]" if chance is not None else "")


def _task(report: dict, task: str) -> dict | None:
    return report["accuracy"].get(f"task/{task}")


def _open(report: dict, task: str) -> dict | None:
    return report.get("task_by_kind", {}).get(task, {}).get("open")


def _timestamps(report: dict) -> str:
    t = report.get("timestamp") or {}
    if not t.get("n"):
        return "-"
    return f"appear time within 0.5 s {t['within_tolerance']:.3f} [{t['best_constant_within']:.2f}]"


# The skill each model's paper adds (the training issue's per-model targets), as one cell.
OWN_SKILL: dict[str, Callable[[dict], str]] = {
    "video_llama": lambda r: f"beep count {_fig(_task(r, 'beep_count'))}",
    "minigpt4_video": lambda r: f"subtitle {_fig(_task(r, 'subtitle'))}",
    "cogvlm2_video": _timestamps,
    "qwen2_vl": _timestamps,
    "ma_lmm": lambda r: f"recall of the start {_fig(_task(r, 'recall'))}",
}


def _multiple_choice(report: dict, key: str) -> str:
    """``key`` (``letter`` / ``likelihood``) over the question types that have it, weighted by their questions (the
    report's own ``all`` and ``answerable`` groups left out: they are such averages already)."""
    rows = [v for k, v in report.get("multiple_choice", {}).items()
            if k not in ("all", "answerable") and v.get("n") and v.get(key) is not None]
    n = sum(v["n"] for v in rows)
    if not n:
        return "-"
    acc = sum(v[key] * v["n"] for v in rows) / n
    chance = sum(v["chance"] * v["n"] for v in rows) / n
    return f"{acc:.3f} [{chance:.2f}]"


def load(workdir: str) -> dict[str, Any]:
    """``{"report": ..., "summary": ..., "train_questions": ...}`` of a training workdir (summary ``{}`` when it has
    none; ``train_questions`` from its ``config.json``, None without one);
    FileNotFoundError naming the report."""
    path = os.path.join(workdir, REPORT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir}: no test report {REPORT} (train with eval.test_records != 0, or run "
                                f"python -m experiments.eval --workdir={workdir})")
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    summary = {}
    spath = os.path.join(workdir, SUMMARY)
    if os.path.isfile(spath):
        with open(spath, encoding="utf-8") as f:
            summary = json.load(f)
    questions = None  # which training questions (data.train_questions); runs from before the key trained on all
    cpath = os.path.join(workdir, "config.json")
    if os.path.isfile(cpath):
        with open(cpath, encoding="utf-8") as f:
            questions = json.load(f).get("experiment", {}).get("data", {}).get("train_questions", "all")
    return {"report": report, "summary": summary, "train_questions": questions}


FIGURES = ("all", "answerable", "colour (open)", "shape (open)", "count (open)", "motion", "MC by letter",
           "MC by likelihood", "own skill")
COLUMNS = ("model (tiny)", "steps (stage 1 + 2)", "wall", "visual tokens") + FIGURES


def figures(r: dict) -> list[str]:
    """The :data:`FIGURES` cells of one test report, each with its chance level."""
    skill = OWN_SKILL.get(r.get("model", "?"))
    acc = r["accuracy"]
    return [_fig(acc.get("all")), _fig(acc.get("answerable", acc.get("all"))), _fig(_open(r, "colour")),
            _fig(_open(r, "shape")), _fig(_open(r, "count")), _fig(_task(r, "motion")), _multiple_choice(r, "letter"),
            _multiple_choice(r, "likelihood"), skill(r) if skill else "-"]


def row(run: dict[str, Any]) -> list[str]:
    """One table row of a loaded run (:func:`load`); a run that also trained on the questions it cannot answer
    from its inputs (``data.train_questions=all``, or from before that key) says so beside its steps."""
    r, s = run["report"], run["summary"]
    if s:
        steps = f"{s['align_steps']} + {s['steps']}" if s.get("align_steps") else str(s["steps"])
        if run.get("train_questions") == "all" and "answerable" in r["accuracy"]:
            steps += " (on every question)"  # the questions it cannot perceive too
        built = s.get("stage0_seconds", 0.0) if s.get("stage0_seconds", 0.0) >= 30 else 0.0  # a build, not a read
        wall = f"{(s['command_seconds'] - built) / 60:.1f} min" + (" (resumed)" if s.get("resumed") else "")
        if built:
            wall += f" (+{built / 60:.1f} min building stage 0)"
        tokens = str(s.get("visual_tokens", "-"))
    else:
        steps, wall, tokens = str(r.get("step", "-")), "-", "-"
    return [r.get("model", "?"), steps, wall, tokens] + figures(r)


def table(runs: list[dict[str, Any]]) -> str:
    """The Markdown table of loaded runs, in the given order, with a line on when and where they were measured."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(run)) + " |" for run in runs]
    summaries = [run["summary"] for run in runs if run["summary"]]
    dates = sorted({s.get("finished", "")[:10] for s in summaries} - {""})
    loads = [max(s.get("load_average", [0])) for s in summaries]
    cores = {s.get("cores") for s in summaries} - {None}
    note = ("Generated by `python -m experiments.results` from the runs' test reports (600 questions; chance level "
            "in brackets)")
    if dates:
        note += f", trained on {', '.join(dates)}"
    if cores:
        note += (f" on {'/'.join(str(c) for c in sorted(cores))} CPU cores (load average at the end up to "
                 f"{max(loads):.1f})")
    return "\n".join(lines) + "\n\n" + note + "."


# A test report of experiments.train / experiments.eval: the final one, one of ``--step=N``, or a control's.
_CURVE_REPORT = re.compile(r"synthetic_test(?:_step(\d+))?(?:_(blind|shuffled))?\.json")


def curve(workdir: str) -> list[dict[str, Any]]:
    """A run's learning curve: its test reports (``eval/synthetic_test.json`` and the ``_step<N>`` ones that
    ``python -m experiments.eval --step=N`` wrote, with their ``_blind`` / ``_shuffled`` controls) as
    ``[{"step", "control", "report", "train_loss", "val_loss"}]`` by step, the plain report first; ``train_loss`` is
    the mean of the training losses logged in ``metrics.jsonl`` since the previous step of the curve, ``val_loss`` the
    validation loss logged at that step (each None where none was logged).
    FileNotFoundError when the run has no test report."""
    from vjax.train.metrics import read_metrics  # noqa: PLC0415

    folder = os.path.join(workdir, "eval")
    points: dict[tuple[int, str], dict] = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = _CURVE_REPORT.fullmatch(name)
        if not m:
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            report = json.load(f)
        step = int(m.group(1)) if m.group(1) else report.get("step")
        if step is None:
            continue  # a converted checkpoint's report: no step to place it at
        points.setdefault((int(step), m.group(2) or ""), report)  # the final report and its --step twin agree
    if not points:
        raise FileNotFoundError(f"{workdir}: no test report in {folder} (python -m experiments.eval "
                                f"--workdir={workdir} --step=N writes one per checkpoint)")
    logged = read_metrics(workdir)
    losses = [(r["step"], r["loss"]) for r in logged if r["split"] == "train" and "loss" in r]
    validation = {r["step"]: r["loss"] for r in logged if r["split"] == "val" and "loss" in r}
    steps = sorted({s for s, _ in points})
    out = []
    for (step, control), report in sorted(points.items()):
        previous = max((s for s in steps if s < step), default=0)
        window = [loss for s, loss in losses if previous < s <= step]
        out.append({"step": step, "control": control or None, "report": report,
                    "train_loss": sum(window) / len(window) if window else None, "val_loss": validation.get(step)})
    return out


def curve_table(points: list[dict[str, Any]]) -> str:
    """The Markdown table of :func:`curve`: step, control, training and validation loss, then the figures of the
    results table."""
    head = ("step", "control", "train loss", "val loss") + FIGURES
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        losses = ["-" if p[k] is None else f"{p[k]:.3f}" for k in ("train_loss", "val_loss")]
        lines.append("| " + " | ".join([str(p["step"]), p["control"] or "-", *losses] + figures(p["report"])) + " |")
    return "\n".join(lines)


def write_readme(path: str, text: str) -> None:
    """Replace the block between :data:`BEGIN` and :data:`END` of ``path`` by ``text``; ValueError naming a missing
    marker."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    for marker in (BEGIN, END):
        if marker not in content:
            raise ValueError(f"{path} has no line {marker!r} to place the table at")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> int:
    workdirs = argv[1:]
    if FLAGS.curve:
        if workdirs or FLAGS.readme:
            cli.fail("--curve=WORKDIR tabulates one run's learning curve: pass no other workdir and no --readme")
        try:
            print(curve_table(curve(FLAGS.curve)), flush=True)
        except (FileNotFoundError, json.JSONDecodeError) as err:
            cli.fail(str(err))
        return 0
    if not workdirs:
        cli.fail("name at least one training workdir, e.g. python -m experiments.results workdirs/chat_univi_tiny")
    try:
        runs = [load(w) for w in workdirs]
    except (FileNotFoundError, json.JSONDecodeError) as err:
        cli.fail(str(err))
    text = table(runs)
    print(text, flush=True)
    if FLAGS.readme:
        try:
            write_readme(FLAGS.readme, text)
        except (OSError, ValueError) as err:
            cli.fail(str(err))
        print(f"written into {FLAGS.readme}", flush=True)
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("readme", None, "also write the table between the results markers of this file")
    flags.DEFINE_string("curve", None, "a run's learning curve instead: its test reports by step (python -m "
                        "experiments.eval --workdir=DIR --step=N writes them)")
    cli.run(main)
