r"""Convert released PyTorch checkpoints to a vjax checkpoint (or a vjax checkpoint back to HF).

    python -m experiments.convert --model=video_chatgpt \
        --src=/ckpt/LLaVA-7B-Lightening-v1-1,/ckpt/clip-vit-large-patch14,/ckpt/video_chatgpt-7B.bin \
        --dst=/ckpt/vjax/video_chatgpt_7b
    python -m experiments.convert --model=qwen2_vl --src=/ckpt/Qwen2-VL-7B-Instruct --dst=/ckpt/vjax/qwen2_vl_7b
    python -m experiments.convert --model=qwen2_vl --src=/ckpt/vjax/qwen2_vl_7b --dst=/ckpt/hf/qwen2_vl --to=hf

* ``--src``: files or directories, in loading order; a tensor present in several sources is taken from the
  **last** one (as the official loaders apply their files one after another), and every such replacement
  is printed. ``PREFIX=PATH`` puts a source's keys under ``PREFIX`` (e.g. a bare state dict).
  A directory holding both safetensors and ``.bin``/``.pth`` is read from its safetensors.
  ``.pth``/``.bin`` files are read with ``torch.load(weights_only=True)``: one whose pickle would run code is
  refused, naming the file. A vjax checkpoint directory as the only source re-exports it (``--to=hf``).
* The config comes from the ``config.json`` files of the source directories (with the preprocessing settings of
  a ``preprocessor_config.json`` / ``video_preprocessor_config.json`` beside them: Qwen2-VL's pixel bounds and
  fps, printed), or ``--variant`` (a published
  config, e.g. ``video_chatgpt_7b``), or ``--config_file`` (a vjax config as JSON: the ``config`` entry of a
  ``vjax_config.json``, or that whole file).
* Video-LLaMA, MiniGPT4-video and MA-LMM (``--model=video_llama|minigpt4_video|ma_lmm``, with ``--variant``)
  are released as LAVIS ``.pth`` files plus component files::

      --model=video_llama --variant=video_llama2_7b --src=eva_vit_g.pth,blip2_pretrained_flant5xxl.pth,\
          imagebind_huge.pth,llama-2-7b-chat-hf,VL_LLaMA_2_7B_Finetuned.pth,AL_LLaMA_2_7B_Finetuned.pth
      --model=minigpt4_video --variant=minigpt4_video_llama2 --src=eva_vit_g.pth,Llama-2-7b-chat-hf,\
          video_llama_checkpoint_last.pth [--merge_lora]
      --model=ma_lmm --variant=ma_lmm_vicuna7b --src=eva_vit_g.pth,vicuna-7b,\
          instruct_blip_vicuna7b_trimmed.pth,checkpoint_best.pth

  A LAVIS training checkpoint (``{"model": ..., "optimizer": ..., "epoch": ...}``) contributes its ``model``
  entry only (the rest is named in a log line). Bare component files are recognised by their keys: EVA's
  (``cls_token``, ``blocks.*``) go under ``visual_encoder.``, ImageBind's (``modality_*``) under
  ``audio_encoder.``, an HF LLM folder's (``model.*``, ``lm_head.weight``) under the model's LLM attribute;
  ``PREFIX=PATH`` (``visual_encoder.=eva_vit_g.pth``, ``llama_model.=LLM_DIR``) places them explicitly.
  Tensors the layout drops on purpose (ImageBind's non-audio modalities, CLIP's text tower, buffers) are
  counted and named by pattern; values the official model keeps at their initialisation when no file has
  them (MiniGPT4-video's ``ln_vision``, MA-LMM's zero-shot ``image_pe``) are supplied and listed.
* ``--merge_lora``: fold LoRA adapters into the base weights (``W + (alpha / r) A B``) and write the model
  without adapters (MiniGPT4-video).
* Every missing, unexpected and mis-shaped tensor is listed by name before anything is read, and nothing
  is written; ``--nostrict`` writes anyway, leaving missing parameters at their random initialisation
  (listed) and ignoring unexpected tensors. A shape mismatch is never bypassed: it means the config does not
  match the checkpoint (pass the matching ``--variant`` or ``--config_file``).
* Exit codes (:mod:`experiments.cli`): 0 written; 2 a refusal or a usage error (one ``error:`` message);
  1 an internal error.
* Output: ``--to=vjax`` (default) a ``vjax.save_pretrained`` directory (``vjax_config.json`` + Orbax params)
  that ``vjax.from_pretrained`` loads and ``experiments.train`` starts from (``--config.init_params``);
  ``--to=hf`` an HF directory (config.json + sharded safetensors) where an HF layout exists.

Tensors are read one at a time (safetensors by positioned reads, nothing mapped), so peak host memory is
about the output size plus one tensor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "vjax model name (decoder, video_chatgpt, chat_univi, cogvlm2_video, qwen2_vl, "
                    "video_llama, minigpt4_video, ma_lmm)")
flags.DEFINE_string("variant", None, "published config variant (Config.<variant>()) instead of the sources' config.json")
flags.DEFINE_string("config_file", None, "a vjax config as JSON (vjax_config.json, or its 'config' entry) instead of "
                    "--variant or the sources' config.json")
flags.DEFINE_bool("merge_lora", False, "fold LoRA adapters into the base weights and write the model without them")
flags.DEFINE_list("src", None, "[PREFIX=]PATH,... checkpoint files or directories, in loading order")
flags.DEFINE_string("dst", None, "output directory")
flags.DEFINE_enum("to", "vjax", ["vjax", "hf"], "output format")
flags.DEFINE_bool("strict", True, "refuse checkpoints with missing or unexpected tensors")
flags.DEFINE_string("dtype", None, "parameter dtype of the output (float32, bfloat16, float16); default float32")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_integer("max_shard_mb", 2048, "--to=hf: largest safetensors shard, MiB")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _parse_src(item: str) -> tuple[str, Path]:
    head, sep, tail = item.partition("=")
    if sep and head.endswith(".") and "/" not in head:
        return head, Path(tail)
    return "", Path(item)


def _open(path: Path):
    from vjax.convert.io import SafetensorsSource, checkpoint_files  # noqa: PLC0415
    from vjax.convert.lavis import RunnerCheckpointSource  # noqa: PLC0415

    kind, files = checkpoint_files(path)
    if path.is_dir() and kind == "safetensors" and (any(path.glob("*.bin")) or any(path.glob("*.pth"))):
        _log(f"{path}: both safetensors and .bin/.pth present; reading the safetensors only")
    if kind == "safetensors":
        return SafetensorsSource(files)
    src = RunnerCheckpointSource(files)  # a plain state dict reads as TorchSource would
    for note in src.notes:
        _log(note)
    return src


def _show(xs, n=10) -> str:
    xs = list(xs)
    return ", ".join(map(str, xs[:n])) + (f", ... ({len(xs) - n} more)" if len(xs) > n else "")


def _dropped(plan) -> dict[str, int]:
    """``{Skip pattern: number of tensors it accepted and dropped}``."""
    from vjax.convert.mapping import Skip  # noqa: PLC0415

    counts: dict[str, int] = {}
    for _, rule, _ in plan.assignments:
        if isinstance(rule, Skip):
            counts[rule.src] = counts.get(rule.src, 0) + 1
    return counts


def _check_llm_config(model, config, configs: list[dict]) -> None:
    """With ``--variant`` / ``--config_file``: warn where an LLM folder's ``config.json`` disagrees with the chosen
    config on what tensor shapes cannot show (e.g. Vicuna v0's RMS eps 1e-6 vs Llama-2's 1e-5)."""
    llm = model.llm_config(config)
    fields = (("rms_norm_eps", "rms_norm_eps"), ("rope_theta", "rope_theta"), ("hidden_size", "hidden_size"),
              ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"))
    for c in configs:
        if c.get("model_type") not in ("llama", "mistral"):
            continue
        diffs = [f"{hf_key} {c[hf_key]} (the config has {getattr(llm, ours)})" for hf_key, ours in fields
                 if isinstance(c.get(hf_key), (int, float)) and abs(float(c[hf_key]) - float(getattr(llm, ours)))
                 > 1e-9 * max(1.0, abs(float(c[hf_key])))]
        if diffs:
            _log(f"warning: an LLM config.json among the sources differs from the chosen config: {', '.join(diffs)}")


def _config_from_file(config_cls, path: str):
    from vjax.models import registry  # noqa: PLC0415

    data = json.loads(Path(path).read_text())
    if "format" in data and "config" in data:  # a whole vjax_config.json
        data = data["config"]
    return registry.config_from_dict(config_cls, data)


def run(model: str, srcs: list[str], dst: str, *, variant: str | None = None, to: str = "vjax", strict: bool = True,
        dtype: str | None = None, progress: bool = True, max_shard_bytes: int = 2 * 1024**3,
        config_file: str | None = None, merge_lora: bool = False) -> Path:
    """The command as a function; raises ``ValueError`` (``ConversionError``, ``CheckpointError``) on refusal."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import vjax  # noqa: PLC0415
    from vjax.convert import DEFAULTS_LABEL, combine, layout, read_hf_config  # noqa: PLC0415
    from vjax.convert.mapping import (  # noqa: PLC0415
        ConversionError,
        PadRows,
        convert,
        flatten_params,
        plan_conversion,
        unflatten_params,
    )
    from vjax.layers.scan import unstack_all  # noqa: PLC0415
    from vjax.models import registry  # noqa: PLC0415
    from vjax.pretrained import VJAX_CONFIG, _with_dtype, abstract_params, init_params  # noqa: PLC0415

    lay = layout(model)
    parsed = [_parse_src(s) for s in srcs]
    if len(parsed) == 1 and (parsed[0][1] / VJAX_CONFIG).exists():  # vjax checkpoint -> re-export
        module, params = vjax.from_pretrained(parsed[0][1], model=model, dtype=dtype)
        _log(f"read vjax checkpoint {parsed[0][1]}")
        return _write(module, params, dst, to, max_shard_bytes)

    configs, sources = [], []
    for prefix, path in parsed:
        if path.is_dir() and (path / "config.json").exists():
            configs.append(read_hf_config(path))  # with its preprocessor_config.json (preprocessing settings)
        src = _open(path)
        _log(f"source {path}{' (keys under ' + prefix + ')' if prefix else ''}: {len(src)} tensors")
        sources.append((str(path), prefix, src))
    source = combine(sources, lay)
    shapes = {k: source.shape(k) for k in source.keys()}

    config_cls, module_cls = registry.get(model)
    if variant and config_file:
        raise ValueError("pass --variant or --config_file, not both")
    if variant:
        if not hasattr(config_cls, variant):
            raise ValueError(f"{config_cls.__name__} has no variant {variant!r}")
        config = getattr(config_cls, variant)()
    elif config_file:
        config = _config_from_file(config_cls, config_file)
    elif configs:
        config = lay.config_from_hf(configs, shapes)
    else:
        raise ValueError(f"no config.json among the sources: pass --variant (a {config_cls.__name__} classmethod) "
                         f"or --config_file")
    if variant or config_file:
        _check_llm_config(registry.spec(model), config, configs)
    if registry.spec(model).visual:  # a video model: the frame preprocessing its config holds
        from vjax.data.preprocess import FrameProcessor  # noqa: PLC0415

        frames = FrameProcessor.for_model(registry.spec(model), config)
        _log(f"preprocessing stored with the model: {frames.describe()}")
    config = _with_dtype(config, dtype)
    if lay.defaults is not None:  # initial values of the official model, replaced by any source holding them
        source = combine(sources, lay, config)
        shapes = {k: source.shape(k) for k in source.keys()}
    if source.overridden:
        by_pair: dict[tuple[str, str], list[str]] = {}
        for key, old, new in source.overridden:
            if old != DEFAULTS_LABEL:
                by_pair.setdefault((old, new), []).append(key)
        for (old, new), keys in by_pair.items():
            _log(f"{len(keys)} tensor(s) of {old} replaced by {new}: {_show(keys)}")
    module = module_cls(config)
    expected = abstract_params(module)
    flat_expected = flatten_params(expected)
    table = lay.table(config, list(shapes))

    unrolled = flatten_params(unstack_all(expected))  # tables name layers_{i}; convert() stacks scanned groups
    plan = plan_conversion(shapes, table, {k: tuple(v.shape) for k, v in unrolled.items()})
    context = ", ".join(srcs) + (f"; {lay.hint}" if lay.hint and plan.missing else "")
    if plan.mismatched or (strict and (plan.missing or plan.unexpected)):
        raise ConversionError(plan.missing, plan.unexpected, plan.mismatched, context)
    if plan.missing:
        _log(f"--nostrict: {len(plan.missing)} parameter(s) left at random initialisation: {_show(plan.missing)}")
    if plan.unexpected:
        _log(f"--nostrict: {len(plan.unexpected)} tensor(s) ignored: {_show(plan.unexpected)}")
    for key, rule, _ in plan.assignments:
        if isinstance(rule, PadRows) and shapes[key][0] < rule.rows:
            _log(f"{key}: {shapes[key][0]} rows padded to {rule.rows} with their mean (tokens added after it was saved)")
    dropped = _dropped(plan)
    if dropped:
        _log(f"dropped {sum(dropped.values())} tensor(s) the model does not use, by pattern: "
             + ", ".join(f"{p} ({n})" for p, n in dropped.items()))
    initial = [k for k, _, _ in plan.assignments if source.origin(k) == DEFAULTS_LABEL]
    if initial:
        _log(f"{len(initial)} tensor(s) in no source, kept at the official model's initial values: {_show(initial)}")

    params = convert(source, table, expected, strict=strict, dtype=dtype, context=context, progress=progress)
    if plan.missing:  # only with --nostrict
        flat = flatten_params(params)
        rand = flatten_params(jax.tree_util.tree_map(np.asarray, init_params(module)))
        params = unflatten_params({k: flat.get(k, rand[k]) for k in flat_expected})
    if merge_lora:
        module, params = _merge_lora(registry.spec(model), module, params)
    return _write(module, params, dst, to, max_shard_bytes)


