"""Decoder parity with transformers (LLaMA, Llama-3 rope scaling, Mistral sliding window, Qwen2),
KV-cache generation, export round trip. Tolerance: max |Δ logits| <= 1e-4 in float32."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import vjax
from vjax.generate import generate
from vjax.models.decoder import DecoderConfig, default_position_ids

from tests.hf_models import FAMILIES, tiny_hf_model

TOL = 1e-4
B, L = 3, 12
PADS = (0, 3, 5)  # left padding per row


def padded_batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(B, L)).astype(np.int64)
    mask = np.ones((B, L), np.int64)
    for r, n in enumerate(PADS):
        ids[r, :n] = 0
        mask[r, :n] = 0
    return ids, mask


_CONVERTED: dict = {}


def convert_family(family: str, tmp_path_factory):
    """Save the tiny HF model sharded, convert the directory with vjax (once per family)."""
    if family not in _CONVERTED:
        hf = tiny_hf_model(family)
        d = tmp_path_factory.mktemp(family)
        hf.save_pretrained(d, max_shard_size="60KB")
        _CONVERTED[family] = (family, hf, d, *vjax.from_pretrained(d))
    return _CONVERTED[family]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    return convert_family(request.param, tmp_path_factory)


def test_checkpoint_is_sharded(converted):
    _, _, d, _, _ = converted
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2


@pytest.mark.parametrize("impl", ["auto", "chunked", "cudnn"])  # auto = the einsum reference on a CPU
def test_logits_match_transformers_on_padded_batch(converted, impl):
    family, hf, _, module, params = converted
    module = module.clone(config=module.config.replace(attention_impl=impl))
    ids, mask = padded_batch(hf.config.vocab_size)
    pos = np.asarray(default_position_ids(jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    out = module.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    valid = mask.astype(bool)
    err = np.abs(np.asarray(out.logits) - ref)[valid].max()
    print(f"{family} ({impl}): max |Δ logits| = {err:.2e}")
    assert err <= TOL, f"{family} ({impl}): max |Δ logits| = {err}"


def test_sliding_window_matters_for_mistral(tmp_path_factory):
    _, hf, _, module, params = convert_family("mistral", tmp_path_factory)
    ids, mask = padded_batch(hf.config.vocab_size)
    full = module.clone(config=module.config.replace(sliding_window=None))
    a = module.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    b = full.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    assert float(jnp.abs(a - b).max()) > 1e-3  # the window changes the result at L=12 > W=4


def test_greedy_generation_matches_transformers(converted):
    family, hf, _, module, params = converted
    ids, mask = padded_batch(hf.config.vocab_size, seed=1)
    n = 24
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    ref_new = ref[:, L:].numpy()
    out = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=n,
                   eos_token_ids=(2,), pad_token_id=0)
    got = np.asarray(out.tokens)[:, : ref_new.shape[1]]
    np.testing.assert_array_equal(got, ref_new)
    if ref_new.shape[1] < n:  # transformers stops when every row is done; we pad the rest
        assert (np.asarray(out.tokens)[:, ref_new.shape[1]:] == 0).all()


def test_cached_decode_equals_full_forward(converted):
    """Every step of the cached decode gives the logits of a full forward over the sequence so far."""
    family, hf, _, module, params = converted
    ids, mask = padded_batch(hf.config.vocab_size, seed=2)
    n = 6
    out = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=n)
    seq = np.concatenate([ids, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones((B, n), np.int64)], axis=1)
    full = module.apply({"params": params}, input_ids=jnp.asarray(seq), attention_mask=jnp.asarray(full_mask)).logits
    # replay the cached path step by step and compare each step's logits
    cache = module.init_cache(B, L + n)
    step = module.apply({"params": params}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(full_mask),
                        cache=cache, cache_index=0)
    np.testing.assert_allclose(step.logits[:, -1], full[:, L - 1], atol=TOL)
    cache, pos = step.cache, step.next_position
    for t in range(n - 1):
        step = module.apply({"params": params}, input_ids=jnp.asarray(seq[:, L + t : L + t + 1]),
                            attention_mask=jnp.asarray(full_mask), position_ids=pos[:, None],
                            cache=cache, cache_index=L + t)
        np.testing.assert_allclose(step.logits[:, 0], full[:, L + t], atol=TOL, err_msg=f"step {t}")
        cache, pos = step.cache, step.next_position


def test_export_round_trip(converted, tmp_path):
    family, hf, _, module, params = converted
    out_dir = vjax.export_hf(tmp_path / "hf", module, params, max_shard_bytes=60_000)
    cls = FAMILIES[family][1]
    reloaded = cls.from_pretrained(out_dir, attn_implementation="eager").eval()
    ids, mask = padded_batch(hf.config.vocab_size, seed=3)
    pos = torch.tensor(np.asarray(default_position_ids(jnp.asarray(mask))))
    with torch.no_grad():
        a = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos).logits
        b = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos).logits
    valid = torch.tensor(mask).bool()
    assert float((a - b).abs()[valid].max()) <= TOL
    # and back into vjax: the same parameters
    _, params2 = vjax.from_pretrained(out_dir)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_attention_impl_is_validated_and_stays_out_of_config_json():
    with pytest.raises(ValueError, match="'flash'"):
        DecoderConfig.tiny(attention_impl="flash")
    config = DecoderConfig.tiny(attention_impl="chunked", visual_experts=True)
    assert config.expert_config.attention_impl == "chunked"
    assert DecoderConfig.from_expert_config(config.expert_config).attention_impl == "chunked"
    hf = config.to_hf()
    assert "attention_impl" not in hf and DecoderConfig.from_hf(hf).attention_impl == "auto"
