r"""MA-LMM on the synthetic video-QA set (tiny, CPU; memory banks over the frames) or its QA recipe.

COMMAND: python -m experiments.train --config=ma_lmm[:tiny|msrvtt_qa|caption] [--workdir=DIR] [--config.a.b=value]

Variants:
  tiny       2-layer 128-wide LLM; EVA-style tower at 56 px; InstructBLIP-style Q-Former (4 queries) reading
             the question with the synthetic tokenizer; memory bank of 2 over 4 frames -> 4 visual tokens.
             Staged: the stage-0 tower and LLM (as chat_univi's) and connector (the memory-bank Q-Former
             trained to name the clip's objects, one per token), stage 1 (800 steps) ``finetune`` on captions,
             stage 2 (2400) everything.
  msrvtt_qa  the QA runs: Q-Former, queries, ``llm_proj``, ``ln_vision`` and ``image_pe`` train (EVA, Vicuna
             frozen); lr 1e-4, wd 0.05, linear warmup 1000 then cosine, 20 frames, memory bank 10
             (spec_qformer_family §4.1, §4.4).
  caption    captioning runs: 80 frames, memory bank 40, lr 1e-5.
Real-data variants read ``~/data/ma_lmm/<task>/{train,val}.json``.
"""

from experiments.configs import common


def get_config(variant: str = "tiny"):
    c = common.base("ma_lmm", variant)
    # The Q-Former reads the question with the synthetic tokenizer (the release: BERT's).
    c.model_overrides.qformer = {"vocab_size": common.SYNTHETIC_VOCAB, "max_position_embeddings": 64}
    c.model_overrides.qformer_text_len = 48
    if variant == "tiny":
        # the paper's parts at tiny size: stage 0 the pretrained tower, LLM and Q-Former (experiments/pretrain.py,
        # cached; the release's Q-Former is InstructBLIP's, pretrained),
        # stage 1 its trainable set (``finetune``: ln_vision, Q-Former with its memory banks, llm_proj) on the
        # captions, stage 2 everything on the questions
        common.staged(c, align_steps=800, align_stage="finetune", stage="full", parts="vision,llm,connector")
        c.total_steps = 2400  # from random weights 3000 steps took 1399 s here (2.2-2.7 steps/s)
        return c
    args = dict(preset="ma_lmm_vicuna7b", stage="finetune", image_size=224, text_len=512, weight_decay=0.05,
                warmup=1000, tokenizer="~/models/vicuna-7b-v1.1", init_params="~/models/MA-LMM")
    if variant == "msrvtt_qa":
        common.published(c, lr=1e-4, steps=20000, batch=64, frames=20, data_dir="~/data/ma_lmm/msrvtt_qa", **args)
    elif variant == "caption":
        common.published(c, lr=1e-5, steps=20000, batch=64, frames=80, data_dir="~/data/ma_lmm/msrvtt_caption",
                         **{**args, "preset": "ma_lmm_caption"})
    else:
        raise ValueError(f"unknown ma_lmm variant {variant!r}; known: tiny, msrvtt_qa, caption")
    return c
