"""Small builders shared by the training tests (importable from subprocesses)."""

from __future__ import annotations

import numpy as np

from vjax.models import registry
from vjax.train.optim import OptimConfig
from vjax.train.step import Trainer

MODELS = {
    # name -> config factory of a tiny model whose sharded dims divide a 2x2x2 mesh
    "decoder": lambda cfg_cls: cfg_cls.tiny(),
}


def build(model: str, mesh, trainable=None) -> Trainer:
    cfg_cls, module_cls = registry.get(model)
    module = module_cls(MODELS[model](cfg_cls))
    # Adam's first steps are ~lr * sign(g): an element whose gradient is ~0 flips sign under any change
    # of reduction order (sharded vs not), moving by ~lr. eps=1e-3 bounds that amplification to
    # lr * |Δg| / eps, so a 1e-5 comparison tests the sharding, not Adam's conditioning.
    optim_config = OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10, eps=1e-3)
    return Trainer(module, optim_config, mesh, trainable)


def fixed_batches(module, steps: int, batch: int = 8, seed: int = 0):
    """Deterministic batches in the model's documented format, with random token ids."""
    rng = np.random.default_rng(seed)
    example = {k: np.asarray(v) for k, v in module.example_batch(batch).items()}
    vocab = module.config.vocab_size if hasattr(module.config, "vocab_size") else module.config.decoder.vocab_size
    for _ in range(steps):
        b = dict(example)
        b["input_ids"] = rng.integers(3, vocab, example["input_ids"].shape).astype(np.int32)
        yield b
