"""Train a video LLM: ``python -m experiments.train --config=<name>[:<variant>] [--workdir=DIR] [--config.a.b=v]``.

    --config=chat_univi                 experiments/configs/chat_univi.py, get_config("tiny")
    --config=video_llama:stage1         a published variant (real data paths must exist)
    --config.total_steps=200            any key of the config (types checked)
    --workdir=DIR                       default ./workdirs/<name>_<variant>; re-running resumes there

Steps: parse and validate the whole config before anything is compiled (an unknown key, a wrong type,
a mesh that does not divide the devices or a missing path is a one-line error naming the key, exit
code 2); ``jax.distributed.initialize()`` on multi-process launches (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` or the flags of the same names), each process reading its
shard of the data; the synthetic video-QA set generated on first use (cached); the model from the
registry; the Grain pipeline with the model's frame sampler, template and placeholders
(:mod:`vjax.data.formats`); :func:`vjax.train.loop.run` (Orbax checkpoints with the iterator state,
metrics.jsonl, TensorBoard, curves.png); validation by greedy generation with the KV cache, accuracy
per question type. The config (with the full model config) is saved as ``<workdir>/config.json`` and
inside every checkpoint, and the tokenizer is copied to ``<workdir>/tokenizer``, so chat/eval can rebuild
the model.

Faults (docs/reliability.md; exit codes of :mod:`experiments.cli`): SIGINT / SIGTERM save a checkpoint after
the current step and exit 130 / 143 (rerunning resumes); a checkpoint that does not restore is passed over
for the newest one that does (named on stderr, moved to ``<workdir>/checkpoints_unreadable/``), exit 2 when
none does; a NaN/Inf step is skipped and counted (``skipped_nonfinite``), ``max_nonfinite_in_a_row`` of them
stop the run (exit 2); unreadable videos are skipped and counted per reason (``skipped/<reason>`` in
metrics.jsonl, a ``skipped:`` line in the summary), more than ``data.max_bad_fraction`` of them exit 2; a
checkpoint that cannot be written (read-only or full disk) exits 2 with the previous one intact; a second
training on a workdir in use exits 2 (``<workdir>/.train.lock``).
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli, config

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config: <name>[:<variant>] or a .py file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go (default ./workdirs/<name>_<variant>)")
_COORD = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                             "multi-process: host:port of process 0 (env JAX_COORDINATOR_ADDRESS)")
_NPROC = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                              "multi-process: number of processes (env JAX_NUM_PROCESSES)")
_PID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                            "multi-process: this process's index (env JAX_PROCESS_ID)")

_NAME_VARIANT: list[str] = []  # (name, variant) of --config, filled by the parser


_fail = cli.fail
_STARTED = time.time()  # the command's wall time starts at import (run_summary.json)
LOCK_FILE = ".train.lock"  # in the workdir: one training at a time (released when the process ends)


def _override_keys(argv: list[str]) -> list[tuple[str, str]]:
    out = []
    for a in argv:
        if a.startswith("--config."):
            key, _, value = a[len("--config."):].partition("=")
            out.append((key, value))
    return out


def _unknown_override(argv: list[str], path: str, variant: str) -> str | None:
    """The first ``--config.a.b`` whose key the config does not have (loaded without overrides)."""
    base = config.config_from_file(path, variant)
    for key, _ in _override_keys(argv):
        node = base
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                return key
            node = node[part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing with ``--config=<name>[:<variant>]`` resolved to its file; every flag/config error
    becomes one line naming the key, exit code 2 (absl's default would be 1 with the usage text)."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            try:
                path, name, variant = config.config_path(a[len("--config="):])
            except config.ConfigError as err:
                _fail(str(err))
            _NAME_VARIANT[:] = [name, variant]
            argv[i] = f"--config={path}:{variant}"
            try:  # absl would keep only "Error whilst parsing config file:" of a bad variant
                config.config_from_file(path, variant)
            except Exception as err:  # noqa: BLE001 - whatever the config file raises, named in one line
                _fail(f"config key 'config': {name}:{variant}: {_last_line(err)}")
            break
    else:
        _fail(f"config key 'config': --config=<name>[:<variant>] is required; known: {config.config_names()}")
    try:
        return flags.FLAGS(argv)
    except flags.IllegalFlagValueError as err:
        msg = str(err).splitlines()[0]
        if msg.startswith("flag --config."):
            key = msg[len("flag --config."):].split("=", 1)[0]
            _fail(f"config key '{key}': wrong type or value ({msg.split(': ', 1)[-1]})")
        _fail(msg)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as err:
        key = _unknown_override(argv, argv[i][len("--config="):].rpartition(":")[0], _NAME_VARIANT[1])
        if key is not None:
            _fail(f"config key '{key}': unknown key (not in experiments/configs/{_NAME_VARIANT[0]}.py)")
        _fail(_last_line(err))
    return []  # unreachable


def _last_line(err: BaseException) -> str:
    """The reason of an error: the last line of its message (a traceback's last line is its exception)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def _lock_workdir(workdir: str):
    """An exclusive ``flock`` on ``<workdir>/.train.lock``, held until this process ends (even on kill -9);
    a second training on the same workdir exits 2 naming the holder. Returns the open file (keep it)."""
    import fcntl  # noqa: PLC0415

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        _fail(f"workdir {workdir} is in use by another training ({holder}); wait for it to finish or stop it, "
              f"or pass another --workdir")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def _initialize_distributed() -> None:
    import jax  # noqa: PLC0415

    if _COORD.value and _NPROC.value > 1:
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    c = _CONFIG.value
    name, variant = _NAME_VARIANT
    workdir = os.path.abspath(_WORKDIR.value or os.path.join("workdirs", f"{name}_{variant}"))
    try:
        config.validate(c)  # everything that needs neither devices nor data: before JAX starts
    except config.ConfigError as err:
        _fail(str(err))

    _initialize_distributed()
    import jax  # noqa: PLC0415

    try:
        plan = config.validate(c, num_devices=jax.device_count(), num_processes=jax.process_count())
    except config.ConfigError as err:
        _fail(str(err))
    lock = _lock_workdir(workdir) if jax.process_index() == 0 else None
    try:
        return train(c, plan, name, variant, workdir)
    finally:
        if lock is not None:
            lock.close()


def train(c, plan: dict, name: str, variant: str, workdir: str) -> int:
    """Build the run (:mod:`experiments.build`), then run it (:func:`vjax.train.loop.run`) and report."""
    import jax  # noqa: PLC0415

    from experiments.build import build  # noqa: PLC0415
    from vjax.data.validate import TooManyBadRecords  # noqa: PLC0415
    from vjax.train.checkpoint import CheckpointWriteError, NoRestorableCheckpoint  # noqa: PLC0415
    from vjax.train.loop import Interrupted, NonFiniteLossError, run  # noqa: PLC0415

    main_process = jax.process_index() == 0
    try:
        b = build(c, plan, workdir)
    except config.ConfigError as err:
        _fail(str(err))
    except TooManyBadRecords as err:
        _fail(f"validation records: {err}")
    if main_process:
        params = b.trainer.abstract_state.params
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
        n_train = sum(x.size for k, x in _flat(params).items() if b.trainer.mask[k])
        print(f"{name}:{variant}  {n_params:,} parameters ({n_train:,} trainable, stage {c.stage!r})  "
              f"mesh {dict(b.trainer.mesh.shape)}  {len(b.train_records)} train records  "
              f"{len(b.evaluator) if b.evaluator else 0} eval records  {b.visual_tokens} visual tokens per clip  "
              f"longest text {b.longest} tokens  workdir {workdir}", flush=True)

    def on_restore(step: int, passed_over: list) -> None:
        if main_process:
            for bad, reason in passed_over:  # one line each: which checkpoint, why, where it is kept
                print(f"warning: checkpoint step {bad} does not restore ({reason})", file=sys.stderr, flush=True)
            print(f"resumed from step {step}", flush=True)

    resumed = has_checkpoint(workdir)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    # on a fault: one line, and the exit code returned (not sys.exit here), so that the data iterator and its
    # Grain workers are released with this frame before the process exits
    try:
        init_params = earlier_stages(c, plan, b, workdir, timings)
        run(b.trainer, b.data, workdir, b.loop, eval_fn=b.evaluator, init_params=init_params,
            config_json=b.config_json, on_restore=on_restore, host_metrics=b.data.take)
    except Interrupted as err:
        return _say(f"stopped: {err}", 128 + err.signum)
    except (NonFiniteLossError, CheckpointWriteError, NoRestorableCheckpoint) as err:
        return _say(f"error: {err}", cli.USER_ERROR)
    except TooManyBadRecords as err:
        return _say(f"error: training records: {err}", cli.USER_ERROR)
    except config.ConfigError as err:
        return _say(f"error: {err}", cli.USER_ERROR)
    finally:
        b.data.close()  # the read-ahead thread stops reading (the evaluation below needs the cores)
    trained = time.perf_counter() - t0
    if main_process:
        report(workdir, b.evaluator, b.visual_tokens, b.spec, trained, b.model_config, plan["model"])
    if main_process and jax.process_count() == 1 and c.eval.test_records and not c.data.train_annotations:
        from experiments import eval as eval_cmd  # noqa: PLC0415

        eval_cmd.score_test_split(config.load_run(workdir), c.eval.test_records, progress=b.loop.progress)
    if main_process:
        write_summary(workdir, c, name, variant, trained_seconds=trained, visual_tokens=b.visual_tokens,
                      resumed=resumed, stage0_seconds=timings.get("stage0_seconds", 0.0))
    return 0


def write_summary(workdir: str, c, name: str, variant: str, *, trained_seconds: float, visual_tokens: int,
                  resumed: bool, stage0_seconds: float = 0.0) -> dict:
    """``<workdir>/run_summary.json``: the model, its stages' steps, the seconds the training took (stage 0 lookup or
    build, stage 1, stage 2) and the whole command's wall time (start-up, set, training and test table), of which
    ``stage0_seconds`` went to finding or building the pretrained parts (about 0 when they were cached), the load
    average at the end, visual tokens per clip; ``experiments.results`` tabulates it beside the test report.
    ``resumed``: the command continued an earlier run, so its seconds are not the whole run's."""
    import json  # noqa: PLC0415

    from experiments.results import SUMMARY  # noqa: PLC0415

    summary = {
        "model": name, "variant": variant, "steps": int(c.total_steps), "align_steps": int(c.align.steps),
        "stage0": str(c.stage0.parts), "stage": str(c.stage), "train_seconds": round(trained_seconds, 1),
        "command_seconds": round(time.time() - _STARTED, 1), "stage0_seconds": round(stage0_seconds, 1),
        "resumed": bool(resumed),
        "visual_tokens": int(visual_tokens), "load_average": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path = os.path.join(workdir, SUMMARY)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)
    return summary


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint step (the run then resumes, and no earlier stage runs)."""
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def earlier_stages(c, plan: dict, b, workdir: str, timings: dict | None = None):
    """The parameters the main run starts from: ``init_params`` (``b.init_params``), or, for a run that starts
    (no checkpoint in ``workdir``), stage 0 (``stage0.parts`` from :mod:`experiments.pretrain`, in a random
    init of the rest) then stage 1 (``align.steps`` of ``align.stage`` on the captions, in ``<workdir>/align``,
    resumable like any run). ``timings["stage0_seconds"]``: the seconds stage 0 took (a build, or a cache read)."""
    import jax  # noqa: PLC0415

    from experiments import pretrain  # noqa: PLC0415
    from experiments.build import _synthetic_set  # noqa: PLC0415

    parts = pretrain.parse_parts(c.stage0.parts)
    if has_checkpoint(workdir) or not (parts or c.align.steps):
        return b.init_params
    main_process = jax.process_index() == 0
    params = b.init_params
    if parts:
        from vjax.pretrained import init_params  # noqa: PLC0415

        paths = _synthetic_set(c, main_process)

        def ensure(log):
            return pretrain.ensure_parts(c, plan["model"], b.model_config, b.spec, b.tokenizer, paths,
                                         progress=b.loop.progress and main_process, log=log)

        t0 = time.perf_counter()
        got = ensure(print) if main_process else None
        if timings is not None:
            timings["stage0_seconds"] = time.perf_counter() - t0
        if jax.process_count() > 1:  # process 0 builds, the others then read its cache
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices("vjax_stage0")
            if not main_process:
                got = ensure(lambda _: None)
        try:
            params = pretrain.with_parts(init_params(b.module, c.seed) if params is None else params, got)
        except ValueError as err:
            raise config.ConfigError("stage0.parts", str(err)) from None
    if c.align.steps:
        params = align(c, params, workdir)
    return params


def align(c, params, workdir: str):
    """Stage 1: ``align.steps`` steps of ``align.stage`` (the projector, as the papers' first stage) from ``params``
    on one caption record per training clip, in ``<workdir>/align``; returns the trained parameters."""
    import jax  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415

    from experiments.build import build  # noqa: PLC0415
    from vjax.train.loop import run  # noqa: PLC0415

    a = c.align
    c1 = ml_collections.ConfigDict(c.copy_and_resolve_references().to_dict())
    c1.stage, c1.total_steps, c1.save_every, c1.eval_every = a.stage, a.steps, a.steps, 0
    c1.optim.update(total_steps=a.steps, learning_rate=a.learning_rate, warmup_steps=a.warmup_steps)
    c1.eval.records, c1.eval.test_records = 0, 0
    c1.data.train_records, c1.stage0.parts, c1.align.steps = "captions", "", 0
    plan1 = config.validate(c1, num_devices=jax.device_count(), num_processes=jax.process_count())
    b1 = build(c1, plan1, os.path.join(workdir, "align"))
    main_process = jax.process_index() == 0
    if main_process:
        print(f"stage 1 (alignment): {a.steps} steps of {a.stage!r} on {len(b1.train_records)} captions, "
              f"workdir {os.path.join(workdir, 'align')}", flush=True)
    state = run(b1.trainer, b1.data, os.path.join(workdir, "align"), b1.loop, init_params=params,
                config_json=b1.config_json, host_metrics=b1.data.take)
    if main_process:
        from vjax.train.metrics import read_metrics  # noqa: PLC0415

        rows = [r for r in read_metrics(os.path.join(workdir, "align")) if r["split"] == "train" and "loss" in r]
        if rows:
            print(f"stage 1 done: caption loss {rows[0]['loss']:.3f} at step {rows[0]['step']} -> "
                  f"{rows[-1]['loss']:.3f} at step {rows[-1]['step']}; stage 2 ({c.stage!r}) follows", flush=True)
    return jax.device_get(state.params)


def _say(line: str, code: int) -> int:
    print(line, file=sys.stderr, flush=True)
    return code


def skip_totals(rows) -> dict[str, int]:
    """What the run skipped, summed over its logged train rows (a resumed run's rows included):
    ``{"non-finite steps": n, "records (missing)": n, ...}``, only the non-zero ones."""
    out: dict[str, int] = {}
    for r in rows:
        for k, v in r.items():
            if k == "skipped_nonfinite":
                name = "non-finite steps"
            elif k.startswith("skipped/"):
                name = f"records ({k.split('/', 1)[1]})"
            else:
                continue
            out[name] = out.get(name, 0) + int(v)
    return {k: out[k] for k in sorted(out) if out[k]}


def _flat(tree):
    from vjax.pytree import flatten_params  # noqa: PLC0415

    return flatten_params(tree)


def report(workdir: str, evaluator, visual: int, spec, seconds: float, mcfg=None, model=None) -> None:
    """The final table: last train metrics, accuracy per question type, visual tokens per clip (beside the
    paper's baseline, where its model spec names one)."""
    from vjax.train.metrics import read_metrics  # noqa: PLC0415

    train_rows = [r for r in read_metrics(workdir) if r["split"] == "train" and "loss" in r]
    print(f"\ndone in {seconds:.0f} s; workdir {workdir}")
    if train_rows:
        r = train_rows[-1]
        print(f"final train loss {r['loss']:.4f} at step {r['step']}"
              + (f", {r['steps_per_second']:.2f} steps/s" if "steps_per_second" in r else ""))
    skipped = skip_totals(train_rows)
    if skipped:
        print("skipped: " + ", ".join(f"{n} {what}" for what, n in skipped.items()))
    if evaluator is not None and evaluator.correct:
        print(evaluator.table())
        for rec, pred in list(zip(evaluator.records, evaluator.predictions))[:3]:
            print(f"  e.g. [{rec.get('question_type')}] {rec.get('question', '')!r} -> {pred!r} "
                  f"(answer {rec.get('answer')!r})")
    per_frame = {n: k for n, _, k in spec.visual if n == "frame"}
    extra = f" ({per_frame['frame']} per frame x {spec.num_frames} frames)" if per_frame else ""
    if model is not None and model.token_baseline:
        base = int(getattr(mcfg, model.token_baseline))
        extra = f" ({model.token_baseline.replace('_', ' ')}: {base}, {base / visual:.2f}x as many)"
    print(f"visual tokens per clip: {visual}{extra}", flush=True)


if __name__ == "__main__":
    cli.run(main, flags_parser=parse_flags)
