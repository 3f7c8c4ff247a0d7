"""The one training loop: resume, step, log, evaluate, checkpoint, stop cleanly.

    state <- latest checkpoint (params, optimizer, step, RNG, data iterator) or a fresh init
    while step < total_steps:
        batch <- data; state, metrics <- train_step(state, batch)
        non-finite loss/gradient -> stop with an error; the last good checkpoint stays the latest
        every log_every: progress bar (loss, steps/s, ETA), metrics.jsonl + TensorBoard
        every eval_every: eval_fn(state) -> validation metrics
        every save_every and at the end: asynchronous Orbax save
    curves.png in the workdir
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from vjax.train.checkpoint import Checkpoints
from vjax.train.metrics import MetricsWriter, plot_curves
from vjax.train.step import Trainer, TrainState


class NonFiniteLossError(FloatingPointError):
    """Training hit a NaN/Inf loss or gradient; the message says at which step and what was kept."""


@dataclasses.dataclass
class LoopConfig:
    total_steps: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True


def run(
    trainer: Trainer,
    data: Iterator[Mapping[str, np.ndarray]],
    workdir: str | Path,
    cfg: LoopConfig,
    *,
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    init_params: Any | None = None,
    config_json: Mapping[str, Any] | None = None,
    on_restore: Callable[[int], None] | None = None,
) -> TrainState:
    """Train until ``cfg.total_steps``; resumes from ``workdir``'s latest checkpoint if there is one.

    ``data`` must be a Grain ``DataLoader`` iterator (its state is checkpointed with the model) or any
    iterator (then restarts re-read from its beginning). ``eval_fn`` returns validation metrics.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    ckpt = Checkpoints(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    checkpointable = hasattr(data, "get_state") and hasattr(data, "set_state")
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(trainer.abstract_state, trainer.state_shardings,
                             data_iterator=data if checkpointable else None)
        if on_restore:
            on_restore(int(start))
    else:
        state = trainer.init_state(cfg.seed, init_params)
        start = 0
    writer = MetricsWriter(workdir, enabled=is_main)
    bar = tqdm(total=cfg.total_steps, initial=start, disable=not (cfg.progress and is_main),
               desc="train", dynamic_ncols=True)
    step = start
    t_last, n_last = time.perf_counter(), step
    pending = None  # metrics of the last dispatched step: checked once the next batch is read, so that
    # decoding the next batch on the host overlaps the device's work on this one

    def check_finite() -> None:
        if pending is None or bool(pending["finite"]):
            return
        last = ckpt.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step} (loss={float(pending['loss'])}, "
            f"grad_norm={float(pending['grad_norm'])}); the update was not applied. "
            f"Last good checkpoint: {'step ' + str(last) if last is not None else 'none'} in "
            f"{ckpt.directory}. Lower the learning rate or check the data, then re-run to resume.")

    try:
        while step < cfg.total_steps:
            batch = next(data)
            check_finite()
            state, pending = trainer.train_step(state, batch)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                check_finite()
                now = time.perf_counter()
                host = {k: float(v) for k, v in jax.device_get(pending).items()}
                host["steps_per_second"] = (step - n_last) / max(now - t_last, 1e-9)
                t_last, n_last = now, step
                writer.write(step, host, "train")
                bar.set_postfix(loss=f"{host['loss']:.4f}", sps=f"{host['steps_per_second']:.2f}")
            if eval_fn and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
                check_finite()
                writer.write(step, eval_fn(state), "val")
            if step % cfg.save_every == 0 and step < cfg.total_steps:
                check_finite()
                ckpt.save(step, state, data_iterator=data if checkpointable else None, config=config_json)
        check_finite()
        if ckpt.latest_step() != step:
            ckpt.save(step, state, data_iterator=data if checkpointable else None, config=config_json, force=True)
        if eval_fn:
            writer.write(step, eval_fn(state), "val")
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    if is_main:
        plot_curves(workdir)
    return state
