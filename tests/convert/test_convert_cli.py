"""``python -m experiments.convert`` end to end: tiny checkpoints written in each released layout are
converted through the command line (a subprocess), loaded with ``vjax.from_pretrained``, and compared with
the reference computation done by transformers (max |Δ logits| <= 1e-4, float32).

* Video-ChatGPT: LLaVA dir (LLaMA + LLaVA's projector, vocab V-3) + a full CLIPModel dir + the Video-ChatGPT
  ``.bin`` (projector + V-row embedding), in that order. Reference: CLIPVisionModel ``hidden_states[-2]``,
  the pooling of spec_vit_family.md §2.3 in torch, the ``.bin`` projector, HF LLaMA on ``inputs_embeds``.
* Chat-UniVi: its dir with the CLIP tower inside (``model.vision_tower.vision_tower.vision_model.*``) and a
  different CLIP dir after it (which must win). Reference: HF CLIP features, vjax's parameter-free DPC-KNN
  merge (checked against the official code in tests/layers), torch projector, HF LLaMA.
* CogVLM2-Video: golden EVA2-CLIP-E weights (tests/golden/eva2_clip_e) + a tiny HF LLaMA re-keyed to CogVLM
  names. Reference: HF LLaMA on ``inputs_embeds`` with the golden vision features (official ``visual.py``)
  and CogVLM's position ids (spec §4.5, written out below).
* Qwen2-VL: a transformers ``save_pretrained``; then ``--to=hf`` back, re-loaded by transformers.
* Refusals: a code-running ``.pth`` (the code never runs), missing tensors named, ``--nostrict``; a dir with
  both safetensors and a booby-trapped ``.bin`` is read from the safetensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import vjax
from vjax.convert.io import save_safetensors
from vjax.models.chat_univi import ChatUniVi

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "eva2_clip_e"
TOL = 1e-4
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def cli(*args: str, expect: int = 0, faults: dict | None = None) -> str:
    """``python -m experiments.convert ARGS`` (through ``tests.faults`` with ``faults``): its stderr."""
    run = ["-m", "experiments.convert"] if faults is None else ["-m", "tests.faults", json.dumps(faults),
                                                                  "experiments.convert"]
    r = subprocess.run([sys.executable, *run, *args, "--noprogress"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == expect, r.stderr[-4000:]
    return r.stderr


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_llama(vocab: int, seed: int = 0, **kw) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, **{**LLAMA, **kw})
    cfg._attn_implementation = "eager"
    return perturbed(transformers.LlamaForCausalLM(cfg), seed)


def tiny_clip(image_size: int, seed: int) -> transformers.CLIPModel:
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           patch_size=14, image_size=image_size, hidden_act="quick_gelu"),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=16), projection_dim=8)
    cfg._attn_implementation = "eager"
    return perturbed(transformers.CLIPModel(cfg), seed)


def state(model: torch.nn.Module, prefix: str = "") -> dict:
    return {prefix + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def write_dir(d: Path, config: dict, tensors: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    save_safetensors(tensors, d / "model.safetensors")
    return d


def clip_features(clip: transformers.CLIPModel, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]


def llama_logits(llama, embeds: torch.Tensor, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        return llama(inputs_embeds=embeds[None], position_ids=position_ids).logits[0].numpy()


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ============================================================================ Video-ChatGPT
def test_video_chatgpt_three_sources_through_the_cli(tmp_path):
    v0, v = 157, 160  # LLaVA's vocabulary; +3 video tokens
    llava_llm, clip = tiny_llama(v0, seed=1), tiny_clip(28, seed=2)
    g = torch.Generator().manual_seed(3)
    llava_proj = {"model.mm_projector.weight": np.ones((64, 32), np.float32),  # replaced by the .bin
                  "model.mm_projector.bias": np.ones(64, np.float32)}
    w, b = torch.randn(64, 32, generator=g) * 0.1, torch.randn(64, generator=g) * 0.1
    embed = torch.randn(v, 64, generator=g) * 0.5
    llava_cfg = {**llava_llm.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
                 "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_vision_select_layer": -2}
    llava = write_dir(tmp_path / "llava", llava_cfg, {**state(llava_llm), **llava_proj})
    clip.save_pretrained(tmp_path / "clip")
    torch.save({"model.mm_projector.weight": w, "model.mm_projector.bias": b, "model.embed_tokens.weight": embed},
               tmp_path / "video_chatgpt-7B.bin")

    log = cli("--model=video_chatgpt", f"--src={llava},{tmp_path / 'clip'},{tmp_path / 'video_chatgpt-7B.bin'}",
              f"--dst={tmp_path / 'out'}")
    assert "3 tensor(s) of" in log and "replaced by" in log and "lm_head.weight: 157 rows padded to 160" in log
    module, params = vjax.from_pretrained(tmp_path / "out", model="video_chatgpt")
    c = module.config
    assert (c.llm.vocab_size, c.placeholder_id, c.num_temporal, c.vision.grid) == (160, 157, 100, (2, 2))

    # reference: HF CLIP -> pooling (spec §2.3) -> .bin projector -> HF LLaMA with the .bin embedding
    x = torch.randn(3, 3, 28, 28, generator=g)  # 3 frames
    f = clip_features(clip, x)  # [T, N, C]
    pooled = torch.cat([f.mean(1), torch.zeros(100 - 3, 32), f.mean(0)])  # [100 + N, C]
    tokens = pooled @ w.T + b
    ref = tiny_llama(v, seed=1)
    sd = llava_llm.state_dict()
    sd["model.embed_tokens.weight"] = embed
    sd["lm_head.weight"] = torch.cat([sd["lm_head.weight"], sd["lm_head.weight"].mean(0, keepdim=True).repeat(3, 1)])
    ref.load_state_dict(sd)
    ids = torch.tensor([1] + [157] * tokens.shape[0] + [20, 21, 22, 23, 24])
    embeds = embed[ids].clone()
    embeds[ids == 157] = tokens
    want = llama_logits(ref, embeds)
    got = module.apply({"params": params}, jnp.asarray(ids.numpy())[None], frames=nhwc(x)[None]).logits[0]
    assert err(got, want) <= TOL


# ============================================================================ Chat-UniVi
def test_chat_univi_tower_in_model_dir_replaced_by_later_clip_dir(tmp_path):
    llm, clip_in_model, clip = tiny_llama(160, seed=4), tiny_clip(56, seed=5), tiny_clip(56, seed=6)
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(64, 32, generator=g) * 0.1, torch.randn(64, generator=g) * 0.1
    tower = {"model.vision_tower.vision_tower." + k: v for k, v in state(clip_in_model).items()
             if k.startswith("vision_model.")}
    cfg = {**llm.config.to_dict(), "architectures": ["ChatUniViLlamaForCausalLM"], "model_type": "ChatUniVi",
           "mm_vision_select_layer": -2, "config": {"spatial_cluster_rate0": 8, "spatial_cluster_rate1": 4,
                                                    "spatial_cluster_rate2": 2, "temporal_cluster_rate": 1 / 16}}
    model_dir = write_dir(tmp_path / "chat_univi", cfg, {**state(llm), **tower, "model.mm_projector.weight": w.numpy(),
                                                         "model.mm_projector.bias": b.numpy()})
    clip.save_pretrained(tmp_path / "clip")
    log = cli("--model=chat_univi", f"--src={model_dir},{tmp_path / 'clip'}", f"--dst={tmp_path / 'out'}")
    assert f"replaced by {tmp_path / 'clip'}" in log
    module, params = vjax.from_pretrained(tmp_path / "out", model="chat_univi")
    assert module.config.spatial_ratios == (8, 4, 2)

    x = torch.randn(3, 3, 56, 56, generator=g)  # 3 frames: the video path (one event)
    f = clip_features(clip, x)  # the later CLIP dir's tower
    merged, real = module.apply({"params": params}, jnp.asarray(f.numpy())[None], None, method=ChatUniVi.merge)
    merged = merged[0][real[0]]  # a 3-frame clip: one event of 14 tokens (slots for two 14-token images)
    tokens = torch.from_numpy(np.array(merged)) @ w.T + b
    pid = module.config.placeholder_id
    ids = torch.tensor([1] + [pid] * tokens.shape[0] + [20, 21, 22])
    embeds = llm.model.embed_tokens.weight.detach()[torch.where(ids == pid, 0, ids)].clone()
    embeds[ids == pid] = tokens
    want = llama_logits(llm, embeds)
    got = module.apply({"params": params}, jnp.asarray(ids.numpy())[None], frames=nhwc(x)[None]).logits[0]
    assert err(got, want) <= TOL


# ============================================================================ CogVLM2-Video
def cogvlm_positions(types: list[int]) -> list[int]:
    """spec §4.5: in each vision run, boi gets p, all patches p+1, eoi p+2; every language token +1."""
    pos, p, i = [], -1, 0
    while i < len(types):
        if types[i] == 0:
            p += 1
            pos.append(p)
            i += 1
            continue
        j = i
        while j < len(types) and types[j] == 1:
            j += 1
        n = j - i
        pos += [p + 1] + [p + 2] * (n - 2) + [p + 3]
        p += 3
        i = j
    return pos


def test_cogvlm2_video_golden_vision_and_rekeyed_llama(tmp_path):
    meta = json.loads((GOLDEN / "case_cogvlm2_visual_img56.json").read_text())
    data = load_file(str(GOLDEN / "case_cogvlm2_visual_img56.safetensors"))
    d_llm = meta["config"]["hidden_size(LLM)"]
    llm = tiny_llama(160, seed=8, hidden_size=d_llm, intermediate_size=meta["config"]["intermediate_size(LLM, used by GLU)"],
                     rope_theta=500000.0, rms_norm_eps=1e-5, pad_token_id=7)
    tensors = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    sd = state(llm)
    for i in range(2):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.language_expert_query_key_value.weight"] = np.concatenate(
            [sd.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        tensors[p + "self_attn.language_expert_dense.weight"] = sd.pop(p + "self_attn.o_proj.weight")
        for n in ("gate_proj", "up_proj", "down_proj"):
            tensors[p + f"mlp.language_mlp.{n}.weight"] = sd.pop(p + f"mlp.{n}.weight")
    tensors.update(sd)
    vc = meta["config"]["vision_config"]
    cfg = dict(architectures=["CogVLMVideoForCausalLM"], vocab_size=160, hidden_size=d_llm,
               intermediate_size=llm.config.intermediate_size, num_hidden_layers=2, num_attention_heads=4,
               num_multi_query_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
               eos_token_id=2, pad_token_id=7, vision_config=vc)
    src = write_dir(tmp_path / "cogvlm2", cfg, tensors)
    cli("--model=cogvlm2_video", f"--src={src}", f"--dst={tmp_path / 'out'}")
    module, params = vjax.from_pretrained(tmp_path / "out", model="cogvlm2_video")
    assert not module.config.llm.visual_experts and module.config.placeholder_id == 7

    feats = torch.from_numpy(data["out/features"].astype(np.float32))  # [2 frames, 6, D]: official visual.py
    ids = torch.tensor([1] + [7] * 6 + [30] + [7] * 6 + [31] + [40, 41, 42])
    embeds = llm.model.embed_tokens.weight.detach()[ids].clone()
    embeds[ids == 7] = feats.reshape(-1, d_llm)
    positions = torch.tensor([cogvlm_positions((ids == 7).int().tolist())])
    want = llama_logits(llm, embeds, positions)
    frames = jnp.asarray(data["in/images"].transpose(0, 2, 3, 1))[None]  # one clip of 2 frames
    got = module.apply({"params": params}, jnp.asarray(ids.numpy())[None], frames=frames).logits[0]
    assert err(got, want) <= TOL


# ============================================================================ Qwen2-VL
def tiny_qwen2_vl() -> transformers.Qwen2VLForConditionalGeneration:
    torch.manual_seed(9)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        image_token_id=10, video_token_id=11, vision_start_token_id=12, vision_end_token_id=13)
    cfg._attn_implementation = "eager"
    return perturbed(transformers.Qwen2VLForConditionalGeneration(cfg), 9)


def test_qwen2_vl_through_the_cli_and_back_to_hf(tmp_path):
    hf = tiny_qwen2_vl()
    hf.save_pretrained(tmp_path / "hf")
    cli("--model=qwen2_vl", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'vjax'}")
    module, params = vjax.from_pretrained(tmp_path / "vjax", model="qwen2_vl")

    rng = np.random.default_rng(0)
    ids = np.array([[1, 20, 12] + [10] * 4 + [13, 30, 31]])
    pix, grid = rng.normal(size=(16, 3 * 2 * 14 * 14)).astype(np.float32), np.array([[1, 4, 4]])

    def hf_logits(model):
        with torch.no_grad():
            return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(grid),
                         mm_token_type_ids=torch.tensor((ids == 10) * 1)).logits.numpy()

    want = hf_logits(hf)
    got = module.apply({"params": params}, jnp.asarray(ids), pixel_values=jnp.asarray(pix), image_grid_thw=grid).logits
    assert err(got, want) <= TOL

    cli("--model=qwen2_vl", f"--src={tmp_path / 'vjax'}", f"--dst={tmp_path / 'back'}", "--to=hf")
    back = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "back", attn_implementation="eager")
    assert err(hf_logits(back.eval()), want) <= 1e-5


# ============================================================================ refusals
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pth_is_refused_by_the_cli_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    llm = tiny_llama(160)
    d = write_dir(tmp_path / "llava", {**llm.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"]}, state(llm))
    torch.save({"model.mm_projector.weight": torch.zeros(64, 32), "x": _Payload(marker)}, tmp_path / "evil.bin")
    log = cli("--model=video_chatgpt", f"--src={d},{tmp_path / 'evil.bin'}", f"--dst={tmp_path / 'out'}", expect=2)
    assert "evil.bin" in log and "refused" in log
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_safetensors_preferred_over_a_booby_trapped_bin(tmp_path):
    marker = tmp_path / "pwned"
    llm = tiny_llama(160)
    llm.save_pretrained(tmp_path / "llama")
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Payload(marker)},
               tmp_path / "llama" / "pytorch_model.bin")
    log = cli("--model=decoder", f"--src={tmp_path / 'llama'}", f"--dst={tmp_path / 'out'}")
    assert "reading the safetensors only" in log and not marker.exists()
    _, params = vjax.from_pretrained(tmp_path / "out", model="decoder")
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], llm.model.embed_tokens.weight.detach().numpy())


def test_missing_tensor_named_by_the_cli_and_nostrict_writes_anyway(tmp_path):
    llm = tiny_llama(160)
    sd = state(llm)
    del sd["model.layers.1.mlp.up_proj.weight"]
    d = write_dir(tmp_path / "llama", {**llm.config.to_dict(), "architectures": ["LlamaForCausalLM"]}, sd)
    log = cli("--model=decoder", f"--src={d}", f"--dst={tmp_path / 'out'}", expect=2)
    assert "missing 1 tensor" in log and "model.layers.1.mlp.up_proj.weight" in log
    assert not (tmp_path / "out").exists()
    log = cli("--model=decoder", f"--src={d}", f"--dst={tmp_path / 'out'}", "--nostrict")
    assert "left at random initialisation" in log and "model.layers.1.mlp.up_proj.weight" in log
    _, params = vjax.from_pretrained(tmp_path / "out", model="decoder")
    assert params["layers_1"]["mlp"]["up_proj"]["kernel"].shape == (64, 96)


def test_pth_without_pytorch_is_one_line_exit_2(tmp_path):
    """The base install has no PyTorch: a .pth source is refused by name, with no traceback and no
    transformers 'PyTorch was not found' warning."""
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 2)}, tmp_path / "w.pth")
    log = cli("--model=decoder", f"--src={tmp_path / 'w.pth'}", f"--dst={tmp_path / 'out'}", "--variant=tiny",
              expect=2, faults={"hide_modules": ["torch"]})
    assert log.splitlines() == [f"error: {tmp_path / 'w.pth'}: reading .pth/.bin files needs PyTorch, which is not "
                                f"installed: pip install torch (the CPU build is enough), or convert the file to "
                                f"safetensors elsewhere"], log
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_is_refused_even_with_nostrict_and_the_hint_names_the_config(tmp_path):
    llm = tiny_llama(160)
    sd = state(llm)
    sd["model.layers.0.mlp.up_proj.weight"] = np.zeros((80, 64), np.float32)  # the config says 96 rows
    d = write_dir(tmp_path / "llama", {**llm.config.to_dict(), "architectures": ["LlamaForCausalLM"]}, sd)
    log = cli("--model=decoder", f"--src={d}", f"--dst={tmp_path / 'out'}", "--nostrict", expect=2)
    assert "model.layers.0.mlp.up_proj.weight has (80, 64), model expects (96, 64)" in log
    assert "cannot be loaded, not even with strict=False (--nostrict)" in log and "--variant or --config_file" in log
    assert "Pass strict=False" not in log and not (tmp_path / "out").exists()


def test_flag_errors_exit_2_in_one_line(tmp_path):
    log = cli("--model=decoder", "--sourc=x", expect=2)
    assert log.splitlines() == ["error: Unknown command line flag 'sourc'. Did you mean: src ?"], log
    log = cli("--model=decoder", expect=2)
    assert log.splitlines() == ["error: --model, --src and --dst are required"], log


# ============================================================================ streaming
@pytest.mark.slow
def test_conversion_streams_a_sharded_checkpoint(tmp_path):
    """Peak memory added by converting ~300 MB in 2 shards <= 1.5 x largest shard + output size
    (``python -m tests.convert.streaming --mb=2048 --shards=5`` runs the issue's 2 GB case by hand)."""
    from tests.convert.streaming import measure, write_sharded_checkpoint  # noqa: PLC0415

    info = write_sharded_checkpoint(tmp_path / "src", 300, 2)
    res = measure(tmp_path / "src", tmp_path / "dst")
    print(json.dumps({**info, **res}))
    assert info["shards"] == 2 and info["largest_shard"] < 0.6 * info["total_bytes"]
    assert res["peak_growth"] <= 1.5 * info["largest_shard"] + info["total_bytes"]
