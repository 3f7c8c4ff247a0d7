"""``python -m experiments.train``: every registered model trains 3 steps at tiny size on a tiny
synthetic set, writes metrics and a checkpoint and scores the set's test split at the end, in the same process; then
``experiments.chat`` (two interactive turns about
a held-out clip) runs on that checkpoint, and for one model ``experiments.eval`` (the scoring of the test split is
the code the end of training ran for every model). Bad configurations fail fast (no compilation) with exit code 2
and the key named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import config
from vjax.models import registry

ROOT = Path(__file__).resolve().parents[2]
MODELS = [m for m in registry.names() if m in config.config_names()]
# The eval command runs for one model (scoring is model-independent). Resuming is too: the command's resume is run by
# tests/test_pretrain.py::test_staged_training_command, and tests/train/test_loop.py kills a run with SIGKILL and
# resumes it bitwise.
EVALUATED = ("chat_univi",)
# A handful of short clips; one text bucket so each run compiles one train step; 2 test questions scored at the end.
TINY_DATA = ["--config.data.synthetic.num_train=4", "--config.data.synthetic.num_val=2",
             "--config.data.synthetic.num_test=1", "--config.data.synthetic.long_every=0",
             "--config.data.synthetic.show_progress=False", "--config.data.batch_size=2",
             "--config.data.text_buckets=(256,)", "--config.log_every=1", "--config.save_every=100",
             "--config.stage0.parts=", "--config.align.steps=0", "--config.eval.test_records=2",
             "--config.eval.max_new_tokens=2", "--config.eval.batch_size=2", "--config.eval.records=0"]
# The main job keeps the default Grain worker process; the others read in the training process (3 steps: a
# worker's start-up would cost more than it saves; tests/data covers the workers)
IN_PROCESS = "--config.data.worker_count=0"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One synthetic set for every run of this module (compilations go to the session's cache, conftest.py)."""
    d = tmp_path_factory.mktemp("train_cli")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return d, env


def _train(args, env, timeout=600):
    return _command("train", args, env, timeout)


def _command(name, args, env, timeout=600, stdin=None):
    return subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_every_registered_model_has_a_config():
    assert set(config.config_names()) >= set(registry.names()) - {"decoder"}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_train_three_steps_then_chat_and_eval(model, shared):
    d, env = shared
    workdir = d / model
    args = [f"--config={model}", f"--workdir={workdir}", f"--config.data.root={d / 'synthetic'}", *TINY_DATA]
    if model == "chat_univi":  # one model also runs the generation-based evaluation during training
        args[-1] = "--config.eval.records=2"
    else:
        args.append(IN_PROCESS)
    r = _train([*args, "--config.total_steps=3"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _metrics(workdir)
    train = [x for x in rows if x["split"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3]
    assert all(x["loss"] > 0 and x["finite"] == 1.0 for x in train)
    assert (workdir / "checkpoints" / "3").is_dir()
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["model"] == model and cfg["experiment"]["total_steps"] == 3
    assert "visual tokens per clip:" in r.stdout
    # the test split scored at the end of training, as experiments.eval scores it
    assert "test split: 2 questions" in r.stdout and "2 test questions in" in r.stdout, r.stdout[-3000:]
    report = json.loads((workdir / "eval" / "synthetic_test.json").read_text())
    assert report["model"] == model and report["step"] == 3 and report["evaluated"] == 2
    assert report["accuracy"]["all"]["n"] == 2 and len(report["predictions"]) == 2
    if model == "chat_univi":
        val = [x for x in rows if x["split"] == "val"]
        assert val and "accuracy/all" in val[-1] and "loss" in val[-1]
        assert "question type" in r.stdout
        # 4 frames of 8 x 8 patches -> 2 events x (5 + 3) clusters; Video-ChatGPT's pooling: 4 + 64 tokens
        assert "visual tokens per clip: 16 (video chatgpt pooling tokens: 68, 4.25x as many)" in r.stdout

    step = 3

    # chat: an interactive two-turn conversation about a held-out clip (the video encoded once)
    video = d / "synthetic" / "videos" / "val" / "000000.mp4"
    r = _command("chat", [f"--workdir={workdir}", f"--video={video}", "--max_new_tokens=3"], env,
                 stdin="What colour is the circle?\nHow many objects appear in the video?\n\n")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{model} step {step}" in r.stdout and r.stdout.count("model> ") == 2 and r.stdout.count("you> ") == 3

    if model not in EVALUATED:
        return
    # eval, the command: the synthetic set's test split, on the trained checkpoint
    (workdir / "eval" / "synthetic_test.json").unlink()
    r = _command("eval", [f"--workdir={workdir}", "--batch_size=2", "--max_new_tokens=2", "--limit=2",
                          "--noprogress"], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((workdir / "eval" / "synthetic_test.json").read_text())
    assert report["model"] == model and report["step"] == step and report["evaluated"] == 2
    assert report["accuracy"]["all"]["n"] == 2 and len(report["predictions"]) == 2
    assert "all" in r.stdout and "synthetic_test" in r.stdout


BAD = [
    (["--config.total_stepz=3"], "total_stepz"),
    (["--config.data.batch_size=two"], "data.batch_size"),
    (["--config.mesh=(2,1,1)"], "mesh"),
    (["--config.data.train_annotations=/nonexistent/vjax/train.json"], "data.train_annotations"),
    (["--config.model_overrides.llm.hidden_size=2.5"], "model_overrides.llm.hidden_size"),
    (["--config.stage=everything"], "stage"),
    (["--config.data.sampler_kwargs.fps_typo=2"], "data.sampler_kwargs.fps_typo"),
    (["--config.compute_dtype=int8"], "compute_dtype"),
    (["--config.remat_policy=sometimes"], "remat_policy"),
    (["--config.attention_impl=magic"], "attention_impl"),
    (["--config.optim.mu_dtype=int8"], "optim"),
    (["--config.eval.test_records=-2"], "eval.test_records"),
    (["--config.stage0.parts=vision,tower"], "stage0.parts"),
    (["--config.align.steps=5", "--config.align.stage=everything"], "align.stage"),
    (["--config.data.train_records=subtitles"], "data.train_records"),
    (["--config.data.train_questions=some"], "data.train_questions"),
    (["--config.data.prefetch=-1"], "data.prefetch"),
]


@pytest.mark.parametrize("extra,key", BAD, ids=[b[1] for b in BAD])
def test_bad_configuration_exits_2_naming_the_key_before_compiling(extra, key, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = _train(["--config=chat_univi", f"--workdir={tmp_path / 'w'}", f"--config.data.root={tmp_path / 'syn'}",
                *extra], env, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"'{key}'" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "syn").exists() and not (tmp_path / "w").exists()  # failed before any work
    assert time.perf_counter() - t0 < 60


def test_published_variant_without_its_data_fails_early_naming_the_path(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}  # ~/data/... cannot exist
    r = _train(["--config=qwen2_vl:7b", f"--workdir={tmp_path / 'w'}"], env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "'data.train_annotations'" in r.stderr and str(tmp_path) in r.stderr


def test_unknown_config_name_exits_2():
    r = _train(["--config=no_such_model"], {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2 and "'config'" in r.stderr and "chat_univi" in r.stderr


def test_unknown_variant_exits_2_with_the_reason():
    """absl keeps only 'Error whilst parsing config file:' of the config file's error; the reason is shown."""
    r = _train(["--config=chat_univi:huge"], {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: config key 'config': chat_univi:huge: unknown chat_univi variant 'huge'; known: tiny, stage1, "
        "stage2, 13b"], r.stderr
