"""Small builders shared by the training tests (importable from subprocesses)."""

from __future__ import annotations

import numpy as np

from vjax.models import registry
from vjax.train.optim import OptimConfig
from vjax.train.step import Trainer


def build(model: str, mesh, trainable=None) -> Trainer:
    """A Trainer for the tiny config of a registered model (its sharded dims divide a 2x2x2 mesh);
    ``"<name>+scan"``: the same with ``scan_layers`` on its decoder and towers."""
    model, _, variant = model.partition("+")
    cfg_cls, module_cls = registry.get(model)
    config = cfg_cls.tiny()
    if variant == "scan":
        from vjax.pretrained import _with_scan  # noqa: PLC0415

        config = _with_scan(config, True)
    module = module_cls(config)
    # Adam's first steps are ~lr * sign(g): an element whose gradient is ~0 flips sign under any change
    # of reduction order (sharded vs not), moving by ~lr. eps=1e-3 bounds that amplification to
    # lr * |Δg| / eps, so a 1e-5 comparison tests the sharding, not Adam's conditioning.
    optim_config = OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10, eps=1e-3)
    return Trainer(module, optim_config, mesh, trainable)


def fixed_batches(module, steps: int, batch: int = 8, seed: int = 0):
    """Deterministic batches in the model's documented format: random text tokens (placeholders and
    special ids kept where the model's example puts them) and random frames / audio."""
    rng = np.random.default_rng(seed)
    example = {k: np.asarray(v) for k, v in module.example_batch(batch).items()}
    c = module.config
    vocab = c.vocab_size if hasattr(c, "vocab_size") else c.llm.vocab_size
    special = {getattr(c, a) for a in ("placeholder_id", "image_token_id", "video_token_id", "vision_start_token_id")
               if getattr(c, a, None) is not None}
    ids = example["input_ids"]
    text = ~np.isin(ids, list(special)) & (np.arange(ids.shape[1]) > 0)
    for _ in range(steps):
        b = dict(example)
        draw = rng.integers(20, min(vocab, 200), ids.shape)
        b["input_ids"] = np.where(text, draw, ids).astype(np.int32)
        for k in ("frames", "audio"):
            if k in b:
                b[k] = rng.normal(size=b[k].shape).astype(np.float32)
        yield b
