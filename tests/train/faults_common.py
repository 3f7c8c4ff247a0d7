"""What the fault tests of ``experiments.train`` share: a tiny chat_univi run, subprocess helpers, checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# decord's C++ log lines and FFmpeg's (vjax filters both out of stderr)
NATIVE_LOG = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+\.(cc|h):\d+: |^\[[\w,.-]+ @ 0x[0-9a-f]+\] ", re.M)


def tiny_args(root: Path, **overrides) -> list[str]:
    """``experiments.train`` flags of a 6-step tiny chat_univi run on a 4-clip synthetic set in ``root``,
    one text bucket (one compiled step), checkpoints every 2 steps, no evaluation, no stage 0 or 1 (random init),
    decoding in the training process (no worker to start)."""
    keys = {"data.root": root / "synthetic", "data.synthetic.num_train": 4, "data.synthetic.num_val": 2,
            "data.synthetic.num_test": 0, "data.synthetic.long_every": 0, "data.synthetic.show_progress": False,
            "data.batch_size": 2, "data.text_buckets": "(256,)", "log_every": 1, "eval.records": 0,
            "save_every": 2, "total_steps": 6, "stage0.parts": "", "align.steps": 0, "data.worker_count": 0,
            **overrides}
    return ["--config=chat_univi", *(f"--config.{k}={v}" for k, v in keys.items())]


def env_for(root: Path) -> dict:
    """The environment of every run of a module: this checkout first, the session's compilation cache
    (tests/conftest.py) for every compilation."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def command(verb: str, args: list[str], env: dict, faults: dict | None = None, timeout: int = 600):
    """``python -m experiments.<verb> ARGS`` (through ``tests.faults`` when ``faults`` are given)."""
    head = ["-m", f"experiments.{verb}"] if faults is None else \
        ["-m", "tests.faults", json.dumps(faults), f"experiments.{verb}"]
    return subprocess.run([sys.executable, *head, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith(("error:", "warning:", "stopped:"))]


def one_line(r, code: int, prefix: str = "error:") -> str:
    """Assert exit ``code`` and exactly one ``prefix`` line on stderr; return it."""
    assert r.returncode == code, f"exit {r.returncode}\n" + r.stdout[-2000:] + r.stderr[-3000:]
    lines = [ln for ln in error_lines(r) if ln.startswith(prefix)]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def params_of(workdir: Path):
    """``(step, flat params)`` of the newest checkpoint of a training workdir that restores."""
    from experiments import config  # noqa: PLC0415

    run = config.load_run(workdir)
    return run.step, [np.asarray(x) for x in jax.tree_util.tree_leaves(run.params)]


def assert_bitwise_equal(a, b) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"leaf {i}")


def steps(workdir: Path) -> list[int]:
    """The checkpoint steps a later run would see (what Orbax lists: committed steps only)."""
    from vjax.train.checkpoint import Checkpoints  # noqa: PLC0415

    ck = Checkpoints(workdir / "checkpoints")
    try:
        return sorted(ck.all_steps())
    finally:
        ck.close()


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
