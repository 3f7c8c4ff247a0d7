"""KV-cache decoding: one jit-compiled prefill, then a ``lax.while_loop`` (or a Python loop over one
compiled step when streaming) with static shapes.

Protocol a model follows (the decoder and every video LLM do): ``module.apply({"params": p},
input_ids=..., attention_mask=[B, S], position_ids=None | [B, L], cache=..., cache_index=...,
**prefill_inputs)`` returns an output with ``logits``, ``cache`` and ``next_position [B]``, and
``module.init_cache(batch, length)`` builds an empty cache. The prompt is left-padded; slots
``[0, L)`` hold it and slot ``L + t`` the ``t``-th generated token.

Sampling: greedy when ``temperature == 0``; otherwise softmax(logits / temperature) restricted to
the smallest set of tokens whose probability mass reaches ``top_p`` (nucleus sampling, Holtzman
et al. 2020) — the definition of transformers' ``TopPLogitsWarper``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token; defaults are greedy decoding of up to 32 tokens."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class GenerateOutput:
    """``tokens [B, N]`` (``pad_token_id`` after a row stops), ``lengths [B]`` (tokens up to and
    including the first stop token), ``prefill_logits [B, V]`` (for the first token)."""

    tokens: jax.Array
    lengths: jax.Array
    prefill_logits: jax.Array | None = None


def select_token(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token ``[B]`` from ``logits [B, V]`` under ``cfg`` (greedy, top-k, top-p, temperature)."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / cfg.temperature
    neg = jnp.finfo(jnp.float32).min
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) >= cfg.top_p  # mass before >= p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _is_eos(tokens: jax.Array, eos: Sequence[int]) -> jax.Array:
    if not eos:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos, jnp.int32))


@functools.partial(jax.jit, static_argnames=("module", "total_len", "static_inputs"))
def _prefill(module: nn.Module, params, input_ids, attention_mask, prefill_inputs, total_len: int,
             static_inputs: tuple = ()):
    b, l = input_ids.shape
    cache = module.init_cache(b, total_len)
    full_mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.ones((b, total_len - l), jnp.int32)], axis=1)
    out = module.apply({"params": params}, input_ids=input_ids, attention_mask=full_mask, cache=cache,
                       cache_index=0, **prefill_inputs, **dict(static_inputs))
    if getattr(out, "attention_mask", None) is not None:  # the model hid visual slots: keep them hidden
        full_mask = out.attention_mask.astype(jnp.int32)
    return out.logits[:, -1], out.cache, out.next_position, full_mask


def _decode_step(module, params, cfg: SamplingConfig, prompt_len: int, state):
    t, cache, tokens, last, finished, pos, full_mask, rng = state
    out = module.apply({"params": params}, input_ids=last[:, None], attention_mask=full_mask,
                       position_ids=pos[:, None], cache=cache, cache_index=prompt_len + t - 1)
    rng, sub = jax.random.split(rng)
    nxt = select_token(out.logits[:, -1], sub, cfg)
    nxt = jnp.where(finished, cfg.pad_token_id, nxt)
    tokens = tokens.at[:, t].set(nxt)
    finished = finished | _is_eos(nxt, cfg.eos_token_ids)
    return (t + 1, out.cache, tokens, nxt, finished, pos + 1, full_mask, rng)


def _first_state(logits, cache, next_pos, full_mask, rng, cfg: SamplingConfig, b: int):
    rng, sub = jax.random.split(rng)
    first = select_token(logits, sub, cfg)
    tokens = jnp.full((b, cfg.max_new_tokens), cfg.pad_token_id, jnp.int32).at[:, 0].set(first)
    finished = _is_eos(first, cfg.eos_token_ids)
    return (jnp.asarray(1, jnp.int32), cache, tokens, first, finished, next_pos.astype(jnp.int32), full_mask, rng)


@functools.partial(jax.jit, static_argnames=("module", "cfg", "prompt_len"))
def _decode_all(module, params, cfg: SamplingConfig, prompt_len: int, logits, cache, next_pos, full_mask, rng):
    state = _first_state(logits, cache, next_pos, full_mask, rng, cfg, logits.shape[0])

    def cond(s):
        return (s[0] < cfg.max_new_tokens) & ~jnp.all(s[4])

    state = jax.lax.while_loop(cond, functools.partial(_decode_step, module, params, cfg, prompt_len), state)
    return state[2]


@functools.partial(jax.jit, static_argnames=("module", "cfg", "prompt_len"), donate_argnums=(4,))
def _one_step(module, params, cfg, prompt_len, state):
    return _decode_step(module, params, cfg, prompt_len, state)


_first_state_jit = jax.jit(_first_state, static_argnames=("cfg", "b"))


def _lengths(tokens: jax.Array, cfg: SamplingConfig) -> jax.Array:
    stop = _is_eos(tokens, cfg.eos_token_ids)
    first = jnp.argmax(stop, axis=1)
    return jnp.where(stop.any(axis=1), first + 1, tokens.shape[1])


def generate(
    module: nn.Module,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    config: SamplingConfig | None = None,
    rng: jax.Array | None = None,
    stream: Callable[[jax.Array], Any] | None = None,
    prefill_inputs: dict[str, Any] | None = None,
    **sampling: Any,
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` after a left-padded prompt ``input_ids [B, L]``.

    Args:
      module, params: a vjax causal model and its parameters.
      attention_mask: ``[B, L]``, 0 on left padding (default: all ones).
      config / **sampling: a :class:`SamplingConfig` or its fields (``max_new_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``eos_token_ids``, ``pad_token_id``).
      rng: PRNG key for sampling (default key 0).
      stream: called with the new tokens ``[B]`` after every step (a Python loop over one compiled
        step); without it the whole decode is one ``lax.while_loop``.
      prefill_inputs: extra model inputs used only at prefill (pixels, grids, audio ...); tuples and
        Python scalars among them are passed as static values (one compile per distinct value).
    Returns:
      :class:`GenerateOutput`.
    """
    cfg = config or SamplingConfig(**{k: tuple(v) if k == "eos_token_ids" else v for k, v in sampling.items()})
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, l = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, l), jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    prefill_inputs = dict(prefill_inputs or {})
    # tuples and Python scalars are static (e.g. Qwen2-VL's grids, which fix shapes); arrays are traced
    static = tuple(sorted((k, v) for k, v in prefill_inputs.items() if isinstance(v, (tuple, int, float, str))))
    arrays = {k: v for k, v in prefill_inputs.items() if k not in dict(static)}
    logits, cache, next_pos, full_mask = _prefill(
        module, params, input_ids, jnp.asarray(attention_mask), arrays, l + cfg.max_new_tokens, static)
    if stream is None:
        tokens = _decode_all(module, params, cfg, l, logits, cache, next_pos, full_mask, rng)
    else:
        state = _first_state_jit(logits, cache, next_pos, full_mask, rng, cfg, b)
        stream(state[3])
        while int(state[0]) < cfg.max_new_tokens and not bool(jnp.all(state[4])):
            state = _one_step(module, params, cfg, l, state)
            stream(state[3])
        tokens = state[2]
    return GenerateOutput(tokens=tokens, lengths=_lengths(tokens, cfg), prefill_logits=logits)


