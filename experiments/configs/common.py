"""Pieces every experiment config shares (big_vision style: configs are code, overridable by flag).

Keys of a config (``experiments/train.py`` validates all of them before compiling anything):

  model, variant          registry name; the variant name (for the default workdir)
  model_preset            ``Config.<preset>()`` of the model (``tiny``, ``chat_univi_7b`` ...)
  model_overrides         nested fields replaced in that config (``llm.vocab_size`` ...); the placeholder ids
                          come from the tokenizer (the model spec's marker tokens), frames and image size from
                          ``data.num_frames`` / ``data.image_size``
  stage                   key of the model's ``STAGES`` (which parameter paths train)
  stage0.*                pretrained parts ('vision,llm') and their recipe (experiments/pretrain.py)
  align.*                 the alignment stage before the main run: steps, stage, learning_rate, warmup_steps
  compute_dtype           every module's compute dtype (float32 tiny, bfloat16 published); parameters stay float32
  scan_layers, remat_policy, attention_impl
                          set on every block stack (LLM and towers; docs/scale.md): published recipes scan and
                          rematerialise fully; attention 'auto' is splash on TPU, cuDNN on GPU, the einsum on CPU
  init_params             '' (random init) or a directory for ``vjax.from_pretrained`` (HF or vjax)
  data.*                  synthetic set or real annotations, sampler, frames, buckets, batch
  optim.*                 ``vjax.train.optim.OptimConfig`` fields (``total_steps`` follows the top level)
  eval.*                  generation-based validation (records, batch, max_new_tokens)
  mesh                    (data, fsdp, tensor); one -1 takes the remaining devices
  total_steps, log_every, eval_every, save_every, keep_checkpoints, max_nonfinite_in_a_row, seed
"""

from __future__ import annotations

import dataclasses

import ml_collections

from experiments.pretrain import Recipe
from vjax.data.synthetic import SyntheticConfig
from vjax.train.optim import OptimConfig

SYNTHETIC_VOCAB = SyntheticConfig().vocab_size


def base(model: str, variant: str) -> ml_collections.ConfigDict:
    """A tiny CPU run of ``model`` on the synthetic video-QA set (the tiny LLM sized to the synthetic
    tokenizer, a tower of ``TINY_PATCH`` patches); a model's config file states only what differs."""
    c = ml_collections.ConfigDict()
    c.model = model
    c.variant = variant
    c.model_preset = "tiny"
    c.model_overrides = ml_collections.ConfigDict()
    c.model_overrides.llm = llm_overrides()
    c.stage = "full"
    c.init_params = ""
    # stage 0: parts (vision, llm) initialised from the tiny pretraining recipes (experiments/pretrain.py; built once
    # per machine and cached); '' = random init. Then stage 1 (align.steps > 0): only align.stage trains, on the
    # set's captions, in <workdir>/align; then the main run (stage 2: ``stage``) starts from its parameters.
    c.stage0 = ml_collections.ConfigDict(dict(parts="", **dataclasses.asdict(Recipe())))
    c.align = ml_collections.ConfigDict(dict(steps=0, stage="", learning_rate=2e-3, warmup_steps=20))
    c.compute_dtype = "float32"  # every module's dtype (parameters stay float32: master weights); bfloat16 at scale
    # every block stack of the model (LLM, towers): one scanned block, the remat policy, the attention kernel
    c.scan_layers = False
    c.remat_policy = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable | offload
    c.attention_impl = "auto"  # auto | xla | chunked | cudnn | splash (auto: splash on TPU, cuDNN on GPU)

    c.total_steps = 3000
    c.log_every = 20
    c.eval_every = 500
    c.save_every = 500
    c.keep_checkpoints = 2
    c.max_nonfinite_in_a_row = 5  # NaN/Inf steps are skipped and counted; this many in a row stop the run
    c.seed = 0
    c.mesh = (-1, 1, 1)

    d = c.data = ml_collections.ConfigDict()
    d.root = ""  # synthetic set directory; '' -> ~/.cache/vjax/synthetic/<hash of data.synthetic>
    d.synthetic = ml_collections.ConfigDict(dataclasses.asdict(SyntheticConfig()))
    d.synthetic.num_train = 4000  # 12,000 QA records: a from-scratch tower needs the clips (shape: 1000 -> 0.69 vs 250 -> 0.34 in a probe)
    d.synthetic.num_test = 200  # 600 test questions: per-type accuracy within about +-6 %
    d.train_records = "questions"  # synthetic: the question records, or "captions" (one per clip: the alignment stage)
    # synthetic: train (and validate) on the questions the model can answer from its inputs ("answerable": no beep
    # questions without an audio branch, no subtitle questions without subtitles in the template), or "all"
    d.train_questions = "answerable"
    d.train_annotations = ""  # real data: JSON/JSONL conversation records ('' = the synthetic set)
    d.val_annotations = ""
    d.video_root = ""  # relative video paths of real annotations resolve here ('' = the file's folder)
    d.tokenizer = ""  # '' = the synthetic set's tokenizer
    d.template_variant = ""  # '' = the model's default chat template variant
    d.sampler = ""  # a sampler of vjax.data.sampling; '' = the model's (its spec); data.num_frames is its frame count
    d.sampler_kwargs = ml_collections.ConfigDict()
    d.num_frames = 4  # static frame count T (the model's num_frames)
    d.image_size = 56  # frames are resized on decode to image_size^2 (the model's vision input)
    # native-resolution models (Qwen2-VL): (height, width) frame shapes; each clip trains at the one nearest its
    # aspect ratio, one static batch shape per bucket ('()': every clip at image_size^2)
    d.frame_buckets = ()
    d.text_buckets = (64, 128, 192, 256)  # token-length buckets; the clip's visual tokens are added
    # the LM head runs on the supervised (answer) positions only, padded to one of these counts; () = everywhere
    d.loss_position_buckets = (16, 64, 256, 1024)
    d.batch_size = 16  # global batch (split over processes, then over data x fsdp devices)
    # Grain worker processes decoding the next batches while the step runs (0: decode in the training process). One
    # worker: the tiny chat_univi run 1.36x faster over 700 steps on 2 cores, no data wait after the first batches
    d.worker_count = 1
    # batches read ahead by a thread of the training process (0: none); on 2 CPU cores it slowed the tiny run (the
    # decoding holds the GIL the step's dispatch needs): the worker process is the default overlap
    d.prefetch = 0
    d.load_audio = False
    d.turns_per_record = 1  # >1: a clip's training questions joined into multi-turn records (annotations.merge_turns)
    d.cache_mb = 1024  # decoded clips kept in memory per process: the synthetic set decodes once (~150 MB)
    d.max_bad_fraction = 0.1  # records with unreadable videos are skipped and counted; more than this fails

    o = c.optim = ml_collections.ConfigDict(dataclasses.asdict(OptimConfig()))
    o.total_steps = c.get_ref("total_steps")
    o.learning_rate = 1e-3
    o.warmup_steps = 100

    e = c.eval = ml_collections.ConfigDict()
    e.records = 32  # validation records generated with the KV cache at each eval (0: no eval)
    e.batch_size = 8
    e.max_new_tokens = 12
    # at the end of training: the synthetic set's test split answered and scored as experiments.eval does, its table
    # printed and its report written to <workdir>/eval/synthetic_test.json (-1: every question, 0: none, N: first N)
    e.test_records = -1
    tiny_vision(c)
    return c


