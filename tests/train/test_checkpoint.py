"""``Checkpoints.restore_newest``: a step holding NaN/Inf (or that does not read) is passed over for the newest
one that restores, named with its reason, set aside only on request and only once an older one restored."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from vjax.train.checkpoint import Checkpoints, NoRestorableCheckpoint


def _save(directory, values: dict[int, float]) -> None:
    ck = Checkpoints(directory, keep=5)
    for step, value in values.items():
        ck.save(step, {"params": {"w": np.full((2, 3), value, np.float32)}}, force=True)
    ck.close()


def test_non_finite_checkpoints_are_passed_over_named_and_set_aside(tmp_path):
    directory = tmp_path / "checkpoints"
    _save(directory, {1: 1.0, 2: 2.0, 3: np.nan})
    target = {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}
    ck = Checkpoints(directory, keep=5)  # a reader, as chat/eval open it

    def restore(s):
        return ck.restore_params(target, step=s)

    params, step, failures = ck.restore_newest(restore)  # chat/eval: nothing moved
    assert step == 2 and float(np.asarray(params["w"]).max()) == 2.0
    assert failures == [(3, "ValueError: non-finite values in ['w']")]
    assert sorted(ck.all_steps()) == [1, 2, 3]

    _, step, failures = ck.restore_newest(restore, set_aside=True)  # a training run that will save again
    moved = tmp_path / "checkpoints_unreadable" / "3"
    assert step == 2 and failures == [(3, f"ValueError: non-finite values in ['w']; moved to {moved}")]
    assert sorted(ck.all_steps()) == [1, 2] and moved.is_dir()
    ck.close()

    only_bad = tmp_path / "only_bad"
    _save(only_bad, {4: np.inf, 5: np.nan})
    ck = Checkpoints(only_bad, keep=5)
    with pytest.raises(NoRestorableCheckpoint, match=r"restores \(step 5: .*non-finite.*; step 4: .*non-finite"):
        ck.restore_newest(lambda s: ck.restore_params(target, step=s), set_aside=True)
    assert sorted(ck.all_steps()) == [4, 5] and not (tmp_path / "only_bad_unreadable").exists()  # nothing moved
    ck.close()


def test_a_checkpoint_of_other_data_names_the_input_pipeline(tmp_path):
    """Resuming with other training records (say, a changed data.train_questions) cannot restore the saved Grain
    iterator: the error says that the input pipeline differs, not only Grain's words."""
    import grain.python as grain  # noqa: PLC0415

    def iterator(n):
        sampler = grain.IndexSampler(n, shard_options=grain.NoSharding(), shuffle=True, num_epochs=1, seed=0)
        return iter(grain.DataLoader(data_source=list(range(n)), sampler=sampler, worker_count=0))

    directory = tmp_path / "checkpoints"
    it = iterator(8)
    next(it)
    ck = Checkpoints(directory, keep=5)
    ck.save(1, {"params": {"w": np.ones((2, 3), np.float32)}}, data_iterator=it, force=True)
    ck.close()
    ck = Checkpoints(directory, keep=5)
    target = {"params": {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}}
    sharding = {"params": {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}}
    other = iterator(6)
    with pytest.raises(NoRestorableCheckpoint, match=r"step 1: .*[Ss]ampler.*\(the input pipeline differs"):
        ck.restore_newest(lambda s: ck.restore(target, sharding, step=s, data_iterator=other))
    same = iterator(8)
    state, step, _ = ck.restore_newest(lambda s: ck.restore(target, sharding, step=s, data_iterator=same))
    assert step == 1 and next(same) == next(it)  # the same data resumes where it stopped
    ck.close()
