"""Benchmarks: vjax against transformers/PyTorch and against this machine's own matmul peak.

    python -m experiments.bench [--suite=all|matmul_peak,train_step,...] [--out=./bench_out]
                                [--size=small|tiny] [--repeats=N]

writes ``results.json`` (raw figures, machine description) and ``results.md`` (one Markdown table)
in ``--out``. Every comparison is measured side by side in the same process, the two contenders
interleaved round by round (A B, B A, A B ...), and reported as a ratio of medians, because the
machines this runs on are shared and noisy (the host's load average is recorded per suite).
PyTorch runs at its default intra-op thread count and at one thread; speedups are against the
faster of the two (on a loaded host OpenMP's per-op barriers make the default much slower).
``--size=tiny`` shrinks every suite to seconds (tests).

Suites (see each ``suite_*`` docstring for what exactly is timed):

* ``matmul_peak`` — a jitted float32 ``n x n @ n x n`` matmul: GFLOP/s of this machine, the
  denominator of the model-FLOPs utilisation (MFU) figures; PyTorch's matmul beside it.
* ``train_step`` — one AdamW step of a decoder LM, vjax ``Trainer`` vs ``LlamaForCausalLM`` +
  ``torch.optim.AdamW`` on the same weights; steps/s, ratio, model FLOPs and MFU, recompiles.
  Models plug in through :data:`TRAIN_MODELS` (one builder per model; Qwen2-VL goes there once it
  exists in vjax).
* ``generate`` — prompt prefill + 64 greedy tokens, vjax ``generate`` vs transformers ``generate``;
  tokens/s, time to first token, token-for-token agreement.
* ``token_merge`` — Chat-UniVi DPC-KNN ``spatial_merge`` time and compiled memory vs token count.
* ``memory_bank`` — MA-LMM streaming (``lax.scan`` of ``append_and_compress`` + an attention read of
  the bank) time and compiled memory vs frame count.
* ``data`` — Grain + decord pipeline clips/s on the synthetic set vs what a tiny train step consumes.

Compiled memory is ``argument + output + temp - alias`` bytes of ``jit(f).lower(...).compile()
.memory_analysis()`` — what XLA allocates for one call (its ``peak_memory_in_bytes`` field is also
recorded, but on CPU it does not include the temporaries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

SUITE_NAMES = ("matmul_peak", "train_step", "generate", "token_merge", "memory_bank", "data")

_SUITE = flags.DEFINE_string("suite", "all", f"'all' or a comma-separated subset of {SUITE_NAMES}")
_OUT = flags.DEFINE_string("out", "./bench_out", "directory for results.json and results.md")
_SIZE = flags.DEFINE_enum("size", "small", ["tiny", "small"], "tiny: seconds (tests); small: real figures")
_REPEATS = flags.DEFINE_integer("repeats", None, "timed repeats per measurement (default: 5 small, 2 tiny)")

# Targets (issue "Benchmarks"). Each is reported whether met or not.
TARGETS = {
    "train_speedup": 1.5,  # vjax steps/s >= 1.5x transformers on CPU
    "generate_speedup": 2.0,  # vjax tokens/s >= 2x transformers
    "train_mfu": 0.35,  # model FLOPs/s >= 35% of the measured matmul peak
    "memory_bank_growth": 1.1,  # compiled memory at 1000 frames <= 1.1x at 10 frames
    "data_headroom": 2.0,  # pipeline clips/s >= 2x what the training step consumes
}


# ------------------------------------------------------------------------------------------ sizes
@dataclasses.dataclass(frozen=True)
class Size:
    """Every dimension a suite uses, per ``--size``."""

    matmul_n: int
    # decoder LM shared by train_step / generate (HF LlamaConfig names)
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    seq: int
    batch: int
    prompt_len: int
    new_tokens: int
    # token_merge
    merge_tokens: tuple[int, ...]
    merge_width: int
    merge_max_bytes: int  # compile, but do not run, counts whose compiled memory exceeds this
    # memory_bank
    bank_frames: tuple[int, ...]
    bank_capacity: int
    bank_tokens: int
    bank_width: int
    bank_queries: int
    # data
    data_clips: int
    data_batches: int
    data_frame_size: tuple[int, int] | None
    data_frames: int


SIZES = {
    "small": Size(
        matmul_n=2048, vocab=32000, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4,
        seq=256, batch=2, prompt_len=128, new_tokens=64,
        merge_tokens=(256, 1024, 4096, 16384), merge_width=1024, merge_max_bytes=8 << 30,
        bank_frames=(10, 100, 1000), bank_capacity=10, bank_tokens=32, bank_width=768, bank_queries=32,
        data_clips=16, data_batches=16, data_frame_size=(224, 224), data_frames=8),
    "tiny": Size(
        matmul_n=256, vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
        seq=64, batch=2, prompt_len=8, new_tokens=8,
        merge_tokens=(64, 128), merge_width=1024, merge_max_bytes=1 << 30,
        bank_frames=(10, 100, 1000), bank_capacity=4, bank_tokens=4, bank_width=16, bank_queries=2,
        data_clips=2, data_batches=2, data_frame_size=None, data_frames=4),
}


# ------------------------------------------------------------------------------------------ helpers
def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each zero-argument, blocking callable; contenders alternate order per round."""
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def stats(ts: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}


