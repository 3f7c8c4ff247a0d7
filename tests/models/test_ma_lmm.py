"""MA-LMM: the plain path (``memory_bank=False``) equals transformers' InstructBlipVideoForConditionalGeneration
(Llama decoder, max |Δ logits| <= 1e-4); the memory-bank path gives the official frame loop's last-step
queries (golden ``ma_lmm_memory/case_qformer_text``); training at the tiny config; published sizes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from vjax.convert.io import open_checkpoint
from vjax.convert.ma_lmm import ma_lmm_hf_table, ma_lmm_lavis_table
from vjax.convert.mapping import convert, export_plan, flatten_params, plan_conversion
from vjax.layers.qformer import QFormerConfig
from vjax.models import registry
from vjax.models.decoder import DecoderConfig
from vjax.models.encoders import EncoderConfig
from vjax.models.ma_lmm import MALMM, MALMMConfig
from vjax.pretrained import abstract_params
from vjax.train.optim import trainable_mask

from tests.layers.golden import DictSource, load_case, with_prefix
from tests.models.tiny import loss_and_grad, random_params

TOL = 1e-4
VIDEO_TOKEN, T, Q = 150, 4, 4


@functools.lru_cache(maxsize=None)
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.InstructBlipVideoConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14),
        qformer_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            encoder_hidden_size=32, vocab_size=48, max_position_embeddings=16,
                            cross_attention_frequency=2),
        text_config=dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=256),
        num_query_tokens=Q, video_token_index=VIDEO_TOKEN)
    cfg._attn_implementation = "eager"
    model = transformers.InstructBlipVideoForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norms, biases and queries so that every parameter matters
        model.vision_model.post_layernorm.eps = 1e-5  # LAVIS ln_vision (spec §5, difference 1)
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias") or name == "query_tokens":
                p.copy_(0.05 * torch.randn_like(p))
    return model


def vjax_config() -> MALMMConfig:
    """The same sizes as ``hf_model``, memory bank off (the transformers model has none)."""
    return MALMMConfig.tiny(
        vision=EncoderConfig.tiny("eva", image_size=28, width=32, depth=2, num_heads=4, mlp_dim=64),
        qformer=QFormerConfig.tiny(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, encoder_width=32,
                                   num_query_tokens=Q, text_input=True, vocab_size=48, max_position_embeddings=16),
        llm=DecoderConfig.tiny(vocab_size=160, intermediate_size=96, max_position_embeddings=256),
        num_frames=T, memory_bank=False, placeholder_id=VIDEO_TOKEN)


@functools.lru_cache(maxsize=None)
def converted(tmpdir: str):
    hf_model().save_pretrained(tmpdir)
    module = MALMM(vjax_config())
    params = convert(open_checkpoint(tmpdir), ma_lmm_hf_table(module.config), abstract_params(module))
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def batch():
    """Two clips of 4 frames; LLM ids: 16 video tokens, BOS, prompt (row 1 left-padded); a padded Q-Former prompt."""
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(2, T, 28, 28, 3)).astype(np.float32)
    ids = np.full((2, T * Q + 6), 0, np.int64)
    mask = np.ones_like(ids)
    ids[0] = [VIDEO_TOKEN] * (T * Q) + [1, 20, 21, 22, 23, 24]
    ids[1, 2:] = [VIDEO_TOKEN] * (T * Q) + [1, 30, 31, 32]
    mask[1, :2] = 0
    q_ids = rng.integers(1, 48, size=(2, 5))
    q_mask = np.ones_like(q_ids)
    q_ids[1, 3:], q_mask[1, 3:] = 0, 0
    return frames, ids, mask, q_ids, q_mask


def test_plain_path_matches_transformers_instructblip_video(tmp_path_factory):
    module, params = converted(str(tmp_path_factory.mktemp("ma_lmm_hf")))
    frames, ids, mask, q_ids, q_mask = batch()
    with torch.no_grad():
        ref = hf_model()(pixel_values=torch.tensor(frames).permute(0, 1, 4, 2, 3), input_ids=torch.tensor(ids),
                         attention_mask=torch.tensor(mask), qformer_input_ids=torch.tensor(q_ids),
                         qformer_attention_mask=torch.tensor(q_mask)).logits.numpy()
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                frames=jnp.asarray(frames), qformer_input_ids=jnp.asarray(q_ids),
                                qformer_attention_mask=jnp.asarray(q_mask))
    err = np.abs(np.asarray(out.logits) - ref)[mask.astype(bool)].max()
    print(f"ma_lmm (memory_bank=False) vs InstructBlipVideo: max |Δ logits| = {err:.2e}")
    assert module.config.num_visual_tokens == T * Q
    assert err <= TOL


def test_transformers_layout_round_trip():
    """Every transformers key maps to one parameter and every parameter exports to one key."""
    config = vjax_config()
    names = {k: tuple(v.shape) for k, v in hf_model().state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in flatten_params(abstract_params(MALMM(config))).items()}
    table = ma_lmm_hf_table(config)
    plan = plan_conversion(names, table, expected)
    assert (plan.missing, plan.unexpected, plan.mismatched) == ([], [], [])
    assert {k for k, _, _ in export_plan(list(expected), table)} == set(names)


# ---------------------------------------------------------------------------------------------- memory bank
def golden_config(meta) -> MALMMConfig:
    c = meta["config"]
    qformer = QFormerConfig(hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                            num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                            encoder_width=c["encoder_width"], cross_attention_freq=c["cross_attention_freq"],
                            num_query_tokens=c["num_query_tokens"], text_input=True, vocab_size=c["vocab_size"],
                            max_position_embeddings=c["max_position_embeddings"])
    return MALMMConfig.tiny(vision=EncoderConfig.tiny("eva", width=c["encoder_width"], num_heads=4),
                            qformer=qformer, memory_bank_length=c["memory_bank_length"], num_frames=c["num_frames"])


def test_memory_bank_path_gives_official_last_step_queries():
    """The golden frame features fed to the model's Q-Former stage (MA-LMM's LAVIS key names, loaded through
    the whole-model table) give the official last frame's queries; ``llm_proj`` maps them to the LLM tokens."""
    t, meta = load_case("ma_lmm_memory", "qformer_text")
    config = golden_config(meta).replace(max_num_frames=t["param/image_pe.weight"].shape[0])
    module = MALMM(config)
    expected = abstract_params(module)
    sd = with_prefix(t, "param/")
    params = convert(DictSource(sd), ma_lmm_lavis_table(config), expected, strict=False)  # Q-Former, queries, image_pe
    rng = np.random.default_rng(0)
    params["llm_proj"] = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in expected["llm_proj"].items()}
    assert set(params) == {"qformer", "llm_proj"}  # the stage needs nothing else (EVA and LLM are not run)
    text = dict(qformer_input_ids=jnp.asarray(t["in/input_ids"]),
                qformer_attention_mask=jnp.asarray(t["in/text_attention_mask"]))
    feats = jnp.asarray(t["in/frame_embeds"])  # [B, T, N, E] = ln_vision(EVA(frames))
    queries = jax.jit(functools.partial(module.apply, method="video_queries"))({"params": params}, feats, **text)
    ref = t["out/final_query_output"]
    err = np.abs(np.asarray(queries) - ref).max()
    print(f"ma_lmm memory bank: max |Δ last-step queries| = {err:.2e}")
    assert queries.shape == (2, config.qformer.num_query_tokens, config.qformer.hidden_size) and err <= TOL
    assert config.num_visual_tokens == config.qformer.num_query_tokens  # 32 at the release, whatever T
    tokens = module.apply({"params": params}, queries, method=lambda m, q: m.llm_proj(q))
    w, b = params["llm_proj"]["kernel"], params["llm_proj"]["bias"]
    np.testing.assert_allclose(tokens, ref.astype(np.float32) @ np.asarray(w) + np.asarray(b), atol=1e-4)


