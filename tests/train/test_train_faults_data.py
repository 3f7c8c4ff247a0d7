"""``experiments.train`` under faults of its inputs and its disk: NaN batches are skipped, counted and a streak
stops the run (exit 2, last good checkpoint kept); corrupt and deleted videos are skipped, counted per
reason in metrics.jsonl and the summary, and decoded once; a checkpoint directory that turns read-only or
full mid-run is one line, exit 2, with the previous checkpoint intact and nothing half-written picked up.
Too many unreadable training or validation videos exit 2. Each case is a real command in a subprocess,
faults injected by ``tests.faults``. See docs/reliability.md."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from tests.train.faults_common import NATIVE_LOG, command, env_for, metrics, one_line, params_of, steps, tiny_args
from vjax.data.pipeline import resolve_records


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The module's directory (with the tiny runs' synthetic set generated in it) and environment."""
    from experiments.configs import chat_univi  # noqa: PLC0415
    from vjax.data.synthetic import SyntheticConfig, ensure_synthetic_dataset  # noqa: PLC0415

    d = tmp_path_factory.mktemp("train_faults_data")
    syn = {**chat_univi.get_config("tiny").data.synthetic.to_dict(), "num_train": 4, "num_val": 2, "num_test": 0,
           "long_every": 0, "show_progress": False}
    ensure_synthetic_dataset(d / "synthetic", SyntheticConfig(**syn))  # the set tiny_args(d) names
    return d, env_for(d)


def test_nan_batches_are_skipped_and_counted_and_a_streak_stops_with_exit_2(shared):
    d, env = shared
    w = d / "nan"
    r = command("train", [*tiny_args(d, total_steps=8, save_every=1, max_nonfinite_in_a_row=2), f"--workdir={w}"],
                env, faults={"nan_steps": [2, 4, 5]})
    line = one_line(r, 2)
    assert line == (f"error: 2 non-finite steps in a row (steps 4-5, last loss=nan, grad_norm=nan); none was "
                    f"applied. Last good checkpoint: step 4 in {w / 'checkpoints'}. Lower the learning rate or check "
                    f"the data, then re-run to resume.")
    rows = metrics(w)
    assert [(m["step"], m["finite"], m["skipped_nonfinite"]) for m in rows] == \
        [(1, 1, 0), (2, 0, 1), (3, 1, 0), (4, 0, 1)]  # step 2 skipped, counted, training went on
    step, params = params_of(w)  # the latest checkpoint restores with finite values
    assert step == 4 and all(np.isfinite(p).all() for p in params)


def _annotations(d, name: str, records: list[dict]) -> dict:
    """Write ``records`` as ``<d>/<name>.jsonl``; the config keys of a run on them (real annotations)."""
    (d / f"{name}.jsonl").write_text("\n".join(json.dumps(x) for x in records) + "\n")
    return {"data.train_annotations": d / f"{name}.jsonl", "data.tokenizer": d / "synthetic" / "tokenizer"}


def _clips(d) -> tuple[list[dict], str]:
    """The synthetic set's 12 training records (4 clips) with absolute paths, and a truncated copy of a clip."""
    syn = d / "synthetic"
    records = resolve_records([json.loads(x) for x in (syn / "train.jsonl").read_text().splitlines()], syn)
    bad = d / "truncated.mp4"
    bad.write_bytes(open(records[0]["video"], "rb").read()[:3000])
    return records, str(bad)


