"""The training loop: resume after SIGKILL is bitwise identical; NaN stops with the last good
checkpoint kept; metrics, TensorBoard events and the curves PNG are written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
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


def test_nan_stops_with_a_clear_message_and_keeps_last_good_checkpoint(tmp_path):
    import jax.numpy as jnp

    from tests.train.common import build
    from tests.train.loop_worker import data_iterator
    from vjax.train.loop import LoopConfig, NonFiniteLossError, run
    from vjax.train.sharding import make_mesh

    trainer = build("decoder", make_mesh((1, 1, 1)))
    orig = trainer._train_step
    calls = []

    def poisoned(state, batch):  # step 5 sees an infinite input embedding -> NaN loss
        calls.append(1)
        if len(calls) == 5:
            state = state.replace(params={**state.params, "embed_tokens": {"embedding": state.params["embed_tokens"]["embedding"] * jnp.inf}})
        return orig(state, batch)

    trainer._train_step = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step 5.*Last good checkpoint: step 4"):
        run(trainer, data_iterator(), tmp_path, LoopConfig(total_steps=10, save_every=2, log_every=1, progress=False))
    from vjax.train.checkpoint import Checkpoints

    ck = Checkpoints(tmp_path / "checkpoints")
    assert ck.latest_step() == 4
    restored = ck.restore(trainer.abstract_state, trainer.state_shardings)
    assert np.isfinite(np.asarray(restored.params["embed_tokens"]["embedding"])).all()
    ck.close()
