"""``vjax.layers.scan``: stacked <-> unrolled parameter trees (round trips, group discovery, loud errors), and the
stack whose backward pass writes the gradients in place (against differentiating ``lax.scan``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vjax.layers import scan as scan_lib
from vjax.pytree import flatten_params


def _tree(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "llm": {f"layers_{i}": {"attn": {"kernel": rng.normal(size=(4, 2))}, "norm": {"scale": rng.normal(size=4)}}
                for i in range(n)} | {"norm": {"scale": rng.normal(size=4)}},
        "vision": {"vit": {f"blocks_{i}": {"w": rng.normal(size=(2,))} for i in range(2)} | {"pos": np.zeros(3)}},
        "qformer": {"layers_0": {"w": np.ones(2)}},  # not scanned: left unrolled
    }


def test_stack_unstack_round_trip_nested_and_flat():
    tree = _tree()
    s = scan_lib.stack_layers(tree, "llm/layers", 3)
    s = scan_lib.stack_layers(s, "vision/vit/blocks", 2)
    assert s["llm"]["layers"]["attn"]["kernel"].shape == (3, 4, 2)
    np.testing.assert_array_equal(s["llm"]["layers"]["attn"]["kernel"][1], tree["llm"]["layers_1"]["attn"]["kernel"])
    assert scan_lib.scanned_groups(s) == [("llm/layers", 3), ("vision/vit/blocks", 2)]
    back = scan_lib.unstack_all(s)
    fa, fb = flatten_params(back), flatten_params(tree)
    assert sorted(fa) == sorted(fb) and all(np.array_equal(fa[k], fb[k]) for k in fb)
    # the same on a flat {"a/b": x} tree, which comes back flat
    flat = flatten_params(tree)
    sf = scan_lib.stack_layers(flat, "llm/layers", 3)
    assert "llm/layers/attn/kernel" in sf and "llm/layers_0/attn/kernel" not in sf
    assert sorted(scan_lib.unstack_layers(sf, "llm/layers")) == sorted(flat)
    # stack_like follows a template: only its scanned groups are stacked
    like = scan_lib.stack_layers(tree, "llm/layers", 3)
    got = scan_lib.stack_like(tree, like)
    assert "layers" in got["llm"] and "blocks_0" in got["vision"]["vit"] and "layers_0" in got["qformer"]
    assert scan_lib.stack_like(tree, tree) is tree


def test_missing_layer_and_missing_group_are_named():
    tree = _tree()
    del tree["llm"]["layers_1"]["norm"]
    with pytest.raises(ValueError, match=r"layers_<i>/norm/scale: found layers \[0, 2\], expected 0..2"):
        scan_lib.stack_layers(tree, "llm/layers", 3)
    with pytest.raises(ValueError, match="no llm/blocks_<i>"):
        scan_lib.stack_layers(tree, "llm/blocks", 3)
    with pytest.raises(ValueError, match="no stacked sub-tree 'llm/layers'"):
        scan_lib.unstack_layers(tree, "llm/layers")


# ----------------------------------------------------------------------------- gradients in place
def _layer(p, h, shared):
    """A small block with two matrices, a vector, a float input shared by every layer and an integer one."""
    x = jnp.tanh(h @ p["w"] + p["b"]) @ p["v"]
    return h + x * shared["scale"] + shared["ids"][..., None].astype(h.dtype) * 0.01


def _stack_and_inputs(n=4, d=6, seed=0):
    rng = np.random.default_rng(seed)
    stacked = {"w": rng.normal(size=(n, d, d)).astype(np.float32) / 3, "b": rng.normal(size=(n, d)).astype(np.float32),
               "v": rng.normal(size=(n, d, d)).astype(np.float32) / 3}
    h = rng.normal(size=(2, 5, d)).astype(np.float32)
    shared = {"scale": jnp.asarray(rng.normal(size=(2, 5, d)).astype(np.float32)),
              "ids": jnp.asarray(rng.integers(0, 3, (2, 5)).astype(np.int32)), "static": 2}
    return jax.tree_util.tree_map(jnp.asarray, stacked), jnp.asarray(h), shared


def _reference(stacked, h, shared):
    return jax.lax.scan(lambda c, p: (_layer(p, c, shared), None), h, stacked)[0]


@pytest.mark.parametrize("offload", [False, True])
def test_scan_grads_in_place_equals_the_differentiated_scan(offload):
    """Values, the stacked parameters' gradients, the input's and the shared float input's (summed over the layers)
    equal those of differentiating ``lax.scan`` over the same layer (float32, 1e-6); the integer input and the static
    one pass through. With ``offload`` the saved inputs go to pinned host memory where the backend has it."""
    if offload and not scan_lib.has_pinned_host():
        pytest.fail(f"the {jax.default_backend()} backend has no pinned host memory to test offloading with")
    stacked, h, shared = _stack_and_inputs()
    weights = jax.random.normal(jax.random.key(0), h.shape)

    def loss(fn):
        return lambda p, x, s: jnp.sum(fn(p, x, {**shared, "scale": s}) * weights)

    in_place = functools.partial(scan_lib.scan_grads_in_place, _layer, offload=offload)
    np.testing.assert_allclose(in_place(stacked, h, shared), _reference(stacked, h, shared), atol=1e-6)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(stacked, h, shared["scale"])
    got = jax.jit(jax.grad(loss(lambda p, x, s: in_place(p, x, s)), argnums=(0, 1, 2)))(stacked, h, shared["scale"])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_scan_grads_in_place_gives_frozen_leaves_no_gradient_and_keeps_the_others():
    """Only some leaves differentiated (a frozen ``v``, as a stage that trains part of a stack): the others'
    gradients equal the reference's, and so does the input's when the parameters are not differentiated at all."""
    stacked, h, shared = _stack_and_inputs(seed=1)

    def loss(fn, trained, frozen):
        return jnp.sum(fn({**trained, **frozen}, h, shared) ** 2)

    in_place = functools.partial(scan_lib.scan_grads_in_place, _layer)
    trained, frozen = {k: stacked[k] for k in ("w", "b")}, {"v": stacked["v"]}
    want = jax.grad(lambda t: loss(_reference, t, frozen))(trained)
    got = jax.jit(jax.grad(lambda t: loss(in_place, t, frozen)))(trained)
    for k in trained:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-6, err_msg=k)
    want_h = jax.grad(lambda x: jnp.sum(_reference(stacked, x, shared) ** 2))(h)
    got_h = jax.grad(lambda x: jnp.sum(in_place(stacked, x, shared) ** 2))(h)
    np.testing.assert_allclose(got_h, want_h, atol=1e-6, rtol=1e-6)
