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


def _constraints(fn, *args) -> list[str]:
    """The shardings of every ``sharding_constraint`` in the jaxpr of ``fn`` under a 2 x 2 x 1 abstract mesh."""
    import re  # noqa: PLC0415

    from vjax.train.sharding import MESH_AXES  # noqa: PLC0415

    with jax.sharding.use_abstract_mesh(AbstractMesh((2, 2, 1), MESH_AXES)), nn.logical_axis_rules(RULES):
        text = str(jax.make_jaxpr(fn)(*args))
    return re.findall(r"sharding_constraint\[[^\]]*?spec=(P\([^\n]*?\))\)", text)


def test_every_block_output_is_sharded_by_batch_over_the_data_axes():
    """Activation sharding at block boundaries: the output of every decoder block (unrolled or scanned) and every
    ViT block is constrained to ``[batch over (data, fsdp), length, width]``, so FSDP shards activations too."""
    from vjax.layers.vit import ViT  # noqa: PLC0415
    from vjax.models.decoder import CausalLM, DecoderConfig  # noqa: PLC0415

    ids = jnp.zeros((4, 8), jnp.int32)
    for scan in (False, True):
        m = CausalLM(DecoderConfig.tiny(scan_layers=scan, num_layers=3))
        p = jax.eval_shape(lambda: nn.meta.unbox(m.init(jax.random.key(0), ids)))
        found = _constraints(lambda p: m.apply(p, ids).logits, p)
        assert found == ["P(('data', 'fsdp'), None, None)"] * (1 if scan else 3), (scan, found)
    vit = ViT(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=7)
    x = jnp.zeros((4, 14, 14, 3))
    p = jax.eval_shape(lambda: nn.meta.unbox(vit.init(jax.random.key(0), x)))
    assert _constraints(lambda p: vit.apply(p, x).last, p) == ["P(('data', 'fsdp'), None, None)"] * 2
