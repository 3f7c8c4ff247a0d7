"""Video-LLaMA, MiniGPT4-video and MA-LMM: every released checkpoint layout, at the published sizes and
through ``python -m experiments.convert`` at tiny sizes.

Manifests (names and shapes only, nothing read) of each released file as it reads once unwrapped — LAVIS
runner checkpoints contribute their ``model`` entry — written from the spec's key lists
(spec_qformer_family.md §1.1, §1.3, §2.1, §2.6, §3.5, §4.5) and, for the HF LLM folders, from transformers
models on the ``meta`` device. They are combined in the official loading order with the layout's key
placement (bare EVA / ImageBind / LLM keys) and its initial values, and planned against the published
variant: every tensor lands in exactly one parameter of the right shape or is dropped by a named rule,
every parameter is provided once, and a missing or extra tensor is named.

Tiny checkpoints, written as the release's several files, converted by the CLI in a subprocess:

* MA-LMM — reference outputs: a transformers ``InstructBlipVideoForConditionalGeneration`` (the model of
  tests/models/test_ma_lmm.py) re-keyed here, independently of vjax's tables, into the LAVIS names
  (spec §5 item 3, inverted), split into EVA / Vicuna folder / InstructBLIP / fine-tuned files;
  max |Δ logits| <= 1e-4 against transformers.
* Video-LLaMA and MiniGPT4-video — round trips (no independent reference model exists in transformers):
  random vjax parameters exported through the layout's table to the official names, written as the
  release's files; the CLI output must equal, bitwise, what the Python API (``convert`` over the in-memory
  state dict, same table) gives, and so must the logits. MiniGPT4-video's ``--merge_lora`` output must give
  the unmerged model's logits (<= 1e-5).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vjax
from vjax.convert import DEFAULTS_LABEL, combine, layout
from vjax.convert.io import save_safetensors
from vjax.convert.mapping import Skip, convert, export, flatten_params, plan_conversion
from vjax.models import registry
from vjax.pretrained import abstract_params

from tests.convert.test_convert_cli import cli
from tests.convert.test_layouts import Manifest, expected_shapes, llama_dir, meta_shapes
from tests.layers.golden import DictSource
from tests.models.test_ma_lmm import batch as ma_lmm_batch
from tests.models.test_ma_lmm import hf_model as instructblip_video
from tests.models.test_ma_lmm import released_keys as ma_lmm_finetuned_keys
from tests.models.test_ma_lmm import vjax_config as ma_lmm_tiny_config
from tests.models.test_minigpt4_video import released_keys as minigpt4_keys
from tests.models.test_video_llama import released_keys as video_llama_keys
from tests.models.tiny import random_params

TOL = 1e-4
PEFT = "llama_model.base_model.model."  # MiniGPT4-video's LLM inside its PEFT wrapper


# ============================================================================ released files (manifests)
def eva_keys(depth: int = 39, d: int = 1408, mlp: int = 6144, tokens: int = 257, patch: int = 14) -> dict:
    """``eva_vit_g.pth``: the LAVIS ViT's state dict, keys without prefix (spec §1.1)."""
    s = {"cls_token": (1, 1, d), "pos_embed": (1, tokens, d), "patch_embed.proj.weight": (d, 3, patch, patch),
         "patch_embed.proj.bias": (d,)}
    for i in range(depth):
        p = f"blocks.{i}."
        s |= {p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "attn.qkv.weight": (3 * d, d),
              p + "attn.q_bias": (d,), p + "attn.v_bias": (d,), p + "attn.proj.weight": (d, d),
              p + "attn.proj.bias": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
              p + "mlp.fc1.weight": (mlp, d), p + "mlp.fc1.bias": (mlp,), p + "mlp.fc2.weight": (d, mlp),
              p + "mlp.fc2.bias": (d,)}
    return s