class CompileCounter:
    """Counts XLA backend compilations (``/jax/core/compile/backend_compile_duration`` events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, duration: float, **kw) -> None:
        if event == self.EVENT:
            self.count += 1

    @contextlib.contextmanager
    def span(self, out: dict, key: str):
        start = self.count
        try:
            yield
        finally:
            out[key] = self.count - start


_COMPILES: CompileCounter | None = None


def compiles() -> CompileCounter:
    global _COMPILES
    if _COMPILES is None:
        _COMPILES = CompileCounter()
    return _COMPILES


def compiled_memory(compiled) -> dict[str, int]:
    """Bytes XLA allocates for one call of a compiled executable (see the module docstring)."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k + "_in_bytes", 0) or 0)
           for k in ("argument_size", "output_size", "temp_size", "alias_size", "peak_memory")}
    out["total"] = out["argument_size"] + out["output_size"] + out["temp_size"] - out["alias_size"]
    return out


def mib(n: float) -> str:
    """Bytes in binary units (``1.5 MiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


def machine() -> dict[str, Any]:
    """CPU model, cores, library versions, JAX device platform."""
    import flax
    import optax
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _pkg_version("jaxlib"),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "device_platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import torch
        import transformers
        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        info.update(torch=None, transformers=None)
    return info


def _loadavg() -> float | None:
    """1-minute load average of the host (other jobs' load shows here, not in our own CPU time)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _pkg_version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass
class Row:
    """One line of the Markdown table."""

    suite: str
    measurement: str
    value: str
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclasses.dataclass
class Context:
    size_name: str
    size: Size
    repeats: int
    results: dict[str, Any]  # suite name -> its JSON entry (suites may read earlier ones)
    rows: list[Row]
    workdir: str


# ------------------------------------------------------------------------------------------ matmul
def _matmul_gflops(n: int, repeats: int) -> tuple[dict, dict]:
    import torch
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    times = interleaved({"jax": lambda: _block(f(a, b)), "torch": lambda: torch.mm(ta, tb)}, repeats)
    flops = 2.0 * n**3
    out = {}
    for k, ts in times.items():
        s = stats(ts)
        out[k] = {**s, "gflops_peak": flops / s["min_s"] / 1e9, "gflops_median": flops / s["median_s"] / 1e9}
    return out, {"n": n, "flops": flops}


def suite_matmul_peak(ctx: Context) -> dict:
    """A jitted float32 ``[n, n] @ [n, n]`` (2 n^3 FLOPs), best of ``repeats``: this machine's
    attainable matmul rate, used as the MFU denominator. ``torch.mm`` is timed beside it."""
    n = ctx.size.matmul_n
    res, meta = _matmul_gflops(n, max(ctx.repeats, 3))
    entry = {**meta, **res, "peak_gflops": res["jax"]["gflops_peak"]}
    ctx.rows += [
        Row("matmul_peak", f"jit f32 matmul {n}^3 (best / median)",
            f"{res['jax']['gflops_peak']:.1f} / {res['jax']['gflops_median']:.1f} GFLOP/s",
            note="MFU denominator"),
        Row("matmul_peak", f"torch.mm f32 {n}^3 (best / median)",
            f"{res['torch']['gflops_peak']:.1f} / {res['torch']['gflops_median']:.1f} GFLOP/s"),
    ]
    return entry


def matmul_peak(ctx: Context) -> float:
    if "matmul_peak" not in ctx.results:
        ctx.results["matmul_peak"] = suite_matmul_peak(ctx)
    return ctx.results["matmul_peak"]["peak_gflops"]


# ------------------------------------------------------------------------------------------ LLaMA pair
def _hf_llama(s: Size, seed: int = 0):
    import torch
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=max(2048, s.seq, s.prompt_len + s.new_tokens), rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float()


@functools.lru_cache(maxsize=None)
def llama_pair(size_name: str, workdir: str):
    """The same random Llama weights twice: transformers' model and vjax's (saved by HF as
    safetensors, loaded with ``vjax.from_pretrained``)."""
    import vjax
    hf = _hf_llama(SIZES[size_name])
    d = os.path.join(workdir, f"llama_{size_name}")
    hf.save_pretrained(d)
    module, params = vjax.from_pretrained(d)
    return hf, module, params


def param_counts(module, params) -> dict[str, int]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(int(x.size) for _, x in leaves)
    embed = sum(int(x.size) for p, x in leaves if "embed_tokens" in jax.tree_util.keystr(p))
    return {"total": total, "embedding": embed, "non_embedding": total - embed}


def decoder_train_flops(module, params, batch: int, seq: int) -> dict[str, Any]:
    """Model FLOPs of one training step (forward + backward), PaLM-style (Chowdhery et al. 2022, App. B):

        FLOPs = tokens * (6 * N + 12 * n_layers * n_heads * head_dim * seq)

    ``N`` = parameters that multiply (all but the input embedding table, a gather; the LM head
    counts), ``tokens = batch * seq``; the second term is the q·k and p·v matmuls without the causal
    saving. Norms, softmax, RoPE and the optimizer are not counted."""
    c = module.config
    n = param_counts(module, params)
    tokens = batch * seq
    dense = 6 * n["non_embedding"] * tokens
    attn = 12 * c.num_layers * c.num_heads * c.resolved_head_dim * seq * tokens
    return {"params": n, "tokens": tokens, "dense_flops": dense, "attention_flops": attn,
            "flops": dense + attn,
            "formula": "tokens * (6 * N_non_embedding + 12 * n_layers * n_heads * head_dim * seq)"}


# ------------------------------------------------------------------------------------------ train_step
@dataclasses.dataclass
class TrainContender:
    """What :func:`suite_train_step` needs from one model: two blocking step callables on the same
    weights and batch, their first losses, the model FLOPs of a step, and its compile counts."""

    name: str
    vjax_step: Callable[[], Any]
    torch_step: Callable[[], Any]
    first_losses: dict[str, float]
    flops: dict[str, Any]
    info: dict[str, Any]


OPTIM = dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0)


