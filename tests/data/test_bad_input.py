"""A folder mixing good clips with every kind of bad file yields exactly the good ones, names each bad one."""

import json
import logging
import os

import av
import numpy as np
import pytest

from vjax.data import annotations, validate, video
from vjax.data.synthetic import write_mp4


def _frames(n=12, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def _audio_only(path):
    with av.open(path, "w", format="mp4") as box:
        s = box.add_stream("aac", rate=16000)
        s.layout = "mono"
        wav = np.zeros((1, 16000), np.float32)
        for k in range(0, 16000, 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(wav[:, k:k + 1024]), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, k
            for pkt in s.encode(f):
                box.mux(pkt)
        for pkt in s.encode():
            box.mux(pkt)


def _faststart(path, frames):
    with av.open(path, "w", format="mp4", options={"movflags": "faststart"}) as box:
        s = box.add_stream("libx264", rate=8)
        s.width = s.height = frames.shape[1]
        s.pix_fmt = "yuv420p"
        for fr in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                box.mux(pkt)
        for pkt in s.encode():
            box.mux(pkt)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    good = []
    for i in range(3):
        p = str(d / f"good_{i}.mp4")
        write_mp4(p, _frames(seed=i), 8, np.zeros(12 * 2000, np.float32), 16000)
        good.append(p)
    p = str(d / "good_silent.mp4")  # no audio stream is fine for video
    write_mp4(p, _frames(seed=9), 8)
    good.append(p)
    bad = {}
    open(d / "empty.mp4", "wb").close()
    bad[str(d / "empty.mp4")] = "empty"
    with open(d / "notes.mp4", "w") as f:
        f.write("this is a text file, not a video\n" * 20)
    bad[str(d / "notes.mp4")] = "cannot open"
    data = open(good[0], "rb").read()
    with open(d / "truncated_moov_at_end.mp4", "wb") as f:
        f.write(data[: len(data) // 2])
    bad[str(d / "truncated_moov_at_end.mp4")] = "cannot open"
    _faststart(str(d / "fs.tmp.mp4"), _frames(n=40, seed=4))
    data = open(d / "fs.tmp.mp4", "rb").read()
    os.remove(d / "fs.tmp.mp4")
    with open(d / "truncated_moov_at_start.mp4", "wb") as f:
        f.write(data[: int(len(data) * 0.6)])
    bad[str(d / "truncated_moov_at_start.mp4")] = "truncated or corrupt"
    _audio_only(str(d / "audio_only.mp4"))
    bad[str(d / "audio_only.mp4")] = "no video stream"
    os.mkdir(d / "folder.mp4")
    return d, sorted(good), bad


@pytest.mark.timeout(60)
def test_each_bad_file_raises_unreadable_video(mixed_folder):
    d, good, bad = mixed_folder
    for path, reason in list(bad.items()) + [(str(d / "missing.mp4"), "does not exist")]:
        with pytest.raises(video.UnreadableVideo, match=reason) as info:
            validate.probe(path)
        assert info.value.path == path
    with pytest.raises(video.UnreadableVideo, match="not a regular file"):
        validate.probe(str(d / "folder.mp4"))
    for path in bad:  # the audio reader fails cleanly too (the audio-only file has audio: fine)
        if not path.endswith("audio_only.mp4"):
            with pytest.raises(video.UnreadableVideo):
                video.read_audio(path)
    for path in good:
        validate.probe(path)


@pytest.mark.timeout(60)
def test_scan_folder_yields_exactly_the_good_ones(mixed_folder, caplog):
    d, good, bad = mixed_folder
    with caplog.at_level(logging.WARNING, logger="vjax.data"):
        found, log = validate.scan_videos(d, max_bad_fraction=1.0)
    assert sorted(found) == good
    assert set(log.skipped) == set(bad)  # the folder named x.mp4 is not a file: not listed
    assert log.num_bad == len(bad) and log.seen == len(good) + len(bad)
    for path in bad:
        assert sum(path in r.getMessage() for r in caplog.records) == 1


@pytest.mark.timeout(60)
def test_too_many_bad_records_stops_with_examples(mixed_folder):
    d, good, bad = mixed_folder
    with pytest.raises(validate.TooManyBadRecords, match=r"5 of 9 records bad.*empty\.mp4"):
        validate.scan_videos(d, max_bad_fraction=0.5)


@pytest.mark.timeout(60)
def test_annotation_records_with_bad_lines_and_videos(mixed_folder, caplog, tmp_path):
    d, good, bad = mixed_folder
    lines = []
    for i, p in enumerate(good + sorted(bad) + [str(d / "missing.mp4")]):
        for q in range(2):  # two questions per video: a bad video is logged once, counted twice
            lines.append(json.dumps({"id": f"r{i}_{q}", "video": os.path.relpath(p, tmp_path),
                                     "conversations": [{"from": "human", "value": "<video>\nHi?"},
                                                       {"from": "gpt", "value": "Hi."}]}))
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"id": "novideo", "conversations": []}))
    ann = tmp_path / "ann.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="vjax.data"):
        recs = annotations.load_conversations(ann, max_bad_fraction=0.2)
        assert len(recs) == 2 * (len(good) + len(bad) + 1)
        kept, log = validate.validate_records(recs, max_bad_fraction=1.0)
    assert sorted({r["video"] for r in kept}) == good and len(kept) == 2 * len(good)
    assert set(log.skipped) == set(bad) | {str(d / "missing.mp4")}
    assert log.num_bad == 2 * (len(bad) + 1)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum(f"{ann}:4" in m for m in msgs) == 1 and sum(f"{ann}:6" in m for m in msgs) == 1
    for path in log.skipped:
        assert sum(path in m for m in msgs) == 1
    with pytest.raises(validate.TooManyBadRecords, match="missing.mp4|empty.mp4"):
        validate.validate_records(recs, max_bad_fraction=0.3)
