"""A model's declaration: everything the rest of vjax needs to know about it, in one place.

Each model file ends with ``SPEC = ModelSpec(...)`` and ``vjax.models.registry`` names the file (one
line). Everything outside the file reads the spec — the registry (config and module classes),
``vjax.convert`` (its conversion module and the Hugging Face architecture names it reads),
``vjax.data.formats.format_spec`` (its chat template, visual prompt pieces, stop strings, audio and
subtitle inputs), ``vjax.data.preprocess`` (the release's frame preprocessing, :class:`Preprocess`), the
experiments (default frame sampler, marker tokens, streaming) — so no code outside a
model file asks for a model by name or probes its config with ``hasattr``.

The spec is plain data: names of config attributes, of templates, samplers and modules, so that
``vjax.models`` imports neither ``vjax.data`` nor ``vjax.convert`` (the dependency arrows point down).

Attribute names refer to the model's config: ``Visual("video", "num_visual_tokens")`` reads
``config.num_visual_tokens``; a count that is a method (``"visual_tokens_for"``) is called with the clip's
real frame count (Chat-UniVi: 1-2 frames are images; Video-ChatGPT: one temporal token per frame beyond 100).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

PIECES = ("video", "frame", "audio")
RESIZES = ("square", "shortest_side", "smart_resize")
RESAMPLERS = ("decord", "pil_bicubic", "torch_nearest", "torch_bilinear")
CROP_OFFSETS = ("floor", "round")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a release turns a decoded RGB frame ``[H, W, 3]`` into the model's pixels: plain data, run by
    ``vjax.data.preprocess.FrameProcessor`` (the side ``S`` is the spec's ``image_size``).

    Attributes:
      resize: ``square``: ``S x S``, the aspect ratio not kept; ``shortest_side``: the short side to ``S``, the long
        one to ``int(S * long / short)`` (transformers' ``shortest_edge``; pytorchvideo's ``ShortSideScale`` floors
        the same way); ``smart_resize``: Qwen2-VL's native resolution, both sides multiples of ``factor`` at the
        frame's aspect with an area in ``[min_pixels, max_pixels]`` (``vjax.data.sampling.smart_resize``).
      resampler: ``decord`` (its scaler, resizing on decode), ``pil_bicubic`` (Pillow's antialiased bicubic on
        uint8, as PIL and torchvision-on-PIL transforms do), ``torch_nearest`` (``F.interpolate`` default mode:
        source ``floor(i * in / out)``), ``torch_bilinear`` (``align_corners=False``, no antialias).
      crop: centre crop to ``S x S`` after the resize; ``crop_offset`` ``floor``: ``(H - S) // 2`` (transformers),
        ``round``: ``round((H - S) / 2)`` (torchvision's ``CenterCropVideo``).
      min_pixels, max_pixels, factor: config attributes of ``smart_resize``'s bounds and side multiple.
      sampler_args: sampler argument -> config attribute, the release's frame choice stored with the model (a
        converted checkpoint's ``preprocessor_config.json``: Qwen2-VL's fps and frame bounds).
      source: where the rule comes from (printed by chat and eval).
    """

    resize: str = "square"
    resampler: str = "decord"
    crop: bool = False
    crop_offset: str = "floor"
    min_pixels: str = ""
    max_pixels: str = ""
    factor: str = ""
    sampler_args: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source: str = ""

    def __post_init__(self):
        for name, value, known in (("resize", self.resize, RESIZES), ("resampler", self.resampler, RESAMPLERS),
                                   ("crop_offset", self.crop_offset, CROP_OFFSETS)):
            if value not in known:
                raise ValueError(f"Preprocess.{name}={value!r} is not one of {known}")
        if self.resampler == "decord" and (self.resize != "square" or self.crop):
            raise ValueError("Preprocess: decord resizes on decode to S x S only (resize='square', no crop)")
        if self.resize == "smart_resize" and not (self.min_pixels and self.max_pixels and self.factor):
            raise ValueError("Preprocess: smart_resize needs the config attributes min_pixels, max_pixels and factor")

    @property
    def native(self) -> bool:
        """The frame size follows each video (chat and eval then size the model per video)."""
        return self.resize == "smart_resize"


