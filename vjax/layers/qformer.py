"""The BLIP-2 / InstructBLIP Q-Former, and MA-LMM's Q-Former with memory banks.

Q-Former (Li et al. 2023, "BLIP-2", §3.1; Dai et al. 2023, "InstructBLIP", §2.2): a BERT encoder whose
inputs are ``Q`` learned query tokens (and, for InstructBLIP, ``Lt`` instruction tokens); every
``cross_attention_freq``-th layer lets the queries cross-attend to frozen encoder features. Post-LN
blocks, as in LAVIS ``Qformer.py`` and transformers' ``Blip2QFormerModel`` / ``InstructBlipQFormerModel``:

    x_0   = LN([queries ; word_emb(ids) + pos_emb(0 .. Lt-1)])         [B, Q+Lt, D]   (eps 1e-12)
    a     = LN(x + o(softmax(q(x) k(x)^T / sqrt(Dh) + m_pad) v(x)))     bidirectional self-attention
    a_q   = LN(a_q + o(softmax(q(a_q) k(E)^T / sqrt(Dh) + m_enc) v(E)))  queries only, layers i % f == 0
    y_q   = LN(a_q + fc2(gelu(fc1(a_q))))                               query FFN (intermediate_query)
    y_t   = LN(a_t + fc2'(gelu(fc1'(a_t))))                             text FFN (intermediate / output)
    x'    = [y_q ; y_t]

``a_q = a[:, :Q]``, ``a_t = a[:, Q:]``; ``E [B, S, E_enc]`` are the encoder features (keys/values are
projected from the encoder width). The callers keep ``x_L[:, :Q]``.

MA-LMM (He et al. 2024, arXiv 2404.05726, §3.2; boheumd/MA-LMM ``blip2.py::MBBertSelfAttention`` and
the frame loop of ``blip2_vicuna_instruct.py``) runs the Q-Former once per frame ``t`` with two kinds
of memory: the *visual* bank ``V`` of past frame features (the cross-attention keys/values are
``[V_1 .. V_T', f_t]``) and, per layer ``l``, a *query* bank ``QB_l`` of that layer's past inputs (the
self-attention keys/values are ``[QB_l ; x]``, queries from ``x`` only). After each frame ``f_t`` and
``x`` are appended; a bank longer than ``memory_bank_length`` is compressed once
(:func:`vjax.layers.memory_bank.memory_bank_compress`). :class:`MemoryQFormer` carries the banks
explicitly through ``jax.lax.scan`` (``nn.scan``) — no hidden module state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vjax.layers.attention import Attention
from vjax.layers.memory_bank import MemoryBank, append_and_compress, memory_bank_init
from vjax.layers.mlp import Mlp
from vjax.layers.norm import LayerNorm
from vjax.layers.quant import Embed


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Hyper-parameters of a Q-Former (names follow the transformers ``*QFormerConfig``).

    ``text_input`` selects the InstructBLIP form (word/position embeddings and a text FFN); without it
    the Q-Former is BLIP-2's query-only form. Layer ``i`` has cross-attention iff
    ``i % cross_attention_freq == 0``.

    >>> cfg = QFormerConfig.blip2()
    >>> cfg.head_dim, [i for i in range(cfg.num_layers) if cfg.has_cross_attention(i)]
    (64, [0, 2, 4, 6, 8, 10])
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    encoder_width: int = 48
    cross_attention_freq: int = 2
    num_query_tokens: int = 8
    text_input: bool = False
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}")
        if self.cross_attention_freq < 1:
            raise ValueError(f"cross_attention_freq must be >= 1, got {self.cross_attention_freq}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0

    def replace(self, **kw) -> "QFormerConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ published configurations
    @classmethod
    def tiny(cls, **kw) -> "QFormerConfig":
        """2 layers, 64 wide, 8 queries: runs on a CPU in milliseconds."""
        return cls(**kw)

    @classmethod
    def blip2(cls, **kw) -> "QFormerConfig":
        """BLIP-2's Q-Former (Video-LLaMA's image Q-Former): 12 layers, cross-attention every 2nd, EVA-g 1408."""
        base = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, encoder_width=1408,
                    cross_attention_freq=2, num_query_tokens=32)
        return cls(**{**base, **kw})

    @classmethod
    def instructblip(cls, **kw) -> "QFormerConfig":
        """InstructBLIP's Q-Former (MA-LMM): BLIP-2's plus instruction text (vocab 30523, 512 positions)."""
        return cls.blip2(**{"text_input": True, "vocab_size": 30523, "max_position_embeddings": 512, **kw})

    @classmethod
    def video_llama_video(cls, **kw) -> "QFormerConfig":
        """Video-LLaMA's video Q-Former: 2 layers, cross-attention in every layer over 768-wide frame queries."""
        return cls.blip2(**{"num_layers": 2, "cross_attention_freq": 1, "encoder_width": 768, **kw})

    @classmethod
    def video_llama_audio(cls, **kw) -> "QFormerConfig":
        """Video-LLaMA's audio Q-Former: 2 layers, cross-attention every layer, ImageBind 1024, 8 queries."""
        return cls.video_llama_video(**{"encoder_width": 1024, "num_query_tokens": 8, **kw})

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], num_query_tokens: int = 32, **kw) -> "QFormerConfig":
        """From a transformers ``qformer_config`` dict (``Blip2QFormerConfig`` / ``InstructBlipQFormerConfig``).

        ``text_input`` is True for InstructBLIP (``model_type`` ``instructblip_qformer``) or when
        ``use_qformer_text_input`` is set. ``num_query_tokens`` lives in the outer model config.
        """
        text = cfg.get("model_type") == "instructblip_qformer" or bool(cfg.get("use_qformer_text_input", False))
        args = dict(
            hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
            encoder_width=cfg.get("encoder_hidden_size", 1408),
            cross_attention_freq=cfg.get("cross_attention_frequency", 2), num_query_tokens=num_query_tokens,
            text_input=text, vocab_size=cfg.get("vocab_size", 30522),
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)), hidden_act=cfg.get("hidden_act", "gelu"),
        )
        return cls(**{**args, **kw})


