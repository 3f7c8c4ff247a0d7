r"""MiniGPT4-video on the synthetic video-QA set (tiny, CPU; frames interleaved with subtitles) or its
published stages.

COMMAND: python -m experiments.train --config=minigpt4_video[:tiny|stage2|stage3|mistral] [--workdir=DIR] [--config.a.b=value]

Variants:
  tiny     2-layer 128-wide LLM with LoRA r 4; EVA-style tower at 56 px -> 64 patches of 7 px -> 16 tokens
           per frame (1x4 concat), 4 frames with their subtitles. Staged: the stage-0 tower and LLM (as
           chat_univi's), stage 1 (1200 steps) ``llama_proj`` on captions, stage 2 (2400) everything.
  stage2   video captioning (CMD + WebVid): ``llama_proj`` + LoRA train (EVA, base Llama-2 frozen);
           lr 1e-4 -> 8e-5 cosine, 50 x 1000 iterations, batch 4, 45 frames (spec_qformer_family §3.4).
  stage3   video instruction tuning on VideoInstruct-100K with subtitles; same parts, lr 1e-5.
  mistral  stage 3 with Mistral-7B-Instruct-v0.2, 90 frames.
Real-data variants read ``~/data/minigpt4_video/<stage>/{train,val}.json`` and render the release's training
input (template variant ``train``: one BOS, ``[INST] ...[/INST]answer</s>``); the release's inference prompt
(two BOS) is the variant ``inference`` (``data.template_variant``). Subtitles follow the release's inference rules
(each line once per video, at most 400 words with Llama-2 and 800 with Mistral; ``vjax.data.annotations``).
"""

from experiments.configs import common


def get_config(variant: str = "tiny"):
    c = common.base("minigpt4_video", variant)
    c.data.sampler_kwargs.pad = True  # clips padded with their last frame, as the release's datasets
    if variant == "tiny":
        # staged: stage 0 the pretrained tower and LLM (experiments/pretrain.py, cached), stage 1 the projector on
        # captions (the paper's image_pretrain), stage 2 everything on the questions (the tiny tower is 24 K of the
        # 602 K parameters). On the 600 test questions (docs/results.md): this 0.423 / 0.408 over two seeds (subtitle
        # open 0.906 / 1.000); the tower frozen ("projector_llm") 0.380 / 0.398, subtitle open 0.09-0.13; the
        # paper's stage 2 (projector + LoRA rank 4, LLM frozen) 0.290; from random weights in one stage 0.392
        common.staged(c, align_steps=1200, align_stage="image_pretrain", stage="full")
        c.total_steps = 2400  # 64 tokens: stage 2 at 4.4 steps/s on 2026-12-04's machine (12.7 min in all, parts cached)
        return c
    args = dict(preset="minigpt4_video_llama2", stage="video", frames=45, image_size=224, text_len=4096,
                tokenizer="~/models/Llama-2-7b-chat-hf", init_params="~/models/MiniGPT4-video-llama2")
    if variant == "stage2":
        common.published(c, lr=1e-4, warmup=1000, steps=50000, batch=4, min_lr_ratio=0.8,
                         data_dir="~/data/minigpt4_video/stage2", **args)
    elif variant == "stage3":
        common.published(c, lr=1e-5, warmup=1000, steps=10000, batch=4, min_lr_ratio=0.8,
                         data_dir="~/data/minigpt4_video/stage3", **args)
    elif variant == "mistral":
        common.published(c, lr=1e-5, warmup=1000, steps=10000, batch=1, min_lr_ratio=0.8,
                         data_dir="~/data/minigpt4_video/stage3",
                         **{**args, "preset": "minigpt4_video_mistral", "frames": 90, "text_len": 8192,
                            "tokenizer": "~/models/Mistral-7B-Instruct-v0.2",
                            "init_params": "~/models/MiniGPT4-video-mistral"})
    else:
        raise ValueError(f"unknown minigpt4_video variant {variant!r}; known: tiny, stage2, stage3, mistral")
    c.data.template_variant = "train"
    return c
