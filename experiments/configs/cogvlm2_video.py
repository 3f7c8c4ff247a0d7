r"""CogVLM2-Video on the synthetic video-QA set (tiny, CPU; visual experts, frame timestamps) or a
fine-tuning recipe for the released chat model.

COMMAND: python -m experiments.train --config=cogvlm2_video[:tiny|chat] [--workdir=DIR] [--config.a.b=value]

Variants:
  tiny  2-layer 128-wide Llama-3-style LLM with visual experts; EVA2-style tower at 56 px (7-px patches) -> 4 x 4
        after the 2x2 conv + boi/eoi = 18 tokens per frame, one frame per second (up to 4), each followed
        by its timestamp. Staged: the stage-0 tower and LLM (visual experts copied from the language ones),
        stage 1 (800 steps) the adapter on captions, stage 2 (2000) everything.
  chat  the released ``cogvlm2-video-llama3-chat`` (plain Llama-3-8B, 24 frames at 224 px): the LLM
        trains, the vision tower frozen (stage ``llm``). No official training code exists: lr 1e-5,
        cosine, warmup 3 % are this recipe's choice (spec_vit_family §4.9, unverified).
"""

from experiments.configs import common


def get_config(variant: str = "tiny"):
    c = common.base("cogvlm2_video", variant)
    common.tiny_vision(c, out_dim=common.TINY_WIDTH, glu_dim=2 * common.TINY_WIDTH)  # out_dim = llm.hidden_size
    if variant == "tiny":
        # stage 0 the pretrained tower and LLM (experiments/pretrain.py, cached; the visual experts start as copies
        # of the language ones, as CogVLM's), stage 1 the adapter on the captions, stage 2 everything
        common.staged(c, align_steps=800, align_stage="adapter", stage="full")
        c.total_steps = 2000  # 72 tokens and an expert MLP per layer: 2500 steps took 1226 s here (2.0-2.5 steps/s)
        return c
    if variant == "chat":
        common.published(c, preset="cogvlm2_video_llama3_chat", stage="llm", lr=1e-5, warmup=300, steps=10000,
                         batch=32, frames=24, image_size=224, data_dir="~/data/cogvlm2_video",
                         tokenizer="~/models/cogvlm2-video-llama3-chat",
                         init_params="~/models/cogvlm2-video-llama3-chat")
        return c
    raise ValueError(f"unknown cogvlm2_video variant {variant!r}; known: tiny, chat")
