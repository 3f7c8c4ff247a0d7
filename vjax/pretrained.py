"""``vjax.from_pretrained`` / ``save_pretrained`` / ``export_hf``: the public loading entry points.

Two directory layouts are read:
  * an HF layout — ``config.json`` + safetensors (single or sharded) or ``pytorch_model*.bin`` —
    converted through the layout's mapping table (every missing/unexpected/mis-shaped tensor is
    reported by name, nothing is loaded on a mismatch);
  * a vjax checkpoint — ``vjax_config.json`` (model name + config) and an Orbax ``params`` tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vjax.convert import combine, hf_entry, open_checkpoint, read_hf_config
from vjax.convert.mapping import convert, export, flatten_params
from vjax.convert.io import save_sharded_safetensors
from vjax.layers.scan import stack_like, unstack_all
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
    """``config`` with ``dtype``/``param_dtype`` set on it and on every nested config that has them."""
    if dtype is None:
        return config

    name = jnp.dtype(dtype).name
    fields = {f.name for f in dataclasses.fields(config)}
    kw = {k: name for k in ("dtype", "param_dtype") if k in fields}
    for f in fields:
        v = getattr(config, f)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            kw[f] = _with_dtype(v, dtype)
    return dataclasses.replace(config, **kw)


def _with_scan(config: Any, scan_layers: bool | None) -> Any:
    """``config`` with ``scan_layers`` set on it and on every nested config that has the field."""
    if scan_layers is None:
        return config
    fields = {f.name for f in dataclasses.fields(config)}
    kw: dict[str, Any] = {"scan_layers": scan_layers} if "scan_layers" in fields else {}
    for f in fields:
        v = getattr(config, f)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            kw[f] = _with_scan(v, scan_layers)
    return dataclasses.replace(config, **kw)


def with_layer_layout(params: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """``params`` (either layer layout) in the layout of ``module``: its scanned groups (``scan_layers``) stacked
    ``[N, ...]``, every other group unrolled (``layers_{i}``, ``blocks_{i}``); e.g. a checkpoint saved unrolled
    for a training config that scans."""
    return stack_like(unstack_all(params), abstract_params(module))


def from_pretrained(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    variant: str | None = None,
    dtype: Any = None,
    strict: bool = True,
    progress: bool = False,
    scan_layers: bool | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``(module, params)`` from an HF-layout directory or a vjax checkpoint directory.

    Args:
      path: the directory (or, for a bare weights file, pass its directory with a config.json).
      model: expected vjax model name; an error if the directory holds another one.
      variant: a named config variant (``Config.<variant>()``) to check the weights against instead of
        the directory's config (for checkpoints that ship without a usable config.json).
      dtype: parameter and compute dtype (e.g. ``jnp.bfloat16``); default: as saved / float32.
      strict: refuse partial loads (see :func:`vjax.convert.convert`).
      scan_layers: set ``scan_layers`` on the model's decoder and towers (parameters stacked per group, the
        layout of ``nn.scan``); default: as saved (HF layouts: unrolled).
    Returns:
      the Flax module and its parameters (plain nested dict of arrays); then
      ``module.apply({"params": params}, input_ids=..., attention_mask=...).logits`` is ``[B, L, V]``.
    """
    p = Path(path)
    if (p / VJAX_CONFIG).exists():
        module, params = _load_vjax(p, model=model, dtype=dtype)
        if scan_layers is not None:
            module = module.clone(config=_with_scan(module.config, scan_layers))
            params = with_layer_layout(params, module)
        return module, params
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{p}: neither {VJAX_CONFIG} (vjax checkpoint) nor config.json (HF layout) found")
    hf = read_hf_config(p)  # config.json with the release's processor files (preprocessing settings)
    lay = hf_entry(hf)
    name = lay.model
    if model is not None and model != name:
        raise ValueError(f"{p} holds a {name!r} model, not {model!r}")
    config_cls, module_cls = registry.get(name)
    source = combine([(str(p), "", open_checkpoint(p))], lay)
    shapes = {k: source.shape(k) for k in source.keys()}
    config = getattr(config_cls, variant)() if variant else lay.config_from_hf(hf, shapes)
    config = _with_scan(_with_dtype(config, dtype), scan_layers)
    module = module_cls(config)
    expected = abstract_params(module)
    context = str(p) + (f"; {lay.hint}" if lay.hint else "")
    params = convert(source, lay.table(config, list(shapes)), expected, strict=strict, context=context,
                     progress=progress)
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


def _model_name(module: nn.Module) -> str:
    name = next((n for n in registry.names() if registry.get(n)[1] is type(module)), None)
    if name is None:
        raise ValueError(f"{type(module).__name__} is not a registered vjax model")
    return name


