"""Continuous batching for serving: a fixed number of decode *slots*, each with its own KV-cache row, decoded
together by one compiled step.

A request is prefilled alone (batch 1, its prompt left-padded to a multiple of ``bucket`` so a handful of
shapes compile; the video is encoded there, once) and its cache row is written into a free slot; from then on
every :meth:`SlotDecoder.step` advances all slots by one token. Slots sit at different depths: the step is the
model's one-token decode ``jax.vmap``-ped over slots, so each slot has its own cache index, position id and key
mask, while the weights are shared (the vmapped matmuls are one matmul over the slots). A request joins at the
next step and leaves when it stops; free slots run masked and are ignored. Every shape is fixed by ``slots``
and ``max_length``, so nothing recompiles under load.

Each slot's answer does not depend on what the other slots hold: run alone or beside others, a greedy request
gives the same tokens (the rows of a vmapped step never mix), and a sampled one too (its key is
``fold_in(key(seed), t)`` at its ``t``-th token).

>>> import jax, jax.numpy as jnp
>>> from vjax.models.decoder import CausalLM, DecoderConfig
>>> module = CausalLM(DecoderConfig.tiny())
>>> params = module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
>>> dec = SlotDecoder(module, params, slots=2, max_length=32, bucket=8)
>>> dec.admit(0, [5, 6, 7], max_new_tokens=4) >= 0
True
>>> dec.step().shape
(2,)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vjax.generate import ContextOverflow, _prefill


def select_rows(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array) -> jax.Array:
    """Next token ``[B]`` of each row of ``logits [B, V]`` under its own sampling: greedy where
    ``temperature [B] == 0``, else nucleus sampling (``top_p [B]``) from ``softmax(logits / temperature)`` with
    the row's key ``keys [B]`` — per row what :func:`vjax.generate.select_token` does for a whole batch."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(row, t, p, key):
        row = row / jnp.maximum(t, 1e-6)
        order = jnp.argsort(-row)
        probs = jax.nn.softmax(row[order])
        drop_sorted = (jnp.cumsum(probs) - probs) >= p  # mass before the token already reaches p
        drop = jnp.zeros_like(drop_sorted).at[order].set(drop_sorted)
        return jax.random.categorical(key, jnp.where(drop, jnp.finfo(jnp.float32).min, row)).astype(jnp.int32)

    sampled = jax.vmap(sample)(logits, temperature, top_p, keys)
    return jnp.where(temperature > 0, sampled, greedy)


def _row_keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)


@functools.partial(jax.jit, static_argnames=("module",), donate_argnums=(2,))
def _step(module: nn.Module, params, caches, masks, last, pos, index, temperature, top_p, seeds, counts):
    def one(cache, mask, token, p, i):  # one slot: batch 1, its own cache index
        out = module.apply({"params": params}, input_ids=token[None, None], attention_mask=mask[None],
                           position_ids=p[None, None], cache=cache, cache_index=i)
        return out.logits[0, -1], out.cache

    logits, caches = jax.vmap(one)(caches, masks, last, pos, index)
    return select_rows(logits, temperature, top_p, _row_keys(seeds, counts)), caches


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(caches, cache, slot):
    return jax.tree.map(lambda c, x: jax.lax.dynamic_update_index_in_dim(c, x.astype(c.dtype), slot, 0),
                        caches, cache)


_select_rows_jit = jax.jit(select_rows)
_row_keys_jit = jax.jit(_row_keys)


@dataclasses.dataclass
class _Slot:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    count: int = 0  # tokens generated so far


