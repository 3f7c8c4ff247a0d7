"""``experiments.train`` (and ``experiments.chat``) under faults of the run itself: SIGTERM and SIGINT save a
checkpoint and exit 143 / 130, and the rerun resumes bitwise-equal to an uninterrupted run; a second training
on the same workdir is refused; a truncated latest checkpoint is passed over for the newest one that restores
(named, kept, never deleted), and exit 2 when none restores. Each case is a real command in a subprocess;
``tests.faults`` delivers a real signal, or starts the second training, at an exact step. See
docs/reliability.md."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train.faults_common import (
    assert_bitwise_equal,
    command,
    env_for,
    error_lines,
    metrics,
    one_line,
    params_of,
    steps,
    tiny_args,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints 4 and 6 kept) and what every other run of the module shares."""
    d = tmp_path_factory.mktemp("train_faults")
    env, args = env_for(d), tiny_args(d)
    r = command("train", [*args, f"--workdir={d / 'reference'}"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps(d / "reference") == [4, 6]
    return d, env, args, params_of(d / "reference")


def test_signals_save_a_checkpoint_the_rerun_resumes_bitwise_equal_and_a_second_training_is_refused(reference):
    """SIGTERM after step 3 (while it runs, a second training on the same workdir is refused), SIGINT after
    step 4 of the rerun, then a last run to the end: its parameters equal the uninterrupted run's, bit for bit.
    These runs decode in a Grain worker process (the configs' default) and read batches ahead in a thread too
    (``data.prefetch=2``); the reference decodes in the training process when a batch is needed: a checkpoint taken
    with batches read ahead still resumes at the first batch not trained on."""
    d, env, (ref_step, ref_params) = reference[0], reference[1], reference[3]
    args = [*reference[2], "--config.data.worker_count=1", "--config.data.prefetch=2"]
    w = d / "signals"
    second = [sys.executable, "-m", "experiments.train", *args, f"--workdir={w}"]
    r = command("train", [*args, f"--workdir={w}"], env, faults={"after_step": {
        "2": [["run", second, str(d / "second.json")]], "3": [["signal", int(signal.SIGTERM)]]}})
    assert one_line(r, 143, "stopped:") == (f"stopped: SIGTERM received after step 3: checkpoint step 3 saved in "
                                            f"{w / 'checkpoints'}; re-run the same command to resume")
    assert steps(w) == [2, 3]  # 3 is not a save_every step: saved because of the signal
    refused = json.loads((d / "second.json").read_text())
    lines = [ln for ln in refused["stderr"].splitlines() if ln.strip()]
    assert refused["returncode"] == 2 and len(lines) == 1, refused
    assert lines[0].startswith(f"error: workdir {w} is in use by another training (pid "), lines
    assert [m["step"] for m in metrics(w)] == [1, 2, 3]  # the refused run wrote nothing

    r = command("train", [*args, f"--workdir={w}"], env, faults={"after_step": {"1": [["signal", int(signal.SIGINT)]]}})
    assert "resumed from step 3" in r.stdout
    assert one_line(r, 130, "stopped:").startswith("stopped: SIGINT received after step 4: checkpoint step 4 saved")
    assert steps(w) == [3, 4]

    r = command("train", [*args, f"--workdir={w}"], env)
    assert r.returncode == 0 and "resumed from step 4" in r.stdout, r.stderr[-3000:]
    step, params = params_of(w)
    assert step == ref_step == 6
    assert_bitwise_equal(params, ref_params)


def _truncate_arrays(step_dir: Path) -> None:
    """Cut every array file of a checkpoint step to 10 bytes (a copy cut short, a disk that lost data)."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(10)


def test_a_truncated_latest_checkpoint_is_passed_over_kept_and_named(reference):
    d, env, args, (_, ref_params) = reference
    w = d / "corrupt"
    shutil.copytree(d / "reference", w)
    shutil.copytree(w / "checkpoints" / "4", d / "step4_backup")
    _truncate_arrays(w / "checkpoints" / "6")
    video = d / "synthetic" / "videos" / "val" / "000000.mp4"
    chat = [f"--workdir={w}", f"--video={video}", "--question=What colour is the circle?", "--max_new_tokens=2"]

    # chat: the newest checkpoint that restores, one line saying which and why
    r = command("chat", chat, env)
    line = one_line(r, 0, "warning:")
    assert line.startswith(f"warning: checkpoint step 6 in {w / 'checkpoints'} does not restore (") and \
        line.endswith("; using step 4"), line
    report = ("preprocessing:", "video:")  # what chat prints about the frames once the video is read
    assert "OUT_OF_RANGE" in line and len([ln for ln in r.stderr.strip().splitlines()
                                           if not ln.startswith(report)]) == 1, r.stderr

    # none restores: chat and train exit 2 with one line naming each step; nothing is moved or deleted
    _truncate_arrays(w / "checkpoints" / "4")
    for verb, run_args in (("chat", chat), ("train", [*args, f"--workdir={w}"])):
        r = command(verb, run_args, env)
        line = one_line(r, 2)
        assert f"no checkpoint in {w / 'checkpoints'} restores (step 6: " in line and "; step 4: " in line, line
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # no asyncio 'Event loop is closed' noise
    assert steps(w) == [4, 6] and not (w / "checkpoints_unreadable").exists()

    # train resumes from step 4; step 6 is set aside (kept), and the run ends bitwise-equal to the reference
    shutil.rmtree(w / "checkpoints" / "4")
    shutil.copytree(d / "step4_backup", w / "checkpoints" / "4")
    r = command("train", [*args, f"--workdir={w}"], env)
    line = one_line(r, 0, "warning:")
    assert line.startswith("warning: checkpoint step 6 does not restore (") and \
        line.endswith(f"; moved to {w / 'checkpoints_unreadable' / '6'})"), line
    assert "resumed from step 4" in r.stdout
    assert (w / "checkpoints_unreadable" / "6" / "state").is_dir()
    step, params = params_of(w)
    assert step == 6 and steps(w) == [4, 6]
    assert_bitwise_equal(params, ref_params)
    assert not [ln for ln in error_lines(r) if ln.startswith("error:")]


def test_a_chosen_step_loads_that_checkpoint_or_fails_naming_the_saved_ones(reference, tmp_path):
    """``load_run(step=N)`` (chat / eval / serve ``--step``): that checkpoint and no other, even where a newer one
    restores or it does not; a learning curve's reports are written beside the final one."""
    from experiments import config  # noqa: PLC0415
    from experiments.eval import write_report  # noqa: PLC0415
    from vjax.pretrained import NotACheckpoint  # noqa: PLC0415

    d, _, _, (_, ref_params) = reference
    w = tmp_path / "pinned"
    shutil.copytree(d / "reference", w)
    run6 = config.load_run(w, step=6)
    assert run6.step == 6
    assert_bitwise_equal([np.asarray(x) for x in jax.tree_util.tree_leaves(run6.params)], ref_params)
    run4 = config.load_run(w, step=4)
    assert run4.step == 4
    assert any(not np.array_equal(a, b) for a, b in
               zip([np.asarray(x) for x in jax.tree_util.tree_leaves(run4.params)], ref_params))
    assert write_report(run4, {"accuracy": {}}, "synthetic_test", "synthetic_test", at_step=True) == \
        w / "eval" / "synthetic_test_step4.json"
    assert write_report(run4, {"accuracy": {}, "control": "blind"}, "synthetic_test", "synthetic_test",
                        at_step=True).name == "synthetic_test_step4_blind.json"
    with pytest.raises(NotACheckpoint, match=r"has no checkpoint of step 5; saved steps: 4, 6$"):
        config.load_run(w, step=5)
    for bad in (-1, True, "6"):
        with pytest.raises(NotACheckpoint, match="step must be a non-negative integer"):
            config.load_run(w, step=bad)
    _truncate_arrays(w / "checkpoints" / "6")  # the chosen step does not restore: no fallback to step 4
    with pytest.raises(NotACheckpoint, match=r"^checkpoint step 6 in .* does not restore \(.*OUT_OF_RANGE.*\); "
                       r"choose another step \(saved: 4\) or none for the newest that restores$"):
        config.load_run(w, step=6)
    assert steps(w) == [4, 6]  # nothing moved
