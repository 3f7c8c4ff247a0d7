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

import contextlib
import dataclasses
import functools
import gc
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
from absl import flags, logging  # noqa: E402

from experiments import cli  # noqa: E402

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
class VLSize:
    """Qwen2-VL of the ``train_step`` suite: Qwen2 decoder (HF names), vision tower, clip geometry.

    Each batch row is ``prompt`` text tokens, ``<|vision_start|>``, the clip's ``t*h*w/4`` video
    tokens, ``<|vision_end|>``, ``question`` tokens and ``answer`` tokens (the loss is on the answer)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    vision_depth: int
    vision_width: int
    vision_heads: int
    vision_mlp_ratio: int
    frames: int
    image_size: int
    batch: int
    prompt: int
    question: int
    answer: int

    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid ``(t, h, w)`` of one clip (temporal patch 2, an odd count padded; patch 14)."""
        return (-(-self.frames // 2), self.image_size // 14, self.image_size // 14)

    @property
    def visual_tokens(self) -> int:
        """LLM tokens per clip after the 2x2 merger: ``t * h * w / 4``."""
        t, h, w = self.grid
        return t * h * w // 4

    @property
    def seq(self) -> int:
        return self.prompt + 1 + self.visual_tokens + 1 + self.question + self.answer


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
    data_frame_size: tuple[int, int]
    data_frames: int
    data_workers: tuple[int, ...]  # Grain worker counts measured (0: in-process)
    # qwen2_vl train step
    vl: VLSize


SIZES = {
    "small": Size(
        matmul_n=2048, vocab=32000, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=4,
        seq=256, batch=2, prompt_len=128, new_tokens=64,
        merge_tokens=(256, 1024, 4096, 16384), merge_width=1024, merge_max_bytes=8 << 30,
        bank_frames=(10, 100, 1000), bank_capacity=10, bank_tokens=32, bank_width=768, bank_queries=32,
        data_clips=16, data_batches=16, data_frame_size=(224, 224), data_frames=8, data_workers=(0, 2),
        # Qwen's vocabulary (151,936) scaled down to the Llama builder's 32,000; 8 frames at 224 px:
        # grid (4, 16, 16) = 1024 patches per clip -> 256 video tokens; seq 6 + 258 + 24 + 32 = 320.
        vl=VLSize(vocab=32000, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=2,
                  mrope_section=(8, 12, 12), vision_depth=6, vision_width=384, vision_heads=6,
                  vision_mlp_ratio=4, frames=8, image_size=224, batch=2, prompt=6, question=24, answer=32)),
    "tiny": Size(
        matmul_n=256, vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
        seq=64, batch=2, prompt_len=8, new_tokens=8,
        merge_tokens=(64, 128), merge_width=1024, merge_max_bytes=1 << 30,
        bank_frames=(10, 100, 1000), bank_capacity=4, bank_tokens=4, bank_width=16, bank_queries=2,
        data_clips=2, data_batches=2, data_frame_size=(56, 56), data_frames=4, data_workers=(0,),
        vl=VLSize(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                  mrope_section=(2, 3, 3), vision_depth=2, vision_width=32, vision_heads=4,
                  vision_mlp_ratio=2, frames=4, image_size=56, batch=2, prompt=4, question=6, answer=8)),
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


def gflop(n: float) -> str:
    """FLOPs in GFLOP, three significant digits below 100."""
    return f"{n / 1e9:.1f}" if n >= 1e11 else f"{n / 1e9:.3g}"


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


FIRST_LOSS_TOL = 1e-4  # |first loss vjax - torch| <= this x max(1, |loss|): the same weights and batch
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


def _torch_adamw_step(hf, inputs: dict[str, Any]):
    """A step of ``hf(**inputs).loss`` (``inputs`` holds torch tensors, ``labels`` included) with
    global-norm clipping and ``torch.optim.AdamW`` (decay on matrices, as vjax's optimizer)."""
    import torch
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": OPTIM["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=OPTIM["learning_rate"], betas=(OPTIM["b1"], OPTIM["b2"]),
                            eps=OPTIM["eps"])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = hf(**inputs).loss
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
    import torch
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    tstep, tloss = _torch_adamw_step(hf, {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t),
                                          "labels": ids_t})
    shape = f"{s.layers}x{s.hidden}, vocab {s.vocab}, {s.batch}x{s.seq} tokens"
    return TrainContender("llama", vstep, tstep, {"vjax": vloss, "torch": tloss},
                          decoder_train_flops(module, params, s.batch, s.seq), {**info, "shape": shape})


# ------------------------------------------------------------------------------------------ Qwen2-VL pair
def _hf_qwen2_vl(v: VLSize, seed: int = 0):
    """A random transformers ``Qwen2VLForConditionalGeneration`` of size ``v`` (special tokens at the
    top of the vocabulary; biases and norm scales perturbed so they are not trivially 0 / 1)."""
    import torch
    import transformers
    ids = _vl_special_ids(v)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=v.vocab, hidden_size=v.hidden, intermediate_size=v.intermediate,
                         num_hidden_layers=v.layers, num_attention_heads=v.heads, num_key_value_heads=v.kv_heads,
                         max_position_embeddings=max(2048, 2 * v.seq), rms_norm_eps=1e-6, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "mrope_section": list(v.mrope_section),
                                          "rope_theta": 1e6}),
        vision_config=dict(depth=v.vision_depth, embed_dim=v.vision_width, hidden_size=v.hidden,
                           num_heads=v.vision_heads, mlp_ratio=v.vision_mlp_ratio, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _vl_special_ids(v: VLSize) -> dict[str, int]:
    return {"image": v.vocab - 4, "video": v.vocab - 3, "vision_start": v.vocab - 2, "vision_end": v.vocab - 1}


def qwen2_vl_pair(v: VLSize, workdir: str):
    """The same random Qwen2-VL weights twice: transformers' model, and vjax's ``Qwen2VL`` converted from
    its ``save_pretrained`` safetensors through :func:`vjax.convert.qwen2_vl.qwen2_vl_table` (the
    config read back with ``Qwen2VLConfig.from_hf``, clip geometry ``frames x image_size^2``)."""
    from vjax.convert.io import open_checkpoint
    from vjax.convert.mapping import convert
    from vjax.convert.qwen2_vl import detect_layout, qwen2_vl_table
    from vjax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig
    from vjax.pretrained import abstract_params
    hf = _hf_qwen2_vl(v)
    d = os.path.join(workdir, f"qwen2_vl_{v.hidden}x{v.layers}")
    hf.save_pretrained(d)
    config = Qwen2VLConfig.from_hf(hf.config.to_dict(), num_frames=v.frames, image_size=v.image_size)
    module = Qwen2VL(config)
    src = open_checkpoint(d)
    layout = detect_layout(src.keys())
    params = convert(src, qwen2_vl_table(config, layout), abstract_params(module))
    return hf, module, jax.tree_util.tree_map(jnp.asarray, params), layout


def qwen2_vl_batch(v: VLSize, seed: int = 0) -> dict[str, np.ndarray]:
    """Random text around one clip per row (see :class:`VLSize`) and random normalised frames
    ``[B, frames, image_size, image_size, 3]``; loss on the answer tokens."""
    rng = np.random.default_rng(seed)
    ids = _vl_special_ids(v)
    text = lambda n: rng.integers(3, v.vocab - 4, (v.batch, n))  # noqa: E731
    col = lambda tok, n: np.full((v.batch, n), tok)  # noqa: E731
    input_ids = np.concatenate([text(v.prompt), col(ids["vision_start"], 1), col(ids["video"], v.visual_tokens),
                                col(ids["vision_end"], 1), text(v.question), text(v.answer)], 1).astype(np.int32)
    loss_mask = np.zeros_like(input_ids)
    loss_mask[:, -v.answer:] = 1
    frames = rng.normal(size=(v.batch, v.frames, v.image_size, v.image_size, 3)).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids), "loss_mask": loss_mask,
            "frames": frames, "frame_mask": np.ones((v.batch, v.frames), bool)}


