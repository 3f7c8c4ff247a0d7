"""Logical names -> PartitionSpec (parameters and activations)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec as P

from vjax.layers.partitioning import constrain, spec_for
from vjax.train.sharding import RULES, make_mesh


def test_spec_for_replicates_indivisible_dims_and_uses_each_axis_once():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert spec_for(("batch", None, "embed"), (8, 3, 64), mesh, RULES) == P(("data", "fsdp"), None, None)
    assert spec_for(("embed", "mlp"), (64, 128), mesh, RULES) == P("fsdp", "tensor")
    assert spec_for(("embed", "mlp"), (63, 128), mesh, RULES) == P(None, "tensor")  # 63 % 2
    assert spec_for(("batch", "embed"), (6, 64), mesh, RULES) == P(None, "fsdp")  # 6 % 4: fsdp stays free


def test_constrain_is_a_no_op_without_mesh_and_rules_and_keeps_values_with_them():
    x = jnp.arange(24.0).reshape(4, 3, 2)
    assert constrain(x, ("batch", None, None)) is x
    with nn.logical_axis_rules(RULES):
        assert constrain(x, ("batch", None, None)) is x  # rules but no mesh
    with jax.set_mesh(make_mesh((1, 1, 1), jax.devices()[:1])), nn.logical_axis_rules(RULES):
        y = jax.jit(lambda a: constrain(a * 2, ("batch", None, None)))(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
