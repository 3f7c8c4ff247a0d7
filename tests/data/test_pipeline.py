"""Grain pipeline: batches, bucket padding, sharding, bad records, and exact resume from a checkpoint."""

import functools
import json
import time

import grain
import numpy as np
import pytest

from vjax.data import pipeline, sampling
from vjax.data.synthetic import SyntheticConfig, ensure_synthetic_dataset
from vjax.data.validate import TooManyBadRecords


class ByteFormat:
    """A stand-in for a chat template: the question+answer bytes as ids, the frames, the record number."""

    def __call__(self, record, frames, audio):
        human, gpt = record["conversations"]
        ids = np.frombuffer((human["value"] + gpt["value"]).encode(), np.uint8).astype(np.int32) + 1
        out = {"frames": frames, "input_ids": ids, "mask": np.ones_like(ids),
               "row": np.int64(record["row"]), "frame_indices": record["frame_indices"]}
        if audio is not None:
            out["audio_len"] = np.int64(audio.shape[0])
        return out


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    cfg = SyntheticConfig(seed=11, num_train=8, num_val=1, num_test=1, long_every=0, questions_per_clip=2,
                          show_progress=False)
    ds = ensure_synthetic_dataset(tmp_path_factory.mktemp("pipe"), cfg)
    with open(ds.annotations["train"]) as f:
        recs = pipeline.resolve_records([json.loads(l) for l in f], ds.root)
    return [dict(r, row=i) for i, r in enumerate(recs)]  # 16 records


def config(**kw):
    base = dict(batch_size=3, seed=5, num_epochs=2, buckets={"input_ids": (64, 128, 256), "mask": (64, 128, 256)},
                pad_values={"input_ids": 0, "mask": 0})
    base.update(kw)
    return pipeline.PipelineConfig(**base)


HEADTAIL = functools.partial(sampling.video_llama_headtail, num_samples=4)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_shapes_and_padding(records):
    it = iter(pipeline.make_loader(records, ByteFormat(), config(load_audio=True, num_epochs=1)))
    batches = list(it)
    assert len(batches) == 16 // 3  # drop_remainder
    b = batches[0]
    assert b["frames"].shape == (3, 8, 64, 64, 3) and b["frames"].dtype == np.uint8
    assert b["input_ids"].shape[1] in (64, 128, 256) and b["mask"].shape == b["input_ids"].shape
    lengths = b["mask"].sum(axis=1)
    for row, n in zip(b["input_ids"], lengths):
        assert (row[:n] > 0).all() and (row[n:] == 0).all()
    assert (b["audio_len"] > 16000 * 2 - 1).all()  # >= 2 s of 16 kHz audio
    rows = np.concatenate([x["row"] for x in batches])
    assert len(set(rows.tolist())) == len(rows) == 15  # one epoch, shuffled, no repeats


def test_frame_size_resizes_on_decode(records):
    b = next(iter(pipeline.make_loader(records, ByteFormat(), config(frame_size=(32, 48)))))
    assert b["frames"].shape == (3, 8, 32, 48, 3)


def test_bucket_pad_batch_errors():
    fn = pipeline.BucketPadBatch({"ids": (4, 8)})
    out = fn([{"ids": np.arange(3)}, {"ids": np.arange(5)}])
    assert out["ids"].tolist() == [[0, 1, 2, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]]
    with pytest.raises(ValueError, match="'ids': length 9 exceeds the largest bucket 8"):
        fn([{"ids": np.arange(9)}])
    with pytest.raises(ValueError, match="'x' has different shapes"):
        fn([{"ids": np.arange(2), "x": np.zeros(2)}, {"ids": np.arange(2), "x": np.zeros(3)}])
    assert pipeline.pad_to_bucket(np.ones((2, 3)), (4,), value=-1, axis=1).tolist() == [[1, 1, 1, -1]] * 2


