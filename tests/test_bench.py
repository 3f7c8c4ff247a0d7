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
    # torch.compile takes minutes per model even at tiny size: its contender is tested alone below
    res = bench.run(list(bench.SUITES), size="tiny", out=str(out), repeats=1,
                    workdir=str(tmp_path_factory.mktemp("bench_work")), torch_compile=False)
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
    mm = suites["matmul_peak"]
    assert mm["peak_gflops"] == mm["jax"]["gflops_peak"] > 0 and mm["runs"] == 3 == mm["jax"]["n"]  # tiny: 3 runs
    lo, hi = mm["jax"]["gflops_spread"]
    assert lo <= mm["jax"]["gflops_median"] <= hi == mm["peak_gflops"]  # the peak is the fastest run
    assert "load_at_best" in mm["jax"] and (mm["load_min"] is None or mm["load_min"] <= mm["load_max"])
    llama = suites["train_step"]["models"]["llama"]
    assert all(llama["steps_per_s"][k] > 0 for k in ("vjax", "torch", "torch_1t"))
    assert llama["reference"] in ("torch", "torch_1t")
    assert llama["speedup"] > 0 and 0 < llama["mfu"]["vjax"]
    assert llama["flops"]["flops"] == llama["flops"]["dense_flops"] + llama["flops"]["attention_flops"] > 0
    assert llama["first_loss_abs_diff"] < 1e-4  # the same weights on both sides
    assert llama["compiles_timed"] == 0 and llama["jit_cache_size"] == 1
    assert llama["torch_compile_status"] == "not run (torch_compile=False)" and "torch_compile" not in llama


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


def test_attention_entries(results):
    """Each implementation that runs on a CPU at each length: a time, its ratio to the reference and its compiled
    memory; the chunked kernel's memory below the reference's ``[L, L]`` float32 scores."""
    att = results[1]["suites"]["attention"]
    assert att["platform"] == "cpu" and att["dtype"] == "float32"
    assert [p["length"] for p in att["points"]] == list(bench.SIZES["tiny"].attn_lengths)
    for p in att["points"]:
        assert set(p["impls"]) == {"xla", "chunked", "cudnn"}
        assert p["impls"]["xla"]["speedup_vs_xla"] == 1.0
        assert all(r["median_s"] > 0 and r["memory"]["total"] > 0 for r in p["impls"].values())
        assert p["impls"]["chunked"]["memory"]["temp_size"] < p["impls"]["xla"]["memory"]["temp_size"]


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
        assert 0 <= p["end_to_end"]["wait_fraction"] <= 1
    ahead = data["pipelines"]["0"]["end_to_end_prefetch"]  # with the training command's read-ahead thread
    assert ahead["clips_per_s"] > 0 and ahead["compiles"] == 0 and 0 <= ahead["wait_fraction"] <= 1


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


class _TinyLM:
    """A two-layer torch model with a transformers-like ``model(**inputs).loss``."""

    def __new__(cls):
        import torch  # noqa: PLC0415

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)

            def forward(self, x, y):
                out = type("Out", (), {})()
                out.loss = ((self.b(torch.tanh(self.a(x))) - y) ** 2).mean()
                return out

        return Model()


def test_torch_compile_contender_trains_the_same_weights_and_reports_a_failure():
    """The train step's torch.compile contender: a copy of the model, compiled outside the timed rounds, its
    first loss equal to the eager step's on the same weights (the eager model is not touched); a model that does
    not compile gives no contender but its error in one line; the reference is the fastest PyTorch contender."""
    import torch  # noqa: PLC0415

    from experiments.bench import references, suites  # noqa: PLC0415

    model = _TinyLM()
    inputs = {"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), "y": torch.zeros(4, 1)}
    before = [p.detach().clone() for p in model.parameters()]
    step, first, error = references.torch_compiled_adamw_step(model, inputs)
    assert error is None and step is not None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained a copy
    _, eager_first = references.torch_adamw_step(model, inputs)
    assert abs(first - eager_first) <= 1e-6 * max(1.0, abs(eager_first))
    assert float(step().detach()) < first  # later steps of the compiled copy train it (the loss falls)
    contenders = references.torch_contenders(lambda: 1, step)
    assert set(contenders) == {"torch", "torch_1t", "torch_compile"}
    assert set(references.torch_contenders(lambda: 1)) == {"torch", "torch_1t"}

    class Broken(torch.nn.Module):
        def forward(self, **kw):
            raise RuntimeError("no kernel for this op\nsecond line")

    step, first, error = references.torch_compiled_adamw_step(Broken(), inputs)
    assert step is None and first is None and error.startswith("RuntimeError: no kernel for this op")
    assert "\n" not in error
    assert suites._reference({"vjax": [1.0], "torch": [3.0], "torch_1t": [2.0], "torch_compile": [1.5]}) == \
        "torch_compile"
    assert suites._reference({"vjax": [1.0], "torch": [3.0], "torch_1t": [2.0]}) == "torch_1t"
