"""MiniGPT4-video: frame tokens are EVA patches (CLS dropped) concatenated 1x4 then projected, spliced frame
by frame between subtitle text; LoRA trains (and only it and ``llama_proj`` in the video stage); merged
LoRA weights give the same logits; published parameter counts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from vjax.convert.mapping import convert, export, export_plan, plan_conversion
from vjax.convert.minigpt4_video import minigpt4_video_table
from vjax.layers.lora import merge_lora as fold_lora
from vjax.models import registry
from vjax.models.minigpt4_video import MiniGPT4Video, MiniGPT4VideoConfig, merge_lora
from vjax.pretrained import abstract_params
from vjax.pytree import flatten_params
from vjax.train.optim import OptimConfig, trainable_mask
from vjax.train.sharding import make_mesh
from vjax.train.step import Trainer

from tests.layers.golden import DictSource
from tests.models.tiny import random_params

MODULE = MiniGPT4Video(MiniGPT4VideoConfig.tiny())
PH = MODULE.config.placeholder_id


def interleaved_batch(seed: int = 0):
    """``[INST] <Img>{frame 0}<Cap>sub <Img>{frame 1} <Img>{frame 2}\\n question [/INST] answer``, as ids."""
    c = MODULE.config
    n = c.tokens_per_frame
    ids = [1, 10, 11]  # BOS [INST] <Img>
    for t in range(c.num_frames):
        ids += [PH] * n + ([12, 13, 14] if t == 0 else [11])  # <Cap> subtitle / next <Img>
    ids += [15, 16, 17, 18, 19, 20]  # \n question [/INST] answer
    ids = jnp.asarray([ids, ids], jnp.int32)
    rng = np.random.default_rng(seed)
    s = c.vision.image_size
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.zeros_like(ids).at[:, -2:].set(1),
            "frames": jnp.asarray(rng.normal(size=(2, c.num_frames, s, s, 3)), jnp.float32),
            "frame_mask": jnp.ones((2, c.num_frames), bool)}


def test_frame_tokens_are_adjacent_patch_concat_then_projection():
    params = random_params(MODULE, seed=1)
    b = interleaved_batch()
    frames = b["frames"]
    tokens = jax.jit(lambda p, f: MODULE.apply({"params": p}, f, method="encode"))(params, frames)
    c = MODULE.config
    feats = jax.jit(lambda p, f: MODULE.apply({"params": p}, f, method=lambda m, x: m.vision(x).features))(
        params, frames.reshape(-1, *frames.shape[2:]))  # [B*T, 1 + N, C]
    feats = np.asarray(feats)[:, 1:]  # CLS dropped
    bt, n, width = feats.shape
    grouped = np.stack([np.concatenate([feats[:, 4 * j + k] for k in range(4)], axis=-1) for j in range(n // 4)], 1)
    w, bias = (np.asarray(params["llama_proj"][k]) for k in ("kernel", "bias"))
    assert w.shape == (4 * width, c.llm.hidden_size)
    ref = (grouped @ w + bias).reshape(2, c.num_frames * (n // 4), -1)
    np.testing.assert_allclose(tokens, ref, atol=1e-5)
    assert tokens.shape[1] == c.num_visual_tokens == c.num_frames * c.tokens_per_frame


def test_lora_stage_trains_only_lora_and_projection():
    trainer = Trainer(MODULE, OptimConfig(learning_rate=1e-2, warmup_steps=0), make_mesh((1, 1, 1)),
                      trainable=MiniGPT4VideoConfig.STAGES["video"])
    params = random_params(MODULE, seed=2)
    state = trainer.init_state(params=params)
    state, metrics = trainer.train_step(state, interleaved_batch(seed=3))
    assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0
    before, after = flatten_params(params), flatten_params(jax.device_get(state.params))
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    trainable = {k for k in before if k.startswith("llama_proj/") or k.endswith(("/lora_A", "/lora_B"))}
    assert moved == trainable and len(trainable) == 2 + 2 * 2 * MODULE.config.llm.num_layers


def test_merged_lora_gives_the_same_logits():
    params = random_params(MODULE, seed=4)  # B != 0: the adapters change the output
    b = interleaved_batch(seed=5)
    merged, cfg = merge_lora(params, MODULE.config)
    assert cfg.llm.lora_rank == 0 and not any("lora" in k for k in flatten_params(merged))
    run = lambda m, p: jax.jit(m.apply)({"params": p}, b["input_ids"], frames=b["frames"]).logits  # noqa: E731
    a = run(MODULE, params)
    merged_logits = run(MiniGPT4Video(cfg), merged)
    base = run(MiniGPT4Video(cfg), fold_lora(params, 0.0))  # scale 0: the base weights alone
    assert np.abs(np.asarray(a - base)).max() > 1e-3
    err = np.abs(np.asarray(a - merged_logits)).max()
    print(f"minigpt4_video merged vs LoRA: max |Δ logits| = {err:.2e}")
    assert err <= 1e-5


# ------------------------------------------------------------------------------------- published sizes
def _lora_count(layers: int, width: int, q_out: int, v_out: int, r: int = 64) -> int:
    """A [in, r] + B [r, out] on q_proj and v_proj of every layer."""
    return layers * ((width * r + r * q_out) + (width * r + r * v_out))


@functools.lru_cache(maxsize=None)
def published_shapes(variant: str) -> dict:
    return flatten_params(abstract_params(MiniGPT4Video(getattr(MiniGPT4VideoConfig, variant)())))


def test_published_parameter_counts():
    """EVA ViT-g + ln_vision 985,897,344 (transformers ``Blip2VisionModel`` meta model minus its 39 k-bias
    vectors); llama_proj 5632 x 4096 + 4096 = 23,072,768 (spec §3.5 "23.07 M"); the LLMs' HF totals
    (Llama-2-7B 6,738,415,616; Mistral-7B-v0.2 7,241,732,096, as in tests/convert/test_decoder_layouts.py);
    LoRA r 64 on q/v: 33,554,432 for Llama-2 (the count MiniGPT4-video prints, issue #35), Mistral's v_proj
    is 1024 wide (GQA 8 x 128)."""
    with torch.device("meta"):
        eva = sum(p.numel() for p in transformers.Blip2VisionModel(transformers.Blip2VisionConfig()).parameters())
    eva -= 39 * 1408
    proj = 5632 * 4096 + 4096
    assert proj == 23_072_768 and _lora_count(32, 4096, 4096, 4096) == 33_554_432
    cases = {"minigpt4_video_llama2": (6_738_415_616, _lora_count(32, 4096, 4096, 4096), 45, 2880),
             "minigpt4_video_mistral": (7_241_732_096, _lora_count(32, 4096, 4096, 1024), 90, 5760)}
    for variant, (n_llm, n_lora, frames, tokens) in cases.items():
        config = getattr(MiniGPT4VideoConfig, variant)()
        flat = published_shapes(variant)
        assert sum(int(np.prod(x.shape)) for x in flat.values()) == eva + proj + n_llm + n_lora, variant
        assert sum(int(np.prod(x.shape)) for k, x in flat.items() if "lora" in k) == n_lora
        assert (config.num_frames, config.num_visual_tokens, config.tokens_per_frame) == (frames, tokens, 64)
        assert (config.llm.lora_rank, config.llm.lora_alpha) == (64, 16.0)
    # the released Llama-2 video checkpoint (680 MB) = (llama_proj + LoRA) x 4 bytes x 3 (spec §3.5)
    assert abs((proj + 33_554_432) * 12 / 1e6 - 680) < 1
    assert registry.get("minigpt4_video") == (MiniGPT4VideoConfig, MiniGPT4Video)


# ------------------------------------------------------------------------------------- checkpoint layout
def released_keys(v_out: int, default: bool) -> dict[str, tuple]:
    """``video_*_checkpoint_*.pth`` keys as spec §3.5 lists them (peft 0.2.0, or newer peft's ``.default.``)."""
    keys = {"llama_proj.weight": (4096, 5632), "llama_proj.bias": (4096,)}
    mid = ".default" if default else ""
    for i in range(32):
        for proj, out in (("q_proj", 4096), ("v_proj", v_out)):
            p = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}"
            keys[f"{p}.lora_A{mid}.weight"] = (64, 4096)
            keys[f"{p}.lora_B{mid}.weight"] = (out, 64)
    return keys


def test_released_checkpoint_maps_onto_the_video_stage():
    """Each released key maps to exactly one parameter; together they are exactly what the video stage trains."""
    for variant, v_out in (("minigpt4_video_llama2", 4096), ("minigpt4_video_mistral", 1024)):
        config = getattr(MiniGPT4VideoConfig, variant)()
        expected = {k: tuple(v.shape) for k, v in published_shapes(variant).items()}
        table = minigpt4_video_table(config)
        trained = {k for k, m in trainable_mask(dict.fromkeys(expected, 0), config.STAGES["video"]).items() if m}
        for default in (False, True):
            plan = plan_conversion(released_keys(v_out, default), table, expected)
            assert not plan.unexpected and not plan.mismatched, (variant, plan.unexpected, plan.mismatched)
            assert {d.format(**f) for _, r, f in plan.assignments for d in r.dsts} == trained
        items = export_plan(list(expected), table)
        assert len({k for k, _, _ in items}) == len(items) and sum(len(p) for _, _, p in items) == len(expected)


def test_whole_model_table_round_trip():
    params = random_params(MODULE, seed=6)
    table = minigpt4_video_table(MODULE.config)
    tensors = dict(export(params, table))
    a = tensors["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    assert a.shape == (MODULE.config.llm.lora_rank, MODULE.config.llm.hidden_size)  # torch [r, in]
    back = flatten_params(convert(DictSource(tensors), table, abstract_params(MODULE)))
    for k, v in flatten_params(params).items():
        np.testing.assert_array_equal(back[k], v)


def test_projector_llm_stage_trains_the_projector_and_the_whole_llm_not_the_tower():
    """The tiny staged run's frozen-tower stage 2: ``llama_proj`` and every LLM parameter (base and LoRA) train."""
    flat = flatten_params(abstract_params(MODULE))
    mask = trainable_mask(dict.fromkeys(flat, 0), MiniGPT4VideoConfig.STAGES["projector_llm"])
    trained = {k for k, m in mask.items() if m}
    assert trained == {k for k in flat if k.startswith(("llama_proj/", "llm/"))}
    assert any("/lora_" in k for k in trained) and any(k.endswith("/kernel") and "/lora_" not in k and
                                                       k.startswith("llm/") for k in trained)
    assert not any(k.startswith("vision/") for k in trained) and any(k.startswith("vision/") for k in flat)
