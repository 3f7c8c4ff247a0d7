r"""Video-LLaMA on the synthetic video-QA set (tiny, CPU; both branches) or its published stages.

COMMAND: python -m experiments.train --config=video_llama[:tiny|stage1|stage2|audio] [--workdir=DIR] [--config.a.b=value]

Variants:
  tiny    2-layer 128-wide LLM; EVA-style tower at 56 px + image Q-Former (4 queries) + video Q-Former
          (6 queries); ImageBind-style audio tower on 2 clips of 2 s (36 mel x 204 frames) + audio
          Q-Former (3 queries): 3 + 6 = 9 visual tokens. Staged: the stage-0 tower and LLM (as chat_univi's),
          audio tower (trained to hear each window's beeps) and connector (image + video Q-Formers trained to
          name the clip's objects, the audio Q-Former its beeps, one per token), stage 1
          (800 steps) the Q-Formers and projections on captions, stage 2 (3000) everything.
  stage1  VL pre-training: frame position embedding, video Q-Former, ``llama_proj`` train (EVA, image
          Q-Former, LLM frozen); lr 1e-4 -> 8e-5 cosine, warmup 2500, 5 x 2500 iterations, 8 GPUs x 32,
          8 frames, head-tail sampling (spec_qformer_family §2.5).
  stage2  VL instruction tuning: same trainable parts; lr 3e-5 -> 1e-5, 3 x 1000 iterations, 8 x 4,
          uniform 8 frames.
  audio   AL instruction tuning: audio position embedding, audio Q-Former, ``audio_llama_proj``; lr 3e-5.
Real-data variants read ``~/data/video_llama/<stage>/{train,val}.json``.
"""

from experiments.configs import common


def get_config(variant: str = "tiny"):
    c = common.base("video_llama", variant)
    c.model_overrides.audio = {"image_width": 204}  # 2 s of 10 ms fbank frames (ImageBind pads 198 -> 204)
    c.model_overrides.num_audio_clips = 2
    c.model_overrides.audio_branch = True  # --config.model_overrides.audio_branch=False --config.data.load_audio=False
    c.data.load_audio = True
    # stage 2 runs ~4.6 steps/s here with the audio branch (10 without: its audio-visual prompt, "Close your eyes,
    # open your ears ...", makes the text 194 tokens at the median against 70): 3000 steps, where 1300 never read the
    # video (docs/results.md, "Video-LLaMA and MA-LMM with a pretrained connector", "Video-LLaMA hears")
    c.total_steps = 3000
    if variant == "tiny":
        # the papers' stages at tiny size: stage 0 the pretrained towers, LLM and connector (experiments/pretrain.py,
        # cached; the image tower as chat_univi's, the audio tower trained to hear the beeps as ImageBind comes
        # pretrained, the connector both branches' Q-Formers, as the paper's image Q-Former is BLIP-2's), stage 1
        # both branches' Q-Formers and projections on the captions (``connectors``), stage 2 everything on the
        # questions
        common.staged(c, align_steps=800, align_stage="connectors", stage="full", parts="vision,audio,llm,connector")
        return c
    args = dict(preset="video_llama2_7b", frames=8, image_size=224, text_len=512, weight_decay=0.05,
                tokenizer="~/models/Llama-2-7b-chat-hf", init_params="~/models/Video-LLaMA-2-7B")
    if variant == "stage1":
        common.published(c, stage="vl_pretrain", lr=1e-4, warmup=2500, steps=12500, batch=256, min_lr_ratio=0.8,
                         data_dir="~/data/video_llama/stage1", **args)
        c.data.sampler = "head_tail_random"
        c.data.load_audio = False
    elif variant == "stage2":
        common.published(c, stage="vl_finetune", lr=3e-5, warmup=300, steps=3000, batch=32, min_lr_ratio=1 / 3,
                         data_dir="~/data/video_llama/stage2", **args)
        c.data.load_audio = False
    elif variant == "audio":
        common.published(c, stage="al_finetune", lr=3e-5, warmup=300, steps=3000, batch=32, min_lr_ratio=1 / 3,
                         data_dir="~/data/video_llama/audio", **args)
        c.model_overrides = {"num_audio_clips": 8}
        c.data.load_audio = True
    else:
        raise ValueError(f"unknown video_llama variant {variant!r}; known: tiny, stage1, stage2, audio")
    c.data.template_variant = "llama2"  # Video-LLaMA-2 (Llama-2-chat)
    return c