def qformer_keys(prefix: str = "Qformer.bert.", layers: int = 12, freq: int = 2, enc: int = 1408,
                 text: bool = True, vocab: int = 30523) -> dict:
    """A LAVIS Q-Former (spec §1.3): BERT-base blocks, cross-attention every ``freq``-th layer."""
    h, ffn = 768, 3072
    s = {f"{prefix}embeddings.LayerNorm.weight": (h,), f"{prefix}embeddings.LayerNorm.bias": (h,),
         f"{prefix}embeddings.position_ids": (1, 512)}
    if text:
        s |= {f"{prefix}embeddings.word_embeddings.weight": (vocab, h),
              f"{prefix}embeddings.position_embeddings.weight": (512, h)}
    for i in range(layers):
        p = f"{prefix}encoder.layer.{i}."
        for kind in ("attention", "crossattention") if i % freq == 0 else ("attention",):
            for name in ("query", "key", "value"):
                s[f"{p}{kind}.self.{name}.weight"] = (h, enc if kind == "crossattention" and name != "query" else h)
                s[f"{p}{kind}.self.{name}.bias"] = (h,)
            s |= {f"{p}{kind}.output.dense.weight": (h, h), f"{p}{kind}.output.dense.bias": (h,),
                  f"{p}{kind}.output.LayerNorm.weight": (h,), f"{p}{kind}.output.LayerNorm.bias": (h,)}
        for ffn_name in ("_query", "") if text else ("_query",):
            s |= {f"{p}intermediate{ffn_name}.dense.weight": (ffn, h), f"{p}intermediate{ffn_name}.dense.bias": (ffn,),
                  f"{p}output{ffn_name}.dense.weight": (h, ffn), f"{p}output{ffn_name}.dense.bias": (h,),
                  f"{p}output{ffn_name}.LayerNorm.weight": (h,), f"{p}output{ffn_name}.LayerNorm.bias": (h,)}
    return s


def blip2_flant5xxl(with_ln_vision: bool = True, with_text: bool = True) -> dict:
    """``blip2_pretrained_flant5xxl.pth`` 'model' entry: Q-Former (its text parts, if kept, and the MLM head are
    dropped by Video-LLaMA), query tokens, ln_vision [unverified which it holds: both forms are checked], t5_proj."""
    s = {**qformer_keys(text=with_text), "query_tokens": (1, 32, 768), "t5_proj.weight": (4096, 768),
         "t5_proj.bias": (4096,)}
    if with_text:
        s |= {"Qformer.cls.predictions.bias": (30523,), "Qformer.cls.predictions.transform.dense.weight": (768, 768),
              "Qformer.cls.predictions.transform.dense.bias": (768,),
              "Qformer.cls.predictions.transform.LayerNorm.weight": (768,),
              "Qformer.cls.predictions.transform.LayerNorm.bias": (768,),
              "Qformer.cls.predictions.decoder.weight": (30523, 768), "Qformer.cls.predictions.decoder.bias": (30523,)}
    if with_ln_vision:
        s |= {"ln_vision.weight": (1408,), "ln_vision.bias": (1408,)}
    return s


IMAGEBIND_OTHERS = {  # a few tensors of every other modality of imagebind_huge.pth (all dropped by name)
    "modality_preprocessors.vision.cls_token": (1, 1, 1280),
    "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
    "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
    "modality_trunks.vision.pre_transformer_layer.0.weight": (1280,),
    "modality_trunks.vision.blocks.31.attn.in_proj_weight": (3840, 1280),
    "modality_heads.vision.2.weight": (1024, 1280),
    "modality_preprocessors.text.token_embedding.weight": (49408, 1024),
    "modality_preprocessors.text.pos_embed": (1, 77, 1024),
    "modality_trunks.text.blocks.23.mlp.fc2.weight": (1024, 4096),
    "modality_heads.text.proj.1.weight": (1024, 1024),
    "modality_postprocessors.text.1.log_logit_scale": (),
    "modality_preprocessors.depth.depth_stem.proj.weight": (384, 1, 16, 16),
    "modality_trunks.depth.blocks.11.attn.bias_k": (1, 1, 384),
    "modality_postprocessors.depth.1.log_logit_scale": (),
    "modality_preprocessors.thermal.rgbt_stem.proj.weight": (768, 1, 16, 16),
    "modality_heads.thermal.2.weight": (1024, 768),
    "modality_preprocessors.imu.imu_stem.proj.weight": (512, 48),
    "modality_trunks.imu.blocks.5.norm_1.weight": (512,),
    "modality_postprocessors.imu.1.log_logit_scale": (),
}


