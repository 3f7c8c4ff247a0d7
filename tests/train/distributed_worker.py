"""One process of a multi-process CPU run over localhost (jax.distributed), or the single-process
reference: 3 training steps of the tiny decoder on a global batch of 8, each process feeding its rows."""

from __future__ import annotations

import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, num_processes: int, port: int, out: str):
    if num_processes > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)
    from tests.train.common import build, fixed_batches  # noqa: PLC0415
    from vjax.train.sharding import make_mesh  # noqa: PLC0415

    trainer = build("decoder", make_mesh((-1, 1, 1)))
    state = trainer.init_state(0)
    rows = 8 // num_processes
    losses = []
    for batch in fixed_batches(trainer.module, 3, batch=8):
        local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batch.items()}
        state, metrics = trainer.train_step(state, local)
        losses.append(float(metrics["loss"]))
    from jax.experimental import multihost_utils  # noqa: PLC0415

    params = multihost_utils.process_allgather(state.params, tiled=True) if num_processes > 1 else state.params
    if process_id == 0:
        leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(params))}
        np.savez(out, losses=np.asarray(losses), **leaves)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
