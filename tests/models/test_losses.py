"""The next-token loss against an independent formula (optax's integer-label cross-entropy on the sliced,
shifted logits), and the LM head on the supervised positions only (``loss_positions``): the same loss and
the same gradients as logits everywhere, for the decoder and for a video LLM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.models.tiny import loss_and_grad, random_params
from vjax.data.pipeline import BucketPadBatch, loss_positions
from vjax.models import registry
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.losses import (LOGITS_CHUNK_BYTES, head_cross_entropy, next_token_head_loss, next_token_loss,
                                 shifted_targets)
from vjax.pytree import flatten_params

TOL = 1e-6  # float32, the same sums in another order


def _reference(logits, ids, mask):
    """Mean cross-entropy of ``logits[:, :-1]`` against ``ids[:, 1:]`` over ``mask[:, 1:]`` and argmax accuracy."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    m = mask[:, 1:].astype(np.float32)
    n = max(m.sum(), 1.0)
    acc = ((np.argmax(logits[:, :-1], -1) == ids[:, 1:]) * m).sum() / n
    return float((ce * m).sum() / n), float(acc)


def _case(seed=0, b=3, length=12, vocab=50):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, length, vocab)).astype(np.float32) * 3
    ids = rng.integers(0, vocab, (b, length)).astype(np.int32)
    mask = (rng.random((b, length)) < 0.4).astype(np.int32)
    mask[:, -1] = 1  # the last token as a target: its logit is at L - 2
    return logits, ids, mask


def test_loss_accuracy_and_gradient_equal_the_reference():
    logits, ids, mask = _case()
    loss, metrics = next_token_loss(jnp.asarray(logits), ids, mask)
    ref_loss, ref_acc = _reference(logits, ids, mask)
    assert abs(float(loss) - ref_loss) <= TOL * max(1, ref_loss)
    assert float(metrics["token_accuracy"]) == ref_acc and float(metrics["num_targets"]) == mask[:, 1:].sum()
    g = jax.grad(lambda z: next_token_loss(z, ids, mask)[0])(jnp.asarray(logits))
    g_ref = jax.grad(lambda z: _ref_jnp(z, ids, mask))(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-7)


def _ref_jnp(z, ids, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(z[:, :-1], ids[:, 1:])
    m = mask[:, 1:].astype(jnp.float32)
    return (ce * m).sum() / jnp.maximum(m.sum(), 1.0)


def test_logits_at_the_supervised_positions_give_the_same_loss():
    logits, ids, mask = _case(seed=1)
    pos = loss_positions(mask, 9)  # padded with L - 1
    at = np.take_along_axis(logits, pos[..., None], axis=1)
    full, m_full = next_token_loss(jnp.asarray(logits), ids, mask)
    part, m_part = next_token_loss(jnp.asarray(at), ids, mask, jnp.asarray(pos))
    assert abs(float(full) - float(part)) <= TOL
    assert float(m_full["num_targets"]) == float(m_part["num_targets"])
    assert float(m_full["token_accuracy"]) == float(m_part["token_accuracy"])


def test_the_batch_carries_loss_positions_in_a_bucket():
    elements = [{"input_ids": np.arange(6), "loss_mask": np.array([0, 0, 0, 1, 1, 1])},
                {"input_ids": np.arange(4), "loss_mask": np.array([0, 1, 0, 1])}]
    batch = BucketPadBatch({"input_ids": (8,), "loss_mask": (8,)}, loss_position_buckets=(2, 4))(elements)
    assert batch["loss_positions"].tolist() == [[2, 3, 4, 7], [0, 2, 7, 7]]  # 3 targets -> bucket 4
    assert BucketPadBatch({"input_ids": (8,), "loss_mask": (8,)}, loss_position_buckets=(2,))(
        elements)["loss_positions"].shape == (2, 8)  # no bucket holds 3: every position
    try:
        loss_positions(np.array([[0, 1, 1]]), 1)
    except ValueError as err:
        assert "2 supervised tokens, more than the 1 loss positions" in str(err)
    else:
        raise AssertionError("too few positions must raise")


def _same_loss_and_grads(module, params, batch):
    loss, grads = loss_and_grad(module, params, batch)
    mask = np.asarray(batch["loss_mask"])
    pos = loss_positions(mask, int((mask[:, 1:] != 0).sum(1).max()) + 1)
    loss_p, grads_p = loss_and_grad(module, params, {**batch, "loss_positions": pos})
    assert pos.shape[1] < mask.shape[1]
    assert abs(loss - loss_p) <= 1e-6 * max(1, abs(loss)), (loss, loss_p)
    for k in grads:
        np.testing.assert_allclose(grads_p[k], grads[k], atol=1e-6, rtol=1e-5, err_msg=k)


def test_decoder_loss_with_the_head_on_supervised_positions_only():
    module = CausalLM(DecoderConfig.tiny())
    params = random_params(module, seed=2)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, module.config.vocab_size, (2, 16)).astype(np.int32)
    mask = np.zeros_like(ids)
    mask[0, 10:], mask[1, 5:9] = 1, 1
    _same_loss_and_grads(module, params, {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask})


def test_video_llm_loss_with_the_head_on_supervised_positions_only():
    cfg_cls, mod_cls = registry.get("video_chatgpt")
    module = mod_cls(cfg_cls.tiny())
    params = random_params(module, seed=4)
    batch = {k: np.asarray(v) for k, v in module.example_batch(2).items()}
    batch["frames"] = np.random.default_rng(5).normal(size=batch["frames"].shape).astype(np.float32)
    _same_loss_and_grads(module, params, batch)


