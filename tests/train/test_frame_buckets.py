"""Qwen2-VL trains on clips of two aspect ratios with ``data.frame_buckets``: each clip at the frame shape nearest
its aspect (one static batch shape per bucket, batches of both buckets interleaved), then chats about a wide clip
at the wide bucket's shape."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from tests.train.test_train_cli import ROOT, _command, _metrics
from vjax.data.synthetic import train_tokenizer, write_mp4


def test_qwen2_vl_trains_on_frame_shape_buckets_and_chats_in_its_bucket(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for n, (h, w) in enumerate([(64, 64), (60, 64), (64, 128), (56, 120)] * 2):
        path = tmp_path / f"{n}.mp4"
        write_mp4(str(path), rng.integers(0, 255, (8, h, w, 3), dtype=np.uint8), fps=4)
        records.append({"id": str(n), "video": str(path), "conversations": [
            {"from": "human", "value": "<video>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    tok = train_tokenizer(["What colour is the circle? red green blue"] * 20, str(tmp_path / "tok"), 1024)
    # every compile, however short, in the session's cache (tests/conftest.py): the three runs share them
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    workdir = tmp_path / "run"
    args = ["--config=qwen2_vl", f"--workdir={workdir}", f"--config.data.train_annotations={tmp_path / 'train.json'}",
            f"--config.data.tokenizer={tok}", "--config.data.frame_buckets=((56, 56), (56, 112))",
            "--config.data.batch_size=2", "--config.data.text_buckets=(64,)", "--config.log_every=1",
            "--config.eval.records=0", "--config.data.cache_mb=0",
            "--config.stage0.parts=", "--config.align.steps=0",  # real data: no synthetic-set stages
            "--config.data.worker_count=0"]  # 3 steps: a Grain worker's start-up costs more than it saves
    r = _command("train", [*args, "--config.total_steps=3"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # tiny Qwen2-VL: 7-px patches merged 2 x 2, 4 frames -> 2 x (56/7 x 56/7) / 4 = 32 and 2 x (8 x 16) / 4 = 64
    assert "frame bucket 56x56: 4 records, 32 visual tokens" in r.stdout, r.stdout[-3000:]
    assert "frame bucket 112x56: 4 records, 64 visual tokens" in r.stdout, r.stdout[-3000:]
    r = _command("train", [*args, "--config.total_steps=4"], env)  # resumes: the buckets' data state restores
    assert r.returncode == 0 and "resumed from step 3" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    train = [x for x in _metrics(workdir) if x["split"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and all(x["finite"] == 1.0 for x in train)
    # the 4 steps drew from both buckets (BucketedBatches' schedule for seed 0, equal weights)
    assert {int(np.random.default_rng([0, k]).choice(2, p=[0.5, 0.5])) for k in range(4)} == {0, 1}

    r = _command("chat", [f"--workdir={workdir}", f"--video={tmp_path / '2.mp4'}", "--question=What colour?",
                          "--max_new_tokens=2"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = re.search(r"video: (\d+) frames of (\d+)x(\d+) -> (\d+) visual tokens", r.stderr)
    assert got and got.groups() == ("4", "112", "56", "64"), r.stderr[-3000:]
