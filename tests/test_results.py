"""``experiments.results``: the README's results table from training workdirs (test report + run summary)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import results

ROOT = Path(__file__).resolve().parents[1]


def _workdir(tmp_path: Path, name: str, model: str, summary: bool = True) -> Path:
    """A workdir as ``experiments.train`` leaves it: the test report (the keys ``experiments.eval`` writes) and the
    run summary, with figures chosen here."""
    d = tmp_path / name
    (d / "eval").mkdir(parents=True)
    report = {
        "model": model, "step": 9000,
        "accuracy": {"all": {"accuracy": 0.4125, "n": 600, "chance": 0.306},
                     "task/motion": {"accuracy": 0.135, "n": 89, "chance": 0.239},
                     "task/beep_count": {"accuracy": 0.5, "n": 68, "chance": 0.32}},
        "task_by_kind": {"colour": {"open": {"accuracy": 0.65, "n": 40, "chance": 0.25}},
                         "shape": {"open": {"accuracy": 0.891, "n": 46, "chance": 0.41}},
                         "count": {"open": {"accuracy": 0.972, "n": 36, "chance": 0.47}}},
        # 10 questions at 0.2 by letter and 30 at 0.6: 0.5 overall by likelihood; chance (10 * .5 + 30 * .25) / 40
        "multiple_choice": {"colour": {"letter": 0.2, "likelihood": 0.2, "n": 10, "chance": 0.5},
                            "count": {"letter": 0.4, "likelihood": 0.6, "n": 30, "chance": 0.25}},
        "timestamp": {"n": 18, "within_tolerance": 0.5, "best_constant_within": 0.389},
    }
    (d / "eval" / "synthetic_test.json").write_text(json.dumps(report))
    if summary:
        (d / "run_summary.json").write_text(json.dumps({
            "model": model, "variant": "tiny", "steps": 9000, "align_steps": 1200, "command_seconds": 936.0,
            "resumed": False, "visual_tokens": 16, "load_average": [2.1, 2.0, 1.9], "cores": 2,
            "finished": "2026-12-04 19:07:00"}))
    return d


def test_row_and_table_state_each_figure_beside_its_chance(tmp_path):
    runs = [results.load(str(_workdir(tmp_path, "a", "chat_univi"))),
            results.load(str(_workdir(tmp_path, "b", "qwen2_vl", summary=False)))]
    a = results.row(runs[0])
    assert a[:6] == ["chat_univi", "1200 + 9000", "15.6 min", "16", "0.412 [0.31]", "0.412 [0.31]"]  # every one
    assert a[6:10] == ["0.650 [0.25]", "0.891 [0.41]", "0.972 [0.47]", "0.135 [0.24]"]
    assert a[10:] == ["0.350 [0.31]", "0.500 [0.31]", "-"]  # weighted by each type's questions
    # a model without audio: the questions it can answer from its inputs, beside all; multiple choice by type only
    runs[0]["report"]["accuracy"]["answerable"] = {"accuracy": 0.48, "n": 425, "chance": 0.3}
    runs[0]["report"]["multiple_choice"]["answerable"] = {"letter": 0.9, "likelihood": 0.9, "n": 5, "chance": 0.1}
    assert results.row(runs[0])[4:6] == ["0.412 [0.31]", "0.480 [0.30]"]
    assert results.row(runs[0])[10:12] == ["0.350 [0.31]", "0.500 [0.31]"]
    # its config.json says which questions it trained on: from before data.train_questions, every one
    assert runs[0]["train_questions"] is None and results.row(runs[0])[1] == "1200 + 9000"  # no config.json
    for experiment, want in [({"data": {}}, "1200 + 9000 (on every question)"),
                             ({"data": {"train_questions": "all"}}, "1200 + 9000 (on every question)"),
                             ({"data": {"train_questions": "answerable"}}, "1200 + 9000")]:
        (tmp_path / "a" / "config.json").write_text(json.dumps({"model": "chat_univi", "experiment": experiment}))
        again = results.load(str(tmp_path / "a"))
        again["report"]["accuracy"]["answerable"] = runs[0]["report"]["accuracy"]["answerable"]
        assert results.row(again)[1] == want
    b = results.row(runs[1])
    assert b[1:4] == ["9000", "-", "-"]  # no summary: the report's step, no wall time
    assert b[-1] == "appear time within 0.5 s 0.500 [0.39]"
    del runs[1]["report"]["multiple_choice"]["colour"]["likelihood"]  # eval --nolikelihood leaves it out
    assert results.row(runs[1])[11] == "0.600 [0.25]"
    text = results.table(runs)
    lines = text.splitlines()
    assert lines[0].count("|") == len(results.COLUMNS) + 1 and len(lines[1].split("|")) == len(results.COLUMNS) + 2
    assert "trained on 2026-12-04 on 2 CPU cores (load average at the end up to 2.1)" in text
    # a command that built its stage-0 parts: the wall without the build, the build beside it; a cache read (~0 s) is
    # part of the run
    runs[0]["summary"]["stage0_seconds"] = 240.0
    assert results.row(runs[0])[2] == "11.6 min (+4.0 min building stage 0)"
    runs[0]["summary"]["stage0_seconds"] = 1.5
    assert results.row(runs[0])[2] == "15.6 min"


def test_readme_block_is_replaced_between_the_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{results.BEGIN}\nold table\n{results.END}\nafter\n")
    results.write_readme(str(readme), "| new |")
    assert readme.read_text() == f"# x\nbefore\n{results.BEGIN}\n| new |\n{results.END}\nafter\n"
    results.write_readme(str(readme), "| newer |")  # idempotent: the markers stay
    assert "| new |" not in readme.read_text() and readme.read_text().count(results.BEGIN) == 1
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        results.write_readme(str(tmp_path / "plain.md"), "| t |")


def test_command_writes_the_readme_and_names_a_workdir_without_a_report(tmp_path):
    d = _workdir(tmp_path, "a", "video_llama")
    readme = tmp_path / "README.md"
    readme.write_text(f"{results.BEGIN}\n{results.END}\n")
    r = subprocess.run([sys.executable, "-m", "experiments.results", str(d), f"--readme={readme}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| video_llama | 1200 + 9000 |" in readme.read_text() and "beep count 0.500 [0.32]" in r.stdout
    r = subprocess.run([sys.executable, "-m", "experiments.results", str(tmp_path / "none")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no test report" in r.stderr


def test_the_readme_has_one_results_block_with_the_generated_header():
    text = (ROOT / "README.md").read_text()
    assert text.count(results.BEGIN) == 1 and text.count(results.END) == 1
    block = text.split(results.BEGIN, 1)[1].split(results.END, 1)[0]
    assert block.strip().startswith("| " + " | ".join(results.COLUMNS) + " |")


def test_curve_orders_a_runs_step_reports_with_their_controls_and_the_loss_since_the_previous_step(tmp_path):
    d = _workdir(tmp_path, "a", "chat_univi")  # eval/synthetic_test.json: the final report, step 9000
    final = json.loads((d / "eval" / "synthetic_test.json").read_text())

    def at(step: int, accuracy: float, suffix: str = "") -> None:
        r = json.loads(json.dumps(final))
        r["step"], r["accuracy"]["all"]["accuracy"] = step, accuracy
        (d / "eval" / f"synthetic_test{suffix}.json").write_text(json.dumps(r))

    at(1000, 0.25, "_step1000")
    at(1000, 0.2, "_step1000_blind")
    at(9000, 0.3, "_blind")  # the final checkpoint's control, written without --step
    at(5000, 0.9, "_step5000_int8")  # a quantised report is no point of the curve
    (d / "eval" / "other.json").write_text("{}")  # nor is an annotation file of another name
    # losses logged every 500 steps; a resumed run's later record of a step replaces the earlier one
    lines = [{"step": s, "split": "train", "loss": s / 1000} for s in range(500, 9001, 500)]
    lines += [{"step": 1000, "split": "train", "loss": 3.0}, {"step": 1000, "split": "val", "accuracy": 0.1},
              {"step": 9000, "split": "val", "loss": 0.75}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    points = results.curve(str(d))
    assert [(p["step"], p["control"]) for p in points] == [(1000, None), (1000, "blind"), (9000, None),
                                                           (9000, "blind")]
    assert points[0]["train_loss"] == pytest.approx((0.5 + 3.0) / 2)  # steps 500 and 1000 (resumed)
    assert points[2]["train_loss"] == pytest.approx(sum(s / 1000 for s in range(1500, 9001, 500)) / 16)
    table = results.curve_table(points).splitlines()
    assert points[0]["val_loss"] is None and points[2]["val_loss"] == 0.75  # at 1000 a val record without a loss
    assert table[0] == "| " + " | ".join(("step", "control", "train loss", "val loss") + results.FIGURES) + " |"
    assert table[2].startswith("| 1000 | - | 1.750 | - | 0.250 [0.31] |")
    assert table[3].startswith("| 1000 | blind | 1.750 | - | 0.200 [0.31] |")
    assert table[4].startswith("| 9000 | - | 5.250 | 0.750 | 0.412 [0.31] |")
    r = subprocess.run([sys.executable, "-m", "experiments.results", f"--curve={d}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[2] == table[2], r.stderr
    r = subprocess.run([sys.executable, "-m", "experiments.results", f"--curve={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no test report" in r.stderr
