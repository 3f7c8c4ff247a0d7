"""The decoder's checkpoint layouts at the published sizes, and loud failures on bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

import vjax
from vjax.convert import CheckpointError, ConversionError, UnsafeCheckpointError, open_checkpoint
from vjax.convert.decoder import decoder_table
from vjax.convert.io import SafetensorsSource, save_safetensors
from vjax.convert.mapping import export_plan, flatten_params, plan_conversion
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.pretrained import abstract_params

from tests.hf_models import tiny_hf_model

# The LLMs of the seven video models, as their HF config.json files give them, and the parameter
# count each release states (HF model cards / safetensors index totals).
PUBLISHED = {
    "llama2_7b": (transformers.LlamaConfig, dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                  max_position_embeddings=4096), 6_738_415_616),
    "vicuna_7b": (transformers.LlamaConfig, dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                  max_position_embeddings=2048), 6_738_415_616),
    "llama3_8b": (transformers.LlamaConfig, dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=8192), 8_030_261_248),
    "mistral_7b_instruct_v02": (transformers.MistralConfig, dict(vocab_size=32000, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, max_position_embeddings=32768),
                  7_241_732_096),
    "qwen2_7b": (transformers.Qwen2Config, dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                  rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=32768), 7_615_616_512),
    "qwen2_1_5b": (transformers.Qwen2Config, dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                  num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                  rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=32768), 1_543_714_304),
}
MODEL_CLASSES = {transformers.LlamaConfig: transformers.LlamaForCausalLM,
                 transformers.MistralConfig: transformers.MistralForCausalLM,
                 transformers.Qwen2Config: transformers.Qwen2ForCausalLM}


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_published_layout_matches_transformers_meta_model(variant):
    cfg_cls, kw, published_count = PUBLISHED[variant]
    hf_cfg = cfg_cls(**kw)
    with torch.device("meta"):
        hf = MODEL_CLASSES[cfg_cls](hf_cfg)
    torch_shapes = {k: tuple(p.shape) for k, p in hf.named_parameters()}  # tied weights listed once

    config = getattr(DecoderConfig, variant)()
    expected = {k: tuple(v.shape) for k, v in flatten_params(abstract_params(CausalLM(config))).items()}
    table = decoder_table(config)

    plan = plan_conversion(torch_shapes, table, expected)  # torch -> vjax: every key, every shape
    assert (plan.missing, plan.unexpected, plan.mismatched) == ([], [], [])
    back = {k for k, _, _ in export_plan(list(expected), table)}  # vjax -> torch: every parameter
    assert back == set(torch_shapes)

    n_vjax = sum(int(np.prod(s)) for s in expected.values())
    assert n_vjax == sum(p.numel() for p in hf.parameters()) == published_count

    # the HF config.json of the release builds the same vjax config
    from_json = DecoderConfig.from_hf({**hf_cfg.to_dict(), "architectures": [MODEL_CLASSES[cfg_cls].__name__]})
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "resolved_head_dim", "rms_norm_eps", "rope_theta", "attention_bias", "tie_word_embeddings",
              "sliding_window", "arch")
    assert {f: getattr(from_json, f) for f in fields} == {f: getattr(config, f) for f in fields}


# ----------------------------------------------------------------------------- bad checkpoints
@pytest.fixture()
def llama_dir(tmp_path):
    d = tmp_path / "llama"
    tiny_hf_model("llama").save_pretrained(d)
    return d


def _rewrite(d, edit):
    src = SafetensorsSource([d / "model.safetensors"])
    tensors = {k: np.array(src.get(k)) for k in src.keys()}
    del src
    edit(tensors)
    save_safetensors(tensors, d / "model.safetensors")


def _count_reads(monkeypatch):
    reads = []
    orig = SafetensorsSource.get
    monkeypatch.setattr(SafetensorsSource, "get", lambda self, k: reads.append(k) or orig(self, k))
    return reads


def test_missing_tensor_is_named_and_nothing_loaded(llama_dir, monkeypatch):
    _rewrite(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    reads = _count_reads(monkeypatch)
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as e:
        vjax.from_pretrained(llama_dir)
    assert "missing 1 tensor" in str(e.value) and reads == []


def test_extra_tensor_is_named_and_nothing_loaded(llama_dir, monkeypatch):
    _rewrite(llama_dir, lambda t: t.__setitem__("model.layers.0.self_attn.extra_proj.weight", np.zeros((2, 2), np.float32)))
    reads = _count_reads(monkeypatch)
    with pytest.raises(ConversionError, match=r"unexpected.*model\.layers\.0\.self_attn\.extra_proj\.weight"):
        vjax.from_pretrained(llama_dir)
    assert reads == []


def test_wrong_shape_is_named_with_both_shapes(llama_dir, monkeypatch):
    _rewrite(llama_dir, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((32, 60), np.float32)))
    reads = _count_reads(monkeypatch)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has \(32, 60\), model expects \(32, 64\)"):
        vjax.from_pretrained(llama_dir)
    assert reads == []


def test_partial_load_on_request(llama_dir):
    _rewrite(llama_dir, lambda t: t.pop("lm_head.weight"))
    _, params = vjax.from_pretrained(llama_dir, strict=False)
    assert "lm_head" not in params and "embed_tokens" in params


def test_unsupported_architecture_is_named(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        vjax.from_pretrained(llama_dir)


class _Payload:
    """Pickles to a call of ``os.system`` — what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pth_that_would_run_code_is_refused_and_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2), "x": _Payload(marker)}}, bad)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        open_checkpoint(bad)
    assert not marker.exists()


def test_pth_bin_layout_loads_and_safetensors_preferred(tmp_path):
    hf = tiny_hf_model("llama")
    d = tmp_path / "bin"
    d.mkdir()
    hf.config.to_json_file(d / "config.json")
    torch.save(hf.state_dict(), d / "pytorch_model.bin")  # the pre-safetensors HF layout
    _, from_bin = vjax.from_pretrained(d)
    ref_dir = tmp_path / "st"
    hf.save_pretrained(ref_dir)
    _, from_st = vjax.from_pretrained(ref_dir)
    for a, b in zip(jax.tree_util.tree_leaves(from_bin), jax.tree_util.tree_leaves(from_st)):
        np.testing.assert_array_equal(a, b)
    # both layouts present: safetensors is read, the .bin never unpickled
    shutil.copy(ref_dir / "model.safetensors", d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    assert type(open_checkpoint(d)).__name__ == "SafetensorsSource"


def test_truncated_safetensors_is_named(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        open_checkpoint(f)


def test_vjax_checkpoint_round_trip(tmp_path):
    module = CausalLM(DecoderConfig.tiny(arch="qwen2", attention_bias=True, tie_word_embeddings=True))
    params = vjax.init_params(module, 3)
    vjax.save_pretrained(tmp_path / "ckpt", module, params)
    module2, params2 = vjax.from_pretrained(tmp_path / "ckpt", model="decoder")
    assert module2.config == module.config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="holds a 'decoder' model, not 'qwen2_vl'"):
        vjax.from_pretrained(tmp_path / "ckpt", model="qwen2_vl")
