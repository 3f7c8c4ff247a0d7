r"""Compile a published recipe ahead of time for a TPU slice on a CPU-only host, and print its memory plan.

    python -m experiments.plan --config=qwen2_vl:7b --topology=v5p-8 [--global_batch=N] [--frames=T]
                               [--tokens=L] [--mesh=1,-1,1] [--dtype=bfloat16] [--decode] [--out=plan.json]

The recipe's train step (the ``Trainer`` step every training command runs: forward, backward, clipping and
the AdamW update of the recipe's stage) is traced with abstract shapes (no weights, no data), sharded over a
``(data, fsdp, tensor)`` mesh of the slice's abstract chips (``jax.experimental.topologies``) and compiled by
libtpu for them. Nothing runs; XLA's own accounting of the compiled program gives, per chip:

    parameters, optimizer state, batch     the step's arguments, by their shardings
    temporaries                            XLA's scratch (activations kept for the backward, attention, ...)
    host_temporaries                       what an offloading remat policy keeps in host memory (when any)
    total                                  arguments + outputs - donated (aliased) + temporaries, vs HBM
    FLOPs                                  compiled FLOPs per step (all chips) vs the model FLOPs: the same
                                           step lowered without rematerialisation (what autodiff needs)

``--topology=local`` compiles for this host's own accelerators instead and RUNS the step on random weights and a
random batch of the same shapes: ``--steps`` timed steps after two warm-up steps, their median wall time, tokens
per second, the device's peak memory, and the model FLOPs utilisation (MFU: model FLOPs per second over the
chips' dense peak, ``--peak_tflops`` or a table of known chips), as MaxText reports it.

``--config=decoder:<preset>`` plans a bare LLM (a ``DecoderConfig`` preset such as ``llama2_7b``).
``--decode`` compiles one greedy decode step of the LLM over a KV cache of ``--tokens`` slots too.
libtpu is an optional extra (``pip install -e '.[plan]'``); without it the command says so (exit 2).

Slices (``--topology``): ``v5p-N`` (N TensorCores, N/2 chips of 95 GiB), ``v5e-N`` and ``v6e-N`` (N chips of
16 / 32 GiB). ``--global_batch`` defaults to one sample per chip; the recipe's batch is then reached by
gradient accumulation (printed). ``--tokens`` defaults to the recipe's longest text bucket plus a full clip's
visual tokens, ``--frames`` to the recipe's ``data.num_frames``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Mapping

from absl import flags

from experiments import cli, config

_CONFIG = flags.DEFINE_string("config", None, "experiment config: <name>:<variant> (a published recipe)")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "TPU slice: v5p-N (N TensorCores), v5e-N, v6e-N (N chips)")
_BATCH = flags.DEFINE_integer("global_batch", None, "samples per step over all chips (default: one per chip)")
_FRAMES = flags.DEFINE_integer("frames", None, "frames per clip (default: the recipe's data.num_frames)")
_TOKENS = flags.DEFINE_integer("tokens", None, "tokens per sample (default: longest text bucket + the visual tokens)")
_MESH = flags.DEFINE_string("mesh", None, "(data, fsdp, tensor) mesh, e.g. 1,-1,1 (default: the recipe's mesh)")
_DTYPE = flags.DEFINE_string("dtype", None, "compute dtype of every module (default: the recipe's compute_dtype; "
                                            "parameters stay float32)")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "model config field, e.g. --set=llm.remat_policy=full "
                                                  "(a dotted path into the model config), or an optimizer "
                                                  "field: --set=optim.grad_dtype=bfloat16; repeatable")
_DECODE = flags.DEFINE_boolean("decode", False, "also compile one decode step over a cache of --tokens slots")
_OUT = flags.DEFINE_string("out", None, "write the plan as JSON here")
_STEPS = flags.DEFINE_integer("steps", 5, "--topology=local: timed steps (after 2 warm-up steps)")
_PEAK = flags.DEFINE_float("peak_tflops", None, "--topology=local: dense peak TFLOP/s of one chip in the compute "
                                                "dtype (default: from the device kind; see PEAK_TFLOPS)")

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: its name, the ``topology_name`` libtpu knows, chips, and HBM per chip (bytes)."""

    name: str
    topology: str
    chips: int
    hbm: int


