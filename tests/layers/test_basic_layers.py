"""Shared layers: numerics vs the PyTorch definitions, logical axes, the NNX bridge."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers import LlamaConfig

from vjax.layers.attention import Attention, dot_product_attention, make_attention_mask
from vjax.layers.mlp import GatedMlp, Mlp
from vjax.layers.norm import LayerNorm, RMSNorm
from vjax.layers.rope import rope_inv_freq
from vjax.models.decoder import CausalLM, DecoderConfig


def test_llama3_inv_freq_matches_transformers():
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=params)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(128, 500000.0, params)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    assert not np.allclose(ours, rope_inv_freq(128, 500000.0))  # the scaling did something


def test_gqa_equals_repeated_kv_mha():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32)
    mask = make_attention_mask(jnp.ones((2, 7)), 5, query_offset=2)
    gqa = dot_product_attention(q, k, v, mask)
    # reference: plain softmax attention with each kv head repeated for its 3 query heads
    kr, vr = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
    logits = np.einsum("blhd,bshd->bhls", q, kr) / np.sqrt(8)
    logits = np.where(np.asarray(mask), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(gqa, np.einsum("bhls,bshd->blhd", p, vr), atol=1e-5)


def test_rmsnorm_matches_llama_definition():
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    w = np.random.default_rng(2).normal(size=(16,)).astype(np.float32)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(16, eps=1e-5)
    ref.weight.data = torch.tensor(w)
    ours = RMSNorm(1e-5).apply({"params": {"scale": w}}, x)
    np.testing.assert_allclose(ours, ref(torch.tensor(x)).detach().numpy(), atol=1e-6)


def test_every_decoder_parameter_has_logical_axes():
    m = CausalLM(DecoderConfig.tiny())
    boxed = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)


LAYERS = {
    "rmsnorm": (lambda: RMSNorm(1e-6), lambda x: dict(x=x)),
    "layernorm": (lambda: LayerNorm(1e-5), lambda x: dict(x=x)),
    "gated_mlp": (lambda: GatedMlp(16, 24), lambda x: dict(x=x)),
    "mlp": (lambda: Mlp(16, 24, "quick_gelu"), lambda x: dict(x=x)),
    "attention": (lambda: Attention(4, 2, 4), lambda x: dict(x=x, mask=make_attention_mask(jnp.ones((2, 3)), 3))),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_nnx_bridge(name):
    """NNX users can import every public layer: ToNNX output equals the Linen apply."""
    make, inputs = LAYERS[name]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 16)), jnp.float32)
    kw = inputs(x)
    with nnx.use_eager_sharding(False):  # logical names need a mesh + rules to shard eagerly
        bridged = nnx.bridge.ToNNX(make(), rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(bridged, **kw)
    out_nnx = bridged(**kw)
    variables = jax.tree_util.tree_leaves(nnx.state(bridged, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert all(len(v.get_metadata()["out_sharding"]) == v.get_value().ndim for v in variables)  # logical axes survive
    params = nn.meta.unbox(nnx.to_pure_dict(nnx.state(bridged, nnx.Param)))
    out_linen = make().apply({"params": params}, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(out_nnx), jax.tree_util.tree_leaves(out_linen)):
        np.testing.assert_allclose(a, b, atol=1e-6)
