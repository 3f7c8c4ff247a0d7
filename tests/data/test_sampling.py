"""Samplers vs. the formulas in shared/specs, with expected indices written out by hand.

Cases per sampler: a short video, a long one, a 1-frame one and an odd fps (29.97 / 12.5), plus the
rounding cases where the models differ (half-to-even vs. truncation).
"""

import numpy as np
import pytest

from vjax.data import sampling as S


def idx(sample):
    return sample.indices.tolist()


def test_frame_sample_types_and_timestamps():
    s = S.video_llama_uniform(300, 29.97)
    assert s.indices.dtype == np.int64 and s.timestamps.dtype == np.float64
    np.testing.assert_allclose(s.timestamps, np.array([0, 37, 75, 112, 150, 187, 225, 262]) / 29.97)


# --- Video-LLaMA: n = min(8, L), floor(i * L / n) ------------------------------------------------
def test_video_llama_uniform():
    assert idx(S.video_llama_uniform(250, 25.0)) == [0, 31, 62, 93, 125, 156, 187, 218]
    assert idx(S.video_llama_uniform(1000, 25.0)) == [0, 125, 250, 375, 500, 625, 750, 875]
    assert idx(S.video_llama_uniform(5, 25.0)) == [0, 1, 2, 3, 4]  # shorter than 8: every frame
    assert idx(S.video_llama_uniform(1, 25.0)) == [0]
    assert idx(S.video_llama_uniform(300, 29.97)) == [0, 37, 75, 112, 150, 187, 225, 262]


def test_video_llama_headtail_is_seeded_and_split_in_halves():
    a = S.video_llama_headtail(250, 25.0, num_samples=8, seed=3)
    b = S.video_llama_headtail(250, 25.0, num_samples=8, seed=3)
    c = S.video_llama_headtail(250, 25.0, num_samples=8, seed=4)
    assert idx(a) == idx(b) and idx(a) != idx(c)
    head, tail = idx(a)[:4], idx(a)[4:]
    assert head == sorted(head) and tail == sorted(tail)
    assert len(set(head)) == 4 and len(set(tail)) == 4
    assert all(0 <= i < 125 for i in head) and all(125 <= i < 250 for i in tail)
    assert idx(S.video_llama_headtail(1, 25.0, num_samples=8, seed=0)) == [0] * 8
    short = idx(S.video_llama_headtail(4, 25.0, num_samples=8, seed=0))  # with replacement
    assert len(short) == 8 and all(i in (0, 1) for i in short[:4]) and all(i in (2, 3) for i in short[4:])


# --- Video-ChatGPT: seg = (L-1)/T; (round(seg*i) + round(seg*(i+1))) // 2, half-to-even -------------
def test_video_chatgpt_uniform():
    s = idx(S.video_chatgpt_uniform(250, 25.0))  # T = 100, seg = 2.49
    assert len(s) == 100 and s[:4] == [1, 3, 6, 8] and s[-1] == 248
    assert idx(S.video_chatgpt_uniform(5, 25.0)) == [0, 1, 2, 2, 3]  # T = 5, seg = 0.8
    assert idx(S.video_chatgpt_uniform(1, 25.0)) == [0]
    # seg = 2.5: round(2.5) = 2 and round(7.5) = 8 (half-to-even); half-up would give [1, 4, 6, 9].
    assert idx(S.video_chatgpt_uniform(11, 25.0, num_samples=4)) == [1, 3, 6, 9]
    assert len(idx(S.video_chatgpt_uniform(300, 29.97))) == 100