_GENERATIONS = {  # name prefix -> (libtpu platform name, HBM GiB per chip, TensorCores per chip in the slice name)
    "v5p": ("v5p", 95, 2),
    "v5e": ("v5e", 16, 1),
    "v6e": ("v6e", 32, 1),
}
_SHAPES_3D = {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


# Dense bf16 peak of one chip (TFLOP/s, the vendors' datasheets), matched by substring of ``device_kind``: the
# denominator of the MFU that --topology=local prints (MaxText's convention: model FLOPs over this peak).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "B200": 2250.0, "A100": 312.0,
               "L40S": 362.0, "L4": 121.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v6": 918.0, "TPU v4": 275.0}


def peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of ``device_kind`` from :data:`PEAK_TFLOPS` (longest matching name), else None.

    >>> peak_tflops("NVIDIA H200"), peak_tflops("NVIDIA GH200 480GB"), peak_tflops("cpu")
    (989.4, 989.4, None)
    """
    names = [n for n in PEAK_TFLOPS if n.lower() in device_kind.lower()]
    return PEAK_TFLOPS[max(names, key=len)] if names else None


def local_devices() -> list:
    """This host's devices of the default backend (what ``--topology=local`` compiles for and runs on)."""
    import jax  # noqa: PLC0415

    return jax.devices()


def local_slice() -> Slice:
    """:func:`local_devices` as a slice: HBM per chip from the device's memory stats (0 where the backend reports
    none, as the CPU)."""
    devices = local_devices()
    stats = devices[0].memory_stats() or {}
    return Slice("local", devices[0].device_kind, len(devices), int(stats.get("bytes_limit", 0)))


def parse_slice(name: str) -> Slice:
    """``"v5p-8"`` -> ``Slice("v5p-8", "v5p:2x2x1", 4 chips, 95 GiB)``; a ValueError names a bad slice.

    >>> parse_slice("v5e-8").topology
    'v5e:2x4'
    """
    m = re.fullmatch(r"(v5p|v5e|v6e)-(\d+)", name.strip())
    if not m:
        raise ValueError(f"--topology={name!r}: expected v5p-N, v5e-N or v6e-N (e.g. v5p-8), or local")
    gen, n = m.group(1), int(m.group(2))
    platform, hbm, cores = _GENERATIONS[gen]
    chips = n // cores
    shapes = _SHAPES_3D if gen == "v5p" else _SHAPES_2D
    if n % cores or chips not in shapes:
        sizes = sorted(k * cores for k in shapes)
        raise ValueError(f"--topology={name!r}: a {gen} slice has one of {sizes} {'cores' if cores > 1 else 'chips'}")
    return Slice(name, f"{platform}:{shapes[chips]}", chips, hbm * GIB)


def tpu_devices(sl: Slice) -> list:
    """The slice's abstract TPU devices (compile targets only), or exit 2 saying how to install libtpu."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", sl.name)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard, so no lockfile
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("libtpu") is None:
        cli.fail("compiling for a TPU needs libtpu: pip install -e '.[plan]' (about 700 MB; no TPU is needed)")
    from jax.experimental import topologies  # noqa: PLC0415

    return list(topologies.get_topology_desc(platform="tpu", topology_name=sl.topology).devices)


# ----------------------------------------------------------------------------------------- the recipe
def set_fields(cfg: Any, assignments: list[str]) -> Any:
    """``["llm.remat_policy=full", ...]`` applied to a nested model config (values parsed as Python literals
    when they are, else kept as strings); a ``config.ConfigError`` names a bad path."""
    import ast  # noqa: PLC0415

    overrides: dict = {}
    for a in assignments:
        key, eq, value = a.partition("=")
        if not eq:
            raise config.ConfigError("set", f"{a!r} is not <field>=<value>")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        node = overrides
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config.apply_overrides(cfg, overrides, "set") if overrides else cfg


def recipe(spec: str, frames: int | None = None, dtype: str | None = None, assignments: list[str] = ()):
    """``(experiment config, model spec, model config)`` of ``<name>:<variant>`` at ``frames`` with compute
    ``dtype`` (default the recipe's ``compute_dtype``) and the ``--set`` assignments (no path checks: a plan
    needs no data and no weights): ``optim.<field>=<value>`` sets the recipe's optimizer, anything else a model
    config field."""
    name, _, variant = spec.partition(":")
    if name == "decoder":  # a bare LLM: --config=decoder:<DecoderConfig preset>, e.g. decoder:llama2_7b
        import ml_collections  # noqa: PLC0415

        from experiments.configs import common  # noqa: PLC0415

        c = common.base("decoder", variant or "llama2_7b")
        c.model_preset, c.model_overrides, c.mesh = variant or "llama2_7b", ml_collections.ConfigDict(), (1, -1, 1)
        c.compute_dtype = "bfloat16"  # as the published recipes
    else:
        path, _, variant = config.config_path(spec)
        c = config.config_from_file(path, variant)
    if frames:
        c.data.num_frames = int(frames)
    if dtype:
        c.compute_dtype = dtype
    if name == "decoder":
        from vjax.models import registry  # noqa: PLC0415

        model = registry.spec("decoder")
        preset = getattr(model.config, c.model_preset, None)
        if not callable(preset):
            raise config.ConfigError("config", f"DecoderConfig has no preset {c.model_preset!r}")
        mcfg = config.with_compute_dtype(preset(), c.compute_dtype)
    else:
        model, mcfg = config.model_config(c)
    optim = [a for a in assignments if a.startswith("optim.")]
    if optim:
        from vjax.train.optim import OptimConfig  # noqa: PLC0415

        tuned = set_fields(config.from_config(OptimConfig, c.optim, "optim"), [a[len("optim."):] for a in optim])
        c.optim.update(dataclasses.asdict(tuned))
    mcfg = set_fields(mcfg, [a for a in assignments if not a.startswith("optim.")])
    return c, model, mcfg


def abstract_batch(module, global_batch: int, tokens: int, loss_positions: int = 0) -> dict:
    """The model's training batch as ``ShapeDtypeStruct``s: its ``example_batch`` (every key the model reads, at
    the config's frames and resolution) with the text keys (every ``[B, L]`` key) stretched to ``tokens``, and
    ``loss_positions [B, P]`` when the recipe runs the LM head on the supervised positions only
    (``data.loss_position_buckets``: ``P`` its largest bucket, at most ``tokens``)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    example = jax.eval_shape(lambda: module.example_batch(1))
    length = example["input_ids"].shape[1]
    if tokens < length:
        raise config.ConfigError("tokens", f"{tokens} tokens cannot hold the model's {length}-token example (its "
                                           f"visual tokens and a few text tokens)")
    out = {}
    for k, v in example.items():
        shape = (global_batch,) + tuple(v.shape[1:])
        if len(shape) >= 2 and v.shape[:2] == (1, length):
            shape = (global_batch, tokens) + tuple(v.shape[2:])
        out[k] = jax.ShapeDtypeStruct(shape, v.dtype)
    if loss_positions:
        out["loss_positions"] = jax.ShapeDtypeStruct((global_batch, min(loss_positions, tokens)), jnp.int32)
    return out


def _per_chip_bytes(tree: Any, shardings: Any) -> int:
    import jax  # noqa: PLC0415

    leaves = jax.tree_util.tree_leaves(tree)
    shards = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: hasattr(x, "shard_shape"))
    return int(sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shards)))


