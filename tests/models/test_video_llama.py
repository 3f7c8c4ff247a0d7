"""Video-LLaMA: both branches train end to end at the tiny config, audio tokens come before video tokens,
padding frames/clips are masked, the paper's stages select their modules, and the published variants
have the parameter counts of their component towers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from vjax.convert.mapping import convert, export, export_plan, plan_conversion
from vjax.models import registry
from vjax.models.video_llama import VideoLLaMA, VideoLLaMAConfig
from vjax.pretrained import abstract_params
from vjax.pytree import flatten_params
from vjax.train.optim import trainable_mask

from vjax.convert.video_llama import video_llama_table

from tests.layers.golden import DictSource
from tests.models.tiny import loss_and_grad, random_params

MODULE = VideoLLaMA(VideoLLaMAConfig.tiny())


def batch(seed: int = 1):
    b = MODULE.example_batch(2)
    rng = np.random.default_rng(seed)
    b["frames"] = jnp.asarray(rng.normal(size=b["frames"].shape), jnp.float32)
    b["audio"] = jnp.asarray(rng.normal(size=b["audio"].shape), jnp.float32)
    return b


def test_tiny_trains_both_branches_and_stages_select_their_modules():
    c = MODULE.config
    assert c.audio_branch and c.num_visual_tokens == c.num_audio_tokens + c.num_video_tokens
    params = random_params(MODULE)
    loss, grads = loss_and_grad(MODULE, params, batch())
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())
    stages = {
        "vl_pretrain": ("video_frame_position_embedding/", "video_qformer/", "llama_proj/"),
        "al_pretrain": ("audio_position_embedding/", "audio_qformer/", "audio_llama_proj/"),
        # the tiny recipe's stage 1: everything between the towers and the LLM
        "connectors": ("qformer/", "video_frame_position_embedding/", "video_qformer/", "llama_proj/",
                       "audio_position_embedding/", "audio_qformer/", "audio_llama_proj/"),
        # the same and the LLM: only the towers (EVA with ln_vision, ImageBind) stay frozen
        "connectors_llm": ("qformer/", "video_frame_position_embedding/", "video_qformer/", "llama_proj/",
                           "audio_position_embedding/", "audio_qformer/", "audio_llama_proj/", "llm/"),
    }
    for stage, prefixes in stages.items():
        mask = trainable_mask(params, VideoLLaMAConfig.STAGES[stage])
        chosen = {k for k, m in mask.items() if m}
        assert chosen == {k for k in mask if k.startswith(prefixes)}
        for prefix in prefixes:  # every trainable module of the stage gets a gradient
            assert any(np.abs(grads[k]).max() > 0 for k in chosen if k.startswith(prefix)), (stage, prefix)
        for k in ("video_qformer/query_tokens", "audio_qformer/query_tokens"):
            assert np.abs(grads[k]).max() > 0
    assert any(k.startswith(("vision/", "audio_encoder/")) for k in mask)  # the towers exist, and train in none
    # frozen towers: the image Q-Former, EVA, ImageBind and the LLM are in no stage but "full"
    frozen = ("vision/", "qformer/", "audio_encoder/", "llm/")
    for stage in ("vl_finetune", "al_finetune"):
        mask = trainable_mask(params, VideoLLaMAConfig.STAGES[stage])
        assert not any(m for k, m in mask.items() if k.startswith(frozen))


def test_audio_tokens_precede_video_tokens_and_padding_is_masked():
    params = {"params": random_params(MODULE, seed=2)}
    b = batch(seed=3)

    @jax.jit
    def run(frames, frame_mask, audio, audio_mask):
        kw = dict(frame_mask=frame_mask, audio=audio, audio_mask=audio_mask)
        return (MODULE.apply(params, frames, **kw, method="encode"),
                MODULE.apply(params, audio, audio_mask, method="encode_audio"),
                MODULE.apply(params, frames, frame_mask, method="encode_video"))

    fm = b["frame_mask"].at[1, -1].set(False)  # sample 1: last frame and last clip are padding
    am = b["audio_mask"].at[1, -1].set(False)
    both, audio, video = run(b["frames"], fm, b["audio"], am)
    n_a = MODULE.config.num_audio_tokens
    assert both.shape == (2, MODULE.config.num_visual_tokens, MODULE.config.llm.hidden_size)
    np.testing.assert_array_equal(both[:, :n_a], audio)
    np.testing.assert_array_equal(both[:, n_a:], video)
    # changing padded content changes nothing; changing it in sample 0 (real) does
    frames2 = b["frames"].at[:, -1].add(3.0)
    audio2 = b["audio"].at[:, -1].add(3.0)
    both2, _, _ = run(frames2, fm, audio2, am)
    np.testing.assert_allclose(both2[1], both[1], atol=1e-5)
    assert np.abs(np.asarray(both2[0] - both[0])).max() > 1e-3


# ------------------------------------------------------------------------------------- published sizes
def _meta_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def imagebind_audio_count() -> int:
    """ImageBind-Huge audio modality from torch modules of its definition (spec §2.1): stem conv 16x16 stride
    10 without bias + LayerNorm, CLS, 229 positions, 12 blocks (LayerNorm, MultiheadAttention with
    ``add_bias_kv``, LayerNorm, MLP 3072), head LayerNorm + Linear(768 -> 1024, no bias)."""
    d = 768
    with torch.device("meta"):
        parts = [torch.nn.Conv2d(1, d, 16, 10, bias=False), torch.nn.LayerNorm(d),
                 torch.nn.LayerNorm(d), torch.nn.Linear(d, 1024, bias=False)]
        block = torch.nn.ModuleList([torch.nn.LayerNorm(d), torch.nn.MultiheadAttention(d, 12, add_bias_kv=True),
                                     torch.nn.LayerNorm(d), torch.nn.Linear(d, 3072), torch.nn.Linear(3072, d)])
    return sum(_meta_count(p) for p in parts) + d + 229 * d + 12 * _meta_count(block)


def branch_counts(llm_width: int) -> tuple[int, int, int]:
    """(frozen towers without the LLM, VL trainable, AL trainable) from independent sources:
    EVA ViT-g + ln_vision 985,897,344 (transformers ``Blip2VisionModel`` meta model minus its 39 k-bias
    vectors, which LAVIS's EVA lacks); the Q-Formers from transformers ``Blip2QFormerModel`` meta models
    (+ their query tokens); position tables and projections from spec §2.1."""
    with torch.device("meta"):
        eva = _meta_count(transformers.Blip2VisionModel(transformers.Blip2VisionConfig())) - 39 * 1408
        image_qf = _meta_count(transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig())) + 32 * 768
        video_qf = _meta_count(transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(
            num_hidden_layers=2, cross_attention_frequency=1, encoder_hidden_size=768))) + 32 * 768
        audio_qf = _meta_count(transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(
            num_hidden_layers=2, cross_attention_frequency=1, encoder_hidden_size=1024))) + 8 * 768
    assert eva == 985_897_344
    proj = 768 * llm_width + llm_width
    vl = 32 * 768 + video_qf + proj  # video_frame_position_embedding, video Q-Former + queries, llama_proj
    al = 8 * 1024 + audio_qf + proj  # audio_position_embedding, audio Q-Former + queries, audio_llama_proj
    return eva + image_qf + imagebind_audio_count(), vl, al


# LLM totals: HF safetensors indexes of the releases; Llama-2-13B = 2 x 32000 x 5120 + 40 x 317,204,480 + 5120.
PUBLISHED = {
    "video_llama_vicuna7b": (4096, 6_738_415_616),
    "video_llama2_7b": (4096, 6_738_415_616),
    "video_llama2_13b": (5120, 13_015_864_320),
}
# Released stage checkpoints (HF DAMO-NLP-SG/Video-LLaMA-2-*): trainable params x 4 bytes x 3 (weights and
# two Adam moments, spec §2.6) = file size in MB: (VL, AL).
CHECKPOINT_MB = {4096: (265, 274), 5120: (275, 284)}


@functools.lru_cache(maxsize=None)
def published_shapes(variant: str) -> dict[str, tuple]:
    config = getattr(VideoLLaMAConfig, variant)()
    return {k: tuple(v.shape) for k, v in flatten_params(abstract_params(VideoLLaMA(config))).items()}


def test_published_parameter_counts():
    for variant, (width, n_llm) in PUBLISHED.items():
        config = getattr(VideoLLaMAConfig, variant)()
        towers, vl, al = branch_counts(width)
        got = sum(int(np.prod(s)) for s in published_shapes(variant).values())
        assert got == towers + vl + al + n_llm, variant
        assert (config.num_video_tokens, config.num_audio_tokens, config.num_visual_tokens) == (32, 8, 40)
        assert config.num_frames == 8 and config.num_audio_clips == 8
        mb_vl, mb_al = CHECKPOINT_MB[width]
        assert abs(vl * 12 / 1e6 - mb_vl) < 1.5 and abs(al * 12 / 1e6 - mb_al) < 1.5, (vl, al)
    assert registry.get("video_llama") == (VideoLLaMAConfig, VideoLLaMA)


# ------------------------------------------------------------------------------------- checkpoint layout
def released_keys(branch: str, width: int) -> dict[str, tuple]:
    """The keys of a released VL_* / AL_* checkpoint as spec §2.6 lists them, with their torch shapes."""
    if branch == "vl":
        pos, qf, queries, proj = "video_frame_position_embedding", "video_Qformer", "video_query_tokens", "llama_proj"
        n_q, enc, rows = 32, 768, (32, 768)
    else:
        pos, qf, queries, proj = "audio_position_embedding", "audio_Qformer", "audio_query_tokens", "audio_llama_proj"
        n_q, enc, rows = 8, 1024, (8, 1024)
    keys = {f"{pos}.weight": rows, queries: (1, n_q, 768), f"{qf}.bert.embeddings.LayerNorm.weight": (768,),
            f"{qf}.bert.embeddings.LayerNorm.bias": (768,), f"{qf}.bert.embeddings.position_ids": (1, 512),
            f"{proj}.weight": (width, 768), f"{proj}.bias": (width,)}
    for i in range(2):
        p = f"{qf}.bert.encoder.layer.{i}."
        for kind, kv_in in (("attention", 768), ("crossattention", enc)):
            for name in ("query", "key", "value"):
                keys[f"{p}{kind}.self.{name}.weight"] = (768, 768 if name == "query" else kv_in)
                keys[f"{p}{kind}.self.{name}.bias"] = (768,)
            keys |= {f"{p}{kind}.output.dense.weight": (768, 768), f"{p}{kind}.output.dense.bias": (768,),
                     f"{p}{kind}.output.LayerNorm.weight": (768,), f"{p}{kind}.output.LayerNorm.bias": (768,)}
        keys |= {f"{p}intermediate_query.dense.weight": (3072, 768), f"{p}intermediate_query.dense.bias": (3072,),
                 f"{p}output_query.dense.weight": (768, 3072), f"{p}output_query.dense.bias": (768,),
                 f"{p}output_query.LayerNorm.weight": (768,), f"{p}output_query.LayerNorm.bias": (768,)}
    return keys


def test_released_checkpoints_map_onto_their_stage():
    """Every key of the VL / AL checkpoints maps to exactly one parameter of the published model, and together
    they provide exactly the parameters that stage trains; every parameter exports to one key."""
    for variant, (width, _) in PUBLISHED.items():
        config = getattr(VideoLLaMAConfig, variant)()
        expected = published_shapes(variant)
        table = video_llama_table(config)
        for branch, stage in (("vl", "vl_finetune"), ("al", "al_finetune")):
            plan = plan_conversion(released_keys(branch, width), table, expected)
            assert not plan.unexpected and not plan.mismatched, (variant, branch, plan.unexpected, plan.mismatched)
            provided = {d.format(**f) for _, rule, f in plan.assignments for d in rule.dsts}
            mask = trainable_mask(dict.fromkeys(expected, 0), VideoLLaMAConfig.STAGES[stage])
            assert provided == {k for k, m in mask.items() if m}, (variant, branch)
        items = export_plan(list(expected), table)  # raises if a parameter has no key
        assert len({k for k, _, _ in items}) == len(items) and sum(len(p) for _, _, p in items) == len(expected)


def test_whole_model_table_round_trip():
    params = random_params(MODULE, seed=5)
    table = video_llama_table(MODULE.config)
    tensors = dict(export(params, table))
    assert "audio_encoder.modality_trunks.audio.blocks.1.attn.in_proj_weight" in tensors
    assert "video_Qformer.bert.encoder.layer.1.crossattention.self.key.weight" in tensors
    back = convert(DictSource(tensors), table, abstract_params(MODULE))
    for k, v in flatten_params(params).items():
        np.testing.assert_array_equal(flatten_params(back)[k], v)
