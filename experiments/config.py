"""Experiment configuration: the config files, overrides, validation, and the model config and data format
they give (the first half of every command; :mod:`experiments.build` is the second).

An experiment config (``experiments/configs/<model>.py``, ``get_config(variant)``) states what differs from
its model's ``Config.tiny()`` and from the defaults of ``configs/common.py``; everything else comes from the
model's spec (``vjax.models.spec``): the frame sampler, the chat template, the visual placeholders — whose
ids are the tokenizer's ids of the spec's marker tokens (:func:`resolve_markers`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vjax.data import formats, sampling
from vjax.data.formats import FormatSpec
from vjax.eval import TEXT_KEYS, VISUAL_BATCH_KEYS

__all__ = ["ConfigError", "TEXT_KEYS", "VISUAL_BATCH_KEYS", "apply_overrides", "check_lengths", "check_mesh",
           "config_json", "config_names", "config_path", "data_format", "experiment_config", "from_config",
           "define_checkpoint_flags", "load_run", "make_sampler", "model_config", "records", "resolve_markers",
           "set_everywhere", "synthetic_root", "validate", "with_compute_dtype"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_NOT_CONFIGS = {"__init__", "common"}


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key; the commands exit with code 2."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


# ----------------------------------------------------------------------------------------- config files
def config_names() -> list[str]:
    """Experiment config names (files under ``experiments/configs``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in _NOT_CONFIGS)


def config_path(spec: str) -> tuple[str, str, str]:
    """``name[:variant]`` or ``path.py[:variant]`` -> ``(file path, name, variant)``."""
    base, _, variant = spec.partition(":")
    variant = variant or "tiny"
    if base.endswith(".py"):
        if not os.path.isfile(base):
            raise ConfigError("config", f"no config file {base!r}")
        return base, Path(base).stem, variant
    path = CONFIG_DIR / f"{base}.py"
    if base in _NOT_CONFIGS or not path.is_file():
        raise ConfigError("config", f"unknown config {base!r}; known: {config_names()}")
    return str(path), base, variant