def _with_shardings(tree: Any, shardings: Any) -> Any:
    import jax  # noqa: PLC0415

    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _flops(analysis: Any) -> float:
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def _count(tree: Any) -> int:
    import jax  # noqa: PLC0415

    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def train_setup(c, model, cfg, mesh, global_batch: int, tokens: int):
    """``(trainer, state, batch)``: the recipe's ``Trainer`` for model config ``cfg`` on ``mesh``, its state and
    batch as sharded ``ShapeDtypeStruct``s (nothing traced yet)."""
    import jax  # noqa: PLC0415

    from vjax.train.optim import OptimConfig  # noqa: PLC0415
    from vjax.train.sharding import batch_sharding  # noqa: PLC0415
    from vjax.train.step import Trainer  # noqa: PLC0415

    stages = getattr(model.config, "STAGES", {"full": None})
    trainer = Trainer(model.module(cfg), config.from_config(OptimConfig, c.optim, "optim"), mesh, stages[c.stage])
    state = _with_shardings(trainer.abstract_state, trainer.state_shardings)
    batch = abstract_batch(trainer.module, global_batch, tokens, loss_position_count(c))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, len(v.shape)))
             for k, v in batch.items()}
    return trainer, state, batch


def lower_train(c, model, cfg, mesh, global_batch: int, tokens: int):
    """``(trainer, state, batch, lowered)``: :func:`train_setup` and the train step lowered for its shapes."""
    trainer, state, batch = train_setup(c, model, cfg, mesh, global_batch, tokens)
    with trainer.scope():
        lowered = trainer._train_step.lower(state, batch)
    return trainer, state, batch, lowered


def loss_position_count(c) -> int:
    """The recipe's largest ``data.loss_position_buckets`` (0: the LM head runs on every position)."""
    return max(tuple(c.data.get("loss_position_buckets") or ()), default=0)


