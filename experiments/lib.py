"""What the experiment commands share: config resolution and validation, the model and its data
format, the record lists, and the generation-based evaluator.

Dependency direction: ``experiments`` imports ``vjax.train``, ``vjax.data``, ``vjax.generate`` and the
model registry. The model-specific part of batch formatting is :func:`format_spec` here (model
config -> a plain :class:`~vjax.data.formats.FormatSpec`); the formatting itself lives in
``vjax/data/formats.py``, which imports no model, so chat/eval and users reuse it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vjax.data import formats, sampling
from vjax.data.formats import FormatSpec

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_NOT_CONFIGS = {"__init__", "common"}
VISUAL_BATCH_KEYS = ("frames", "frame_mask", "audio", "audio_mask", "qformer_input_ids", "qformer_attention_mask")
TEXT_KEYS = ("input_ids", "attention_mask", "loss_mask")


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


def model_config(c) -> tuple[type, type, Any]:
    """``(ConfigClass, ModuleClass, config)``: preset + overrides + the data geometry (frames, size)."""
    from vjax.models import registry  # noqa: PLC0415

    try:
        cfg_cls, module_cls = registry.get(c.model)
    except KeyError:
        raise ConfigError("model", f"unknown model {c.model!r}; registered: {registry.names()}") from None
    preset = getattr(cfg_cls, c.model_preset, None)
    if not callable(preset):
        presets = sorted(k for k, v in vars(cfg_cls).items() if isinstance(v, classmethod) and not k.startswith("_"))
        raise ConfigError("model_preset", f"{cfg_cls.__name__} has no preset {c.model_preset!r}; known: {presets}")
    overrides = c.model_overrides.to_dict()
    for k in ("num_frames", "image_size"):
        if k in overrides:
            raise ConfigError(f"model_overrides.{k}", f"set data.{k} instead (it sizes both data and model)")
    cfg = apply_overrides(preset(), overrides, "model_overrides")
    geometry: dict[str, Any] = {}
    if "num_frames" in {f.name for f in dataclasses.fields(cfg)}:
        geometry["num_frames"] = c.data.num_frames
    if "image_size" in {f.name for f in dataclasses.fields(cfg)}:
        geometry["image_size"] = c.data.image_size
    elif hasattr(cfg, "vision"):
        geometry["vision"] = {"image_size": c.data.image_size}
    cfg = apply_overrides(cfg, geometry, "data")
    return cfg_cls, module_cls, cfg


def format_spec(name: str, m: Any, load_audio: bool, template_variant: str = "") -> FormatSpec:
    """How the model's template and visual placeholders look, from its config (no module built).
    ``template_variant``: '' = the template's default (Video-ChatGPT: its training system prompt)."""
    t = m.num_frames
    variant = template_variant or None
    if name in ("video_chatgpt", "chat_univi", "ma_lmm"):
        variant = variant or ("train" if name == "video_chatgpt" else None)
        count = m.num_visual_tokens
        if hasattr(m, "visual_tokens_for"):  # the token count depends on the clip's real frames
            count = tuple(m.visual_tokens_for(k) for k in range(t + 1))
        return FormatSpec(name, (("video", m.placeholder_id, count),), t, template_variant=variant,
                          qformer_text_len=m.qformer_text_len if name == "ma_lmm" else 0)
    if name == "qwen2_vl":
        return FormatSpec(name, (("video", m.video_token_id, m.num_visual_tokens),), t, template_variant=variant,
                          stop_strings=("<|im_end|>",))
    if name == "video_llama":
        audio = load_audio and m.audio_branch
        visual = (("video", m.placeholder_id, m.num_video_tokens),)
        if audio:
            visual += (("audio", m.placeholder_id, m.num_audio_tokens),)
        return FormatSpec(name, visual, t, template_variant=variant, stop_strings=("###", "</s>"),
                          audio_clips=m.num_audio_clips if audio else 0, audio_mel_bins=m.audio.image_size,
                          audio_frames=m.audio.image_width or m.audio.image_size)
    if name == "minigpt4_video":
        return FormatSpec(name, (("frame", m.placeholder_id, m.tokens_per_frame),), t, template_variant=variant,
                          subtitles=True, subtitle_words=800 if m.llm.arch == "mistral" else 400)
    if name == "cogvlm2_video":
        return FormatSpec(name, (("frame", m.placeholder_id, m.tokens_per_frame),), t, template_variant=variant)
    raise ConfigError("model", f"no data format for model {name!r}")


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


