"""A small training run through vjax.train.loop (used by the resume tests as a subprocess)."""

from __future__ import annotations

import sys

import grain
import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from tests.train.common import build  # noqa: E402
from vjax.train.loop import LoopConfig, run  # noqa: E402
from vjax.train.sharding import make_mesh  # noqa: E402


class TokenRecord:
    """index -> one training example of random tokens (deterministic by index)."""

    def __call__(self, i):
        rng = np.random.default_rng(int(i))
        ids = rng.integers(3, 256, 8).astype(np.int32)
        return {"input_ids": ids, "attention_mask": np.ones(8, np.int32), "loss_mask": np.ones(8, np.int32)}


def data_iterator(seed: int = 0):
    ds = grain.MapDataset.range(10_000).shuffle(seed=seed).map(TokenRecord()).batch(4, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def main(workdir: str, steps: int, save_every: int, delay: float = 0.0):
    import time  # noqa: PLC0415

    trainer = build("decoder", make_mesh((1, 1, 1)))
    data = data_iterator()
    if delay:  # slow each step down so a kill lands mid-run
        orig = trainer.train_step

        def slow(state, batch):
            time.sleep(delay)
            return orig(state, batch)

        trainer.train_step = slow
    state = run(trainer, data, workdir, LoopConfig(total_steps=steps, log_every=1, save_every=save_every,
                                                   progress=False))
    leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(state.params))}
    np.savez(f"{workdir}/final_params.npz", **leaves)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
