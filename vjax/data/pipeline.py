"""Grain input pipeline: records -> seeded shuffle -> decode/sample -> format -> bucket-pad -> batch.

::

    loader = make_loader(records, format_fn, PipelineConfig(batch_size=8, worker_count=2),
                         sampler=functools.partial(sampling.video_llama_uniform, num_samples=8))
    it = iter(loader)
    batch = next(it)                 # dict of numpy arrays with a leading batch axis
    state = it.get_state()           # bytes; save it with the model checkpoint
    it2 = iter(make_loader(...)); it2.set_state(state)   # continues exactly where `it` was

Stages (all module-level, picklable; Grain workers are fresh processes that unpickle them):

1. :class:`RecordSource` — a random-access list of records (dicts with an absolute ``video`` path).
2. ``grain.samplers.IndexSampler`` — seeded shuffle per epoch, sharded by ``shard_options`` (use
   :func:`shard_by_jax_process` on multi-host runs so each JAX process reads a disjoint part).
3. :class:`LoadAndFormat` (a ``RandomMap``) — opens the video *inside the worker, per record*, samples
   frames with ``sampler(num_frames, fps[, seed=])``, decodes only those (resized on decode, or at the source
   size and then preprocessed as the model's release does: :mod:`vjax.data.preprocess`), reads
   16 kHz mono audio if asked, then calls the user's ``format_fn(record, frames, audio) -> dict of
   numpy arrays``. The record passed on gets ``frame_indices``, ``timestamps`` (s), ``fps``,
   ``num_frames``. Unreadable videos are skipped, logged once, counted per worker and per kind of
   failure (``count_skips``: delivered with the batches to :class:`SkipCounts`), and not decoded again;
   past ``max_bad_fraction`` (after ``min_records_for_check`` records) the worker raises
   :class:`~vjax.data.validate.TooManyBadRecords`, which Grain re-raises in the main process.
4. ``grain.transforms.Filter`` drops the skipped ones.
5. ``grain.transforms.Batch`` with :class:`BucketPadBatch` — the variable-length keys (text ids,
   masks, variable frame counts) are padded to the smallest static bucket that fits the longest
   element of the batch, so a jitted step compiles once per bucket.

The iterator state (``get_state``/``set_state``) is Grain's; it covers the sampler position and each
worker's progress, with 0 or more workers. :class:`Prefetch` reads a loader's iterator ahead in a thread (the
training command's ``data.prefetch``, off by default) and keeps its state exact.

Notes: skip counts live in each worker process (the limit is checked per worker, once it has seen
``min_records_for_check`` records; use ``prevalidate=True`` for small sets or a global count).
``make_dataset`` runs ``format_fn`` on several threads, so import heavy modules (transformers) at the
top of ``format_fn``'s module, not lazily inside it (lazy imports can race between threads).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import queue
import threading
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from vjax.data import sampling as sampling_lib
from vjax.data.validate import SkipLog, validate_records
from vjax.data.video import UNREADABLE_KINDS, UnreadableVideo, read_audio, read_sampled_frames

FormatFn = Callable[[dict, np.ndarray, "np.ndarray | None"], Mapping[str, np.ndarray]]
_SKIPPED = "__vjax_skipped__"
SKIP_COUNTS = "__vjax_skip_counts__"  # with count_skips: [len(SKIP_KINDS)] skips before this element
SKIP_KINDS = tuple(UNREADABLE_KINDS)


class RecordSource:
    """Random-access data source over a list of record dicts (``len`` and ``[i]``)."""

    def __init__(self, records: Sequence[dict]):
        self._records = list(records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._records[index]

    def __repr__(self) -> str:
        return f"RecordSource({len(self._records)} records)"


def _takes_seed(fn: Callable) -> bool:
    try:
        return "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class LoadAndFormat(grain.transforms.RandomMap):
    """Decode one record's sampled frames (and audio) inside the worker, then ``format_fn``.

    ``sampler(num_frames, fps)`` picks the frames (if it has a ``seed`` parameter it gets one drawn
    from Grain's per-record rng, so random sampling is reproducible and resumable). ``frame_size``
    ``(height, width)`` resizes on decode (decord's scaler); or it is the model's
    :class:`vjax.data.preprocess.FrameProcessor`, which names its decode size (native, or decord's) and turns
    the decoded frames into the release's pixels before ``format_fn``. Output: ``format_fn``'s dict, or a skip
    marker that the following ``Filter`` drops.

    ``cache_mb > 0`` keeps decoded frames (and audio) in memory, keyed by the path and the sampled frame
    indices, up to that many MiB per process (each Grain worker has its own cache; the oldest entries go
    first). A small set that is read for many epochs then decodes each clip once; random samplers still
    hit the cache whenever they draw the same frames again. Cached arrays are returned read-only.

    ``audio_transform(waveform [N]) -> array`` runs once per decoded clip, before the cache; ``format_fn``
    then gets its output as ``audio``. It defaults to ``format_fn.prepare_audio`` when the format has one
    (:class:`vjax.data.formats.VideoQAFormat`: the ImageBind fbank), so a cached clip's audio features are
    not recomputed every epoch.

    A file that failed once is remembered (per process) and skipped again without being decoded again.
    ``count_skips=True`` adds :data:`SKIP_COUNTS` to each element: the records skipped, per kind of failure
    (:data:`SKIP_KINDS`), since the previous element this process delivered; batches carry them to
    :class:`SkipCounts`, which sums them in the training process.
    """

    def __init__(self, format_fn: FormatFn, sampler: Callable, frame_size: Any = None,
                 load_audio: bool = False, audio_sample_rate: int = 16_000, max_bad_fraction: float = 0.1,
                 min_records_for_check: int = 20, video_key: str = "video", cache_mb: float = 0.0,
                 audio_transform: Callable | None = None, count_skips: bool = False):
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.format_fn = format_fn
        self.sampler = sampler
        self.processor = frame_size if callable(frame_size) else None  # a FrameProcessor
        self.frame_size = (self.processor.decode_size if self.processor is not None
                           else tuple(frame_size) if frame_size is not None else None)
        self.load_audio = load_audio
        self.audio_sample_rate = audio_sample_rate
        self.max_bad_fraction = max_bad_fraction
        self.min_records_for_check = min_records_for_check
        self.video_key = video_key
        self.sampler_takes_seed = _takes_seed(sampler)
        self.skips = SkipLog(max_bad_fraction)  # per process: each worker has its own copy
        self.cache = DecodedCache(int(cache_mb * 2**20))
        self.audio_transform = audio_transform or getattr(format_fn, "prepare_audio", None)
        self.count_skips = count_skips
        self._pending = np.zeros(len(SKIP_KINDS), np.int32)  # skips not yet reported (count_skips)

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        """Load and format one record (see the class docstring)."""
        path = record.get(self.video_key)
        seed = int(rng.integers(2**31 - 1))
        sampler = self.sampler
        if self.sampler_takes_seed:
            sampler = functools.partial(sampler, seed=seed)
        try:
            if not isinstance(path, str):
                raise UnreadableVideo(str(path), f"record {record.get('id', '?')} has no {self.video_key!r} path")
            if path in self.skips.skipped:  # known bad: not decoded again
                raise UnreadableVideo(path, self.skips.skipped[path])
            frames, sample, info, audio = self._decode(path, sampler)
        except UnreadableVideo as err:
            self.skips.skip(err.path, err.reason)
            self._pending[SKIP_KINDS.index(err.kind)] += 1
            self.skips.check(self.min_records_for_check)
            return {_SKIPPED: True}
        self.skips.ok()
        self.skips.check(self.min_records_for_check)
        rec = dict(record)
        rec.update(frame_indices=sample.indices, timestamps=sample.timestamps, fps=info.fps,
                   num_frames=info.num_frames)
        out = self.format_fn(rec, frames, audio)
        if not isinstance(out, Mapping):
            raise TypeError(f"format_fn must return a dict of numpy arrays, got {type(out).__name__}")
        out = {k: np.asarray(v) for k, v in out.items()}
        if self.count_skips:
            out[SKIP_COUNTS] = self._pending.copy()
            self._pending[:] = 0
        return out

    def _decode(self, path: str, sampler: Callable):
        """``(frames, sample, info, audio)`` of one record, from the cache when it holds them."""
        # The sample depends only on (frame count, fps, seed), known after the first read of the clip.
        meta = self.cache.get(("meta", path))
        if meta is not None:
            sample = sampler(*meta)
            hit = self.cache.get(_clip_key(path, sample))
            if hit is not None:
                return (hit[0], sample, *hit[1:])
        frames, sample, info = read_sampled_frames(path, sampler, size=self.frame_size)
        if self.processor is not None:
            frames = self.processor(frames)
        audio = read_audio(path, self.audio_sample_rate, duration=info.duration)[0] if self.load_audio else None
        if audio is not None and self.audio_transform is not None:
            audio = np.asarray(self.audio_transform(audio))
        if self.cache.capacity:
            for a in (frames, audio):
                if a is not None:
                    a.setflags(write=False)
            self.cache.put(("meta", path), (info.num_frames, info.fps), 0)
            self.cache.put(_clip_key(path, sample), (frames, info, audio),
                           frames.nbytes + (audio.nbytes if audio is not None else 0))
        return frames, sample, info, audio


def _clip_key(path: str, sample) -> tuple:
    """Cache key of a decoded clip: its path and the frame indices sampled from it."""
    return ("clip", path, tuple(int(i) for i in sample.indices))


class DecodedCache:
    """A byte-bounded FIFO of decoded clips (see :class:`LoadAndFormat`); ``capacity`` 0 disables it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self._items: dict = {}

    def get(self, key):
        """The cached value of ``key`` or None."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key, value, nbytes: int) -> None:
        """Insert ``value`` (``nbytes`` large); evicts the oldest entries to stay within the capacity."""
        if key in self._items or nbytes > self.capacity:
            return
        while self._items and self.size + nbytes > self.capacity:
            old = next(iter(self._items))
            self.size -= self._items.pop(old)[1]
        self._items[key] = (value, nbytes)
        self.size += nbytes

    def __getstate__(self):  # Grain workers start with an empty cache
        return {"capacity": self.capacity, "size": 0, "_items": {}}


class SkipCounts:
    """Wraps the iterator of a loader built with ``count_skips=True``: takes :data:`SKIP_COUNTS` out of every
    batch and sums it; :meth:`take` returns the counts since its previous call (what a training loop logs).
    ``get_state``/``set_state`` and everything else go to the wrapped iterator."""

    def __init__(self, iterator):
        self.iterator = iterator
        self._counts = np.zeros(len(SKIP_KINDS), np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.iterator))
        counts = batch.pop(SKIP_COUNTS, None)
        if counts is not None:
            self._counts += np.asarray(counts, np.int64).reshape(-1, len(SKIP_KINDS)).sum(0)
        return batch

    def take(self) -> dict[str, int]:
        """Records skipped since the previous call: ``skipped_records`` (the total) and ``skipped/<kind>``
        for each kind that occurred."""
        out = {"skipped_records": int(self._counts.sum())}
        out.update({f"skipped/{k}": int(n) for k, n in zip(SKIP_KINDS, self._counts) if n})
        self._counts[:] = 0
        return out

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)

    def close(self) -> None:
        """Close the wrapped iterator where it can be (a :class:`Prefetch` stops its thread)."""
        if callable(getattr(self.iterator, "close", None)):
            self.iterator.close()

    def __getattr__(self, name):
        return getattr(self.iterator, name)


class Prefetch:
    """Reads ``iterator`` ahead in a background thread, so that decoding the next batches overlaps the training
    step where the step leaves the host idle (Grain's ``worker_count=0`` loader decodes in the caller's thread).

    Holds at most ``size`` batches. Checkpoints stay exact: the thread records ``iterator.get_state()`` right after
    each batch it reads, and :meth:`get_state` returns the state of the last batch handed out, not of the ones
    waiting in the queue, so a run restored from it continues with the first batch it had not consumed.
    :meth:`set_state` stops the thread, drops what it had read, restores ``iterator`` and starts again. An error
    in ``iterator`` (``StopIteration`` included) is raised by the ``next`` that reaches it. :meth:`close` stops the
    thread (a daemon: it does not keep the interpreter alive).

    Measured on 2 CPU cores (docs/results.md) this slowed a tiny training run down: the decoding holds the GIL that
    the step's dispatch needs. Grain worker processes (``worker_count``) overlap without that."""

    _END = object()

    def __init__(self, iterator, size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self.iterator, self.size = iterator, int(size)
        self._state = iterator.get_state() if hasattr(iterator, "get_state") else None
        self._thread: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(self.size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(self._queue, self._stop), daemon=True,
                                        name="vjax-prefetch")
        self._thread.start()

    def _fill(self, out: queue.Queue, stop: threading.Event) -> None:
        stateful = hasattr(self.iterator, "get_state")
        while not stop.is_set():
            try:
                item = (next(self.iterator), self.iterator.get_state() if stateful else None, None)
            except BaseException as err:  # noqa: BLE001 -- handed to the consumer, which raises it
                item = (self._END, None, err)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] is self._END:
                return

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            raise RuntimeError("Prefetch was closed")
        batch, state, err = self._queue.get()
        if batch is self._END:
            self._queue.put((batch, state, err))  # every later next() raises it again
            raise err
        self._state = state
        return batch

    def close(self) -> None:
        """Stop the reading thread (the batches it read ahead are dropped)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def get_state(self):
        if self._state is None:
            raise AttributeError(f"{type(self.iterator).__name__} has no get_state")
        return self._state

    def set_state(self, state) -> None:
        self.close()
        self.iterator.set_state(state)
        self._state = state
        self._start()

    def __getattr__(self, name):
        if name == "iterator":  # during __init__ or after a failed one
            raise AttributeError(name)
        return getattr(self.iterator, name)


class BucketedBatches:
    """Batches of several loaders, one per frame-shape bucket (every batch one static shape), interleaved:
    batch ``k`` comes from bucket ``b_k``, drawn with probabilities proportional to ``weights`` (the buckets'
    record counts) by ``numpy.random.default_rng([seed, k])``, so the order depends on ``k`` alone.

    ``get_state``/``set_state``/``start_prefetch`` cover every loader's iterator and ``k`` (the state is JSON
    bytes, as Grain's checkpoint handler stores a ``DataLoader`` iterator's), so a restored run continues
    exactly where it was. Each loader has its own Grain workers."""

    def __init__(self, loaders: Sequence[Any], weights: Sequence[float], seed: int = 0):
        if not loaders or len(loaders) != len(weights) or min(weights) <= 0:
            raise ValueError(f"one positive weight per loader is needed, got {len(loaders)} loaders and "
                             f"weights {list(weights)}")
        self.iterators = [iter(loader) for loader in loaders]
        self.p = np.asarray(weights, np.float64) / float(np.sum(weights))
        self.seed, self.step = int(seed), 0

    def __iter__(self):
        return self

    def bucket(self, k: int) -> int:
        """The bucket of batch ``k``."""
        return int(np.random.default_rng([self.seed, k]).choice(len(self.iterators), p=self.p))

    def __next__(self) -> dict:
        batch = next(self.iterators[self.bucket(self.step)])
        self.step += 1
        return batch

    def get_state(self) -> bytes:
        states = [it.get_state() for it in self.iterators]
        return json.dumps({"step": self.step, "states": [st.decode() if isinstance(st, bytes) else st
                                                         for st in states]}).encode()

    def set_state(self, state: bytes) -> None:
        d = json.loads(state.decode() if isinstance(state, bytes) else state)
        if len(d["states"]) != len(self.iterators):
            raise ValueError(f"the saved data state has {len(d['states'])} buckets, this run {len(self.iterators)}")
        for it, st in zip(self.iterators, d["states"]):
            it.set_state(st.encode() if isinstance(st, str) else st)
        self.step = int(d["step"])

    def start_prefetch(self) -> None:
        for it in self.iterators:
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()


class DropSkipped(grain.transforms.Filter):
    """Drops the records :class:`LoadAndFormat` could not read."""

    def filter(self, element: dict) -> bool:
        """True for a loaded element."""
        return _SKIPPED not in element


def pad_to_bucket(x: np.ndarray, buckets: Sequence[int], value: Any = 0, axis: int = 0) -> np.ndarray:
    """Pad ``x`` along ``axis`` with ``value`` to the smallest bucket >= its length.

    Raises ``ValueError`` naming the length and the largest bucket if it does not fit.
    """
    x = np.asarray(x)
    n = x.shape[axis]
    size = _bucket(n, buckets)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - n)
    return np.pad(x, widths, constant_values=value)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    fits = [b for b in sorted(buckets) if b >= n]
    if not fits:
        raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)} (buckets {sorted(buckets)})")
    return fits[0]


def loss_positions(loss_mask: np.ndarray, size: int) -> np.ndarray:
    """``int32 [B, size]``: per row, the positions ``t`` whose next token is supervised (``loss_mask[t + 1]``),
    ascending, padded with ``L - 1`` (a position of weight 0 in the loss). The model computes its logits at
    these positions only (``VideoLLM.loss`` / ``CausalLM.loss`` read ``batch["loss_positions"]``).

    >>> loss_positions(np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]]), 3).tolist()
    [[1, 2, 4], [0, 3, 4]]
    """
    mask = np.asarray(loss_mask)
    b, length = mask.shape
    out = np.full((b, size), length - 1, np.int32)
    for i in range(b):
        t = np.flatnonzero(mask[i, 1:])
        if len(t) > size:
            raise ValueError(f"row {i} has {len(t)} supervised tokens, more than the {size} loss positions")
        out[i, : len(t)] = t
    return out


def bucketed_loss_positions(loss_mask: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """:func:`loss_positions` of a batch, their count the smallest of ``buckets`` that holds the row with the
    most supervised tokens (the sequence length when none does), so that few shapes compile."""
    mask = np.asarray(loss_mask)
    most = int((mask[:, 1:] != 0).sum(axis=1).max())
    fits = [b for b in sorted(buckets) if b >= most]
    return loss_positions(mask, fits[0] if fits else mask.shape[1])


class BucketPadBatch:
    """Grain ``batch_fn``: pad the keys in ``buckets`` along axis 0 to the smallest bucket that fits
    the longest element of the batch, then stack every key -> ``[B, ...]``.

    ``buckets``: key -> allowed lengths, e.g. ``{"input_ids": (64, 128, 256), "labels": (64, 128,
    256)}``; ``pad_values``: key -> pad value (default 0; use -100 or your ignore id for labels).
    Keys not in ``buckets`` must have equal shapes within the batch.
    ``loss_position_buckets``: when given and the batch has ``loss_mask``, add ``loss_positions [B, S]``
    (:func:`loss_positions`), ``S`` the smallest of these sizes that holds the row with the most supervised
    tokens (or the sequence length when none does).
    """

    def __init__(self, buckets: Mapping[str, Sequence[int]] | None = None,
                 pad_values: Mapping[str, Any] | None = None,
                 loss_position_buckets: Sequence[int] | None = None):
        self.buckets = {k: tuple(sorted(v)) for k, v in (buckets or {}).items()}
        for k, v in self.buckets.items():
            if not v or any(int(b) <= 0 for b in v):
                raise ValueError(f"buckets for {k!r} must be positive lengths, got {v!r}")
        if any(int(b) <= 0 for b in loss_position_buckets or ()):
            raise ValueError(f"loss_position_buckets must be positive counts, got {loss_position_buckets!r}")
        self.pad_values = dict(pad_values or {})
        self.loss_position_buckets = tuple(sorted(loss_position_buckets)) if loss_position_buckets else None

    def __call__(self, elements: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Pad and stack a list of element dicts into one batch dict."""
        keys = list(elements[0])
        out = {}
        for k in keys:
            arrays = [np.asarray(e[k]) for e in elements]
            if k in self.buckets:
                longest = max(a.shape[0] for a in arrays)
                try:
                    size = _bucket(longest, self.buckets[k])
                except ValueError as err:
                    raise ValueError(f"key {k!r}: {err}") from None
                value = self.pad_values.get(k, 0)
                arrays = [np.pad(a, [(0, size - a.shape[0])] + [(0, 0)] * (a.ndim - 1), constant_values=value)
                          for a in arrays]
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise ValueError(f"key {k!r} has different shapes in one batch {sorted(shapes)}; "
                                 f"give it buckets to pad it")
            out[k] = np.stack(arrays)
        if self.loss_position_buckets and "loss_mask" in out:
            out["loss_positions"] = bucketed_loss_positions(out["loss_mask"], self.loss_position_buckets)
        return out


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Loader settings. ``num_epochs=None`` repeats forever. Sharding: this process reads shard
    ``shard_index`` of ``shard_count`` (remainder dropped so shards are equal); or pass
    ``shard_options`` (e.g. :func:`shard_by_jax_process` on multi-host runs), which takes precedence.
    ``frame_size``: ``(height, width)`` resized on decode, or a :class:`vjax.data.preprocess.FrameProcessor`.
    ``cache_mb``: MiB of decoded clips kept in memory per process (:class:`LoadAndFormat`; 0 = off).
    ``count_skips``: batches carry skip counts; wrap the iterator in :class:`SkipCounts`.
    ``loss_position_buckets``: batches carry ``loss_positions`` so that the model's LM head runs on the
    supervised positions only (:class:`BucketPadBatch`); ``None``: no positions, logits everywhere."""

    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    drop_remainder: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 1
    shard_index: int = 0
    shard_count: int = 1
    shard_options: Any = None
    frame_size: Any = None
    load_audio: bool = False
    audio_sample_rate: int = 16_000
    max_bad_fraction: float = 0.1
    min_records_for_check: int = 20
    prevalidate: bool = False
    buckets: Mapping[str, Sequence[int]] | None = None
    pad_values: Mapping[str, Any] | None = None
    cache_mb: float = 0.0
    count_skips: bool = False
    loss_position_buckets: tuple[int, ...] | None = None


def _shard(config: PipelineConfig) -> tuple[int, int]:
    if config.shard_options is not None:
        index, count = int(config.shard_options.shard_index), int(config.shard_options.shard_count)
    else:
        index, count = int(config.shard_index), int(config.shard_count)
    if not 0 <= index < count:
        raise ValueError(f"shard_index must be in [0, shard_count={count}), got {index}")
    return index, count


def _load_and_format(format_fn: FormatFn, config: PipelineConfig, sampler: Callable) -> LoadAndFormat:
    return LoadAndFormat(format_fn, sampler, config.frame_size, config.load_audio, config.audio_sample_rate,
                         config.max_bad_fraction, config.min_records_for_check, cache_mb=config.cache_mb,
                         count_skips=config.count_skips)


def shard_by_jax_process(drop_remainder: bool = True):
    """Shard options giving each JAX process (``jax.process_index()`` of ``jax.process_count()``) a
    disjoint slice of the records."""
    return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)


def _prepare(records: Sequence[dict], config: PipelineConfig, sampler: Callable | None):
    """Checks shared by both builders: batch size, optional pre-validation, default sampler, shard."""
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if config.prevalidate:
        records, _ = validate_records(records, config.max_bad_fraction)
    if not records:
        raise ValueError("no records to load")
    sampler = sampler or functools.partial(sampling_lib.video_llama_uniform, num_samples=8)
    return records, sampler, _shard(config)


def make_loader(
    records: Sequence[dict],
    format_fn: FormatFn,
    config: PipelineConfig = PipelineConfig(),
    sampler: Callable | None = None,
) -> grain.DataLoader:
    """Build the Grain ``DataLoader`` described in the module docstring.

    ``records``: dicts with an absolute ``video`` path (see :mod:`vjax.data.annotations`).
    ``format_fn(record, frames [T,H,W,3] uint8, audio [N] float32 | None) -> dict of arrays`` must be
    picklable (a module-level function or class instance) when ``worker_count > 0``.
    ``sampler`` defaults to Video-LLaMA's 8-frame uniform sampling. With ``prevalidate=True`` every
    video is probed first (:func:`~vjax.data.validate.validate_records`) and bad ones are dropped.
    """
    records, sampler, (index, count) = _prepare(records, config, sampler)
    shard = grain.sharding.ShardOptions(index, count, drop_remainder=count > 1)
    index_sampler = grain.samplers.IndexSampler(
        num_records=len(records), shard_options=shard, shuffle=config.shuffle,
        num_epochs=config.num_epochs, seed=config.seed,
    )
    ops = [
        _load_and_format(format_fn, config, sampler),
        DropSkipped(),
        grain.transforms.Batch(config.batch_size, drop_remainder=config.drop_remainder,
                               batch_fn=BucketPadBatch(config.buckets, config.pad_values,
                                                        config.loss_position_buckets)),
    ]
    return grain.DataLoader(
        data_source=RecordSource(records), sampler=index_sampler, operations=ops,
        worker_count=config.worker_count, worker_buffer_size=config.worker_buffer_size,
    )


def make_dataset(
    records: Sequence[dict],
    format_fn: FormatFn,
    config: PipelineConfig = PipelineConfig(),
    sampler: Callable | None = None,
) -> grain.IterDataset:
    """The same pipeline with Grain's dataset API: ``MapDataset.source -> shard slice -> shuffle ->
    repeat(num_epochs) (reshuffled each epoch) -> random_map(LoadAndFormat) -> to_iter_dataset ->
    filter -> batch(BucketPadBatch) [-> mp_prefetch(worker_count)]``.

    ``iter(dataset)`` gives a ``grain.DatasetIterator`` with ``get_state``/``set_state``. Same
    arguments as :func:`make_loader`; ``shard_options`` only contributes its index/count.
    """
    records, sampler, (index, count) = _prepare(records, config, sampler)
    ds = grain.MapDataset.source(RecordSource(records))
    if count > 1:
        ds = ds[: len(ds) // count * count][index::count]
    ds = ds.seed(config.seed)
    if config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(config.num_epochs).random_map(_load_and_format(format_fn, config, sampler))
    it = ds.to_iter_dataset().filter(DropSkipped()).batch(
        config.batch_size, drop_remainder=config.drop_remainder,
        batch_fn=BucketPadBatch(config.buckets, config.pad_values, config.loss_position_buckets))
    if config.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return it


def resolve_records(records: Sequence[dict], root: str | os.PathLike, keys: Sequence[str] = ("video", "subtitles")
                    ) -> list[dict]:
    """Copy records with relative ``video``/``subtitles`` paths made absolute against ``root`` (as the
    synthetic set stores them)."""
    out = []
    for r in records:
        r = dict(r)
        for k in keys:
            if isinstance(r.get(k), str) and not os.path.isabs(r[k]):
                r[k] = os.path.join(os.fspath(root), r[k])
        out.append(r)
    return out
