"""Answering and scoring video questions with a model: greedy generation with the KV cache for batches of
prompts (:func:`answer_prompts`), where an answer stops (:func:`stop_token_ids`, :func:`stop_strings`), multiple
choice scored by the likelihood of each option's answer (:class:`OptionScorer`), and the generation-based
validation of a training run (:class:`Evaluator`). Training, chat and evaluation share it.
"""

from __future__ import annotations

import collections
import copy
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vjax.data import annotations, formats
from vjax.data.formats import FormatSpec
from vjax.data.pipeline import DropSkipped, LoadAndFormat, loss_positions
from vjax.data.validate import TooManyBadRecords
from vjax.generate import generate
from vjax.models.losses import targets_at
from vjax.models.video_llm import VISUAL_KEYS as VISUAL_BATCH_KEYS

TEXT_KEYS = ("input_ids", "attention_mask", "loss_mask")


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


def right_padded(elements: Sequence[Mapping[str, np.ndarray]], length: int) -> dict[str, np.ndarray]:
    """Training elements stacked into a batch, the text keys (:data:`TEXT_KEYS`) right-padded with 0 to
    ``length`` as the training pipeline pads them; every other key stacked as is."""
    batch = {}
    for k in elements[0]:
        arrs = [np.asarray(e[k]) for e in elements]
        if k in TEXT_KEYS:
            arrs = [np.pad(a, (0, length - a.shape[0])) for a in arrs]
        batch[k] = np.stack(arrs)
    return batch


def option_answer(record: Mapping[str, Any], index: int) -> str:
    """The answer a multiple-choice record is trained on, for option ``index``: ``"(B) square"``, or
    ``"square (B)"`` when the record's own answer is written text first
    (:func:`vjax.data.annotations.option_answer` of its ``choices`` in :func:`~vjax.data.annotations.mc_answer_style`
    of its answer)."""
    answers = [t.get("value", "") for t in record.get("conversations", ()) if t.get("from") == "gpt"]
    style = annotations.mc_answer_style(answers[-1], record["choices"]) if answers else "letter"
    return annotations.option_answer(record["choices"], index, style)


def with_answer(record: Mapping[str, Any], answer: str) -> dict:
    """A copy of a conversation record whose last answer (``gpt`` turn) is ``answer``."""
    out = dict(record)
    conv = copy.deepcopy(list(record["conversations"]))
    last = max((i for i, t in enumerate(conv) if t.get("from") == "gpt"), default=None)
    if last is None:
        conv.append({"from": "gpt", "value": answer})
    else:
        conv[last]["value"] = answer
    out["conversations"] = conv
    return out


def _answer_logprob(module, params, batch: Mapping[str, jax.Array]) -> jax.Array:
    """``[B]``: the summed log-probability of each row's supervised tokens (``loss_mask``), the logits computed
    at ``batch["loss_positions"]`` only."""
    visual = {k: batch[k] for k in VISUAL_BATCH_KEYS if k in batch}
    positions = batch["loss_positions"]
    out = module.apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_at=positions, **visual)
    targets, weights = targets_at(batch["input_ids"], batch["loss_mask"], positions)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (picked * weights).sum(axis=1)