def _merge_lora(spec, module, params):
    """``W + (alpha / r) A B`` into every adapted kernel; the same model with ``llm.lora_rank = 0``."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from vjax.layers.lora import merge_lora  # noqa: PLC0415

    config = module.config
    llm = spec.llm_config(config)
    if not llm.lora_rank:
        raise ValueError(f"--merge_lora: {type(config).__name__} has no LoRA adapters (lora_rank=0)")
    merged = jax.tree_util.tree_map(np.asarray, merge_lora(params, llm))
    config = spec.with_llm(config, llm.replace(lora_rank=0))
    _log(f"merged LoRA (rank {llm.lora_rank}, alpha {llm.lora_alpha}) into the base weights")
    return spec.module(config), merged


def _write(module, params, dst: str, to: str, max_shard_bytes: int) -> Path:
    import vjax  # noqa: PLC0415

    if to == "hf":
        out = vjax.export_hf(dst, module, params, max_shard_bytes=max_shard_bytes)
    else:
        out = vjax.save_pretrained(dst, module, params)
    _log(f"wrote {to} checkpoint {out}")
    return Path(out)


def main(argv):
    del argv
    from absl import logging  # noqa: PLC0415

    logging.set_verbosity(logging.WARNING)  # Orbax logs every step at INFO
    if not FLAGS.model or not FLAGS.src or not FLAGS.dst:
        cli.fail("--model, --src and --dst are required")
    from vjax.convert.io import CheckpointError  # noqa: PLC0415
    from vjax.convert.mapping import ConversionError  # noqa: PLC0415

    try:
        run(FLAGS.model, FLAGS.src, FLAGS.dst, variant=FLAGS.variant, to=FLAGS.to, strict=FLAGS.strict,
            dtype=FLAGS.dtype, progress=FLAGS.progress, max_shard_bytes=FLAGS.max_shard_mb * 1024**2,
            config_file=FLAGS.config_file, merge_lora=FLAGS.merge_lora)
    except (ConversionError, CheckpointError, KeyError, ValueError, FileNotFoundError) as e:
        cli.fail(str(e))  # a refusal is a user-input error: exit code 2, like every command
    return 0


if __name__ == "__main__":
    cli.run(main)