def imagebind_huge() -> dict:
    """``imagebind_huge.pth``: the audio modality in full (spec §2.1) plus the others (a sample)."""
    d, pre, trunk = 768, "modality_preprocessors.audio.", "modality_trunks.audio.blocks."
    s = {pre + "cls_token": (1, 1, d), pre + "rgbt_stem.proj.weight": (d, 1, 16, 16),
         pre + "rgbt_stem.norm_layer.weight": (d,), pre + "rgbt_stem.norm_layer.bias": (d,),
         pre + "pos_embedding_helper.pos_embed": (1, 229, d), "modality_heads.audio.0.weight": (d,),
         "modality_heads.audio.0.bias": (d,), "modality_heads.audio.2.weight": (1024, d),
         "modality_postprocessors.audio.1.log_logit_scale": ()}
    for i in range(12):
        p = f"{trunk}{i}."
        s |= {p + "attn.in_proj_weight": (3 * d, d), p + "attn.in_proj_bias": (3 * d,), p + "attn.bias_k": (1, 1, d),
              p + "attn.bias_v": (1, 1, d), p + "attn.out_proj.weight": (d, d), p + "attn.out_proj.bias": (d,),
              p + "norm_1.weight": (d,), p + "norm_1.bias": (d,), p + "norm_2.weight": (d,), p + "norm_2.bias": (d,),
              p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,), p + "mlp.fc2.weight": (d, 4 * d),
              p + "mlp.fc2.bias": (d,)}
    return {**s, **IMAGEBIND_OTHERS}


@functools.lru_cache(maxsize=None)
def mistral_dir() -> dict:
    return meta_shapes(transformers.MistralForCausalLM, transformers.MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8))


LLAMA2_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40)


def video_llama_files(width: int, prefixed: bool = False, ln_vision: bool = True) -> list:
    """The official loading order: EVA, BLIP-2 Q-Former, ImageBind, LLM folder, VL, AL."""
    llm = llama_dir(32000, **(LLAMA2_13B if width == 5120 else {}))
    return [("eva_vit_g.pth", "visual_encoder." if prefixed else "", eva_keys()),
            ("blip2_pretrained_flant5xxl.pth", "", blip2_flant5xxl(with_ln_vision=ln_vision)),
            ("imagebind_huge.pth", "audio_encoder." if prefixed else "", imagebind_huge()),
            ("llm", "llama_model." if prefixed else "", llm),
            ("VL.pth", "", video_llama_keys("vl", width)), ("AL.pth", "", video_llama_keys("al", width))]


def minigpt4_files(mistral: bool, default: bool, prefixed: bool = False) -> list:
    return [("eva_vit_g.pth", "visual_encoder." if prefixed else "", eva_keys()),
            ("llm", PEFT if prefixed else "", mistral_dir() if mistral else llama_dir(32000)),
            ("video_checkpoint_last.pth", "", minigpt4_keys(1024 if mistral else 4096, default))]


def ma_lmm_files(finetuned: bool = True, prefixed: bool = False) -> list:
    instructblip = {k: v for k, v in ma_lmm_finetuned_keys().items() if k != "image_pe.weight"}
    files = [("eva_vit_g.pth", "visual_encoder." if prefixed else "", eva_keys()),
             ("vicuna-7b", "llm_model." if prefixed else "", llama_dir(32000)),
             ("instruct_blip_vicuna7b_trimmed.pth", "", instructblip)]
    return files + ([("checkpoint_best.pth", "", ma_lmm_finetuned_keys())] if finetuned else [])