def count_model_flops(c, model, cfg, global_batch: int, tokens: int) -> float:
    """XLA's FLOP count of the whole train step of ``cfg`` (pass :func:`reference_config`: no recompute, layers
    unrolled), lowered unsharded for one CPU device and counted on the unoptimised program (no compile)."""
    import jax  # noqa: PLC0415

    from vjax.train.sharding import make_mesh  # noqa: PLC0415

    cpu = make_mesh((1, 1, 1), jax.devices("cpu")[:1])
    return _flops(lower_train(c, model, cfg, cpu, global_batch, tokens)[3].cost_analysis())


def plan_train(c, model, mcfg, devices: list, sl: Slice, *, global_batch: int, tokens: int,
               mesh_shape: tuple[int, int, int], reference_cfg: Any = None) -> dict[str, Any]:
    """Compile the recipe's train step for ``devices`` and return its memory and FLOP figures (see the module
    docstring). ``reference_cfg``: the same model without rematerialisation or scanned layers, lowered (not
    compiled) for the model FLOPs; default ``mcfg`` as it is."""
    from vjax.train.sharding import make_mesh  # noqa: PLC0415

    mesh = make_mesh(mesh_shape, devices)

    def build(cfg, mesh):
        return lower_train(c, model, cfg, mesh, global_batch, tokens)

    _progress(f"train step: tracing for {sl.name}")
    t0 = time.perf_counter()
    trainer, state, batch, lowered = build(mcfg, mesh)
    t_lower = time.perf_counter() - t0
    _progress(f"train step: compiling for {len(devices)} {devices[0].device_kind} chips (minutes at 7 B)")
    compiled, mem, t_compile = compile_for_memory(lowered)
    _progress("train step: counting the model FLOPs (the step unsharded, unrolled, without recompute)")
    model_flops = count_model_flops(c, model, reference_cfg or mcfg, global_batch, tokens)
    compiled_flops = _flops(compiled.cost_analysis()) * len(devices) if compiled is not None else float("nan")
    flops_basis = "whole step"
    if compiled is not None and _has_scan(mcfg):
        # XLA counts a loop body once, so a scanned step's compiled FLOPs are measured on a slice: the same model
        # with 2 blocks per stack, unrolled, same remat policy, tokens and batch; its ratio to its own model
        # FLOPs (the recompute and XLA's rewrites per block) scales the whole step's model FLOPs
        small = config.set_everywhere(slice_config(mcfg, 2), attention_impl="xla")  # attention counted as the reference
        _progress("train step: compiling a 2-block slice for the compiled FLOPs")
        small_compiled = compile_for_memory(build(small, mesh)[3])[0]
        if small_compiled is None:  # e.g. 32k tokens: the dense attention's scores alone overflow the chip
            compiled_flops = float("nan")
            flops_basis = "not measured: the 2-block slice with dense attention does not fit a chip at this length"
        else:
            small_model = count_model_flops(c, model, reference_config(small), global_batch, tokens)
            compiled_flops = _flops(small_compiled.cost_analysis()) * len(devices) / small_model * model_flops
            flops_basis = "2-block unrolled slice, dense attention (XLA counts a scanned loop body once)"
    params_b = _per_chip_bytes(state.params, trainer.state_shardings.params)
    opt_b = _per_chip_bytes(state.opt_state, trainer.state_shardings.opt_state)
    batch_b = _per_chip_bytes(batch, {k: v.sharding for k, v in batch.items()})
    if compiled is None:  # the arguments by their shardings; the donated state comes back in place
        mem.update(arguments=params_b + opt_b + batch_b, outputs=params_b + opt_b, aliased=params_b + opt_b)
    total = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
    trainable = _count(optim_split(trainer, state.params))
    return {
        "step": "train", "parameters": _count(state.params), "trainable_parameters": trainable,
        "per_chip": {"parameters": params_b, "optimizer_state": opt_b, "batch": batch_b,
                     **{k: mem[k] for k in ("arguments", "outputs", "aliased", "temporaries")}, "total": total,
                     # in the host's memory, not HBM (remat_policy="full_offload" / "offload"): not in the total
                     **({"host_temporaries": mem["host_temporaries"]} if mem.get("host_temporaries") else {})},
        "hbm_per_chip": sl.hbm, "fraction_of_hbm": total / sl.hbm, "fits": compiled is not None and total <= sl.hbm,
        "compiler_error": mem.get("error", ""),
        "compiled_flops": compiled_flops, "model_flops": model_flops, "flops_basis": flops_basis,
        "flops_ratio": compiled_flops / model_flops if model_flops else float("nan"),
        "lower_seconds": t_lower, "compile_seconds": t_compile,
    }