def make_sampler(c):
    """``functools.partial`` of the named :mod:`vjax.data.sampling` function with its kwargs."""
    fn = getattr(sampling, c.data.sampler, None)
    if not callable(fn) or c.data.sampler.startswith("_") or inspect.isclass(fn):
        names = sorted(n for n, f in vars(sampling).items() if inspect.isfunction(f) and not n.startswith("_")
                       and "num_frames" in inspect.signature(f).parameters)
        raise ConfigError("data.sampler", f"unknown sampler {c.data.sampler!r}; known: {names}")
    params = inspect.signature(fn).parameters
    kwargs = c.data.sampler_kwargs.to_dict()
    for k in kwargs:
        if k not in params or k in ("num_frames", "fps"):
            raise ConfigError(f"data.sampler_kwargs.{k}",
                              f"{c.data.sampler}() has no parameter {k!r}; known: {[p for p in params][2:]}")
    return functools.partial(fn, **kwargs)


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
    for key in ("eval_every", "eval.records", "data.worker_count"):
        v = c[key.split(".")[0]] if "." not in key else c[key.split(".")[0]][key.split(".")[1]]
        if not isinstance(v, int) or v < 0:
            raise ConfigError(key, f"must be an integer >= 0, got {v!r}")
    if not isinstance(c.data.cache_mb, (int, float)) or c.data.cache_mb < 0:
        raise ConfigError("data.cache_mb", f"must be a number of MiB >= 0, got {c.data.cache_mb!r}")
    if not isinstance(c.data.max_bad_fraction, (int, float)) or not 0 <= c.data.max_bad_fraction <= 1:
        raise ConfigError("data.max_bad_fraction", f"must be a fraction in [0, 1], got {c.data.max_bad_fraction!r}")
    buckets = tuple(c.data.text_buckets)
    if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
        raise ConfigError("data.text_buckets", f"must be positive token lengths, got {buckets!r}")
    cfg_cls, module_cls, mcfg = model_config(c)
    stages = getattr(cfg_cls, "STAGES", {"full": None})
    if c.stage not in stages:
        raise ConfigError("stage", f"{c.model} has no stage {c.stage!r}; known: {sorted(stages)}")
    try:
        optim = OptimConfig(**c.optim.to_dict())
    except TypeError as err:
        raise ConfigError("optim", str(err)) from None
    if not optim.learning_rate > 0:
        raise ConfigError("optim.learning_rate", f"must be > 0, got {optim.learning_rate}")
    try:
        SyntheticConfig(**c.data.synthetic.to_dict())
    except (TypeError, ValueError) as err:
        raise ConfigError("data.synthetic", str(err)) from None
    sampler = make_sampler(c)
    for key in ("data.train_annotations", "data.val_annotations", "data.video_root", "data.tokenizer",
                "init_params"):
        section, _, leaf = key.rpartition(".")
        value = (c[section] if section else c)[leaf]
        if value and not os.path.exists(_expand(value)):
            raise ConfigError(key, f"path {value!r} does not exist ({_expand(value)})")
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
    return {"config_class": cfg_cls, "module_class": module_cls, "model_config": mcfg,
            "spec": format_spec(c.model, mcfg, c.data.load_audio, c.data.template_variant), "sampler": sampler,
            "trainable": stages[c.stage], "optim": optim, "mesh_shape": mesh_shape}