# (model, published variant, files)
CASES = {
    "video_llama2_7b": ("video_llama", "video_llama2_7b", lambda: video_llama_files(4096)),
    "video_llama2_7b_prefixed": ("video_llama", "video_llama2_7b", lambda: video_llama_files(4096, prefixed=True)),
    "video_llama2_7b_no_ln_vision": ("video_llama", "video_llama2_7b",
                                     lambda: video_llama_files(4096, ln_vision=False)),
    "video_llama2_13b": ("video_llama", "video_llama2_13b", lambda: video_llama_files(5120)),
    "video_llama_vicuna7b": ("video_llama", "video_llama_vicuna7b", lambda: video_llama_files(4096)),
    "minigpt4_video_llama2": ("minigpt4_video", "minigpt4_video_llama2", lambda: minigpt4_files(False, False)),
    "minigpt4_video_llama2_default": ("minigpt4_video", "minigpt4_video_llama2", lambda: minigpt4_files(False, True)),
    "minigpt4_video_mistral_prefixed": ("minigpt4_video", "minigpt4_video_mistral",
                                        lambda: minigpt4_files(True, True, prefixed=True)),
    "ma_lmm_finetuned": ("ma_lmm", "ma_lmm_vicuna7b", ma_lmm_files),
    "ma_lmm_finetuned_prefixed": ("ma_lmm", "ma_lmm_vicuna7b", lambda: ma_lmm_files(prefixed=True)),
    "ma_lmm_zero_shot": ("ma_lmm", "ma_lmm_vicuna7b", lambda: ma_lmm_files(finetuned=False)),
}


def plan_case(case: str, edit=None):
    model, variant, files = CASES[case]
    lay = layout(model)
    manifests = files()
    if edit is not None:
        manifests = edit(manifests)
    config = getattr(registry.get(model)[0], variant)()
    source = combine([(label, prefix, Manifest(shapes)) for label, prefix, shapes in manifests], lay, config)
    shapes = {k: source.shape(k) for k in source.keys()}
    plan = plan_conversion(shapes, lay.table(config, list(shapes)), expected_shapes(model, variant))
    return plan, source, shapes


@pytest.mark.parametrize("case", sorted(CASES))
def test_published_layout_maps_completely(case):
    model, variant, files = CASES[case]
    plan, source, shapes = plan_case(case)
    assert (plan.missing, plan.unexpected, plan.mismatched) == ([], [], [])
    want = expected_shapes(model, variant)
    landed: dict[str, int] = {}
    dropped = set()
    for key, rule, fields in plan.assignments:
        if isinstance(rule, Skip):
            dropped.add(key)
        for path, shape in rule.plan(shapes[key], fields):
            landed[path] = landed.get(path, 0) + 1
            assert tuple(shape) == want[path], (key, path)
    assert set(landed) == set(want) and set(landed.values()) == {1}  # every parameter, exactly once
    # what is dropped is what the official model does not have: buffers, ImageBind's other modalities,
    # BLIP-2's T5 side and the Q-Former text parts Video-LLaMA deletes, MA-LMM's image_pe without memory bank
    allowed = re.compile(r"(.*\.embeddings\.position_ids"
                         r"|audio_encoder\.modality_\w+\.(vision|text|depth|thermal|imu)\..*"
                         r"|audio_encoder\.modality_postprocessors\.audio\.1\.log_logit_scale|t5_proj\..*"
                         r"|Qformer\.(cls\..*|bert\.embeddings\.(word|position)_embeddings\.weight"
                         r"|bert\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)))\Z")
    assert all(allowed.match(k) for k in dropped), sorted(k for k in dropped if not allowed.match(k))
    if model == "video_llama":
        others = {"audio_encoder." + k for k in IMAGEBIND_OTHERS}
        assert others <= dropped and not any(".audio." in k and "log_logit_scale" not in k for k in dropped)
    # the official model's initial values are used only where no released file has the tensor
    initial = {k for k in source.keys() if source.origin(k) == DEFAULTS_LABEL}
    assert initial == {"video_llama2_7b_no_ln_vision": {"ln_vision.weight", "ln_vision.bias"},
                       "ma_lmm_zero_shot": {"image_pe.weight"}}.get(
        case, {"ln_vision.weight", "ln_vision.bias"} if model == "minigpt4_video" else set())
    if model == "ma_lmm":  # Vicuna's 32000 rows padded to 32001 ([PAD])
        assert shapes["llm_model.model.embed_tokens.weight"] == (32000, 4096)
        head = next(r for k, r, _ in plan.assignments if k == "llm_model.lm_head.weight")
        assert type(head).__name__ == "PadRows" and head.rows == 32001