# ----------------------------------------------------------------- the LM head fused with the loss
def _head_case(seed=6, b=3, length=10, d=16, vocab=50):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, length, d)).astype(np.float32)
    kernel = rng.normal(size=(d, vocab)).astype(np.float32)
    ids = rng.integers(0, vocab, (b, length)).astype(np.int32)
    mask = (rng.random((b, length)) < 0.5).astype(np.int32)
    return h, kernel, ids, mask


@pytest.mark.parametrize("chunk_bytes", [LOGITS_CHUNK_BYTES, 4 * 50 * 7])  # one chunk; 5 chunks of 7 rows (+ 5 pad)
def test_the_fused_head_loss_equals_the_reference_on_the_logits(chunk_bytes):
    h, kernel, ids, mask = _head_case()

    def fused(h, kernel):
        return next_token_head_loss(h, kernel, ids, mask, chunk_bytes=chunk_bytes)

    loss, metrics = jax.jit(fused)(h, kernel)
    ref_loss, ref_acc = _reference(np.einsum("bld,dv->blv", h, kernel), ids, mask)
    assert abs(float(loss) - ref_loss) <= TOL * max(1, ref_loss)
    assert float(metrics["token_accuracy"]) == ref_acc and float(metrics["num_targets"]) == mask[:, 1:].sum()
    grads = jax.jit(jax.grad(lambda h, k: fused(h, k)[0], argnums=(0, 1)))(h, kernel)
    grads_ref = jax.grad(lambda h, k: _ref_jnp(jnp.einsum("bld,dv->blv", h, k), ids, mask), argnums=(0, 1))(h, kernel)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-6, rtol=1e-5)


def test_the_fused_head_loss_differentiates_the_weights_and_checks_shapes():
    h, kernel, ids, mask = _head_case(seed=7)
    targets, weights = shifted_targets(jnp.asarray(ids), jnp.asarray(mask))
    dw = jax.grad(lambda w: head_cross_entropy(h, kernel, targets, w)[0])(weights)
    logits = jnp.einsum("bld,dv->blv", h, kernel)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # d(sum w nll)/dw = nll
    np.testing.assert_allclose(np.asarray(dw), np.asarray(nll), atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match=r"kernel \(17, 50\)"):
        head_cross_entropy(h, np.zeros((17, 50), np.float32), targets, weights)
    with pytest.raises(ValueError, match=r"targets \(3, 9\)"):
        head_cross_entropy(h, kernel, targets[:, 1:], weights)


def test_the_fused_head_loss_in_bfloat16_matches_the_dense_head():
    h, kernel, ids, mask = _head_case(seed=8)
    hb, kb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(kernel)  # bf16 activations, f32 master kernel

    def dense_path(h, k):  # what nn.Dense(dtype=bfloat16) + next_token_loss compute
        return next_token_loss((h @ k.astype(jnp.bfloat16)).astype(jnp.float32), ids, mask)[0]

    def fused(h, k):
        return next_token_head_loss(h, k, ids, mask, dtype=jnp.bfloat16)[0]

    (l1, g1), (l2, g2) = (jax.value_and_grad(f, argnums=(0, 1))(hb, kb) for f in (dense_path, fused))
    assert abs(float(l1) - float(l2)) <= 1e-5 * max(1.0, abs(float(l1)))  # the same bf16 logits, f32 softmax
    assert g2[0].dtype == jnp.bfloat16 and g2[1].dtype == jnp.float32
    for a, b in zip(g1, g2):  # bf16 rounding of the products (one fused f32 accumulation against two casts)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_the_decoder_loss_uses_the_fused_head_with_the_same_loss_and_gradients(tied):
    module = CausalLM(DecoderConfig.tiny(tie_word_embeddings=tied))
    params = random_params(module, seed=9)
    rng = np.random.default_rng(10)
    ids = rng.integers(0, module.config.vocab_size, (2, 16)).astype(np.int32)
    mask = np.zeros_like(ids)
    mask[0, 3:], mask[1, 7:12] = 1, 1
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask}

    def through_logits(p):  # the head applied, then the loss on its logits
        return next_token_loss(module.apply({"params": p}, ids).logits, ids, mask)[0]

    loss, grads = loss_and_grad(module, params, batch)
    ref, grads_ref = jax.value_and_grad(through_logits)(params)
    assert abs(loss - float(ref)) <= 1e-6 * max(1, abs(loss))
    for k, g in flatten_params(grads_ref).items():
        np.testing.assert_allclose(grads[k], np.asarray(g), atol=1e-6, rtol=1e-5, err_msg=k)
    head_input = module.apply({"params": params}, ids, head=False)
    assert head_input.logits is None and head_input.head_input.shape == (2, 16, module.config.hidden_size)


@pytest.mark.parametrize("chunk_bytes", [LOGITS_CHUNK_BYTES, 4 * 50 * 7])
def test_a_frozen_head_costs_no_weight_gradient_matmul(chunk_bytes):
    """The kernel's gradient is computed in the forward rule; where nobody asks for it (a frozen LLM in an alignment
    stage) XLA removes its matmul, in one chunk and inside the chunk loop."""
    h, kernel, ids, mask = _head_case(seed=11)

    def loss(h, k):
        return next_token_head_loss(h, k, ids, mask, chunk_bytes=chunk_bytes)[0]

    only_h = jax.jit(jax.grad(loss)).lower(h, kernel).compile().as_text()
    both = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, kernel).compile().as_text()
    assert (only_h.count(" dot("), both.count(" dot(")) == (2, 3)  # logits, dh (, dkernel)