# ----------------------------------------------------------------------------------------- data
def synthetic_root(c) -> str:
    """``data.root`` or ``~/.cache/vjax/synthetic/<hash of data.synthetic>`` (one directory per set)."""
    if c.data.root:
        return _expand(c.data.root)
    from vjax.data.synthetic import SyntheticConfig  # noqa: PLC0415

    h = SyntheticConfig(**c.data.synthetic.to_dict()).params_hash()[:12]
    return os.path.join(os.path.expanduser("~/.cache/vjax/synthetic"), h)


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
    with open(paths.annotations[split], encoding="utf-8") as f:
        return pipeline.resolve_records([json.loads(line) for line in f if line.strip()], paths.root)


def check_tokenizer(c, tokenizer: formats.TextTokenizer, mcfg: Any) -> None:
    """The LLM vocabulary holds the tokenizer's; placeholder fields equal their marker tokens' ids."""
    vocab = mcfg.llm.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError("model_overrides.llm.vocab_size",
                          f"{vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens ({tokenizer.path})")
    for field, token in c.placeholder_tokens.to_dict().items():
        want = tokenizer.token_id(token)
        have = getattr(mcfg, field, None)
        if want is None:
            raise ConfigError(f"placeholder_tokens.{field}", f"token {token!r} is not in the tokenizer {tokenizer.path}")
        if have != want:
            raise ConfigError(f"model_overrides.{field}", f"is {have}, but {token!r} has id {want} in the tokenizer")


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


# ----------------------------------------------------------------------------------------- evaluation
def stop_token_ids(tokenizer: formats.TextTokenizer, spec: FormatSpec) -> tuple[int, ...]:
    """EOS and every stop string that is a single token of ``tokenizer``."""
    ids = (tokenizer.eos_token_id, *(tokenizer.token_id(s) for s in spec.stop_strings))
    return tuple(sorted({i for i in ids if i is not None}))


def stop_strings(tokenizer: formats.TextTokenizer, spec: FormatSpec) -> tuple[str, ...]:
    """Where a decoded answer is cut: the template's stop strings and the EOS token's text."""
    eos = (tokenizer.decode([tokenizer.eos_token_id]),) if tokenizer.eos_token_id is not None else ()
    return tuple(spec.stop_strings) + eos