@contextlib.contextmanager
def _numpy_leaves_written_in_place(ocp):
    """Orbax deep-copies NumPy leaves before its asynchronous write (a second copy of the whole tree);
    ``save_pretrained`` waits for the write, so the copy is not needed: write them in place."""
    import logging  # noqa: PLC0415

    previous = ocp.type_handlers.get_type_handler(np.ndarray)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "overriding np.ndarray" warnings
    ocp.type_handlers.register_type_handler(np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False),
                                            override=True)
    try:
        yield
    finally:
        ocp.type_handlers.register_type_handler(np.ndarray, previous, override=True)
        absl_logger.setLevel(level)


def save_pretrained(path: str | os.PathLike, module: nn.Module, params: dict[str, Any], *, name: str | None = None) -> Path:
    """Write a vjax checkpoint directory: ``vjax_config.json`` + Orbax ``params``."""
    p = Path(path).absolute()
    p.mkdir(parents=True, exist_ok=True)
    name = name or _model_name(module)
    import orbax.checkpoint as ocp  # noqa: PLC0415

    # Synchronous, one TensorStore array per leaf (no OCDBT: its batched write buffers the whole tree),
    # NumPy leaves written in place: peak memory stays near the size of ``params`` (tests/convert/streaming.py).
    with _numpy_leaves_written_in_place(ocp), ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)) as ck:
        ck.save(p / "params", args=ocp.args.StandardSave(params), force=True)
    meta = {"format": "vjax", "model": name, "config": registry.config_to_dict(module.config)}
    (p / VJAX_CONFIG).write_text(json.dumps(meta, indent=2))
    return p


def export_hf(path: str | os.PathLike, module: nn.Module, params: dict[str, Any], *,
              max_shard_bytes: int = 2 * 1024**3, dtype: Any = np.float32) -> Path:
    """Export to an HF-layout directory (config.json + safetensors) that transformers loads."""
    from vjax.convert import layout  # noqa: PLC0415

    name = _model_name(module)
    lay = layout(name)
    if lay.to_hf is None:
        raise ValueError(f"{name!r} has no HF layout to export to (export_hf writes: decoder family, qwen2_vl, "
                         f"chat_univi, video_chatgpt)")
    config = module.config
    hf = lay.to_hf(config)
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tensors = ((k, np.asarray(v, dtype)) for k, v in export(params, lay.table(config, None)))
    save_sharded_safetensors(tensors, p, max_shard_bytes=max_shard_bytes)
    hf["torch_dtype"] = np.dtype(dtype).name
    (p / "config.json").write_text(json.dumps(hf, indent=2))
    return p


# ------------------------------------------------------------------------------------------------ runs
class NotACheckpoint(ValueError):
    """A directory that is neither a training run nor a converted vjax checkpoint, or one that cannot be used
    (no checkpoint restores, no tokenizer); the commands print its one line and exit with code 2."""


TOKENIZER_DIR = "tokenizer"  # a copy of the run's tokenizer inside its workdir
_HOW = "pass --workdir of a 'python -m experiments.train' run or the --dst of 'python -m experiments.convert'"


@dataclasses.dataclass
class Run:
    """What chat and eval need from a checkpoint: the model with its parameters, the experiment config
    (frames, sampler, template), the data format, the tokenizer, the frame sampler and the frame preprocessing
    (``frames``: a ``vjax.data.preprocess.FrameProcessor``; the model's release preprocessing)."""

    name: str
    config: Any  # the experiment ConfigDict
    module: Any
    params: Any
    spec: Any  # vjax.data.formats.FormatSpec
    tokenizer: Any  # vjax.data.formats.TextTokenizer
    sampler: Any
    step: int | None
    workdir: str
    frames: Any = None  # vjax.data.preprocess.FrameProcessor; default: the model's, at data.image_size squared
    quantize: str = ""  # "int8": params hold int8 weights with their scales (vjax.layers.quant)
    _sized: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.frames is None:
            from vjax.data.preprocess import FrameProcessor  # noqa: PLC0415

            self.frames = FrameProcessor.for_model(registry.spec(self.name), self.module.config, native=False,
                                                   size=self.config.data.image_size)

    @property
    def model_config(self) -> Any:
        return self.module.config

    def sized(self, num_frames: int, shape: tuple[int, int]) -> tuple[Any, Any]:
        """``(module, FormatSpec)`` for a clip of ``num_frames`` frames of ``shape = (height, width)``: the run's
        own where they match its geometry, else the model resized to them (a native-resolution model:
        ``ModelSpec.with_frame_shape``; the parameters do not change). Cached per geometry, so each grid
        compiles once."""
        from vjax.data import formats  # noqa: PLC0415

        key = (int(num_frames), tuple(int(x) for x in shape))
        if key not in self._sized:
            model = registry.spec(self.name)
            cfg = model.with_frame_shape(self.module.config, *key)
            c = self.config
            self._sized[key] = (type(self.module)(cfg), formats.format_spec(
                model, cfg, load_audio=c.data.load_audio, template_variant=c.data.template_variant))
        return self._sized[key]

    def describe_preprocessing(self) -> str:
        """One line: the frame choice and the frame preprocessing this run uses (chat and eval print it)."""
        s = self.sampler
        name = getattr(getattr(s, "func", s), "__name__", str(s))
        args = ", ".join(f"{k}={v}" for k, v in sorted(getattr(s, "keywords", {}).items()))
        frames = self.frames.describe() if self.frames is not None else "frames: resized on decode"
        return f"preprocessing: sampler {name}({args}); {frames}"

    def describe_weights(self) -> str:
        """One line: the weights' storage and size in memory (chat and eval print it for a quantised run)."""
        from vjax.layers.quant import param_bytes  # noqa: PLC0415

        kind = "int8 per-channel (vjax.layers.quant)" if self.quantize else "as stored"
        return f"weights: {kind}, {param_bytes(self.params) / 2**20:.2f} MiB"


