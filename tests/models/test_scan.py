"""Scanned layers (``scan_layers``) equal the unrolled ones, and every remat policy gives the same gradients.

Decoder (LLaMA block and CogVLM's visual-expert block): logits, every hidden state, gradients, the KV cache
and greedy generation. ViT towers: CLIP with ``num_blocks`` (penultimate features), Qwen2-VL's masked tower.
Conversion: a tiny transformers Llama loaded straight into the scanned layout, and exported back. One video
LLM end to end with both its LLM and its tower scanned. Tolerance, float32: max |Δ| <= 1e-6 * max(1, max |x|)
per array (per parameter for gradients): XLA fuses a scan body and an unrolled layer differently, so a few ulp
of difference are expected (1.2e-6 was seen on a normalised hidden state of magnitude ~2).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import vjax
from vjax.generate import generate
from vjax.layers import scan as scan_lib
from vjax.layers.visual_expert import VisualExpertConfig, vision_expert_mask
from vjax.models import registry
from vjax.models.decoder import CausalLM, DecoderConfig, cache_length, default_position_ids
from vjax.layers.vit import ViT
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.pretrained import abstract_params, with_layer_layout
from vjax.pytree import flatten_params

from tests.hf_models import tiny_hf_model
from tests.models.tiny import random_params

TOL = 1e-6
B, L, N_LAYERS = 2, 9, 3

DECODERS = {
    "llama": DecoderConfig.tiny(num_layers=N_LAYERS),
    "visual_expert": DecoderConfig.from_expert_config(VisualExpertConfig.tiny(num_layers=N_LAYERS)),
}


def assert_close(got, want, tol=TOL, what=""):
    """``max |got - want| <= tol * max(1, max |want|)``."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shapes {got.shape} vs {want.shape}"
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max |Δ| = {err:.2e} (scale {scale:.2e})"


def assert_trees_close(got, want, tol=TOL, what=""):
    """Every leaf of ``got`` within ``tol * max(1, max|want|)`` of ``want`` (trees in the unrolled layout)."""
    got, want = flatten_params(got), flatten_params(want)
    assert sorted(got) == sorted(want), what
    for k in want:
        assert_close(got[k], want[k], tol, what + k)


@functools.lru_cache(maxsize=None)
def decoder_pair(kind: str):
    """(unrolled module, scanned module, unrolled params, the same params stacked, inputs)."""
    cfg = DECODERS[kind]
    unrolled, scanned = CausalLM(cfg), CausalLM(cfg.replace(scan_layers=True))
    params = random_params(unrolled, seed=1)
    stacked = with_layer_layout(params, scanned)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[1, :3] = 0  # left padding
    inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    if cfg.visual_experts:
        types = np.zeros((B, L), np.int32)
        types[:, 2:7] = 1  # an image run in the middle
        inputs["vision"] = vision_expert_mask(jnp.asarray(types))
    return unrolled, scanned, params, stacked, inputs


def _loss(module, params, inputs, weights):
    return jnp.sum(module.apply({"params": params}, **inputs).logits * weights) / weights.size


def test_stacked_params_are_named_layers_with_a_leading_layer_axis():
    unrolled, scanned, params, stacked, _ = decoder_pair("llama")
    assert "layers" in stacked and not any(k.startswith("layers_") for k in stacked)
    assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape == (N_LAYERS, 64, 128)
    boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    assert boxed["layers"]["self_attn"]["q_proj"]["kernel"].names == ("layers", "embed", "heads")


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_decoder_scanned_equals_unrolled(kind):
    unrolled, scanned, params, stacked, inputs = decoder_pair(kind)
    a = unrolled.apply({"params": params}, **inputs, return_hidden=True)
    b = scanned.apply({"params": stacked}, **inputs, return_hidden=True)
    assert_close(b.logits, a.logits)
    assert len(b.hidden_states) == len(a.hidden_states) == N_LAYERS + 1
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states)):
        assert_close(x, y, what=f"hidden state {i}")
    weights = jax.random.normal(jax.random.key(3), a.logits.shape)
    grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
    ga, gb = grad(unrolled, params, inputs, weights), grad(scanned, stacked, inputs, weights)
    assert_trees_close(scan_lib.unstack_all(gb), ga, what=f"{kind} grad ")


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_decoder_cache_and_generation_scanned_equal_unrolled(kind):
    unrolled, scanned, params, stacked, inputs = decoder_pair(kind)
    cu, cs = unrolled.init_cache(B, L + 4), scanned.init_cache(B, L + 4)
    assert isinstance(cu, list) and set(cs) == {"k", "v"} and cs["k"].shape == (N_LAYERS, B, L + 4, 2, 16)
    assert cache_length(cu) == cache_length(cs) == L + 4
    mask = jnp.pad(inputs["attention_mask"], ((0, 0), (0, 4)), constant_values=1)
    kw = {**inputs, "attention_mask": mask}
    a = unrolled.apply({"params": params}, **kw, cache=cu)
    b = scanned.apply({"params": stacked}, **kw, cache=cs)
    assert_close(b.logits, a.logits)
    assert_close(b.cache["k"], np.stack([c["k"] for c in a.cache]))
    assert_close(b.cache["v"], np.stack([c["v"] for c in a.cache]))
    extra = {"prefill_inputs": {"vision": inputs["vision"]}} if "vision" in inputs else {}
    ga = generate(unrolled, params, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=6, **extra)
    gb = generate(scanned, stacked, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=6, **extra)
    np.testing.assert_array_equal(np.asarray(gb.tokens), np.asarray(ga.tokens))