def test_later_files_replace_earlier_ones():
    _, source, _ = plan_case("ma_lmm_finetuned")
    replaced = {k for k, old, new in source.overridden if old != DEFAULTS_LABEL}
    assert ("image_pe.weight", DEFAULTS_LABEL, "checkpoint_best.pth") in source.overridden
    assert source.origin("llm_proj.weight") == "checkpoint_best.pth" and "query_tokens" in replaced
    assert source.origin("llm_model.lm_head.weight") == "vicuna-7b"
    _, source, _ = plan_case("video_llama2_7b")
    assert source.origin("ln_vision.weight") == "blip2_pretrained_flant5xxl.pth"
    assert source.origin("visual_encoder.blocks.38.attn.q_bias") == "eva_vit_g.pth"


@pytest.mark.parametrize("case,file_index", [("video_llama2_7b", 4), ("minigpt4_video_llama2", 2),
                                             ("ma_lmm_finetuned", 3)])
def test_a_missing_or_extra_tensor_fails_loudly(case, file_index):
    def edit_drop(ms):
        label, prefix, shapes = ms[file_index]
        victim = sorted(k for k in shapes if "layers.1." in k or "layer.1." in k)[0]
        ms = list(ms)
        ms[file_index] = (label, prefix, {k: v for k, v in shapes.items() if k != victim})
        if case.startswith("ma_lmm"):  # the InstructBLIP file has the same key: drop it there too
            ms = [(la, p, {k: v for k, v in s.items() if k != victim}) for la, p, s in ms]
        edit_drop.victim = victim
        return ms

    plan, _, _ = plan_case(case, edit_drop)
    assert len(plan.missing) == 1 and plan.missing[0].startswith(edit_drop.victim + " (-> ")
    assert not plan.unexpected and not plan.mismatched

    def edit_extra(ms):
        label, prefix, shapes = ms[file_index]
        return [*ms[:file_index], (label, prefix, {**shapes, "llama_proj_extra.weight": (4, 4)}), *ms[file_index + 1:]]

    plan, _, _ = plan_case(case, edit_extra)
    assert plan.unexpected == ["llama_proj_extra.weight"] and not plan.missing


def test_no_config_json_form_asks_for_a_variant():
    for model in ("video_llama", "minigpt4_video", "ma_lmm"):
        with pytest.raises(ValueError, match="--variant"):
            layout(model).config_from_hf([{"architectures": ["LlamaForCausalLM"]}], {})


# ============================================================================ tiny checkpoints, through the CLI
def tensors(d: dict) -> dict:
    return {k: torch.from_numpy(np.array(v)) for k, v in d.items()}


def runner_checkpoint(model_state: dict, path: Path) -> Path:
    """A LAVIS ``_save_checkpoint`` file: the trained tensors under 'model', optimizer moments beside them."""
    moments = {i: {"step": torch.tensor(7.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)} for i in range(2)}
    torch.save({"model": tensors(model_state), "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4}]},
                "config": {"run": {"init_lr": 1e-4}}, "scaler": None, "epoch": 4}, path)
    return path


def bare(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def pick(sd: dict, *prefixes: str) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


def write_llm_dir(d: Path, state: dict, hidden: int, vocab: int, **extra) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                               "hidden_size": hidden, "vocab_size": vocab, **extra}))
    save_safetensors(state, d / "model.safetensors")
    return d


def config_file(config, path: Path) -> Path:
    path.write_text(json.dumps(registry.config_to_dict(config)))
    return path


def frames_for(config, seed: int, b: int = 2) -> jnp.ndarray:
    s = config.vision.image_size
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, config.num_frames, s, s, 3)), jnp.float32)


def assert_same_params(got: dict, want: dict) -> None:
    got, want = flatten_params(got), flatten_params(want)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


