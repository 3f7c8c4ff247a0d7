"""The suites: each ``suite_*`` takes a :class:`~experiments.bench.harness.Context`, appends rows to its
table and returns the figures recorded in ``results.json`` (each docstring says what exactly is timed)."""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from experiments.bench.harness import (Context, Row, block, compiled_memory, compiles, gflop, interleaved, loadavg,
                                      mib, stats)
from experiments.bench.references import (decoder_train_flops, llama_pair, qwen2_vl_batch, qwen2_vl_pair,
                                         qwen2_vl_train_flops, torch_adamw_step, torch_compiled_adamw_step,
                                         torch_contenders, vl_special_ids)
from experiments.bench.sizes import OPTIM, TARGETS, Size


# ------------------------------------------------------------------------------------------ matmul
PEAK_RUNS = 30  # short matmul runs per contender at --size=small: the peak is the best of them


def _matmul_gflops(n: int, repeats: int) -> tuple[dict, dict]:
    """Interleaved ``repeats`` runs of one jitted ``[n, n] @ [n, n]`` and one ``torch.mm``, each run timed alone,
    the host's 1-minute load average read after every round."""
    import torch
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    loads: list[float | None] = []
    fns = {"jax": lambda: block(f(a, b)), "torch": lambda: torch.mm(ta, tb)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):  # one round at a time, so that each time has the load it ran under
        for k, ts in interleaved(fns, 1, warmup=1 if r == 0 else 0).items():
            times[k] += ts
        loads.append(loadavg())
    flops = 2.0 * n**3
    out = {}
    for k, ts in times.items():
        s = stats(ts)
        best = ts.index(s["min_s"])
        spread = [flops / t / 1e9 for t in (s["max_s"], s["min_s"])]
        out[k] = {**s, "gflops_peak": flops / s["min_s"] / 1e9, "gflops_median": flops / s["median_s"] / 1e9,
                  "gflops_spread": spread, "load_at_best": loads[best]}
    known = [x for x in loads if x is not None]
    return out, {"n": n, "flops": flops, "runs": repeats, "load_min": min(known, default=None),
                 "load_max": max(known, default=None)}


def suite_matmul_peak(ctx: Context) -> dict:
    """A jitted float32 ``[n, n] @ [n, n]`` (2 n^3 FLOPs): this machine's attainable matmul rate, the MFU
    denominator, taken as the best of many short runs (:data:`PEAK_RUNS` at ``--size=small``) so that one quiet
    moment of a shared host is enough; the load at the best run and the range of loads seen are recorded
    beside it. ``torch.mm`` is timed beside it, interleaved."""
    n = ctx.size.matmul_n
    runs = max(ctx.repeats, 3) if ctx.size_name == "tiny" else max(ctx.repeats, PEAK_RUNS)
    res, meta = _matmul_gflops(n, runs)
    entry = {**meta, **res, "peak_gflops": res["jax"]["gflops_peak"]}
    j, t = res["jax"], res["torch"]
    loads = f"loads {meta['load_min']}-{meta['load_max']}" if meta["load_min"] is not None else "load unknown"
    ctx.rows += [
        Row("matmul_peak", f"jit f32 matmul {n}^3: best of {runs} short runs / median",
            f"{j['gflops_peak']:.1f} / {j['gflops_median']:.1f} GFLOP/s",
            note=f"MFU denominator; best at load {j['load_at_best']} ({loads}); slowest run "
                 f"{j['gflops_spread'][0]:.1f} GFLOP/s"),
        Row("matmul_peak", f"torch.mm f32 {n}^3: best of {runs} / median",
            f"{t['gflops_peak']:.1f} / {t['gflops_median']:.1f} GFLOP/s",
            note=f"best at load {t['load_at_best']}; slowest run {t['gflops_spread'][0]:.1f} GFLOP/s"),
    ]
    return entry


def matmul_peak(ctx: Context) -> float:
    if "matmul_peak" not in ctx.results:
        ctx.results["matmul_peak"] = suite_matmul_peak(ctx)
    return ctx.results["matmul_peak"]["peak_gflops"]


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
    torch_compiled: Callable[[], Any] | None = None  # the PyTorch step under torch.compile, where it compiles


