"""The second half of a training command: from a validated config (:func:`experiments.config.validate`) to
what :func:`vjax.train.loop.run` needs — the data (the synthetic set, generated once, or real annotations),
the tokenizer, the model, the trainer on its mesh, the input pipeline and the evaluator.

    plan = config.validate(c, num_devices=jax.device_count(), num_processes=jax.process_count())
    built = build(c, plan, workdir)
    run(built.trainer, built.data, workdir, built.loop, eval_fn=built.evaluator, ...)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import time
from typing import Any

from experiments import config as cfg
from experiments.config import ConfigError


@dataclasses.dataclass
class Built:
    """Everything a training run is made of (see the module docstring)."""

    module: Any
    trainer: Any
    data: Any  # an iterator of batches (``vjax.data.pipeline.SkipCounts``)
    evaluator: Any  # ``vjax.eval.Evaluator`` or None
    loop: Any  # ``vjax.train.loop.LoopConfig``
    spec: Any  # ``vjax.data.formats.FormatSpec``
    model_config: Any
    tokenizer: Any
    train_records: list
    init_params: Any
    config_json: dict
    longest: int  # tokens of the longest training text
    visual_tokens: int  # per full clip


def answerable_only(records: list[dict], spec: Any, name: str = "training", verbose: bool = True) -> list[dict]:
    """The synthetic ``records`` a model of format ``spec`` can answer from its inputs
    (:func:`vjax.data.synthetic.answerable`); says which question types were left out and why."""
    from vjax.data.synthetic import QUESTION_INPUTS, answerable  # noqa: PLC0415

    inputs = spec.inputs()
    kept, dropped = [], collections.Counter()
    for r in records:
        if answerable(r, inputs):
            kept.append(r)
        else:
            dropped[r.get("question_type")] += 1
    if verbose and dropped:
        why = ", ".join(f"{t} {n} (needs {QUESTION_INPUTS[t]})" for t, n in sorted(dropped.items()))
        print(f"{name} questions: {len(kept)} of {len(records)}, those the model can answer from its inputs "
              f"({', '.join(sorted(inputs))}); left out: {why} (data.train_questions=all keeps them)", flush=True)
    return kept


def build(c, plan: dict, workdir: str) -> Built:
    """Build a run of config ``c`` (validated into ``plan``); writes ``config.json`` and the tokenizer copy into
    ``workdir`` (process 0). Raises :class:`~experiments.config.ConfigError` for what only the data can reveal
    (a vocabulary smaller than the tokenizer's, a record longer than the largest bucket) and
    :class:`~vjax.data.validate.TooManyBadRecords` for unreadable validation videos."""
    import jax  # noqa: PLC0415

    from vjax.data import formats, pipeline  # noqa: PLC0415
    from vjax.data.preprocess import FrameProcessor  # noqa: PLC0415
    from vjax.data.annotations import merge_turns  # noqa: PLC0415
    from vjax.eval import Evaluator  # noqa: PLC0415
    from vjax.pretrained import TOKENIZER_DIR  # noqa: PLC0415
    from vjax.train.loop import LoopConfig  # noqa: PLC0415
    from vjax.train.sharding import make_mesh  # noqa: PLC0415
    from vjax.train.step import Trainer  # noqa: PLC0415

    main_process = jax.process_index() == 0
    model = plan["model"]

    # --- data: the synthetic set (generated once, cached) or real annotations; the tokenizer
    paths = None if c.data.train_annotations else _synthetic_set(c, main_process)
    tok_dir = cfg._expand(c.data.tokenizer) if c.data.tokenizer else paths.tokenizer_dir
    tokenizer = formats.TextTokenizer(tok_dir)
    mcfg = cfg.resolve_markers(model, plan["model_config"], tokenizer)
    spec = cfg.data_format(model, mcfg, c)
    train_records, val_records = cfg.records(c, "train", paths), cfg.records(c, "val", paths)
    if paths is not None and c.data.get("train_questions", "answerable") == "answerable":
        train_records, val_records = (answerable_only(recs, spec, name, main_process)
                                      for recs, name in ((train_records, "training"), (val_records, "validation")))
    train_records = merge_turns(train_records, c.data.turns_per_record, seed=c.seed)
    fmt = formats.VideoQAFormat(spec, tokenizer)
    longest = cfg.check_lengths(c, fmt, train_records)
    if not train_records:
        raise ConfigError("data.train_annotations", "no training records")

    # --- model, mesh, trainer
    module = model.module(mcfg)
    trainer = Trainer(module, plan["optim"], make_mesh(plan["mesh_shape"]), plan["trainable"])
    init_params = None
    if c.init_params:
        import vjax  # noqa: PLC0415

        _, init_params = vjax.from_pretrained(cfg._expand(c.init_params), model=c.model)
        init_params = vjax.pretrained.with_layer_layout(init_params, module)  # e.g. unrolled -> scan_layers

    # --- input pipeline: the release's frame preprocessing (square S x S batches, or with data.frame_buckets one
    # loader per frame shape: Qwen2-VL's native resolution, bucketed), text buckets plus a full clip's visual
    # tokens, and one more bucket for the longest clip (Chat-UniVi: 1-2 frames are two images)
    nproc = jax.process_count()
    frames = FrameProcessor.for_model(model, mcfg, native=False, size=c.data.image_size)
    visual, most = spec.tokens_per_clip(spec.num_frames), spec.tokens_per_clip()

    def loader(recs, fmt_b, spec_b, frames_b):
        visual_b, most_b = spec_b.tokens_per_clip(spec_b.num_frames), spec_b.tokens_per_clip()
        lengths = tuple(sorted({b + visual_b for b in c.data.text_buckets} | {max(c.data.text_buckets) + most_b}))
        pcfg = cfg.from_config(
            pipeline.PipelineConfig, c.data, "data", strict=False, batch_size=c.data.batch_size // nproc,
            seed=c.seed, shuffle=True, num_epochs=None, shard_index=jax.process_index(), shard_count=nproc,
            frame_size=frames_b, buckets={k: lengths for k in cfg.TEXT_KEYS}, count_skips=True)
        return pipeline.make_loader(recs, fmt_b, pcfg, sampler=plan["sampler"])

    if c.data.frame_buckets:
        loaders, weights = [], []
        for shape, recs in frame_buckets(c, model, train_records).items():
            cfg_b = model.with_frame_shape(mcfg, spec.num_frames, shape)
            spec_b = cfg.data_format(model, cfg_b, c)
            fmt_b = formats.VideoQAFormat(spec_b, tokenizer)
            longest = max(longest, cfg.check_lengths(c, fmt_b, recs))
            loaders.append(loader(recs, fmt_b, spec_b, dataclasses.replace(frames, buckets=(shape,))))
            weights.append(len(recs))
            print(f"frame bucket {shape[1]}x{shape[0]}: {len(recs)} records, {spec_b.tokens_per_clip()} visual "
                  f"tokens", flush=True)
        batches = pipeline.BucketedBatches(loaders, weights, seed=c.seed)
    else:
        batches = iter(loader(train_records, fmt, spec, frames))
    # data.prefetch: a thread reads batches ahead (the state a checkpoint saves stays that of the batches used)
    data = pipeline.SkipCounts(pipeline.Prefetch(batches, c.data.prefetch) if c.data.prefetch else batches)

    config_json = cfg.config_json(c, c.model, mcfg)
    if main_process:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_json, f, indent=1)
        tok_copy = os.path.join(workdir, TOKENIZER_DIR)  # chat/eval read the tokenizer from the workdir
        if not os.path.isdir(tok_copy):
            shutil.copytree(tok_dir, tok_copy)
    evaluator = None
    if c.eval.records and val_records:
        evaluator = Evaluator(
            module, spec, tokenizer, val_records, plan["sampler"], num_records=c.eval.records,
            batch_size=c.eval.batch_size, max_new_tokens=c.eval.max_new_tokens,
            frame_size=frames, load_audio=c.data.load_audio,
            max_bad_fraction=c.data.max_bad_fraction, trainer=trainer, loss_batch=c.data.batch_size // nproc,
            loss_length=max(c.data.text_buckets) + most)
    loop = cfg.from_config(LoopConfig, c, "loop", strict=False)
    return Built(module=module, trainer=trainer, data=data, evaluator=evaluator, loop=loop, spec=spec,
                 model_config=mcfg, tokenizer=tokenizer, train_records=train_records, init_params=init_params,
                 config_json=config_json, longest=longest, visual_tokens=visual)


def frame_buckets(c, model, records: list) -> dict[tuple[int, int], list]:
    """Training records grouped by ``data.frame_buckets``: each record goes to the ``(height, width)`` bucket whose
    aspect ratio is nearest its video's (``vjax.data.preprocess.nearest_bucket``; the size from the record's
    ``height``/``width`` or probed). Buckets no record takes are left out; an unreadable video goes to the first
    bucket (the pipeline skips and counts it). Only a native-resolution model takes buckets: a
    :class:`ConfigError` names ``data.frame_buckets`` otherwise, or for a bucket its config refuses."""
    from vjax.data.preprocess import nearest_bucket  # noqa: PLC0415
    from vjax.data.video import UnreadableVideo, probe_video  # noqa: PLC0415

    shapes = [tuple(int(x) for x in b) for b in c.data.frame_buckets]
    if not model.preprocess.native or not model.frame_shape:
        raise ConfigError("data.frame_buckets", f"{model.name} takes square frames of data.image_size only")
    for shape in shapes:
        try:
            model.with_frame_shape(model.config.tiny(), 2, shape)
        except (ValueError, TypeError) as err:
            raise ConfigError("data.frame_buckets", str(err)) from None
    groups: dict[tuple[int, int], list] = {}
    for rec in records:
        try:
            hw = (rec["height"], rec["width"]) if "height" in rec and "width" in rec else None
            if hw is None:
                info = probe_video(rec["video"])
                hw = (info.height, info.width)
            shape = shapes[nearest_bucket(hw[0], hw[1], shapes)]
        except (UnreadableVideo, KeyError, TypeError):
            shape = shapes[0]
        groups.setdefault(shape, []).append(rec)
    return {s: groups[s] for s in shapes if s in groups}


def _synthetic_set(c, main_process: bool):
    """The synthetic set of ``c``: generated by process 0 (once per machine, then cached), then read by all."""
    import jax  # noqa: PLC0415

    from vjax.data.synthetic import SyntheticConfig, ensure_synthetic_dataset  # noqa: PLC0415

    root = cfg.synthetic_root(c)
    syn = SyntheticConfig(**c.data.synthetic.to_dict())
    paths = None
    if main_process:
        t0 = time.perf_counter()
        paths = ensure_synthetic_dataset(root, syn)
        if time.perf_counter() - t0 > 1:
            print(f"synthetic video-QA set ready in {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("vjax_synthetic_set")
    return ensure_synthetic_dataset(root, syn) if paths is None else paths
