r"""int8 against float32 on a checkpoint's own questions: ``python -m experiments.quant_drift --workdir=DIR``.

    --workdir=DIR     a training run (or a converted checkpoint with --tokenizer, --config), as experiments.eval
    --limit=200       the first N questions of the run's synthetic test split (0: all)
    --batch_size=8 --max_new_tokens=12

Every question is answered greedily twice — with the checkpoint's float32 weights and with the same weights
quantised to int8 (:func:`vjax.layers.quant.quantize_params`) — and printed: the drift of the logits of the first
answer token (max and mean |int8 - f32|, relative to the standard deviation of the float32 logits), how often
the first token (top-1) agrees, and how often the whole greedy answer is the same token for token. The accuracy
of each is what ``experiments.eval`` (with and without ``--quantize=int8``) reports.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
from absl import flags

from experiments import cli, config

FLAGS = flags.FLAGS


def drift(run, records: Sequence[dict], *, batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    """``{"questions", "logits_max_rel", "logits_mean_rel", "top1_agreement", "answer_agreement"}`` of ``run``'s
    float weights against their int8 quantisation over ``records`` (prompts as ``experiments.eval`` builds them)."""
    from vjax.data import formats  # noqa: PLC0415
    from vjax.data.pipeline import DropSkipped, LoadAndFormat  # noqa: PLC0415
    from vjax.eval import VISUAL_BATCH_KEYS, stop_token_ids  # noqa: PLC0415
    from vjax.generate import generate  # noqa: PLC0415
    from vjax.layers.quant import quantize_params  # noqa: PLC0415

    fmt = formats.VideoQAFormat(run.spec, run.tokenizer, prompt_only=True)
    load, keep = LoadAndFormat(fmt, run.sampler, run.frames, run.config.data.load_audio), DropSkipped()
    prompts = [p for i, rec in enumerate(records) if keep.filter(p := load.random_map(rec, np.random.default_rng(i)))]
    if not prompts:
        raise ValueError("no readable question")
    length = -(-max(len(p["input_ids"]) for p in prompts) // 64) * 64
    weights = {"f32": run.params, "int8": quantize_params(run.params)}
    eos = stop_token_ids(run.tokenizer, run.spec)
    logits: dict[str, list] = {k: [] for k in weights}
    answers: dict[str, list] = {k: [] for k in weights}
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s: s + batch_size]
        n = len(chunk)
        b = formats.left_pad(chunk + [chunk[-1]] * (batch_size - n), length, run.tokenizer.pad_token_id)
        visual = {k: b[k] for k in VISUAL_BATCH_KEYS if k in b}
        for name, params in weights.items():
            out = generate(run.module, params, b["input_ids"], b["attention_mask"], prefill_inputs=visual,
                           max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=run.tokenizer.pad_token_id)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            logits[name].append(np.asarray(out.prefill_logits, np.float32)[:n])
            answers[name] += [tuple(tokens[r, : lengths[r]]) for r in range(n)]
    f32, int8 = np.concatenate(logits["f32"]), np.concatenate(logits["int8"])
    rel = np.abs(int8 - f32) / f32.std()
    return {"questions": len(prompts), "logits_max_rel": float(rel.max()), "logits_mean_rel": float(rel.mean()),
            "top1_agreement": float(np.mean(f32.argmax(-1) == int8.argmax(-1))),
            "answer_agreement": float(np.mean([a == b for a, b in zip(answers["f32"], answers["int8"])]))}


def main(argv: list[str]) -> int:
    cli.start_checkpoint_command(argv, "workdir")
    from experiments.eval import synthetic_split  # noqa: PLC0415
    from vjax.pretrained import NotACheckpoint  # noqa: PLC0415

    try:
        run = config.load_run(FLAGS.workdir, tokenizer=FLAGS.tokenizer, config=FLAGS.config)
        records, data_name = synthetic_split(run)
    except (NotACheckpoint, config.ConfigError, ValueError) as err:
        cli.fail(str(err))
    records = records[: FLAGS.limit] if FLAGS.limit else records
    result = drift(run, records, batch_size=FLAGS.batch_size, max_new_tokens=FLAGS.max_new_tokens)
    print(json.dumps({"workdir": run.workdir, "step": run.step, "data": data_name, **result}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "training workdir or converted vjax checkpoint directory")
    flags.DEFINE_string("tokenizer", None, "tokenizer directory (default: the checkpoint's)")
    flags.DEFINE_string("config", None, "converted checkpoints: experiment config name[:variant]")
    flags.DEFINE_integer("limit", 200, "the first N questions (0: all)")
    flags.DEFINE_integer("batch_size", 8, "questions per generate call")
    flags.DEFINE_integer("max_new_tokens", 12, "longest answer in tokens")
    cli.run(main)
