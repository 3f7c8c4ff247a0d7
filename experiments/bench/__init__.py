"""Benchmarks: vjax against transformers/PyTorch and against this machine's own matmul peak.

    python -m experiments.bench [--suite=all|matmul_peak,train_step,...] [--out=./bench_out]
                                [--size=small|tiny] [--repeats=N]

writes ``results.json`` (raw figures, machine description) and ``results.md`` (one Markdown table)
in ``--out``. Every comparison is measured side by side in the same process, the two contenders
interleaved round by round (A B, B A, A B ...), and reported as a ratio of medians, because the
machines this runs on are shared and noisy (the host's load average is recorded per suite).
PyTorch runs at its default intra-op thread count and at one thread, and the train step also under
``torch.compile`` (``--notorch_compile`` to skip its minutes of compilation); speedups are against the
fastest of them (on a loaded host OpenMP's per-op barriers make the default much slower).
``--size=tiny`` shrinks every suite to seconds (tests).

The package: ``sizes`` (dimensions per ``--size``, targets), ``harness`` (timing, compile counting,
memory, machine, table), ``references`` (the transformers/PyTorch contenders on the same weights),
``suites`` (one function per suite), :func:`run` here and the command in ``__main__``.

Suites (see each ``suite_*`` docstring in ``experiments.bench.suites`` for what exactly is timed):

* ``matmul_peak`` — a jitted float32 ``n x n @ n x n`` matmul: GFLOP/s of this machine, the
  denominator of the model-FLOPs utilisation (MFU) figures; PyTorch's matmul beside it.
* ``train_step`` — one AdamW step per model of :data:`TRAIN_MODELS`, vjax ``Trainer`` vs transformers
  + ``torch.optim.AdamW`` on the same weights: a Llama decoder (``LlamaForCausalLM``) and Qwen2-VL on
  8-frame clips (``Qwen2VLForConditionalGeneration``, weights converted with ``qwen2_vl_table``);
  steps/s, ratio, model FLOPs (vision tower included) and MFU, first losses (must agree), recompiles.
* ``generate`` — prompt prefill + 64 greedy tokens, vjax ``generate`` vs transformers ``generate``;
  tokens/s, time to first token, token-for-token agreement.
* ``token_merge`` — Chat-UniVi DPC-KNN ``spatial_merge`` time and compiled memory vs token count.
* ``memory_bank`` — MA-LMM streaming (``lax.scan`` of ``append_and_compress`` + an attention read of
  the bank) time and compiled memory vs frame count.
* ``data`` — Grain + decord pipeline clips/s on the synthetic set (in-process and with Grain workers)
  vs what a tiny video model's train step consumes (``DATA_MODEL``), and the two end to end.

Compiled memory is ``argument + output + temp - alias`` bytes of ``jit(f).lower(...).compile()
.memory_analysis()`` — what XLA allocates for one call (its ``peak_memory_in_bytes`` field is also
recorded, but on CPU it does not include the temporaries).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

from absl import logging  # noqa: E402

from experiments.bench.harness import Context, compiles, jsonable, loadavg, machine, markdown  # noqa: E402
from experiments.bench.references import llama_pair  # noqa: E402
from experiments.bench.sizes import SIZES, TARGETS  # noqa: E402
from experiments.bench.suites import DATA_MODEL, SUITE_NAMES, SUITES, TRAIN_MODELS  # noqa: E402

__all__ = ["DATA_MODEL", "SIZES", "SUITES", "SUITE_NAMES", "TARGETS", "TRAIN_MODELS", "run"]


def run(suites: list[str], size: str = "small", out: str = "./bench_out", repeats: int | None = None,
        workdir: str | None = None, torch_compile: bool = True) -> dict[str, Any]:
    """Run ``suites`` and write ``results.json`` / ``results.md`` under ``out``; returns the results
    (``results["errors"]`` maps a failed suite to its traceback). ``torch_compile``: the train step's
    PyTorch side is also timed under ``torch.compile`` (a contender only where it compiles)."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {list(SUITES)}")
    repeats = repeats or (5 if size == "small" else 2)
    os.makedirs(out, exist_ok=True)
    compiles()
    results: dict[str, Any] = {"size": size, "repeats": repeats, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "machine": machine(), "targets": TARGETS, "suites": {}, "errors": {},
                               "shared_machine_note": "wall-clock on a machine possibly shared with other jobs"}
    with contextlib.ExitStack() as stack:
        wd = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="vjax_bench_"))
        ctx = Context(size, SIZES[size], repeats, results["suites"], [], wd, torch_compile)
        for name in suites:
            t0 = time.perf_counter()
            load0 = loadavg()
            logging.info("suite %s ...", name)
            try:
                if name not in results["suites"]:  # matmul_peak may already have run for MFU
                    results["suites"][name] = SUITES[name](ctx)
            except Exception:  # noqa: BLE001 — record and go on with the other suites
                results["errors"][name] = traceback.format_exc()
                logging.error("suite %s failed:\n%s", name, results["errors"][name])
            results.setdefault("suite_seconds", {})[name] = time.perf_counter() - t0
            results.setdefault("loadavg_1min", {})[name] = [load0, loadavg()]
            print(f"[bench] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        llama_pair.cache_clear()
    results["rows"] = [dataclasses.asdict(r) for r in ctx.rows]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(jsonable(results), f, indent=1)
    md = markdown(results, ctx.rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    return results