@pytest.mark.parametrize("build", [pipeline.make_loader, pipeline.make_dataset], ids=["DataLoader", "Dataset"])
def test_shards_are_disjoint_and_cover(records, build):
    seen = []
    for i in range(2):
        cfg = config(num_epochs=1, batch_size=1, shard_index=i, shard_count=2)
        seen.append([int(b["row"][0]) for b in build(records, ByteFormat(), cfg)])
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(16))
    cfg = config(num_epochs=1, batch_size=1, shard_options=grain.sharding.ShardOptions(1, 2))
    assert sorted(int(b["row"][0]) for b in build(records, ByteFormat(), cfg)) == sorted(seen[1])


def test_bad_records_are_skipped_and_too_many_stop(records, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video")
    mixed = records[:8] + [dict(records[0], video=str(bad), row=100), dict(records[0], video="/nope.mp4", row=101)]
    rows = [int(r) for b in pipeline.make_loader(mixed, ByteFormat(), config(num_epochs=1, batch_size=1,
                                                                           max_bad_fraction=0.5))
            for r in b["row"]]
    assert sorted(rows) == list(range(8))
    with pytest.raises(TooManyBadRecords, match="broken.mp4|nope.mp4"):
        list(pipeline.make_loader(mixed, ByteFormat(), config(num_epochs=1, batch_size=1, max_bad_fraction=0.05,
                                                               min_records_for_check=5)))
    kept = pipeline.make_loader(mixed, ByteFormat(), config(num_epochs=1, batch_size=1, prevalidate=True,
                                                             max_bad_fraction=0.5))
    assert len(kept._data_source) == 8


def test_bad_files_are_counted_per_kind_and_decoded_once(records, tmp_path, monkeypatch):
    """Two epochs over 8 good records, a corrupt clip and a missing one (2 records each): every skipped record
    is counted in the batches' skip counts by kind, and each bad file is opened once, not at every draw."""
    bad = tmp_path / "truncated.mp4"
    bad.write_bytes(open(records[0]["video"], "rb").read()[:3000])
    mixed = records[:8] + [dict(records[0], video=str(bad), row=100 + i) for i in range(2)] + \
        [dict(records[0], video=str(tmp_path / "gone.mp4"), row=200 + i) for i in range(2)]
    calls = []
    real = pipeline.read_sampled_frames
    monkeypatch.setattr(pipeline, "read_sampled_frames",
                        lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    it = pipeline.SkipCounts(iter(pipeline.make_loader(
        mixed, ByteFormat(), config(num_epochs=2, batch_size=1, max_bad_fraction=0.5, count_skips=True))))
    rows = [int(b["row"][0]) for b in it]
    assert sorted(rows) == sorted(list(range(8)) * 2)
    assert it.take() == {"skipped_records": 8, "skipped/cannot_open": 4, "skipped/missing": 4}
    assert it.take() == {"skipped_records": 0}  # counts since the previous call
    # each bad file is tried once, then remembered; each good one is decoded at each of its draws (no cache)
    assert calls.count(str(bad)) == 1 and calls.count(str(tmp_path / "gone.mp4")) == 1
    assert len(calls) == 2 + 16


def test_prefetch_reads_ahead_and_checkpoints_the_batches_handed_out(records):
    """The read-ahead thread does not change the stream; its state is that of the last batch consumed (the thread
    has read further), so a loader restored from it continues with the first batch not consumed; after
    ``set_state`` the thread restarts from the restored position; the end and errors reach the consumer."""
    cfg = config()
    plain = list(pipeline.make_loader(records, ByteFormat(), cfg, sampler=HEADTAIL))
    inner = iter(pipeline.make_loader(records, ByteFormat(), cfg, sampler=HEADTAIL))
    it = pipeline.Prefetch(inner, size=3)
    first = [next(it) for _ in range(4)]
    state = it.get_state()
    deadline = time.time() + 30
    while it._queue.qsize() < 3 and time.time() < deadline:  # the thread has read ahead of the consumer
        time.sleep(0.01)
    assert inner.get_state() != state
    rest = list(it)  # StopIteration at the end of the two epochs reaches the consumer
    assert_batches_equal(first + rest, plain)
    with pytest.raises(StopIteration):
        next(it)  # and again

    fresh = iter(pipeline.make_loader(records, ByteFormat(), cfg, sampler=HEADTAIL))
    fresh.set_state(state)
    assert_batches_equal(list(fresh), rest)
    again = pipeline.Prefetch(iter(pipeline.make_loader(records, ByteFormat(), cfg, sampler=HEADTAIL)))
    next(again)
    again.set_state(state)
    assert_batches_equal(list(again), rest)
    again.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(again)

    def broken():
        yield {"x": np.zeros(2)}
        raise OSError("disk gone at batch 2")

    failing = pipeline.Prefetch(broken())
    assert next(failing)["x"].shape == (2,)
    with pytest.raises(OSError, match="batch 2"):
        next(failing)
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        pipeline.Prefetch(iter([]), size=0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("build", [pipeline.make_loader, pipeline.make_dataset], ids=["DataLoader", "Dataset"])
def test_resume_from_iterator_state(records, workers, build):
    cfg = config(worker_count=workers)
    k = 4
    it = iter(build(records, ByteFormat(), cfg, sampler=HEADTAIL))
    first = [next(it) for _ in range(k)]
    state = it.get_state()
    rest = list(it)  # the uninterrupted run goes on from the same iterator
    full = first + rest
    assert len(full) == 32 // 3  # two epochs of 16 records, batches of 3
    rows = np.concatenate([b["row"] for b in full]).tolist()
    assert sorted(set(rows)) == list(range(16)) and max(rows.count(r) for r in rows) <= 2
    if workers == 0:  # taking the state does not disturb the stream: same as a run never checkpointed
        assert_batches_equal(full, list(build(records, ByteFormat(), cfg, sampler=HEADTAIL)))

    fresh = iter(build(records, ByteFormat(), cfg, sampler=HEADTAIL))
    fresh.set_state(state)
    assert_batches_equal(list(fresh), rest)
    # The random head-tail frame choice is part of what resumes: it differs between records.
    assert len({tuple(x) for b in full for x in b["frame_indices"]}) > 1


@pytest.mark.parametrize("sampler", [None, HEADTAIL], ids=["uniform", "headtail"])
def test_decoded_cache_gives_the_same_batches_and_decodes_each_clip_once(records, monkeypatch, sampler):
    calls = []
    real = pipeline.read_sampled_frames

    def counting(path, *args, **kw):
        calls.append(path)
        return real(path, *args, **kw)

    monkeypatch.setattr(pipeline, "read_sampled_frames", counting)
    plain = list(pipeline.make_loader(records, ByteFormat(), config(load_audio=True), sampler=sampler))
    n_plain = len(calls)
    calls.clear()
    cached = list(pipeline.make_loader(records, ByteFormat(), config(load_audio=True, cache_mb=64), sampler=sampler))
    assert_batches_equal(cached, plain)  # two epochs: frames, audio and frame indices identical
    assert n_plain == 32  # two epochs of 16 records (8 clips, 2 questions each)
    if sampler is None:  # deterministic sampling: every one of the 8 clips is decoded once
        assert sorted(set(calls)) == sorted({r["video"] for r in records}) and len(calls) == 8
    # Random head-tail frames: each draw is keyed by its frame indices, so no stale frames are served
    # (the batches above are equal) and a clip is decoded again when new indices come.


def test_decoded_cache_stays_within_its_capacity():
    cache = pipeline.DecodedCache(100)
    for i in range(5):
        cache.put(i, f"v{i}", 30)
    assert cache.size == 90 and [cache.get(i) for i in range(5)] == [None, None, "v2", "v3", "v4"]
    cache.put("big", "x", 101)  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("big") is None and cache.size == 90
    with pytest.raises(ValueError, match="cache_mb must be >= 0, got -1"):
        pipeline.LoadAndFormat(ByteFormat(), HEADTAIL, cache_mb=-1)


def test_audio_features_are_computed_once_per_clip_and_cached(records, monkeypatch):
    """A format with ``prepare_audio`` (Video-LLaMA's ImageBind fbank) gets it applied before the decoded-clip
    cache: two epochs compute each clip's fbank once and give the same batches as the uncached loader."""
    from vjax.data import formats

    spec = formats.FormatSpec("video_llama", (("video", 13, 2), ("audio", 13, 2)), 4, template_variant="vicuna",
                              audio_clips=2, audio_mel_bins=16, audio_frames=32)
    fmt = formats.VideoQAFormat(spec, formats.TextTokenizer(records[0]["video"].rsplit("/videos/", 1)[0] + "/tokenizer"))
    calls = []
    real = formats.imagebind_audio_features

    def counting(wav, *args, **kw):
        calls.append(len(wav))
        return real(wav, *args, **kw)

    monkeypatch.setattr(formats, "imagebind_audio_features", counting)
    cfg = dict(load_audio=True, buckets={"input_ids": (128, 256), "attention_mask": (128, 256),
                                         "loss_mask": (128, 256)}, pad_values=None)
    plain = list(pipeline.make_loader(records, fmt, config(**cfg)))
    assert len(calls) == 32  # two epochs of 16 records
    calls.clear()
    cached = list(pipeline.make_loader(records, fmt, config(**cfg, cache_mb=64)))
    assert len(calls) == 8  # the 8 clips, once each
    assert_batches_equal(cached, plain)
    assert cached[0]["audio"].shape == (3, 2, 16, 32) and cached[0]["audio"].dtype == np.float32
    # the element never shares memory with the cache
    assert cached[0]["audio"].flags.writeable


def _frames_only(record, frames, audio):
    return {"frames": frames, "id": np.int32(record["n"])}


def test_frame_shape_buckets_interleave_with_static_shapes_and_resume(tmp_path):
    """Clips of two aspect ratios, one loader per frame-shape bucket (each batch one shape), interleaved by
    ``BucketedBatches``; its state restores the exact continuation."""
    from vjax.data.preprocess import FrameProcessor, nearest_bucket
    from vjax.data.synthetic import write_mp4

    buckets = ((32, 32), (32, 64))
    rng = np.random.default_rng(0)
    recs = {b: [] for b in buckets}
    for n, (h, w) in enumerate([(48, 48), (64, 64), (40, 96), (48, 112), (64, 60), (36, 80)]):
        path = str(tmp_path / f"{n}.mp4")
        write_mp4(path, rng.integers(0, 255, (6, h, w, 3), dtype=np.uint8), fps=6)
        recs[buckets[nearest_bucket(h, w, buckets)]].append({"video": path, "n": n})
    assert [len(r) for r in recs.values()] == [3, 3]

    def make():
        loaders = [pipeline.make_loader(recs[b], _frames_only, pipeline.PipelineConfig(
            batch_size=2, num_epochs=None, frame_size=FrameProcessor("smart_resize", "pil_bicubic", 32, native=False,
                                                                     buckets=(b,))),
            sampler=functools.partial(sampling.uniform_floor, num_samples=2)) for b in buckets]
        return pipeline.BucketedBatches(loaders, [3, 3], seed=1)

    it = make()
    first = [next(it) for _ in range(4)]
    assert {b["frames"].shape[2:4] for b in first} == set(buckets)  # both shapes, each batch one of them
    for b in first:
        want = buckets[0] if b["frames"].shape[2:4] == buckets[0] else buckets[1]
        assert set(b["id"].tolist()) <= {r["n"] for r in recs[want]}
    state = it.get_state()
    after = [next(it) for _ in range(4)]
    again = make()
    again.set_state(state)
    assert_batches_equal(after, [next(again) for _ in range(4)])
    with pytest.raises(ValueError, match="buckets"):
        pipeline.BucketedBatches([[]], [1]).set_state(state)  # a run with another number of buckets
