"""CogVLM visual expert against the official CogVLM2 remote code (golden ``cogvlm_visual_expert``):
expert routing, position ids, RoPE, one decoder layer, and the tiny end-to-end language model (from its
``inputs_embeds``), left padding, KV-cache decoding, one compilation for any token-type layout, NNX bridge.
Tolerance: max |Δ| <= 1e-4 in float32 (README: float32 drift of the official code <= 9e-6)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vjax.convert import convert
from vjax.convert.visual_expert import visual_expert_layer_rules, visual_expert_lm_table
from vjax.layers.attention import make_attention_mask
from vjax.layers.norm import rms_norm
from vjax.layers.rope import apply_rotary_pos_emb, rope_cos_sin, rope_inv_freq
from vjax.layers.visual_expert import (
    VisualExpertAttention,
    VisualExpertConfig,
    VisualExpertDecoderLayer,
    VisualExpertMlp,
    build_position_ids,
    experts_from_language,
    vision_expert_mask,
)
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.pretrained import abstract_params
from vjax.pytree import flatten_params

from tests.layers.golden import DictSource, load_case, with_prefix

TOL = 1e-4
FOLDER = "cogvlm_visual_expert"


def config_of(meta) -> VisualExpertConfig:
    c = meta["config"]
    return VisualExpertConfig(vocab_size=48, hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                              num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                              num_kv_heads=c["num_multi_query_heads"], rms_norm_eps=c["rms_norm_eps"],
                              rope_theta=float(c["rope_base"]))


@pytest.mark.parametrize("case", ["decoder_layer", "full_tiny", "full_tiny_leftpad"])
def test_routing_and_position_ids_match_official(case):
    t, _ = load_case(FOLDER, case)
    types = jnp.asarray(t["in/token_type_ids"])
    mask = jnp.asarray(t.get("in/attention_mask", t.get("in/attention_mask_2d")))
    np.testing.assert_array_equal(np.asarray(jax.jit(build_position_ids)(types, mask)), t["out/position_ids"])
    if "out/vision_token_mask" in t:
        vis = np.asarray(vision_expert_mask(types))
        np.testing.assert_array_equal(vis, t["out/vision_token_mask"])
        np.testing.assert_array_equal(~vis, t["out/language_token_mask"])


def test_rotary_matches_official():
    t, meta = load_case(FOLDER, "rotary")
    inv = rope_inv_freq(meta["config"]["dim"], float(meta["config"]["base"]))
    np.testing.assert_array_equal(inv, t["param/inv_freq"])  # the checkpoint's buffer is recomputed exactly
    cos, sin = rope_cos_sin(jnp.asarray(t["in/position_ids"]), inv)  # [B, L, Dh]
    for name in ("q", "k"):
        x = jnp.asarray(t[f"in/{name}"]).transpose(0, 2, 1, 3)  # [B, H, L, Dh] -> [B, L, H, Dh]
        out = np.asarray(apply_rotary_pos_emb(x, cos, sin)).transpose(0, 2, 1, 3)
        assert np.abs(out - t[f"out/{name}"]).max() <= 1e-5


def test_decoder_layer_matches_official():
    t, meta = load_case(FOLDER, "decoder_layer")
    config = config_of(meta)
    layer = VisualExpertDecoderLayer(config)
    h = jnp.asarray(t["in/hidden_states"])
    types = jnp.asarray(t["in/token_type_ids"])
    vis = vision_expert_mask(types)
    cos, sin = rope_cos_sin(build_position_ids(types), rope_inv_freq(config.head_dim, config.rope_theta))
    expected = jax.eval_shape(lambda: nn.meta.unbox(layer.init(jax.random.key(0), h, vis, cos, sin))["params"])
    rules = visual_expert_layer_rules(config, "model.layers.0.", "")
    params = convert(DictSource(with_prefix(t, "param/")), rules, expected)
    mask = make_attention_mask(jnp.asarray(t["in/attention_mask_2d"]), h.shape[1])
    out, _ = jax.jit(layer.apply)({"params": params}, h, vis, cos, sin, mask)
    err = np.abs(np.asarray(out) - t["out/hidden_states"]).max()
    print(f"decoder layer: max |Δ hidden| = {err:.2e}")
    assert err <= TOL
    # the attention block alone (its output before the residual)
    x = rms_norm(h, params["input_layernorm"]["scale"], config.rms_norm_eps)
    attn = VisualExpertAttention(config.num_heads, config.num_kv_heads, config.head_dim)
    a, _ = attn.apply({"params": params["self_attn"]}, x, vis, cos=cos, sin=sin, mask=mask)
    assert np.abs(np.asarray(a) - t["out/self_attn_output"]).max() <= TOL
    # both experts matter: routing every token to the language expert changes the result
    all_lang, _ = layer.apply({"params": params}, h, jnp.zeros_like(vis), cos, sin, mask)
    assert np.abs(np.asarray(all_lang) - np.asarray(out)).max() > 1e-2


def lm_from_golden(case: str):
    t, meta = load_case(FOLDER, case)
    config = config_of(meta)
    lm = CausalLM(DecoderConfig.from_expert_config(config))
    sd = {k: v for k, v in with_prefix(t, "param/").items() if not k.startswith("model.vision.")}  # vision tower
    params = convert(DictSource(sd), visual_expert_lm_table(config), abstract_params(lm))
    return t, lm, params


@pytest.mark.parametrize("case", ["full_tiny", "full_tiny_leftpad"])
def test_tiny_cogvlm2_language_model_matches_official(case):
    t, lm, params = lm_from_golden(case)
    valid = t["in/attention_mask"].astype(bool)
    out = jax.jit(lambda p, e, ty, m: lm.apply({"params": p}, inputs_embeds=e, vision=vision_expert_mask(ty),
                                               position_ids=build_position_ids(ty, m), attention_mask=m,
                                               return_hidden=True))(
        params, jnp.asarray(t["out/inputs_embeds"], jnp.float32), jnp.asarray(t["in/token_type_ids"]),
        jnp.asarray(t["in/attention_mask"]))
    errs = {name: np.abs(np.asarray(got) - t[f"out/{name}"])[valid].max()
            for name, got in (("hidden_states_1", out.hidden_states[1]), ("hidden_states_2", out.hidden_states[2]),
                              ("logits", out.logits))}
    print(f"{case}: " + ", ".join(f"max |Δ {k}| = {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL
    # the text rows of inputs_embeds are the token embeddings
    text = (t["in/token_type_ids"] == 0) & valid
    emb = np.asarray(lm.apply({"params": params}, jnp.asarray(t["in/input_ids"]), method="embed"))
    np.testing.assert_allclose(emb[text], t["out/inputs_embeds"][text], atol=1e-6)


def test_cogvlm2_language_model_under_chunked_attention():
    """The visual-expert layers take the decoder's attention_impl: chunked matches the official logits."""
    t, lm, params = lm_from_golden("full_tiny_leftpad")
    lm = lm.clone(config=lm.config.replace(attention_impl="chunked"))
    assert lm.config.expert_config.attention_impl == "chunked"
    valid = t["in/attention_mask"].astype(bool)
    ty, m = jnp.asarray(t["in/token_type_ids"]), jnp.asarray(t["in/attention_mask"])
    out = lm.apply({"params": params}, inputs_embeds=jnp.asarray(t["out/inputs_embeds"], jnp.float32),
                   vision=vision_expert_mask(ty), position_ids=build_position_ids(ty, m), attention_mask=m)
    err = np.abs(np.asarray(out.logits) - t["out/logits"])[valid].max()
    print(f"full_tiny_leftpad (chunked): max |Δ logits| = {err:.2e}")
    assert err <= TOL