def test_tiny_trains_end_to_end_memory_bank():
    module = MALMM(MALMMConfig.tiny())
    assert module.config.memory_bank and module.config.memory_bank_length <= 10
    b = module.example_batch(2)
    rng = np.random.default_rng(1)
    b["frames"] = jnp.asarray(rng.normal(size=b["frames"].shape), jnp.float32)
    b["qformer_input_ids"] = jnp.asarray(rng.integers(1, 48, size=b["qformer_input_ids"].shape), jnp.int32)
    loss, flat = loss_and_grad(module, random_params(module), b)
    assert np.isfinite(loss) and all(np.isfinite(x).all() for x in flat.values())
    for path in ("llm_proj/kernel", "qformer/query_tokens", "qformer/layers_0/self_attn/q_proj/kernel",
                 "qformer/word_embeddings/embedding", "qformer/frame_position/embedding", "vision/ln_vision/scale"):
        assert np.abs(np.asarray(flat[path])).max() > 0, path


# ------------------------------------------------------------------------------------- published sizes
@functools.lru_cache(maxsize=None)
def published_shapes() -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in flatten_params(abstract_params(MALMM(MALMMConfig.ma_lmm_vicuna7b()))).items()}


def test_published_parameter_count():
    """``jax.eval_shape`` of the published config against independent component counts.

    * EVA ViT-g (39 blocks) + ln_vision: 985,897,344 (the transformers ``InstructBlipVisionModel`` meta model
      minus its 39 k-bias vectors of 1408, which LAVIS does not have — spec §1.1, §5 difference 2).
    * InstructBLIP Q-Former (vocab 30523, 512 positions) from the transformers meta model, + 32 x 768 queries.
    * image_pe 120 x 1408; llm_proj 768 x 4096 + 4096.
    * Vicuna-7B v1.1 with the ``[PAD]`` row: Llama-7B 6,738,415,616 (HF safetensors index) + 2 x 4096.
    """
    with torch.device("meta"):
        vision = transformers.InstructBlipVisionModel(transformers.InstructBlipVisionConfig())
        qformer = transformers.InstructBlipQFormerModel(transformers.InstructBlipQFormerConfig(vocab_size=30523))
    n_eva = sum(p.numel() for p in vision.parameters()) - 39 * 1408
    assert n_eva == 985_897_344
    n_qformer = sum(p.numel() for p in qformer.parameters()) + 32 * 768
    expected = n_eva + n_qformer + 120 * 1408 + (768 * 4096 + 4096) + 6_738_415_616 + 2 * 4096
    config = MALMMConfig.ma_lmm_vicuna7b()
    got = sum(int(np.prod(s)) for s in published_shapes().values())
    assert got == expected
    assert config.num_visual_tokens == 32 and config.memory_bank_length == 10 and config.num_frames == 20
    # trainable at fine-tuning (Q-Former, queries, image_pe, ln_vision, llm_proj): ~189 M (spec §4.5)
    assert abs((n_qformer + 120 * 1408 + 2 * 1408 + 768 * 4096 + 4096) / 1e6 - 189) < 1
    assert registry.get("ma_lmm") == (MALMMConfig, MALMM)