def test_corrupt_and_deleted_videos_are_skipped_counted_per_reason_and_decoded_once(shared):
    """Real annotations: the 12 records of 4 good clips, 3 of a truncated clip and 3 of a clip deleted after
    step 2 (no frame cache, so every draw reads the file)."""
    d, env = shared
    records, bad = _clips(d)
    shutil.copy(records[0]["video"], d / "doomed.mp4")
    recs = records + [dict(records[i], video=bad) for i in range(3)] + \
        [dict(records[i], video=str(d / "doomed.mp4")) for i in range(3)]
    w = d / "bad_videos"
    args = tiny_args(d, total_steps=16, save_every=100, **_annotations(d, "train", recs),
                     **{"data.cache_mb": 0, "data.max_bad_fraction": 0.5})
    r = command("train", [*args, f"--workdir={w}"], env,
                faults={"after_step": {"2": [["delete", str(d / "doomed.mp4")]]}})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = metrics(w)
    cannot_open = sum(m.get("skipped/cannot_open", 0) for m in rows)
    missing = sum(m.get("skipped/missing", 0) for m in rows)
    assert cannot_open >= 3 and missing >= 1  # 16 steps of 2 records cover the set at least once after step 2
    assert sum(m["skipped_records"] for m in rows) == cannot_open + missing
    assert all(m.get("skipped/missing", 0) == 0 for m in rows if m["step"] <= 2)  # only once it was deleted
    assert f"skipped: {int(cannot_open)} records (cannot_open), {int(missing)} records (missing)" in r.stdout
    assert not NATIVE_LOG.search(r.stderr), r.stderr[-3000:]  # no FFmpeg/decord lines
    assert len(re.findall(r"skipping \S*truncated\.mp4", r.stderr)) == 1  # logged once (decoded once:
    # tests/data/test_pipeline.py::test_bad_files_are_counted_per_kind_and_decoded_once)


@pytest.mark.parametrize("split", ["train", "val"])
def test_too_many_unreadable_videos_exit_2(shared, split):
    """Training records: past data.max_bad_fraction (10 %) once 20 were read, exit 2 naming examples (3 of the
    15 records are bad). Validation records: checked before training starts, whatever their number."""
    d, env = shared
    records, bad = _clips(d)
    keys = _annotations(d, f"{split}_too_bad", records + [dict(records[i], video=bad) for i in range(3)])
    if split == "val":
        keys = {**_annotations(d, "good", records), "data.val_annotations": keys["data.train_annotations"],
                "eval.records": 15}
    w = d / f"too_bad_{split}"
    r = command("train", [*tiny_args(d, total_steps=40, save_every=100, **keys), f"--workdir={w}"], env)
    line = one_line(r, 2)
    assert line.startswith(f"error: {'training' if split == 'train' else 'validation'} records: too many bad "
                           f"records (limit 10%): ") and "truncated.mp4 (FFmpeg cannot open it" in line, line
    if split == "val":
        assert "3 of 15 records bad" in line and not (w / "metrics.jsonl").exists()  # before any step


@pytest.mark.parametrize("fault", ["full", "read_only"])
def test_checkpoint_directory_full_or_read_only_mid_run(shared, fault):
    """The save of step 4 fails (RLIMIT_FSIZE: the kernel refuses the array files' writes, as a full disk would;
    or every write under checkpoints/ gets EROFS): one line, exit 2, step 2 intact and the only step a later
    run sees; rerun after the full disk, it resumes from step 2 and finishes."""
    d, env = shared
    w = d / fault
    action = ["fsize_limit", 20_000] if fault == "full" else ["read_only", str(w / "checkpoints")]
    r = command("train", [*tiny_args(d), f"--workdir={w}"], env, faults={"before_save": {"4": [action]}})
    line = one_line(r, 2)
    assert line.startswith(f"error: could not write checkpoint step 4 to {w / 'checkpoints'} (") and line.endswith(
        "); the previous checkpoint, step 2, is intact: make the directory writable or free space, then re-run "
        "to resume"), line
    assert ("File too large" if fault == "full" else "Read-only file system") in line
    assert steps(w) == [2]
    if fault == "full":
        r = command("train", [*tiny_args(d), f"--workdir={w}"], env)
        assert r.returncode == 0 and "resumed from step 2" in r.stdout, r.stderr[-3000:]
        assert steps(w) == [4, 6]
