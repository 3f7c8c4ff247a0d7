"""LoRA: the layer's formula, zero-initialised B leaves the base model unchanged (bitwise), merged weights give
the LoRA model's logits, logical axes, and the decoder switch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vjax.layers.attention import Attention
from vjax.layers.lora import LoRADense, merge_lora
from vjax.layers.mlp import dense
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.pytree import flatten_params


def test_formula_and_zero_b_equals_dense():
    layer = LoRADense(6, ("embed", "heads"), rank=3, alpha=12.0, use_bias=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 8)), jnp.float32)
    params = nn.meta.unbox(layer.init(jax.random.key(0), x))["params"]
    assert not np.asarray(params["lora_B"]).any() and np.asarray(params["lora_A"]).std() > 0
    bound = 1 / np.sqrt(8)  # PEFT's Kaiming-uniform(a = sqrt 5) bound for A
    assert np.abs(np.asarray(params["lora_A"])).max() <= bound
    base = {"kernel": params["kernel"], "bias": params["bias"] + 0.3}
    plain = dense(6, ("embed", "heads"), use_bias=True).apply({"params": base}, x)
    np.testing.assert_array_equal(layer.apply({"params": {**params, "bias": base["bias"]}}, x), plain)
    rng = np.random.default_rng(1)
    params = {**params, "lora_B": jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)}
    xs, w, b, a, bb = (np.asarray(v, np.float64) for v in (x, params["kernel"], params["bias"], params["lora_A"],
                                                             params["lora_B"]))
    ref = xs @ w + b + (12.0 / 3) * (xs @ a) @ bb
    np.testing.assert_allclose(layer.apply({"params": params}, x), ref, atol=1e-5)


def test_logical_axes():
    att = Attention(4, 2, 8, lora_rank=2, lora_alpha=4.0, lora_targets=("q_proj", "v_proj"))
    boxed = jax.eval_shape(lambda: att.init(jax.random.key(0), jnp.ones((1, 3, 16))))["params"]
    assert boxed["q_proj"]["lora_A"].names == ("embed", None)
    assert boxed["q_proj"]["lora_B"].names == (None, "heads")
    assert boxed["v_proj"]["lora_B"].names == (None, "kv_heads") and boxed["v_proj"]["lora_B"].value.shape == (2, 16)
    assert "lora_A" not in boxed["k_proj"] and "lora_A" not in boxed["o_proj"]


def _ids():
    return jnp.asarray(np.random.default_rng(2).integers(3, 200, size=(2, 9)), jnp.int32)


def test_decoder_zero_b_is_base_model_and_merge_matches():
    cfg = DecoderConfig.tiny(lora_rank=4, lora_alpha=16.0)
    lora_lm, base_lm = CausalLM(cfg), CausalLM(cfg.replace(lora_rank=0))
    ids = _ids()
    params = nn.meta.unbox(jax.jit(lambda: lora_lm.init(jax.random.key(0), ids))())["params"]
    flat = flatten_params(params)
    assert sorted(k for k in flat if "lora" in k) == sorted(
        f"layers_{i}/self_attn/{p}/lora_{ab}" for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB")
    # freshly initialised adapters (B = 0): exactly the base model
    base_params = merge_lora(params, cfg)
    out_lora = jax.jit(lora_lm.apply)({"params": params}, ids).logits
    out_base = jax.jit(base_lm.apply)({"params": base_params}, ids).logits
    np.testing.assert_array_equal(out_lora, out_base)
    # trained adapters: merged weights W + (alpha / r) A B give the same logits
    rng = np.random.default_rng(3)
    trained = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.2 * rng.normal(size=x.shape).astype(np.float32)
        if "lora_B" in jax.tree_util.keystr(path) else x, params)
    merged = merge_lora(trained, cfg)
    a = jax.jit(lora_lm.apply)({"params": trained}, ids).logits
    b = jax.jit(base_lm.apply)({"params": merged}, ids).logits
    assert np.abs(np.asarray(a - out_lora)).max() > 1e-3  # the adapters matter
    err = np.abs(np.asarray(a - b)).max()
    print(f"LoRA merged vs unmerged: max |Δ logits| = {err:.2e}")
    assert err <= 1e-5
    q = trained["layers_0"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(merged["layers_0"]["self_attn"]["q_proj"]["kernel"],
                               q["kernel"] + 4.0 * np.asarray(q["lora_A"]) @ np.asarray(q["lora_B"]), atol=1e-6)


def test_nnx_bridge():
    """NNX users can import the layer: ToNNX output equals the Linen apply; logical axes survive."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 16)), jnp.float32)
    make = lambda: LoRADense(8, ("embed", "heads"), rank=2, alpha=4.0, use_bias=True)  # noqa: E731
    with nnx.use_eager_sharding(False):
        bridged = nnx.bridge.ToNNX(make(), rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(bridged, x)
    variables = jax.tree_util.tree_leaves(nnx.state(bridged, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert all(len(v.get_metadata()["out_sharding"]) == v.get_value().ndim for v in variables)
    params = nn.meta.unbox(nnx.to_pure_dict(nnx.state(bridged, nnx.Param)))
    np.testing.assert_allclose(bridged(x), make().apply({"params": params}, x), atol=1e-6)