LOSS_POSITION_BUCKETS = (16, 64, 256, 1024)  # experiments/configs/common.py's default
FIRST_LOSS_TOL = 1e-4  # |first loss vjax - torch| <= this x max(1, |loss|): the same weights and batch
TRAIN_WARMUP = 2  # untimed rounds of every contender: the first ones also grow malloc's heap to its steady size


def _vjax_trainer_step(module, params, batch_np: dict[str, np.ndarray], info: dict, bare: bool = True):
    """The ``Trainer`` step of ``module`` on ``batch_np`` (compiled, first loss taken); ``bare``: also the
    same step in a bare optax loop (``info["bare_step"]``, what ``train_step`` measures the Trainer against)."""
    from vjax.train.optim import OptimConfig
    from vjax.train.sharding import make_mesh
    from vjax.train.step import Trainer
    from vjax.data.pipeline import bucketed_loss_positions
    cfg = OptimConfig(warmup_steps=0, total_steps=10**6, min_lr_ratio=1.0, **OPTIM)
    trainer = Trainer(module, cfg, make_mesh())
    # as the training pipeline gives it: the LM head runs on the supervised positions only (the answer)
    if "loss_positions" not in batch_np:
        positions = bucketed_loss_positions(batch_np["loss_mask"], LOSS_POSITION_BUCKETS)
        batch_np = {**batch_np, "loss_positions": positions}
    info["loss_positions"] = int(batch_np["loss_positions"].shape[1])
    counter = compiles()
    with counter.span(info, "compiles_init"):
        state = trainer.init_state(params=params)
        batch = trainer.put_batch(batch_np)
        block(state)
    holder = {"state": state}

    def step():
        holder["state"], metrics = trainer.train_step(holder["state"], batch)
        block((holder["state"], metrics))
        return metrics

    with counter.span(info, "compiles_first_step"):
        first = float(step()["loss"])
    info["trainer"] = trainer
    if bare:
        info["bare_step"] = _bare_optax_step(module, params, batch, cfg, trainer.mesh)
    return step, first


def _bare_optax_step(module, params, batch, cfg, mesh):
    """The same model, batch and optimizer as the ``Trainer`` step, in the shortest jitted optax loop: loss,
    gradient, clip + AdamW update, nothing else (no RNG, finite guard, metrics or schedule) — what the
    Trainer's own overhead is measured against."""
    import optax
    decay = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, mask=decay))

    def update(p, opt_state, b):
        loss, grads = jax.value_and_grad(lambda q: module.apply({"params": q}, b, method="loss")[0])(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    # parameters and optimizer state committed, replicated on the Trainer's mesh, as the outputs come back: the
    # second call reuses the first's executable (uncommitted first inputs would compile the step twice)
    dev = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    fn = jax.jit(update, donate_argnums=(0, 1), out_shardings=dev)
    p = jax.device_put(jax.tree_util.tree_map(jnp.array, params), dev)  # own buffers: they are donated
    holder = {"p": p, "s": jax.device_put(tx.init(p), dev)}

    def step():
        holder["p"], holder["s"], loss = fn(holder["p"], holder["s"], batch)
        block(loss)
        return loss

    step(), step()  # compiled here (once), not in the timed rounds
    return step


def _torch_compiled(ctx: Context, hf, inputs: dict, info: dict, losses: dict) -> Callable[[], Any] | None:
    """The ``torch.compile`` contender of a train step (``ctx.torch_compile``), on a copy of the pristine ``hf``
    (call before the eager step trains it): its compile seconds and outcome go to ``info``, its first loss to
    ``losses``; None where it was not asked for or does not compile."""
    if not ctx.torch_compile:
        info["torch_compile_status"] = "not run (torch_compile=False)"
        return None
    t0 = time.perf_counter()
    step, first, error = torch_compiled_adamw_step(hf, inputs)
    info["torch_compile_seconds"] = round(time.perf_counter() - t0, 1)
    info["torch_compile_status"] = error or "compiled"
    if step is not None:
        losses["torch_compile"] = first
    return step


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
    inputs = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "labels": ids_t}
    losses = {"vjax": vloss}
    compiled = _torch_compiled(ctx, hf, inputs, info, losses)
    tstep, losses["torch"] = torch_adamw_step(hf, inputs)
    shape = f"{s.layers}x{s.hidden}, vocab {s.vocab}, {s.batch}x{s.seq} tokens"
    return TrainContender("llama", vstep, tstep, losses, decoder_train_flops(module, params, s.batch, s.seq),
                          {**info, "shape": shape}, compiled)


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
              "mm_token_type_ids": (ids == vl_special_ids(v)["video"]).long() * 2}
    losses = {"vjax": vloss}
    compiled = _torch_compiled(ctx, hf, inputs, info, losses)
    tstep, losses["torch"] = torch_adamw_step(hf, inputs)
    t, h, w = v.grid
    info["shape"] = (f"{v.layers}x{v.hidden}, vocab {v.vocab}; ViT {v.vision_depth}x{v.vision_width}; "
                     f"{v.batch}x({v.frames}f {v.image_size}px = {t}x{h}x{w} patches -> {v.visual_tokens} tok; "
                     f"L {v.seq})")
    return TrainContender("qwen2_vl", vstep, tstep, losses, qwen2_vl_train_flops(module, params, v), info, compiled)