def _vjax_trainer_step(module, params, batch_np: dict[str, np.ndarray], info: dict):
    from vjax.train.optim import OptimConfig
    from vjax.train.sharding import make_mesh
    from vjax.train.step import Trainer
    cfg = OptimConfig(warmup_steps=0, total_steps=10**6, min_lr_ratio=1.0, **OPTIM)
    trainer = Trainer(module, cfg, make_mesh())
    counter = compiles()
    with counter.span(info, "compiles_init"):
        state = trainer.init_state(params=params)
        batch = trainer.put_batch(batch_np)
        _block(state)
    holder = {"state": state}

    def step():
        holder["state"], metrics = trainer.train_step(holder["state"], batch)
        _block((holder["state"], metrics))
        return metrics

    with counter.span(info, "compiles_first_step"):
        first = float(step()["loss"])
    info["trainer"] = trainer
    return step, first


def _torch_adamw_step(hf, batch_np: dict[str, np.ndarray]):
    import torch
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": OPTIM["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=OPTIM["learning_rate"], betas=(OPTIM["b1"], OPTIM["b2"]),
                            eps=OPTIM["eps"])
    ids = torch.as_tensor(batch_np["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(batch_np["attention_mask"], dtype=torch.long)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = hf(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM["grad_clip"])
        opt.step()
        return loss

    first = float(step().detach())
    return step, first


def train_llama(ctx: Context) -> TrainContender:
    """LLaMA decoder (``ctx.size``): transformers ``LlamaForCausalLM`` (its default attention
    implementation) + ``torch.optim.AdamW`` vs vjax ``CausalLM`` + ``Trainer`` (optax AdamW)."""
    import copy
    s = ctx.size
    hf, module, params = llama_pair(ctx.size_name, ctx.workdir)
    hf = copy.deepcopy(hf)  # the generate suite keeps the pristine weights
    rng = np.random.default_rng(0)
    ids = rng.integers(3, s.vocab, (s.batch, s.seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    info: dict[str, Any] = {"hf_attn_implementation": hf.config._attn_implementation}
    vstep, vloss = _vjax_trainer_step(module, params, batch, info)
    tstep, tloss = _torch_adamw_step(hf, batch)
    return TrainContender("llama", vstep, tstep, {"vjax": vloss, "torch": tloss},
                          decoder_train_flops(module, params, s.batch, s.seq), info)


# One builder per model; add e.g. "qwen2_vl": train_qwen2_vl once vjax has the model (its builder
# returns a TrainContender: Trainer over vjax's Qwen2VL vs transformers' Qwen2VLForConditionalGeneration
# on converted weights, with the vision tower's FLOPs added to ``flops``).
TRAIN_MODELS: dict[str, Callable[[Context], TrainContender]] = {
    "llama": train_llama,
}


def torch_contenders(fn: Callable[[], Any]) -> dict[str, Callable[[], Any]]:
    """``fn`` under PyTorch's default intra-op thread count (``torch``) and under one thread
    (``torch_1t``). On a loaded host, OpenMP's barrier after every op stalls whenever one of its
    threads is descheduled, and one thread can be several times faster; the faster configuration
    (by median) is the reference every speedup is computed against."""
    import torch
    default = torch.get_num_threads()

    def one_thread():
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(default)

    return {"torch": fn, "torch_1t": one_thread}


def _reference(times: dict[str, list[float]]) -> str:
    return min(("torch", "torch_1t"), key=lambda k: statistics.median(times[k]))


def suite_train_step(ctx: Context) -> dict:
    """One optimizer step (forward, backward, global-norm clip 1.0, AdamW lr 1e-4, betas (0.9, 0.999),
    eps 1e-8, weight decay 0.01 on matrices) on a fixed batch of ``batch x seq`` tokens, float32, per
    model in :data:`TRAIN_MODELS`; PyTorch at its default thread count and at one thread (see
    :func:`torch_contenders`). vjax's step also computes the grad norm, a finite check, token
    accuracy and the LR schedule; PyTorch's does not. Recompiles are counted with a
    ``jax.monitoring`` listener during the timed steps (must be 0) and by the jit cache size."""
    import torch
    peak = matmul_peak(ctx)
    entry: dict[str, Any] = {"models": {}, "torch_threads_default": torch.get_num_threads(),
                             "todo": ["qwen2_vl: add a builder to TRAIN_MODELS once the model exists"]}
    for name, build in TRAIN_MODELS.items():
        c = build(ctx)
        counter = compiles()
        rec: dict[str, Any] = {}
        with counter.span(rec, "compiles_timed"):
            times = interleaved({"vjax": c.vjax_step, **torch_contenders(c.torch_step)}, ctx.repeats, warmup=1)
        trainer = c.info.pop("trainer", None)
        st = {k: stats(v) for k, v in times.items()}
        ref = _reference(times)
        v, t = st["vjax"], st[ref]
        flops = c.flops["flops"]
        rec.update(
            {k: st[k] for k in st}, reference=ref,
            steps_per_s={k: 1 / st[k]["median_s"] for k in st},
            speedup=t["median_s"] / v["median_s"], speedup_best=t["min_s"] / v["min_s"],
            flops=c.flops, peak_gflops=peak,
            mfu={k: flops / st[k]["median_s"] / (peak * 1e9) for k in st},
            mfu_best={k: flops / st[k]["min_s"] / (peak * 1e9) for k in st},
            first_loss=c.first_losses, first_loss_abs_diff=abs(c.first_losses["vjax"] - c.first_losses["torch"]),
            jit_cache_size=trainer._train_step._cache_size() if trainer is not None else None,
            **c.info)
        entry["models"][name] = rec
        s = ctx.size
        shape = f"{s.layers}x{s.hidden}, vocab {s.vocab}, {s.batch}x{s.seq} tokens"
        sps = rec["steps_per_s"]
        ctx.rows += [
            Row("train_step", f"{name} ({shape}) steps/s vjax / torch / torch 1 thread",
                f"{sps['vjax']:.3f} / {sps['torch']:.3f} / {sps['torch_1t']:.3f}",
                note=f"first loss vjax {c.first_losses['vjax']:.5f}, torch {c.first_losses['torch']:.5f}"),
            Row("train_step", f"{name} speedup vjax vs faster torch ({ref})", f"{rec['speedup']:.2f}x",
                f">= {TARGETS['train_speedup']}x", rec["speedup"] >= TARGETS["train_speedup"],
                note=f"ratio of best times {rec['speedup_best']:.2f}x"),
            Row("train_step", f"{name} model GFLOP/step; MFU vjax / {ref}", f"{flops / 1e9:.1f}; "
                f"{100 * rec['mfu']['vjax']:.1f}% / {100 * rec['mfu'][ref]:.1f}%",
                f">= {100 * TARGETS['train_mfu']:.0f}%", rec["mfu"]["vjax"] >= TARGETS["train_mfu"],
                note=f"of {peak:.1f} GFLOP/s measured peak; at best times "
                f"{100 * rec['mfu_best']['vjax']:.1f}% / {100 * rec['mfu_best'][ref]:.1f}%"),
            Row("train_step", f"{name} recompiles: first step / timed steps / jit cache",
                f"{c.info.get('compiles_first_step')} / {rec['compiles_timed']} / {rec['jit_cache_size']}",
                "0 timed", rec["compiles_timed"] == 0),
        ]
    return entry


# ------------------------------------------------------------------------------------------ generate
def suite_generate(ctx: Context) -> dict:
    """Greedy decoding of ``new_tokens`` after a ``prompt_len``-token prompt (batch 1, no stop token)
    on the same Llama weights: vjax ``generate`` (jitted prefill + ``lax.while_loop`` over a static
    KV cache) vs transformers ``generate`` (``DynamicCache``; default threads and one thread, see
    :func:`torch_contenders`). tokens/s = new tokens / wall time of the whole call (prefill
    included); time to first token = wall time of the same call with ``max_new_tokens=1``. The two
    token sequences must agree exactly."""
    import torch
    from vjax.generate import generate
    s = ctx.size
    hf, module, params = llama_pair(ctx.size_name, ctx.workdir)
    hf.eval()
    hf.generation_config.eos_token_id = None  # generate exactly new_tokens on both sides
    hf.generation_config.pad_token_id = 0
    ids = np.random.default_rng(1).integers(3, s.vocab, (1, s.prompt_len)).astype(np.int32)
    ids_j, ids_t = jnp.asarray(ids), torch.as_tensor(ids, dtype=torch.long)
    mask_t = torch.ones_like(ids_t)

    def run_vjax(n):
        return np.asarray(generate(module, params, ids_j, max_new_tokens=n).tokens)

    @torch.inference_mode()
    def run_torch(n):
        out = hf.generate(ids_t, attention_mask=mask_t, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:].numpy()

    counter = compiles()
    rec: dict[str, Any] = {"prompt_len": s.prompt_len, "new_tokens": s.new_tokens, "batch": 1}
    with counter.span(rec, "compiles_warmup"):
        tok_v, tok_t = run_vjax(s.new_tokens), run_torch(s.new_tokens)
        run_vjax(1)
    rec["tokens_vjax"], rec["tokens_torch"] = tok_v.tolist(), tok_t.tolist()
    agree = tok_v.shape == tok_t.shape and bool((tok_v == tok_t).all())
    rec["tokens_agree"] = agree
    with counter.span(rec, "compiles_timed"):
        full = interleaved({"vjax": lambda: run_vjax(s.new_tokens),
                            **torch_contenders(lambda: run_torch(s.new_tokens))}, ctx.repeats, warmup=0)
        first = interleaved({"vjax": lambda: run_vjax(1), **torch_contenders(lambda: run_torch(1))},
                            ctx.repeats, warmup=0)
    for k in full:
        f, t1 = stats(full[k]), stats(first[k])
        rec[k] = {"full": f, "ttft": t1, "tokens_per_s": s.new_tokens / f["median_s"],
                  "decode_tokens_per_s": ((s.new_tokens - 1) / (f["median_s"] - t1["median_s"])
                                          if f["median_s"] > t1["median_s"] else None)}
    ref = rec["reference"] = _reference(full)
    ref_ttft = _reference(first)
    speedup = rec["vjax"]["tokens_per_s"] / rec[ref]["tokens_per_s"]
    rec["speedup"] = speedup
    rec["speedup_best"] = rec[ref]["full"]["min_s"] / rec["vjax"]["full"]["min_s"]
    rec["ttft_speedup"] = rec[ref_ttft]["ttft"]["median_s"] / rec["vjax"]["ttft"]["median_s"]
    what = f"prompt {s.prompt_len} + {s.new_tokens} greedy"
    ms = lambda k: f"{1e3 * rec[k]['ttft']['median_s']:.1f}"  # noqa: E731
    ctx.rows += [
        Row("generate", f"llama {what}: tokens/s vjax / torch / torch 1 thread",
            f"{rec['vjax']['tokens_per_s']:.1f} / {rec['torch']['tokens_per_s']:.1f} / "
            f"{rec['torch_1t']['tokens_per_s']:.1f}",
            note="decode-only (full - first token) " + " / ".join(
                "n/a" if rec[k]["decode_tokens_per_s"] is None else f"{rec[k]['decode_tokens_per_s']:.1f}"
                for k in full)),
        Row("generate", f"speedup vjax vs faster torch ({ref}) (tokens/s)", f"{speedup:.2f}x",
            f">= {TARGETS['generate_speedup']}x", speedup >= TARGETS["generate_speedup"],
            note=f"ratio of best times {rec['speedup_best']:.2f}x"),
        Row("generate", "time to first token vjax / torch / torch 1 thread",
            f"{ms('vjax')} / {ms('torch')} / {ms('torch_1t')} ms",
            note=f"{rec['ttft_speedup']:.2f}x vs {ref_ttft}"),
        Row("generate", "greedy tokens agree (vjax == transformers)", str(agree), "all", agree),
        Row("generate", "recompiles during timed calls", str(rec["compiles_timed"]), "0", rec["compiles_timed"] == 0),
    ]
    if not agree:
        raise AssertionError(f"greedy tokens differ: vjax {tok_v.tolist()} vs transformers {tok_t.tolist()}")
    return rec


# ------------------------------------------------------------------------------------------ token_merge
def suite_token_merge(ctx: Context) -> dict:
    """``spatial_merge(x [1, N, C], ratios=(64, 32, 16), ks=(5, 3, 3))`` (Chat-UniVi's image merging)
    for each N: compiled memory and median wall time. DPC-KNN needs all pairwise distances, so the
    memory grows as O(N^2) (one ``[N, N]`` float32 matrix is shown beside it). Counts whose compiled
    memory exceeds ``merge_max_bytes`` are compiled but not run."""
    from vjax.layers.token_merge import spatial_merge
    s = ctx.size
    fn = jax.jit(lambda x: spatial_merge(x, (64, 32, 16), (5, 3, 3))[0])
    rec: dict[str, Any] = {"width": s.merge_width, "ratios": [64, 32, 16], "points": []}
    for n in s.merge_tokens:
        x = jax.random.normal(jax.random.key(n), (1, n, s.merge_width), jnp.float32)
        compiled = fn.lower(x).compile()
        mem = compiled_memory(compiled)
        pt: dict[str, Any] = {"tokens": n, "memory": mem, "nxn_f32_bytes": 4 * n * n}
        if mem["total"] <= s.merge_max_bytes:
            reps = ctx.repeats if n <= 4096 else max(1, min(ctx.repeats, 2))
            pt.update(stats(interleaved({"merge": lambda: _block(compiled(x))}, reps)["merge"]))
        else:
            pt["skipped_run"] = f"compiled memory {mib(mem['total'])} > limit {mib(s.merge_max_bytes)}"
        rec["points"].append(pt)
        t = f"{1e3 * pt['median_s']:.1f} ms" if "median_s" in pt else "not run"
        ctx.rows.append(Row("token_merge", f"spatial_merge N={n}, C={s.merge_width}",
                            f"{t}; {mib(mem['total'])}", note=f"N^2 f32 = {mib(4 * n * n)}"))
    return rec


# ------------------------------------------------------------------------------------------ memory_bank
def _bank_stream(frames: int, s: Size):
    """A scan over ``frames`` steps: make frame t (a stand-in for a per-frame encoder, so the input
    does not grow with T), read the bank with a softmax attention of ``bank_queries`` queries over
    ``[bank entries; frame]`` tokens, then ``append_and_compress``. Returns the final bank and the
    running sum of the reads (nothing of size T is stacked)."""
    from vjax.layers.memory_bank import append_and_compress, memory_bank_attend_view, memory_bank_init
    b, n, c = 1, s.bank_tokens, s.bank_width

    def run(key, queries):
        bank = memory_bank_init(b, s.bank_capacity, n, c)

        def step(carry, _):
            bank, acc, t = carry
            frame = jnp.tanh(jax.random.normal(jax.random.fold_in(key, t), (b, n, c)))  # [B, N, C]
            tokens, mask = memory_bank_attend_view(bank, frame)  # [B, L+1, N, C], [B, L+1]
            kv = tokens.reshape(b, -1, c)  # [B, (L+1) N, C]
            kv_mask = jnp.repeat(mask, n, axis=1)  # [B, (L+1) N]
            logits = jnp.einsum("bqc,bkc->bqk", queries, kv) * c**-0.5
            logits = jnp.where(kv_mask[:, None, :], logits, jnp.finfo(jnp.float32).min)
            read = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), kv)  # [B, Q, C]
            return (append_and_compress(bank, frame), acc + read, t + 1), None

        # the frame index rides in the carry: an xs = arange(T) input would itself grow with T
        init = (bank, jnp.zeros_like(queries), jnp.zeros((), jnp.int32))
        (bank, acc, _), _ = jax.lax.scan(step, init, None, length=frames)
        return bank, acc

    return jax.jit(run)


def suite_memory_bank(ctx: Context) -> dict:
    """MA-LMM streaming over T frames (capacity ``bank_capacity``, ``bank_tokens`` x ``bank_width``
    per frame): compiled memory and wall time per T; the target is memory(T=1000) <= 1.1 x memory(T=10)."""
    s = ctx.size
    key = jax.random.key(0)
    queries = jax.random.normal(jax.random.key(1), (1, s.bank_queries, s.bank_width), jnp.float32)
    rec: dict[str, Any] = {"capacity": s.bank_capacity, "tokens": s.bank_tokens, "width": s.bank_width,
                           "queries": s.bank_queries, "points": []}
    for t in s.bank_frames:
        compiled = _bank_stream(t, s).lower(key, queries).compile()
        mem = compiled_memory(compiled)
        st = stats(interleaved({"bank": lambda: _block(compiled(key, queries))}, ctx.repeats)["bank"])
        rec["points"].append({"frames": t, "memory": mem, **st, "frames_per_s": t / st["median_s"]})
        ctx.rows.append(Row("memory_bank", f"stream T={t} frames (L={s.bank_capacity}, "
                            f"{s.bank_tokens}x{s.bank_width})",
                            f"{1e3 * st['median_s']:.1f} ms ({t / st['median_s']:.0f} frames/s); {mib(mem['total'])}"))
    first, last = rec["points"][0], rec["points"][-1]
    growth = last["memory"]["total"] / first["memory"]["total"]
    rec["growth"] = growth
    ctx.rows.append(Row("memory_bank", f"memory T={last['frames']} / T={first['frames']}", f"{growth:.3f}x",
                        f"<= {TARGETS['memory_bank_growth']}x", growth <= TARGETS["memory_bank_growth"]))
    return rec


# ------------------------------------------------------------------------------------------ data
class BenchFormat:
    """A stand-in chat template: frames plus the question and answer bytes as token ids."""

    def __call__(self, record, frames, audio):
        human, gpt = record["conversations"][:2]
        ids = np.frombuffer((human["value"] + gpt["value"]).encode(), np.uint8).astype(np.int32) + 1
        return {"frames": frames, "input_ids": ids, "attention_mask": np.ones_like(ids)}


def suite_data(ctx: Context) -> dict:
    """Clips/s of the Grain + decord pipeline (``make_loader``, in-process, ``worker_count=0``;
    ``data_frames`` uniformly sampled frames resized on decode to ``data_frame_size``) on a freshly
    generated synthetic set, vs the clips/s a train step consumes. No video model is in vjax yet, so
    the consumer is the tiny decoder's train step (2 x 64, batch = pipeline batch, seq 256) — a
    stand-in, to be replaced by a video LLM's step."""
    import grain  # noqa: F401  (fail early if missing)
    from vjax.data import pipeline, sampling
    from vjax.data.synthetic import SyntheticConfig, ensure_synthetic_dataset
    from vjax.models.decoder import CausalLM, DecoderConfig
    s = ctx.size
    root = os.path.join(ctx.workdir, f"synthetic_{ctx.size_name}")
    t0 = time.perf_counter()
    ds = ensure_synthetic_dataset(root, SyntheticConfig(
        seed=0, num_train=s.data_clips, num_val=1, num_test=1, long_every=0, questions_per_clip=1,
        show_progress=False))
    gen_s = time.perf_counter() - t0
    with open(ds.annotations["train"]) as f:
        records = pipeline.resolve_records([json.loads(line) for line in f], ds.root)
    batch_size = 2
    cfg = pipeline.PipelineConfig(batch_size=batch_size, seed=0, num_epochs=None, frame_size=s.data_frame_size,
                                  worker_count=0, buckets={"input_ids": (256,), "attention_mask": (256,)})
    sampler = functools.partial(sampling.video_llama_uniform, num_samples=s.data_frames)
    it = iter(pipeline.make_loader(records, BenchFormat(), cfg, sampler=sampler))
    first = next(it)
    frame_shape = list(first["frames"].shape)

    def pull():
        for _ in range(s.data_batches):
            next(it)

    # consumer: tiny decoder train step on a batch of the same size
    module = CausalLM(DecoderConfig.tiny())
    ids = np.random.default_rng(0).integers(3, 256, (batch_size, 256)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    import vjax
    info: dict[str, Any] = {}
    step, _ = _vjax_trainer_step(module, vjax.init_params(module, 0), batch, info)
    info.pop("trainer")

    def steps():
        for _ in range(s.data_batches):
            step()

    times = interleaved({"pipeline": pull, "train_step": steps}, max(1, ctx.repeats // 2), warmup=0)
    clips = s.data_batches * batch_size
    p, t = stats(times["pipeline"]), stats(times["train_step"])
    rec = {"synthetic_clips": s.data_clips, "generate_s": gen_s, "batch_size": batch_size,
           "frames_per_clip": s.data_frames, "batch_frames_shape": frame_shape, "worker_count": 0,
           "pipeline": {**p, "clips_per_s": clips / p["median_s"]},
           "tiny_train_step": {**t, "clips_per_s": clips / t["median_s"]}}
    rec["headroom"] = rec["pipeline"]["clips_per_s"] / rec["tiny_train_step"]["clips_per_s"]
    ctx.rows += [
        Row("data", f"Grain+decord clips/s ({s.data_frames} frames -> {frame_shape[-3]}x{frame_shape[-2]}, "
            "0 workers) / tiny step clips/s",
            f"{rec['pipeline']['clips_per_s']:.1f} / {rec['tiny_train_step']['clips_per_s']:.1f}",
            note="consumer = tiny decoder step (stand-in until video models exist)"),
        Row("data", "pipeline headroom over the consumer", f"{rec['headroom']:.2f}x",
            f">= {TARGETS['data_headroom']}x", rec["headroom"] >= TARGETS["data_headroom"]),
    ]
    return rec


SUITES: dict[str, Callable[[Context], dict]] = {
    "matmul_peak": suite_matmul_peak,
    "train_step": suite_train_step,
    "generate": suite_generate,
    "token_merge": suite_token_merge,
    "memory_bank": suite_memory_bank,
    "data": suite_data,
}


# ------------------------------------------------------------------------------------------ output
def markdown(results: dict[str, Any], rows: list[Row]) -> str:
    m = results["machine"]
    lines = [
        f"Benchmarks (`--size={results['size']}`, {results['repeats']} repeats, medians; "
        f"{results['date']}).",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_affinity'] or m['cpu_count']} cores usable "
        f"(of {m['cpu_count']}); JAX {m['jax']} on {m['device_platform']} ({m['device_count']} device); "
        f"torch {m.get('torch')} ({m.get('torch_threads')} threads); transformers {m.get('transformers')}.",
        "",
        "Host 1-min load average per suite (start -> end; above the core count means other jobs "
        "were competing for the cores): " + ", ".join(
            f"{k} {v[0]} -> {v[1]}" for k, v in results.get("loadavg_1min", {}).items()) + ".",
        "",
        "| suite | measurement | value | target | met | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.suite} | {r.measurement} | {r.value} | {r.target} | {met} | {r.note} |")
    for name, err in results.get("errors", {}).items():
        lines.append(f"| {name} | **error** | {err.splitlines()[-1] if err else ''} | | **no** | |")
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def run(suites: list[str], size: str = "small", out: str = "./bench_out", repeats: int | None = None,
        workdir: str | None = None) -> dict[str, Any]:
    """Run ``suites`` and write ``results.json`` / ``results.md`` under ``out``; returns the results
    (``results["errors"]`` maps a failed suite to its traceback)."""
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
        ctx = Context(size, SIZES[size], repeats, results["suites"], [], wd)
        for name in suites:
            t0 = time.perf_counter()
            load0 = _loadavg()
            logging.info("suite %s ...", name)
            try:
                if name not in results["suites"]:  # matmul_peak may already have run for MFU
                    results["suites"][name] = SUITES[name](ctx)
            except Exception:  # noqa: BLE001 — record and go on with the other suites
                results["errors"][name] = traceback.format_exc()
                logging.error("suite %s failed:\n%s", name, results["errors"][name])
            results.setdefault("suite_seconds", {})[name] = time.perf_counter() - t0
            results.setdefault("loadavg_1min", {})[name] = [load0, _loadavg()]
            print(f"[bench] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        llama_pair.cache_clear()
    results["rows"] = [dataclasses.asdict(r) for r in ctx.rows]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(_jsonable(results), f, indent=1)
    md = markdown(results, ctx.rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    return results


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # optax logs its constant schedule at INFO
    # Exact float32 matmuls (as in the parity tests); on CPU this is XLA's default anyway.
    jax.config.update("jax_default_matmul_precision", "highest")
    suites = list(SUITES) if _SUITE.value == "all" else [s.strip() for s in _SUITE.value.split(",") if s.strip()]
    results = run(suites, _SIZE.value, _OUT.value, _REPEATS.value)
    with open(os.path.join(_OUT.value, "results.md")) as f:
        print(f.read())
    if results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