def load_run(workdir: str | os.PathLike, *, tokenizer: str | None = None,
             experiment: Callable[[str], Any] | None = None, quantize: str = "", step: int | None = None) -> Run:
    """Load a training workdir (``config.json`` of ``experiments.train`` + the newest Orbax checkpoint that
    restores; its parameters only) or a converted checkpoint (``vjax_config.json`` of ``experiments.convert``;
    ``experiment(model name)`` gives its data settings — an experiment config whose frames and image size are
    then set from the model, and, where the model's spec stores the release's frame choice with the model
    (``Preprocess.sampler_args``: Qwen2-VL's fps and frame bounds), its sampler too). A converted checkpoint's
    frames are preprocessed at the release's native resolution (``FrameProcessor.is_native``: Qwen2-VL's
    ``smart_resize``); a training run's as it was trained (``S x S``, or its ``data.frame_buckets``).

    The tokenizer: ``tokenizer`` if given, else the copy in ``<workdir>/tokenizer``, the experiment's
    ``data.tokenizer``, or the run's synthetic set's (regenerated if it was deleted). Checkpoints that do not
    restore are named on stderr and passed over. Raises :class:`NotACheckpoint` with a one-line message.

    ``quantize="int8"``: the weights are quantised after loading (:func:`vjax.layers.quant.quantize_params`:
    int8 Dense kernels and embedding tables with per-channel float32 scales, dequantised inside the matmuls).

    ``step``: a training run's checkpoint of that step (e.g. to score a run's learning curve), rather than the
    newest; a step that was not saved, or that does not restore, raises :class:`NotACheckpoint` naming the saved
    ones. A converted checkpoint has no steps: ``step`` must be ``None`` there.
    """
    import ml_collections  # noqa: PLC0415

    from vjax.data import formats, sampling  # noqa: PLC0415
    from vjax.data.preprocess import FrameProcessor  # noqa: PLC0415

    from vjax.layers.quant import check_mode  # noqa: PLC0415

    check_mode(quantize)  # an unknown mode fails before anything loads
    p = Path(workdir).expanduser().absolute()
    if not p.is_dir():
        raise NotACheckpoint(f"{p} is not a directory: {_HOW}")
    meta = {}
    if (p / "config.json").is_file():
        try:
            meta = json.loads((p / "config.json").read_text())
        except ValueError:
            meta = {}
    wanted, step = step, None
    if wanted is not None and (not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 0):
        raise NotACheckpoint(f"step must be a non-negative integer, got {wanted!r}")
    if meta.get("format") == "vjax-experiment":
        name = meta["model"]
        cfg_cls, module_cls = registry.get(name)
        module = module_cls(registry.config_from_dict(cfg_cls, meta["model_config"]))
        c = ml_collections.ConfigDict(meta["experiment"])
        params, step = _run_params(p, name, module, wanted)
    elif (p / VJAX_CONFIG).is_file():
        if wanted is not None:
            raise NotACheckpoint(f"{p} is a converted checkpoint, which has no steps: leave out step ({wanted})")
        try:
            module, params = from_pretrained(p)
        except (ValueError, KeyError) as err:
            raise NotACheckpoint(f"{p}: not a readable vjax checkpoint ({err}): {_HOW}") from None
        name = json.loads((p / VJAX_CONFIG).read_text())["model"]
        if experiment is None:
            raise NotACheckpoint(f"{p} is a converted checkpoint: its data settings need an experiment config")
        c = experiment(name)
        c.data.num_frames = module.config.num_frames
        c.data.image_size = registry.spec(name).frame_size(module.config)
        release = registry.spec(name).preprocess
        if release.sampler_args:  # the release's frame choice, stored with the model (its preprocessor files)
            c.data.sampler = registry.spec(name).sampler
            c.data.sampler_kwargs = ml_collections.ConfigDict(
                {**registry.spec(name).sampler_kwargs,
                 **{arg: getattr(module.config, attr) for arg, attr in release.sampler_args.items()}})
        if not tokenizer and not (p / TOKENIZER_DIR).is_dir() and not c.data.tokenizer:
            raise NotACheckpoint(f"{p} is a converted checkpoint without a tokenizer: pass --tokenizer=DIR (the "
                                 f"LLM's tokenizer directory)")
    else:
        raise NotACheckpoint(f"{p} is not a vjax checkpoint (no config.json of a training run, no {VJAX_CONFIG}): "
                             f"{_HOW}")
    if tokenizer:
        tok_dir = os.path.abspath(os.path.expanduser(tokenizer))
    elif (p / TOKENIZER_DIR).is_dir():
        tok_dir = str(p / TOKENIZER_DIR)
    elif c.data.tokenizer:
        tok_dir = os.path.abspath(os.path.expanduser(c.data.tokenizer))
    else:
        tok_dir = synthetic_paths(c).tokenizer_dir
    if not os.path.isdir(tok_dir):
        raise NotACheckpoint(f"tokenizer directory {tok_dir!r} does not exist")
    spec = formats.format_spec(registry.spec(name), module.config, load_audio=c.data.load_audio,
                               template_variant=c.data.template_variant)
    sampler = sampling.config_sampler(c.data.sampler, c.data.num_frames, c.data.sampler_kwargs.to_dict(),
                                      registry.spec(name))
    # A training run's frames as it was trained (S x S); a converted release's at its native resolution.
    frames = FrameProcessor.for_model(registry.spec(name), module.config, native=step is None,
                                      size=c.data.image_size, buckets=tuple(c.data.get("frame_buckets", ())))
    params = quantize_weights(params, quantize)
    return Run(name=name, config=c, module=module, params=params, spec=spec, tokenizer=formats.TextTokenizer(tok_dir),
               sampler=sampler, step=step, workdir=str(p), frames=frames, quantize=quantize)


