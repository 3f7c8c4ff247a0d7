"""``vjax.from_pretrained`` / ``save_pretrained`` / ``export_hf``: the public loading entry points.

Two directory layouts are read:
  * an HF layout — ``config.json`` + safetensors (single or sharded) or ``pytorch_model*.bin`` —
    converted through the layout's mapping table (every missing/unexpected/mis-shaped tensor is
    reported by name, nothing is loaded on a mismatch);
  * a vjax checkpoint — ``vjax_config.json`` (model name + config) and an Orbax ``params`` tree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vjax.convert import hf_entry, open_checkpoint
from vjax.convert.mapping import convert, export, flatten_params
from vjax.convert.io import save_sharded_safetensors
from vjax.models import registry

VJAX_CONFIG = "vjax_config.json"


def init_example_inputs(module: nn.Module) -> dict[str, Any]:
    """Smallest inputs that trace every parameter of ``module`` (models may override)."""
    if hasattr(module, "example_inputs"):
        return module.example_inputs()
    return {"input_ids": jnp.zeros((1, 1), jnp.int32)}


def abstract_params(module: nn.Module) -> dict[str, Any]:
    """``jax.eval_shape`` of ``module.init``: the parameter tree of ``ShapeDtypeStruct`` s, unboxed."""
    inputs = init_example_inputs(module)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))
    return nn.meta.unbox(shapes)["params"]


def init_params(module: nn.Module, rng: jax.Array | int = 0) -> dict[str, Any]:
    """Randomly initialised parameters as a plain nested dict (logical-axis boxes removed)."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    inputs = init_example_inputs(module)
    arrays = {k: v for k, v in inputs.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in inputs.items() if k not in arrays}
    init = jax.jit(lambda r, a: module.init(r, **a, **static))  # one compile instead of op-by-op dispatch
    return nn.meta.unbox(init(rng, arrays))["params"]


def _with_dtype(config: Any, dtype: Any) -> Any:
    if dtype is None:
        return config
    name = jnp.dtype(dtype).name
    return config.replace(dtype=name, param_dtype=name)


def from_pretrained(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    variant: str | None = None,
    dtype: Any = None,
    strict: bool = True,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``(module, params)`` from an HF-layout directory or a vjax checkpoint directory.

    Args:
      path: the directory (or, for a bare weights file, pass its directory with a config.json).
      model: expected vjax model name; an error if the directory holds another one.
      variant: a named config variant (``Config.<variant>()``) to check the weights against instead of
        the directory's config (for checkpoints that ship without a usable config.json).
      dtype: parameter and compute dtype (e.g. ``jnp.bfloat16``); default: as saved / float32.
      strict: refuse partial loads (see :func:`vjax.convert.convert`).
    Returns:
      the Flax module and its parameters (plain nested dict of arrays); then
      ``module.apply({"params": params}, input_ids=..., attention_mask=...).logits`` is ``[B, L, V]``.
    """
    p = Path(path)
    if (p / VJAX_CONFIG).exists():
        return _load_vjax(p, model=model, dtype=dtype)
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{p}: neither {VJAX_CONFIG} (vjax checkpoint) nor config.json (HF layout) found")
    hf = json.loads(cfg_file.read_text())
    name, from_hf, table_fn = hf_entry(hf)
    if model is not None and model != name:
        raise ValueError(f"{p} holds a {name!r} model, not {model!r}")
    config_cls, module_cls = registry.get(name)
    config = getattr(config_cls, variant)() if variant else from_hf(hf)
    config = _with_dtype(config, dtype)
    module = module_cls(config)
    expected = abstract_params(module)
    source = open_checkpoint(p)
    params = convert(source, table_fn(config), expected, strict=strict, context=str(p), progress=progress)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def _load_vjax(p: Path, *, model: str | None, dtype: Any) -> tuple[nn.Module, dict[str, Any]]:
    import orbax.checkpoint as ocp  # noqa: PLC0415

    meta = json.loads((p / VJAX_CONFIG).read_text())
    if meta.get("format") != "vjax":
        raise ValueError(f"{p / VJAX_CONFIG} is not a vjax config (format={meta.get('format')!r})")
    name = meta["model"]
    if model is not None and model != name:
        raise ValueError(f"{p} holds a {name!r} model, not {model!r}")
    config_cls, module_cls = registry.get(name)
    config = registry.config_from_dict(config_cls, meta["config"])
    module = module_cls(config)
    target = abstract_params(module)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore((p / "params").absolute(), target)
    if dtype is not None:
        module = module_cls(_with_dtype(config, dtype))
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    return module, params


def save_pretrained(path: str | os.PathLike, module: nn.Module, params: dict[str, Any], *, name: str | None = None) -> Path:
    """Write a vjax checkpoint directory: ``vjax_config.json`` + Orbax ``params``."""
    p = Path(path).absolute()
    p.mkdir(parents=True, exist_ok=True)
    name = name or next((n for n in registry.names() if registry.get(n)[1] is type(module)), None)
    if name is None:
        raise ValueError(f"{type(module).__name__} is not a registered vjax model")
    import orbax.checkpoint as ocp  # noqa: PLC0415

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(p / "params", params, force=True)
        ckptr.wait_until_finished()
    meta = {"format": "vjax", "model": name, "config": registry.config_to_dict(module.config)}
    (p / VJAX_CONFIG).write_text(json.dumps(meta, indent=2))
    return p


def export_hf(path: str | os.PathLike, module: nn.Module, params: dict[str, Any], *,
              max_shard_bytes: int = 2 * 1024**3, dtype: Any = np.float32) -> Path:
    """Export to an HF-layout directory (config.json + safetensors) that transformers loads."""
    from vjax.convert import HF_ARCHITECTURES  # noqa: PLC0415

    config = module.config
    hf = config.to_hf()
    _, _, table_fn = HF_ARCHITECTURES[hf["architectures"][0]]()
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tensors = ((k, np.asarray(v, dtype)) for k, v in export(params, table_fn(config)))
    save_sharded_safetensors(tensors, p, max_shard_bytes=max_shard_bytes)
    hf["torch_dtype"] = np.dtype(dtype).name
    (p / "config.json").write_text(json.dumps(hf, indent=2))
    return p


__all__ = ["from_pretrained", "save_pretrained", "export_hf", "abstract_params", "init_params", "flatten_params"]