TINY_WIDTH = 128  # LLM width of the tiny runs (Qwen2-VL's merger / CogVLM2's adapter output it too)


def llm_overrides(vocab: int = SYNTHETIC_VOCAB, hidden: int = TINY_WIDTH, layers: int = 2, heads: int = 8,
                  kv_heads: int = 4, mlp: int = 2 * TINY_WIDTH) -> ml_collections.ConfigDict:
    """The tiny LLM, sized to the synthetic tokenizer (BOS <s> = 1, EOS </s> = 2, pad = 0); head_dim 16
    (Qwen2-VL's tiny M-RoPE sections (2, 3, 3) need head_dim 16)."""
    return ml_collections.ConfigDict(dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                          num_kv_heads=kv_heads, intermediate_size=mlp, bos_token_id=1,
                                          eos_token_id=2, pad_token_id=0))


TINY_PATCH = 7  # tiny towers see 8 x 8 patches of the 56-px frames: a from-scratch tower tells the synthetic
# shapes apart far better than with 4 x 4 patches of 14 px (shape probe on 1000 frames: 0.69 vs 0.47)


def tiny_vision(c: ml_collections.ConfigDict, **fields) -> None:
    """Set the tiny run's vision-tower fields (patch size ``TINY_PATCH`` plus ``fields``) in ``model_overrides``."""
    vision = c.model_overrides.get("vision")
    vision = vision.to_dict() if vision is not None else {}
    c.model_overrides.vision = {**vision, "patch_size": TINY_PATCH, **fields}


def staged(c: ml_collections.ConfigDict, *, align_steps: int, align_stage: str, stage: str,
           parts: str = "vision,llm") -> None:
    """The tiny runs' papers' recipe: stage 0 the pretrained ``parts`` (``experiments.pretrain``, cached: the
    tower and the LLM, and the Q-Former models' connector), stage 1 ``align_stage`` for ``align_steps`` on the
    captions (lr 2e-3, warmup 20), stage 2 ``stage`` on the questions (``total_steps``)."""
    c.stage0.parts = parts
    c.align.update(steps=align_steps, stage=align_stage, learning_rate=2e-3, warmup_steps=20)
    c.stage = stage


def published(c: ml_collections.ConfigDict, *, preset: str, stage: str, lr: float, warmup: int, steps: int,
              batch: int, frames: int, image_size: int, data_dir: str, tokenizer: str, init_params: str,
              text_len: int = 2048, weight_decay: float = 0.0, min_lr_ratio: float = 0.0,
              mesh=(1, -1, 1)) -> ml_collections.ConfigDict:
    """Switch ``c`` to a published recipe on real data: ``data_dir/train.json`` (+ ``val.json``) in the
    VideoInstruct conversation format, a local tokenizer and converted weights. These paths must exist
    (``train.py`` fails early naming the key)."""
    c.model_preset = preset
    c.model_overrides = ml_collections.ConfigDict()
    c.compute_dtype = "bfloat16"
    c.scan_layers, c.remat_policy = True, "full"  # 32-40 layers compile as one; activations recomputed per block
    c.stage = stage
    c.init_params = init_params
    c.total_steps = steps
    c.log_every, c.eval_every, c.save_every = 50, 1000, 1000
    c.mesh = mesh
    c.data.train_annotations = f"{data_dir}/train.json"
    c.data.val_annotations = f"{data_dir}/val.json"
    c.data.tokenizer = tokenizer
    c.data.num_frames = frames
    c.data.image_size = image_size
    c.data.text_buckets = (512, 1024, text_len)
    c.data.batch_size = batch
    c.data.worker_count = 8
    c.data.cache_mb = 0  # real sets are read about once per epoch
    c.optim.learning_rate = lr
    c.optim.warmup_steps = warmup
    c.optim.weight_decay = weight_decay
    c.optim.min_lr_ratio = min_lr_ratio
    c.eval.records = 256
    c.eval.max_new_tokens = 64
    return c
