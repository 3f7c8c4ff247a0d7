"""One decoder-only causal LM for the LLaMA family: LLaMA-1/Vicuna, Llama-2, Llama-3, Mistral, Qwen2.

    h_0     = embed(input_ids)            (or inputs_embeds, where video models splice visual tokens)
    h'_l    = h_l + Attn(RMSNorm(h_l))    (RoPE on q/k, GQA, optional q/k/v bias, sliding window)
    h_{l+1} = h'_l + SwiGLU(RMSNorm(h'_l))
    logits  = lm_head(RMSNorm(h_L))       (lm_head tied to the embedding for Qwen2-1.5B)

Numerics follow transformers' ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``.
Position ids are ``[B, L]`` (1-D RoPE) or ``[3, B, L]`` (Qwen2-VL's M-RoPE when ``mrope_section`` is
set); masks are over cache slots, so left-padded batches and KV-cache decoding share one code path.

The block is a factory (``CausalLM(config, block=...)``): :func:`decoder_block` by default, and
:func:`visual_expert_block` for CogVLM's visual-expert layers (a config with ``visual_experts=True``), which
read the per-token routing ``vision [B, L]`` passed through ``CausalLM.__call__(..., vision=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from vjax.layers.attention import Attention, Cache, check_impl, init_cache, structured_mask
from vjax.layers.mlp import GatedMlp, dense, over_sequence_chunks
from vjax.layers.mrope import mrope_cos_sin
from vjax.layers.norm import RMSNorm
from vjax.layers.quant import Embed
from vjax.layers.partitioning import ACTIVATION, constrain
from vjax.layers.rope import rope_cos_sin, rope_inv_freq
from vjax.layers.scan import (IN_PLACE_POLICIES, check_remat_policy, remat_block, resolve_remat, scan_block,
                              scan_grads_in_place)
from vjax.layers.visual_expert import VisualExpertConfig, VisualExpertDecoderLayer
from vjax.models.losses import next_token_head_loss, next_token_loss
from vjax.models.spec import ModelSpec

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a LLaMA-family decoder (names follow HF ``config.json``)."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_scaling dict as sorted items
    mrope_section: tuple[int, ...] | None = None  # Qwen2-VL M-RoPE (temporal, height, width)
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1
    attention_impl: str = "auto"  # vjax.layers.attention.attention: auto | xla | chunked | cudnn | splash (not HF)
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    arch: str = "llama"  # llama | mistral | qwen2 (the HF layout used for export)
    visual_experts: bool = False  # CogVLM: separate vision/language weights in every layer
    vision_qkv_bias: bool = True  # CogVLM's vision expert q/k/v bias (only with visual_experts)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # alias of remat_policy="full" (kept for existing configs)
    remat_policy: str = "none"  # vjax.layers.scan.REMAT_POLICIES: none | full | dots_saveable | ... | offload
    scan_layers: bool = False  # nn.scan over one block: params `layers` [num_layers, ...], stacked KV cache
    # with scan_layers, training: each layer's gradients overwrite its weights' buffer in the backward pass
    # (vjax.layers.scan.scan_grads_in_place; remat_policy "full" or "full_offload")
    grads_in_place: bool = False
    # the MLP over this many pieces of the sequence, one after the other, each rematerialised (same values; the
    # intermediates of one piece live at a time: vjax.layers.mlp.over_sequence_chunks); 1 = whole sequence
    mlp_chunks: int = 1
    # LoRA adapters on attention projections (MiniGPT4-video: r 64, alpha 16 on q_proj, v_proj); 0 = off
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        check_impl(self.attention_impl)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.arch not in ARCHITECTURES.values():
            raise ValueError(f"arch={self.arch!r} is not one of {sorted(set(ARCHITECTURES.values()))}")
        if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.resolved_head_dim:
            raise ValueError(
                f"mrope_section={self.mrope_section} sums to {sum(self.mrope_section)}, "
                f"but must equal head_dim // 2 = {self.resolved_head_dim // 2}"
            )
        check_remat_policy(self.remat_policy)
        if not isinstance(self.mlp_chunks, int) or self.mlp_chunks < 1:
            raise ValueError(f"mlp_chunks={self.mlp_chunks!r} must be an int >= 1")
        if self.grads_in_place:
            policy = resolve_remat(self.remat, self.remat_policy)
            if not self.scan_layers:
                raise ValueError("grads_in_place=True needs scan_layers=True (it rewrites the scanned stack's "
                                 "backward pass)")
            if policy not in IN_PLACE_POLICIES:
                raise ValueError(f"grads_in_place=True recomputes every layer from its input, as remat_policy "
                                 f"{' or '.join(map(repr, IN_PLACE_POLICIES))} does; remat_policy={policy!r} "
                                 f"asks otherwise")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def expert_config(self) -> VisualExpertConfig:
        """The visual-expert layer configuration with this decoder's sizes (CogVLM)."""
        return VisualExpertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, hidden_act=self.hidden_act,
            vision_qkv_bias=self.vision_qkv_bias, language_qkv_bias=self.attention_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, attention_impl=self.attention_impl)

    @classmethod
    def from_expert_config(cls, c: VisualExpertConfig, **kw) -> "DecoderConfig":
        """A visual-expert decoder (CogVLM's language model) from the layer configuration."""
        return cls(**{**dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_layers, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps,
            rope_theta=c.rope_theta, hidden_act=c.hidden_act, attention_bias=c.language_qkv_bias,
            visual_experts=True, vision_qkv_bias=c.vision_qkv_bias, dtype=c.dtype, param_dtype=c.param_dtype,
            attention_impl=c.attention_impl), **kw})

    def replace(self, **kw) -> "DecoderConfig":
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- published configurations
    @classmethod
    def tiny(cls, **kw) -> "DecoderConfig":
        """A 2-layer, 64-wide decoder that trains on a CPU in seconds."""
        return cls(**kw)

    @classmethod
    def llama_7b(cls, **kw) -> "DecoderConfig":
        """LLaMA-1 7B / Vicuna-7B v0 and v1.1 (Video-LLaMA v1, Video-ChatGPT, MA-LMM)."""
        base = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                    num_heads=32, num_kv_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, arch="llama")
        return cls(**{**base, **kw})

    vicuna_7b = llama_7b

    @classmethod
    def llama2_7b(cls, **kw) -> "DecoderConfig":
        """Llama-2-7B(-chat) and Vicuna-7B v1.5 (Chat-UniVi, MiniGPT4-video, Video-LLaMA-2)."""
        return cls.llama_7b(**{"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, **kw})

    vicuna_7b_v15 = llama2_7b

    @classmethod
    def llama2_13b(cls, **kw) -> "DecoderConfig":
        """Llama-2-13B / Vicuna-13B v1.5 (Chat-UniVi-13B, Video-LLaMA-2-13B)."""
        return cls.llama2_7b(**{"hidden_size": 5120, "intermediate_size": 13824, "num_layers": 40,
                                "num_heads": 40, "num_kv_heads": 40, **kw})

    @classmethod
    def llama3_8b(cls, **kw) -> "DecoderConfig":
        """Meta-Llama-3-8B(-Instruct) (CogVLM2-Video)."""
        base = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                    num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                    max_position_embeddings=8192, bos_token_id=128000, eos_token_id=(128001, 128009),
                    arch="llama")
        return cls(**{**base, **kw})

    @classmethod
    def mistral_7b_instruct_v02(cls, **kw) -> "DecoderConfig":
        """Mistral-7B-Instruct-v0.2 (MiniGPT4-video): GQA 32/8, θ 1e6, no sliding window."""
        base = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                    num_heads=32, num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                    max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, arch="mistral")
        return cls(**{**base, **kw})

    @classmethod
    def qwen2_7b(cls, **kw) -> "DecoderConfig":
        """Qwen2-7B, the LLM of Qwen2-VL-7B: q/k/v bias, GQA 28/4, untied."""
        base = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                    num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
                    attention_bias=True, max_position_embeddings=32768, bos_token_id=151643,
                    eos_token_id=151645, arch="qwen2")
        return cls(**{**base, **kw})

    @classmethod
    def qwen2_1_5b(cls, **kw) -> "DecoderConfig":
        """Qwen2-1.5B, the LLM of Qwen2-VL-2B: tied embeddings."""
        return cls.qwen2_7b(**{"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                               "num_heads": 12, "num_kv_heads": 2, "tie_word_embeddings": True, **kw})

    # ---------------------------------------------------------------- HF config.json round trip
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **kw) -> "DecoderConfig":
        """Build from an HF ``config.json`` dict of a supported architecture (error names it otherwise)."""
        archs = cfg.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            mt = cfg.get("model_type")
            arch = mt if mt in ARCHITECTURES.values() else None
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r} in config.json; "
                f"vjax's decoder reads {sorted(ARCHITECTURES)}"
            )
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        mrope = rope.pop("mrope_section", None)
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if kind in ("default", "mrope", None) else tuple(sorted(rope.items()))
        sliding = cfg.get("sliding_window")
        if arch == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        eos = cfg.get("eos_token_id")
        heads = cfg["num_attention_heads"]
        args = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or None,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            mrope_section=tuple(mrope) if mrope else None,
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            hidden_act=cfg.get("hidden_act", "silu"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=cfg.get("pad_token_id"),
            arch=arch,
        )
        if args["head_dim"] == args["hidden_size"] // heads:
            args["head_dim"] = None
        return cls(**{**args, **kw})

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict of this decoder (inverse of :meth:`from_hf`)."""
        arch_name = {v: k for k, v in ARCHITECTURES.items()}[self.arch]
        out: dict[str, Any] = dict(
            architectures=[arch_name], model_type=self.arch, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.resolved_head_dim,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, hidden_act=self.hidden_act,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id, torch_dtype="float32",
        )
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**dict(self.rope_scaling), "rope_theta": self.rope_theta}
            out["rope_scaling"] = dict(self.rope_scaling)
        out["rope_parameters"] = rope
        if self.arch == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=False)
        if self.arch == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.arch == "qwen2":
            out.update(use_sliding_window=self.sliding_window is not None,
                       sliding_window=self.sliding_window, max_window_layers=self.num_layers)
        return out

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e if isinstance(e, tuple) else (e,))


@flax.struct.dataclass
class CausalLMOutput:
    """``logits [B, L, V]`` (float32), the updated ``cache`` (or None), ``hidden_states`` (when asked:
    the input embeddings and every layer's output, the last one after the final norm) and
    ``next_position [B]``: the position id of the token that would follow (for decoding). ``attention_mask``
    ``[B, S]``: set by a video model that hid some of its visual slots (``VideoLLM.encode_masked``): the
    key mask it used, which later decoding steps over the same cache must use too."""

    logits: jax.Array
    cache: Any = None
    hidden_states: tuple[jax.Array, ...] | None = None
    next_position: jax.Array | None = None
    attention_mask: jax.Array | None = None
    head_input: jax.Array | None = None  # with head=False: the final normed hidden states (at logits_at)


def next_position(position_ids: jax.Array, valid: jax.Array) -> jax.Array:
    """``max`` position over valid tokens (and over the 3 M-RoPE axes) plus one: ``[B]``."""
    pos = position_ids if position_ids.ndim == 2 else position_ids.max(axis=0)
    return jnp.max(jnp.where(valid.astype(bool), pos, -1), axis=-1) + 1


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """HF's positions for a left-padded batch: ``cumsum(mask) - 1``, padding slots set to 1."""
    mask = attention_mask.astype(jnp.int32)
    pos = jnp.cumsum(mask, axis=-1) - 1
    return jnp.where(mask == 1, pos, 1)


def decoder_cache(config: DecoderConfig, batch: int, length: int, dtype=None) -> list[Cache] | Cache:
    """An empty KV cache of ``length`` slots for every layer of a decoder with ``config``: a list of per-layer
    caches ``{"k", "v": [B, S, K, Dh]}``, or with ``scan_layers`` one cache stacked ``[num_layers, B, S, K, Dh]``
    (what the scanned layers consume). :func:`cache_length` reads either."""
    dt = jnp.dtype(dtype or config.dtype)
    if config.scan_layers:
        one = init_cache(batch, length, config.num_kv_heads, config.resolved_head_dim, dt)
        return {k: jnp.zeros((config.num_layers,) + v.shape, v.dtype) for k, v in one.items()}
    return [init_cache(batch, length, config.num_kv_heads, config.resolved_head_dim, dt)
            for _ in range(config.num_layers)]


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, h, cos, sin, mask, cache, cache_index):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        attn_out, cache = Attention(
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.resolved_head_dim,
            qkv_bias=c.attention_bias, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
            lora_targets=tuple(c.lora_targets), impl=c.attention_impl, dtype=dt, param_dtype=pdt, name="self_attn",
        )(RMSNorm(c.rms_norm_eps, pdt, name="input_layernorm")(h), cos=cos, sin=sin, mask=mask,
          cache=cache, cache_index=cache_index)
        h = h + attn_out
        x = RMSNorm(c.rms_norm_eps, pdt, name="post_attention_layernorm")(h)
        kw = dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, act=c.hidden_act, dtype=dt,
                  param_dtype=pdt, name="mlp")
        # in pieces only where the sequence splits evenly (training and prefill, not one-token decoding); the
        # parameters are created by the whole-sequence form
        pieces = c.mlp_chunks > 1 and x.shape[1] % c.mlp_chunks == 0 and not self.is_initializing()
        h = h + (over_sequence_chunks(GatedMlp, c.mlp_chunks, **kw) if pieces else GatedMlp(**kw))(x)
        return constrain(h, ACTIVATION), cache