# ---------------------------------------------------------------------------- Video-LLaMA (round trip)
def test_video_llama_release_files_through_the_cli(tmp_path):
    model_cls = registry.get("video_llama")[1]
    module = model_cls(registry.get("video_llama")[0].tiny())
    c = module.config
    lay = layout("video_llama")
    table = lay.table(c)
    sd = dict(export(random_params(module, seed=11), table))  # the official names
    want = convert(DictSource(sd), table, abstract_params(module))  # Python API, in memory: the reference

    pos_ids = np.arange(512, dtype=np.int64)[None]
    torch.save(tensors(bare(sd, "visual_encoder.")), tmp_path / "eva_vit_g.pth")
    q = c.image_qformer
    blip2 = {**pick(sd, "Qformer.", "query_tokens", "ln_vision."), "Qformer.bert.embeddings.position_ids": pos_ids,
             "Qformer.bert.embeddings.word_embeddings.weight": np.ones((30, q.hidden_size), np.float32),
             "Qformer.bert.encoder.layer.0.intermediate.dense.weight": np.ones((8, q.hidden_size), np.float32),
             "Qformer.cls.predictions.bias": np.ones(30, np.float32),
             "t5_proj.weight": np.ones((16, q.hidden_size), np.float32), "t5_proj.bias": np.ones(16, np.float32)}
    runner_checkpoint(blip2, tmp_path / "blip2_pretrained_flant5xxl.pth")
    others = {"modality_trunks.vision.blocks.0.attn.in_proj_weight": np.ones((12, 4), np.float32),
              "modality_preprocessors.text.token_embedding.weight": np.ones((9, 4), np.float32),
              "modality_heads.depth.2.weight": np.ones((3, 4), np.float32),
              "modality_postprocessors.thermal.1.log_logit_scale": np.array(1.0, np.float32),
              "modality_trunks.imu.blocks.0.norm_1.weight": np.ones(4, np.float32),
              "modality_postprocessors.audio.1.log_logit_scale": np.array(np.log(20.0), np.float32)}
    torch.save(tensors({**bare(sd, "audio_encoder."), **others}), tmp_path / "imagebind_huge.pth")
    assert c.llm.rms_norm_eps == 1e-6  # the folder says 1e-5: shapes cannot tell, a warning must
    llm = write_llm_dir(tmp_path / "llama-2-chat-hf", bare(sd, "llama_model."), c.llm.hidden_size, c.llm.vocab_size,
                        rms_norm_eps=1e-5)
    runner_checkpoint({**pick(sd, "video_", "llama_proj."), "video_Qformer.bert.embeddings.position_ids": pos_ids},
                      tmp_path / "VL.pth")
    runner_checkpoint({**pick(sd, "audio_Qformer.", "audio_query_tokens", "audio_position_embedding.",
                              "audio_llama_proj."), "audio_Qformer.bert.embeddings.position_ids": pos_ids},
                      tmp_path / "AL.pth")
    srcs = [f"visual_encoder.={tmp_path / 'eva_vit_g.pth'}", str(tmp_path / "blip2_pretrained_flant5xxl.pth"),
            str(tmp_path / "imagebind_huge.pth"), str(llm), str(tmp_path / "VL.pth"), str(tmp_path / "AL.pth")]
    log = cli("--model=video_llama", f"--config_file={config_file(c, tmp_path / 'cfg.json')}",
              "--src=" + ",".join(srcs), f"--dst={tmp_path / 'out'}")
    assert "LAVIS training checkpoint" in log and "'optimizer' (6 tensor(s))" in log
    for pattern in ("audio_encoder.modality_trunks.vision.** (1)", "audio_encoder.modality_preprocessors.text.** (1)",
                    "audio_encoder.modality_heads.depth.** (1)", "audio_encoder.modality_postprocessors.thermal.** (1)",
                    "audio_encoder.modality_trunks.imu.** (1)", "t5_proj.weight (1)",
                    "Qformer.cls.predictions.bias (1)"):
        assert pattern in log, pattern
    assert "initial values" not in log  # ln_vision came from the BLIP-2 file
    assert "warning: an LLM config.json among the sources differs from the chosen config: rms_norm_eps 1e-05" in log

    got_module, got = vjax.from_pretrained(tmp_path / "out", model="video_llama")
    assert got_module.config == c
    assert_same_params(got, want)
    b = module.example_batch(2)
    rng = np.random.default_rng(3)
    inputs = dict(frames=frames_for(c, 2), audio=jnp.asarray(rng.normal(size=b["audio"].shape), jnp.float32))
    run = jax.jit(lambda p: module.apply({"params": p}, b["input_ids"], **inputs).logits)
    np.testing.assert_array_equal(run(got), run(jax.tree_util.tree_map(jnp.asarray, want)))


# ---------------------------------------------------------------------------- MiniGPT4-video (round trip, merge)