class SlotDecoder:
    """``slots`` conversations decoded together over fixed-size KV-cache rows (see the module docstring).

    Args:
      module, params: a vjax causal model (the protocol of :func:`vjax.generate.generate`) and its parameters;
        ``module`` runs the decode steps (a request may prefill with a differently sized copy of it, e.g.
        Qwen2-VL at its video's grid, whose text decoding is the same).
      slots: conversations decoded at once.
      max_length: KV-cache slots of each row: the bucketed prompt plus the answer must fit.
      bucket: prompts are left-padded to a multiple of this (one prefill compile per multiple).
    """

    def __init__(self, module: nn.Module, params: Any, *, slots: int, max_length: int, bucket: int = 64):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.module, self.params = module, params
        self.slots, self.max_length, self.bucket = int(slots), int(max_length), int(bucket)
        self.caches = None  # built from the first prefill's cache: [slots, *row]
        self.masks = jnp.ones((self.slots, self.max_length), jnp.int32)
        self.last = np.zeros(self.slots, np.int32)
        self.pos = np.zeros(self.slots, np.int32)
        self.index = np.zeros(self.slots, np.int32)
        self.state: list[_Slot | None] = [None] * self.slots

    # ------------------------------------------------------------------ slots
    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.state) if s is None]

    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.state) if s is not None]

    def padded_length(self, n: int) -> int:
        """The prompt length a prompt of ``n`` tokens is left-padded to."""
        return -(-n // self.bucket) * self.bucket

    def check_fits(self, n: int, max_new_tokens: int) -> None:
        """Raise :class:`vjax.generate.ContextOverflow` if a prompt of ``n`` tokens and its answer do not fit."""
        need = self.padded_length(n) + max_new_tokens - 1  # the last answer token is never written
        if need > self.max_length:
            raise ContextOverflow(
                f"the prompt has {n} tokens ({self.padded_length(n)} as prefilled); with max_tokens={max_new_tokens} "
                f"that is {need}, more than the context of {self.max_length} tokens")

    def admit(self, slot: int, ids: Sequence[int], *, max_new_tokens: int, prefill_inputs: dict | None = None,
              module: nn.Module | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
              pad_token_id: int = 0) -> int:
        """Prefill ``ids`` (with its visual ``prefill_inputs``) into free slot ``slot``; returns its first token.
        Raises :class:`vjax.generate.ContextOverflow` (nothing changed) and ``ValueError`` (a busy slot)."""
        if self.state[slot] is not None:
            raise ValueError(f"slot {slot} is busy")
        if not 0 <= temperature or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        n = len(ids)
        self.check_fits(n, max_new_tokens)
        length = self.padded_length(n)
        ids = jnp.asarray([[pad_token_id] * (length - n) + [int(t) for t in ids]], jnp.int32)
        mask = jnp.asarray([[0] * (length - n) + [1] * n], jnp.int32)
        inputs = dict(prefill_inputs or {})
        static = tuple(sorted((k, v) for k, v in inputs.items() if isinstance(v, (tuple, int, float, str))))
        arrays = {k: v for k, v in inputs.items() if k not in dict(static)}
        logits, cache, next_pos, full_mask = _prefill(module or self.module, self.params, ids, mask, arrays,
                                                      self.max_length, static)
        if self.caches is None:
            self.caches = jax.tree.map(lambda x: jnp.zeros((self.slots, *x.shape), x.dtype), cache)
        self.caches = _insert(self.caches, cache, jnp.int32(slot))
        self.masks = self.masks.at[slot].set(full_mask[0])
        state = _Slot(temperature=float(temperature), top_p=float(top_p), seed=int(seed))
        first = int(_select_rows_jit(logits, jnp.asarray([state.temperature], jnp.float32),
                                     jnp.asarray([state.top_p], jnp.float32),
                                     _row_keys_jit(jnp.asarray([state.seed], jnp.uint32), jnp.zeros(1, jnp.int32)))[0])
        state.count = 1
        self.state[slot] = state
        self.last[slot], self.pos[slot], self.index[slot] = first, int(next_pos[0]), length
        return first

    def release(self, slot: int) -> None:
        """Free ``slot`` (its cache row is overwritten by the next request's prefill)."""
        self.state[slot] = None

    def step(self) -> np.ndarray:
        """Advance every slot by one token; returns the new tokens ``[slots]`` (meaningless for free slots).
        A slot whose cache row is full must be released before: :meth:`admit` reserved room for its answer."""
        if self.caches is None:
            raise ValueError("no request was admitted yet")
        live = [s or _Slot() for s in self.state]
        for i, s in enumerate(self.state):
            if s is not None and self.index[i] >= self.max_length:
                raise ValueError(f"slot {i} has filled its {self.max_length} cache slots: release it")
        index = np.where([s is not None for s in self.state], self.index, 0).astype(np.int32)
        tokens, self.caches = _step(
            self.module, self.params, self.caches, self.masks, jnp.asarray(self.last), jnp.asarray(self.pos),
            jnp.asarray(index), jnp.asarray([s.temperature for s in live], jnp.float32),
            jnp.asarray([s.top_p for s in live], jnp.float32), jnp.asarray([s.seed for s in live], jnp.uint32),
            jnp.asarray([s.count for s in live], jnp.int32))
        tokens = np.asarray(tokens)
        for i, s in enumerate(self.state):
            if s is not None:
                s.count += 1
                self.last[i] = tokens[i]
                self.pos[i] += 1
                self.index[i] += 1
        return tokens


__all__ = ["SlotDecoder", "select_rows"]