def _embed_init(axes):
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)


class QFormerLayer(nn.Module):
    """One post-LN Q-Former block (see the module docstring for the formula).

    Parameters: ``self_attn`` (q/k/v/o projections with bias), ``self_attn_norm``; with cross-attention
    ``cross_attn`` (k/v projected from the encoder width), ``cross_attn_norm``; ``query_mlp`` (fc1/fc2),
    ``query_mlp_norm``; with text input ``text_mlp``, ``text_mlp_norm``.

    >>> import jax, jax.numpy as jnp
    >>> layer = QFormerLayer(QFormerConfig.tiny(), has_cross_attention=True)
    >>> x, enc = jnp.ones((2, 8, 64)), jnp.ones((2, 5, 48))
    >>> params = layer.init(jax.random.key(0), x, query_length=8, encoder=enc)
    >>> layer.apply(params, x, query_length=8, encoder=enc).shape
    (2, 8, 64)
    """

    config: QFormerConfig
    has_cross_attention: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        query_length: int,
        valid: jax.Array | None = None,
        encoder: jax.Array | None = None,
        encoder_mask: jax.Array | None = None,
        memory: jax.Array | None = None,
        memory_valid: jax.Array | None = None,
    ) -> jax.Array:
        """``x [B, L, D]`` (``L = Q + Lt``) -> ``[B, L, D]``.

        Args:
          query_length: ``Q``, the number of query tokens at the start of ``x``.
          valid: ``[B, L]`` which tokens of ``x`` are real (padded text is False); default all.
          encoder / encoder_mask: ``[B, S, E]`` features the queries cross-attend to, ``[B, S]`` validity.
          memory / memory_valid: extra self-attention keys/values ``[B, M, D]`` placed before ``x``
            (MA-LMM's query memory bank), with validity ``[B, M]``.
        """
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        b, l, _ = x.shape

        def attention(name):
            return Attention(c.num_heads, c.num_heads, c.head_dim, qkv_bias=True, out_bias=True,
                             dtype=dt, param_dtype=pdt, name=name)

        def norm(name):
            return LayerNorm(c.layer_norm_eps, param_dtype=pdt, name=name)

        keys_valid = jnp.ones((b, l), bool) if valid is None else valid.astype(bool)  # [B, L]
        kv = None
        if memory is not None:
            kv = jnp.concatenate([memory.astype(x.dtype), x], axis=1)  # [B, M+L, D]
            mem_valid = jnp.ones(memory.shape[:2], bool) if memory_valid is None else memory_valid.astype(bool)
            keys_valid = jnp.concatenate([mem_valid, keys_valid], axis=1)  # [B, M+L]
        a, _ = attention("self_attn")(x, kv_inputs=kv, mask=keys_valid[:, None, None, :])
        a = norm("self_attn_norm")(a + x)  # [B, L, D]
        a_q, a_t = a[:, :query_length], a[:, query_length:]  # [B, Q, D], [B, Lt, D]
        if self.has_cross_attention:
            if encoder is None:
                raise ValueError("this Q-Former layer cross-attends: pass encoder features")
            enc_mask = None if encoder_mask is None else encoder_mask.astype(bool)[:, None, None, :]
            ca, _ = attention("cross_attn")(a_q, kv_inputs=encoder.astype(dt), mask=enc_mask)
            a_q = norm("cross_attn_norm")(ca + a_q)
        mlp_kw = dict(act=c.hidden_act, use_bias=True, dtype=dt, param_dtype=pdt)
        y = norm("query_mlp_norm")(Mlp(c.hidden_size, c.intermediate_size, name="query_mlp", **mlp_kw)(a_q) + a_q)
        if c.text_input:  # called on an empty slice too, so the parameters always exist
            y_t = norm("text_mlp_norm")(Mlp(c.hidden_size, c.intermediate_size, name="text_mlp", **mlp_kw)(a_t) + a_t)
            y = jnp.concatenate([y, y_t], axis=1)
        elif a_t.shape[1]:
            raise ValueError("text tokens need a Q-Former with text_input=True (InstructBLIP form)")
        return y  # [B, L, D]