def qwen2_vl_train_flops(module, params, v: VLSize) -> dict[str, Any]:
    """Model FLOPs of one Qwen2-VL training step (forward + backward), the PaLM rule of
    :func:`decoder_train_flops` applied to both towers:

        decoder: T * (6 * N_llm + 12 * n_layers * n_heads * head_dim * L),   T = batch * L
        vision:  P * (6 * N_vit + 12 * depth * width * S) + (P / 4) * 6 * N_merger

    ``N_llm`` = decoder parameters but the input embedding (the LM head counts); ``P = batch * t*h*w``
    patches; ``N_vit`` = patch embedding + blocks; ``S = h * w`` patches per attention segment (the
    reference attends within each temporal slice, and so does vjax when every slice has the same
    ``h * w``, as here; mixed grids fall back to one block-masked ``[P, P]`` attention, which would
    execute ``P / S`` times the counted attention FLOPs, recorded as ``vision_attention_executed_flops``
    for that case); the merger runs on ``P / 4`` merged tokens. The input pixels
    need no gradient, and norms, softmax, RoPE and the optimizer are not counted."""
    flat = {jax.tree_util.keystr(p): int(x.size) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    count = lambda pred: sum(n for k, n in flat.items() if pred(k))  # noqa: E731
    n_llm = count(lambda k: k.startswith("['llm']") and "embed_tokens" not in k)
    n_merger = count(lambda k: k.startswith("['merger']"))
    n_vit = count(lambda k: k.startswith("['vision']"))
    c = module.config.llm
    t, h, w = v.grid
    tokens, patches, seg = v.batch * v.seq, v.batch * t * h * w, h * w
    llm_dense = 6 * n_llm * tokens
    llm_attn = 12 * c.num_layers * c.num_heads * c.resolved_head_dim * v.seq * tokens
    vit_dense = 6 * n_vit * patches + 6 * n_merger * (patches // 4)
    vit_attn = 12 * v.vision_depth * v.vision_width * seg * patches
    return {"params": {"llm_non_embedding": n_llm, "vision": n_vit, "merger": n_merger,
                       "embedding": sum(flat.values()) - n_llm - n_vit - n_merger, "total": sum(flat.values())},
            "tokens": tokens, "patches": patches, "attention_segment": seg,
            "decoder_dense_flops": llm_dense, "decoder_attention_flops": llm_attn,
            "vision_dense_flops": vit_dense, "vision_attention_flops": vit_attn,
            "vision_attention_executed_flops": 12 * v.vision_depth * v.vision_width * patches * patches,
            "dense_flops": llm_dense + vit_dense, "attention_flops": llm_attn + vit_attn,
            "flops": llm_dense + llm_attn + vit_dense + vit_attn,
            "formula": "T * (6 N_llm + 12 layers heads head_dim L) + P * (6 N_vit + 12 depth width S) "
                       "+ P/4 * 6 N_merger"}


def train_qwen2_vl(ctx: Context) -> TrainContender:
    """Qwen2-VL (``ctx.size.vl``): transformers ``Qwen2VLForConditionalGeneration`` (default attention
    implementation; packed ``pixel_values_videos`` + ``video_grid_thw`` + ``mm_token_type_ids``) +
    ``torch.optim.AdamW`` vs vjax ``Qwen2VL`` + ``Trainer`` over the batch's ``frames`` (patchified
    inside the jitted step; the same patches as the reference's, see ``qwen2_vl_patchify``). Both
    towers and the merger train."""
    import torch
    from vjax.models.qwen2_vl import qwen2_vl_patchify
    v = ctx.size.vl
    hf, module, params, layout = qwen2_vl_pair(v, ctx.workdir)
    batch = qwen2_vl_batch(v)
    info: dict[str, Any] = {"hf_attn_implementation": hf.config._attn_implementation, "checkpoint_layout": layout,
                            "grid_thw": list(v.grid), "visual_tokens_per_clip": v.visual_tokens, "seq": v.seq,
                            "vjax_input": "frames [B, T, H, W, 3]"}
    vstep, vloss = _vjax_trainer_step(module, params, batch, info)
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    pix = np.concatenate([np.asarray(qwen2_vl_patchify(jnp.asarray(f))) for f in batch["frames"]])
    labels = ids.clone()
    labels[torch.as_tensor(batch["loss_mask"]) == 0] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "pixel_values_videos": torch.as_tensor(pix),
              "video_grid_thw": torch.as_tensor([list(v.grid)] * v.batch, dtype=torch.long),
              "mm_token_type_ids": (ids == _vl_special_ids(v)["video"]).long() * 2}
    tstep, tloss = _torch_adamw_step(hf, inputs)
    t, h, w = v.grid
    info["shape"] = (f"{v.layers}x{v.hidden}, vocab {v.vocab}; ViT {v.vision_depth}x{v.vision_width}; "
                     f"{v.batch}x({v.frames}f {v.image_size}px = {t}x{h}x{w} patches -> {v.visual_tokens} tok; "
                     f"L {v.seq})")
    return TrainContender("qwen2_vl", vstep, tstep, {"vjax": vloss, "torch": tloss},
                          qwen2_vl_train_flops(module, params, v), info)


# One builder per model (each returns a TrainContender on the same weights on both sides).
TRAIN_MODELS: dict[str, Callable[[Context], TrainContender]] = {
    "llama": train_llama,
    "qwen2_vl": train_qwen2_vl,
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
    ``jax.monitoring`` listener during the timed steps (must be 0) and by the jit cache size. The
    first losses of the two sides must agree within ``FIRST_LOSS_TOL`` (relative): a model that
    fails it, or whose builder raises, fails the suite after the other models have run."""
    import torch
    peak = matmul_peak(ctx)
    entry: dict[str, Any] = {"models": {}, "torch_threads_default": torch.get_num_threads(),
                             "first_loss_tolerance": FIRST_LOSS_TOL}
    failures: dict[str, str] = {}
    for name, build in TRAIN_MODELS.items():
        try:
            c = build(ctx)
        except Exception:  # noqa: BLE001 — the other models still run; the suite fails at the end
            failures[name] = traceback.format_exc()
            logging.error("train_step %s failed:\n%s", name, failures[name])
            continue
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
        shape = rec.pop("shape")
        sps = rec["steps_per_s"]
        loss_tol = FIRST_LOSS_TOL * max(1.0, abs(c.first_losses["torch"]))
        rec["first_loss_agree"] = agree = rec["first_loss_abs_diff"] <= loss_tol
        if not agree:
            failures[name] = (f"first losses differ: vjax {c.first_losses['vjax']:.6f} vs torch "
                              f"{c.first_losses['torch']:.6f} (|diff| {rec['first_loss_abs_diff']:.2e} "
                              f"> {loss_tol:.1e})")
        ctx.rows += [
            Row("train_step", f"{name} ({shape}) steps/s vjax / torch / torch 1 thread",
                f"{sps['vjax']:.3f} / {sps['torch']:.3f} / {sps['torch_1t']:.3f}",
                f"first loss |diff| <= {loss_tol:.1e}", agree,
                note=f"first loss vjax {c.first_losses['vjax']:.5f}, torch {c.first_losses['torch']:.5f}"),
            Row("train_step", f"{name} speedup vjax vs faster torch ({ref})", f"{rec['speedup']:.2f}x",
                f">= {TARGETS['train_speedup']}x", rec["speedup"] >= TARGETS["train_speedup"],
                note=f"ratio of best times {rec['speedup_best']:.2f}x"),
            Row("train_step", f"{name} model GFLOP/step; MFU vjax / {ref}", f"{gflop(flops)}; "
                f"{100 * rec['mfu']['vjax']:.1f}% / {100 * rec['mfu'][ref]:.1f}%",
                f">= {100 * TARGETS['train_mfu']:.0f}%", rec["mfu"]["vjax"] >= TARGETS["train_mfu"],
                note=f"of {peak:.1f} GFLOP/s measured peak; at best times "
                f"{100 * rec['mfu_best']['vjax']:.1f}% / {100 * rec['mfu_best'][ref]:.1f}%"),
            Row("train_step", f"{name} recompiles: first step / timed steps / jit cache",
                f"{c.info.get('compiles_first_step')} / {rec['compiles_timed']} / {rec['jit_cache_size']}",
                "0 timed", rec["compiles_timed"] == 0),
        ]
        if "vision_attention_executed_flops" in c.flops:
            f = c.flops
            ctx.rows.append(Row(
                "train_step", f"{name} GFLOP/step decoder / vision (dense + attention)",
                f"{gflop(f['decoder_dense_flops'] + f['decoder_attention_flops'])} / "
                f"{gflop(f['vision_dense_flops'] + f['vision_attention_flops'])}",
                note=f"equal grids attend per slice; a mixed-grid batch would mask one [P, P] attention over "
                f"P = {f['patches']} patches: {gflop(f['vision_attention_executed_flops'])} GFLOP instead of "
                f"{gflop(f['vision_attention_flops'])}"))
        del c  # frees both models before the next builder
    if failures:
        ctx.results["train_step"] = entry  # keep what was measured
        raise AssertionError("train_step: " + "\n".join(f"{k}: {v}" for k, v in failures.items()))
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
# The experiment config whose tiny model consumes the pipeline's batches. Chat-UniVi (CLIP-style tower
# per frame, DPC-KNN merging) rather than Qwen2-VL: vjax's Qwen2-VL tower attends over all packed
# patches of the batch under a block-diagonal mask, so at 8 x 224 px its tiny step is ~10x slower
# (~0.75 s), which would hide whether the pipeline keeps up.
DATA_MODEL = "chat_univi"


def _data_setup(ctx: Context):
    """The ``DATA_MODEL`` tiny experiment (``experiments/configs``) at the data suite's geometry
    (``data_frames`` frames at ``data_frame_size``) on a freshly generated synthetic set: its model
    config, format (template + tokenizer), sampler and records, as ``experiments.train`` builds them."""
    import importlib
    from experiments import config as lib
    from vjax.data import formats
    from vjax.data.synthetic import ensure_synthetic_dataset
    s = ctx.size
    c = importlib.import_module(f"experiments.configs.{DATA_MODEL}").get_config("tiny")
    c.data.root = os.path.join(ctx.workdir, f"synthetic_{ctx.size_name}")
    c.data.synthetic.update(dict(seed=0, num_train=s.data_clips, num_val=1, num_test=1, long_every=0,
                                 questions_per_clip=1, show_progress=False))
    c.data.num_frames = s.data_frames
    c.data.image_size = s.data_frame_size[0]
    c.data.batch_size = 2
    from vjax.data.synthetic import SyntheticConfig
    if "sample_fps" in c.data.sampler_kwargs:  # fps samplers: every clip (>= min_seconds) gives data_frames
        c.data.sampler_kwargs.sample_fps = s.data_frames / SyntheticConfig().min_seconds
    plan = lib.validate(c, num_devices=jax.device_count())
    t0 = time.perf_counter()
    paths = ensure_synthetic_dataset(c.data.root, SyntheticConfig(**c.data.synthetic.to_dict()))
    gen_s = time.perf_counter() - t0
    tokenizer = formats.TextTokenizer(paths.tokenizer_dir)
    plan["model_config"] = lib.resolve_markers(plan["model"], plan["model_config"], tokenizer)
    plan["spec"] = lib.data_format(plan["model"], plan["model_config"], c)
    fmt = formats.VideoQAFormat(plan["spec"], tokenizer)
    return c, plan, fmt, lib.records(c, "train", paths), gen_s


def suite_data(ctx: Context) -> dict:
    """Clips/s of the Grain + decord pipeline (``make_loader``; ``data_frames`` frames sampled by the
    model's sampler, decoded and preprocessed to ``data_frame_size`` as ``experiments.train`` does (the
    model's release preprocessing, ``vjax.data.preprocess``); the model's chat template and the
    synthetic set's tokenizer; text buckets + visual tokens as in ``experiments.train``) for each
    Grain ``worker_count`` in ``data_workers``, vs the clips/s that the ``DATA_MODEL`` tiny model's
    full train step (``Trainer``, AdamW, batch 2) consumes on the pipeline's own first batch.

    In-process (0 workers), pipeline and step alternate round by round (``data_batches`` batches /
    steps per round). With workers, Grain prefetches in the background, so the pipeline is timed
    alone, back to back, after a warm-up round that drains its buffers (its steady production rate),
    and its headroom is over the in-process round's step. For every worker count the end-to-end
    figure (``for batch in loader: train_step(batch)``, ``data_batches`` steps) shows what the two
    give together: each worker is a separate process on the same cores as the step."""
    from experiments import config as lib
    from vjax.data import pipeline
    s = ctx.size
    c, plan, fmt, records, gen_s = _data_setup(ctx)
    mcfg = plan["model_config"]
    visual = plan["spec"].tokens_per_clip(plan["spec"].num_frames)  # a full clip (every synthetic clip)
    batch_size = c.data.batch_size
    # one bucket (the smallest of experiments.train's that holds every record): one static step shape
    longest = lib.check_lengths(c, fmt, records)
    length = min(b + visual for b in c.data.text_buckets if b + visual >= longest)
    buckets = {k: (length,) for k in lib.TEXT_KEYS}

    if s.data_workers[0] != 0:
        raise ValueError(f"data_workers must start with 0 (the in-process round times the step): {s.data_workers}")
    if any(s.data_workers) and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags (defaults) outside app.run too

    from vjax.data.preprocess import FrameProcessor
    frames = FrameProcessor.for_model(plan["model"], mcfg, native=False, size=c.data.image_size)  # as train does

    def loader(workers: int):
        cfg = pipeline.PipelineConfig(batch_size=batch_size, seed=0, num_epochs=None, worker_count=workers,
                                      frame_size=frames, buckets=buckets)
        return iter(pipeline.make_loader(records, fmt, cfg, sampler=plan["sampler"]))

    # consumer: the tiny model's train step on the pipeline's first batch
    it0 = loader(0)
    first = next(it0)
    frame_shape = list(first["frames"].shape)
    module = plan["module_class"](mcfg)
    import vjax
    info: dict[str, Any] = {}
    step, first_loss = _vjax_trainer_step(module, vjax.init_params(module, 0), first, info)
    trainer = info.pop("trainer")

    def steps():
        for _ in range(s.data_batches):
            step()

    clips = s.data_batches * batch_size
    rec: dict[str, Any] = {"model": f"{DATA_MODEL}:tiny", "visual_tokens_per_clip": visual,
                           "synthetic_clips": s.data_clips, "longest_record_tokens": longest, "generate_s": gen_s,
                           "batch_size": batch_size,
                           "frames_per_clip": s.data_frames, "batch_frames_shape": frame_shape,
                           "batch_input_ids_shape": list(first["input_ids"].shape),
                           "first_batch_real_frames": (np.asarray(first["frame_mask"]).sum(1).tolist()
                                                       if "frame_mask" in first else None),
                           "consumer_first_loss": first_loss, "consumer_compiles_first_step":
                           info.get("compiles_first_step"), "pipelines": {}}
    for workers in s.data_workers:
        t0 = time.perf_counter()
        it = it0 if workers == 0 else loader(workers)
        next(it)
        startup = time.perf_counter() - t0

        def pull():
            for _ in range(s.data_batches):
                next(it)

        if workers == 0:  # nothing runs in the background: pipeline and step alternate exactly
            times = interleaved({"pipeline": pull, "train_step": steps}, max(1, ctx.repeats // 2), warmup=0)
            step_stats = stats(times["train_step"])
        else:  # back-to-back pulls after a warm-up round that drains the prefetch buffers
            times = interleaved({"pipeline": pull}, max(1, ctx.repeats // 2), warmup=1)
        p = stats(times["pipeline"])
        # end to end: the loader feeds the step (compiles counted: must be 0, one bucket)
        holder = {"state": trainer.init_state(params=vjax.init_params(module, 0))}
        e2e: dict[str, Any] = {}
        with compiles().span(e2e, "compiles"):
            t0 = time.perf_counter()
            for _ in range(s.data_batches):
                holder["state"], m = trainer.train_step(holder["state"], next(it))
            _block((holder["state"], m))
            e2e["seconds"] = time.perf_counter() - t0
        e2e["clips_per_s"] = clips / e2e["seconds"]
        rec["pipelines"][str(workers)] = {
            "worker_count": workers, "startup_s": startup, **p, "clips_per_s": clips / p["median_s"],
            "headroom": step_stats["median_s"] / p["median_s"], "end_to_end": e2e}
        it = it0 = None  # lets Grain stop this loader's worker processes
        gc.collect()
    p0 = rec["pipelines"]["0"]
    rec["tiny_train_step"] = {**step_stats, "clips_per_s": clips / step_stats["median_s"]}
    rec["pipeline"], rec["headroom"], rec["worker_count"] = p0, p0["headroom"], p0["worker_count"]
    best_w = max(rec["pipelines"], key=lambda w: rec["pipelines"][w]["clips_per_s"])
    rec["best_worker_count"] = int(best_w)
    size = f"{frame_shape[-3]}x{frame_shape[-2]}"
    shape = (f"{s.data_frames} frames {size} -> {visual} visual tokens; batch {frame_shape[0]} x "
             f"{first['input_ids'].shape[1]} tokens")
    st = rec["tiny_train_step"]
    for w, pr in rec["pipelines"].items():
        e = pr["end_to_end"]
        ctx.rows += [
            Row("data", f"Grain+decord clips/s, {w} workers / {DATA_MODEL} tiny train step clips/s ({shape})",
                f"{pr['clips_per_s']:.1f} / {st['clips_per_s']:.1f}",
                note=f"step {1e3 * st['median_s'] / s.data_batches:.1f} ms; first batch after "
                f"{pr['startup_s']:.2f} s"),
            Row("data", f"pipeline headroom over the step, {w} workers", f"{pr['headroom']:.2f}x",
                f">= {TARGETS['data_headroom']}x", pr["headroom"] >= TARGETS["data_headroom"]),
            Row("data", f"end to end, {w} workers: loader -> train step", f"{e['clips_per_s']:.1f} clips/s",
                "0 compiles", e["compiles"] == 0,
                note=f"{e['clips_per_s'] / st['clips_per_s']:.2f}x the step alone"),
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
    unknown = [s for s in suites if s not in SUITES]
    if unknown:  # a usage error: exit 2 (experiments.cli); a suite that fails below is an internal error: 1
        cli.fail(f"--suite: unknown suite(s) {unknown}; choose from {list(SUITES)}")
    results = run(suites, _SIZE.value, _OUT.value, _REPEATS.value)
    with open(os.path.join(_OUT.value, "results.md")) as f:
        print(f.read())
    if results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