def test_every_remat_policy_gives_the_gradients_of_none():
    _, _, params, _, inputs = decoder_pair("llama")
    weights = jax.random.normal(jax.random.key(4), (B, L, DECODERS["llama"].vocab_size))
    cfg = DECODERS["llama"]
    want = jax.grad(_loss, argnums=1)(CausalLM(cfg), params, inputs, weights)
    runs = [dict(scan_layers=True, remat_policy=policy) for policy in scan_lib.REMAT_POLICIES]
    runs += [dict(remat=True), dict(remat_policy="dots_saveable")]  # the unrolled block; remat=True is "full"
    for fields in runs:
        module = CausalLM(cfg.replace(**fields))
        p = with_layer_layout(params, module)
        got = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)(module, p, inputs, weights)
        assert_trees_close(scan_lib.unstack_all(got), want, what=f"{fields}: ")


def test_bad_remat_policy_is_named():
    with pytest.raises(ValueError, match="'everything'.*dots_saveable"):
        DecoderConfig.tiny(remat_policy="everything")
    with pytest.raises(ValueError, match="'dots'"):
        EncoderConfig.tiny("clip", remat_policy="dots")
    with pytest.raises(ValueError, match="'some'"):
        scan_lib.remat_block(CausalLM, "some")


def test_offload_without_pinned_host_names_the_backend(monkeypatch):
    monkeypatch.setattr(scan_lib, "has_pinned_host", lambda device=None: False)
    with pytest.raises(ValueError, match=f"offload.*{jax.default_backend()}"):
        scan_lib.checkpoint_policy("offload")
    with pytest.raises(ValueError, match=f"'full_offload'.*{jax.default_backend()}.*use 'full'"):
        scan_lib.checkpoint_policy("full_offload")


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_gradients_in_place_equal_those_of_the_unrolled_decoder(kind):
    """``grads_in_place`` (the scanned stack's backward pass writes each layer's gradients over its weights:
    :func:`vjax.layers.scan.scan_grads_in_place`) gives the logits and the gradients of the unrolled decoder without
    remat, with ``full`` and, where this backend has pinned host memory, ``full_offload``; the LLaMA block also with
    its MLP over 3 pieces of the 9-token sequence (``mlp_chunks``)."""
    unrolled, _, params, _, inputs = decoder_pair(kind)
    weights = jax.random.normal(jax.random.key(5), (B, L, DECODERS[kind].vocab_size))
    want = jax.grad(_loss, argnums=1)(unrolled, params, inputs, weights)
    logits = unrolled.apply({"params": params}, **inputs).logits
    runs = [dict(remat_policy="full")] + ([dict(remat_policy="full_offload")] if scan_lib.has_pinned_host() else [])
    if kind == "llama":
        runs.append(dict(remat_policy="full", mlp_chunks=3))
    for fields in runs:
        module = CausalLM(DECODERS[kind].replace(scan_layers=True, grads_in_place=True, **fields))
        p = with_layer_layout(params, module)
        assert_close(module.apply({"params": p}, **inputs).logits, logits, what=f"{fields} logits")
        got = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)(module, p, inputs, weights)
        assert_trees_close(scan_lib.unstack_all(got), want, what=f"{kind} {fields}: ")
        # the rule really runs: the gradient program updates the stacked carry in place, and no remat'd scan of the
        # blocks is left (with mlp_chunks, each MLP piece is rematerialised)
        text = str(jax.make_jaxpr(jax.grad(_loss, argnums=1), static_argnums=0)(module, p, inputs, weights))
        assert "dynamic_update_slice" in text and ("remat" not in text or "mlp_chunks" in fields), fields


