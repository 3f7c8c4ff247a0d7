"""``vjax.generate.ChatSession`` (multi-turn decoding over one KV cache) against ``generate`` run afresh on
the whole conversation, and MA-LMM's streaming encoder against its whole-clip encoder.

Greedy tokens must be identical: the session writes only the new text of each turn (bucket-padded) at the
right positions — M-RoPE offsets after a Qwen2-VL video, CogVLM's shared vision positions — and rewinds
to the longest common prefix when a later prompt re-tokenises the previous answer differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vjax.generate import ChatSession, ContextOverflow, generate
from vjax.models import registry
from vjax.models.ma_lmm import MALMM, MALMMConfig
from vjax.models.video_llm import VISUAL_KEYS

from tests.models.tiny import random_params

NEW = 6


def _model(name):
    cfg_cls, module_cls = registry.get(name)
    module = module_cls(cfg_cls.tiny())
    return module, random_params(module, seed=1, std=0.2)


def _visual(module):
    b = module.example_batch(1)
    rng = np.random.default_rng(0)
    vis = {k: b[k] for k in VISUAL_KEYS if k in b}
    vis["frames"] = jnp.asarray(rng.normal(size=vis["frames"].shape), jnp.float32)
    return b["input_ids"][0].tolist(), vis


def _fresh(module, params, ids, vis):
    out = generate(module, params, jnp.asarray([ids], jnp.int32), prefill_inputs=vis, max_new_tokens=NEW)
    return np.asarray(out.tokens[0]).tolist()


# Qwen2-VL (M-RoPE: text after the video continues from a compressed position), CogVLM2-Video (shared
# vision positions), MA-LMM (visual tokens first); the plain case runs in tests/train/test_train_cli.py.
@pytest.mark.parametrize("name", ["qwen2_vl", "cogvlm2_video", "ma_lmm"])
def test_multi_turn_session_equals_fresh_generation(name):
    module, params = _model(name)
    prompt, vis = _visual(module)
    placeholder = module.config.video_token_id if name == "qwen2_vl" else module.config.placeholder_id
    session = ChatSession(module, params, max_length=len(prompt) + 80, visual_ids=[placeholder], bucket=8)

    first = session.respond(prompt, prefill_inputs=vis, max_new_tokens=NEW)
    assert first == _fresh(module, params, prompt, vis)

    # turn 2: the answer as the template would render it, then a new question (a multiple of no bucket)
    turn2 = prompt + first + [21, 23, 27, 29, 31]  # no placeholder id among them
    second = session.respond(turn2, prefill_inputs=vis, max_new_tokens=NEW)
    assert second == _fresh(module, params, turn2, vis)
    assert session.ids[: len(turn2)] == turn2
    assert placeholder not in first + second  # (a generated placeholder would be spliced by the fresh run)

    # turn 3 re-tokenises the last answer (its final token differs): the cache is rewound to the common prefix
    turn3 = turn2 + second[:-1] + [(second[-1] + 1) % 40 + 20, 33, 35]
    third = session.respond(turn3, prefill_inputs=vis, max_new_tokens=NEW)
    assert third == _fresh(module, params, turn3, vis)


def test_context_overflow_is_refused_and_changes_nothing():
    module, params = _model("chat_univi")
    prompt, vis = _visual(module)
    session = ChatSession(module, params, max_length=len(prompt) + NEW, visual_ids=[module.config.placeholder_id])
    with pytest.raises(ContextOverflow, match="more than the context"):
        session.respond(prompt + [5], prefill_inputs=vis, max_new_tokens=NEW)
    assert session.cache is None
    assert session.respond(prompt, prefill_inputs=vis, max_new_tokens=NEW) == _fresh(module, params, prompt, vis)


def test_ma_lmm_streaming_equals_the_whole_clip(chunk=3):
    """7 frames fed 3 at a time (the last chunk has 1 real frame and 2 padding frames) give the whole-clip
    encoder's visual tokens."""
    cfg = MALMMConfig.tiny(num_frames=7, memory_bank_length=3)
    module = MALMM(cfg)
    params = random_params(module, seed=2, std=0.2)
    b = module.example_batch(1)
    frames = jnp.asarray(np.random.default_rng(3).normal(size=b["frames"].shape), jnp.float32)
    q, qm = b["qformer_input_ids"], b["qformer_attention_mask"]
    encode = jax.jit(lambda f, m: module.apply({"params": params}, f, m, q, qm, method="encode"))  # not op by op
    whole = encode(frames, b["frame_mask"])

    state = module.apply({"params": params}, 1, q.shape[1], method="stream_init")
    step = jax.jit(lambda s, f, m: module.apply({"params": params}, s, f, m, q, qm, method="stream_step"))
    t = cfg.num_frames
    for s in range(0, t, chunk):
        part = frames[:, s: s + chunk]
        n = part.shape[1]
        pad = jnp.concatenate([part, jnp.repeat(part[:, -1:], chunk - n, axis=1)], axis=1)
        state, tokens = step(state, pad, jnp.arange(chunk)[None] < n)
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(whole), atol=1e-5, rtol=0)
    assert int(state.frame_index[0]) == t


def test_text_only_session_and_a_missing_video():
    from vjax.models.decoder import CausalLM, DecoderConfig  # noqa: PLC0415

    module = CausalLM(DecoderConfig.tiny())
    params = random_params(module, seed=4, std=0.2)
    ids = [1, 25, 29, 33, 37]
    assert ChatSession(module, params, 64).respond(ids, max_new_tokens=NEW) == _fresh(module, params, ids, {})
    with pytest.raises(ValueError, match="needs the visual inputs"):
        ChatSession(module, params, 64, visual_ids=[29]).respond(ids, max_new_tokens=NEW)
