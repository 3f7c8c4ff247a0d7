r"""Chat-UniVi on the synthetic video-QA set (tiny, CPU) or its published recipes.

COMMAND: python -m experiments.train --config=chat_univi[:tiny|stage1|stage2|13b] [--workdir=DIR] [--config.a.b=value]

Variants:
  tiny     stage 0: a tower and an LLM pretrained on the synthetic set (experiments/pretrain.py, built once per
           machine); stage 1: 1200 steps of the projector on captions; stage 2: 9000 steps of the projector and the
           LLM on the questions (the tower frozen; three times the 3000 of 2026-12-03: all test questions 0.342 ->
           0.412, 15 min 33 s with the parts cached on 2026-12-04's machine, docs/results.md). 2-layer 128-wide
           LLM, CLIP-style tower at 56 px (8 x 8 patches of 7 px), 4 frames -> 2 events x (5+3)
           = 16 visual tokens, 4.25x fewer than Video-ChatGPT's pooling of the same features (4 + 64 = 68).
           Two events (temporal ratio 1/2) keep the order of the clip's halves: within one event the merged
           tokens do not depend on frame order, so one event could not tell left from right.
  stage1   multimodal pre-training: only ``mm_projector`` trains (CLIP, LLM frozen); lr 2e-3, cosine,
           warmup 3 %, 1 epoch, global batch 128 (spec_vit_family §3.7).
  stage2   joint instruction tuning: ``mm_projector`` + the LLM; lr 2e-5, cosine, warmup 3 %, 2 epochs,
           global batch 128, 64 frames at 1 fps.
  13b      stage 2 with Vicuna-13B v1.5.
Real-data variants read ``~/data/chat_univi/<stage>/{train,val}.json``, a local Vicuna tokenizer and
converted weights; edit the paths or override ``--config.data.train_annotations=...``.
"""

from experiments.configs import common


def get_config(variant: str = "tiny"):
    c = common.base("chat_univi", variant)
    c.model_overrides.temporal_ratio = 0.5
    c.model_overrides.spatial_ratios = (5, 3)
    c.model_overrides.spatial_ks = (5, 3)
    c.data.sampler_kwargs.sample_fps = 2.0  # 2-5.5 s synthetic clips: >= 4 frames (the release: 1 fps)
    if variant == "tiny":
        # the paper's recipe at tiny size: stage 0 a pretrained tower and LLM (experiments/pretrain.py, cached),
        # stage 1 the projector on captions, stage 2 the projector and the LLM on the questions (tower frozen)
        common.staged(c, align_steps=1200, align_stage="pretrain", stage="finetune")
        c.total_steps = 9000
        c.optim.learning_rate = 5e-4
        return c
    common_args = dict(frames=64, image_size=224, tokenizer="~/models/vicuna-7b-v1.5",
                       init_params="~/models/Chat-UniVi")
    if variant == "stage1":
        common.published(c, preset="chat_univi_7b", stage="pretrain", lr=2e-3, warmup=150, steps=5000, batch=128,
                         data_dir="~/data/chat_univi/stage1", **common_args)
    elif variant in ("stage2", "7b"):
        common.published(c, preset="chat_univi_7b", stage="finetune", lr=2e-5, warmup=300, steps=10000, batch=128,
                         data_dir="~/data/chat_univi/stage2", **common_args)
    elif variant == "13b":
        common.published(c, preset="chat_univi_13b", stage="finetune", lr=2e-5, warmup=300, steps=10000, batch=128,
                         data_dir="~/data/chat_univi/stage2",
                         **{**common_args, "tokenizer": "~/models/vicuna-13b-v1.5",
                            "init_params": "~/models/Chat-UniVi-13B"})
    else:
        raise ValueError(f"unknown chat_univi variant {variant!r}; known: tiny, stage1, stage2, 13b")
    c.data.sampler_kwargs.sample_fps = 1.0
    return c
