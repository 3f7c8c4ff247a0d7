"""MA-LMM (He et al. 2024, arXiv 2404.05726): an InstructBLIP Q-Former run online over the frames with a
visual and a query memory bank; the last step's 32 queries prefix a frozen Vicuna decoder.

    f_t = ln_vision(EVA(frame_t))                               [B, T, 257, 1408]
    memory bank (default):
        h_t = MemoryQFormer(f_t + image_pe[t], banks_{t-1}, instruction)   banks: MA-LMM §3.2 (nn.scan)
        Z   = llm_proj(h_T[:, :32])                             [B, 32, D]
    memory_bank=False (InstructBLIP-video, = transformers ``InstructBlipVideoForConditionalGeneration``):
        Z   = concat_t llm_proj(QFormer(f_t, instruction)[:, :32])   [B, T*32, D]
    logits = Vicuna(splice(embed(ids), Z))                      visual tokens first, then BOS and the prompt

The Q-Former reads the instruction as BERT ids (``qformer_input_ids`` / ``qformer_attention_mask``);
the LLM ids carry the visual placeholders at the start (spec §4.4, ``vjax.data.templates._ma_lmm``).
Source: spec_qformer_family.md §4 (official ``lavis/models/blip2_models/blip2_vicuna_instruct.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vjax.layers.mlp import dense
from vjax.layers.qformer import MemoryQFormer, MemoryQFormerState, QFormer, QFormerConfig
from vjax.models.decoder import CausalLM, DecoderConfig
from vjax.models.encoders import Encoder, EncoderConfig
from vjax.models.spec import ModelSpec, Preprocess, Visual
from vjax.models.video_llm import VideoLLM


_FINETUNE = (r"^vision/ln_vision/", r"^qformer/", r"^llm_proj/")  # the run scripts' trainable set


@dataclasses.dataclass(frozen=True)
class MALMMConfig:
    vision: EncoderConfig = EncoderConfig.tiny("eva")
    qformer: QFormerConfig = QFormerConfig.tiny(encoder_width=32, num_query_tokens=4, text_input=True, vocab_size=48,
                                                max_position_embeddings=16)
    llm: DecoderConfig = DecoderConfig.tiny()
    num_frames: int = 4
    memory_bank: bool = True
    memory_bank_length: int = 2  # released QA runs: 10 (20 frames); captioning: 40 (80 frames)
    max_num_frames: int = 120  # rows of image_pe
    qformer_text_len: int = 6  # instruction length of example batches
    placeholder_id: int = 4
    _nested_configs = {"vision": EncoderConfig, "qformer": QFormerConfig, "llm": DecoderConfig}

    def __post_init__(self):
        if self.qformer.encoder_width != self.vision.width:
            raise ValueError(f"qformer.encoder_width={self.qformer.encoder_width} must equal "
                             f"vision.width={self.vision.width}")

    def replace(self, **kw) -> "MALMMConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_visual_tokens(self) -> int:
        """32 with the memory bank (whatever T); ``T * 32`` on the plain InstructBLIP-video path."""
        q = self.qformer.num_query_tokens
        return q if self.memory_bank else q * self.num_frames

    @classmethod
    def tiny(cls, **kw) -> "MALMMConfig":
        return cls(**kw)

    @classmethod
    def ma_lmm_vicuna7b(cls, **kw) -> "MALMMConfig":
        """MA-LMM (QA runs): EVA ViT-g, InstructBLIP Q-Former, Vicuna-7B v1.1 (vocab 32001 with ``[PAD]``),
        20 frames, memory bank length 10. ``</s>`` (id 2) is the LLM's BOS."""
        base = dict(vision=EncoderConfig.eva_vit_g(), qformer=QFormerConfig.instructblip(),
                    llm=DecoderConfig.llama_7b(vocab_size=32001, bos_token_id=2, pad_token_id=32000),
                    num_frames=20, memory_bank_length=10, qformer_text_len=32, placeholder_id=32001)
        return cls(**{**base, **kw})

    @classmethod
    def ma_lmm_caption(cls, **kw) -> "MALMMConfig":
        """MA-LMM captioning runs (MSRVTT/MSVD/YouCook2): 80 frames, memory bank length 40."""
        return cls.ma_lmm_vicuna7b(**{"num_frames": 80, "memory_bank_length": 40, **kw})

    # Trainable per the run scripts (spec §4.1, §4.4): all but EVA and the LLM.
    STAGES = {
        "finetune": _FINETUNE,
        "finetune_llm": (*_FINETUNE, r"^llm/"),  # + the LLM; EVA frozen
        "full": None,
    }


