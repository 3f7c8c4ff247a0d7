"""What the benchmarks measure: the dimensions of every suite per ``--size``, the optimizer both
contenders of ``train_step`` use, and the targets each figure is reported against."""

from __future__ import annotations

import dataclasses


# Targets (issues "Benchmarks" and "Faster steps, honest benchmarks"). Each is reported whether met or not.
TARGETS = {
    "train_speedup": 1.5,  # vjax steps/s >= 1.5x transformers on CPU (the faster of eager and torch.compile)
    "generate_speedup": 2.5,  # vjax tokens/s >= 2.5x transformers, identical tokens
    "train_mfu": 0.45,  # model FLOPs/s >= 45% of the measured matmul peak
    "memory_bank_growth": 1.1,  # compiled memory at 1000 frames <= 1.1x at 10 frames
    "data_headroom": 2.0,  # pipeline clips/s >= 2x what the training step consumes
    "trainer_overhead": 1.05,  # the Trainer step <= 1.05x the same model under a bare optax loop
}


# The optimizer of both train_step contenders (AdamW; weight decay on matrices; global-norm clip).
OPTIM = dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0)


# ------------------------------------------------------------------------------------------ sizes
@dataclasses.dataclass(frozen=True)
class VLSize:
    """Qwen2-VL of the ``train_step`` suite: Qwen2 decoder (HF names), vision tower, clip geometry.

    Each batch row is ``prompt`` text tokens, ``<|vision_start|>``, the clip's ``t*h*w/4`` video
    tokens, ``<|vision_end|>``, ``question`` tokens and ``answer`` tokens (the loss is on the answer)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    vision_depth: int
    vision_width: int
    vision_heads: int
    vision_mlp_ratio: int
    frames: int
    image_size: int
    batch: int
    prompt: int
    question: int
    answer: int

    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid ``(t, h, w)`` of one clip (temporal patch 2, an odd count padded; patch 14)."""
        return (-(-self.frames // 2), self.image_size // 14, self.image_size // 14)

    @property
    def visual_tokens(self) -> int:
        """LLM tokens per clip after the 2x2 merger: ``t * h * w / 4``."""
        t, h, w = self.grid
        return t * h * w // 4

    @property
    def seq(self) -> int:
        return self.prompt + 1 + self.visual_tokens + 1 + self.question + self.answer


@dataclasses.dataclass(frozen=True)
class Size:
    """Every dimension a suite uses, per ``--size``."""

    matmul_n: int
    # decoder LM shared by train_step / generate (HF LlamaConfig names)
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    seq: int
    batch: int
    prompt_len: int
    new_tokens: int
    # token_merge
    merge_tokens: tuple[int, ...]
    merge_width: int
    merge_max_bytes: int  # compile, but do not run, counts whose compiled memory exceeds this
    # memory_bank
    bank_frames: tuple[int, ...]
    bank_capacity: int
    bank_tokens: int
    bank_width: int
    bank_queries: int
    # data
    data_clips: int
    data_batches: int
    data_frame_size: tuple[int, int]
    data_frames: int
    data_workers: tuple[int, ...]  # Grain worker counts measured (0: in-process)
    # qwen2_vl train step
    vl: VLSize
    # attention: causal self-attention forward + backward per implementation, at each length
    attn_lengths: tuple[int, ...] = (256,)
    attn_heads: int = 4
    attn_kv_heads: int = 2
    attn_head_dim: int = 64


SIZES = {
    "small": Size(
        matmul_n=2048, vocab=32000, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4,
        seq=256, batch=2, prompt_len=128, new_tokens=64,
        merge_tokens=(256, 1024, 4096, 16384), merge_width=1024, merge_max_bytes=8 << 30,
        bank_frames=(10, 100, 1000), bank_capacity=10, bank_tokens=32, bank_width=768, bank_queries=32,
        data_clips=16, data_batches=16, data_frame_size=(224, 224), data_frames=8, data_workers=(0, 2),
        # Qwen's vocabulary (151,936) scaled down to the Llama builder's 32,000; 8 frames at 224 px:
        # grid (4, 16, 16) = 1024 patches per clip -> 256 video tokens; seq 6 + 258 + 24 + 32 = 320.
        vl=VLSize(vocab=32000, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=2,
                  mrope_section=(8, 12, 12), vision_depth=6, vision_width=384, vision_heads=6,
                  vision_mlp_ratio=4, frames=8, image_size=224, batch=2, prompt=6, question=24, answer=32),
        # an accelerator takes these lengths x 4 (see suite_attention)
        attn_lengths=(1024, 4096), attn_heads=8, attn_kv_heads=2, attn_head_dim=64),
    "tiny": Size(
        matmul_n=256, vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
        seq=64, batch=2, prompt_len=8, new_tokens=8,
        merge_tokens=(64, 128), merge_width=1024, merge_max_bytes=1 << 30,
        bank_frames=(10, 100, 1000), bank_capacity=4, bank_tokens=4, bank_width=16, bank_queries=2,
        data_clips=2, data_batches=2, data_frame_size=(56, 56), data_frames=4, data_workers=(0,),
        vl=VLSize(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                  mrope_section=(2, 3, 3), vision_depth=2, vision_width=32, vision_heads=4,
                  vision_mlp_ratio=2, frames=4, image_size=56, batch=2, prompt=4, question=6, answer=8)),
}