def test_cached_decoding_equals_full_forward_and_compiles_once():
    t, lm, params = lm_from_golden("full_tiny_leftpad")
    embeds = jnp.asarray(t["out/inputs_embeds"], jnp.float32)
    types, mask = jnp.asarray(t["in/token_type_ids"]), jnp.asarray(t["in/attention_mask"])
    pos = build_position_ids(types, mask)
    full = lm.apply({"params": params}, inputs_embeds=embeds, vision=vision_expert_mask(types), position_ids=pos,
                    attention_mask=mask).logits
    n = 9  # prefill 9 slots, then decode the last 3 one at a time
    step = jax.jit(lambda c, e, ty, p, i: lm.apply({"params": params}, inputs_embeds=e, vision=vision_expert_mask(ty),
                                                   attention_mask=mask, position_ids=p, cache=c, cache_index=i))
    out = step(lm.init_cache(2, 12), embeds[:, :n], types[:, :n], pos[:, :n], 0)
    valid = np.asarray(mask[:, :n], bool)
    assert np.abs(np.asarray(out.logits - full[:, :n]))[valid].max() <= TOL
    cache = out.cache
    for i in range(n, 12):
        out = step(cache, embeds[:, i:i + 1], types[:, i:i + 1], pos[:, i:i + 1], i)
        assert np.abs(np.asarray(out.logits[:, 0] - full[:, i])).max() <= TOL
        cache = out.cache
    assert step._cache_size() == 2  # one program for the prefill, one for every decode step