def test_mlp_chunks_equal_the_whole_sequence_and_decode_one_token_whole():
    """``mlp_chunks``: the MLP over pieces of the sequence gives the whole-sequence logits and gradients; a length
    that does not split (one-token decoding from a cache) runs whole, with the same parameters."""
    unrolled, scanned, params, stacked, inputs = decoder_pair("llama")
    weights = jax.random.normal(jax.random.key(6), (B, L, DECODERS["llama"].vocab_size))
    chunked = CausalLM(DECODERS["llama"].replace(mlp_chunks=3))
    assert_close(chunked.apply({"params": params}, **inputs).logits, unrolled.apply({"params": params}, **inputs).logits)
    grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
    assert_trees_close(grad(chunked, params, inputs, weights), grad(unrolled, params, inputs, weights), what="chunks ")
    a = generate(unrolled, params, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=4)
    b = generate(chunked, params, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    assert jax.tree_util.tree_structure(chunked.init(jax.random.key(0), inputs["input_ids"])) == \
        jax.tree_util.tree_structure(unrolled.init(jax.random.key(0), inputs["input_ids"]))


def test_bad_in_place_and_chunk_settings_are_named():
    with pytest.raises(ValueError, match="grads_in_place=True needs scan_layers=True"):
        DecoderConfig.tiny(grads_in_place=True, remat_policy="full")
    with pytest.raises(ValueError, match="remat_policy='dots_saveable'"):
        DecoderConfig.tiny(grads_in_place=True, scan_layers=True, remat_policy="dots_saveable")
    with pytest.raises(ValueError, match="remat_policy='none'"):
        DecoderConfig.tiny(grads_in_place=True, scan_layers=True)
    assert DecoderConfig.tiny(grads_in_place=True, scan_layers=True, remat=True).grads_in_place  # remat=True: full
    with pytest.raises(ValueError, match="mlp_chunks=0"):
        DecoderConfig.tiny(mlp_chunks=0)


# ----------------------------------------------------------------------------- ViT towers
def _tower_pair(config: EncoderConfig):
    unrolled, scanned = Encoder(config), Encoder(config.replace(scan_layers=True, remat_policy="full"))
    params = random_params(unrolled, seed=2)
    return unrolled, scanned, params, with_layer_layout(params, scanned)


def test_clip_tower_scanned_equals_unrolled_with_num_blocks():
    cfg = EncoderConfig.tiny("clip", depth=3)
    unrolled, scanned, params, stacked = _tower_pair(cfg)
    assert stacked["vit"]["blocks"]["attn"]["q_proj"]["kernel"].shape[0] == 3
    x = jax.random.normal(jax.random.key(5), (2, 28, 28, 3))
    a = unrolled.apply({"params": params}, x)  # feature_layer -2: the first 2 of 3 blocks run
    b = scanned.apply({"params": stacked}, x)
    assert_close(b.features, a.features)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for x_, y_ in zip(b.hidden_states, a.hidden_states):
        assert_close(x_, y_)
    weights = jax.random.normal(jax.random.key(6), a.features.shape)

    def loss(m, p):
        return jnp.sum(m.apply({"params": p}, x).features * weights)

    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    ga, gb = grad(unrolled, params), grad(scanned, stacked)
    assert_trees_close(scan_lib.unstack_all(gb), ga, what="clip grad ")
    assert not np.any(flatten_params(ga)["vit/blocks_2/mlp/fc1/kernel"])  # the last block did not run


def test_vit_trunk_scanned_equals_unrolled_for_every_num_blocks():
    kw = dict(width=32, depth=3, num_heads=4, mlp_dim=64, patch_size=14, num_positions=5, pre_norm=True,
              post_norm=True)
    unrolled, scanned = ViT(**kw), ViT(**kw, scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable")
    x = jax.random.normal(jax.random.key(11), (2, 28, 28, 3))
    params = nn.meta.unbox(unrolled.init(jax.random.key(3), x))["params"]
    stacked = scan_lib.stack_layers(params, "blocks", 3)
    for nb in (0, 1, 3):  # no block, the first, all (then post_norm too)
        a = unrolled.apply({"params": params}, x, num_blocks=nb)
        b = scanned.apply({"params": stacked}, x, num_blocks=nb)
        assert_close(b.last, a.last, what=f"num_blocks={nb}")
        assert len(b.hidden_states) == len(a.hidden_states) == nb + 1
        for x_, y_ in zip(b.hidden_states, a.hidden_states):
            assert_close(x_, y_, what=f"num_blocks={nb} hidden")


def test_qwen2_vl_masked_tower_scanned_equals_unrolled():
    cfg = EncoderConfig.tiny("qwen2_vl")
    unrolled, scanned, params, stacked = _tower_pair(cfg)
    grid = np.array([[1, 2, 2], [2, 2, 4]])  # two items: the block-diagonal mask matters
    n = int(sum(t * h * w for t, h, w in grid))
    x = jax.random.normal(jax.random.key(7), (n, 3 * 2 * 14 * 14))
    a = unrolled.apply({"params": params}, x, grid)
    b = scanned.apply({"params": stacked}, x, grid)
    assert_close(b.features, a.features)
    for x_, y_ in zip(b.hidden_states, a.hidden_states):
        assert_close(x_, y_)


# ----------------------------------------------------------------------------- conversion
def test_transformers_llama_loads_into_the_scanned_layout_and_exports_back(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    module, params = vjax.from_pretrained(tmp_path / "src", scan_layers=True)
    assert module.config.scan_layers and "layers" in params
    ids = np.random.default_rng(8).integers(3, hf.config.vocab_size, (B, L))
    mask = np.ones((B, L), np.int64)
    mask[0, :2] = 0
    pos = np.asarray(default_position_ids(jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    out = module.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    err = np.abs(np.asarray(out.logits) - ref)[mask.astype(bool)].max()
    assert err <= 1e-4, f"max |Δ logits| = {err}"  # the decoder's parity tolerance with transformers
    # export of the scanned model = the released tensors, bit for bit
    d = vjax.export_hf(tmp_path / "hf", module, params)
    from vjax.convert import open_checkpoint  # noqa: PLC0415

    back = open_checkpoint(d)
    sd = hf.state_dict()
    assert set(back.keys()) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back.get(k), sd[k].numpy(), err_msg=k)
    # a vjax checkpoint moves between layouts on load
    saved = vjax.save_pretrained(tmp_path / "vjax", module, params)
    m2, p2 = vjax.from_pretrained(saved, scan_layers=False)
    assert not m2.config.scan_layers and "layers_0" in p2
    assert_trees_close(p2, scan_lib.unstack_all(params), tol=0)


def test_partial_load_into_a_scanned_group_is_refused():
    from vjax.convert.decoder import decoder_table  # noqa: PLC0415
    from vjax.convert.mapping import ConversionError, convert, export  # noqa: PLC0415
    from tests.layers.golden import DictSource  # noqa: PLC0415

    unrolled, scanned, params, stacked, _ = decoder_pair("llama")
    table = decoder_table(unrolled.config)
    sd = dict(export(params, table))
    assert sorted(sd) == sorted(dict(export(stacked, table)))
    got = convert(DictSource(sd), table, abstract_params(scanned))
    assert_trees_close(got, stacked, tol=0)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"layers/mlp/up_proj/kernel: layers \[1\]"):
        convert(DictSource(sd), table, abstract_params(scanned), strict=False)


# ----------------------------------------------------------------------------- one video LLM end to end
def test_video_chatgpt_with_scanned_llm_and_tower_equals_unrolled():
    cfg_cls, mod_cls = registry.get("video_chatgpt")
    cfg = cfg_cls.tiny()
    scanned_cfg = cfg.replace(llm=cfg.llm.replace(scan_layers=True, remat_policy="dots_saveable"),
                              vision=cfg.vision.replace(scan_layers=True))
    unrolled, scanned = mod_cls(cfg), mod_cls(scanned_cfg)
    params = random_params(unrolled, seed=9)
    stacked = with_layer_layout(params, scanned)
    assert {g for g, _ in scan_lib.scanned_groups(stacked)} == {"llm/layers", "vision/vit/blocks"}
    batch = {k: np.asarray(v) for k, v in unrolled.example_batch(2).items()}
    batch["frames"] = np.random.default_rng(10).normal(size=batch["frames"].shape).astype(np.float32)
    a = unrolled.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                       frames=batch["frames"])
    b = scanned.apply({"params": stacked}, batch["input_ids"], attention_mask=batch["attention_mask"],
                      frames=batch["frames"])
    assert_close(b.logits, a.logits)
    la, ga = jax.jit(jax.value_and_grad(lambda p: unrolled.apply({"params": p}, batch, method="loss")[0]))(params)
    lb, gb = jax.jit(jax.value_and_grad(lambda p: scanned.apply({"params": p}, batch, method="loss")[0]))(stacked)
    assert abs(float(la) - float(lb)) <= TOL
    assert_trees_close(scan_lib.unstack_all(gb), ga, what="video_chatgpt grad ")