def random_batch(module, abstract: Mapping[str, Any], vocab_size: int, seed: int = 0) -> dict:
    """Concrete host arrays of ``abstract``'s shapes (:func:`abstract_batch`) for a timed run: the model's own
    example batch (its visual placeholders, in the right count) with the text stretched by random token ids
    (none of the ids the example uses, so no extra placeholder appears), every appended token attended and
    supervised (the last ``P`` of them when the batch has ``loss_positions [B, P]``; the example's own answer
    when nothing is appended), and uniform random frames in ``[0, 1)`` (zeros can run faster than real data on
    some chips)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    b = next(iter(abstract.values())).shape[0]
    example = jax.tree_util.tree_map(np.asarray, module.example_batch(b))
    length = example["input_ids"].shape[1]
    tokens = abstract["input_ids"].shape[1]
    extra = tokens - length
    used = np.unique(example["input_ids"])
    free = np.setdiff1d(np.arange(3, min(vocab_size, 32000)), used)
    out = {}
    for k, v in example.items():
        if k == "input_ids":
            v = np.concatenate([v, rng.choice(free, (b, extra)).astype(v.dtype)], axis=1)
        elif k == "attention_mask":
            v = np.concatenate([v, np.ones((b, extra), v.dtype)], axis=1)
        elif k == "loss_mask" and extra:
            supervised = min(extra, abstract["loss_positions"].shape[1]) if "loss_positions" in abstract else extra
            tail = np.zeros((b, extra), v.dtype)
            tail[:, extra - supervised:] = 1
            v = np.concatenate([np.zeros_like(v), tail], axis=1)
        elif v.ndim >= 2 and v.shape[1] == length and not np.issubdtype(v.dtype, np.floating):
            # any other text-aligned key (ids or masks; not frames, whose T may equal L): its last value repeated
            v = np.concatenate([v, np.repeat(v[:, -1:], extra, axis=1)], axis=1)
        if np.issubdtype(v.dtype, np.floating):
            v = rng.random(v.shape, dtype=np.float32).astype(v.dtype)
        out[k] = v
    if "loss_positions" in abstract:
        size = abstract["loss_positions"].shape[1]
        supervised = np.flatnonzero(out["loss_mask"][0, 1:])[-size:]  # every row alike
        pos = np.full((b, size), tokens - 1, np.int32)
        pos[:, : len(supervised)] = supervised
        out["loss_positions"] = pos
    for k, a in abstract.items():
        if out[k].shape != tuple(a.shape):
            raise ValueError(f"random batch: {k} has shape {out[k].shape}, the plan's {tuple(a.shape)}")
        out[k] = out[k].astype(a.dtype)
    return out


def measure_train(c, model, mcfg, devices: list, sl: Slice, *, global_batch: int, tokens: int,
                  mesh_shape: tuple[int, int, int], steps: int, peak: float | None,
                  reference_cfg: Any = None) -> dict[str, Any]:
    """Compile the recipe's train step for this host's devices and run it: random weights (the recipe's stage
    and optimizer), :func:`random_batch`, two warm-up steps then ``steps`` timed ones (each waited for).
    Returns the compile time, the median step time and its spread, tokens per second, the first and last loss,
    the compiled memory and the device's peak memory in use, the model FLOPs (:func:`count_model_flops`) and
    the MFU against ``peak`` TFLOP/s per chip."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from vjax.train.sharding import make_mesh  # noqa: PLC0415

    mesh = make_mesh(mesh_shape, devices)
    trainer, _, abstract = train_setup(c, model, mcfg, mesh, global_batch, tokens)
    vocab = getattr(getattr(mcfg, "llm", mcfg), "vocab_size")  # the LLM's (a Q-Former has its own)
    batch = trainer.put_batch(random_batch(trainer.module, abstract, int(vocab)))
    _progress(f"train step: random weights on {len(devices)} {devices[0].device_kind}")
    state = trainer.init_state(0)
    _progress("train step: compiling")
    t0 = time.perf_counter()
    with trainer.scope():
        compiled = trainer._train_step.lower(state, batch).compile()
    t_compile = time.perf_counter() - t0
    m = compiled.memory_analysis()
    times, losses = [], []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(jax.block_until_ready(metrics)["loss"]))
        times.append(time.perf_counter() - t0)
        _progress(f"train step {i + 1}/{2 + steps}: {times[-1]:.3f} s, loss {losses[-1]:.4f}"
                  + (" (warm-up)" if i < 2 else ""))
    timed = np.asarray(times[2:])
    median = float(np.median(timed))
    _progress("train step: counting the model FLOPs (the step unsharded, unrolled, without recompute)")
    model_flops = count_model_flops(c, model, reference_cfg or mcfg, global_batch, tokens)
    stats = devices[0].memory_stats() or {}
    achieved = model_flops / median / len(devices)
    return {
        "step": "train (run)", "parameters": _count(state.params),
        "trainable_parameters": _count(optim_split(trainer, state.params)),
        "per_chip": {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
                     "peak_in_use": int(stats.get("peak_bytes_in_use", 0))},
        "hbm_per_chip": sl.hbm, "compile_seconds": t_compile, "step_seconds": median,
        "step_seconds_min_max": [float(timed.min()), float(timed.max())], "steps": steps,
        "tokens_per_second": global_batch * tokens / median, "losses": losses,
        "model_flops": model_flops, "model_tflops_per_chip": achieved / 1e12,
        "peak_tflops_per_chip": peak, "mfu": achieved / (peak * 1e12) if peak else float("nan"),
    }


