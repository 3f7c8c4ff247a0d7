"""Stacked <-> unrolled parameter trees (``vjax.layers.scan``): round trips, group discovery, loud errors."""

from __future__ import annotations

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
