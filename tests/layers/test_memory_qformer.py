"""MA-LMM Q-Former with visual and query memory banks against the official code run frame by frame
(golden ``ma_lmm_memory/case_qformer_*``); one compiled scan for a 100-frame clip; bounded banks;
streaming ``step`` equals the scan; NNX bridge. Tolerance: max |Δ| <= 1e-4 in float32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vjax.convert import convert
from vjax.convert.qformer import qformer_lavis_table
from vjax.layers.qformer import MemoryQFormer, QFormerConfig
from vjax.pretrained import abstract_params

from tests.layers.golden import DictSource, load_case, with_prefix

TOL = 1e-4


def golden_model(case: str):
    t, meta = load_case("ma_lmm_memory", case)
    c = meta["config"]
    config = QFormerConfig(hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                           num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                           encoder_width=c["encoder_width"], cross_attention_freq=c["cross_attention_freq"],
                           num_query_tokens=c["num_query_tokens"], text_input=meta["with_text"],
                           vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"],
                           layer_norm_eps=c["layer_norm_eps"])
    module = MemoryQFormer(config, memory_bank_length=c["memory_bank_length"],
                           num_frame_positions=t["param/image_pe.weight"].shape[0])
    table = qformer_lavis_table(config, image_pe="image_pe.weight")
    params = convert(DictSource(with_prefix(t, "param/")), table, abstract_params(module))
    text = {}
    if meta["with_text"]:
        text = dict(input_ids=jnp.asarray(t["in/input_ids"]), text_mask=jnp.asarray(t["in/text_attention_mask"]))
    return t, meta, module, params, text


@pytest.mark.parametrize("case", ["qformer_text", "qformer_notext"])
def test_scan_matches_official_every_frame(case):
    t, meta, module, params, text = golden_model(case)
    frames = jnp.asarray(t["in/frame_embeds"])  # [B, T, N, E]
    hidden, state = jax.jit(module.apply)({"params": params}, frames, **text)
    errs = [np.abs(np.asarray(hidden[:, s]) - t[f"out/step{s}/last_hidden_state"]).max()
            for s in range(frames.shape[1])]
    print(f"{case}: max |Δ| per frame = {[f'{e:.1e}' for e in errs]}")
    assert max(errs) <= TOL
    q = module.config.num_query_tokens
    assert np.abs(np.asarray(hidden[:, -1, :q]) - t["out/final_query_output"]).max() <= TOL
    assert state.visual.length.tolist() == [module.memory_bank_length] * frames.shape[0]


@pytest.mark.parametrize("case", ["qformer_text", "qformer_notext"])
def test_streaming_steps_match_official_banks(case):
    """``init_state`` + ``step``: outputs and bank contents (values and merge counts) after every frame."""
    t, meta, module, params, text = golden_model(case)
    frames = np.asarray(t["in/frame_embeds"])
    b, n_frames, n_tok = frames.shape[:3]
    lt = text["input_ids"].shape[1] if text else 0
    state = module.init_state(b, n_tok, text_len=lt)
    step = jax.jit(lambda p, s, f: module.apply({"params": p}, s, f, **text, method="step"))
    for s in range(n_frames):
        state, out = step(params, state, jnp.asarray(frames[:, s]))
        assert np.abs(np.asarray(out) - t[f"out/step{s}/last_hidden_state"]).max() <= TOL
        if s == n_frames - 1:
            break  # the official model drops its banks after the last frame
        ref_v = t[f"out/step{s}/visual_memory_bank"]
        n = ref_v.shape[1]
        assert state.visual.length.tolist() == [n] * b
        np.testing.assert_allclose(np.asarray(state.visual.tokens[:, :n]), ref_v, atol=TOL)
        np.testing.assert_array_equal(np.asarray(state.visual.counts[:, :n]), t[f"out/step{s}/visual_compression_size"])
        for layer in range(module.config.num_layers):
            bank = state.query[layer]
            ref_q = t[f"out/step{s}/layer{layer}/query_memory_bank"]
            np.testing.assert_allclose(np.asarray(bank.tokens[:, :n]), ref_q, atol=TOL)
            # Merge counts are compared where the stored entries of a token differ between frames. Where
            # they are all equal (every token of layer 0, and the text tokens of layer 1, whose inputs do not
            # depend on the video yet) all similarities tie and the official argmax is rounding noise.
            distinct = np.abs(ref_q - ref_q[:, :1]).max(axis=(1, 3)) > 1e-6  # [B, Q+Lt]
            ref_c = t[f"out/step{s}/layer{layer}/query_compression_size"]
            got_c = np.asarray(bank.counts[:, :n])
            np.testing.assert_array_equal(np.where(distinct[:, None], got_c, 0), np.where(distinct[:, None], ref_c, 0))
            if n >= 2 and (layer >= 2 or (layer == 1 and not text)):
                assert distinct.all()


def small_module(length: int):
    cfg = QFormerConfig.tiny(hidden_size=16, num_heads=2, intermediate_size=24, encoder_width=12, num_query_tokens=4,
                             text_input=True, vocab_size=20, max_position_embeddings=8)
    return MemoryQFormer(cfg, memory_bank_length=length, num_frame_positions=128)


@pytest.fixture(scope="module")
def small_params():
    """Random parameters of ``small_module`` (any bank length), frame positions non-zero."""
    module = small_module(1)
    params = jax.jit(module.init)(jax.random.key(0), **module.example_inputs())["params"]
    leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(params))
    noise = np.random.default_rng(0)
    return jax.tree_util.tree_unflatten(tree, [x + 0.1 * noise.normal(size=x.shape).astype(np.float32) for x in leaves])


def test_100_frames_compile_once_and_banks_stay_bounded(small_params):
    module = small_module(length=4)
    ids, mask = jnp.array([[3, 4, 5], [6, 7, 0]]), jnp.array([[1, 1, 1], [1, 1, 0]])
    traces = []

    def run(p, frames):
        traces.append(frames.shape)
        return module.apply({"params": p}, frames, input_ids=ids, text_mask=mask)

    jitted = jax.jit(run)
    frames = jnp.asarray(np.random.default_rng(0).normal(size=(2, 100, 3, 12)), jnp.float32)
    hidden, state = jitted(small_params, frames)
    hidden2, _ = jitted(small_params, frames + 1.0)
    assert len(traces) == 1 and jitted._cache_size() == 1  # one trace, one compilation for both clips
    assert hidden.shape == (2, 100, 4 + 3, 16) and np.isfinite(np.asarray(hidden)).all()
    assert not np.allclose(hidden, hidden2)
    # the frame loop is a single scan: the program does not grow with the number of frames
    n_eqns = [len(jax.make_jaxpr(run)(small_params, frames[:, :t]).eqns) for t in (3, 100)]
    assert n_eqns[0] == n_eqns[1]
    # every bank holds at most memory_bank_length entries, and its counts account for all 100 frames
    for bank in (state.visual, *state.query):
        assert bank.tokens.shape[1] == 4 and bank.length.tolist() == [4, 4]
        np.testing.assert_allclose(np.asarray(bank.counts.sum(axis=1)), 100.0)
    assert state.frame_index.tolist() == [100, 100]


def test_streaming_equals_scan_and_bank_length_never_exceeds_limit(small_params):
    module = small_module(length=3)
    params = {"params": small_params}
    frames = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 3, 12)), jnp.float32)
    ids = jnp.array([[3, 4], [6, 7]])
    apply = jax.jit(module.apply)
    hidden, _ = apply(params, frames, input_ids=ids)
    state = module.init_state(2, 3, text_len=2)
    step = jax.jit(lambda s, f: module.apply(params, s, f, input_ids=ids, method="step"))
    for s in range(7):
        state, out = step(state, frames[:, s])
        lengths = [int(x) for bank in (state.visual, *state.query) for x in bank.length]
        assert max(lengths) == min(s + 1, 3)
        np.testing.assert_allclose(out, hidden[:, s], atol=1e-5)
    # a scan continues from a streamed state
    h_cont, _ = apply(params, frames[:, 7:], input_ids=ids, state=state)
    np.testing.assert_allclose(h_cont, hidden[:, 7:], atol=1e-5)


def test_padding_frames_leave_banks_and_output_unchanged(small_params):
    module = small_module(length=2)
    params = {"params": small_params}
    frames = jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 3, 12)), jnp.float32)
    valid = jnp.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0]], bool)  # sample 1: frames 0, 2, 3 are real
    hidden, state = jax.jit(module.apply)(params, frames, frame_valid=valid)
    short, short_state = jax.jit(module.apply)(params, frames[1:, jnp.array([0, 2, 3])])
    np.testing.assert_allclose(hidden[1, -1], short[0, -1], atol=1e-5)
    np.testing.assert_allclose(state.visual.tokens[1], short_state.visual.tokens[0], atol=1e-6)
    assert state.frame_index.tolist() == [6, 3]


def test_nnx_bridge():
    module = small_module(length=1)
    kw = dict(frames=jnp.asarray(np.random.default_rng(4).normal(size=(2, 2, 3, 12)), jnp.float32),
              input_ids=jnp.array([[3, 4], [5, 0]]), text_mask=jnp.array([[1, 1], [1, 0]]))
    with nnx.use_eager_sharding(False):
        bridged = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0))
        nnx.bridge.lazy_init(bridged, **kw)
    out_nnx, _ = bridged(**kw)
    params = nn.meta.unbox(nnx.to_pure_dict(nnx.state(bridged, nnx.Param)))
    out_linen, _ = module.apply({"params": params}, **kw)
    np.testing.assert_allclose(out_nnx, out_linen, atol=1e-6)
