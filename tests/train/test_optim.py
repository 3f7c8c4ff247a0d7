"""The learning rate of every optimizer update follows the intended warmup + cosine schedule over the
run's updates, with and without gradient accumulation (measured from the parameter change: with a constant
gradient, AdamW without decay moves each weight by lr * g / (|g| + eps): lr to float32 precision)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vjax.train.optim import OptimConfig, make_optimizer


def intended(u: int, updates: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup over ``warmup`` updates from 0, then cosine from ``peak`` to ``floor`` at ``updates``."""
    if u < warmup:
        return peak * u / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (u - warmup) / (updates - warmup)))


@pytest.mark.parametrize("accum", [1, 4])
def test_every_update_uses_the_scheduled_learning_rate(accum):
    updates, warmup = 6, 2  # updates of the run, warmup updates
    cfg = OptimConfig(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=warmup * accum, total_steps=updates * accum,
                      grad_accum=accum, grad_clip=0.0, weight_decay=0.0)
    tx = make_optimizer(cfg)
    params = {"w": jnp.zeros((3,))}
    state = tx.init(params)
    grad = {"w": jnp.full((3,), 0.25)}
    moves = []
    for _ in range(cfg.total_steps):
        upd, state = tx.update(grad, state, params)
        moves.append(-float(jnp.max(upd["w"])))
        params = optax.apply_updates(params, upd)
    moves = np.asarray(moves)
    applied = moves[accum - 1::accum]  # the steps that complete an accumulation
    assert np.all(np.delete(moves, np.arange(accum - 1, len(moves), accum)) == 0.0)
    want = [intended(u, updates, warmup, 1.0, 0.1) for u in range(updates)]
    np.testing.assert_allclose(applied, want, rtol=1e-4, atol=1e-6)


def test_mu_dtype_sets_the_first_moment_only():
    params = {"w": jnp.ones((4, 4), jnp.float32)}
    state = make_optimizer(OptimConfig(mu_dtype="bfloat16")).init(params)
    adam = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0]
    assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.float32
    with pytest.raises(ValueError, match="mu_dtype='int8'"):
        OptimConfig(mu_dtype="int8")
