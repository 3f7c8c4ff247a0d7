"""Per-stage freeze masks: after a Video-LLaMA stage-1 step the frozen towers are bitwise unchanged,
get no optimizer state, and only the stage's sub-trees move."""

from __future__ import annotations

import jax
import numpy as np

from tests.train.common import build, fixed_batches
from vjax.models import registry
from vjax.pytree import flatten_params
from vjax.train.sharding import make_mesh


def test_video_llama_stage1_freezes_the_towers():
    cfg_cls, _ = registry.get("video_llama")
    stage = cfg_cls.STAGES["vl_pretrain"]
    trainer = build("video_llama", make_mesh((1, 1, 1)), trainable=stage)
    state = trainer.init_state(0)
    before = flatten_params(jax.device_get(state.params))
    for batch in fixed_batches(trainer.module, 2, batch=2):
        state, metrics = trainer.train_step(state, batch)
        assert bool(metrics["finite"])
    after = flatten_params(jax.device_get(state.params))
    trained = {k for k, m in trainer.mask.items() if m}
    assert trained and all(k.split("/")[0] in ("video_frame_position_embedding", "video_qformer", "llama_proj")
                           for k in trained)
    frozen = [k for k in before if k not in trained]
    assert any(k.startswith("vision/") for k in frozen) and any(k.startswith("llm/") for k in frozen)
    for k in frozen:  # EVA, image Q-Former, audio branch, LLM: bitwise unchanged
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    moved = [k for k in trained if not np.array_equal(before[k], after[k])]
    assert len(moved) > len(trained) // 2  # the stage's parameters do train
    # optimizer state exists only for the trainable sub-trees
    state_paths = set()
    for leaf_path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        keys = [getattr(p, "key", None) for p in leaf_path]
        state_paths.add("/".join(k for k in keys if isinstance(k, str)))
    opt_params = {p for p in state_paths if p}
    assert opt_params and all(p.split("/")[0] in ("video_frame_position_embedding", "video_qformer", "llama_proj")
                              for p in opt_params)
