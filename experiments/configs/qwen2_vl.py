r"""Qwen2-VL on the synthetic video-QA set (tiny, CPU) or an instruction-tuning recipe at 7B / 2B.

COMMAND: python -m experiments.train --config=qwen2_vl[:tiny|7b|2b] [--workdir=DIR] [--config.a.b=value]

Variants:
  tiny  2-layer 128-wide Qwen2 LLM with M-RoPE, 2-block ViT at 56 px with 7-px patches, 4 frames -> (2 x 8 x 8) / 4
        = 32 visual tokens. Staged: the stage-0 tower and LLM (as chat_univi's), stage 1 (800 steps) the ViT and merger
        on captions, stage 2 everything.
  7b    the paper's stage 3 (instruction tuning on ChatML data): the ViT frozen, the LLM trains
        (stage ``llm``); 2 fps sampling. The paper gives no learning rate: 1e-5, cosine, warmup 3 %
        here (unverified; spec_vit_family §5.8). Reads ``~/data/qwen2_vl/{train,val}.json``.
  2b    the same with Qwen2-VL-2B.
"""

from experiments.configs import common


def get_config(variant: str = "tiny"):
    c = common.base("qwen2_vl", variant)
    common.tiny_vision(c, out_dim=common.TINY_WIDTH)  # out_dim = llm.hidden_size
    c.data.sampler_kwargs.nframes = c.data.get_ref("num_frames")  # a fixed count (the release: 2 fps, see 7b)
    if variant == "tiny":
        # the paper's stages at tiny size: stage 0 the pretrained tower and LLM (experiments/pretrain.py, cached; as
        # the paper's ViT starts from DFN's), stage 1 the ViT and merger on the captions with the LLM frozen (the
        # paper's first stage), stage 2 everything on the questions
        common.staged(c, align_steps=800, align_stage="vision", stage="full")
        return c
    if variant in ("7b", "2b"):
        common.published(c, preset=f"qwen2_vl_{variant}", stage="llm", lr=1e-5, warmup=300, steps=10000, batch=64,
                         frames=16, image_size=448, data_dir="~/data/qwen2_vl",
                         tokenizer=f"~/models/Qwen2-VL-{variant.upper()}-Instruct",
                         init_params=f"~/models/Qwen2-VL-{variant.upper()}-Instruct", text_len=8192)
        c.data.sampler_kwargs = {"sample_fps": 2.0}  # at most data.num_frames
        return c
    raise ValueError(f"unknown qwen2_vl variant {variant!r}; known: tiny, 7b, 2b")
