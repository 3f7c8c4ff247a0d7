"""int8 weight-only quantisation (``vjax.layers.quant``) and ``--quantize=int8`` on chat and eval.

What is proved: the round trip is within half a quantisation step per element; through the real models
(plain, scanned, visual experts, LoRA, tied embeddings) the int8 parameters give the logits of their own
dequantised float parameters (<= 1e-5 relative: the int8 path computes ``(x @ Q) * scale``, which equals
``x @ (Q * scale)`` up to float rounding) and differ from the float32 originals by a nonzero drift bounded
relative to the logits' spread (random N(0, 0.05) weights: max |Δ| <= 0.2 std, mean |Δ| <= 0.05 std; seen
0.04-0.10 and 0.009-0.017); greedy generation runs on them; the flag works end to end and a bad value is exit 2.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import config
from experiments.config import set_everywhere
from vjax.generate import generate
from vjax.layers import quant
from vjax.layers.lora import merge_lora
from vjax.models import registry
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.pytree import flatten_params

from tests.models.tiny import random_params
from tests import test_chat_eval_cli as cli_tests

converted = cli_tests.converted  # the module-scoped fixture: a tiny converted Chat-UniVi, its tokenizer, two clips
_run, _one_error_line = cli_tests._run, cli_tests._one_error_line

MAX_DRIFT, MEAN_DRIFT = 0.2, 0.05  # |logits(int8) - logits(f32)| / std(logits(f32)), random N(0, 0.05) weights


# ----------------------------------------------------------------------------------------- the arithmetic
@pytest.mark.parametrize("shape, axis", [((48, 24), -2), ((3, 40, 16), -2), ((30, 20), -1)],
                         ids=["kernel", "scanned_kernel", "embedding_rows"])
def test_round_trip_is_within_half_a_step_per_channel(shape, axis):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * np.linspace(0.01, 3, shape[-1])
    w[..., 0] = 0.0 if axis == -2 else w[..., 0]  # an all-zero output channel
    q, scale = quant.quantize_array(w, axis)
    assert q.dtype == jnp.int8 and q.shape == w.shape and scale.dtype == jnp.float32
    assert scale.shape == tuple(np.delete(shape, len(shape) + axis))
    assert int(jnp.max(jnp.abs(q))) == 127 and int(jnp.min(q)) >= -127
    err = np.abs(w - np.asarray(quant.dequantize_array(q, scale, axis)))
    assert np.all(err <= np.expand_dims(np.asarray(scale), axis) / 2 * (1 + 1e-6))
    q4, s4 = quant.quantize_array(w, axis, bits=4)
    assert int(jnp.max(jnp.abs(q4))) == 7 and np.all(np.abs(w - np.asarray(quant.dequantize_array(q4, s4, axis)))
                                                     <= np.expand_dims(np.asarray(s4), axis) / 2 * (1 + 1e-6))
    with pytest.raises(ValueError, match="bits"):
        quant.quantize_array(w, axis, bits=16)


def test_quantize_params_picks_kernels_and_tables_and_leaves_the_rest():
    p = {"fc": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}, "small": {"kernel": jnp.ones((4, 4))},
         "layers": {"mlp": {"kernel": jnp.ones((3, 64, 32))}}, "patch": {"kernel": jnp.ones((2, 2, 3, 256))},
         "embed": {"embedding": jnp.ones((100, 32))}, "norm": {"scale": jnp.ones(64)}}
    q = quant.quantize_params(p)
    flat = flatten_params(q)
    assert {k for k, v in flat.items() if v.dtype == jnp.int8} == {"fc/kernel", "layers/mlp/kernel",
                                                                    "embed/embedding"}
    assert flat["layers/mlp/kernel_scale"].shape == (3, 32) and flat["embed/embedding_scale"].shape == (100,)
    assert "small/kernel_scale" not in flat and "patch/kernel_scale" not in flat  # too small; a convolution
    assert quant.is_quantized(q) and not quant.is_quantized(p)
    assert "embed/embedding_scale" not in flatten_params(quant.quantize_params(p, embeddings=False))
    with pytest.raises(ValueError, match="already quantised"):
        quant.quantize_params(q)
    d = quant.dequantize_params(q)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(p)
    assert all(np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(d), jax.tree_util.tree_leaves(p)))
    # bytes: int8 weights + float32 scales against the same tree in bf16
    bf16 = quant.param_bytes(p, jnp.bfloat16)
    assert bf16 == 2 * sum(x.size for x in jax.tree_util.tree_leaves(p))
    want = 2 * (32 + 16 + 2 * 2 * 3 * 256 + 64) + 64 * 32 + 3 * 64 * 32 + 100 * 32 + 4 * (32 + 3 * 32 + 100)
    assert quant.param_bytes(q, jnp.bfloat16) == want


def test_an_int8_kernel_without_its_scale_is_refused():
    layer = quant.Dense(8, use_bias=False)
    with pytest.raises(ValueError, match="kernel_scale"):
        layer.apply({"params": {"kernel": jnp.ones((4, 8), jnp.int8)}}, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="merge LoRA before quantising"):
        merge_lora({"q": {"kernel": jnp.ones((64, 64), jnp.int8), "kernel_scale": jnp.ones(64),
                          "lora_A": jnp.ones((64, 2)), "lora_B": jnp.ones((2, 64))}}, 1.0)


# ----------------------------------------------------------------------------------------- the models
def _visual_batch(module):
    batch = {k: np.asarray(v) for k, v in module.example_batch(2).items()}
    for k, v in batch.items():
        if v.dtype == np.float32 and v.ndim >= 3:  # frames / patches / audio: random, so the towers matter
            batch[k] = np.random.default_rng(2).normal(size=v.shape).astype(np.float32)
    keys = module.example_inputs()
    return {k: batch[k] for k in keys}


MODELS = {
    "llama": lambda: CausalLM(DecoderConfig.tiny()),
    "llama_scanned_tied": lambda: CausalLM(DecoderConfig.tiny(scan_layers=True, tie_word_embeddings=True)),
    "chat_univi": lambda: _video("chat_univi"),
    "qwen2_vl_scanned": lambda: _video("qwen2_vl", scan_layers=True),
    "cogvlm2_video_experts": lambda: _video("cogvlm2_video"),
    "minigpt4_video_lora": lambda: _video("minigpt4_video"),
}


def _video(name, **fields):
    cfg_cls, mod_cls = registry.get(name)
    return mod_cls(set_everywhere(cfg_cls.tiny(), **fields))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_int8_logits_equal_their_dequantised_weights_and_drift_little_from_float32(name):
    module = MODELS[name]()
    params = random_params(module, seed=1)
    q = quant.quantize_params(params)
    kinds = {k.rsplit("/", 1)[-1] for k, v in flatten_params(q).items() if v.dtype == jnp.int8}
    assert "kernel" in kinds and "embedding" in kinds
    if isinstance(module, CausalLM):
        inputs = {"input_ids": np.random.default_rng(3).integers(0, module.config.vocab_size, (2, 9))}
    else:
        inputs = _visual_batch(module)
    logits = jax.jit(lambda p: module.apply({"params": p}, **inputs).logits)
    f32, int8, deq = (np.asarray(logits(p)) for p in (params, q, quant.dequantize_params(q)))
    assert np.abs(int8 - deq).max() <= 1e-5 * max(1.0, np.abs(deq).max())  # the int8 path is the one that ran
    drift = np.abs(int8 - f32) / f32.std()
    assert 0 < drift.mean() <= MEAN_DRIFT and drift.max() <= MAX_DRIFT, (drift.mean(), drift.max())


def test_greedy_generation_runs_on_int8_weights():
    module = CausalLM(DecoderConfig.tiny(scan_layers=True))
    params = random_params(module, seed=4, std=0.2)
    q = quant.quantize_params(params)
    ids = jnp.asarray(np.random.default_rng(5).integers(3, module.config.vocab_size, (2, 6)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :2].set(0)  # left padding
    out = generate(module, q, ids, mask, max_new_tokens=8)
    ref = generate(module, quant.dequantize_params(q), ids, mask, max_new_tokens=8)
    assert out.tokens.shape == (2, 8) and np.array_equal(out.tokens, ref.tokens)


def test_the_serving_slots_decode_int8_weights():
    from vjax.serving import SlotDecoder  # noqa: PLC0415

    module = CausalLM(DecoderConfig.tiny())
    q = quant.quantize_params(random_params(module, seed=6, std=0.2))
    prompt = [5, 6, 7, 8]
    want = generate(module, quant.dequantize_params(q), jnp.asarray([prompt], jnp.int32), max_new_tokens=5).tokens
    dec = SlotDecoder(module, q, slots=2, max_length=32, bucket=8)
    got = [dec.admit(1, prompt, max_new_tokens=5)] + [int(dec.step()[1]) for _ in range(4)]
    assert got == np.asarray(want)[0].tolist()


# ----------------------------------------------------------------------------------------- the commands
def test_chat_quantize_int8(converted):
    d, tok, env = converted
    r = _run("chat", [f"--workdir={d / 'ckpt'}", f"--tokenizer={tok}", "--quantize=int8", f"--video={d / 'a.mp4'}",
                      "--question=What colour is the circle?", "--max_new_tokens=4"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "weights: int8" in r.stderr and r.stdout.endswith("\n")


def test_eval_quantize_int8_is_recorded_in_its_report(converted, tmp_path):
    d, tok, env = converted
    common = [f"--workdir={d / 'ckpt'}", f"--tokenizer={tok}", "--quantize=int8"]
    mv = [{"video": "a.mp4", "question": "What colour is the circle?", "candidates": ["red", "blue"],
           "answer": "blue", "question_type": "colour"}]
    (tmp_path / "mv.json").write_text(json.dumps(mv))
    r = _run("eval", [*common, f"--data={tmp_path / 'mv.json'}", f"--video_root={d}", "--max_new_tokens=3",
                      "--noprogress", "--batch_size=1"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((d / "ckpt" / "eval" / "mv_int8.json").read_text())
    assert rep["quantize"] == "int8" and rep["evaluated"] == 1


def test_a_bad_quantize_value_is_one_line_and_exit_2(converted, tmp_path):
    d, tok, env = converted
    r = _run("chat", [f"--workdir={d / 'ckpt'}", f"--tokenizer={tok}", f"--video={d / 'a.mp4'}", "--quantize=int4",
                      "--question=hi"], env)
    _one_error_line(r, "--quantize", "int8")
    with pytest.raises(config.ConfigError, match="quantize"):  # the API, before anything loads
        config.load_run(d / "ckpt", tokenizer=tok, quantize="int4")


def test_the_weights_of_a_published_variant_halve_under_int8():
    from experiments import weights  # noqa: PLC0415

    row = weights.weight_memory("qwen2_vl:2b")  # jax.eval_shape only: no weights allocated
    assert row["parameters"] == 2_208_985_600 and row["bf16"] >= 2 * row["parameters"]
    assert 0.5 <= row["int8"] / row["bf16"] <= 0.505 and row["float_left"] < 0.002 * row["parameters"]
    assert "| `qwen2_vl:2b` | 2,208,985,600 | 4.11 GiB | 2.06 GiB | 0.502 |" in weights.table([row])