# --- MA-LMM eval: rint(linspace(0, L-1, T)) ---------------------------------------------------------
def test_ma_lmm_uniform():
    assert idx(S.ma_lmm_uniform(250, 10.0, num_samples=20)) == [
        0, 13, 26, 39, 52, 66, 79, 92, 105, 118, 131, 144, 157, 170, 183, 197, 210, 223, 236, 249]
    assert idx(S.ma_lmm_uniform(6, 10.0, num_samples=3)) == [0, 2, 5]  # rint(2.5) = 2
    assert idx(S.ma_lmm_uniform(1, 10.0, num_samples=4)) == [0, 0, 0, 0]
    assert idx(S.ma_lmm_uniform(300, 29.97, num_samples=4)) == [0, 100, 199, 299]  # 99.67, 199.33


def test_ma_lmm_segment_random():
    s = idx(S.ma_lmm_segment_random(100, 10.0, num_samples=4, seed=1))
    assert [i // 25 for i in s] == [0, 1, 2, 3]  # one per segment [0,25) [25,50) [50,75) [75,100)
    assert s == idx(S.ma_lmm_segment_random(100, 10.0, num_samples=4, seed=1))
    assert idx(S.ma_lmm_segment_random(1, 10.0, num_samples=3, seed=0)) == [0, 0, 0]


# --- Chat-UniVi: stride int(round(fps)); >max_frames -> linspace(0, n-1, max, dtype=int) ------------
def test_chat_univi_fps():
    assert idx(S.chat_univi_fps(250, 25.0)) == [0, 25, 50, 75, 100, 125, 150, 175, 200, 225]
    assert idx(S.chat_univi_fps(300, 29.97)) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    assert idx(S.chat_univi_fps(50, 12.5)) == [0, 12, 24, 36, 48]  # round(12.5) = 12
    assert idx(S.chat_univi_fps(1, 25.0)) == [0]
    long = idx(S.chat_univi_fps(3000, 25.0, max_frames=64))  # 120 positions -> 64
    # linspace(0, 119, 64) truncated: 0, 1.89, 3.78, 5.67, 7.56 -> positions 0, 1, 3, 5, 7 (x25)
    assert len(long) == 64 and long[:5] == [0, 25, 75, 125, 175] and long[-1] == 2975


# --- MiniGPT4-video: interval = max(1, int(total/T)); i % interval == 0, first T ---------------------
def test_minigpt4_video_interval():
    assert idx(S.minigpt4_video_interval(250, 25.0, num_samples=45)) == list(range(0, 221, 5))
    assert idx(S.minigpt4_video_interval(100, 25.0, num_samples=45)) == list(range(0, 89, 2))
    assert idx(S.minigpt4_video_interval(30, 29.97, num_samples=45)) == list(range(30))
    assert idx(S.minigpt4_video_interval(30, 29.97, num_samples=45, pad=True)) == list(range(30)) + [29] * 15
    assert idx(S.minigpt4_video_interval(1, 25.0, num_samples=45)) == [0]
    assert idx(S.minigpt4_video_interval(250, 25.0, num_samples=45, total_frames=200)) == list(range(0, 177, 4))


# --- Qwen2-VL: n = L/fps*2 clamped to [4, floor2(min(768, L))], round to even; round(linspace) ---------
def test_qwen2_vl_fps():
    assert idx(S.qwen2_vl_fps(250, 25.0)) == [
        0, 13, 26, 39, 52, 66, 79, 92, 105, 118, 131, 144, 157, 170, 183, 197, 210, 223, 236, 249]
    # n = 21 -> round(10.5) = 10 (half-to-even) -> 20 frames
    assert idx(S.qwen2_vl_fps(105, 10.0)) == [
        0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 55, 60, 66, 71, 77, 82, 88, 93, 99, 104]
    assert len(idx(S.qwen2_vl_fps(300, 29.97))) == 20  # 20.02 -> 20
    assert idx(S.qwen2_vl_fps(10, 25.0)) == [0, 3, 6, 9]  # 0.8 -> min 4
    assert idx(S.qwen2_vl_fps(5, 8.0)) == [0, 1, 3, 4]
    assert idx(S.qwen2_vl_fps(3, 8.0)) == [0, 2]  # max = floor2(3) = 2
    assert idx(S.qwen2_vl_fps(1, 8.0)) == [0, 0]  # documented deviation: repeat to the temporal patch
    long = idx(S.qwen2_vl_fps(3000, 1.0))  # 6000 -> capped at 768
    assert len(long) == 768 and long[0] == 0 and long[-1] == 2999
    assert idx(S.qwen2_vl_fps(250, 25.0, nframes=5)) == [0, 83, 166, 249]  # explicit 5 -> 4


def test_smart_resize():
    assert S.smart_resize(720, 1280) == (728, 1288)
    assert S.smart_resize(10, 10) == (56, 56)  # below min_pixels 56*56: scale up, ceil
    assert S.smart_resize(3000, 4000) == (2996, 4004)
    assert S.qwen2_vl_video_size(360, 640, nframes=20) == (364, 644)  # spec §5.4 example
    # 768 frames: budget max(min(602112, 19267584/768*2), 1.05*100352) = 105369.6 -> scale down, floor
    assert S.qwen2_vl_video_size(720, 1280, nframes=768) == (224, 420)
    with pytest.raises(ValueError, match="aspect ratio"):
        S.smart_resize(1, 300)


# --- CogVLM2-Video -------------------------------------------------------------------------------
def test_cogvlm2_chat_seconds():
    assert idx(S.cogvlm2_chat_seconds(250, 25.0)) == list(range(0, 226, 25)) + [249]  # 11 frames
    assert idx(S.cogvlm2_chat_seconds(1000, 25.0)) == list(range(0, 576, 25))  # capped at 24
    assert idx(S.cogvlm2_chat_seconds(300, 29.97)) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270, 299]
    assert idx(S.cogvlm2_chat_seconds(1, 25.0)) == [0]
    s = S.cogvlm2_chat_seconds(4, 1.0, timestamps=np.array([0.0, 0.9, 2.2, 2.9]))
    assert idx(s) == [0, 1, 2, 3] and s.timestamps.tolist() == [0.0, 0.9, 2.2, 2.9]


