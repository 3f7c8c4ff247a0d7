"""The training loop: resume after SIGKILL is bitwise identical; NaN steps are skipped and counted, and a
streak of them stops with the last good checkpoint kept; metrics, TensorBoard events and the curves PNG are
written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# the session's compilation cache (tests/conftest.py) keeps every compile, however short: the three runs share them
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
STEPS, SAVE_EVERY = 12, 2


def _cmd(workdir, delay=0.0):
    return [sys.executable, "-m", "tests.train.loop_worker", str(workdir), str(STEPS), str(SAVE_EVERY), str(delay)]


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(run, delay=0.3), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_at = random.Random().randint(3, STEPS - 2)  # a random step after the first checkpoint
    deadline = time.time() + 300
    while time.time() < deadline:
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
        if recs and recs[-1]["step"] >= kill_at:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final_params.npz").exists(), "the run finished before it could be killed"
    subprocess.run(_cmd(run), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    a, b = np.load(ref / "final_params.npz"), np.load(run / "final_params.npz")
    assert a.files == b.files
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"leaf {k} (killed at step ~{kill_at})")
    assert (run / "curves.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def _float_mask_batches(nan_steps):
    """The worker's token batches with a float loss mask, NaN at the given (1-based) steps: a NaN loss."""
    from tests.train.loop_worker import data_iterator

    for i, b in enumerate(data_iterator(), start=1):
        mask = np.asarray(b["loss_mask"], np.float32)
        yield {**b, "loss_mask": mask * np.nan if i in nan_steps else mask}


def test_nan_steps_are_skipped_and_counted_and_a_streak_stops_with_the_last_good_checkpoint(tmp_path):
    from tests.train.common import build
    from vjax.train.checkpoint import Checkpoints
    from vjax.train.loop import LoopConfig, NonFiniteLossError, run
    from vjax.train.metrics import read_metrics
    from vjax.train.sharding import make_mesh

    trainer = build("decoder", make_mesh((1, 1, 1)))
    cfg = dict(log_every=1, progress=False, max_nonfinite_in_a_row=2)
    # isolated NaN batches: the update is skipped and counted, training goes on to the end
    state = run(trainer, _float_mask_batches({3, 6}), tmp_path / "a", LoopConfig(total_steps=8, save_every=4, **cfg))
    rows = read_metrics(tmp_path / "a")
    assert [r["skipped_nonfinite"] for r in rows] == [0, 0, 1, 0, 0, 1, 0, 0]
    assert [r["finite"] for r in rows] == [1, 1, 0, 1, 1, 0, 1, 1]
    # the host's wait for each batch is recorded beside the step rate (a share of the wall time between logs)
    assert all(r["data_wait_seconds"] >= 0 and 0 <= r["data_wait_fraction"] <= 1 for r in rows)
    assert int(state.step) == 6  # 8 batches, 6 updates applied
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))

    # max_nonfinite_in_a_row of them in a row: stop, naming the last good checkpoint, which holds good values
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite steps in a row \(steps 5-6.*Last good checkpoint: "
                                                 r"step 4"):
        run(trainer, _float_mask_batches({5, 6, 7}), tmp_path / "b", LoopConfig(total_steps=10, save_every=2, **cfg))
    ck = Checkpoints(tmp_path / "b" / "checkpoints")
    assert ck.latest_step() == 4
    restored = ck.restore(trainer.abstract_state, trainer.state_shardings)
    assert int(restored.step) == 4 and all(np.isfinite(np.asarray(x)).all()
                                           for x in jax.tree_util.tree_leaves(restored.params))
    ck.close()
