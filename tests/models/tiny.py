"""Helpers shared by the video-LLM assembly tests: random parameters without compiling ``init``, and the
gradient of a model's loss."""

from __future__ import annotations

import jax
import numpy as np

from vjax.pretrained import abstract_params
from vjax.pytree import flatten_params, unflatten_params


def random_params(module, seed: int = 0, std: float = 0.05) -> dict:
    """Parameters of ``module`` drawn from the abstract tree (no ``init`` compilation): norms' scales
    ``1 + N(0, std)``, every other leaf ``N(0, std)`` (LoRA ``B`` included, so adapters matter)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten_params(abstract_params(module)).items():
        x = rng.normal(0.0, std, size=leaf.shape).astype(leaf.dtype)
        out[path] = x + 1.0 if path.endswith("/scale") else x
    return jax.tree_util.tree_map(np.asarray, unflatten_params(out))


def loss_and_grad(module, params, batch):
    """``(loss, flat {path: grad})`` of ``module.loss(batch)``, one jit."""
    fn = jax.jit(jax.value_and_grad(lambda p: module.apply({"params": p}, batch, method="loss")[0]))
    loss, grads = fn(params)
    return float(loss), {k: np.asarray(v) for k, v in flatten_params(grads).items()}