def quantize_weights(params: Any, mode: str) -> Any:
    """``params`` quantised by ``mode`` (``"int8"``: :func:`vjax.layers.quant.quantize_params`; ``""``: as they
    are)."""
    from vjax.layers.quant import check_mode, quantize_params  # noqa: PLC0415

    check_mode(mode)
    return quantize_params(params) if mode else params


def _run_params(p: Path, name: str, module: nn.Module, step: int | None) -> tuple[dict[str, Any], int]:
    """The parameters of a training run's checkpoint ``step``, or with ``None`` of the newest that restores (the
    newer ones that do not named on stderr)."""
    import sys  # noqa: PLC0415

    from vjax.train.checkpoint import Checkpoints, NoRestorableCheckpoint  # noqa: PLC0415

    ckpt = Checkpoints(p / "checkpoints", async_save=False)
    try:
        saved = sorted(ckpt.all_steps())  # one listing: the checks below and the steps named in their messages
        if not saved:
            raise NotACheckpoint(f"{p} is a training run without a checkpoint yet: train it (python -m "
                                 f"experiments.train --config={name} --workdir={p}) or wait for its first save")
        if step is not None and step not in saved:
            raise NotACheckpoint(f"{p} has no checkpoint of step {step}; saved steps: {', '.join(map(str, saved))}")
        target = abstract_params(module)
        params, step, passed_over = ckpt.restore_newest(lambda s: ckpt.restore_params(target, step=s),
                                                        steps=None if step is None else [step])
    except NoRestorableCheckpoint as err:
        if step is None:
            raise NotACheckpoint(str(err)) from None
        others = ", ".join(str(s) for s in saved if s != step) or "none"
        raise NotACheckpoint(f"checkpoint step {step} in {ckpt.directory} does not restore ({err.failures[0][1]}); "
                             f"choose another step (saved: {others}) or none for the newest that restores") from None
    finally:
        ckpt.close()
    for bad, reason in passed_over:
        print(f"warning: checkpoint step {bad} in {ckpt.directory} does not restore ({reason}); using step {step}",
              file=sys.stderr, flush=True)
    return params, step


def synthetic_paths(c: Any):
    """The synthetic set of an experiment config (``data.root`` or its cache directory; generated if absent)."""
    from vjax.data.synthetic import SyntheticConfig, default_root, ensure_synthetic_dataset  # noqa: PLC0415

    config = SyntheticConfig(**c.data.synthetic.to_dict())
    root = os.path.abspath(os.path.expanduser(c.data.root)) if c.data.root else default_root(config)
    return ensure_synthetic_dataset(root, config)


__all__ = ["from_pretrained", "save_pretrained", "export_hf", "abstract_params", "init_params", "flatten_params",
           "load_run", "quantize_weights", "Run", "NotACheckpoint"]
