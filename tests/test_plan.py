"""``experiments.plan``: a tiny recipe compiled ahead of time for abstract TPU v5p chips on this CPU host (libtpu,
from the ``plan`` extra the test extra pulls in), its per-chip figures checked against an independent count."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments import plan

ROOT = Path(__file__).resolve().parents[1]


def run_plan(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "experiments.plan", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_slices_name_their_chips_and_memory():
    s = plan.parse_slice("v5p-8")
    assert (s.topology, s.chips, s.hbm) == ("v5p:2x2x1", 4, 95 * 1024**3)
    assert plan.parse_slice("v5p-16").topology == "v5p:2x2x2"
    assert (plan.parse_slice("v5e-8").chips, plan.parse_slice("v6e-4").hbm) == (8, 32 * 1024**3)
    for bad in ("v5p-6", "v9-8", "tpu"):
        with pytest.raises(ValueError, match=bad):
            plan.parse_slice(bad)


def test_out_of_memory_is_a_verdict_not_a_crash():
    """libtpu refuses to compile what does not fit (RESOURCE_EXHAUSTED); the plan reads the temporaries from
    the message (as libtpu writes it) and says the recipe does not fit. Other compiler errors propagate."""

    class Refused:
        def __init__(self, message):
            self.message = message

        def compile(self):
            raise RuntimeError(self.message)

    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (150.11G) "
           "exceeds available HBM (95.74G).")
    compiled, mem, _ = plan.compile_for_memory(Refused(msg))
    assert compiled is None and mem["temporaries"] == int(150.11 * 1024**3)
    assert mem["error"].startswith("RESOURCE_EXHAUSTED")
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        plan.compile_for_memory(Refused("INVALID_ARGUMENT: something else"))


def test_missing_libtpu_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        plan.tpu_devices(plan.parse_slice("v5p-8"))
    assert exc.value.code == 2
    assert "pip install -e '.[plan]'" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2():
    for args, key in ((["--config=video_chatgpt:tiny", "--topology=v5p-6"], "v5p-6"),
                      (["--config=nope:7b"], "nope"),
                      (["--config=video_chatgpt:tiny", "--global_batch=3"], "global_batch"),
                      (["--config=video_chatgpt:tiny", "--topology=local", "--steps=0"], "steps")):
        proc = run_plan(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert key in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_tiny_recipe_compiles_for_a_v5p_slice(tmp_path):
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is missing: the test extra installs it (pip install -e '.[test]' pulls '.[plan]')")
    out = tmp_path / "plan.json"
    proc = run_plan("--config=video_chatgpt:tiny", "--topology=v5p-8", "--mesh=1,4,1", "--global_batch=8",
                    "--tokens=96", "--set=llm.scan_layers=True", "--set=llm.remat_policy=full", "--decode",
                    f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.read_text())
    train, decode = info["plans"]
    assert (info["chips"], info["mesh"], info["global_batch"], info["tokens"]) == (4, [1, 4, 1], 8, 96)
    assert "fits" in proc.stdout and "[train step]" in proc.stdout and "[decode step]" in proc.stdout

    # parameters per chip: FSDP over 4 chips holds a quarter of every divisible float32 parameter (an independent
    # count from the model's abstract init; indivisible dims are replicated, so per chip is at least a quarter)
    from experiments import config  # noqa: PLC0415
    from vjax.train.step import _example_batch  # noqa: PLC0415

    _, model, mcfg = plan.recipe("video_chatgpt:tiny", dtype="bfloat16", assignments=["llm.scan_layers=True"])
    module = model.module(mcfg)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), _example_batch(module), method="loss"))["params"]
    total = sum(math.prod(x.value.shape if hasattr(x, "value") else x.shape) * 4
                for x in jax.tree_util.tree_leaves(params, is_leaf=lambda x: hasattr(x, "value")))
    pc = train["per_chip"]
    assert total / 4 <= pc["parameters"] <= total
    assert train["parameters"] * 4 == total
    assert pc["optimizer_state"] >= pc["parameters"]  # AdamW: two float32 moments of the trainable part
    assert pc["temporaries"] > 0 and pc["total"] < 1024**3 and train["fits"] and train["fraction_of_hbm"] < 0.01
    # compiled FLOPs (all chips) against XLA's count of the unsharded, remat-free step: the same work, give or take
    # XLA's rewrites and the sharded update
    assert train["model_flops"] > 0 and 0.7 < train["flops_ratio"] < 2.0, train
    assert "slice" in train["flops_basis"]  # the scanned LLM: counted on an unrolled 2-block slice
    assert decode["per_chip"]["kv_cache"] > 0 and decode["fits"]
    assert config.config_names()  # the command and the test read the same configs


def test_offloaded_block_inputs_leave_the_chip():
    """``remat_policy="full_offload"`` moves every block's input to host memory: exactly layers x (samples per chip)
    x tokens x width bfloat16 values there (an independent count), with bfloat16 gradients (``optim.grad_dtype``)
    compiled in. A scanned 8-layer decoder for 4 v5p chips. Measured on it (one compile each, not asserted: the suite's
    time): HBM temporaries 67.1 MB with ``full``, 62.3 with ``full_offload``, 55.4 with bfloat16 gradients too;
    bfloat16 gradients' numerics are tested in tests/train/test_optim.py."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is missing: the test extra installs it (pip install -e '.[test]' pulls '.[plan]')")
    from vjax.train.sharding import make_mesh  # noqa: PLC0415

    layers, width, inner, tokens = 8, 512, 2048, 512
    sets = ["scan_layers=True", f"hidden_size={width}", f"intermediate_size={inner}", f"num_layers={layers}",
            "num_heads=4", "num_kv_heads=4", "vocab_size=512"]
    mesh = make_mesh((1, 4, 1), plan.tpu_devices(plan.parse_slice("v5p-8")))

    def memory(*extra):
        c, model, mcfg = plan.recipe("decoder:tiny", None, "bfloat16", sets + list(extra))
        return plan.compile_for_memory(plan.lower_train(c, model, mcfg, mesh, 4, tokens)[3])[1]

    both = memory("remat_policy=full_offload", "optim.grad_dtype=bfloat16")
    assert both["host_temporaries"] == layers * 1 * tokens * width * 2, both  # one sample per chip, bfloat16