def _progress(message: str) -> None:
    print(f"plan: {message}", file=sys.stderr, flush=True)


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def compile_for_memory(lowered) -> tuple[Any, dict[str, Any], float]:
    """``(compiled or None, memory per chip, seconds)``. A program that does not fit the chip's HBM fails to
    compile for a TPU (``RESOURCE_EXHAUSTED``); then the temporaries come from the compiler's message and
    ``error`` holds its first line."""
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory verdict is a result
        msg = str(err)
        if "RESOURCE_EXHAUSTED" not in msg:
            raise
        m = re.search(r"temporaries \((\d+(?:\.\d+)?)([KMGT]?)\)", msg)
        temps = int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0
        return None, {"temporaries": temps, "error": msg.strip().splitlines()[0][:300]}, time.perf_counter() - t0
    m = compiled.memory_analysis()
    mem = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "host_temporaries": getattr(m, "host_temp_size_in_bytes", 0) or 0}
    return compiled, mem, time.perf_counter() - t0


def optim_split(trainer, params):
    """The trainable part of ``params`` (the stage's mask)."""
    from vjax.train import optim  # noqa: PLC0415

    return optim.split_trainable(params, trainer.mask)[0]


def plan_decode(model, mcfg, devices: list, sl: Slice, *, global_batch: int, tokens: int,
                mesh_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Compile one decode step (one new token per row over a ``tokens``-slot KV cache) of the recipe's model."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import flax.linen as nn  # noqa: PLC0415

    from vjax.train.sharding import batch_sharding, logical_shardings, make_mesh  # noqa: PLC0415
    from vjax.train.step import _example_batch  # noqa: PLC0415

    mesh = make_mesh(mesh_shape, devices)
    module = model.module(mcfg)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), _example_batch(module), method="loss"))["params"]
    p_shard = logical_shardings(boxed, mesh)
    params = _with_shardings(nn.meta.unbox(boxed), p_shard)
    b = global_batch
    cache = jax.eval_shape(lambda: module.init_cache(b, tokens))
    cache = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_cache_sharding(mesh, x.ndim)), cache)
    ids = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=batch_sharding(mesh, 2))
    mask = jax.ShapeDtypeStruct((b, tokens), jnp.int32, sharding=batch_sharding(mesh, 2))

    def step(params, ids, mask, cache, index):
        out = module.apply({"params": params}, input_ids=ids, attention_mask=mask,
                           position_ids=jnp.broadcast_to(index, ids.shape), cache=cache, cache_index=index)
        return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

    with jax.set_mesh(mesh):
        lowered = jax.jit(step, donate_argnums=(3,)).lower(params, ids, mask, cache, jax.ShapeDtypeStruct((), jnp.int32))
    _progress("decode step: compiling")
    compiled, mem, seconds = compile_for_memory(lowered)
    params_b = _per_chip_bytes(params, p_shard)
    cache_b = _per_chip_bytes(cache, jax.tree_util.tree_map(lambda x: x.sharding, cache))
    if compiled is None:
        mem.update(arguments=params_b + cache_b, outputs=cache_b, aliased=cache_b)
    # every weight stays in HBM while serving, also those a decode step does not read (jit drops unused arguments:
    # the vision tower), so the total counts them all
    total = params_b + cache_b + mem["outputs"] - mem["aliased"] + mem["temporaries"]
    return {
        "step": "decode",
        "per_chip": {"parameters": params_b, "kv_cache": cache_b, "arguments": mem["arguments"],
                     "temporaries": mem["temporaries"], "total": total},
        "hbm_per_chip": sl.hbm, "fraction_of_hbm": total / sl.hbm, "fits": compiled is not None and total <= sl.hbm,
        "compiler_error": mem.get("error", ""), "compile_seconds": seconds,
    }


