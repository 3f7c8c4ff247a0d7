"""Orbax checkpoints of the whole training state: params, optimizer state, step, RNG, the Grain
iterator state and the config, saved together, asynchronously, keeping the last ``keep``.

Restoring takes the target shardings explicitly (abstract arrays carrying ``NamedSharding`` s), so a
checkpoint written on one mesh restores onto another.

Faults: a checkpoint that does not restore (truncated or corrupted files, non-finite values) is passed
over for the newest one that does (:meth:`Checkpoints.restore_newest`), and with ``set_aside=True`` moved
to ``<directory>_unreadable/`` (never deleted) so that later saves and restores do not meet it again; when
none restores, :class:`NoRestorableCheckpoint` names each step and why. A save that cannot be written
(read-only or full disk) raises :class:`CheckpointWriteError` naming the step and the previous checkpoint,
which stays intact: Orbax writes each step into a temporary directory and renames it only once complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import orbax.checkpoint as ocp


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (read-only or full disk ...); names the step, the reason and the
    previous checkpoint, which is intact."""

    def __init__(self, step: int | None, directory: Path, reason: str, previous: int | None):
        self.step, self.directory, self.reason, self.previous = step, directory, reason, previous
        kept = f"the previous checkpoint, step {previous}, is intact" if previous is not None else \
            "no earlier checkpoint exists"
        super().__init__(f"could not write checkpoint step {step} to {directory} ({reason}); {kept}: "
                         f"make the directory writable or free space, then re-run to resume")


class NoRestorableCheckpoint(ValueError):
    """Checkpoints exist but none restores; ``failures`` is ``[(step, reason)]``, newest first."""

    def __init__(self, directory: Path, failures: list[tuple[int, str]]):
        self.directory, self.failures = directory, failures
        detail = "; ".join(f"step {s}: {r}" for s, r in failures)
        hint = ""
        if any("sampler" in r.lower() or "dataloader" in r.lower() for _, r in failures):
            hint = (" (the input pipeline differs from the one the checkpoint saved: its records, their order or "
                    "its worker processes; resume with the data settings it was written with)")
        super().__init__(f"no checkpoint in {directory} restores ({detail}){hint}; nothing was changed: move the "
                         f"directory away to start afresh, or restore it from a backup")


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _reason(err: BaseException) -> str:
    """One short line for an exception: the innermost cause's type and first message line (Orbax wraps
    tensorstore's precise error, e.g. ``OUT_OF_RANGE: ... byte range ... not valid``, in a vaguer one)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    if len(line) > 240:  # tensorstore's messages name long paths in the middle; the cause is at the end
        line = f"{line[:100]} ... {line[-135:]}"
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _drop_closed_loop_noise() -> None:
    """After a failed restore or save, tensorstore completes the operations still in flight and their callbacks
    find Orbax's asyncio loop closed: each prints an 'Event loop is closed' traceback through
    ``sys.unraisablehook`` (hundreds of lines that say nothing). Drop exactly those; others pass through.
    The coroutines of an abandoned restore that never ran (e.g. tensorstore's ``Store._get_array_metadatas``)
    warn 'coroutine ... was never awaited' when collected at exit: those warnings go too."""
    warnings.filterwarnings("ignore", message=r"coroutine '[\w.]+' was never awaited", category=RuntimeWarning)
    previous = sys.unraisablehook
    if getattr(previous, "_vjax_drops_closed_loop", False):
        return

    def hook(unraisable):
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        previous(unraisable)

    hook._vjax_drops_closed_loop = True
    sys.unraisablehook = hook


class _OrbaxErrorLogs(logging.Filter):
    """Drops the error logs (tracebacks of background threads, asyncio's 'Task exception was never retrieved')
    that Orbax and tensorstore print for a failed save or restore: :class:`Checkpoints` raises each failure
    as one exception, which the commands print as one line."""

    SOURCES = ("orbax", "tensorstore", "OCDBT")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.pathname + record.getMessage()  # asyncio's message holds the task and its exception
        if record.exc_info and record.exc_info[1] is not None:
            text += "".join(traceback.format_exception(*record.exc_info))
        return not any(s in text for s in self.SOURCES)


def _drop_orbax_error_logs() -> None:
    for name in ("absl", "asyncio"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _OrbaxErrorLogs) for f in log.filters):
            log.addFilter(_OrbaxErrorLogs())


def _non_finite_leaf(tree: Any) -> str | None:
    """The path of the first floating-point leaf holding a NaN/Inf (training never saves one), or None.
    Checked where the arrays live: device arrays (sharded ones included) by one jitted reduction, host arrays
    leaf by leaf with NumPy (nothing is copied to a device)."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    leaves = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    on_device = [(p, x) for p, x in leaves if isinstance(x, jax.Array)]
    finite = jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])([x for _, x in on_device]) if on_device else []
    ok = dict(zip([p for p, _ in on_device], (bool(f) for f in finite)))
    for path, x in leaves:
        if not ok.get(path, True) or (not isinstance(x, jax.Array) and not np.isfinite(x).all()):
            return path
    return None