def test_cogvlm2_base_linspace():
    s = idx(S.cogvlm2_base_linspace(250, 25.0))  # linspace(0, 249, 24) truncated, step 10.83
    assert len(s) == 24 and s[:4] == [0, 10, 21, 32] and s[-1] == 249
    s = idx(S.cogvlm2_base_linspace(3000, 25.0))  # first 60 s = 1500 frames, step 65.17
    assert s[:4] == [0, 65, 130, 195] and s[-1] == 1499
    assert idx(S.cogvlm2_base_linspace(1, 25.0)) == [0] * 24


# --- Video-LLaMA audio: 8 x 2 s, start_k = k * max(dur-2, 0) / 7 -------------------------------
def test_video_llama_audio_clips():
    c = S.video_llama_audio_clips(10.0)
    np.testing.assert_allclose(c.starts, [k * 8 / 7 for k in range(8)])
    np.testing.assert_allclose(c.ends - c.starts, 2.0)
    assert c.start_samples.tolist() == [0, 18285, 36571, 54857, 73142, 91428, 109714, 128000]
    assert c.end_samples.tolist() == [32000, 50285, 68571, 86857, 105142, 123428, 141714, 160000]
    short = S.video_llama_audio_clips(1.5)  # shorter than a clip: all start at 0
    assert short.start_samples.tolist() == [0] * 8 and short.end_samples.tolist() == [32000] * 8
    cut = S.cut_audio_clips(np.ones(24000, np.float32), short)
    assert cut.shape == (8, 32000) and cut[:, :24000].min() == 1 and cut[:, 24000:].max() == 0


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_frame_counts_are_named(bad):
    with pytest.raises(ValueError, match="num_frames"):
        S.video_llama_uniform(bad, 25.0)


def test_bad_fps_is_named():
    with pytest.raises(ValueError, match="fps"):
        S.qwen2_vl_fps(10, 0.0)