# ------------------------------------------------------------------------------------------------ chat
class ContextOverflow(ValueError):
    """A prompt (plus the tokens to generate) does not fit the session's context."""


@functools.partial(jax.jit, static_argnames=("module",), donate_argnums=(2,))
def _extend(module: nn.Module, params, cache, mask, input_ids, position_ids, cache_index, last):
    """Write ``input_ids [1, n]`` (right-padded to a bucket) at ``cache_index``; logits of token ``last``.
    ``mask [1, S]``: the prefill's key mask (1 after the prompt; causality hides the slots not written yet)."""
    out = module.apply({"params": params}, input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                       cache=cache, cache_index=cache_index)
    return jax.lax.dynamic_index_in_dim(out.logits, last, axis=1, keepdims=False), out.cache


_select_jit = jax.jit(select_token, static_argnames=("cfg",))


class ChatSession:
    """Multi-turn decoding of one conversation (batch 1) over one KV cache.

    The first :meth:`respond` prefills the prompt with the visual inputs (the video is encoded once);
    each later turn passes the whole conversation rendered so far: the session keeps the longest prefix
    it already holds in the cache, writes only the new tokens (right-padded to a multiple of ``bucket``,
    so a handful of shapes compile) and decodes. Position ids of text after the last visual token grow
    by one per slot, so the cache can be rewound to any slot after it (a re-tokenised answer); a prompt
    that differs before it is prefilled again (pass the visual inputs on every turn for that case).

    Args:
      module, params: a vjax causal model (the protocol of :func:`generate`).
      max_length: context in tokens (prompt + answers of all turns).
      visual_ids: placeholder token ids of visual slots (the floor for rewinding).
    """

    def __init__(self, module: nn.Module, params: Any, max_length: int, *, visual_ids: Sequence[int] = (),
                 bucket: int = 32):
        self.module, self.params = module, params
        self.max_length, self.bucket = int(max_length), int(bucket)
        self.visual_ids = frozenset(int(i) for i in visual_ids)
        self.cache = None
        self.mask = None  # key mask of the cache's slots: 0 where the prefill hid a visual slot
        self.ids: list[int] = []  # the token in every written slot
        self.offset = 0  # position id of slot j (after the visual tokens) is j + offset
        self.floor = 0  # slots before this cannot be rewound to

    def check_fits(self, n: int, cfg: SamplingConfig) -> None:
        """Raise :class:`ContextOverflow` if a prompt of ``n`` tokens plus the answer does not fit."""
        if n + cfg.max_new_tokens > self.max_length:
            raise ContextOverflow(f"the prompt has {n} tokens; with max_new_tokens={cfg.max_new_tokens} that is "
                                  f"{n + cfg.max_new_tokens}, more than the context of {self.max_length} tokens")

    def _prefill(self, ids: Sequence[int], prefill_inputs: dict | None) -> jax.Array:
        l = len(ids)
        inputs = dict(prefill_inputs or {})
        static = tuple(sorted((k, v) for k, v in inputs.items() if isinstance(v, (tuple, int, float, str))))
        arrays = {k: v for k, v in inputs.items() if k not in dict(static)}
        logits, cache, next_pos, mask = _prefill(self.module, self.params, jnp.asarray([list(ids)], jnp.int32),
                                                 jnp.ones((1, l), jnp.int32), arrays, self.max_length + self.bucket,
                                                 static)
        self.cache, self.mask, self.ids = cache, mask, list(ids)
        self.offset = int(next_pos[0]) - l
        vis = [i for i, t in enumerate(ids) if t in self.visual_ids]
        self.floor = (vis[-1] + 1) if vis else 0
        return logits

    def _write(self, tokens: Sequence[int]) -> jax.Array:
        """Append ``tokens`` at slot ``len(self.ids)``; logits after the last of them ``[1, V]``."""
        n = len(tokens)
        size = 1 if n == 1 else -(-n // self.bucket) * self.bucket  # decoding: one token, one shape
        start = len(self.ids)
        ids = jnp.asarray([list(tokens) + [0] * (size - n)], jnp.int32)
        pos = jnp.arange(start, start + size, dtype=jnp.int32)[None] + self.offset
        logits, self.cache = _extend(self.module, self.params, self.cache, self.mask, ids, pos, jnp.int32(start),
                                     jnp.int32(n - 1))
        self.ids.extend(int(t) for t in tokens)
        return logits

    def respond(self, prompt_ids: Sequence[int], *, config: SamplingConfig | None = None,
                prefill_inputs: dict | None = None, rng: jax.Array | None = None,
                stream: Callable[[int], Any] | None = None, **sampling: Any) -> list[int]:
        """Generate the answer to the conversation ``prompt_ids`` (all turns so far, ending where the
        assistant speaks). ``stream(token_id)`` is called for each new token. Returns the new token ids
        (the stop token included when one was generated). Raises :class:`ContextOverflow` (nothing changed)."""
        cfg = config or SamplingConfig(**{k: tuple(v) if k == "eos_token_ids" else v for k, v in sampling.items()})
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_fits(len(prompt_ids), cfg)
        rng = jax.random.key(0) if rng is None else rng
        keep = 0
        for a, b in zip(self.ids, prompt_ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt_ids) - 1)  # at least one token is fed to get the next logits
        if self.cache is None or keep < self.floor:
            if prefill_inputs is None and self.visual_ids.intersection(prompt_ids):
                where = "the first turn" if self.cache is None else (
                    f"the prompt differs from the cached conversation at token {keep}, before the last visual "
                    f"token ({self.floor}), so it")
                raise ValueError(f"{where} needs the visual inputs (prefill_inputs) to encode the video")
            logits = self._prefill(prompt_ids, prefill_inputs)
        else:
            del self.ids[keep:]  # rewind: later slots are overwritten before anything can attend to them
            logits = self._write(prompt_ids[keep:])
        out: list[int] = []
        eos = set(cfg.eos_token_ids)
        while True:
            rng, sub = jax.random.split(rng)
            token = int(_select_jit(logits, sub, cfg)[0])
            out.append(token)
            if stream is not None:
                stream(token)
            if token in eos or len(out) >= cfg.max_new_tokens:
                return out
            logits = self._write([token])
