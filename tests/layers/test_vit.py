"""The ViT building blocks: learned bias_kv attention vs torch, packing helpers, logical axes, NNX bridge."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from vjax.layers.attention import Attention
from vjax.layers.vit import ViT, grid_positions_2d, grid_segment_ids, segment_mask
from vjax.models.encoders import Encoder, EncoderConfig, TOWERS


def test_bias_kv_attention_matches_torch_multihead_attention():
    """``Attention(bias_kv=True)`` == ``torch.nn.MultiheadAttention(add_bias_kv=True)``, with a padding mask."""
    d, h, b, l = 16, 4, 2, 5
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(d, h, bias=True, add_bias_kv=True, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_bias.normal_(0, 0.1)
        ref.out_proj.bias.normal_(0, 0.1)
    x = torch.randn(b, l, d)
    pad = torch.tensor([[False] * l, [False] * 3 + [True] * 2])  # torch: True = ignore this key
    with torch.no_grad():
        want = ref(x, x, x, key_padding_mask=pad, need_weights=False)[0].numpy()
    w, bias = ref.in_proj_weight.detach().numpy(), ref.in_proj_bias.detach().numpy()
    params = {"bias_k": ref.bias_k.detach().numpy().reshape(d), "bias_v": ref.bias_v.detach().numpy().reshape(d),
              "o_proj": {"kernel": ref.out_proj.weight.detach().numpy().T, "bias": ref.out_proj.bias.detach().numpy()}}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        params[name] = {"kernel": w[i * d:(i + 1) * d].T, "bias": bias[i * d:(i + 1) * d]}
    attn = Attention(h, h, d // h, qkv_bias=True, out_bias=True, bias_kv=True)
    mask = jnp.asarray(~pad.numpy())[:, None, None, :]  # [B, 1, 1, S], True = attend
    got, _ = attn.apply({"params": params}, jnp.asarray(x.numpy()), mask=mask)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # without bias_kv nothing changes in the parameter tree (default off)
    plain = Attention(h, h, d // h, qkv_bias=True).init(jax.random.key(0), jnp.zeros((1, 2, d)))["params"]
    assert "bias_k" not in plain and "bias_v" not in plain


def test_packing_helpers():
    grid = [[1, 2, 4], [2, 2, 2]]
    seg = grid_segment_ids(grid)
    assert seg.tolist() == [0] * 8 + [1] * 4 + [2] * 4  # the video's two temporal slices are separate
    pos = grid_positions_2d(grid)
    # merge-block order: each run of 4 is one 2x2 block; positions repeat per temporal slice
    assert pos[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert pos[4:8].tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    assert pos[8:12].tolist() == pos[12:16].tolist()
    m = np.asarray(segment_mask(jnp.asarray(np.append(seg, -1))[None]))[0, 0]
    assert m[:8, :8].all() and not m[:8, 8:].any() and not m[-1].any()


def test_every_encoder_parameter_has_logical_axes():
    for tower in TOWERS:
        m = Encoder(EncoderConfig.tiny(tower))
        boxed = jax.eval_shape(lambda: m.init(jax.random.key(0), **m.example_inputs()))["params"]  # noqa: B023
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves), tower
        assert all(len(x.names) == x.value.ndim for x in leaves), tower


def test_vit_nnx_bridge():
    """NNX users can import the ViT: ToNNX output equals the Linen apply."""
    make = lambda: ViT(width=16, depth=2, num_heads=4, mlp_dim=32, patch_size=4, num_positions=5)  # noqa: E731
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    with nnx.use_eager_sharding(False):
        bridged = nnx.bridge.ToNNX(make(), rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(bridged, x)
    out_nnx = bridged(x).last
    params = nn.meta.unbox(nnx.to_pure_dict(nnx.state(bridged, nnx.Param)))
    out_linen = make().apply({"params": params}, x).last
    np.testing.assert_allclose(out_nnx, out_linen, atol=1e-6)
