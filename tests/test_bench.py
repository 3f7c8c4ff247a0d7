"""``experiments.bench`` at ``--size=tiny``: every suite runs and writes its JSON entries (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = bench.run(list(bench.SUITES), size="tiny", out=str(out), repeats=1,
                    workdir=str(tmp_path_factory.mktemp("bench_work")))
    with open(out / "results.json") as f:
        written = json.load(f)
    return res, written, (out / "results.md").read_text()


def test_every_suite_ran_without_error(results):
    res, written, md = results
    assert res["errors"] == {}, "\n".join(res["errors"].values())
    assert set(written["suites"]) == set(bench.SUITE_NAMES)
    m = written["machine"]
    for key in ("cpu_model", "cpu_count", "jax", "torch", "transformers", "device_platform"):
        assert m[key], key
    assert md.count("\n| ") >= len(bench.SUITE_NAMES) and "| suite | measurement |" in md


def test_matmul_and_train_step_entries(results):
    suites = results[1]["suites"]
    assert suites["matmul_peak"]["peak_gflops"] > 0
    llama = suites["train_step"]["models"]["llama"]
    assert all(llama["steps_per_s"][k] > 0 for k in ("vjax", "torch", "torch_1t"))
    assert llama["reference"] in ("torch", "torch_1t")
    assert llama["speedup"] > 0 and 0 < llama["mfu"]["vjax"]
    assert llama["flops"]["flops"] == llama["flops"]["dense_flops"] + llama["flops"]["attention_flops"] > 0
    assert llama["first_loss_abs_diff"] < 1e-4  # the same weights on both sides
    assert llama["compiles_timed"] == 0 and llama["jit_cache_size"] == 1


def test_qwen2_vl_train_step_entries(results):
    """Qwen2-VL: transformers and vjax on the same converted weights and clips agree on the first loss;
    FLOPs count both towers."""
    train = results[1]["suites"]["train_step"]
    assert set(train["models"]) == set(bench.TRAIN_MODELS) >= {"llama", "qwen2_vl"}
    q = train["models"]["qwen2_vl"]
    v = bench.SIZES["tiny"].vl
    assert all(q["steps_per_s"][k] > 0 for k in ("vjax", "torch", "torch_1t"))
    assert q["reference"] in ("torch", "torch_1t") and q["speedup"] > 0 and q["mfu"]["vjax"] > 0
    assert q["first_loss_agree"] is True and q["first_loss_abs_diff"] < 1e-4
    assert abs(q["first_loss"]["vjax"] - q["first_loss"]["torch"]) == q["first_loss_abs_diff"]
    assert q["checkpoint_layout"] in ("transformers5", "release")
    assert q["grid_thw"] == list(v.grid) and q["visual_tokens_per_clip"] == v.visual_tokens == 8
    f = q["flops"]
    assert f["patches"] == v.batch * 2 * 4 * 4 and f["tokens"] == v.batch * v.seq
    assert f["vision_dense_flops"] > 0 and f["vision_attention_flops"] > 0 and f["params"]["vision"] > 0
    assert f["flops"] == (f["decoder_dense_flops"] + f["decoder_attention_flops"] + f["vision_dense_flops"]
                          + f["vision_attention_flops"]) == f["dense_flops"] + f["attention_flops"]
    assert q["compiles_timed"] == 0 and q["jit_cache_size"] == 1
    rows = [r for r in results[1]["rows"] if r["suite"] == "train_step" and r["measurement"].startswith("qwen2_vl")]
    assert len(rows) >= 4 and all(r["met"] is not False for r in rows if "recompiles" in r["measurement"])


def test_generate_entries(results):
    gen = results[1]["suites"]["generate"]
    assert gen["tokens_agree"] is True
    assert gen["tokens_vjax"] == gen["tokens_torch"]
    assert len(gen["tokens_vjax"][0]) == bench.SIZES["tiny"].new_tokens
    assert gen["reference"] in ("torch", "torch_1t") and gen["speedup"] > 0
    for k in ("vjax", "torch", "torch_1t"):
        assert gen[k]["tokens_per_s"] > 0 and gen[k]["ttft"]["median_s"] > 0


def test_token_merge_and_memory_bank_entries(results):
    suites = results[1]["suites"]
    points = suites["token_merge"]["points"]
    assert [p["tokens"] for p in points] == list(bench.SIZES["tiny"].merge_tokens)
    assert all(p["memory"]["total"] > 0 and p["median_s"] > 0 for p in points)
    bank = suites["memory_bank"]
    assert [p["frames"] for p in bank["points"]] == [10, 100, 1000]
    assert bank["growth"] <= 1.1  # the streaming state does not grow with the frame count


def test_data_entries(results):
    """The consumer is a real tiny video model's train step on the pipeline's own batches."""
    data = results[1]["suites"]["data"]
    tiny = bench.SIZES["tiny"]
    assert data["pipeline"]["clips_per_s"] > 0 and data["tiny_train_step"]["clips_per_s"] > 0
    assert data["headroom"] > 0 and data["batch_frames_shape"][1] == tiny.data_frames
    assert data["batch_frames_shape"][2:] == [*tiny.data_frame_size, 3]
    assert data["model"] == f"{bench.DATA_MODEL}:tiny" and data["visual_tokens_per_clip"] > 0
    assert data["batch_input_ids_shape"][1] >= data["longest_record_tokens"] > data["visual_tokens_per_clip"]
    assert 0 < data["consumer_first_loss"] < 100
    assert set(data["pipelines"]) == {str(w) for w in tiny.data_workers}
    for p in data["pipelines"].values():
        assert p["clips_per_s"] > 0 and p["end_to_end"]["clips_per_s"] > 0 and p["end_to_end"]["compiles"] == 0


def test_cli_writes_results(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "--suite=matmul_peak", "--size=tiny", "--repeats=1",
         f"--out={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((tmp_path / "results.json").read_text())
    assert list(written["suites"]) == ["matmul_peak"] and written["size"] == "tiny"
    assert "matmul_peak" in (tmp_path / "results.md").read_text()


def test_unknown_suite_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown suite"):
        bench.run(["nope"], size="tiny", out=str(tmp_path))


def test_unknown_suite_on_the_command_line_exits_2_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.bench", "--suite=nope", f"--out={tmp_path}"], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: --suite: unknown suite(s) ['nope']; choose from {list(bench.SUITES)}"], proc.stderr[-3000:]
