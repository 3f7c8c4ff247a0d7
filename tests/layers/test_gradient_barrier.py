"""``vjax.layers.scan.gradient_barrier``: the identity in values and gradients, and on the CPU backend the
backward pass of a ViT no longer recomputes every later block's norm gradient inside each earlier block's
fusions (the largest fusion stops growing with depth)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vjax.layers.vit as vit_lib
from vjax.layers.scan import gradient_barrier
from vjax.layers.vit import ViT


def test_gradient_barrier_is_the_identity():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
    f = lambda a: jnp.sum(jnp.sin(gradient_barrier(a * 2.0)) ** 2)  # noqa: E731
    g = lambda a: jnp.sum(jnp.sin(a * 2.0) ** 2)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(gradient_barrier(x)), np.asarray(x))
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(f))(x)), np.asarray(jax.grad(g)(x)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(f))(x)), np.asarray(jax.vmap(jax.grad(g))(x)), rtol=1e-6)
    # forward mode works too (a JVP rule, from which reverse mode is derived)
    np.testing.assert_allclose(np.asarray(jax.jvp(f, (x,), (jnp.ones_like(x),))[1]),
                               np.asarray(jax.jvp(g, (x,), (jnp.ones_like(x),))[1]), rtol=1e-6)
    # a NaN gradient passes through unchanged (both branches are the identity), as do bf16 and empty arrays
    nan = jax.grad(lambda a: jnp.sum(gradient_barrier(a) * jnp.nan))(x)
    assert np.isnan(np.asarray(nan)).all()
    xb = x.astype(jnp.bfloat16)
    assert jax.grad(lambda a: jnp.sum(gradient_barrier(a)).astype(jnp.float32))(xb).dtype == jnp.bfloat16
    assert jax.grad(lambda a: jnp.sum(gradient_barrier(a)))(jnp.zeros((0, 4))).shape == (0, 4)


def _largest_fusion(depth: int) -> int:
    """Operands of the largest fusion in the CPU-compiled gradient of a ``depth``-block ViT."""
    model = ViT(width=64, depth=depth, num_heads=4, mlp_dim=256, patch_size=4, temporal_patch_size=1,
                cls_token=False)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64, 48)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, x).last ** 2)  # noqa: E731
    text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    heads = [line.split("->")[0] for line in text.splitlines() if line.startswith("%fused")]
    return max(len(re.findall(r"param_[\d.]+: ", h)) for h in heads)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the barrier acts on the CPU backend only")
def test_vit_backward_fusions_do_not_grow_with_depth(monkeypatch):
    with_barrier = {d: _largest_fusion(d) for d in (2, 8)}
    assert with_barrier[8] <= with_barrier[2] + 4, with_barrier
    # the check can fail: without the barrier the largest fusion grows with every block
    monkeypatch.setattr(vit_lib, "gradient_barrier", lambda a: a)
    without = {d: _largest_fusion(d) for d in (2, 8)}
    assert without[8] > without[2] + 4 * 6, without