def released_keys() -> dict[str, tuple]:
    """A fine-tuned MA-LMM ``checkpoint_best.pth`` as spec §4.5 lists it (trainable parameters only)."""
    keys = {"query_tokens": (1, 32, 768), "ln_vision.weight": (1408,), "ln_vision.bias": (1408,),
            "image_pe.weight": (120, 1408), "llm_proj.weight": (4096, 768), "llm_proj.bias": (4096,),
            "Qformer.bert.embeddings.word_embeddings.weight": (30523, 768),
            "Qformer.bert.embeddings.position_embeddings.weight": (512, 768),
            "Qformer.bert.embeddings.LayerNorm.weight": (768,), "Qformer.bert.embeddings.LayerNorm.bias": (768,),
            "Qformer.bert.embeddings.position_ids": (1, 512)}
    for i in range(12):
        p = f"Qformer.bert.encoder.layer.{i}."
        for kind in ("attention", "crossattention") if i % 2 == 0 else ("attention",):
            for name in ("query", "key", "value"):
                kv_in = 1408 if kind == "crossattention" and name != "query" else 768
                keys[f"{p}{kind}.self.{name}.weight"] = (768, kv_in)
                keys[f"{p}{kind}.self.{name}.bias"] = (768,)
            keys |= {f"{p}{kind}.output.dense.weight": (768, 768), f"{p}{kind}.output.dense.bias": (768,),
                     f"{p}{kind}.output.LayerNorm.weight": (768,), f"{p}{kind}.output.LayerNorm.bias": (768,)}
        for ffn in ("", "_query"):
            keys |= {f"{p}intermediate{ffn}.dense.weight": (3072, 768), f"{p}intermediate{ffn}.dense.bias": (3072,),
                     f"{p}output{ffn}.dense.weight": (768, 3072), f"{p}output{ffn}.dense.bias": (768,),
                     f"{p}output{ffn}.LayerNorm.weight": (768,), f"{p}output{ffn}.LayerNorm.bias": (768,)}
    return keys


def test_finetune_llm_stage_adds_the_llm_and_keeps_eva_frozen():
    """The tiny recipe's frozen-tower stage: the paper's ``finetune`` set plus every LLM parameter."""
    flat = flatten_params(abstract_params(MALMM(MALMMConfig.tiny())))
    stages = MALMMConfig.STAGES
    finetune = {k for k, m in trainable_mask(dict.fromkeys(flat, 0), stages["finetune"]).items() if m}
    both = {k for k, m in trainable_mask(dict.fromkeys(flat, 0), stages["finetune_llm"]).items() if m}
    assert both == finetune | {k for k in flat if k.startswith("llm/")} and finetune < both
    eva = {k for k in flat if k.startswith("vision/") and not k.startswith("vision/ln_vision/")}
    assert eva and not eva & both


def test_released_checkpoint_maps_onto_the_finetune_stage():
    config = MALMMConfig.ma_lmm_vicuna7b()
    expected = published_shapes()
    table = ma_lmm_lavis_table(config)
    plan = plan_conversion(released_keys(), table, expected)
    assert not plan.unexpected and not plan.mismatched, (plan.unexpected, plan.mismatched)
    provided = {d.format(**f) for _, r, f in plan.assignments for d in r.dsts}
    mask = trainable_mask(dict.fromkeys(expected, 0), config.STAGES["finetune"])
    assert provided == {k for k, m in mask.items() if m}
    items = export_plan(list(expected), table)
    assert len({k for k, _, _ in items}) == len(items) and sum(len(p) for _, _, p in items) == len(expected)
