"""The one training loop: resume, step, log, evaluate, checkpoint, stop cleanly.

    state <- newest checkpoint that restores (params, optimizer, step, RNG, data iterator) or a fresh init
    while step < total_steps:
        batch <- data; state, metrics <- train_step(state, batch)
        non-finite loss/gradient -> the update is skipped and counted; after max_nonfinite_in_a_row
            such steps in a row -> stop with an error (the latest checkpoint holds the last good state)
        SIGINT / SIGTERM -> finish the step, save a checkpoint, raise Interrupted (rerunning resumes)
        every log_every: progress bar (loss, steps/s, ETA), metrics.jsonl + TensorBoard
        every eval_every: eval_fn(state) -> validation metrics
        every save_every and at the end: asynchronous Orbax save
    curves.png in the workdir

Checkpoints that do not restore are passed over and set aside (:meth:`Checkpoints.restore_newest`); a
save that cannot be written raises :class:`~vjax.train.checkpoint.CheckpointWriteError`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from vjax.train.checkpoint import Checkpoints
from vjax.train.metrics import MetricsWriter, plot_curves
from vjax.train.step import Trainer, TrainState

logger = logging.getLogger("vjax.train")


class NonFiniteLossError(FloatingPointError):
    """Too many NaN/Inf steps in a row; the message says which steps and what was kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped training after a step; ``saved_step`` is the checkpoint that holds it
    (None when no step had run). Commands exit with ``128 + signum`` (130 / 143)."""

    def __init__(self, signum: int, step: int, saved_step: int | None, directory: Path):
        self.signum, self.step, self.saved_step, self.directory = signum, step, saved_step, directory
        name = signal.Signals(signum).name
        kept = (f"checkpoint step {saved_step} saved in {directory}; re-run the same command to resume"
                if saved_step is not None else "no step had run, nothing to save")
        super().__init__(f"{name} received after step {step}: {kept}")


@dataclasses.dataclass
class LoopConfig:
    total_steps: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    max_nonfinite_in_a_row: int = 5  # consecutive skipped (NaN/Inf) steps that stop the run
    stop_on_signals: bool = True  # SIGINT/SIGTERM: save, then raise Interrupted


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM only set :attr:`signum`; the loop checks it after
    each step, saves and stops. A second signal raises :class:`KeyboardInterrupt` at once (the save in flight
    is atomic: a half-written step is never picked up). Handlers are installed only in the main thread of a
    single-process run: on several processes every one must stop at the same step, which JAX's preemption
    sync point (``multihost_utils.reached_preemption_sync_point``, SIGTERM) decides instead."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def run(
    trainer: Trainer,
    data: Iterator[Mapping[str, np.ndarray]],
    workdir: str | Path,
    cfg: LoopConfig,
    *,
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    init_params: Any | None = None,
    config_json: Mapping[str, Any] | None = None,
    on_restore: Callable[[int, list[tuple[int, str]]], None] | None = None,
    host_metrics: Callable[[], Mapping[str, float]] | None = None,
) -> TrainState:
    """Train until ``cfg.total_steps``; resumes from ``workdir``'s newest checkpoint that restores.

    ``data`` must be a Grain ``DataLoader`` iterator (its state is checkpointed with the model) or any
    iterator (then restarts re-read from its beginning). ``eval_fn`` returns validation metrics.
    ``on_restore(step, passed_over)`` is called after a resume, ``passed_over`` = ``[(step, reason)]`` of
    newer checkpoints that did not restore (set aside). ``host_metrics()`` returns counters since its last
    call (e.g. skipped records), added to each logged train row.

    Raises :class:`NonFiniteLossError`, :class:`Interrupted`,
    :class:`~vjax.train.checkpoint.CheckpointWriteError` and
    :class:`~vjax.train.checkpoint.NoRestorableCheckpoint`.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    multi_process = jax.process_count() > 1
    ckpt = Checkpoints(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    checkpointable = hasattr(data, "get_state") and hasattr(data, "set_state")
    iterator = data if checkpointable else None
    if ckpt.latest_step() is not None:
        try:
            state, start, passed_over = ckpt.restore_newest(
                lambda s: ckpt.restore(trainer.abstract_state, trainer.state_shardings, step=s,
                                       data_iterator=iterator), set_aside=True)
        except BaseException:
            ckpt.close()
            raise
        if on_restore:
            on_restore(int(start), passed_over)
    else:
        state = trainer.init_state(cfg.seed, init_params)
        start = 0
    writer = MetricsWriter(workdir, enabled=is_main)
    bar = tqdm(total=cfg.total_steps, initial=start, disable=not (cfg.progress and is_main),
               desc="train", dynamic_ncols=True)
    step = start
    t_last, n_last = time.perf_counter(), step
    # metrics of the last dispatched step: checked once the next batch is read, so that decoding the next
    # batch on the host overlaps the device's work on this one
    pending: dict | None = None
    checked = step  # the last step whose finiteness was checked
    bad_run: list[int] = []  # the current streak of non-finite steps
    skipped_since_log = 0
    data_wait = 0.0  # host seconds inside next(data) since the last log

    def check_finite() -> None:
        nonlocal checked, skipped_since_log
        if pending is None or checked == step:
            return
        checked = step
        if bool(pending["finite"]):
            bad_run.clear()
            return
        bad_run.append(step)
        skipped_since_log += 1
        logger.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped", step,
                       float(pending["loss"]), float(pending["grad_norm"]))
        if len(bad_run) >= cfg.max_nonfinite_in_a_row:
            last = ckpt.latest_step()
            raise NonFiniteLossError(
                f"{len(bad_run)} non-finite steps in a row (steps {bad_run[0]}-{bad_run[-1]}, last loss="
                f"{float(pending['loss'])}, grad_norm={float(pending['grad_norm'])}); none was applied. Last good "
                f"checkpoint: {'step ' + str(last) if last is not None else 'none'} in {ckpt.directory}. "
                f"Lower the learning rate or check the data, then re-run to resume.")

    def save(force: bool = False) -> None:
        ckpt.save(step, state, data_iterator=iterator, config=config_json, force=force)

    def stop_requested(signals: StopSignals) -> int | None:
        if signals.signum is not None:
            return signals.signum
        if multi_process and ckpt.manager.reached_preemption(step):
            return int(signal.SIGTERM)
        return None

    try:
        with StopSignals(cfg.stop_on_signals and not multi_process) as signals:
            while step < cfg.total_steps:
                signum = stop_requested(signals)
                if signum is not None:
                    check_finite()
                    if step > 0 and ckpt.latest_step() != step:
                        save(force=True)
                    ckpt.wait()
                    raise Interrupted(signum, step, ckpt.latest_step() if step > 0 else None, ckpt.directory)
                t_data = time.perf_counter()
                batch = next(data)
                data_wait += time.perf_counter() - t_data
                check_finite()
                state, pending = trainer.train_step(state, batch)
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    check_finite()
                    now = time.perf_counter()
                    host = {k: float(v) for k, v in jax.device_get(pending).items()}
                    host["steps_per_second"] = (step - n_last) / max(now - t_last, 1e-9)
                    host["skipped_nonfinite"] = float(skipped_since_log)
                    # the host's wait for batches (the step before runs asynchronously meanwhile: where the data
                    # is slower than the device, this is the share of the wall time the data held the loop)
                    host["data_wait_seconds"] = data_wait
                    host["data_wait_fraction"] = data_wait / max(now - t_last, 1e-9)
                    skipped_since_log, data_wait = 0, 0.0
                    if host_metrics is not None:
                        host.update({k: float(v) for k, v in host_metrics().items()})
                    t_last, n_last = now, step
                    writer.write(step, host, "train")
                    bar.set_postfix(loss=f"{host['loss']:.4f}", sps=f"{host['steps_per_second']:.2f}")
                if eval_fn and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
                    check_finite()
                    writer.write(step, eval_fn(state), "val")
                if step % cfg.save_every == 0 and step < cfg.total_steps:
                    check_finite()
                    save()
            check_finite()
            if ckpt.latest_step() != step:
                save(force=True)
            ckpt.wait()
        if eval_fn:
            writer.write(step, eval_fn(state), "val")
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    if is_main:
        plot_curves(workdir)
    return state