def _cache_sharding(mesh, ndim: int):
    """KV-cache arrays are ``[..., B, S, K, Dh]`` (a scanned decoder stacks the layers in front): the batch axis
    is sharded like a batch, the rest replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    lead = ndim - 4
    return NamedSharding(mesh, P(*([None] * lead), ("data", "fsdp"), None, None, None))


def default_tokens(c, model, mcfg) -> int:
    """The recipe's longest training sequence: its longest text bucket plus a full clip's visual tokens (a bare
    LLM: its context, ``max_position_embeddings``)."""
    if model.name == "decoder":
        return int(mcfg.max_position_embeddings)
    spec = config.data_format(model, mcfg, c)
    return int(max(c.data.text_buckets) + spec.tokens_per_clip())


# ----------------------------------------------------------------------------------------- the command
def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.2f} MiB"


def _count_str(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def report(info: Mapping[str, Any]) -> str:
    """The plan as the lines the command prints."""
    lines = [f"{info['config']} on {info['topology']} ({info['chips']} chips, {_gib(info['hbm_per_chip'])} HBM "
             f"each), mesh {tuple(info['mesh'])}, {info['global_batch']} x {info['tokens']} tokens, "
             f"{info['frames']} frames, compute {info['dtype']}"]
    for plan in info["plans"]:
        pc = plan["per_chip"]
        lines.append(f"[{plan['step']} step] per chip:")
        for k, v in pc.items():
            lines.append(f"  {k:<16} {_gib(v)}")
        if plan["step"] == "train (run)":
            mfu = plan["mfu"]
            lines.append(f"  step {plan['step_seconds']:.3f} s (median of {plan['steps']}; "
                         f"{plan['step_seconds_min_max'][0]:.3f}-{plan['step_seconds_min_max'][1]:.3f}), "
                         f"{plan['tokens_per_second']:,.0f} tokens/s, compile {plan['compile_seconds']:.0f} s")
            lines.append(f"  model FLOPs {plan['model_flops']:.3e} per step: {plan['model_tflops_per_chip']:.1f} "
                         f"TFLOP/s per chip, MFU " + (f"{100 * mfu:.1f} % of {plan['peak_tflops_per_chip']:g} TFLOP/s"
                                                      if mfu == mfu else "unknown (no --peak_tflops)"))
            lines.append(f"  loss {plan['losses'][0]:.4f} -> {plan['losses'][-1]:.4f}; parameters "
                         f"{_count_str(plan['parameters'])} ({_count_str(plan['trainable_parameters'])} train)")
            continue
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"  -> {verdict}: {100 * plan['fraction_of_hbm']:.1f} % of HBM")
        if plan.get("compiler_error"):
            lines.append(f"  compiler: {plan['compiler_error']}")
        if plan["step"] == "train":
            lines.append(f"  parameters {_count_str(plan['parameters'])} ({_count_str(plan['trainable_parameters'])} "
                         f"train); FLOPs per step: compiled {plan['compiled_flops']:.3e}, model "
                         f"{plan['model_flops']:.3e} (ratio {plan['flops_ratio']:.2f}, {plan['flops_basis']})")
            lines.append(f"  lower {plan['lower_seconds']:.0f} s, compile {plan['compile_seconds']:.0f} s")
        else:
            lines.append(f"  compile {plan['compile_seconds']:.0f} s")
    if info.get("grad_accum", 1) > 1:
        lines.append(f"the recipe's batch of {info['recipe_batch']} takes {info['grad_accum']} accumulation steps "
                     f"(optim.grad_accum) at this global batch")
    return "\n".join(lines)


def make_plan(spec: str, topology: str, *, global_batch: int | None = None, frames: int | None = None,
              tokens: int | None = None, mesh: tuple[int, int, int] | None = None, dtype: str | None = None,
              assignments: list[str] = (), decode: bool = False, steps: int = 5,
              peak: float | None = None) -> dict[str, Any]:
    """The whole plan as a dict (what ``--out`` writes). ``topology="local"``: this host's devices, the step run
    ``steps`` times (``peak``: TFLOP/s per chip for the MFU; default :func:`peak_tflops` of the device kind).
    Raises ``config.ConfigError`` / ``ValueError`` on bad input (the command turns them into exit 2)."""
    local = topology == "local"
    if local and steps < 1:
        raise config.ConfigError("steps", f"{steps}: at least one timed step")
    sl = local_slice() if local else parse_slice(topology)
    c, model, mcfg = recipe(spec, frames, dtype, list(assignments))
    devices = local_devices() if local else tpu_devices(sl)
    global_batch = global_batch or sl.chips
    tokens = tokens or default_tokens(c, model, mcfg)
    shape = config.check_mesh(tuple(mesh or c.mesh), len(devices))
    if global_batch % (shape[0] * shape[1]):
        raise config.ConfigError("global_batch", f"{global_batch} does not divide over data x fsdp = "
                                                 f"{shape[0] * shape[1]} chips")
    if local:
        peak = peak if peak is not None else peak_tflops(sl.topology)
        plans = [measure_train(c, model, mcfg, devices, sl, global_batch=global_batch, tokens=tokens, mesh_shape=shape,
                               steps=steps, peak=peak, reference_cfg=reference_config(mcfg))]
    else:
        plans = [plan_train(c, model, mcfg, devices, sl, global_batch=global_batch, tokens=tokens, mesh_shape=shape,
                            reference_cfg=reference_config(mcfg))]
    if decode:
        plans.append(plan_decode(model, mcfg, devices, sl, global_batch=global_batch, tokens=tokens, mesh_shape=shape))
    recipe_batch = int(c.data.batch_size)
    return {"config": spec, "topology": f"local: {sl.topology}" if local else sl.name, "chips": sl.chips,
            "hbm_per_chip": sl.hbm, "mesh": list(shape),
            "global_batch": global_batch, "tokens": tokens, "frames": int(c.data.num_frames),
            "dtype": c.compute_dtype,
            "recipe_batch": recipe_batch, "grad_accum": max(1, math.ceil(recipe_batch / global_batch)),
            "plans": plans}


def _has_scan(cfg: Any) -> bool:
    if not dataclasses.is_dataclass(cfg):
        return False
    return any((f.name == "scan_layers" and getattr(cfg, f.name)) or _has_scan(getattr(cfg, f.name))
               for f in dataclasses.fields(cfg))


# the model-config fields whose loops XLA's FLOP count would see once: the layer scan (and its in-place backward)
# and the MLP's sequence pieces; the FLOP counts run on the straight-line form (the same values)
UNLOOPED = dict(scan_layers=False, grads_in_place=False, mlp_chunks=1)


def slice_config(cfg: Any, blocks: int) -> Any:
    """The config with every block stack (``num_layers``, ``depth``) cut to at most ``blocks`` and unrolled."""
    return config.set_everywhere(_cut_stacks(cfg, blocks), **UNLOOPED)


def _cut_stacks(cfg: Any, blocks: int) -> Any:
    if not dataclasses.is_dataclass(cfg):
        return cfg
    kw = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ("num_layers", "depth") and isinstance(v, int):
            kw[f.name] = min(v, blocks)
        elif dataclasses.is_dataclass(v):
            kw[f.name] = _cut_stacks(v, blocks)
    return dataclasses.replace(cfg, **kw)


def reference_config(cfg: Any) -> Any:
    """The config with every ``remat``/``remat_policy`` switched off and layers unrolled (``scan_layers``): the
    model-FLOPs reference, in which XLA counts every layer and no recompute."""
    return config.set_everywhere(cfg, remat=False, remat_policy="none", **UNLOOPED)


def main(argv: list[str]) -> int:
    del argv
    if not _CONFIG.value:
        cli.fail(f"--config=<name>:<variant> is required; known: {config.config_names()}")
    try:
        mesh = tuple(int(x) for x in _MESH.value.split(",")) if _MESH.value else None
    except ValueError:
        cli.fail(f"--mesh={_MESH.value!r}: expected three integers, e.g. 1,-1,1")
    try:
        info = make_plan(_CONFIG.value, _TOPOLOGY.value, global_batch=_BATCH.value, frames=_FRAMES.value,
                         tokens=_TOKENS.value, mesh=mesh, dtype=_DTYPE.value, assignments=_OVERRIDES.value,
                         decode=_DECODE.value, steps=_STEPS.value, peak=_PEAK.value)
    except (config.ConfigError, ValueError, TypeError) as err:
        cli.fail(str(err).splitlines()[0])
    print(report(info), flush=True)
    if _OUT.value:
        with open(_OUT.value, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {_OUT.value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