def answer_prompts(module, params, prompts: Sequence[Mapping[str, np.ndarray]], tokenizer: formats.TextTokenizer,
                   spec: FormatSpec, *, batch_size: int, max_new_tokens: int, length: int | None = None,
                   progress=None) -> list[str]:
    """Greedy answers (``vjax.generate``, KV cache) to prompt-only elements of :class:`VideoQAFormat`,
    ``batch_size`` at a time, left-padded to ``length`` (default: the longest, rounded up to 16) so
    every batch has one compiled shape; the last batch is filled by repeating its last prompt."""
    from vjax.generate import generate  # noqa: PLC0415

    if length is None:
        length = -(-max((len(p["input_ids"]) for p in prompts), default=1) // 16) * 16
    eos, stops = stop_token_ids(tokenizer, spec), stop_strings(tokenizer, spec)
    out: list[str] = []
    n = len(prompts)
    for s in range(0, n, batch_size):
        chunk = list(prompts[s: s + batch_size])
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        b = formats.left_pad(chunk, length, tokenizer.pad_token_id)
        visual = {k: b[k] for k in VISUAL_BATCH_KEYS if k in b}
        res = generate(module, params, b["input_ids"], b["attention_mask"], prefill_inputs=visual,
                       max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id)
        tokens, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
        for row in range(min(batch_size, n - s)):
            out.append(formats.cut_at_stop(tokenizer.decode(tokens[row, : lengths[row]]), stops))
        if progress is not None:
            progress(min(batch_size, n - s))
    return out


class Evaluator:
    """Generation-based validation: the first ``eval.records`` validation records (a fixed seeded
    sample), decoded once (:class:`~vjax.data.validate.TooManyBadRecords` when all of them, or more than
    ``data.max_bad_fraction``, are unreadable); at each call greedy answers with the KV cache
    (``vjax.generate``) scored per ``question_type`` (:func:`vjax.data.formats.score_answer`), plus the
    teacher-forced loss."""

    def __init__(self, c, module, spec: FormatSpec, tokenizer: formats.TextTokenizer, recs: Sequence[dict],
                 sampler, trainer=None):
        from vjax.data.pipeline import DropSkipped, LoadAndFormat  # noqa: PLC0415

        self.module, self.spec, self.tokenizer, self.trainer = module, spec, tokenizer, trainer
        self.max_new_tokens = c.eval.max_new_tokens
        self.batch_size = c.eval.batch_size
        order = np.random.default_rng(0).permutation(len(recs))[: c.eval.records]
        size = (c.data.image_size, c.data.image_size)
        prompt = LoadAndFormat(formats.VideoQAFormat(spec, tokenizer, prompt_only=True), sampler, size,
                               c.data.load_audio, max_bad_fraction=c.data.max_bad_fraction)
        full = LoadAndFormat(formats.VideoQAFormat(spec, tokenizer), sampler, size, c.data.load_audio)
        keep = DropSkipped()
        self.records, self.prompts, self.full = [], [], []
        for i in order:
            rng = np.random.default_rng(int(i))
            p = prompt.random_map(recs[int(i)], rng)
            if keep.filter(p):
                self.records.append(recs[int(i)])
                self.prompts.append(p)
                self.full.append(full.random_map(recs[int(i)], np.random.default_rng(int(i))))
        if len(order) and not self.records:
            from vjax.data.validate import TooManyBadRecords  # noqa: PLC0415

            raise TooManyBadRecords(f"nothing to evaluate: {prompt.skips.summary()}")
        prompt.skips.check()  # whatever the number of records (the per-record check waits for 20)
        longest = max((len(p["input_ids"]) for p in self.prompts), default=1)
        self.length = -(-longest // 16) * 16
        self.predictions: list[str] = []
        self.correct: list[bool] = []
        self.loss_batch = c.data.batch_size // max(1, _process_count())
        self.loss_length = max(c.data.text_buckets) + spec.tokens_per_clip()

    def __len__(self) -> int:
        return len(self.records)

    def generate(self, params) -> list[str]:
        return answer_prompts(self.module, params, self.prompts, self.tokenizer, self.spec,
                              batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, length=self.length)

    def loss(self, params) -> float | None:
        """Teacher-forced loss over full batches of the validation records (padded to the largest bucket)."""
        if self.trainer is None or len(self.full) < self.loss_batch:
            return None
        losses = []
        for s in range(0, len(self.full) - self.loss_batch + 1, self.loss_batch):
            chunk = self.full[s: s + self.loss_batch]
            batch = {}
            for k in chunk[0]:
                arrs = [np.asarray(e[k]) for e in chunk]
                if k in TEXT_KEYS:
                    arrs = [np.pad(a, (0, self.loss_length - a.shape[0])) for a in arrs]
                batch[k] = np.stack(arrs)
            losses.append(float(self.trainer.eval_step(params, batch)["loss"]))
        return float(np.mean(losses))

    def __call__(self, state) -> dict[str, float]:
        self.predictions = self.generate(state.params)
        self.correct = [formats.score_answer(p, r) for p, r in zip(self.predictions, self.records)]
        metrics = {f"accuracy/{k}": v for k, (v, _) in self.by_type().items()}
        loss = self.loss(state.params)
        if loss is not None:
            metrics["loss"] = loss
        return metrics

    def by_type(self) -> dict[str, tuple[float, int]]:
        """``type -> (accuracy, count)`` of the last call, with ``all``, ``multiple_choice``, ``open``."""
        groups: dict[str, list[bool]] = collections.defaultdict(list)
        for r, ok in zip(self.records, self.correct):
            groups[str(r.get("question_type", "unknown"))].append(ok)
            groups["multiple_choice" if r.get("choices") else "open"].append(ok)
            groups["all"].append(ok)
        return {k: (float(np.mean(v)), len(v)) for k, v in sorted(groups.items())}

    def table(self) -> str:
        rows = self.by_type()
        special = ("all", "multiple_choice", "open")
        lines = [f"{'question type':<18} {'accuracy':>8} {'n':>4}"]
        for k in [k for k in rows if k not in special] + [k for k in special if k in rows]:
            acc, n = rows[k]
            lines.append(f"{k:<18} {acc:>8.3f} {n:>4}")
        return "\n".join(lines)


def _process_count() -> int:
    import jax  # noqa: PLC0415

    return jax.process_count()


def config_json(c, name: str, mcfg: Any) -> dict[str, Any]:
    """What chat/eval need to rebuild the model: registry name, full model config, the experiment."""
    from vjax.models import registry  # noqa: PLC0415

    return {"format": "vjax-experiment", "model": name, "model_config": registry.config_to_dict(mcfg),
            "experiment": json.loads(c.to_json())}


# ----------------------------------------------------------------------------------------- commands
def fail(message: str) -> None:
    """A command's one-line error: ``error: <message>`` on stderr, exit code 2 (:mod:`experiments.cli`)."""
    from experiments import cli  # noqa: PLC0415

    cli.fail(message)


def define_checkpoint_flags() -> None:
    """``--workdir``, ``--tokenizer``, ``--config``: how chat and eval find a checkpoint (:func:`load_run`)."""
    from absl import flags  # noqa: PLC0415

    flags.DEFINE_string("workdir", None, "training workdir or converted vjax checkpoint directory")
    flags.DEFINE_string("tokenizer", None, "tokenizer directory (default: the checkpoint's)")
    flags.DEFINE_string("config", None, "converted checkpoints: experiment config name[:variant] for frames, "
                        "sampler and template (default: <model>:tiny)")


# ----------------------------------------------------------------------------------------- loading a run
class NotACheckpoint(ValueError):
    """``--workdir`` is neither a training run nor a converted vjax checkpoint (commands exit with code 2)."""


TOKENIZER_DIR = "tokenizer"  # a copy of the run's tokenizer inside its workdir


@dataclasses.dataclass
class Run:
    """What chat and eval need from a checkpoint: the model with its parameters, the experiment config
    (frames, sampler, template), the data format and the tokenizer."""

    name: str
    config: Any  # the experiment ConfigDict
    module: Any
    params: Any
    spec: FormatSpec
    tokenizer: formats.TextTokenizer
    sampler: Any
    step: int | None
    workdir: str

    @property
    def model_config(self) -> Any:
        return self.module.config


def config_from_file(path: str, variant: str):
    """``get_config(variant)`` of the config file ``path`` (no overrides applied)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(f"_vjax_config_{Path(path).stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def _experiment_config(name: str, variant: str):
    path, _, _ = config_path(f"{name}:{variant}")
    try:
        return config_from_file(path, variant)
    except ValueError as err:  # an unknown variant: the config file names the known ones
        raise ConfigError("config", str(err)) from None


def _synthetic_paths(c):
    from vjax.data.synthetic import SyntheticConfig, ensure_synthetic_dataset  # noqa: PLC0415

    return ensure_synthetic_dataset(synthetic_root(c), SyntheticConfig(**c.data.synthetic.to_dict()))


def load_run(workdir: str | os.PathLike, *, tokenizer: str | None = None, config: str | None = None) -> Run:
    """Load a training workdir (``config.json`` of ``experiments.train`` + the latest Orbax checkpoint's
    parameters, no optimizer state) or a converted checkpoint (``vjax_config.json`` of
    ``experiments.convert``; its data settings come from ``config`` = ``name[:variant]`` of
    ``experiments/configs``, default the model's ``tiny``, with frames and image size from the model).

    The tokenizer: ``tokenizer`` if given, else the copy in ``<workdir>/tokenizer``, the config's
    ``data.tokenizer``, or the run's synthetic set's (regenerated if it was deleted).
    Raises :class:`NotACheckpoint` or :class:`ConfigError` with a one-line message.
    """
    import ml_collections  # noqa: PLC0415

    from vjax.models import registry  # noqa: PLC0415
    from vjax.pretrained import VJAX_CONFIG, abstract_params  # noqa: PLC0415

    p = Path(workdir).expanduser().absolute()
    how = ("pass --workdir of a 'python -m experiments.train' run or the --dst of 'python -m experiments.convert'")
    if not p.is_dir():
        raise NotACheckpoint(f"{p} is not a directory: {how}")
    meta = {}
    if (p / "config.json").is_file():
        try:
            meta = json.loads((p / "config.json").read_text())
        except ValueError:
            meta = {}
    step = None
    if meta.get("format") == "vjax-experiment":
        name = meta["model"]
        cfg_cls, module_cls = registry.get(name)
        module = module_cls(registry.config_from_dict(cfg_cls, meta["model_config"]))
        c = ml_collections.ConfigDict(meta["experiment"])
        from vjax.train.checkpoint import Checkpoints, NoRestorableCheckpoint  # noqa: PLC0415

        ckpt = Checkpoints(p / "checkpoints", async_save=False)
        if ckpt.latest_step() is None:
            raise NotACheckpoint(f"{p} is a training run without a checkpoint yet: train it (python -m "
                                 f"experiments.train --config={name} --workdir={p}) or wait for its first save")
        target = abstract_params(module)
        try:  # the newest checkpoint that restores; the others are named, left as they are
            params, step, passed_over = ckpt.restore_newest(lambda s: ckpt.restore_params(target, step=s))
        except NoRestorableCheckpoint as err:
            raise NotACheckpoint(str(err)) from None
        finally:
            ckpt.close()
        for bad, reason in passed_over:
            print(f"warning: checkpoint step {bad} in {ckpt.directory} does not restore ({reason}); using step "
                  f"{step}", file=sys.stderr, flush=True)
    elif (p / VJAX_CONFIG).is_file():
        import vjax  # noqa: PLC0415

        try:
            module, params = vjax.from_pretrained(p)
        except (ValueError, KeyError) as err:
            raise NotACheckpoint(f"{p}: not a readable vjax checkpoint ({err}): {how}") from None
        name = json.loads((p / VJAX_CONFIG).read_text())["model"]
        base, _, variant = (config or name).partition(":")
        if base != name:
            raise ConfigError("config", f"{config!r} is not a config of the checkpoint's model {name!r}")
        c = _experiment_config(name, variant or "tiny")
        mcfg = module.config
        if hasattr(mcfg, "num_frames"):
            c.data.num_frames = mcfg.num_frames
        size = getattr(mcfg, "image_size", None) or getattr(getattr(mcfg, "vision", None), "image_size", None)
        if size:
            c.data.image_size = size
        if not tokenizer and not (p / TOKENIZER_DIR).is_dir() and not c.data.tokenizer:
            raise ConfigError("tokenizer", f"{p} is a converted checkpoint without a tokenizer: pass "
                                           f"--tokenizer=DIR (the LLM's tokenizer directory)")
    else:
        raise NotACheckpoint(f"{p} is not a vjax checkpoint (no config.json of a training run, no {VJAX_CONFIG}): "
                             f"{how}")
    if tokenizer:
        tok_dir = _expand(tokenizer)
    elif (p / TOKENIZER_DIR).is_dir():
        tok_dir = str(p / TOKENIZER_DIR)
    elif c.data.tokenizer:
        tok_dir = _expand(c.data.tokenizer)
    else:
        tok_dir = _synthetic_paths(c).tokenizer_dir
    if not os.path.isdir(tok_dir):
        raise ConfigError("tokenizer", f"tokenizer directory {tok_dir!r} does not exist")
    tok = formats.TextTokenizer(tok_dir)
    spec = format_spec(name, module.config, c.data.load_audio, c.data.template_variant)
    return Run(name=name, config=c, module=module, params=params, spec=spec, tokenizer=tok,
               sampler=make_sampler(c), step=step, workdir=str(p))