def test_minigpt4_video_release_files_through_the_cli_and_merge_lora(tmp_path):
    config_cls, model_cls = registry.get("minigpt4_video")
    module = model_cls(config_cls.tiny())
    c = module.config
    params = random_params(module, seed=12)
    params["vision"]["ln_vision"] = {"scale": np.ones(c.vision.width, np.float32),  # in no file: its init
                                     "bias": np.zeros(c.vision.width, np.float32)}
    table = layout("minigpt4_video").table(c)
    sd = dict(export(params, table))
    want = convert(DictSource(sd), table, abstract_params(module))  # Python API, in memory: the reference
    assert_same_params(want, params)

    torch.save(tensors(bare(sd, "visual_encoder.")), tmp_path / "eva_vit_g.pth")
    llm = write_llm_dir(tmp_path / "llama2", {k: v for k, v in bare(sd, PEFT).items() if ".lora_" not in k},
                        c.llm.hidden_size, c.llm.vocab_size)
    release = {k: v for k, v in sd.items() if k.startswith("llama_proj.") or ".lora_" in k}
    assert len(release) == 2 + 4 * c.llm.num_layers
    runner_checkpoint(release, tmp_path / "video_checkpoint.pth")  # peft 0.2.0 names
    runner_checkpoint({re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k): v for k, v in release.items()},
                      tmp_path / "video_checkpoint_newer_peft.pth")
    cfg = config_file(c, tmp_path / "cfg.json")

    log = cli("--model=minigpt4_video", f"--config_file={cfg}", f"--dst={tmp_path / 'out'}",
              f"--src={tmp_path / 'eva_vit_g.pth'},{PEFT}={llm},{tmp_path / 'video_checkpoint.pth'}")
    assert "warning" not in log
    assert "kept at the official model's initial values: ln_vision.weight, ln_vision.bias" in log
    got_module, got = vjax.from_pretrained(tmp_path / "out", model="minigpt4_video")
    assert got_module.config == c
    assert_same_params(got, want)
    ids = jnp.asarray([[1, 10] + [c.placeholder_id] * c.num_visual_tokens + [11, 12, 13]] * 2, jnp.int32)
    frames = frames_for(c, 5)
    logits = lambda m, p: jax.jit(m.apply)({"params": p}, ids, frames=frames).logits  # noqa: E731
    lora_logits = logits(module, got)
    np.testing.assert_array_equal(lora_logits, logits(module, jax.tree_util.tree_map(jnp.asarray, want)))

    cli("--model=minigpt4_video", f"--config_file={cfg}", f"--dst={tmp_path / 'merged'}", "--merge_lora",
        f"--src={tmp_path / 'eva_vit_g.pth'},{llm},{tmp_path / 'video_checkpoint_newer_peft.pth'}")
    merged_module, merged = vjax.from_pretrained(tmp_path / "merged", model="minigpt4_video")
    assert merged_module.config.llm.lora_rank == 0 and not any("lora" in k for k in flatten_params(merged))
    base = {k: v for k, v in flatten_params(got).items() if "lora" not in k}
    moved = {k for k, v in flatten_params(merged).items() if not np.array_equal(v, base[k])}
    assert moved == {f"llm/layers_{i}/self_attn/{p}/kernel" for i in range(c.llm.num_layers)
                     for p in ("q_proj", "v_proj")}
    err = float(np.abs(np.asarray(logits(merged_module, merged)) - np.asarray(lora_logits)).max())
    print(f"minigpt4_video --merge_lora vs LoRA: max |Δ logits| = {err:.2e}")
    assert err <= 1e-5


