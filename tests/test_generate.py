"""Sampling semantics of vjax.generate against transformers' logits processors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from vjax.generate import SamplingConfig, generate, select_token
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.pretrained import init_params


@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (0.5, 0), (1.0, 5), (0.7, 10)])
def test_sampling_support_matches_transformers_warpers(top_p, top_k):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    ref = torch.tensor(logits)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    allowed = np.isfinite(ref.numpy())
    cfg = SamplingConfig(temperature=1.0, top_p=top_p, top_k=top_k)
    draws = jax.vmap(lambda k: select_token(jnp.asarray(logits), k, cfg))(jax.random.split(jax.random.key(0), 400))
    seen = np.zeros_like(allowed)
    for row in range(4):
        seen[row, np.asarray(draws[:, row])] = True
    assert not (seen & ~allowed).any()  # never a token the warpers remove
    assert seen[allowed].mean() > 0.5 or allowed.sum(1).max() > 40  # and the kept ones do occur


def test_stop_tokens_pad_the_rest_and_streaming_agrees():
    m = CausalLM(DecoderConfig.tiny())
    params = init_params(m, 0)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 256, (2, 6)), jnp.int32)
    free = generate(m, params, ids, max_new_tokens=8)
    stop = int(free.tokens[0, 2])  # make the third token of row 0 a stop token
    out = generate(m, params, ids, max_new_tokens=8, eos_token_ids=(stop,), pad_token_id=0)
    row = np.asarray(out.tokens[0])
    first = int(np.argmax(row == stop))
    assert (row[first + 1:] == 0).all() and int(out.lengths[0]) == first + 1
    streamed = []
    out2 = generate(m, params, ids, max_new_tokens=8, eos_token_ids=(stop,), pad_token_id=0,
                    stream=lambda t: streamed.append(np.asarray(t)))
    np.testing.assert_array_equal(out.tokens, out2.tokens)
    np.testing.assert_array_equal(np.stack(streamed, 1), np.asarray(out.tokens)[:, : len(streamed)])


def test_bad_sampling_values_are_named():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        SamplingConfig(max_new_tokens=0)
