r"""LLaVA-NeXT-Video on the synthetic video-QA set (tiny, CPU), or the data settings of the released 7B model.

COMMAND: python -m experiments.train --config=llava_next_video [--workdir=DIR] [--config.a.b=value]

Variants:
  tiny     2-layer 128-wide LLM, CLIP-style tower at 56 px (8 x 8 patches of 7 px) pooled 2 x 2 -> 16 tokens per
           frame, 4 frames -> 64 visual tokens; everything trains (random init).
  7b       ``llava-hf/LLaVA-NeXT-Video-7B-hf``: 32 frames over the whole clip at 336 px, for chat and eval of the
           converted checkpoint (``python -m experiments.chat --workdir=CONVERTED --config=llava_next_video:7b``).
           The release's training recipe is not reproduced here: training needs ``data.*`` paths and your own
           schedule; the scale switches of the published recipes are set (bfloat16 compute, scanned layers,
           full remat, FSDP over every device), so a fine-tune of the 7B fits a v5p-8 (experiments.plan).
"""

from experiments.configs import common


def get_config(variant: str = "tiny"):
    c = common.base("llava_next_video", variant)
    if variant == "tiny":
        return c
    if variant == "7b":
        c.model_preset = "llava_next_video_7b"
        c.model_overrides = {}
        c.data.num_frames, c.data.image_size = 32, 336
        c.data.tokenizer = "~/models/LLaVA-NeXT-Video-7B-hf"
        c.compute_dtype, c.scan_layers, c.remat_policy = "bfloat16", True, "full"  # as common.published
        c.mesh = (1, -1, 1)
        return c
    raise ValueError(f"unknown llava_next_video variant {variant!r}; known: tiny, 7b")