def test_one_compilation_serves_any_token_type_layout():
    t, lm, params = lm_from_golden("full_tiny")
    run = jax.jit(lambda ty: lm.apply({"params": params}, jnp.asarray(t["in/input_ids"]), vision=vision_expert_mask(ty),
                                      position_ids=build_position_ids(ty)).logits)
    a = run(jnp.asarray(t["in/token_type_ids"]))
    b = run(jnp.zeros((2, 12), jnp.int32))  # text only
    assert run._cache_size() == 1 and np.abs(np.asarray(a - b)).max() > 1e-3


def test_experts_copied_from_language_route_every_token_alike():
    """CogVLM's init (the vision experts start as the language ones, vision bias 0): a decoder whose experts were
    copied gives the same logits whether the tokens are typed vision or text; before the copy it does not."""
    lm = CausalLM(DecoderConfig.from_expert_config(VisualExpertConfig.tiny()))
    ids = jnp.arange(10, dtype=jnp.int32)[None] % 50
    params = lm.init(jax.random.key(3), ids)["params"]
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), params)  # biases != 0

    def logits(p, vision):
        return np.asarray(lm.apply({"params": p}, ids, vision=jnp.full(ids.shape, vision)).logits)

    assert np.abs(logits(params, True) - logits(params, False)).max() > 1e-2
    copied = experts_from_language(params)
    np.testing.assert_allclose(logits(copied, True), logits(copied, False), rtol=0, atol=1e-6)
    flat, before = flatten_params(copied), flatten_params(params)
    assert {k for k in flat if flat[k] is not before[k]} == {k for k in flat if "/vision_" in k}
    with pytest.raises(ValueError, match=r"vision_q_proj/kernel has shapes \(2, 2\) but language_q_proj/kernel \(2, 3\)"):
        experts_from_language({"language_q_proj": {"kernel": jnp.ones((2, 3))},
                               "vision_q_proj": {"kernel": jnp.ones((2, 2))}})


def test_parameters_carry_logical_axes():
    lm = CausalLM(DecoderConfig.from_expert_config(VisualExpertConfig.tiny()))
    boxed = jax.eval_shape(lambda: lm.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                                           vision=jnp.array([[True, True]])))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)
    layer = boxed["layers_0"]["self_attn"]
    assert "bias" in layer["vision_q_proj"] and "bias" not in layer["language_q_proj"]


def _nnx_cases():
    types = jnp.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    vis = vision_expert_mask(types)
    cfg = VisualExpertConfig.tiny(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48)
    cos, sin = rope_cos_sin(build_position_ids(types), rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    mask = make_attention_mask(jnp.ones((2, 5)), 5)
    return {
        "attention": (lambda: VisualExpertAttention(4, 2, 8),
                      lambda x: dict(x=x, vision=vis, cos=cos, sin=sin, mask=mask)),
        "mlp": (lambda: VisualExpertMlp(32, 48), lambda x: dict(x=x, vision=vis)),
        "decoder_layer": (lambda: VisualExpertDecoderLayer(cfg), lambda x: dict(h=x, vision=vis, cos=cos, sin=sin)),
    }


@pytest.mark.parametrize("name", ["attention", "mlp", "decoder_layer"])
def test_nnx_bridge(name):
    make, inputs = _nnx_cases()[name]
    kw = inputs(jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 32)), jnp.float32))
    with nnx.use_eager_sharding(False):
        bridged = nnx.bridge.ToNNX(make(), rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(bridged, **kw)
    out_nnx = bridged(**kw)
    params = nn.meta.unbox(nnx.to_pure_dict(nnx.state(bridged, nnx.Param)))
    out_linen = make().apply({"params": params}, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(out_nnx), jax.tree_util.tree_leaves(out_linen)):
        np.testing.assert_allclose(a, b, atol=1e-6)