@dataclasses.dataclass(frozen=True)
class Visual:
    """One kind of visual slot in the prompt.

    Attributes:
      piece: the template's piece: ``video`` (once per clip), ``frame`` (once per frame), ``audio`` (once per
        clip, only when the data loads audio).
      count: config attribute with the tokens per occurrence — an int, or a method of the clip's real frame
        count.
      id_field: config field holding the placeholder id those slots carry.
      when: config attribute that must be true for the piece to appear (``""``: always).
    """

    piece: str
    count: str
    id_field: str = "placeholder_id"
    when: str = ""

    def __post_init__(self):
        if self.piece not in PIECES:
            raise ValueError(f"visual piece {self.piece!r} is not one of {PIECES}")

    def enabled(self, config: Any, load_audio: bool = True) -> bool:
        return (not self.when or bool(getattr(config, self.when))) and (self.piece != "audio" or load_audio)

    def counts(self, config: Any, num_frames: int) -> int | tuple[int, ...]:
        """Tokens per occurrence: an int, or a tuple indexed by the real frame count ``0..num_frames``."""
        value = getattr(config, self.count)
        if callable(value):
            return tuple(int(value(t)) for t in range(num_frames + 1))
        return int(value)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What vjax needs to know about one model (see the module docstring).

    Attributes:
      name: registry name (``chat_univi``).
      config, module: the frozen config dataclass and the Flax module class.
      template: chat template of ``vjax.data.templates`` (a rule name or the model name).
      template_variant: that template's default variant for this model (``None``: the template's own).
      template_options: keyword arguments of the template (e.g. the system prompt of ``vicuna_v1``).
      visual: the visual pieces of the prompt, in the order the template places them.
      stop_strings: where a generated answer ends (besides EOS).
      sampler: default frame sampler of ``vjax.data.sampling`` (the release's rule), with ``sampler_kwargs``
        (an experiment config's ``data.sampler_kwargs`` override them).
      marker_tokens: config field -> the token a tokenizer spells that id with (resolved from the
        tokenizer when it has the token: the synthetic set's, or a release's added tokens).
      conversion: module of ``vjax.convert`` whose ``layout()`` reads the released checkpoints (``""``: none).
      hf_architectures: ``config.json`` architectures that module reads (``vjax.from_pretrained``).
      hf_model_types: ``config.json`` model types that identify the model whatever ``architectures`` says
        (a release that names a generic class).
      hf_bare_model_types: model types that identify it only when ``config.json`` names no architecture
        (the generic decoder types ``llama``, ``mistral``, ``qwen2``).
      audio: config attribute giving ``(clips, mel_bins, frames)`` of its audio input (``""``: no audio).
      qformer_text: config field with the length of the Q-Former instruction (``""``: none).
      subtitles: the template interleaves subtitles; ``subtitle_words`` is the config attribute capping them.
      streams_frames: config attribute that is true when the module can take the video frame by frame
        (``stream_init`` / ``stream_step``; MA-LMM's memory bank).
      image_size: dotted config path of the frames' side in pixels (``vision.image_size``; Qwen2-VL:
        ``image_size``, its tower takes any size).
      connector: the module's attributes between the tower and the LLM's input projection that stage 0 of the
        tiny recipe pretrains as one part (``experiments.pretrain``'s ``connector``: Video-LLaMA's two Q-Formers,
        MA-LMM's memory-bank Q-Former); the module's ``connector_queries(frames, frame_mask)`` returns their output.
      audio_tower / audio_connector: the module's attribute holding its audio tower (``""``: none) and the
        attributes between that tower and the LLM's input projection, which stage 0 pretrains as the part
        ``audio`` and with the ``connector`` (Video-LLaMA's audio position embedding and audio Q-Former); the
        module's ``audio_connector_queries(audio, audio_mask)`` returns their output.
      token_baseline: config attribute with the visual tokens per clip of the baseline the paper compares
        against, printed beside the model's own (Chat-UniVi: Video-ChatGPT-style pooling of the same features).
      llm: config attribute holding the language model's ``DecoderConfig`` (``""``: the config is one).
      preprocess: the release's frame preprocessing (:class:`Preprocess`).
      frame_shape: config field holding ``(height, width)`` of frames that need not be square (``""``: square
        frames of ``image_size``); set per video by :meth:`with_frame_shape` where ``preprocess.native``.
    """

    name: str
    config: type
    module: type
    template: str = ""
    template_variant: str | None = None
    visual: tuple[Visual, ...] = ()
    stop_strings: tuple[str, ...] = ("</s>",)
    sampler: str = "uniform_floor"
    sampler_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    template_options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    marker_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    conversion: str = ""
    hf_architectures: tuple[str, ...] = ()
    hf_model_types: tuple[str, ...] = ()
    hf_bare_model_types: tuple[str, ...] = ()
    audio: str = ""
    qformer_text: str = ""
    subtitles: bool = False
    subtitle_words: str = ""
    streams_frames: str = ""
    image_size: str = "vision.image_size"
    token_baseline: str = ""
    connector: tuple[str, ...] = ()
    audio_tower: str = ""
    audio_connector: tuple[str, ...] = ()
    llm: str = "llm"
    preprocess: Preprocess = Preprocess()
    frame_shape: str = ""

    def placeholder_ids(self, config: Any) -> tuple[int, ...]:
        """The ids of every visual slot of ``config`` (a chat session never rewinds into them)."""
        return tuple(sorted({int(getattr(config, v.id_field)) for v in self.visual}))

    def can_stream(self, config: Any) -> bool:
        return bool(self.streams_frames) and bool(getattr(config, self.streams_frames))

    def llm_config(self, config: Any) -> Any:
        """The language model's ``DecoderConfig`` inside ``config``."""
        return getattr(config, self.llm) if self.llm else config

    def with_llm(self, config: Any, llm: Any) -> Any:
        """``config`` with its language model's config replaced by ``llm``."""
        return dataclasses.replace(config, **{self.llm: llm}) if self.llm else llm

    def frame_size(self, config: Any) -> int:
        """The side of the frames the model takes, in pixels."""
        value = config
        for part in self.image_size.split("."):
            value = getattr(value, part)
        return int(value)

    def with_geometry(self, config: Any, num_frames: int, image_size: int) -> Any:
        """``config`` with ``num_frames`` frames of ``image_size`` pixels (the data's geometry sizes the model)."""
        def put(node: Any, path: list[str], value: int) -> Any:
            if len(path) == 1:
                return dataclasses.replace(node, **{path[0]: value})
            return dataclasses.replace(node, **{path[0]: put(getattr(node, path[0]), path[1:], value)})

        return put(dataclasses.replace(config, num_frames=num_frames), self.image_size.split("."), image_size)

    def with_frame_shape(self, config: Any, num_frames: int, shape: tuple[int, int]) -> Any:
        """``config`` sized for ``num_frames`` frames of ``shape = (height, width)`` pixels (a native-resolution
        model, per video); a model without a ``frame_shape`` field takes square frames only."""
        h, w = (int(x) for x in shape)
        if not self.frame_shape:
            if h != w:
                raise ValueError(f"{self.name} takes square frames only, got {h}x{w}")
            return self.with_geometry(config, num_frames, h)
        return dataclasses.replace(config, num_frames=int(num_frames), **{self.frame_shape: (h, w)})