def decoder_block(config: "DecoderConfig", name: str, lift: Callable[[type], type] | None = None) -> nn.Module:
    """The LLaMA-family block (:class:`DecoderLayer`). ``lift`` transforms the class before it is built
    (:class:`CausalLM` passes remat and, with ``scan_layers``, the scan over all layers)."""
    return (lift or _identity)(DecoderLayer)(config, name=name)


def visual_expert_block(config: "DecoderConfig", name: str, lift: Callable[[type], type] | None = None) -> nn.Module:
    """CogVLM's visual-expert block (:class:`~vjax.layers.visual_expert.VisualExpertDecoderLayer`) with this
    decoder's sizes; it reads ``vision [B, L]`` (True: the token goes to the vision expert). ``lift`` as in
    :func:`decoder_block`."""
    return (lift or _identity)(VisualExpertDecoderLayer)(config.expert_config, name=name)


def _identity(cls: type) -> type:
    return cls


def _unbound(cls: type) -> Callable[..., nn.Module]:
    """The block class built outside any parent module (a pure function of the parameters it is applied to)."""
    return functools.partial(cls, parent=None)


@functools.lru_cache(maxsize=None)
def scan_step(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of a decoder block class whose call fits ``nn.scan``: ``(h, cache, inputs) -> (h, (cache,
    h))`` with ``cache`` this layer's slice of the stacked cache and ``inputs`` the keyword arguments shared
    by every layer (cos/sin, mask, cache_index, ``vision``); the layer's output is also emitted, so the scan
    returns every layer's hidden state stacked."""

    class Step(cls):
        def __call__(self, h, cache, inputs):
            h, cache = super().__call__(h, cache=cache, **inputs)
            return h, (cache, h)

    Step.__name__ = Step.__qualname__ = f"ScanStep{cls.__name__}"
    return Step


def cache_length(cache: Any) -> int:
    """Number of slots ``S`` of a KV cache in either layout: a list of per-layer ``{"k": [B, S, K, Dh], ...}``
    (unrolled decoder) or one stacked ``{"k": [N, B, S, K, Dh], ...}`` (``scan_layers``)."""
    first = cache if isinstance(cache, Mapping) else cache[0]
    return first["k"].shape[-3]


class CausalLM(nn.Module):
    """The decoder with its embedding and LM head. See the module docstring for the formula.

    ``block``: ``(config, name, lift) -> module`` building each layer (:func:`decoder_block`, or
    :func:`visual_expert_block` for a config with ``visual_experts``); ``lift`` maps the block class to its
    rematerialised (``remat_policy``) and, with ``scan_layers``, scanned form (:func:`scan_step`), and the
    one scanned module is named ``layers``."""

    config: DecoderConfig
    block: Callable[..., nn.Module] | None = None

    def setup(self):
        c = self.config
        pdt = jnp.dtype(c.param_dtype)
        self.embed_tokens = Embed(
            c.vocab_size, c.hidden_size, param_dtype=pdt, dtype=jnp.dtype(c.dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        block = self.block_factory()
        policy = resolve_remat(c.remat, c.remat_policy)
        if c.scan_layers:  # one block scanned over the layers: params `layers` [num_layers, ...]
            def lift(cls):
                return scan_block(remat_block(scan_step(cls), policy, scanned=True), c.num_layers,
                                  in_axes=(0, nn.broadcast))

            self.layers = block(c, "layers", lift)
        else:
            self.layers = [block(c, f"layers_{i}", lambda cls: remat_block(cls, policy)) for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, pdt)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), dtype=jnp.dtype(c.dtype), param_dtype=pdt)

    def block_factory(self) -> Callable[..., nn.Module]:
        """``block``, or the config's own block (:func:`visual_expert_block` with ``visual_experts``)."""
        return self.block or (visual_expert_block if self.config.visual_experts else decoder_block)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``[B, L, D]`` (video models splice visual tokens into these)."""
        return self.embed_tokens(input_ids)

    def rotary(self, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos/sin ``[B, L, Dh]`` for ``[B, L]`` (or ``[3, B, L]`` M-RoPE) positions."""
        c = self.config
        inv = rope_inv_freq(c.resolved_head_dim, c.rope_theta, dict(c.rope_scaling or ()))
        if position_ids.ndim == 3:
            if c.mrope_section is None:
                raise ValueError("3-axis position_ids need a config with mrope_section (Qwen2-VL)")
            return mrope_cos_sin(position_ids, c.resolved_head_dim, c.rope_theta, c.mrope_section)
        return rope_cos_sin(position_ids, inv)

    def init_cache(self, batch: int, length: int, dtype=None) -> list[Cache] | Cache:
        """An empty KV cache of ``length`` slots for every layer (:func:`decoder_cache`)."""
        return decoder_cache(self.config, batch, length, dtype)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: Sequence[Cache] | None = None,
        cache_index: jax.Array | int = 0,
        return_hidden: bool = False,
        logits_at: jax.Array | None = None,
        head: bool = True,
        **block_inputs: jax.Array,
    ) -> CausalLMOutput:
        """Run the decoder.

        Args:
          input_ids: ``int32[B, L]``; or pass ``inputs_embeds [B, L, D]`` instead.
          attention_mask: ``[B, S]`` validity of every key slot — ``S = L`` without a cache, the
            cache length with one (1 = real token, 0 = padding). Default: all ones.
          position_ids: ``[B, L]`` or ``[3, B, L]``; default HF's ``cumsum(mask) - 1``.
          cache / cache_index: the KV cache and the slot where this chunk starts.
          logits_at: ``int32[B, S]`` positions at which to compute the logits (training: the supervised
            positions, :func:`vjax.models.losses.loss_positions`); default every position.
          head: False skips the LM head: ``logits`` is None and ``head_input`` holds the final normed hidden
            states (at ``logits_at``), for :meth:`head_loss`.
          **block_inputs: passed to every block, e.g. ``vision [B, L]`` (bool: the token takes the vision
            expert) for :func:`visual_expert_block`.
        Returns:
          ``CausalLMOutput`` with float32 ``logits [B, L, V]`` (``[B, S, V]`` with ``logits_at``) and the
          updated cache.
        """
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(c.dtype))
        b, l, _ = h.shape
        s = l if cache is None else cache_length(cache)
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), jnp.int32)
        if attention_mask.shape != (b, s):
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape}, expected (batch, slots) = {(b, s)}"
            )
        if position_ids is None:
            if not (isinstance(cache_index, int) and cache_index == 0):
                raise ValueError("position_ids are required when decoding from a non-empty cache")
            position_ids = default_position_ids(attention_mask[:, :l])
        if position_ids.ndim == 2 and c.mrope_section is not None:
            position_ids = jnp.broadcast_to(position_ids, (3,) + position_ids.shape)  # text: t = h = w
        cos, sin = self.rotary(position_ids)
        # structure, not the dense [B, 1, L, S] mask: the attention impl densifies it only if it needs to
        mask = structured_mask(attention_mask, query_offset=cache_index, sliding_window=c.sliding_window)
        if c.scan_layers:
            inputs = dict(cos=cos, sin=sin, mask=mask, cache_index=cache_index, **block_inputs)
            h0 = h
            if c.grads_in_place and cache is None and not return_hidden and not self.is_initializing():
                h, new_cache = self.layers_in_place(h, inputs), None
            else:
                h, (new_cache, stacked) = self.layers(h, cache, inputs)  # stacked: [num_layers, B, L, D]
            hidden = [h0, *stacked] if return_hidden else [h]
        else:
            hidden, new_cache = [h], []
            for i, layer in enumerate(self.layers):
                h, layer_cache = layer(h, cos=cos, sin=sin, mask=mask, cache=None if cache is None else cache[i],
                                       cache_index=cache_index, **block_inputs)
                new_cache.append(layer_cache)
                hidden.append(h)
        h = self.norm(h)
        hidden[-1] = h
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None], axis=1)  # [B, S, D]
        q_valid = jax.lax.dynamic_slice_in_dim(attention_mask, jnp.asarray(cache_index, jnp.int32), l, axis=1)
        return CausalLMOutput(
            logits=self.head(h) if head else None,
            cache=None if cache is None else new_cache,
            hidden_states=tuple(hidden) if return_hidden else None,
            next_position=next_position(position_ids, q_valid),
            head_input=None if head else h,
        )

    def layers_in_place(self, h: jax.Array, inputs: dict[str, Any]) -> jax.Array:
        """The scanned layers without a cache (``grads_in_place``): the same block, applied layer by layer to
        the stacked parameters by :func:`vjax.layers.scan.scan_grads_in_place`, whose backward pass writes
        the gradients over the weights' buffer."""
        c = self.config
        one = self.block_factory()(c, "layer", _unbound)
        stacked = nn.meta.unbox(self.layers.variables["params"])

        def layer(p, x, shared):
            return one.apply({"params": p}, x, cache=None, **shared)[0]

        return scan_grads_in_place(layer, stacked, h, inputs,
                                   offload=resolve_remat(c.remat, c.remat_policy) == "full_offload")

    def head(self, h: jax.Array) -> jax.Array:
        """float32 logits ``[..., V]`` of the final normed hidden states ``h [..., D]``."""
        logits = self.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return logits.astype(jnp.float32)

    def head_loss(self, h: jax.Array, input_ids: jax.Array, loss_mask: jax.Array,
                  positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """:func:`vjax.models.losses.next_token_loss` of ``self.head(h)``, fused with the head where its kernel is
        a float matrix (:func:`vjax.models.losses.next_token_head_loss`: the logits are never stored); through
        the logits at initialisation (which creates the head's parameters) and for int8 heads."""
        c = self.config
        name, key = ("embed_tokens", "embedding") if c.tie_word_embeddings else ("lm_head", "kernel")
        params = {} if self.is_initializing() else nn.meta.unbox(self.variables.get("params", {})).get(name, {})
        kernel = params.get(key)
        if kernel is None or f"{key}_scale" in params or not jnp.issubdtype(kernel.dtype, jnp.floating):
            return next_token_loss(self.head(h), input_ids, loss_mask, positions)
        kernel = kernel.T if c.tie_word_embeddings else kernel  # [D, V]
        return next_token_head_loss(h, kernel, input_ids, loss_mask, positions, dtype=jnp.dtype(c.dtype))

    def loss(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        """Training loss on a batch ``{"input_ids", "attention_mask", "loss_mask"}`` (see losses.py)."""
        positions = batch.get("loss_positions")
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"], logits_at=positions, head=False)
        return self.head_loss(out.head_input, batch["input_ids"], batch["loss_mask"], positions)

    def example_batch(self, batch: int = 2, length: int = 8) -> dict[str, jax.Array]:
        """A batch of the documented format with every key the model reads (for tracing and tests)."""
        ids = jnp.zeros((batch, length), jnp.int32)
        return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}


SPEC = ModelSpec(
    name="decoder", config=DecoderConfig, module=CausalLM, conversion="vjax.convert.decoder",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    hf_bare_model_types=("llama", "mistral", "qwen2"), llm="")
