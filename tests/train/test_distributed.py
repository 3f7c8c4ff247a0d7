"""Two processes on this machine (jax.distributed over localhost, CPU devices, gloo collectives)
train 3 steps and agree with the single-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.train.distributed_worker"]
    subprocess.run(cmd + ["0", "1", "0", str(tmp_path / "one.npz")], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    port = _free_port()
    procs = [subprocess.Popen(cmd + [str(i), "2", str(port), str(tmp_path / "two.npz")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_allclose(one["losses"], two["losses"], atol=1e-5)
    for k in one.files:
        np.testing.assert_allclose(one[k], two[k], atol=1e-5, err_msg=k)