def config_from_file(path: str, variant: str):
    """``get_config(variant)`` of the config file ``path`` (no overrides applied)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(f"_vjax_config_{Path(path).stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def experiment_config(name: str, variant: str = "tiny"):
    """``get_config(variant)`` of ``experiments/configs/<name>.py``; an unknown variant is a :class:`ConfigError`."""
    path, _, _ = config_path(f"{name}:{variant}")
    try:
        return config_from_file(path, variant)
    except ValueError as err:  # an unknown variant: the config file names the known ones
        raise ConfigError("config", str(err)) from None



# ------------------------------------------------------------------------------------------ model config
def _coerce(current: Any, value: Any, key: str) -> Any:
    if isinstance(value, list):
        value = tuple(value)
    if current is None or value is None:
        return value
    if isinstance(current, bool) != isinstance(value, bool):
        raise ConfigError(key, f"expects {type(current).__name__}, got {value!r}")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, (int, float, str, tuple)) and not isinstance(value, type(current)):
        raise ConfigError(key, f"expects {type(current).__name__}, got {type(value).__name__} {value!r}")
    return value


def apply_overrides(obj: Any, overrides: Mapping[str, Any], prefix: str) -> Any:
    """Replace (nested) fields of a frozen config dataclass; an unknown field or a wrong type is a
    :class:`ConfigError` naming ``prefix.field``."""
    fields = {f.name for f in dataclasses.fields(obj)}
    kw = {}
    for k, v in overrides.items():
        key = f"{prefix}.{k}"
        if k not in fields:
            raise ConfigError(key, f"{type(obj).__name__} has no field {k!r}; known: {sorted(fields)}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, Mapping):
                raise ConfigError(key, f"expects a mapping of {type(cur).__name__} fields, got {v!r}")
            kw[k] = apply_overrides(cur, v, key)
        else:
            kw[k] = _coerce(cur, v, key)
    try:
        return dataclasses.replace(obj, **kw)
    except (ValueError, TypeError) as err:
        raise ConfigError(prefix, str(err)) from None


def model_config(c) -> tuple[Any, Any]:
    """``(model spec, config)``: the model's preset + ``model_overrides`` + the data's geometry (frames, size)."""
    from vjax.models import registry  # noqa: PLC0415

    try:
        model = registry.spec(c.model)
    except KeyError:
        raise ConfigError("model", f"unknown model {c.model!r}; registered: {registry.names()}") from None
    preset = getattr(model.config, c.model_preset, None)
    if not callable(preset):
        presets = sorted(k for k, v in vars(model.config).items()
                         if isinstance(v, classmethod) and not k.startswith("_"))
        raise ConfigError("model_preset", f"{model.config.__name__} has no preset {c.model_preset!r}; known: {presets}")
    overrides = c.model_overrides.to_dict()
    for k in ("num_frames", "image_size"):
        if k in overrides:
            raise ConfigError(f"model_overrides.{k}", f"set data.{k} instead (it sizes both data and model)")
    cfg = apply_overrides(preset(), overrides, "model_overrides")
    dtype = c.get("compute_dtype") or ""
    if dtype:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("compute_dtype", f"{dtype!r} is not one of float32, bfloat16, float16")
        cfg = with_compute_dtype(cfg, dtype)
    layers = {k: c[k] for k in ("scan_layers", "remat_policy", "attention_impl") if c.get(k) not in (None, "")}
    if layers:
        try:
            cfg = set_everywhere(cfg, **layers)
        except (ValueError, TypeError) as err:
            key = next((k for k in layers if k in str(err)), next(iter(layers)))
            raise ConfigError(key, str(err)) from None
    try:
        cfg = model.with_geometry(cfg, c.data.num_frames, c.data.image_size)
    except (ValueError, TypeError) as err:
        raise ConfigError("data", str(err)) from None
    return model, cfg


def set_everywhere(cfg: Any, **fields: Any) -> Any:
    """Every field named in ``fields`` of a (nested) model config set to its value, wherever it occurs (the LLM, the
    towers, the Q-Formers); ``dtype`` values keep the field's kind (a string, or a NumPy dtype).

    >>> from vjax.models.decoder import DecoderConfig
    >>> set_everywhere(DecoderConfig.tiny(), dtype="bfloat16", scan_layers=True).scan_layers
    True
    """
    import jax.numpy as jnp  # noqa: PLC0415

    if not dataclasses.is_dataclass(cfg):
        return cfg
    kw = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in fields:
            new = fields[f.name]
            kw[f.name] = jnp.dtype(new) if f.name == "dtype" and not isinstance(v, str) else new
        elif dataclasses.is_dataclass(v):
            kw[f.name] = set_everywhere(v, **fields)
    return dataclasses.replace(cfg, **kw)


def with_compute_dtype(cfg: Any, dtype: str) -> Any:
    """Every ``dtype`` field of a (nested) model config set to ``dtype``; every ``param_dtype`` stays: float32
    master weights with low-precision compute (LayerNorm, softmax and the loss stay float32 inside the layers).

    >>> from vjax.models.decoder import DecoderConfig
    >>> with_compute_dtype(DecoderConfig.tiny(), "bfloat16").dtype
    'bfloat16'
    """
    return set_everywhere(cfg, dtype=dtype)


def data_format(model, mcfg: Any, c) -> FormatSpec:
    """The model's :class:`~vjax.data.formats.FormatSpec` under the experiment's data settings."""
    return formats.format_spec(model, mcfg, load_audio=c.data.load_audio, template_variant=c.data.template_variant)


def resolve_markers(model, mcfg: Any, tokenizer: formats.TextTokenizer) -> Any:
    """The model config with each placeholder id set to the tokenizer's id of its marker token (the spec's
    ``marker_tokens``; a tokenizer without the token keeps the config's id); a vocabulary smaller than the
    tokenizer's is a :class:`ConfigError`."""
    vocab = mcfg.llm.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError("model_overrides.llm.vocab_size",
                          f"{vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens ({tokenizer.path})")
    ids = {field: tokenizer.token_id(token) for field, token in model.marker_tokens.items()}
    return dataclasses.replace(mcfg, **{k: v for k, v in ids.items() if v is not None})