# One builder per model (each returns a TrainContender on the same weights on both sides).
TRAIN_MODELS: dict[str, Callable[[Context], TrainContender]] = {
    "llama": train_llama,
    "qwen2_vl": train_qwen2_vl,
}


def _reference(times: dict[str, list[float]]) -> str:
    """The fastest PyTorch contender by median (``torch``, ``torch_1t``, ``torch_compile`` where it ran)."""
    return min((k for k in times if k.startswith("torch")), key=lambda k: statistics.median(times[k]))


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
        bare = c.info.pop("bare_step")
        cpu: dict[str, list[float]] = {}
        faults: dict[str, list[int]] = {}
        with counter.span(rec, "compiles_timed"):
            times = interleaved({"vjax": c.vjax_step, "vjax_bare_optax": bare,
                                 **torch_contenders(c.torch_step, c.torch_compiled)}, ctx.repeats,
                                warmup=TRAIN_WARMUP, cpu=cpu, faults=faults)
        trainer = c.info.pop("trainer", None)
        bare_st = stats(times.pop("vjax_bare_optax"))
        cpu_st = {k: stats(v) for k, v in cpu.items()}
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
            bare_optax=bare_st, trainer_overhead=st["vjax"]["median_s"] / bare_st["median_s"],
            cpu_seconds=cpu_st, minor_faults={k: int(statistics.median(v)) for k, v in faults.items()}, **c.info)
        entry["models"][name] = rec
        shape = rec.pop("shape")
        sps = rec["steps_per_s"]
        loss_tol = FIRST_LOSS_TOL * max(1.0, abs(c.first_losses["torch"]))
        # every PyTorch contender's first loss against vjax's (torch.compile runs the same weights)
        diffs = {k: abs(c.first_losses["vjax"] - v) for k, v in c.first_losses.items() if k != "vjax"}
        rec["first_loss_agree"] = agree = max(diffs.values()) <= loss_tol
        if not agree:
            others = ", ".join(f"{k} {c.first_losses[k]:.6f}" for k in diffs)
            failures[name] = (f"first losses differ: vjax {c.first_losses['vjax']:.6f} vs {others} "
                              f"(|diff| {max(diffs.values()):.2e} > {loss_tol:.1e})")
        compiled = (f" / {sps['torch_compile']:.3f}" if "torch_compile" in sps else
                    f" / - ({rec.get('torch_compile_status', 'not run')})")
        ctx.rows += [
            Row("train_step", f"{name} ({shape}) steps/s vjax / torch / torch 1 thread / torch.compile",
                f"{sps['vjax']:.3f} / {sps['torch']:.3f} / {sps['torch_1t']:.3f}{compiled}",
                f"first loss |diff| <= {loss_tol:.1e}", agree,
                note=f"first loss vjax {c.first_losses['vjax']:.5f}, " + ", ".join(
                    f"{k} {v:.5f}" for k, v in c.first_losses.items() if k != "vjax")
                + (f"; torch.compile took {rec['torch_compile_seconds']:.0f} s" if "torch_compile_seconds" in rec
                   else "")),
            Row("train_step", f"{name} speedup vjax vs faster torch ({ref})", f"{rec['speedup']:.2f}x",
                f">= {TARGETS['train_speedup']}x", rec["speedup"] >= TARGETS["train_speedup"],
                note=f"ratio of best times {rec['speedup_best']:.2f}x; CPU-seconds per step vjax "
                f"{cpu_st['vjax']['median_s']:.2f}, {ref} {cpu_st[ref]['median_s']:.2f} "
                f"(ratio {cpu_st[ref]['median_s'] / cpu_st['vjax']['median_s']:.2f}x); spread of vjax "
                f"{v['min_s']:.3f}-{v['max_s']:.3f} s; minor page faults per step (median) vjax "
                f"{rec['minor_faults']['vjax']}, {ref} {rec['minor_faults'][ref]}"),
            Row("train_step", f"{name} Trainer step / bare optax loop (same model and batch)",
                f"{rec['trainer_overhead']:.2f}x", f"<= {TARGETS['trainer_overhead']}x",
                rec["trainer_overhead"] <= TARGETS["trainer_overhead"],
                note=f"bare loop {1 / bare_st['median_s']:.3f} steps/s; CPU-seconds "
                f"{cpu_st['vjax_bare_optax']['median_s']:.2f}"),
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
            pt.update(stats(interleaved({"merge": lambda: block(compiled(x))}, reps)["merge"]))
        else:
            pt["skipped_run"] = f"compiled memory {mib(mem['total'])} > limit {mib(s.merge_max_bytes)}"
        rec["points"].append(pt)
        t = f"{1e3 * pt['median_s']:.1f} ms" if "median_s" in pt else "not run"
        ctx.rows.append(Row("token_merge", f"spatial_merge N={n}, C={s.merge_width}",
                            f"{t}; {mib(mem['total'])}", note=f"N^2 f32 = {mib(4 * n * n)}"))
    return rec


# ------------------------------------------------------------------------------------------ attention
def suite_attention(ctx: Context) -> dict:
    """Causal self-attention ``[1, L, H, 64]`` (GQA), forward and backward of ``sum(out * w)``, under each
    implementation of :func:`vjax.layers.attention.attention` that runs on this backend: ``xla`` (the einsum
    reference: ``[L, L]`` float32 scores), ``chunked`` (online softmax, ``O(L x block)``), ``cudnn`` (cuDNN's
    fused kernel on a GPU, ``jax.nn``'s XLA path elsewhere) and, on a TPU, ``splash``. Per length: compiled
    memory and median wall time of each, its ratio to the reference, and the attention TFLOP/s it reaches
    (``2 x 2 x L^2/2 x H x Dh`` forward, 2.5 times that backward: causal, no recompute counted). On a CPU
    in float32 at the size's lengths; on an accelerator in bfloat16 at 4 times those lengths."""
    from vjax.layers.attention import attention
    from vjax.layers.masks import StructuredMask

    s = ctx.size
    platform = jax.devices()[0].platform
    accel = platform != "cpu"
    dtype = jnp.bfloat16 if accel else jnp.float32
    impls = ["xla", "chunked", "cudnn"] + (["splash"] if platform == "tpu" else [])
    mask = StructuredMask(causal=True)
    h, kh, dh = s.attn_heads, s.attn_kv_heads, s.attn_head_dim
    rec: dict[str, Any] = {"heads": h, "kv_heads": kh, "head_dim": dh, "dtype": jnp.dtype(dtype).name,
                           "platform": platform, "points": []}
    for length in (4 * n if accel else n for n in s.attn_lengths):
        keys = jax.random.split(jax.random.key(length), 4)
        q = jax.random.normal(keys[0], (1, length, h, dh), dtype)
        k, v = (jax.random.normal(key, (1, length, kh, dh), dtype) for key in keys[1:3])
        w = jax.random.normal(keys[3], (1, length, h, dh), jnp.float32)
        flops = 3.5 * 2 * 2 * (length * length / 2) * h * dh
        fns, pt = {}, {"length": length, "impls": {}}
        for impl in impls:
            def loss(q, k, v, impl=impl):
                return jnp.sum(attention(q, k, v, mask, impl=impl).astype(jnp.float32) * w)
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
            pt["impls"][impl] = {"memory": compiled_memory(compiled)}
            fns[impl] = (lambda c=compiled: block(c(q, k, v)))
        times = interleaved(fns, ctx.repeats)
        ref = statistics.median(times["xla"])
        for impl in impls:
            r = pt["impls"][impl]
            r.update(stats(times[impl]))
            r["speedup_vs_xla"] = ref / r["median_s"]
            r["tflops"] = flops / r["median_s"] / 1e12
            ctx.rows.append(Row("attention", f"{impl} causal fwd+bwd L={length}, H={h}/{kh}, Dh={dh}, "
                                             f"{rec['dtype']}",
                                f"{1e3 * r['median_s']:.1f} ms ({r['speedup_vs_xla']:.2f}x xla); "
                                f"{r['tflops']:.2f} TFLOP/s; {mib(r['memory']['total'])}"))
        rec["points"].append(pt)
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
        st = stats(interleaved({"bank": lambda: block(compiled(key, queries))}, ctx.repeats)["bank"])
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


def _end_to_end(trainer, params0, it, steps: int, clips: int) -> dict:
    """``for batch in it: train_step(batch)`` for ``steps`` steps from a fresh copy of ``params0``: seconds,
    clips/s, the host's seconds inside ``next(it)`` and the compiles (must be 0: one bucket)."""
    state = trainer.init_state(params=params0)
    e2e: dict[str, Any] = {"wait_s": 0.0}
    with compiles().span(e2e, "compiles"):
        t0 = time.perf_counter()
        for _ in range(steps):
            t_next = time.perf_counter()
            batch = next(it)
            e2e["wait_s"] += time.perf_counter() - t_next
            state, m = trainer.train_step(state, batch)
        block((state, m))
        e2e["seconds"] = time.perf_counter() - t0
    e2e["clips_per_s"] = clips / e2e["seconds"]
    e2e["wait_fraction"] = e2e["wait_s"] / e2e["seconds"]
    return e2e


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
                                      frame_size=frames, buckets=buckets,
                                      loss_position_buckets=tuple(c.data.loss_position_buckets) or None)
        return iter(pipeline.make_loader(records, fmt, cfg, sampler=plan["sampler"]))

    # consumer: the tiny model's train step on the pipeline's first batch
    it0 = loader(0)
    first = next(it0)
    frame_shape = list(first["frames"].shape)
    module = plan["module_class"](mcfg)
    import vjax
    info: dict[str, Any] = {}
    # initialised once, kept on the host: every end-to-end round starts from a fresh device copy of the same weights
    params0 = jax.tree_util.tree_map(np.asarray, vjax.init_params(module, 0))
    step, first_loss = _vjax_trainer_step(module, params0, first, info, bare=False)
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
        e2e = _end_to_end(trainer, params0, it, s.data_batches, clips)
        rec["pipelines"][str(workers)] = {
            "worker_count": workers, "startup_s": startup, **p, "clips_per_s": clips / p["median_s"],
            "headroom": step_stats["median_s"] / p["median_s"], "end_to_end": e2e}
        if workers == 0:  # the same, with experiments.train's read-ahead thread (data.prefetch=2) around the loader
            ahead = pipeline.Prefetch(it, 2)
            next(ahead)  # started, its first batch read
            rec["pipelines"]["0"]["end_to_end_prefetch"] = _end_to_end(trainer, params0, ahead, s.data_batches,
                                                                       clips)
            ahead.close()
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
                note=f"{e['clips_per_s'] / st['clips_per_s']:.2f}x the step alone; data wait "
                f"{100 * e['wait_fraction']:.0f} %"),
        ]
        if "end_to_end_prefetch" in pr:
            e = pr["end_to_end_prefetch"]
            ctx.rows.append(Row(
                "data", f"end to end, {w} workers + read-ahead thread", f"{e['clips_per_s']:.1f} clips/s",
                "0 compiles", e["compiles"] == 0,
                note=f"{e['clips_per_s'] / pr['end_to_end']['clips_per_s']:.2f}x without it; data wait "
                f"{100 * e['wait_fraction']:.0f} %"))
    return rec


SUITES: dict[str, Callable[[Context], dict]] = {
    "matmul_peak": suite_matmul_peak,
    "train_step": suite_train_step,
    "generate": suite_generate,
    "token_merge": suite_token_merge,
    "attention": suite_attention,
    "memory_bank": suite_memory_bank,
    "data": suite_data,
}
SUITE_NAMES = tuple(SUITES)
