"""CogVLM's visual expert: separate attention and MLP weights for image and text tokens.

CogVLM (Wang et al. 2023, arXiv 2311.03079, §2 "Visual expert module"); numerics of the CogVLM2 remote
code ``modeling_cogvlm.py`` of ``THUDM/cogvlm2-llama3-chat-19B`` (``VisionExpertAttention``,
``VisionExpertMLP``, ``CogVLMDecoderLayer``, ``get_expert_mask``, ``build_position_ids``). Every token is
routed to one expert by its token type (0 = language, 1 = vision):

    vision[i]   = type[i] == 1 and type[i+1] == 1        (i < L-1; vision[L-1] = False)
    q, k, v     = vision ? W^v_qkv h + b^v_qkv : W^l_qkv h   (only the vision QKV has a bias)
    attention   = one causal GQA attention over all tokens, RoPE (rotate-half) on q and k
    out         = vision ? W^v_o ctx : W^l_o ctx
    mlp(h)      = vision ? SwiGLU_v(h) : SwiGLU_l(h)

so the last token of every vision run (the ``eoi``) and a vision token in the last position use the
*language* expert. With static shapes both experts run on every token and ``jnp.where`` selects per
token (2x the projection FLOPs; one compiled program for any mix of image and text).

The decoder layer is pre-norm, as LLaMA: ``h += Attn(RMSNorm(h)); h += MLP(RMSNorm(h))``.

CogVLM's position ids give all interior tokens of an image one shared position
(:func:`build_position_ids`): ``[BOS, boi, v, v, v, v, eoi, text]`` -> ``0, 1, 2, 2, 2, 2, 3, 4``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vjax.layers.attention import Cache, attention, check_impl, update_cache
from vjax.layers.masks import StructuredMask
from vjax.layers.mlp import GatedMlp, dense
from vjax.layers.norm import RMSNorm
from vjax.layers.partitioning import ACTIVATION, constrain
from vjax.layers.rope import apply_rotary_pos_emb

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


def vision_expert_mask(token_type_ids: jax.Array) -> jax.Array:
    """``[B, L]`` bool: which tokens use the vision expert (CogVLM ``get_expert_mask``).

    A token goes to the vision expert iff it and its right neighbour are vision tokens, so the last
    token of each vision run, and a vision token in the last position, go to the language expert.

    >>> import jax.numpy as jnp
    >>> vision_expert_mask(jnp.array([[0, 1, 1, 1, 0, 1, 1]])).astype(int).tolist()
    [[0, 1, 1, 0, 0, 1, 0]]
    """
    is_vision = token_type_ids == VISION_TOKEN_TYPE  # [B, L]
    both = is_vision[:, :-1] & is_vision[:, 1:]  # [B, L-1]
    return jnp.concatenate([both, jnp.zeros_like(is_vision[:, :1])], axis=1)


def build_position_ids(token_type_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """CogVLM's RoPE positions ``[B, L]`` int32: interior image tokens share one position.

    With padding marked as type -1 (``attention_mask == 0``), the first vision token of a run (left
    neighbour language, or at position 0) and the last one (right neighbour language, or at the last
    position) count as language. Then ``pos[0] = 0`` and ``pos[i] = pos[i-1] + 1`` if token ``i`` is
    language or a vision token right after a language token, else ``pos[i-1]``. Padding adds 0.
    Pure and jit-able (spec_vit_family.md §4.5; CogVLM2 ``build_position_ids``).

    >>> import jax.numpy as jnp
    >>> build_position_ids(jnp.array([[0, 1, 1, 1, 1, 1, 1, 0, 0]])).tolist()   # BOS, boi, 4 patches, eoi, text
    [[0, 1, 2, 2, 2, 2, 3, 4, 5]]
    >>> build_position_ids(jnp.array([[0, 0, 0, 1, 1, 1, 0]]), jnp.array([[0, 0, 1, 1, 1, 1, 1]])).tolist()
    [[0, 0, 1, 2, 3, 4, 5]]
    """
    tt = jnp.asarray(token_type_ids, jnp.int32)
    if attention_mask is not None:
        tt = jnp.where(attention_mask.astype(bool), tt, -1)
    vis = tt == VISION_TOKEN_TYPE
    lang = tt == LANGUAGE_TOKEN_TYPE
    pad_false = jnp.zeros_like(vis[:, :1])
    left_lang = jnp.concatenate([pad_false, lang[:, :-1]], axis=1)  # left neighbour is language
    right_lang = jnp.concatenate([lang[:, 1:], pad_false], axis=1)
    first = jnp.arange(tt.shape[1])[None, :] == 0
    last = jnp.arange(tt.shape[1])[None, :] == tt.shape[1] - 1
    boundary = vis & (left_lang | first | right_lang | last)  # boi / eoi: treated as language
    lang = lang | boundary
    vis = vis & ~boundary
    left_lang = jnp.concatenate([pad_false, lang[:, :-1]], axis=1)
    step = (lang | (vis & left_lang)) & ~first
    return jnp.cumsum(step.astype(jnp.int32), axis=1)


@dataclasses.dataclass(frozen=True)
class VisualExpertConfig:
    """Hyper-parameters of a visual-expert decoder (names follow CogVLM's ``config.json``).

    >>> cfg = VisualExpertConfig.from_hf({"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    ...     "num_hidden_layers": 32, "num_attention_heads": 32, "num_multi_query_heads": 8})
    >>> cfg == VisualExpertConfig.cogvlm2_llama3_19b(), cfg.head_dim
    (True, 128)
    """

    vocab_size: int = 48
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # CogVLM2 ``num_multi_query_heads``
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    hidden_act: str = "silu"
    vision_qkv_bias: bool = True
    language_qkv_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # vjax.layers.attention.attention's impl

    def __post_init__(self):
        check_impl(self.attention_impl)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                             f"num_kv_heads={self.num_kv_heads} do not divide")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **kw) -> "VisualExpertConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def tiny(cls, **kw) -> "VisualExpertConfig":
        """2 layers, 64 wide, GQA 4/2 (the golden ``cogvlm_visual_expert`` shapes)."""
        return cls(**kw)

    @classmethod
    def cogvlm2_llama3_19b(cls, **kw) -> "VisualExpertConfig":
        """The language model of ``THUDM/cogvlm2-llama3-chat-19B`` (Llama-3-8B with visual experts)."""
        base = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                    num_kv_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0)
        return cls(**{**base, **kw})

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **kw) -> "VisualExpertConfig":
        """From a CogVLM/CogVLM2 ``config.json`` dict."""
        heads = cfg["num_attention_heads"]
        args = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                    intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                    num_heads=heads, num_kv_heads=cfg.get("num_multi_query_heads", heads),
                    rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), hidden_act=cfg.get("hidden_act", "silu"),
                    rope_theta=float(cfg.get("rope_theta", 500000.0)))
        return cls(**{**args, **kw})


class VisualExpertAttention(nn.Module):
    """Attention with a vision and a language expert for the q/k/v and output projections.

    Parameters ``{vision,language}_{q,k,v,o}_proj`` (the checkpoint's fused
    ``*_expert_query_key_value`` is split into q/k/v by the conversion table). The attention maths is
    :func:`vjax.layers.attention.attention` (implementation ``impl``) over all tokens; with ``cache`` the new
    keys and values are written at ``cache_index`` (as :class:`vjax.layers.attention.Attention`).

    >>> import jax, jax.numpy as jnp
    >>> attn = VisualExpertAttention(num_heads=4, num_kv_heads=2, head_dim=8)
    >>> x, vis = jnp.ones((1, 5, 32)), vision_expert_mask(jnp.array([[0, 1, 1, 1, 0]]))
    >>> params = attn.init(jax.random.key(0), x, vis)
    >>> attn.apply(params, x, vis)[0].shape
    (1, 5, 32)
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    vision_qkv_bias: bool = True
    language_qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        vision: jax.Array,
        *,
        cos: jax.Array | None = None,
        sin: jax.Array | None = None,
        mask: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, Cache | None]:
        """``x [B, L, D]``, ``vision [B, L]`` (from :func:`vision_expert_mask`) -> ``([B, L, D], cache)``.

        ``cos``/``sin [B, L, Dh]`` rotate q and k; ``mask`` is boolean ``[B, 1, L, S]`` (True = attend) or a
        :class:`~vjax.layers.masks.StructuredMask`.
        """
        b, l, d = x.shape
        h, kh, dh = self.num_heads, self.num_kv_heads, self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        sel = vision[:, :, None]  # [B, L, 1]

        def routed(name, features, axes, bias_v, bias_l, inp):
            y_v = dense(features, axes, use_bias=bias_v, name=f"vision_{name}", **kw)(inp)
            y_l = dense(features, axes, use_bias=bias_l, name=f"language_{name}", **kw)(inp)
            return jnp.where(sel, y_v, y_l)  # [B, L, features]

        q = routed("q_proj", h * dh, ("embed", "heads"), self.vision_qkv_bias, self.language_qkv_bias, x)
        k = routed("k_proj", kh * dh, ("embed", "kv_heads"), self.vision_qkv_bias, self.language_qkv_bias, x)
        v = routed("v_proj", kh * dh, ("embed", "kv_heads"), self.vision_qkv_bias, self.language_qkv_bias, x)
        q = q.reshape(b, l, h, dh)  # [B, L, H, Dh]
        k = k.reshape(b, l, kh, dh)  # [B, L, K, Dh]
        v = v.reshape(b, l, kh, dh)
        if cos is not None:
            q = apply_rotary_pos_emb(q, cos, sin)
            k = apply_rotary_pos_emb(k, cos, sin)
        new_cache = None
        if cache is not None:
            new_cache = update_cache(cache, k, v, cache_index)
            k, v = new_cache["k"].astype(self.dtype), new_cache["v"].astype(self.dtype)
        ctx = attention(q, k, v, mask, impl=self.impl).reshape(b, l, h * dh)  # [B, L, H Dh]
        out = routed("o_proj", d, ("heads", "embed"), False, False, ctx)  # [B, L, D]
        return out, new_cache


class VisualExpertMlp(nn.Module):
    """Two SwiGLU MLPs, ``vision_mlp`` and ``language_mlp`` (each gate/up/down, no bias), routed per token.

    >>> import jax, jax.numpy as jnp
    >>> mlp = VisualExpertMlp(32, 48)
    >>> x, vis = jnp.ones((1, 4, 32)), jnp.array([[False, True, True, False]])
    >>> params = mlp.init(jax.random.key(0), x, vis)
    >>> mlp.apply(params, x, vis).shape
    (1, 4, 32)
    """

    hidden_size: int
    intermediate_size: int
    act: str = "silu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, vision: jax.Array) -> jax.Array:  # [B, L, D], [B, L] -> [B, L, D]
        kw = dict(act=self.act, dtype=self.dtype, param_dtype=self.param_dtype)
        y_v = GatedMlp(self.hidden_size, self.intermediate_size, name="vision_mlp", **kw)(x)
        y_l = GatedMlp(self.hidden_size, self.intermediate_size, name="language_mlp", **kw)(x)
        return jnp.where(vision[:, :, None], y_v, y_l)


class VisualExpertDecoderLayer(nn.Module):
    """CogVLM decoder layer: ``input_layernorm``, ``self_attn`` (:class:`VisualExpertAttention`),
    ``post_attention_layernorm``, ``mlp`` (:class:`VisualExpertMlp`); pre-norm residuals.

    >>> import jax, jax.numpy as jnp
    >>> from vjax.layers.rope import rope_cos_sin, rope_inv_freq
    >>> cfg = VisualExpertConfig.tiny()
    >>> types = jnp.array([[0, 1, 1, 1, 1, 0, 0]])
    >>> cos, sin = rope_cos_sin(build_position_ids(types), rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    >>> h, vis = jnp.ones((1, 7, 64)), vision_expert_mask(types)
    >>> layer = VisualExpertDecoderLayer(cfg)
    >>> params = layer.init(jax.random.key(0), h, vis, cos, sin)
    >>> layer.apply(params, h, vis, cos, sin)[0].shape
    (1, 7, 64)
    """

    config: VisualExpertConfig

    @nn.compact
    def __call__(self, h, vision=None, cos=None, sin=None, mask=None, cache=None, cache_index=0):
        """``h [B, L, D]``, ``vision [B, L]`` (default: every token to the language expert), ``cos``/``sin
        [B, L, Dh]``, bool ``mask [B, 1, L, S]`` or a ``StructuredMask`` (default: causal over ``L``)
        -> ``(h [B, L, D], cache)``."""
        c = self.config
        if vision is None:
            vision = jnp.zeros(h.shape[:2], bool)
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        if mask is None and cache is None:
            mask = StructuredMask(causal=True)
        attn = VisualExpertAttention(c.num_heads, c.num_kv_heads, c.head_dim, c.vision_qkv_bias,
                                     c.language_qkv_bias, dtype=dt, param_dtype=pdt, impl=c.attention_impl,
                                     name="self_attn")
        a, cache = attn(RMSNorm(c.rms_norm_eps, pdt, name="input_layernorm")(h), vision, cos=cos, sin=sin,
                        mask=mask, cache=cache, cache_index=cache_index)
        h = h + a
        mlp = VisualExpertMlp(c.hidden_size, c.intermediate_size, c.hidden_act, dtype=dt, param_dtype=pdt, name="mlp")
        h = h + mlp(RMSNorm(c.rms_norm_eps, pdt, name="post_attention_layernorm")(h), vision)
        return constrain(h, ACTIVATION), cache


def experts_from_language(params: Mapping[str, Any]) -> dict:
    """Parameters (any subtree holding visual-expert layers, e.g. a decoder's) with every vision expert set to a copy
    of its language expert, as CogVLM initialises its visual experts from the pretrained language model (§2.1: the
    QKV matrix and MLP of the expert have the language model's shapes and start from its weights); a vision bias
    without a language counterpart starts at zero. Leaves outside the experts are returned unchanged.

    >>> p = {"self_attn": {"language_q_proj": {"kernel": jnp.ones((2, 2))},
    ...                    "vision_q_proj": {"kernel": jnp.zeros((2, 2)), "bias": jnp.ones(2)}}}
    >>> q = experts_from_language(p)["self_attn"]["vision_q_proj"]
    >>> q["kernel"].tolist(), q["bias"].tolist()
    ([[1.0, 1.0], [1.0, 1.0]], [0.0, 0.0])
    >>> mlp = {"language_mlp": {"up_proj": {"kernel": jnp.ones((2, 3))}},
    ...        "vision_mlp": {"up_proj": {"kernel": jnp.zeros((2, 3))}}}
    >>> experts_from_language(mlp)["vision_mlp"]["up_proj"]["kernel"].sum().item()
    6.0
    """
    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {k: walk(v) for k, v in tree.items()}
        for name, sub in tree.items():
            twin = "language_" + name[len("vision_"):] if name.startswith("vision_") else None
            if twin is None or twin not in tree:
                continue
            source = tree[twin]
            missing = sorted(set(source) - set(sub))
            if missing:
                raise ValueError(f"{twin} has {missing} that {name} lacks: not a visual-expert pair")
            copied = {}
            for leaf, value in sub.items():
                if leaf not in source:
                    copied[leaf] = jax.tree.map(jnp.zeros_like, value)
                    continue
                want, got = jax.tree.map(jnp.shape, value), jax.tree.map(jnp.shape, source[leaf])
                if got != want:
                    raise ValueError(f"{name}/{leaf} has shapes {want} but {twin}/{leaf} {got}")
                copied[leaf] = source[leaf]
            out[name] = copied
        return out

    return walk(params)