class OptionScorer:
    """Multiple choice scored by likelihood, as lm-eval-harness scores it: for every option the record's
    conversation is rendered with that option's answer (:func:`option_answer`, ``"(C) circle"``) exactly as in
    training, and the option whose answer tokens (the template's end-of-answer tokens included, the same for
    every option) have the highest summed log-probability given the video and the prompt is the model's choice.
    Unlike the generated letter this needs no skill at emitting a letter: it asks which answer the model finds
    most likely.

    Each record's video is decoded once (its prompt element is reused for every option); the options of all
    records are batched ``batch_size`` rows at a time, right-padded to a multiple of 64 tokens, the logits taken
    at the supervised positions only (one compiled shape per length).
    """

    def __init__(self, module, spec: FormatSpec, tokenizer: formats.TextTokenizer, *, batch_size: int = 8):
        self.module, self.spec, self.tokenizer, self.batch_size = module, spec, tokenizer, batch_size
        self.full = formats.VideoQAFormat(spec, tokenizer)
        self._fn = jax.jit(lambda params, batch: _answer_logprob(module, params, batch))

    def option_elements(self, record: Mapping[str, Any], element: Mapping[str, np.ndarray]) -> list[dict]:
        """The training elements of every option of ``record``, the visual arrays taken from ``element`` (a
        prompt-only element of the same record: the video is not decoded again)."""
        t = int(np.asarray(element["frame_mask"]).sum()) if "frame_mask" in element else self.spec.num_frames
        visual = {k: v for k, v in element.items() if k not in ("input_ids", "attention_mask", "loss_mask")}
        out = []
        for i in range(len(record["choices"])):
            ids, mask = self.full.text(with_answer(record, option_answer(record, i)), t)
            out.append({**visual, "input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask})
        return out

    def logprobs(self, params, records: Sequence[Mapping[str, Any]],
                 elements: Sequence[Mapping[str, np.ndarray]]) -> list[np.ndarray]:
        """Per record, ``float [num_choices]``: the summed log-probability of each option's answer."""
        rows = [(r, e) for r, el in enumerate(zip(records, elements)) for e in self.option_elements(*el)]
        if not rows:
            return []
        length = -(-max(len(e["input_ids"]) for _, e in rows) // 64) * 64
        supervised = max(int((e["loss_mask"][1:] != 0).sum()) for _, e in rows)
        size = -(-max(supervised, 1) // 8) * 8
        scores = np.zeros(len(rows), np.float64)
        for s in range(0, len(rows), self.batch_size):
            chunk = [e for _, e in rows[s: s + self.batch_size]]
            chunk = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # one compiled shape
            batch = right_padded(chunk, length)
            batch["loss_positions"] = loss_positions(batch["loss_mask"], size)
            got = np.asarray(self._fn(params, batch))
            n = min(self.batch_size, len(rows) - s)
            scores[s: s + n] = got[:n]
        out: list[list[float]] = [[] for _ in records]
        for (r, _), v in zip(rows, scores):
            out[r].append(float(v))
        return [np.asarray(v) for v in out]

    def choose(self, params, records: Sequence[Mapping[str, Any]],
               elements: Sequence[Mapping[str, np.ndarray]]) -> list[int]:
        """Per record, the index of its most likely option."""
        return [int(np.argmax(v)) for v in self.logprobs(params, records, elements)]


class Evaluator:
    """Generation-based validation: the first ``eval.records`` validation records (a fixed seeded
    sample), decoded once (:class:`~vjax.data.validate.TooManyBadRecords` when all of them, or more than
    ``data.max_bad_fraction``, are unreadable); at each call greedy answers with the KV cache
    (``vjax.generate``) scored per ``question_type`` (:func:`vjax.data.formats.score_answer`), plus the
    teacher-forced loss."""

    def __init__(self, module, spec: FormatSpec, tokenizer: formats.TextTokenizer, recs: Sequence[dict], sampler, *,
                 num_records: int, batch_size: int = 8, max_new_tokens: int = 12, frame_size: Any,
                 load_audio: bool = False, max_bad_fraction: float = 0.1, trainer=None, loss_batch: int = 0,
                 loss_length: int = 0):
        """``recs``: validation records; ``num_records`` of them (a seeded sample) are evaluated, ``batch_size``
        prompts at a time, answers of at most ``max_new_tokens``; frames decoded at ``frame_size`` (or by the model's
        ``vjax.data.preprocess.FrameProcessor``). With a
        ``trainer``, the teacher-forced loss over batches of ``loss_batch`` records padded to ``loss_length``."""
        self.module, self.spec, self.tokenizer, self.trainer = module, spec, tokenizer, trainer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        order = np.random.default_rng(0).permutation(len(recs))[:num_records]
        prompt = LoadAndFormat(formats.VideoQAFormat(spec, tokenizer, prompt_only=True), sampler, frame_size,
                               load_audio, max_bad_fraction=max_bad_fraction)
        full = LoadAndFormat(formats.VideoQAFormat(spec, tokenizer), sampler, frame_size, load_audio)
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
            raise TooManyBadRecords(f"nothing to evaluate: {prompt.skips.summary()}")
        prompt.skips.check()  # whatever the number of records (the per-record check waits for 20)
        longest = max((len(p["input_ids"]) for p in self.prompts), default=1)
        self.length = -(-longest // 16) * 16
        self.predictions: list[str] = []
        self.correct: list[bool] = []
        self.loss_batch, self.loss_length = loss_batch, loss_length

    def __len__(self) -> int:
        return len(self.records)

    def generate(self, params) -> list[str]:
        return answer_prompts(self.module, params, self.prompts, self.tokenizer, self.spec,
                              batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, length=self.length)

    def loss(self, params) -> float | None:
        """Teacher-forced loss over full batches of the validation records (padded to the largest bucket)."""
        if self.trainer is None or not self.loss_batch or len(self.full) < self.loss_batch:
            return None
        losses = []
        for s in range(0, len(self.full) - self.loss_batch + 1, self.loss_batch):
            batch = right_padded(self.full[s: s + self.loss_batch], self.loss_length)
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