def from_config(cls: type, node: Any, key: str, *, strict: bool = True, **explicit: Any) -> Any:
    """A dataclass ``cls`` from a config node's entries of the same names (plus ``explicit`` values). An entry
    that is no field (with ``strict``; off where the node holds other settings too) or a bad value is a
    :class:`ConfigError` naming ``key``."""
    names = {f.name for f in dataclasses.fields(cls)}
    entries = node.to_dict() if hasattr(node, "to_dict") else dict(node)
    unknown = sorted(set(entries) - names)
    if strict and unknown:
        raise ConfigError(key, f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
    values = {k: v for k, v in entries.items() if k in names}
    try:
        return cls(**{**values, **explicit})
    except (TypeError, ValueError) as err:
        raise ConfigError(key, str(err)) from None


# ------------------------------------------------------------------------------------------ validation
def _expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else ""


def _check_positive(c, keys: Sequence[str]) -> None:
    for key in keys:
        node = c
        for part in key.split("."):
            node = node[part]
        if not isinstance(node, int) or isinstance(node, bool) or node < 1:
            raise ConfigError(key, f"must be a positive integer, got {node!r}")


def make_sampler(c, model=None):
    """The frame sampler: ``data.sampler`` (default: the model's, by its spec) with ``data.sampler_kwargs``; the
    clip's frame count ``data.num_frames`` goes to its frame-count argument unless the kwargs set it."""
    try:
        return sampling.config_sampler(c.data.sampler, c.data.num_frames, c.data.sampler_kwargs.to_dict(), model)
    except ValueError as err:
        key = "data.sampler" if "unknown sampler" in str(err) else "data.sampler_kwargs"
        raise ConfigError(key, str(err)) from None


def check_mesh(mesh: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """The concrete ``(data, fsdp, tensor)`` shape, or a :class:`ConfigError` naming ``mesh``."""
    shape = tuple(mesh)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ConfigError("mesh", f"must be 3 integers (data, fsdp, tensor), got {shape!r}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError("mesh", f"{shape}: entries must be positive, with at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ConfigError("mesh", f"{shape} does not divide the {num_devices} available devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != num_devices:
        raise ConfigError("mesh", f"{shape} needs {int(np.prod(shape))} devices, but {num_devices} are available")
    return shape  # type: ignore[return-value]


def validate(c, *, num_devices: int | None = None, num_processes: int = 1) -> dict[str, Any]:
    """Every check that needs no compilation (and no dataset generation). Returns the resolved
    pieces: ``config_class``, ``module_class``, ``model_config``, ``spec``, ``sampler``, ``trainable``,
    ``optim``, ``mesh_shape``.
    """
    from vjax.data.synthetic import SyntheticConfig  # noqa: PLC0415
    from vjax.train.optim import OptimConfig  # noqa: PLC0415

    _check_positive(c, ("total_steps", "log_every", "save_every", "keep_checkpoints", "max_nonfinite_in_a_row",
                        "data.num_frames", "data.image_size", "data.batch_size", "data.turns_per_record",
                        "eval.batch_size", "eval.max_new_tokens"))
    for key in ("eval_every", "eval.records", "data.worker_count", "data.prefetch"):
        v = c[key.split(".")[0]] if "." not in key else c[key.split(".")[0]][key.split(".")[1]]
        if not isinstance(v, int) or v < 0:
            raise ConfigError(key, f"must be an integer >= 0, got {v!r}")
    if not isinstance(c.eval.get("test_records", 0), int) or c.eval.get("test_records", 0) < -1:
        raise ConfigError("eval.test_records", f"must be -1 (all), 0 (none) or a count, got {c.eval.test_records!r}")
    if not isinstance(c.data.cache_mb, (int, float)) or c.data.cache_mb < 0:
        raise ConfigError("data.cache_mb", f"must be a number of MiB >= 0, got {c.data.cache_mb!r}")
    if not isinstance(c.data.max_bad_fraction, (int, float)) or not 0 <= c.data.max_bad_fraction <= 1:
        raise ConfigError("data.max_bad_fraction", f"must be a fraction in [0, 1], got {c.data.max_bad_fraction!r}")
    buckets = tuple(c.data.text_buckets)
    if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
        raise ConfigError("data.text_buckets", f"must be positive token lengths, got {buckets!r}")
    positions = tuple(c.data.get("loss_position_buckets") or ())
    if any(not isinstance(b, int) or b < 1 for b in positions):
        raise ConfigError("data.loss_position_buckets", f"must be positive token counts (or empty), got {positions!r}")
    model, mcfg = model_config(c)
    cfg_cls, module_cls = model.config, model.module
    stages = getattr(cfg_cls, "STAGES", {"full": None})
    if c.stage not in stages:
        raise ConfigError("stage", f"{c.model} has no stage {c.stage!r}; known: {sorted(stages)}")
    optim = from_config(OptimConfig, c.optim, "optim")
    if not optim.learning_rate > 0:
        raise ConfigError("optim.learning_rate", f"must be > 0, got {optim.learning_rate}")
    from_config(SyntheticConfig, c.data.synthetic, "data.synthetic")
    sampler = make_sampler(c, model)
    for key in ("data.train_annotations", "data.val_annotations", "data.video_root", "data.tokenizer",
                "init_params"):
        section, _, leaf = key.rpartition(".")
        value = (c[section] if section else c)[leaf]
        if value and not os.path.exists(_expand(value)):
            raise ConfigError(key, f"path {value!r} does not exist ({_expand(value)})")
    _check_recipe_stages(c, stages, mcfg, model)
    if c.data.train_annotations and not c.data.tokenizer:
        raise ConfigError("data.tokenizer", "real annotations need a tokenizer directory")
    if c.model_preset != "tiny" and not c.data.train_annotations:
        raise ConfigError("data.train_annotations", f"preset {c.model_preset!r} trains on real data: set the path")
    mesh_shape = None
    if num_devices is not None:
        mesh_shape = check_mesh(c.mesh, num_devices)
        rows = mesh_shape[0] * mesh_shape[1]
        if c.data.batch_size % rows or c.data.batch_size % num_processes:
            raise ConfigError("data.batch_size", f"{c.data.batch_size} is not divisible by the mesh's data x fsdp "
                                                 f"= {rows} devices and {num_processes} process(es)")
    if c.data.worker_count and not isinstance(c.data.worker_count, int):
        raise ConfigError("data.worker_count", "must be an integer")
    return {"model": model, "config_class": cfg_cls, "module_class": module_cls, "model_config": mcfg,
            "spec": data_format(model, mcfg, c), "sampler": sampler, "trainable": stages[c.stage], "optim": optim,
            "mesh_shape": mesh_shape}



def _check_recipe_stages(c, stages: dict, mcfg: Any, model: Any) -> None:
    """``data.train_records``, ``stage0.*`` (pretrained parts of model config ``mcfg``, spec ``model``) and
    ``align.*`` (the alignment stage)."""
    from experiments.pretrain import LM_LAYOUTS, TOWERS, Recipe, parse_parts  # noqa: PLC0415

    kind = c.data.get("train_records", "questions")
    if kind not in ("questions", "captions"):
        raise ConfigError("data.train_records", f"must be 'questions' or 'captions', got {kind!r}")
    if kind == "captions" and c.data.train_annotations:
        raise ConfigError("data.train_records", "'captions' are built from the synthetic set's ground truth; "
                                                "real annotations hold their own records")
    questions = c.data.get("train_questions", "answerable")
    if questions not in ("answerable", "all"):
        raise ConfigError("data.train_questions", f"must be 'answerable' or 'all', got {questions!r}")
    if "stage0" in c:
        try:
            parts = parse_parts(c.stage0.parts)
        except ValueError as err:
            raise ConfigError("stage0.parts", str(err)) from None
        if parts and c.data.train_annotations:
            raise ConfigError("stage0.parts", "the pretrained parts are built on the synthetic set; a real-data "
                                              "run starts from init_params")
        if parts and c.init_params:
            raise ConfigError("stage0.parts", "give either pretrained parts or init_params, not both")
        if "vision" in parts and mcfg.vision.tower not in TOWERS:
            raise ConfigError("stage0.parts", f"the tower recipe takes frames as images: {c.model}'s tower "
                                              f"{mcfg.vision.tower!r} is not one of {TOWERS}")
        if "connector" in parts and not model.connector:
            raise ConfigError("stage0.parts", f"{c.model} has no connector to pretrain (only the Q-Former models "
                                              "do: video_llama, ma_lmm)")
        if "audio" in parts and not (model.audio_tower and getattr(mcfg, "audio_branch", True)
                                     and c.data.load_audio):
            raise ConfigError("stage0.parts", f"the audio part pretrains an audio tower on the run's audio: "
                                              f"{c.model} has none" if not model.audio_tower else
                              "the audio part pretrains the audio tower on the run's audio: it needs "
                              "model_overrides.audio_branch=True and data.load_audio=True")
        if c.stage0.get("lm_layout", "question") not in LM_LAYOUTS:
            raise ConfigError("stage0.lm_layout", f"must be one of {LM_LAYOUTS}, got {c.stage0.lm_layout!r}")
        for f in dataclasses.fields(Recipe):
            if f.name == "lm_layout":
                continue
            v = c.stage0.get(f.name, f.default)
            low = 0 if f.name in ("text_weight", "tower_position_weight", "seed") else 1e-12
            if not isinstance(v, (int, float)) or v < low:
                raise ConfigError(f"stage0.{f.name}", f"must be {'>= 0' if low == 0 else '> 0'}, got {v!r}")
    if "align" in c:
        a = c.align
        if not isinstance(a.steps, int) or a.steps < 0:
            raise ConfigError("align.steps", f"must be an integer >= 0, got {a.steps!r}")
        if a.steps and a.stage not in stages:
            raise ConfigError("align.stage", f"{c.model} has no stage {a.stage!r}; known: {sorted(stages)}")
        if a.steps and not a.learning_rate > 0:
            raise ConfigError("align.learning_rate", f"must be > 0, got {a.learning_rate!r}")
        if a.steps and c.data.train_annotations:
            raise ConfigError("align.steps", "the alignment stage trains on the synthetic set's captions; a "
                                             "real-data run is one stage (its variants stage1/stage2)")


# ----------------------------------------------------------------------------------------- data
def synthetic_root(c) -> str:
    """``data.root`` or ``~/.cache/vjax/synthetic/<hash of data.synthetic>`` (one directory per set)."""
    if c.data.root:
        return _expand(c.data.root)
    from vjax.data.synthetic import SyntheticConfig, default_root  # noqa: PLC0415

    return default_root(SyntheticConfig(**c.data.synthetic.to_dict()))


def records(c, split: str, paths=None) -> list[dict]:
    """Records of ``split`` (``train``/``val``) with absolute video paths."""
    from vjax.data import annotations, pipeline  # noqa: PLC0415

    real = c.data.train_annotations if split == "train" else c.data.val_annotations
    if real:
        return annotations.load_conversations(_expand(real), _expand(c.data.video_root) or None)
    if paths is None:
        if c.data.train_annotations:  # real training data without a validation file
            return []
        raise ValueError("the synthetic set's paths are needed")
    if split == "train" and c.data.get("train_records", "questions") == "captions":
        from vjax.data.synthetic import caption_records  # noqa: PLC0415

        return pipeline.resolve_records(caption_records(paths, "train"), paths.root)
    return pipeline.resolve_records(read_jsonl(paths.annotations[split]), paths.root)


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_lengths(c, fmt: formats.VideoQAFormat, recs: Sequence[dict], limit: int = 4000) -> int:
    """Longest text (visual placeholders included) among the first ``limit`` records; an error naming
    ``data.text_buckets`` if it exceeds the largest bucket."""
    t = fmt.spec.num_frames
    longest = 0
    for r in recs[:limit]:
        rec = dict(r, timestamps=np.arange(t, dtype=np.float64))
        ids, _ = fmt.text(rec, t)
        longest = max(longest, len(ids))
    largest = max(c.data.text_buckets) + fmt.spec.tokens_per_clip()
    if longest > largest:
        raise ConfigError("data.text_buckets", f"a record has {longest} tokens (with {fmt.spec.tokens_per_clip()} "
                                               f"visual), more than the largest bucket {largest}")
    return longest



def config_json(c, name: str, mcfg: Any) -> dict[str, Any]:
    """What chat/eval need to rebuild the model: registry name, full model config, the experiment."""
    from vjax.models import registry  # noqa: PLC0415

    return {"format": "vjax-experiment", "model": name, "model_config": registry.config_to_dict(mcfg),
            "experiment": json.loads(c.to_json())}


# ----------------------------------------------------------------------------------------- runs
def define_checkpoint_flags() -> None:
    """``--workdir``, ``--tokenizer``, ``--config``: how chat and eval find a checkpoint (:func:`load_run`)."""
    from absl import flags  # noqa: PLC0415

    flags.DEFINE_string("workdir", None, "training workdir or converted vjax checkpoint directory")
    flags.DEFINE_string("tokenizer", None, "tokenizer directory (default: the checkpoint's)")
    flags.DEFINE_string("config", None, "converted checkpoints: experiment config name[:variant] (or a config "
                        "file path.py[:variant]) for frames, sampler and template (default: <model>:tiny)")
    from vjax.layers.quant import MODES  # noqa: PLC0415

    flags.DEFINE_enum("quantize", "", list(MODES), "int8: weight-only int8 (per-channel scales, "
                      "dequantised in the matmuls; vjax.layers.quant) — about half of bf16's memory")
    flags.DEFINE_integer("step", None, "a training run's checkpoint of this step (default: the newest that "
                         "restores); e.g. to score a run's learning curve")


def load_run_from_flags():
    """:func:`load_run` of the flags :func:`define_checkpoint_flags` defined (``--workdir``, ``--tokenizer``,
    ``--config``, ``--quantize``, ``--step``)."""
    from absl import flags  # noqa: PLC0415

    f = flags.FLAGS
    return load_run(f.workdir, tokenizer=f.tokenizer, config=f.config, quantize=f.quantize, step=f.step)


def load_run(workdir: str | os.PathLike, *, tokenizer: str | None = None, config: str | None = None,
             quantize: str = "", step: int | None = None):
    """:func:`vjax.pretrained.load_run`, a converted checkpoint's data settings taken from the experiment config
    ``config`` = ``name[:variant]`` or ``path.py[:variant]`` (default: the model's ``tiny``); ``quantize="int8"``
    quantises the weights (:func:`vjax.layers.quant.quantize_params`); ``step``: a training run's checkpoint of that
    step instead of the newest. An unknown ``quantize`` raises :class:`ConfigError`."""
    from vjax import pretrained  # noqa: PLC0415
    from vjax.layers.quant import check_mode  # noqa: PLC0415

    try:
        check_mode(quantize)
    except ValueError as err:
        raise ConfigError("quantize", str(err)) from None

    def experiment(name: str):
        base, _, variant = (config or name).partition(":")
        if base.endswith(".py"):  # a config file of the user's (e.g. its own data.root), as train accepts
            path, _, variant = config_path(config)
            try:
                c = config_from_file(path, variant)
            except ValueError as err:  # an unknown variant: the file names the known ones
                raise ConfigError("config", str(err)) from None
            if c.model != name:
                raise ConfigError("config", f"{config!r} configures {c.model!r}, not the checkpoint's model {name!r}")
            return c
        if base != name:
            raise ConfigError("config", f"{config!r} is not a config of the checkpoint's model {name!r}")
        return experiment_config(name, variant or "tiny")

    return pretrained.load_run(workdir, tokenizer=tokenizer, experiment=experiment, quantize=quantize, step=step)
