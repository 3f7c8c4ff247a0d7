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


def test_bfloat16_gradients_are_the_gradients_at_the_rounded_matrices():
    """``grad_dtype="bfloat16"``: the step differentiates with respect to the matrices rounded to bfloat16 and
    updates the float32 master weights with those gradients. Reference: the same model's gradient taken here at
    the rounded matrices (vectors kept float32), cast up, then the step's AdamW with clipping."""
    from tests.train.common import fixed_batches  # noqa: PLC0415
    from vjax.models import registry  # noqa: PLC0415
    from vjax.pytree import flatten_params  # noqa: PLC0415
    from vjax.train.sharding import make_mesh  # noqa: PLC0415
    from vjax.train.step import Trainer  # noqa: PLC0415

    cfg_cls, module_cls = registry.get("decoder")
    module = module_cls(cfg_cls.tiny())
    base = dict(learning_rate=1e-2, warmup_steps=1, total_steps=10, eps=1e-3, grad_clip=0.05)
    rounded = Trainer(module, OptimConfig(**base, grad_dtype="bfloat16"), make_mesh((1, 1, 1)))
    batch = next(fixed_batches(module, 1, batch=2))
    start = rounded.init_state(0)
    params = jax.device_get(start.params)
    state, metrics = rounded.train_step(start, batch)
    got = flatten_params(jax.device_get(state.params))

    def loss(p):
        return module.apply({"params": p}, {k: jnp.asarray(v) for k, v in batch.items()}, method="loss",
                            rngs={"dropout": jax.random.key(0), "merge": jax.random.key(1)})[0]

    low = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
    raw = jax.grad(loss)(low)
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree_util.tree_leaves(raw) if g.ndim >= 2)
    grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), raw)
    norm = optax.tree.norm(grads)
    exact_norm = float(optax.tree.norm(jax.grad(loss)(params)))
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(norm), rtol=1e-5)
    assert abs(float(norm) - exact_norm) > 1e-4 * exact_norm  # the rounding is real: other gradients than float32's
    assert float(norm) > base["grad_clip"]  # the clip is exercised
    tx = make_optimizer(OptimConfig(**base))
    updates, _ = tx.update(grads, tx.init(params), params)
    want = flatten_params(jax.device_get(optax.apply_updates(params, updates)))
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        assert got[k].dtype == np.float32, k  # the master weights stay float32
    with pytest.raises(ValueError, match="grad_dtype='int8'"):
        OptimConfig(grad_dtype="int8")


def test_the_select_guard_updates_as_the_branch_and_keeps_the_state_on_a_non_finite_step():
    """``finite_guard="select"`` (the update always computed, each new value chosen elementwise): a finite step gives
    the branch's state exactly; a step with a NaN loss leaves parameters, moments and step count as they were."""
    from tests.train.common import fixed_batches  # noqa: PLC0415
    from vjax.models import registry  # noqa: PLC0415
    from vjax.train.sharding import make_mesh  # noqa: PLC0415
    from vjax.train.step import Trainer  # noqa: PLC0415

    cfg_cls, module_cls = registry.get("decoder")
    module = module_cls(cfg_cls.tiny())
    base = dict(learning_rate=1e-2, warmup_steps=0, total_steps=10, grad_clip=0.05)  # the first update moves
    branch, select = (Trainer(module, OptimConfig(**base, finite_guard=g), make_mesh((1, 1, 1)))
                      for g in ("branch", "select"))
    batch = next(fixed_batches(module, 1, batch=2))
    start = jax.device_get(branch.init_state(0))
    (a, ma), (b, mb) = branch.train_step(start, batch), select.train_step(start, batch)
    assert bool(ma["finite"]) and bool(mb["finite"]) and int(b.step) == 1
    for x, y, z in zip(jax.tree_util.tree_leaves(jax.device_get(b)), jax.tree_util.tree_leaves(jax.device_get(a)),
                       jax.tree_util.tree_leaves(start)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(jax.tree_util.tree_leaves(jax.device_get(b.params)),
                                                        jax.tree_util.tree_leaves(start.params)))
    nan = {**batch, "loss_mask": np.asarray(batch["loss_mask"], np.float32) * np.nan}
    kept, metrics = select.train_step(start, nan)
    assert not bool(metrics["finite"]) and int(kept.step) == 0
    kept = jax.device_get((kept.params, kept.opt_state))  # the RNG moves on either way
    for x, z in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves((start.params, start.opt_state))):
        np.testing.assert_array_equal(x, z)
    with pytest.raises(ValueError, match="finite_guard='maybe'"):
        OptimConfig(finite_guard="maybe")