def test_gradients_in_place_free_a_gradient_stack_of_temporaries():
    """``grads_in_place`` with the elementwise finite guard (``optim.finite_guard=select``): the step compiled for
    4 v5p chips holds at least one bfloat16 gradient stack of the layers less in temporaries than the default step
    (both with bfloat16 gradients and ``full`` remat): the backward pass writes the gradients over the bfloat16
    weight copy instead of a stack of their own. The stack's size is counted here from the shapes (layers x (4 x
    width^2 + 3 x width x inner) x 2 bytes / 4 chips: 16 MiB). Measured on this 8-layer decoder (not asserted): 60.4
    MiB default, 40.0 in place with the branch guard, 28.3 with the select guard, 26.4 with ``mlp_chunks=4`` too."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is missing: the test extra installs it (pip install -e '.[test]' pulls '.[plan]')")
    from vjax.train.sharding import make_mesh  # noqa: PLC0415

    layers, width, inner, tokens = 8, 512, 2048, 512
    sets = ["scan_layers=True", f"hidden_size={width}", f"intermediate_size={inner}", f"num_layers={layers}",
            "num_heads=4", "num_kv_heads=4", "vocab_size=512", "remat_policy=full", "optim.grad_dtype=bfloat16"]
    mesh = make_mesh((1, 4, 1), plan.tpu_devices(plan.parse_slice("v5p-8")))

    def temporaries(*extra):
        c, model, mcfg = plan.recipe("decoder:tiny", None, "bfloat16", sets + list(extra))
        return plan.compile_for_memory(plan.lower_train(c, model, mcfg, mesh, 4, tokens)[3])[1]["temporaries"]

    stack = layers * (4 * width * width + 3 * width * inner) * 2 // 4
    default, in_place = temporaries(), temporaries("grads_in_place=True", "optim.finite_guard=select")
    assert in_place <= default - stack, (default, in_place, stack)


def test_compute_dtype_reaches_every_module_and_keeps_float32_weights():
    """The experiment's mixed-precision policy: ``compute_dtype`` sets every module config's ``dtype``; the
    parameters (master weights) stay float32. The published recipes compute in bfloat16."""
    from experiments import config  # noqa: PLC0415

    c = config.experiment_config("video_llama", "tiny")
    c.compute_dtype = "bfloat16"
    _, mcfg = config.model_config(c)
    for part in ("vision", "image_qformer", "video_qformer", "audio", "audio_qformer", "llm"):
        sub = getattr(mcfg, part)
        assert (sub.dtype, sub.param_dtype) == ("bfloat16", "float32"), part
    assert config.experiment_config("qwen2_vl", "7b").compute_dtype == "bfloat16"
    assert config.experiment_config("qwen2_vl", "tiny").compute_dtype == "float32"


def test_published_recipes_scan_and_rematerialise_every_block_stack():
    """scan_layers / remat_policy / attention_impl reach the LLM and the towers of a published recipe (not the tiny
    runs)."""
    from experiments import config  # noqa: PLC0415

    for name, variant in (("qwen2_vl", "7b"), ("video_llama", "stage2")):
        _, mcfg = config.model_config(config.experiment_config(name, variant))
        for part in ("llm", "vision"):
            sub = getattr(mcfg, part)
            assert (sub.scan_layers, sub.remat_policy, sub.attention_impl) == (True, "full", "auto"), (name, part)
    _, tiny = config.model_config(config.experiment_config("qwen2_vl", "tiny"))
    assert (tiny.llm.scan_layers, tiny.llm.remat_policy) == (False, "none")


def test_peak_of_known_chips():
    assert plan.peak_tflops("NVIDIA H100 80GB HBM3") == plan.peak_tflops("NVIDIA H200") == 989.4
    assert plan.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and plan.peak_tflops("TPU v5p") == 459.0
    assert plan.peak_tflops("cpu") is None


def test_random_batch_keeps_the_visual_placeholders_and_supervises_the_appended_text():
    """The timed run's batch: the example's placeholders in the same count (no random id is a placeholder), the
    appended tokens attended and supervised, ``loss_positions`` as the data pipeline computes them from the mask
    (:func:`vjax.data.pipeline.loss_positions`, an independent implementation), random frames."""
    import numpy as np  # noqa: PLC0415

    from vjax.data.pipeline import loss_positions  # noqa: PLC0415
    from vjax.train.sharding import make_mesh  # noqa: PLC0415

    c, model, mcfg = plan.recipe("qwen2_vl:tiny")
    tokens = plan.default_tokens(c, model, mcfg) + 40
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    trainer, _, abstract = plan.train_setup(c, model, mcfg, mesh, 3, tokens)
    batch = plan.random_batch(trainer.module, abstract, mcfg.llm.vocab_size)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (a.shape, a.dtype) for k, a in abstract.items()}
    example = trainer.module.example_batch(3)
    n = int((np.asarray(example["input_ids"]) == mcfg.video_token_id).sum(1)[0])
    assert n == mcfg.num_visual_tokens and ((batch["input_ids"] == mcfg.video_token_id).sum(1) == n).all()
    assert batch["input_ids"].max() < mcfg.llm.vocab_size and batch["attention_mask"].all()
    appended = tokens - example["input_ids"].shape[1]
    p = abstract["loss_positions"].shape[1]
    assert (batch["loss_mask"].sum(1) == min(p, appended)).all() and batch["loss_mask"][:, -1].all()
    np.testing.assert_array_equal(batch["loss_positions"], loss_positions(batch["loss_mask"], p))
    assert 0.4 < batch["frames"].mean() < 0.6


def test_local_run_times_a_real_step_and_its_mfu(tmp_path):
    """``--topology=local`` on this CPU: the tiny recipe's step compiled and run, its figures consistent (MFU =
    model FLOPs / median step / peak), the loss finite and falling once the warm-up's zero learning rate is past,
    and the model FLOPs above the forward matmuls of its parameters alone (2 N tokens)."""
    out = tmp_path / "local.json"
    proc = run_plan("--config=qwen2_vl:tiny", "--topology=local", "--steps=3", "--global_batch=2",
                    "--peak_tflops=0.5", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.read_text())
    run = info["plans"][0]
    assert run["step"] == "train (run)" and info["topology"].startswith("local") and "MFU" in proc.stdout
    assert len(run["losses"]) == 5 and all(math.isfinite(x) for x in run["losses"])
    assert run["losses"][-1] < run["losses"][2]
    assert run["step_seconds_min_max"][0] <= run["step_seconds"] <= run["step_seconds_min_max"][1]
    tokens = info["global_batch"] * info["tokens"]
    assert run["tokens_per_second"] == pytest.approx(tokens / run["step_seconds"])
    assert run["model_flops"] > 2 * run["parameters"] * tokens
    assert run["mfu"] == pytest.approx(run["model_flops"] / run["step_seconds"] / 0.5e12)
    assert run["per_chip"]["temporaries"] > 0