class Checkpoints:
    """A thin wrapper over ``ocp.CheckpointManager`` with items ``state``, ``data``, ``config``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )
        _drop_closed_loop_noise()  # a failed save or restore would print it
        _drop_orbax_error_logs()
        self._in_flight: int | None = None  # the step of the save not yet known to be complete
        self._committed: int | None = self.latest_step()  # the newest step known to be written

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, *, data_iterator: Any = None, config: Mapping | None = None,
             force: bool = False) -> bool:
        """Start an asynchronous save of ``state`` (a pytree) and the iterator/config beside it.

        Raises :class:`CheckpointWriteError` if this save, or the previous one still in flight, fails."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            import grain  # noqa: PLC0415

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(dict(config))
        self._settle()  # a failure of the previous save is reported as that step's
        with self._write_errors(step):
            self._probe_writable()
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if started:
            self._in_flight = step
        return started

    def _settle(self) -> None:
        """Wait for the save in flight; raise :class:`CheckpointWriteError` if it failed."""
        if self._in_flight is None:
            return
        step, self._in_flight = self._in_flight, None
        with self._write_errors(step):
            self.manager.wait_until_finished()
        self._committed = step

    @contextlib.contextmanager
    def _write_errors(self, step: int):
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as err:  # noqa: BLE001 - Orbax/tensorstore raise many types; all become one error
            # the failed save's coroutines are never awaited: Python would warn about each at exit
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
            raise CheckpointWriteError(step, self.directory, _reason(err), self._committed) from err

    def _probe_writable(self) -> None:
        """Create and remove a small file in the directory: a read-only directory fails here, at once (inside
        Orbax a failed step-directory creation is only noticed after a 300 s signal timeout)."""
        probe = self.directory / f".write_probe.{jax.process_index()}.{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"vjax")
        os.remove(probe)

    # ------------------------------------------------------------------ restoring
    def restore(self, abstract_state: Any, shardings: Any, *, step: int | None = None,
                data_iterator: Any = None) -> Any:
        """Restore ``state`` onto ``shardings`` (and the iterator in place); latest step by default."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(_with_shardings(abstract_state, shardings))}
        if data_iterator is not None:
            import grain  # noqa: PLC0415

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_params(self, abstract_params: Any, *, step: int | None = None) -> Any:
        """Only ``state.params`` (no optimizer state is read), as host-local arrays; latest step by default.
        ``abstract_params``: the tree of ``jax.ShapeDtypeStruct`` (e.g. ``vjax.pretrained.abstract_params``)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def restore_newest(self, restore: Callable[[int], Any], *, set_aside: bool = False,
                       steps: Sequence[int] | None = None) -> tuple[Any, int, list[tuple[int, str]]]:
        """``restore(step)`` of the newest step that restores with finite values, trying older ones after a
        failure -> ``(restored, step, failures)``, ``failures`` = ``[(step, reason)]`` of the newer steps
        passed over. With ``set_aside=True`` (a training run that will save again) those are moved to
        ``<directory>_unreadable/<step>`` — kept for inspection, never deleted — once an older one restored.
        Raises :class:`NoRestorableCheckpoint` (nothing moved) if none restores, ``FileNotFoundError`` if
        there is no checkpoint. ``steps``: only these of the saved steps are tried (newest first)."""
        tried = [s for s in self.all_steps() if steps is None or s in steps]
        if not tried:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failures: list[tuple[int, str]] = []
        for step in tried:
            try:
                restored = restore(step)
                bad = _non_finite_leaf(restored)
                if bad is not None:
                    raise ValueError(f"non-finite values in {bad}")
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: try the next older one
                failures.append((step, _reason(err)))
                continue
            if failures and set_aside:
                failures = [(s, f"{r}; moved to {self._set_aside(s)}") for s, r in failures]
            return restored, step, failures
        raise NoRestorableCheckpoint(self.directory, failures)

    def _set_aside(self, step: int) -> Path:
        """Move step ``step``'s directory to ``<directory>_unreadable/`` (a fresh name if taken)."""
        if jax.process_index() != 0:
            return self.directory.with_name(self.directory.name + "_unreadable") / str(step)
        dest_root = self.directory.with_name(self.directory.name + "_unreadable")
        dest_root.mkdir(exist_ok=True)
        dest, n = dest_root / str(step), 1
        while dest.exists():
            dest, n = dest_root / f"{step}.{n}", n + 1
        shutil.move(str(self.directory / str(step)), str(dest))
        self.manager.reload()
        self._committed = self.latest_step()
        return dest

    def config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

    def wait(self) -> None:
        """Block until the save in flight is written; :class:`CheckpointWriteError` if it failed."""
        self._settle()

    def close(self) -> None:
        """Wait for the save in flight (:class:`CheckpointWriteError` if it failed) and release the manager."""
        try:
            self._settle()
        finally:
            with contextlib.suppress(Exception):
                self.manager.close()