class QFormer(nn.Module):
    """BLIP-2 (query-only) or InstructBLIP (queries + instruction) Q-Former, with its query tokens.

    Parameters: ``query_tokens [1, Q, D]``, ``embed_norm``, ``layers_{i}`` (:class:`QFormerLayer`) and,
    with ``text_input``, ``word_embeddings`` / ``position_embeddings``. Returns the last hidden states
    ``[B, Q+Lt, D]``; the query outputs are ``[:, :Q]``.

    >>> import jax, jax.numpy as jnp
    >>> qf = QFormer(QFormerConfig.tiny())
    >>> feats = jnp.ones((2, 5, 48))                                 # [B, S, E] encoder features
    >>> params = qf.init(jax.random.key(0), feats)
    >>> qf.apply(params, feats).shape
    (2, 8, 64)
    >>> qf = QFormer(QFormerConfig.tiny(text_input=True, vocab_size=50, max_position_embeddings=16))
    >>> ids, mask = jnp.ones((2, 3), jnp.int32), jnp.array([[1, 1, 1], [1, 1, 0]])
    >>> params = qf.init(jax.random.key(0), feats, input_ids=ids)
    >>> qf.apply(params, feats, input_ids=ids, text_mask=mask).shape   # [B, Q + Lt, D]
    (2, 11, 64)
    """

    config: QFormerConfig

    def setup(self):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.query_tokens = self.param(
            "query_tokens", _embed_init((None, None, "embed")), (1, c.num_query_tokens, c.hidden_size), pdt)
        if c.text_input:
            self.word_embeddings = Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=pdt,
                                         embedding_init=_embed_init(("vocab", "embed")))
            self.position_embeddings = Embed(c.max_position_embeddings, c.hidden_size, dtype=dt,
                                             param_dtype=pdt, embedding_init=_embed_init((None, "embed")))
        self.embed_norm = LayerNorm(c.layer_norm_eps, param_dtype=pdt)
        self.layers = [QFormerLayer(c, c.has_cross_attention(i), name=f"layers_{i}") for i in range(c.num_layers)]

    def embed(self, batch: int, input_ids: jax.Array | None = None,
              position_ids: jax.Array | None = None) -> jax.Array:
        """``LN([queries ; word_emb(ids) + pos_emb(positions)])`` -> ``[B, Q+Lt, D]``.

        Text positions default to ``0 .. Lt-1`` (queries take none), as in LAVIS and InstructBLIP.
        """
        c = self.config
        dt = jnp.dtype(c.dtype)
        x = jnp.broadcast_to(self.query_tokens.astype(dt), (batch, c.num_query_tokens, c.hidden_size))  # [B, Q, D]
        if input_ids is not None:
            if not c.text_input:
                raise ValueError("input_ids need a Q-Former with text_input=True (InstructBLIP form)")
            if position_ids is None:
                position_ids = jnp.arange(input_ids.shape[1])[None, :]  # [1, Lt]
            t = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # [B, Lt, D]
            x = jnp.concatenate([x, t.astype(dt)], axis=1)
        return self.embed_norm(x)

    def token_valid(self, batch: int, input_ids: jax.Array | None, text_mask: jax.Array | None) -> jax.Array:
        """``[B, Q+Lt]`` bool: queries are always valid, text follows ``text_mask`` (default all valid)."""
        q = jnp.ones((batch, self.config.num_query_tokens), bool)
        if input_ids is None:
            return q
        t = jnp.ones(input_ids.shape, bool) if text_mask is None else text_mask.astype(bool)
        return jnp.concatenate([q, t], axis=1)

    def __call__(
        self,
        encoder_hidden_states: jax.Array,
        encoder_mask: jax.Array | None = None,
        input_ids: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Run the Q-Former.

        Args:
          encoder_hidden_states: ``[B, S, E]`` frozen encoder features (e.g. ``ln_vision(EVA(img))``).
          encoder_mask: ``[B, S]`` 1 for real encoder tokens, 0 for padding; default all real.
          input_ids / text_mask / position_ids: ``[B, Lt]`` instruction tokens (InstructBLIP form), their
            padding mask and positions (default ``0 .. Lt-1``).
        Returns:
          ``[B, Q+Lt, D]`` last hidden states (queries first).
        """
        b = encoder_hidden_states.shape[0]
        x = self.embed(b, input_ids, position_ids)  # [B, Q+Lt, D]
        valid = self.token_valid(b, input_ids, text_mask)
        for layer in self.layers:
            x = layer(x, query_length=self.config.num_query_tokens, valid=valid,
                      encoder=encoder_hidden_states, encoder_mask=encoder_mask)
        return x

    def example_inputs(self) -> dict[str, Any]:
        """Smallest inputs that create every parameter (used by :func:`vjax.pretrained.abstract_params`)."""
        c = self.config
        ids = jnp.zeros((1, 1), jnp.int32) if c.text_input else None
        return {"encoder_hidden_states": jnp.zeros((1, 1, c.encoder_width), jnp.dtype(c.dtype)), "input_ids": ids}


# ------------------------------------------------------------------------------------------------
# MA-LMM: the Q-Former with a visual memory bank and per-layer query memory banks.


class MemoryQFormerState(NamedTuple):
    """Everything :class:`MemoryQFormer` carries from frame to frame (a pytree).

    Attributes:
      visual: bank of past frame features, ``tokens [B, L, N, E]``.
      query: one bank per layer of that layer's past inputs, ``tokens [B, L, Q+Lt, D]``.
      frame_index: ``[B]`` int32, frames seen so far (indexes the frame position embedding).

    >>> state = MemoryQFormer(QFormerConfig.tiny(), memory_bank_length=4).init_state(2, num_tokens=5)
    >>> state.visual.tokens.shape, len(state.query), state.query[0].tokens.shape
    ((2, 4, 5, 48), 2, (2, 4, 8, 64))
    """

    visual: MemoryBank
    query: tuple[MemoryBank, ...]
    frame_index: jax.Array


def _filled(bank: MemoryBank) -> jax.Array:
    """``[B, L]`` which slots of ``bank`` hold an entry."""
    return jnp.arange(bank.capacity)[None, :] < bank.length[:, None]


class MemoryQFormer(QFormer):
    """MA-LMM's Q-Former run online over frames with memory banks (see the module docstring).

    Same parameters as :class:`QFormer` (so the same conversion tables load it), plus, with
    ``num_frame_positions > 0``, MA-LMM's ``image_pe`` as ``frame_position`` (``[P, E]``, zero-init)
    added to frame ``t`` before it enters the visual bank (frames beyond ``P`` — streaming a video longer
    than the table — reuse its last row; the official model samples at most ``P`` frames).

    Per frame ``t`` (boheumd/MA-LMM ``Blip2VicunaInstruct_MALMM.generate`` and ``MBBertSelfAttention``):

        f_t  = frame_t + image_pe[t]
        E_t  = [V_1 .. V_T', f_t]                       cross-attention keys/values (no other mask)
        layer l: self-attention keys/values [QB_l ; x], then QB_l <- append(QB_l, x) (+ compress)
        V    <- append(V, f_t), compressed once when it would exceed ``memory_bank_length``

    Banks have the fixed capacity ``memory_bank_length`` (empty slots are masked), so every frame has
    the same shapes and the loop is one ``jax.lax.scan``. Streaming: ``init_state`` then ``step``.

    >>> import jax, jax.numpy as jnp
    >>> mq = MemoryQFormer(QFormerConfig.tiny(), memory_bank_length=3)
    >>> frames = jnp.ones((2, 6, 5, 48))                          # [B, T, N, E]
    >>> params = mq.init(jax.random.key(0), frames)
    >>> hidden, state = mq.apply(params, frames)
    >>> hidden.shape, state.visual.length.tolist()                # [B, T, Q, D]; bank stays at 3 entries
    ((2, 6, 8, 64), [3, 3])
    >>> state = mq.init_state(2, num_tokens=5)                    # streaming, one frame at a time
    >>> state, out = mq.apply(params, state, frames[:, 0], method="step")
    >>> out.shape, state.query[0].length.tolist()
    ((2, 8, 64), [1, 1])
    """

    memory_bank_length: int = 10
    num_frame_positions: int = 0

    def setup(self):
        super().setup()
        if self.num_frame_positions:
            self.frame_position = Embed(
                self.num_frame_positions, self.config.encoder_width, param_dtype=jnp.dtype(self.config.param_dtype),
                embedding_init=nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")))

    def init_state(self, batch: int, num_tokens: int, text_len: int = 0, dtype=jnp.float32) -> MemoryQFormerState:
        """Empty banks for ``batch`` videos of ``num_tokens`` encoder tokens per frame and ``text_len`` text tokens."""
        c = self.config
        length = self.memory_bank_length
        return MemoryQFormerState(
            visual=memory_bank_init(batch, length, num_tokens, c.encoder_width, dtype),
            query=tuple(memory_bank_init(batch, length, c.num_query_tokens + text_len, c.hidden_size, dtype)
                        for _ in range(c.num_layers)),
            frame_index=jnp.zeros((batch,), jnp.int32),
        )

    def _step(self, state: MemoryQFormerState, frame: jax.Array, x0: jax.Array, valid: jax.Array,
              frame_valid: jax.Array) -> tuple[MemoryQFormerState, jax.Array]:
        """One frame: ``frame [B, N, E]``, embedded tokens ``x0 [B, Q+Lt, D]`` -> (state, ``[B, Q+Lt, D]``)."""
        c = self.config
        b, n, e = frame.shape
        if self.num_frame_positions:
            # frames past the table (online streaming of long videos) share its last row
            index = jnp.minimum(state.frame_index, self.num_frame_positions - 1)
            frame = frame + self.frame_position(index)[:, None, :].astype(frame.dtype)  # [B, N, E]
        vis = state.visual
        enc = jnp.concatenate([vis.tokens.astype(frame.dtype), frame[:, None]], axis=1)  # [B, L+1, N, E]
        enc_valid = jnp.concatenate([_filled(vis), jnp.ones((b, 1), bool)], axis=1)  # [B, L+1]
        enc = enc.reshape(b, -1, e)  # [B, (L+1) N, E]
        enc_valid = jnp.repeat(enc_valid, n, axis=1)  # [B, (L+1) N]
        x = x0
        new_query = []
        for layer, bank in zip(self.layers, state.query):
            t_len = bank.tokens.shape[2]
            memory = bank.tokens.reshape(b, -1, c.hidden_size)  # [B, L (Q+Lt), D]
            memory_valid = (_filled(bank)[:, :, None] & valid[:, None, :]).reshape(b, -1)  # [B, L (Q+Lt)]
            assert t_len == x.shape[1], "query bank built for another text length (init_state text_len)"
            new_query.append(append_and_compress(bank, x, frame_valid))  # stores this layer's input
            x = layer(x, query_length=c.num_query_tokens, valid=valid, encoder=enc, encoder_mask=enc_valid,
                      memory=memory, memory_valid=memory_valid)
        new_state = MemoryQFormerState(
            visual=append_and_compress(vis, frame, frame_valid),
            query=tuple(new_query),
            frame_index=state.frame_index + frame_valid.astype(jnp.int32),
        )
        return new_state, x

    def step(
        self,
        state: MemoryQFormerState,
        frame: jax.Array,
        input_ids: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        frame_valid: jax.Array | None = None,
    ) -> tuple[MemoryQFormerState, jax.Array]:
        """Streaming: feed one frame ``[B, N, E]``; returns the new state and ``[B, Q+Lt, D]``.

        ``frame_valid [B]`` (default all True) leaves the banks of samples whose frame is padding
        unchanged (their output row is then meaningless).
        """
        b = frame.shape[0]
        x0 = self.embed(b, input_ids, position_ids)
        valid = self.token_valid(b, input_ids, text_mask)
        fv = jnp.ones((b,), bool) if frame_valid is None else frame_valid.astype(bool)
        return self._step(state, frame, x0, valid, fv)

    def __call__(
        self,
        frames: jax.Array,
        input_ids: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        frame_valid: jax.Array | None = None,
        state: MemoryQFormerState | None = None,
    ) -> tuple[jax.Array, MemoryQFormerState]:
        """Run a whole clip ``frames [B, T, N, E]`` with one ``nn.scan`` over ``T``.

        Returns ``(hidden [B, T, Q+Lt, D], final state)``: the Q-Former output after every frame (MA-LMM
        uses the last one, ``hidden[:, -1, :Q]``) and the banks, which a later call can continue from.
        ``frame_valid [B, T]`` marks padding frames (banks skip them; their rows repeat the previous output).
        """
        b, t = frames.shape[:2]
        x0 = self.embed(b, input_ids, position_ids)  # [B, Q+Lt, D]
        valid = self.token_valid(b, input_ids, text_mask)
        if state is None:
            state = self.init_state(b, frames.shape[2], x0.shape[1] - self.config.num_query_tokens, frames.dtype)
        fv = jnp.ones((b, t), bool) if frame_valid is None else frame_valid.astype(bool)
        last = jnp.zeros_like(x0)

        def body(mdl, carry, frame, f_valid, x0, valid):
            st, prev = carry
            st, out = mdl._step(st, frame, x0, valid, f_valid)
            out = jnp.where(f_valid[:, None, None], out, prev)  # padding frames keep the last real output
            return (st, out), out

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=(1, 1, nn.broadcast, nn.broadcast), out_axes=1)
        (state, _), hidden = scan(self, (state, last), frames, fv, x0, valid)
        return hidden, state

    def example_inputs(self) -> dict[str, Any]:
        c = self.config
        ids = jnp.zeros((1, 1), jnp.int32) if c.text_input else None
        return {"frames": jnp.zeros((1, 1, 1, c.encoder_width), jnp.dtype(c.dtype)), "input_ids": ids}
