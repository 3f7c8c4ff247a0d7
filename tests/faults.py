"""Run a command with faults injected (tests only): ``python -m tests.faults '<json>' experiments.<verb> ...``.

The faults are installed in this process, then the command runs as ``python -m experiments.<verb> ...``
would (``runpy``), so every error path it takes is the production one. Keys of the JSON object:

  hide_modules: ["torch"]            those modules cannot be found, as if not installed
  nan_steps: [2, 4]                  the batch of these calls of ``Trainer.train_step`` (1-based, counted in
                                     this process) has NaN frames
  after_step: {"3": [action, ...]}   after that call of ``Trainer.train_step`` returns ...
  before_save: {"4": [action, ...]}  ... or when the checkpoint of that step is about to be saved, once the
                                     previous save is complete (so that the fault hits this save only):
      ["signal", 15]                 send this signal to this process (``os.kill``: a real signal)
      ["delete", path]               delete a file (e.g. a video the run reads)
      ["fsize_limit", bytes]         RLIMIT_FSIZE for this process: the kernel fails every write past that
                                     size with EFBIG, in C++ (tensorstore) as in Python — as a full disk would
      ["read_only", dir]             creating, renaming or opening for writing anything under ``dir`` fails
                                     with EROFS (root ignores file permissions, so a chmod cannot do this)
      ["run", argv, out]             run another command to its end meanwhile (e.g. a second training on the
                                     same workdir); its exit code and stderr go to the JSON file ``out``
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import resource
import runpy
import signal
import sys


class _Hidden:
    """Wraps a ``sys.meta_path`` finder: the hidden top-level packages are not found by it."""

    def __init__(self, finder, hidden: set[str]):
        self.finder, self.hidden = finder, hidden

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


def hide_modules(names) -> None:
    hidden = set(names)
    sys.meta_path[:] = [_Hidden(f, hidden) for f in sys.meta_path]
    for name in list(sys.modules):
        if name.split(".")[0] in hidden:
            del sys.modules[name]


def read_only(root: str) -> None:
    """Every write-side filesystem call under ``root`` raises ``OSError(EROFS)``."""
    root = os.path.abspath(root)

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(root)
        except TypeError:  # a file descriptor
            return False

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def guard(fn, *positions):
        def wrapped(*args, **kwargs):
            for i in positions:
                if i < len(args) and under(args[i]):
                    refuse(args[i])
            return fn(*args, **kwargs)
        return wrapped

    os.mkdir = guard(os.mkdir, 0)
    os.rename = guard(os.rename, 0, 1)
    os.replace = guard(os.replace, 0, 1)
    os.remove = guard(os.remove, 0)
    os.unlink = guard(os.unlink, 0)
    os.rmdir = guard(os.rmdir, 0)
    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open, os.open = open_, os_open


def _act(action) -> None:
    kind, arg = action[:2]
    if kind == "run":
        import subprocess  # noqa: PLC0415

        r = subprocess.run(arg, capture_output=True, text=True, timeout=600)
        with open(action[2], "w", encoding="utf-8") as f:
            json.dump({"returncode": r.returncode, "stderr": r.stderr}, f)
    elif kind == "signal":
        os.kill(os.getpid(), int(arg))
    elif kind == "delete":
        os.remove(arg)
    elif kind == "fsize_limit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), int(arg)))
    elif kind == "read_only":
        read_only(arg)
    else:
        raise ValueError(f"unknown fault action {kind!r}")


def patch_train_step(nan_steps, after_step) -> None:
    import numpy as np  # noqa: PLC0415

    from vjax.train.step import Trainer  # noqa: PLC0415

    original = Trainer.train_step
    calls = [0]

    def train_step(self, state, batch):
        calls[0] += 1
        if calls[0] in nan_steps:
            batch = {**batch, "frames": np.full(np.shape(batch["frames"]), np.nan, np.float32)}
        out = original(self, state, batch)
        for action in after_step.get(calls[0], ()):
            _act(action)
        return out

    Trainer.train_step = train_step


def patch_save(before_save) -> None:
    from vjax.train.checkpoint import Checkpoints  # noqa: PLC0415

    original = Checkpoints.save

    def save(self, step, *args, **kwargs):
        if step in before_save:
            self.wait()
            for action in before_save.pop(step):
                _act(action)
        return original(self, step, *args, **kwargs)

    Checkpoints.save = save


def main() -> None:
    faults = json.loads(sys.argv[1])
    module, args = sys.argv[2], sys.argv[3:]
    if faults.get("hide_modules"):
        hide_modules(faults["hide_modules"])
    nan_steps = set(faults.get("nan_steps", ()))
    after_step = {int(k): v for k, v in faults.get("after_step", {}).items()}
    if nan_steps or after_step:
        patch_train_step(nan_steps, after_step)
    before_save = {int(k): v for k, v in faults.get("before_save", {}).items()}
    if before_save:
        patch_save(before_save)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
