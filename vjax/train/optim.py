"""Optimizer: AdamW with linear warmup + cosine decay, global-norm clipping, gradient
accumulation, and per-stage freeze masks.

Frozen parameters are split off *before* differentiation (:func:`split_trainable`): their gradients
are never computed and the optimizer state covers only the trainable subtree, so frozen towers stay
bitwise unchanged and cost no optimizer memory (a bare ``optax.masked`` would pass raw gradients
through to masked-out leaves).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import optax

from vjax.pytree import flatten_params, unflatten_params


FINITE_GUARDS = ("branch", "select")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Hyper-parameters of the optimizer and its schedule."""

    learning_rate: float = 1e-3
    warmup_steps: int = 10
    total_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    mu_dtype: str = ""  # AdamW's first moment: "" = the parameters' dtype, or e.g. "bfloat16" (half its memory)
    grad_dtype: str = ""  # the gradients of the matrices: "" = the parameters' dtype, or "bfloat16" (see grad_inputs)
    # how a step with a non-finite loss or gradient keeps the state: "branch" (lax.cond: the update is skipped) or
    # "select" (the update always computed and each new value chosen elementwise, which XLA fuses into the update
    # and writes over the donated state: no temporaries of the update's size; see vjax.train.step.Trainer)
    finite_guard: str = "branch"

    def __post_init__(self):
        if self.finite_guard not in FINITE_GUARDS:
            raise ValueError(f"finite_guard={self.finite_guard!r}: expected one of {FINITE_GUARDS}")
        for name in ("mu_dtype", "grad_dtype"):
            if getattr(self, name) not in ("", "float32", "bfloat16", "float16"):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected '' (the parameters' dtype), 'float32', "
                                 f"'bfloat16' or 'float16'")


def grad_inputs(trainable: Any, grad_dtype: str) -> Any:
    """What the train step differentiates: ``trainable`` itself, or with ``grad_dtype`` its matrices (``ndim >=
    2``) cast to that dtype, so the backward pass produces and holds their gradients in it.

    With bfloat16 compute every matrix is rounded to bfloat16 where it is used anyway; taking the gradient with
    respect to the rounded copy halves the memory the gradients hold until the update (Llama-2-7B on 4 chips:
    6.0 -> 3.0 GiB per chip), as a bfloat16 gradient reduction does in other frameworks. Vectors (norm scales,
    biases) keep the parameters' dtype. The norm, the clipping, the moments and the update stay in float32:
    :func:`to_params` casts each gradient back as it is read (XLA fuses the cast into its consumers).

    >>> import numpy as np
    >>> tree = grad_inputs({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}, "bfloat16")
    >>> str(tree["w"].dtype), str(tree["b"].dtype)
    ('bfloat16', 'float32')
    """
    if not grad_dtype:
        return trainable
    dt = jax.numpy.dtype(grad_dtype)
    return jax.tree_util.tree_map(lambda x: x.astype(dt) if x.ndim >= 2 else x, trainable)


def to_params(grads: Any, params: Any) -> Any:
    """Each gradient in its parameter's dtype (the inverse of :func:`grad_inputs`; a no-op when they agree)."""
    return jax.tree_util.tree_map(lambda g, p: g if g.dtype == p.dtype else g.astype(p.dtype), grads, params)



def schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate of optimizer update ``u``: linear warmup from 0 to ``learning_rate``, then cosine decay to
    ``min_lr_ratio`` of it.

    ``total_steps`` and ``warmup_steps`` count training steps (batches); with ``grad_accum = k`` every k steps
    make one update, so the schedule runs over ``U = max(1, total_steps // k)`` updates with
    ``ceil(warmup_steps / k)`` of warmup (``optax.MultiSteps`` advances the inner schedule once per update).

    >>> sched = schedule(OptimConfig(learning_rate=1.0, warmup_steps=0, total_steps=8, grad_accum=4))
    >>> [round(float(sched(u)), 4) for u in (0, 1)]   # two updates: the whole cosine, not its first quarter
    [1.0, 0.55]
    """
    k = max(1, cfg.grad_accum)
    updates = max(1, cfg.total_steps // k)
    warm = max(0, min(-(-cfg.warmup_steps // k), updates - 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warm, max(updates, warm + 1), cfg.learning_rate * cfg.min_lr_ratio)


def clips_outside(cfg: OptimConfig) -> bool:
    """Whether the caller clips the gradient itself (:func:`clip_by_norm`, with the norm it already has) and
    builds the optimizer with ``clip=False``: without accumulation the clipped gradient is this step's; with
    it, the clip applies to the accumulated gradient, inside ``optax.MultiSteps``."""
    return bool(cfg.grad_clip) and cfg.grad_accum <= 1


def clip_by_norm(grads: Any, norm: jax.Array, max_norm: float) -> Any:
    """``optax.clip_by_global_norm`` given the global norm: ``g`` if ``norm < max_norm`` else
    ``g / norm * max_norm`` (the same operations, so the same bits)."""
    return jax.tree_util.tree_map(
        lambda g: jax.numpy.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), grads)


def make_optimizer(cfg: OptimConfig, clip: bool = True) -> optax.GradientTransformation:
    """AdamW(schedule) after global-norm clipping (unless ``clip=False``: the caller clips, see
    :func:`clips_outside`); decay only on matrices; the first moment in ``mu_dtype``; accumulation via
    MultiSteps."""
    decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip and clip else optax.identity(),
        optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask, mu_dtype=cfg.mu_dtype or None),
    )
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx


def trainable_mask(params: Mapping[str, Any], trainable: Sequence[str] | None) -> dict[str, bool]:
    """``{"a/b/c": bool}``: which parameter paths train. ``trainable`` holds regexes matched with
    ``re.search`` against ``/``-joined paths; ``None`` trains everything. A pattern that matches
    nothing is an error naming it (a typo must not silently freeze a model)."""
    flat = flatten_params(params)
    if trainable is None:
        return {k: True for k in flat}
    out = {k: any(re.search(p, k) for p in trainable) for k in flat}
    dead = [p for p in trainable if not any(re.search(p, k) for k in flat)]
    if dead:
        raise ValueError(f"trainable pattern(s) {dead} match no parameter; paths look like {sorted(flat)[:3]}")
    if not any(out.values()):
        raise ValueError("the trainable patterns select no parameter")
    return out


def split_trainable(params: Mapping[str, Any], mask: Mapping[str, bool]) -> tuple[dict, dict]:
    """``params -> (trainable subtree, frozen subtree)`` (nested dicts)."""
    flat = flatten_params(params)
    return (unflatten_params({k: v for k, v in flat.items() if mask[k]}),
            unflatten_params({k: v for k, v in flat.items() if not mask[k]}))


def merge_trainable(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """Inverse of :func:`split_trainable`."""
    return unflatten_params({**flatten_params(frozen), **flatten_params(trainable)})
