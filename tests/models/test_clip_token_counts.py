"""Models whose visual token count depends on the clip (the release's rules, derived from its code):

* Chat-UniVi (``ChatUniVi/model/arch.py``): a run of 1-2 image tokens is projected as images (112 tokens
  each at the released size), 3 or more as a video (112 per event, ``ceil(T / 16)`` events), by the clip's
  real frame count;
* Video-ChatGPT (``get_spatio_temporal_features_torch``): temporal tokens are padded to 100 only below 100
  frames; with more, one per frame.

A batch mixes clips of different real lengths: each row, given its own number of placeholders, must equal
the row run alone; a row given more placeholders than it has tokens must equal the exact prompt (the extra
slots hidden), in a forward pass, in generation and in a chat session."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.tiny import random_params
from vjax.generate import ChatSession, generate
from vjax.models.chat_univi import ChatUniVi, ChatUniViConfig
from vjax.models.video_chatgpt import VideoChatGPT, VideoChatGPTConfig

NEW = 6
TOL = 1e-4  # float32 logits of order 1-4: batch and padding change the summation order (seen: 1.3e-5)


def _prompt(n_visual: int, pid: int, text=(31, 32, 33, 34)) -> list[int]:
    return [1, 30] + [pid] * n_visual + list(text)


def _frames(t: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(t, size, size, 3)).astype(np.float32)


def _right_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def _clip_batch(clips: list[np.ndarray], t: int) -> tuple[np.ndarray, np.ndarray]:
    """Clips padded to ``t`` frames by repeating the last one (as the data pipeline does), and the mask."""
    frames = np.stack([np.concatenate([c, np.repeat(c[-1:], t - len(c), axis=0)]) for c in clips])
    return frames, np.arange(t)[None, :] < np.array([len(c) for c in clips])[:, None]


CASES = {
    # 5 frames per batch: 5 real (video: one event), 2 (two images), 1 (an image)
    "chat_univi": (ChatUniVi(ChatUniViConfig.tiny(num_frames=5)), (5, 2, 1)),
    # num_temporal 4, 6 frames per batch: 6 real (6 temporal tokens), 3 (padded to 4)
    "video_chatgpt": (VideoChatGPT(VideoChatGPTConfig.tiny(num_frames=6, num_temporal=4)), (6, 3)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    module, lengths = CASES[request.param]
    params = random_params(module, seed=3, std=0.2)
    c = module.config
    size = c.vision.image_size
    clips = [_frames(t, size, seed=i) for i, t in enumerate(lengths)]
    counts = [c.visual_tokens_for(t) for t in lengths]
    return request.param, module, params, clips, counts


def test_token_counts_follow_the_release(case):
    name, module, _, _, counts = case
    c = module.config
    if name == "chat_univi":  # tiny clusters (8, 4, 2): 14 tokens per event or per image
        assert counts == [14, 28, 14] and c.max_visual_tokens == 28 and c.num_visual_tokens == 14
        assert ChatUniViConfig.chat_univi_7b().visual_tokens_for(2) == 224
        assert ChatUniViConfig.chat_univi_7b().visual_tokens_for(40) == 3 * 112
    else:  # 4 temporal tokens at least, one per frame beyond; 4 patches (tiny CLIP grid 2 x 2)
        assert c.num_patches == 4 and counts == [6 + 4, 4 + 4] and c.max_visual_tokens == 10
        assert VideoChatGPTConfig.video_chatgpt_7b().visual_tokens_for(120) == 120 + 256


def test_each_row_of_a_mixed_batch_equals_the_row_alone(case):
    name, module, params, clips, counts = case
    pid, t = module.config.placeholder_id, len(clips[0])
    frames, frame_mask = _clip_batch(clips, t)
    ids, mask = _right_pad([_prompt(n, pid) for n in counts])
    fwd = jax.jit(lambda i, m, f, fm: module.apply({"params": params}, i, attention_mask=m, frames=f, frame_mask=fm))
    out = fwd(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(frames), jnp.asarray(frame_mask)).logits
    for b, (clip, n) in enumerate(zip(clips, counts)):
        one = jnp.asarray([_prompt(n, pid)])
        alone = fwd(one, jnp.ones_like(one), jnp.asarray(clip)[None], jnp.ones((1, len(clip)), bool)).logits
        got = np.asarray(out[b, : n + 6])
        np.testing.assert_allclose(got, np.asarray(alone[0]), atol=TOL, err_msg=f"{name} row {b}")


def test_extra_placeholders_are_hidden_in_forward_generate_and_chat(case):
    """Every row given the batch's largest count of placeholders: the extra ones are hidden from attention
    and positions, so logits after the visual block, greedy generation and a chat session all equal the
    exact prompt's."""
    name, module, params, clips, counts = case
    pid, t = module.config.placeholder_id, len(clips[0])
    most = module.config.max_visual_tokens
    short = int(np.argmin(counts))
    clip, n = clips[short], counts[short]
    assert n < most
    padded_clip, clip_mask = _clip_batch([clip], t)
    vis = {"frames": jnp.asarray(padded_clip), "frame_mask": jnp.asarray(clip_mask)}
    exact, loose = _prompt(n, pid), _prompt(most, pid)
    fwd = jax.jit(lambda i, v: module.apply({"params": params}, i, **v))  # one compile per prompt, not op by op
    a, b = fwd(jnp.asarray([exact]), vis), fwd(jnp.asarray([loose]), vis)
    np.testing.assert_allclose(np.asarray(b.logits[0, -4:]), np.asarray(a.logits[0, -4:]), atol=TOL)
    assert b.attention_mask is not None and int(b.attention_mask.sum()) == len(exact)
    want = generate(module, params, jnp.asarray([exact]), prefill_inputs=vis, max_new_tokens=NEW)
    got = generate(module, params, jnp.asarray([loose]), prefill_inputs=vis, max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    session = ChatSession(module, params, max_length=len(loose) + 40, visual_ids=[pid], bucket=8)
    first = session.respond(loose, prefill_inputs=vis, max_new_tokens=NEW)
    assert first == np.asarray(want.tokens[0]).tolist()[: len(first)]
    turn2_exact, turn2_loose = exact + first + [35, 36, 37], loose + first + [35, 36, 37]
    fresh = generate(module, params, jnp.asarray([turn2_exact]), prefill_inputs=vis, max_new_tokens=NEW)
    second = session.respond(turn2_loose, prefill_inputs=vis, max_new_tokens=NEW)
    assert second == np.asarray(fresh.tokens[0]).tolist()[: len(second)]


def test_chat_univi_merge_noise():
    """"none" is deterministic; "release" draws U[0, 1) * 1e-6 density noise from the "merge" stream: with
    20 frames the temporal clustering has k = 1 (every density ties at 1), so the noise alone decides the
    two events — different keys give different tokens; without a "merge" stream a fixed key is used."""
    with pytest.raises(ValueError, match="merge_noise='torch' is not one of"):
        ChatUniViConfig.tiny(merge_noise="torch")
    feats = jnp.asarray(np.random.default_rng(0).normal(size=(1, 20, 16, 8)), jnp.float32)
    det = ChatUniVi(ChatUniViConfig.tiny(num_frames=20))
    rel = ChatUniVi(ChatUniViConfig.tiny(num_frames=20, merge_noise="release"))
    merge = lambda m, **kw: np.asarray(m.apply({}, feats, None, method=ChatUniVi.merge, **kw)[0])  # noqa: E731
    np.testing.assert_array_equal(merge(det), merge(det))
    draws = [merge(rel, rngs={"merge": jax.random.key(s)}) for s in range(4)]
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    np.testing.assert_array_equal(draws[0], merge(rel, rngs={"merge": jax.random.key(0)}))
    np.testing.assert_array_equal(merge(rel), merge(rel))  # no stream: one fixed draw