class MALMM(VideoLLM):
    config: MALMMConfig

    def setup(self):
        c = self.config
        self.vision = Encoder(c.vision)  # EVA ViT-g + ln_vision
        if c.memory_bank:
            self.qformer = MemoryQFormer(c.qformer, memory_bank_length=c.memory_bank_length,
                                         num_frame_positions=c.max_num_frames)  # image_pe: qformer/frame_position
        else:
            self.qformer = QFormer(c.qformer)
        self.llm_proj = dense(c.llm.hidden_size, ("mlp", "embed"), use_bias=True, dtype=jnp.dtype(c.llm.dtype),
                              param_dtype=jnp.dtype(c.llm.param_dtype))
        self.llm = CausalLM(c.llm)

    def video_queries(self, feats: jax.Array, frame_mask: jax.Array | None = None,
                      qformer_input_ids: jax.Array | None = None,
                      qformer_attention_mask: jax.Array | None = None) -> jax.Array:
        """Frame features ``[B, T, N, E]`` (after ``ln_vision``) -> Q-Former query outputs: ``[B, Q, 768]``
        (last step of the memory-bank scan) or ``[B, T*Q, 768]`` (per frame, frame-major)."""
        c = self.config
        b, t = feats.shape[:2]
        q = c.qformer.num_query_tokens
        if c.memory_bank:
            hidden, _ = self.qformer(feats, input_ids=qformer_input_ids, text_mask=qformer_attention_mask,
                                     frame_valid=frame_mask)  # [B, T, Q+Lt, 768]
            return hidden[:, -1, :q]
        rep = lambda x: None if x is None else jnp.repeat(x, t, axis=0)  # noqa: E731  text per frame
        hidden = self.qformer(feats.reshape(b * t, *feats.shape[2:]), input_ids=rep(qformer_input_ids),
                              text_mask=rep(qformer_attention_mask))  # [B*T, Q+Lt, 768]
        return hidden[:, :q].reshape(b, t * q, -1)

    def connector_queries(self, frames: jax.Array, frame_mask: jax.Array | None = None,
                          qformer_input_ids: jax.Array | None = None,
                          qformer_attention_mask: jax.Array | None = None) -> jax.Array:
        """``frames [B, T, H, W, 3]`` -> the Q-Former's query outputs (:meth:`video_queries`, before ``llm_proj``)."""
        return self.video_queries(self.frame_features(frames), frame_mask, qformer_input_ids, qformer_attention_mask)

    def encode(self, frames: jax.Array, frame_mask: jax.Array | None = None,
               qformer_input_ids: jax.Array | None = None,
               qformer_attention_mask: jax.Array | None = None) -> jax.Array:
        """``frames [B, T, H, W, 3]`` -> visual tokens ``[B, num_visual_tokens, D]``."""
        return self.llm_proj(self.connector_queries(frames, frame_mask, qformer_input_ids, qformer_attention_mask))

    # ------------------------------------------------------------------ streaming (videos of any length)
    def stream_init(self, batch: int, text_len: int = 0) -> MemoryQFormerState:
        """Empty memory banks for :meth:`stream_step` (``text_len``: Q-Former instruction length)."""
        c = self.config
        if not c.memory_bank:
            raise ValueError("streaming needs the memory bank (memory_bank=True)")
        n = c.vision.num_positions  # tokens per frame entering the Q-Former (CLS + patches)
        return self.qformer.init_state(batch, n, text_len, jnp.dtype(c.vision.dtype))

    def stream_step(self, state: MemoryQFormerState, frames: jax.Array, frame_mask: jax.Array | None = None,
                    qformer_input_ids: jax.Array | None = None,
                    qformer_attention_mask: jax.Array | None = None) -> tuple[MemoryQFormerState, jax.Array]:
        """Feed a chunk ``frames [B, n, H, W, 3]`` (``frame_mask [B, n]`` marks padding) through EVA and the
        memory-bank Q-Former, continuing from ``state``. Returns the new state and the visual tokens
        ``[B, Q, D]`` after the chunk's last real frame. Running a video chunk by chunk gives what
        :meth:`encode` gives on the whole video, with memory fixed by the chunk size, not the length."""
        q = self.config.qformer.num_query_tokens
        hidden, state = self.qformer(self.frame_features(frames), input_ids=qformer_input_ids,
                                     text_mask=qformer_attention_mask, frame_valid=frame_mask, state=state)
        return state, self.llm_proj(hidden[:, -1, :q])

    def example_batch(self, batch: int = 2) -> dict[str, jax.Array]:
        """``[placeholders ; BOS ; prompt ; answer]`` (visual tokens first), frames and the Q-Former prompt."""
        c = self.config
        s, lt, text = c.vision.image_size, c.qformer_text_len, 8
        ids = jnp.concatenate([jnp.full((batch, c.num_visual_tokens), c.placeholder_id, jnp.int32),
                               jnp.full((batch, 1), c.llm.bos_token_id or 1, jnp.int32),
                               jnp.full((batch, text), 5, jnp.int32)], axis=1)
        return {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
                "loss_mask": jnp.zeros_like(ids).at[:, -text // 2:].set(1),
                "frames": jnp.zeros((batch, c.num_frames, s, s, 3), jnp.float32),
                "frame_mask": jnp.ones((batch, c.num_frames), bool),
                "qformer_input_ids": jnp.ones((batch, lt), jnp.int32),
                "qformer_attention_mask": jnp.ones((batch, lt), jnp.int32)}


SPEC = ModelSpec(
    name="ma_lmm", config=MALMMConfig, module=MALMM,
    template="ma_lmm", visual=(Visual("video", "num_visual_tokens"),),
    preprocess=Preprocess("square", "pil_bicubic", source="MA-LMM eval: Resize((224, 224), bicubic) on PIL"),
    sampler="segment_random", marker_tokens={"placeholder_id": "<video>"},
    conversion="vjax.convert.ma_lmm", qformer_text="qformer_text_len", streams_frames="memory_bank",
    connector=("qformer",))