# ---------------------------------------------------------------------------- MA-LMM (transformers reference)
def lavis_names(hf_state: dict) -> dict:
    """transformers ``InstructBlipVideo`` keys -> the LAVIS names of MA-LMM's files (spec §5 item 3, inverted),
    ``qkv.bias`` split into LAVIS' ``q_bias`` / ``v_bias`` (LAVIS has no k bias; softmax ignores it)."""
    out = {}
    for k, v in hf_state.items():
        v = v.detach().numpy().copy()
        if k.startswith("vision_model."):
            k = (k.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
                 .replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
                 .replace("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj")
                 .replace("vision_model.encoder.layers.", "visual_encoder.blocks.")
                 .replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
                 .replace(".self_attn.projection.", ".attn.proj.").replace(".self_attn.qkv.", ".attn.qkv.")
                 .replace("vision_model.post_layernorm.", "ln_vision."))
            if k.endswith("attn.qkv.bias"):
                q, _, vb = np.split(v, 3)
                out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q, vb
                continue
        elif k.startswith("qformer."):
            k = ("Qformer.bert." + k[len("qformer."):]).replace(".attention.attention.", ".attention.self.")
            k = k.replace(".crossattention.attention.", ".crossattention.self.").replace(
                "embeddings.layernorm.", "embeddings.LayerNorm.")
        elif k.startswith("language_projection."):
            k = "llm_proj." + k[len("language_projection."):]
        elif k.startswith("language_model."):
            k = "llm_model." + k[len("language_model."):]
        out[k] = v
    return out


def test_ma_lmm_release_files_through_the_cli_match_transformers(tmp_path):
    hf = copy.deepcopy(instructblip_video())
    vocab = hf.config.text_config.vocab_size
    with torch.no_grad():  # the converter's [PAD] row: mean of Vicuna's rows (Vicuna has one row fewer)
        for w in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight):
            w[vocab - 1] = w[: vocab - 1].double().mean(0).float()
    sd = lavis_names(hf.state_dict())
    assert not [k for k in sd if not k.startswith(("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens",
                                                   "llm_proj.", "llm_model."))]
    torch.save(tensors(bare(sd, "visual_encoder.")), tmp_path / "eva_vit_g.pth")
    llm = {k: (v[: vocab - 1] if k.endswith(("embed_tokens.weight", "lm_head.weight")) else v)
           for k, v in bare(sd, "llm_model.").items()}
    vicuna = write_llm_dir(tmp_path / "vicuna-7b", llm, hf.config.text_config.hidden_size, vocab - 1)
    trained = pick(sd, "Qformer.", "query_tokens", "ln_vision.", "llm_proj.")
    stale = {k: (v + 0.5 if k.startswith(("llm_proj.", "Qformer.bert.encoder.")) else v) for k, v in trained.items()}
    runner_checkpoint({**stale, "Qformer.bert.embeddings.position_ids": np.arange(16)[None]},
                      tmp_path / "instruct_blip_vicuna7b_trimmed.pth")
    image_pe = np.full((120, 32), 0.3, np.float32)  # memory bank only: dropped by a memory_bank=False config
    finetuned = pick(trained, "Qformer.bert.encoder.", "llm_proj.", "ln_vision.")
    runner_checkpoint({**finetuned, "image_pe.weight": image_pe}, tmp_path / "checkpoint_best.pth")
    config = ma_lmm_tiny_config()
    srcs = [tmp_path / "eva_vit_g.pth", vicuna, tmp_path / "instruct_blip_vicuna7b_trimmed.pth",
            tmp_path / "checkpoint_best.pth"]
    log = cli("--model=ma_lmm", f"--config_file={config_file(config, tmp_path / 'cfg.json')}",
              f"--dst={tmp_path / 'out'}", "--src=" + ",".join(map(str, srcs)))
    assert "replaced by " + str(tmp_path / "checkpoint_best.pth") in log
    assert f"llm_model.lm_head.weight: {vocab - 1} rows padded to {vocab}" in log and "image_pe.weight (1)" in log
    module, params = vjax.from_pretrained(tmp_path / "out", model="ma_lmm")
    assert module.config == config

    frames, ids, mask, q_ids, q_mask = ma_lmm_batch()
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(frames).permute(0, 1, 4, 2, 3), input_ids=torch.tensor(ids),
                 attention_mask=torch.tensor(mask), qformer_input_ids=torch.tensor(q_ids),
                 qformer_attention_mask=torch.tensor(q_mask)).logits.numpy()
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                frames=jnp.asarray(frames), qformer_input_ids=jnp.asarray(q_ids),
                                qformer_attention_mask=jnp.asarray(q_mask))
    err = float(np.abs(np.asarray(out.logits) - ref)[mask.astype(bool)].max())
    print(f"ma_lmm CLI (LAVIS files) vs InstructBlipVideo: max |Δ logits| = {err:.2e}")
    assert err <= TOL
