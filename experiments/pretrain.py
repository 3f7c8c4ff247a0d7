"""Stage 0 of the tiny runs: a vision tower and an LLM pretrained on the synthetic set, as every paper starts
from a pretrained CLIP/EVA tower and a pretrained LLM.

    python -m experiments.pretrain --config=chat_univi            # build (or find) both parts, print their figures
    python -m experiments.train --config=chat_univi               # does the same first (``stage0.parts``)

* **tower** (``vision``): the model's own tower (``model.vision``, the tiny config of the run) with two linear heads
  on the features the model reads (CLIP: the penultimate block's patch tokens), trained to name, for every patch of a
  frame, the colour and the shape of the object covering it (0 = background; ``vjax.data.synthetic.patch_labels``).
  Frames are rendered from the training clips' ground truth at random times (so never the same noise twice) and
  preprocessed as the run's frames (the model's resize, its mean and std). With ``tower_position_weight > 0`` a third
  linear head regresses each patch's own (row, column), so that the features keep where they are (trained on colour
  and shape alone, a linear probe reads the column back with R^2 0.02; with the head, 0.97; docs/results.md). The
  heads are dropped afterwards. Qwen2-VL's ViT reads each frame as a still image (both temporal patches the same
  frame, as the release packs images), its per-patch features (before the merger) brought back to row-major order.
* **audio tower** (``audio``): for a model with an audio branch (Video-LLaMA: ``ModelSpec.audio_tower``), its audio
  tower (ImageBind's at tiny size) with one linear head on the pooled embedding the model reads, trained to name, for
  each 2 s fbank window the model reads, the pitch of the window's first, second, ... beep or "none"
  (:func:`beep_slots`), so that how many beeps a window holds and which are high are both linear in its embedding,
  as the image tower's patches name their objects. The audio is rendered from the training clips' ground truth with
  fresh noise each time and turned into the model's input by the run's format (``prepare_audio``: the release's
  ImageBind fbank), as training does with the decoded track. The papers start from ImageBind, pretrained on
  audio-image pairs; at tiny size the beeps stand in for what it hears. With this part the connector learns the audio
  branch too: the audio Q-Former's token ``k`` names the pitch of the clip's ``k``-th beep or "none", on the frozen
  stage-0 audio tower.
* **LLM** (``llm``): the model's own decoder trained on text: each training question of the set with its clip
  described in words (``vjax.data.synthetic.description``: objects in order of appearance, motion, appearance time,
  beeps, subtitle) where the record's ``<video>`` marker stands (``lm_layout="slots"``: each part where the model's
  tokens that carry it go, :func:`slotted_pieces`), rendered by the model's chat template exactly as in training
  (visual placeholders left out), plus "Describe the video." -> the caption. It learns to look an attribute up in its
  context and to answer with an option's letter before it ever sees a video. Loss: the answer tokens (weight 1)
  and every other token (weight ``text_weight``). An LLM with visual experts (CogVLM2-Video's) trains only its
  language experts on text; the model gets its vision experts as copies of them (CogVLM's initialisation,
  ``vjax.layers.visual_expert.experts_from_language``), the cache keeps the part as trained.

* **connector** (``connector``): for the models whose visual tokens come out of Q-Formers (Video-LLaMA, MA-LMM:
  ``ModelSpec.connector`` names the modules), those modules on top of the frozen stage-0 tower, with one linear head
  shared by the query outputs (the tokens before the LLM's projection): token ``k`` is trained to name the colour,
  the shape and the motion of the clip's ``k``-th object in order of appearance (or "none" past the last one) and
  to place it (appearance time, start and end position; :func:`object_slots`), from the ``num_frames`` frames the
  model reads (one at random in each of T equal segments: MA-LMM's training sampler). Both papers start from a
  pretrained Q-Former (BLIP-2's, trained on image-text pairs before it ever meets the LLM); at tiny size the clips'
  ground truth stands in for their text, one object per token so that the LLM can read every token the same way
  (a Chat-UniVi token is a cluster of one object's patches; tokens trained instead to draw the frames' colour maps
  between them varied as much but the LLM never read them: docs/results.md). It needs the ``vision`` part (listed
  before it) and is keyed by that part's key too. Video-LLaMA's video Q-Former is random in its paper (trained in
  its stage 1 on WebVid-2M); here it is pretrained with the image Q-Former, as one connector.

Every part is cached once per machine, like the synthetic set: ``~/.cache/vjax/pretrained/<part>-<hash>/`` holds
``params.safetensors`` and ``manifest.json`` (the recipe, its held-out figures, the seconds it took); the hash
covers the part's config, the synthetic set, the template, the recipe and ``RECIPE_VERSION``, so a change to any of
them builds a new one and an unchanged recipe is found again. Why cached rather than shipped: the parts depend on
the run's config (tower patch size, LLM width, vocabulary, template), which any ``--config.`` override may change;
a build takes about 12 minutes on two cores (tower 2, LLM 10; a connector 1.5 more; Video-LLaMA's audio tower 2.5 and
audio connector 1 more), and a shipped file would fit one config only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

RECIPE_VERSION = 1
# "vision" and "llm": the attribute names of the tower and the decoder in every model of vjax.models; "audio": the
# audio tower, under the attribute its spec's ``audio_tower`` names; "connector": the attributes its spec's
# ``connector`` (and, with the audio part, ``audio_connector``) names. Built in this order (the connector is trained
# on the built towers).
PARTS = ("vision", "audio", "llm", "connector")
LM_LAYOUTS = ("question", "slots")  # Recipe.lm_layout
TOWERS = ("clip", "eva", "eva2", "qwen2_vl")  # towers the tower recipe trains (Qwen2-VL's: each frame a still image)
HELD_OUT = 32  # held-out scenes: the first clips of the val seed stream (the set's val clips, however many it has)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Steps, batch and learning rate of each part (``stage0.*`` of an experiment config)."""

    tower_steps: int = 1500
    tower_batch: int = 64  # frames per step
    tower_lr: float = 2e-3
    # loss weight of each patch's own (row, column), regressed from its feature by a linear head (0: no such loss;
    # the tiny default, see docs/results.md: it did not make motion visible and cost shape)
    tower_position_weight: float = 0.0
    lm_steps: int = 1200
    lm_batch: int = 8  # texts per step
    lm_turns: int = 4  # questions (and the caption) about one description per text: it is read once for all
    lm_scenes: int = 6000  # fresh scenes described (beyond the set's training clips, from the same seed stream)
    lm_lr: float = 2e-3
    text_weight: float = 0.1  # loss weight of the non-answer tokens of the LLM's texts
    # where the LLM's texts describe the clip (LM_LAYOUTS): "question", where the record's <video> marker stands
    # (before the question); "slots", where the model's visual tokens go (lm_texts)
    lm_layout: str = "question"
    audio_steps: int = 1500
    audio_batch: int = 32  # clips per step (each of their fbank windows a training example)
    audio_lr: float = 2e-3
    audio_connector_steps: int = 1000  # the audio branch's connector, with the audio part (its own loop)
    connector_steps: int = 3000
    connector_batch: int = 16  # clips per step
    connector_lr: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0

    @classmethod
    def from_config(cls, stage0) -> "Recipe":
        return cls(**{f.name: stage0[f.name] for f in dataclasses.fields(cls) if f.name in stage0})


def cache_root() -> str:
    """``$VJAX_CACHE/pretrained`` (default ``~/.cache/vjax/pretrained``)."""
    return os.path.join(os.environ.get("VJAX_CACHE", os.path.expanduser("~/.cache/vjax")), "pretrained")


def parse_parts(value: str) -> tuple[str, ...]:
    """``"llm,vision"`` -> ``("vision", "llm")`` (in ``PARTS`` order); ``""`` -> ``()``. Raises ValueError naming an
    unknown part, or a connector without the tower it is trained on."""
    parts = {p.strip() for p in str(value).split(",") if p.strip()}
    bad = sorted(parts - set(PARTS))
    if bad:
        raise ValueError(f"unknown part(s) {bad}; known: {', '.join(PARTS)}")
    if "connector" in parts and "vision" not in parts:
        raise ValueError("the connector part is trained on the stage-0 tower: list 'vision' too")
    return tuple(p for p in PARTS if p in parts)


# ------------------------------------------------------------------------------------------------ cache
# Config fields that change how a model runs (its memory) but not what it computes, added after parts were first
# cached: left out of a part's key, so that the parts cached before they existed are found again. (Older fields of
# that kind, such as remat_policy or scan_layers, stay in: leaving them out now would lose every part cached since.)
EXECUTION_ONLY_FIELDS = ("grads_in_place", "mlp_chunks")


def _config_key(config: Any) -> dict:
    """``dataclasses.asdict(config)`` without :data:`EXECUTION_ONLY_FIELDS` (at any depth)."""
    def strip(d):
        return {k: strip(v) for k, v in d.items() if k not in EXECUTION_ONLY_FIELDS} if isinstance(d, dict) else d

    return strip(dataclasses.asdict(config))


def part_key(part: str, model_config: Any, recipe: Recipe, synthetic_hash: str, template: str,
             audio: bool = False) -> dict:
    """What a part's parameters are a function of (hashed into its cache directory). The connector's: the model's
    config but its LLM, and the key of the tower it is trained on (``audio``: and of the audio tower, when the
    connector learns the audio branch too)."""
    if part == "connector":
        sub = {k: v for k, v in _config_key(model_config).items() if k != "llm"}
        key = {"part": part, "recipe_version": RECIPE_VERSION, "config": sub, "synthetic": synthetic_hash,
               "tower": part_key("vision", model_config, recipe, synthetic_hash, template),
               "recipe": {k: getattr(recipe, k) for k in ("connector_steps", "connector_batch", "connector_lr",
                                                          "warmup_steps", "seed")}}
        if audio:  # added with the audio part: a connector without it keeps the key it had before
            key["audio_tower"] = part_key("audio", model_config, recipe, synthetic_hash, template)
            key["recipe"]["audio_connector_steps"] = recipe.audio_connector_steps
        return key
    if part == "audio":
        sub = {"audio": _config_key(model_config.audio), "clips": model_config.num_audio_clips}
        fields = ("audio_steps", "audio_batch", "audio_lr")
    else:
        sub = _config_key(getattr(model_config, part))
        fields = ("tower_steps", "tower_batch", "tower_lr") if part == "vision" else (
            "lm_steps", "lm_batch", "lm_lr", "text_weight", "lm_turns", "lm_scenes")
    if part == "vision" and recipe.tower_position_weight:  # added later: at 0, towers cached before it stay valid
        fields += ("tower_position_weight",)
    if part == "llm" and recipe.lm_layout != "question":  # added later: LLMs cached before it stay valid
        fields += ("lm_layout",)
    return {"part": part, "recipe_version": RECIPE_VERSION, "config": sub, "synthetic": synthetic_hash,
            "template": template if part == "llm" else "",
            "recipe": {k: getattr(recipe, k) for k in fields + ("warmup_steps", "seed")}}


def part_dir(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return os.path.join(cache_root(), f"{key['part']}-{digest}")


def load_part(directory: str) -> tuple[dict, dict] | None:
    """``(params, manifest)`` of a complete cached part, or None (missing, or written only in part)."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    from vjax.pytree import unflatten_params  # noqa: PLC0415

    try:
        with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        flat = load_file(os.path.join(directory, "params.safetensors"))
    except (OSError, ValueError):
        return None
    return unflatten_params(flat), manifest


def save_part(directory: str, params: dict, manifest: dict) -> None:
    """Parameters then the manifest, each written to a temporary name and renamed: a crash leaves no manifest, so
    the part is rebuilt."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    from vjax.pytree import flatten_params  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_params(params).items()}
    tmp = os.path.join(directory, "params.safetensors.tmp")
    save_file(flat, tmp)
    os.replace(tmp, os.path.join(directory, "params.safetensors"))
    with open(os.path.join(directory, "manifest.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, default=str)
    os.replace(os.path.join(directory, "manifest.json.tmp"), os.path.join(directory, "manifest.json"))


# ------------------------------------------------------------------------------------------------ fitting
def fit(loss_fn: Callable, params: dict, batches: Iterator[dict], steps: int, lr: float, warmup: int,
        desc: str, progress: bool = True) -> tuple[dict, list[float]]:
    """AdamW (weight decay 0.01, clip 1.0, warmup then cosine to 0) on ``loss_fn(params, batch) -> (loss, aux)`` for
    ``steps`` steps; returns the parameters and the loss of every 50th step."""
    import jax  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt = tx.init(params)

    @jax.jit
    def step(p, o, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    curve = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, file=sys.stdout)
    for i in bar:
        params, opt, loss = step(params, opt, next(batches))
        if i % 50 == 0 or i == steps - 1:
            curve.append(float(loss))
            bar.set_postfix(loss=f"{curve[-1]:.4f}")
    bar.close()
    return jax.device_get(params), curve


# ------------------------------------------------------------------------------------------------ tower
def tower_batches(scenes: list[dict], fmt, frames_fn, grid: int, batch: int, seed: int) -> Iterator[dict]:
    """Endless batches ``{"frames": float32 [B, S, S, 3], "colour", "shape": int32 [B, grid * grid]}``: a random
    frame of a random clip, rendered with fresh noise, resized by ``frames_fn`` (the run's frame processor) and
    normalised by ``fmt`` (the run's format)."""
    from vjax.data.synthetic import patch_labels, render_frames  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    while True:
        frames, colour, shape = [], [], []
        for k in rng.integers(len(scenes), size=batch):
            scene = scenes[int(k)]
            f = int(rng.integers(scene["num_frames"]))
            frames.append(render_frames(scene, int(rng.integers(2**31)), indices=[f])[0])
            c, s = patch_labels(scene, f, grid)
            colour.append(c.reshape(-1))
            shape.append(s.reshape(-1))
        yield {"frames": fmt.normalize(frames_fn(np.stack(frames))), "colour": np.stack(colour),
               "shape": np.stack(shape)}


def tower_grid(vision_config, frame_size: int) -> tuple[int, int]:
    """Patches per side of the features the model reads from a ``frame_size``-px frame: the tower's own grid, or
    for Qwen2-VL's native-resolution ViT the frame's side over its patch size."""
    if vision_config.tower == "qwen2_vl":
        return (frame_size // vision_config.patch_size,) * 2
    return tuple(vision_config.grid)


def rows_from_merge_order(x, grid: tuple[int, int], merge: int):
    """``[B, gh * gw, C]`` patch features in Qwen2-VL's packing order (``merge x merge`` blocks contiguous, blocks
    row-major) -> the same in row-major patch order, as ``patch_labels`` and every other tower."""
    (gh, gw), m, b = grid, merge, x.shape[0]
    x = x.reshape(b, gh // m, gw // m, m, m, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, x.shape[-1])


def _tower_probe(vision_config, grid: tuple[int, int], n_colours: int, n_shapes: int, position: bool):
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vjax.models.encoders import Encoder, qwen2_vl_vision_inputs  # noqa: PLC0415
    from vjax.models.qwen2_vl import qwen2_vl_patchify  # noqa: PLC0415

    heads = {"colour": n_colours, "shape": n_shapes, **({"position": 2} if position else {})}

    def packed(tower, frames):
        """Qwen2-VL: each frame a still image (its two temporal patches the same frame, as the release's images),
        packed in merge-block order; features back in row-major patch order ``[B, g * g, C]``."""
        v, (gh, gw) = vision_config, grid
        m, b = v.spatial_merge_size, frames.shape[0]
        pix = jax.vmap(lambda f: qwen2_vl_patchify(
            jnp.repeat(f[None], v.temporal_patch_size, 0), v.patch_size, v.temporal_patch_size, m))(frames)
        pos, seg = qwen2_vl_vision_inputs([(1, gh, gw)] * b, m)
        feats = tower(pix.reshape(-1, pix.shape[-1]), positions=pos, segment_ids=seg, slice_size=gh * gw).features
        return rows_from_merge_order(feats.reshape(b, gh * gw, -1), grid, m)

    class TowerProbe(nn.Module):
        """The tower (``vision``) and per-patch linear heads, ``{head: [B, N, out]}``: logits of the colour and the
        shape under each patch, and (``position``) the patch's own (row, column) scaled to [-1, 1]."""

        @nn.compact
        def __call__(self, frames):
            tower = Encoder(vision_config, name="vision")
            if vision_config.tower == "qwen2_vl":
                feats = packed(tower, frames)
            else:
                feats = tower(frames).features
            if feats.shape[1] == grid[0] * grid[1] + 1:  # towers whose features keep the CLS token
                feats = feats[:, 1:]
            return {name: nn.Dense(n, name=f"{name}_head")(feats) for name, n in heads.items()}

    return TowerProbe()


def patch_positions(grid: int) -> np.ndarray:
    """``float32 [grid * grid, 2]``: each patch's (row, column), row-major as the tower's tokens, scaled to [-1, 1]."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return (np.stack([rows, cols], 1) * (2.0 / max(grid - 1, 1)) - 1.0).astype(np.float32)


def _cross_entropy(logits, labels, weights):
    """Weighted mean of optax's integer-label softmax cross-entropy."""
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415

    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def pretrain_tower(vision_config, train_scenes: list[dict], held_out: list[dict], fmt, frames_fn, recipe: Recipe,
                   progress: bool = True) -> tuple[dict, dict]:
    """Train the tower (see the module docstring); returns ``(tower params, figures)``, the figures on frames of
    the held-out clips: ``colour_accuracy`` / ``shape_accuracy`` over patches an object covers, ``background``
    (patches correctly called empty), the loss curve."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vjax.data.synthetic import PALETTE, SHAPES  # noqa: PLC0415

    g = tower_grid(vision_config, frames_fn.size)
    if g[0] != g[1] or train_scenes[0]["size"] % g[0]:
        raise ValueError(f"the tower's patch grid {g} does not tile the synthetic set's {train_scenes[0]['size']}-px "
                         f"frames: pretraining needs a square grid that divides the frame size")
    position = recipe.tower_position_weight > 0
    probe = _tower_probe(vision_config, g, 1 + len(PALETTE), 1 + len(SHAPES), position)
    batches = tower_batches(train_scenes, fmt, frames_fn, g[0], recipe.tower_batch, recipe.seed)
    first = next(batches)
    params = probe.init(jax.random.key(recipe.seed), first["frames"][:1])["params"]

    where = patch_positions(g[0])  # [N, 2] in [-1, 1]

    def loss_fn(p, b):
        out = probe.apply({"params": p}, b["frames"])
        w = jnp.where(b["colour"] > 0, 1.0, 0.2)  # objects cover ~5 % of the patches
        loss = _cross_entropy(out["colour"], b["colour"], w) + _cross_entropy(out["shape"], b["shape"], w)
        if position:
            loss += recipe.tower_position_weight * jnp.mean(jnp.square(out["position"].astype(jnp.float32) - where))
        return loss, None

    params, curve = fit(loss_fn, params, batches, recipe.tower_steps, recipe.tower_lr, recipe.warmup_steps,
                        "stage 0: tower", progress)

    def predict(p, x):
        out = probe.apply({"params": p}, x)
        return {**out, "colour": jnp.argmax(out["colour"], -1), "shape": jnp.argmax(out["shape"], -1)}

    predict = jax.jit(predict)
    held_batch, held_batches = 128, 4
    held = tower_batches(held_out, fmt, frames_fn, g[0], held_batch, recipe.seed + 1)
    hits = np.zeros(3)
    counts = np.zeros(3)
    place_err = []
    for _ in range(held_batches):
        b = next(held)
        out = {k: np.asarray(v) for k, v in predict(params, b["frames"]).items()}
        colour, shape = out["colour"], out["shape"]
        obj = b["colour"] > 0
        hits += [(colour == b["colour"])[obj].sum(), (shape == b["shape"])[obj].sum(), (colour == 0)[~obj].sum()]
        counts += [obj.sum(), obj.sum(), (~obj).sum()]
        if position:
            place_err.append(np.abs(out["position"] - where).mean() * (g[0] - 1) / 2)  # in patches
    acc = hits / np.maximum(counts, 1)
    figures = {"colour_accuracy": float(acc[0]), "shape_accuracy": float(acc[1]), "background": float(acc[2]),
               "held_out_frames": held_batch * held_batches, "loss_curve": curve}
    if position:
        figures["position_error"] = float(np.mean(place_err))
    return params["vision"], figures


# ------------------------------------------------------------------------------------------------ audio tower
def beep_slots(beeps: list[dict], start: float, end: float, slots: int) -> np.ndarray:
    """``int32 [slots]``: the pitch of the ``k``-th beep (in time) whose middle lies in ``[start, end)`` seconds,
    as ``1 + index`` in ``PITCHES`` (low 1, high 2), 0 past the last one."""
    from vjax.data.synthetic import PITCHES  # noqa: PLC0415

    inside = [b for b in sorted(beeps, key=lambda b: b["start_s"])
              if start <= b["start_s"] + b["duration_s"] / 2 < end][:slots]
    out = np.zeros(slots, np.int32)
    for k, b in enumerate(inside):
        out[k] = 1 + list(PITCHES).index(b["pitch"])
    return out


WINDOW_SLOTS = 4  # beeps a 2 s audio window can hold (one per 0.5 s slot of the synthetic set)


def _beep_hits(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """``[pitches right, beeps, counts right, rows]`` of predicted beep slots ``got`` against ``want`` (``[N, slots]``,
    0 = none): the pitch over the slots that hold a beep, the count (slots not "none") per row."""
    beep = want > 0
    return np.array([(got == want)[beep].sum(), beep.sum(), ((got > 0).sum(-1) == beep.sum(-1)).sum(), len(want)])


def audio_batches(scenes: list[dict], fmt, batch: int, seed: int, clip_slots: int = 0) -> Iterator[dict]:
    """Endless batches of random clips' audio, rendered with fresh noise and turned into the model's input by the
    run's format (``fmt.prepare_audio``: ImageBind fbank windows): ``audio`` float32 ``[B, C, mel, frames]``,
    ``window`` int32 ``[B, C, WINDOW_SLOTS]`` (each window's beeps, :func:`beep_slots`) and, with ``clip_slots``,
    ``beeps`` int32 ``[B, clip_slots]`` (the whole clip's)."""
    from vjax.data.synthetic import render_audio  # noqa: PLC0415
    from vjax.layers.audio import clip_bounds  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    rate, clips = fmt.spec.audio_sample_rate, fmt.spec.audio_clips
    while True:
        audio, window, whole = [], [], []
        for k in rng.integers(len(scenes), size=batch):
            scene = scenes[int(k)]
            audio.append(fmt.prepare_audio(render_audio(scene, rate, int(rng.integers(2**31)))))
            bounds = clip_bounds(scene["num_frames"] / scene["fps"], clips, 2.0)
            window.append(np.stack([beep_slots(scene["beeps"], a, b, WINDOW_SLOTS) for a, b in bounds]))
            if clip_slots:
                whole.append(beep_slots(scene["beeps"], 0.0, float("inf"), clip_slots))
        out = {"audio": np.stack(audio).astype(np.float32), "window": np.stack(window)}
        if clip_slots:
            out["beeps"] = np.stack(whole)
        yield out


def pretrain_audio(audio_config, train_scenes: list[dict], held_out: list[dict], fmt, recipe: Recipe,
                   progress: bool = True) -> tuple[dict, dict]:
    """Train the audio tower: its pooled embedding of each 2 s fbank window, through one linear head, names the
    pitch of the window's ``k``-th beep for ``k < WINDOW_SLOTS`` (or none), as the image tower names each patch's
    object. Returns ``(tower params, figures)``, on windows of the held-out clips: ``pitch_accuracy`` over the slots
    that hold a beep, ``count_accuracy`` (windows whose predicted beep count is right), the loss curve."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vjax.data.synthetic import PITCHES  # noqa: PLC0415
    from vjax.models.encoders import Encoder  # noqa: PLC0415

    if not fmt.spec.audio_clips:
        raise ValueError("the audio part trains on the run's audio input: set data.load_audio=True")
    classes = 1 + len(PITCHES)

    class AudioProbe(nn.Module):
        @nn.compact
        def __call__(self, audio):  # [N, mel, frames] -> logits [N, WINDOW_SLOTS, classes]
            feats = Encoder(audio_config, name="tower")(audio).features
            return nn.Dense(WINDOW_SLOTS * classes, name="head")(feats).reshape(-1, WINDOW_SLOTS, classes)

    probe = AudioProbe()
    batches = audio_batches(train_scenes, fmt, recipe.audio_batch, recipe.seed)

    def flat(b):
        a = b["audio"]
        return a.reshape(-1, *a.shape[2:]), b["window"].reshape(-1, WINDOW_SLOTS)

    params = probe.init(jax.random.key(recipe.seed), flat(next(batches))[0][:1])["params"]

    def loss_fn(p, b):
        audio, labels = flat(b)
        return _cross_entropy(probe.apply({"params": p}, audio), labels, jnp.ones(labels.shape)), None

    params, curve = fit(loss_fn, params, batches, recipe.audio_steps, recipe.audio_lr, recipe.warmup_steps,
                        "stage 0: audio tower", progress)
    predict = jax.jit(lambda p, x: jnp.argmax(probe.apply({"params": p}, x), -1))
    held = audio_batches(held_out, fmt, 64, recipe.seed + 1)
    hits = np.zeros(4, np.int64)
    for _ in range(4):
        audio, labels = flat(next(held))
        hits += _beep_hits(np.asarray(predict(params, audio)), labels)
    right, total, count_right, windows = (int(x) for x in hits)
    figures = {"pitch_accuracy": right / max(total, 1), "count_accuracy": count_right / max(windows, 1),
               "held_out_windows": windows, "loss_curve": curve}
    return params["tower"], figures


# ------------------------------------------------------------------------------------------------ connector
def object_slots(scene: dict, slots: int) -> dict:
    """What token ``k`` of the connector is trained to say about the clip's ``k``-th object (in order of appearance):
    ``colour`` / ``shape`` (1 + index in ``PALETTE`` / ``SHAPES``, 0 when the clip has fewer objects), ``motion``
    (index in ``MOTIONS``) and ``place`` float32 ``[5]``: appearance time over the clip's duration, start and end
    (x, y) over the frame size; ``present`` 1.0 for the slots that hold an object."""
    from vjax.data.synthetic import MOTIONS, PALETTE, SHAPES  # noqa: PLC0415

    objs = sorted(scene["objects"], key=lambda o: o["appear_s"])[:slots]  # stable: the scene's order among ties
    out = {"colour": np.zeros(slots, np.int32), "shape": np.zeros(slots, np.int32),
           "motion": np.zeros(slots, np.int32), "place": np.zeros((slots, 5), np.float32),
           "present": np.zeros(slots, np.float32)}
    duration, size = scene["num_frames"] / scene["fps"], scene["size"]
    for k, o in enumerate(objs):
        out["colour"][k] = 1 + list(PALETTE).index(o["colour"])
        out["shape"][k] = 1 + SHAPES.index(o["shape"])
        out["motion"][k] = MOTIONS.index(o["motion"])
        out["place"][k] = [o["appear_s"] / duration, *(np.asarray(o["start_xy"]) / size),
                           *(np.asarray(o["end_xy"]) / size)]
        out["present"][k] = 1.0
    return out


def connector_batches(scenes: list[dict], fmt, frames_fn, num_frames: int, slots: int, batch: int,
                      seed: int) -> Iterator[dict]:
    """Endless batches: ``frames`` float32 ``[B, T, S, S, 3]`` of random clips, ``num_frames`` frames each (one at
    random in each of T equal segments: MA-LMM's training sampler), rendered with fresh noise and preprocessed as
    the run's frames; each clip's :func:`object_slots` stacked (``[B, slots]``, ``place [B, slots, 5]``) and its
    duration ``seconds [B]``."""
    from vjax.data.sampling import segment_random  # noqa: PLC0415
    from vjax.data.synthetic import render_frames  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    while True:
        frames, labels, seconds = [], [], []
        for k in rng.integers(len(scenes), size=batch):
            scene = scenes[int(k)]
            seconds.append(scene["num_frames"] / scene["fps"])
            idx = segment_random(scene["num_frames"], scene["fps"], num_frames, seed=int(rng.integers(2**31))).indices
            frames.append(render_frames(scene, int(rng.integers(2**31)), indices=idx))
            labels.append(object_slots(scene, slots))
        frames = np.stack(frames)  # [B, T, size, size, 3] uint8
        b, t = frames.shape[:2]
        pixels = fmt.normalize(frames_fn(frames.reshape(b * t, *frames.shape[2:])))
        yield {"frames": pixels.reshape(b, t, *pixels.shape[1:]), "seconds": np.asarray(seconds, np.float32),
               **{name: np.stack([x[name] for x in labels]) for name in labels[0]}}


def pretrain_connector(model_spec, model_config, vision_params: dict, train_scenes: list[dict],
                       held_out: list[dict], fmt, frames_fn, recipe: Recipe, progress: bool = True,
                       audio_params: dict | None = None) -> tuple[dict, dict]:
    """Train the modules ``model_spec.connector`` on the frozen tower ``vision_params`` (module docstring); returns
    ``({attribute: params}, figures)``, the figures on clips of the held-out scenes: ``colour_accuracy``,
    ``shape_accuracy``, ``motion_accuracy`` over the slots that hold an object, ``empty`` (slots past the clip's
    objects called empty), ``appear_error`` (seconds), the loss curve. With ``audio_params`` (the stage-0 audio
    tower) the modules ``model_spec.audio_connector`` are trained after them by :func:`pretrain_audio_connector`,
    whose figures join these."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vjax.data.synthetic import MOTIONS, PALETTE, SHAPES  # noqa: PLC0415

    if not model_spec.connector:
        raise ValueError(f"{model_spec.name} has no connector to pretrain (its spec names none)")
    module = model_spec.module(model_config)
    sizes = {"colour": 1 + len(PALETTE), "shape": 1 + len(SHAPES), "motion": len(MOTIONS), "place": 5}
    head = nn.Dense(sum(sizes.values()))  # one linear head, the same for every token
    key_model, key_head = jax.random.split(jax.random.key(recipe.seed))
    t, size = model_config.num_frames, train_scenes[0]["size"]
    blank = frames_fn(np.zeros((t, size, size, 3), np.uint8))[None].astype(np.float32)  # [1, T, S, S, 3]
    init = module.init(key_model, blank, method="connector_queries")["params"]
    queries = module.apply({"params": {**init, "vision": vision_params}}, blank, method="connector_queries")
    slots = queries.shape[1]
    params = {"connector": {name: init[name] for name in model_spec.connector},
              "head": head.init(key_head, queries.astype(jnp.float32))["params"]}
    batches = connector_batches(train_scenes, fmt, frames_fn, t, slots, recipe.connector_batch, recipe.seed)

    def outputs(p, frames):
        q = module.apply({"params": {**p["connector"], "vision": vision_params}}, frames, method="connector_queries")
        out = head.apply({"params": p["head"]}, q.astype(jnp.float32))  # [B, slots, sum(sizes)]
        ends = np.cumsum(list(sizes.values()))
        return dict(zip(sizes, jnp.split(out, ends[:-1], axis=-1)))

    def loss_fn(p, b):
        out = outputs(p, b["frames"])
        present = b["present"]
        slot_w = jnp.where(present > 0, 1.0, 0.3)
        loss = _cross_entropy(out["colour"], b["colour"], slot_w) + _cross_entropy(out["shape"], b["shape"], slot_w)
        loss += _cross_entropy(out["motion"], b["motion"], present)
        err = jnp.square(out["place"] - b["place"]).sum(-1)
        return loss + 4.0 * (err * present).sum() / jnp.maximum(present.sum(), 1.0), None

    params, curve = fit(loss_fn, params, batches, recipe.connector_steps, recipe.connector_lr, recipe.warmup_steps,
                        "stage 0: connector", progress)
    # modules the inputs never reach keep their random init (MA-LMM's Q-Former's text embeddings: the question
    # enters it only in the later stages), so each module's tree is whole
    from vjax.pretrained import init_params  # noqa: PLC0415
    from vjax.pytree import flatten_params, unflatten_params  # noqa: PLC0415

    whole = init_params(module, recipe.seed)
    learned = dict(params["connector"])
    if audio_params is not None:
        audio_connector, heard = pretrain_audio_connector(model_spec, module, audio_params, train_scenes, held_out,
                                                          fmt, recipe, progress)
        learned.update(audio_connector)
    trained = {}
    for name, sub in learned.items():
        flat = flatten_params(whole[name])
        flat.update(flatten_params(sub))
        trained[name] = unflatten_params(flat)

    predict = jax.jit(outputs)
    held = connector_batches(held_out, fmt, frames_fn, t, slots, 32, recipe.seed + 1)
    hits, counts, appear = np.zeros(4), np.zeros(4), []
    for _ in range(4):
        b = next(held)
        out = {k: np.asarray(v) for k, v in predict(params, b["frames"]).items()}
        obj = b["present"] > 0
        named = {k: out[k].argmax(-1) for k in ("colour", "shape", "motion")}
        hits += [*((named[k] == b[k])[obj].sum() for k in named), (named["colour"] == 0)[~obj].sum()]
        counts += [obj.sum()] * 3 + [(~obj).sum()]
        appear.append((np.abs(out["place"][..., 0] - b["place"][..., 0]) * b["seconds"][:, None])[obj])
    acc = hits / np.maximum(counts, 1)
    figures = {"colour_accuracy": float(acc[0]), "shape_accuracy": float(acc[1]), "motion_accuracy": float(acc[2]),
               "empty": float(acc[3]), "appear_error": float(np.concatenate(appear).mean()),
               "held_out_clips": 4 * 32, "loss_curve": curve}
    if audio_params is not None:
        figures.update(heard)
    return trained, figures


def pretrain_audio_connector(model_spec, module, audio_params: dict, train_scenes: list[dict], held_out: list[dict],
                             fmt, recipe: Recipe, progress: bool = True) -> tuple[dict, dict]:
    """Train the modules ``model_spec.audio_connector`` of ``module`` on the frozen stage-0 audio tower: audio token
    ``k`` names, through one linear head shared by the tokens, the pitch of the clip's ``k``-th beep or "none"
    (:func:`beep_slots` over the whole clip), so that how many tokens are not "none" is the beep count. Its own loop
    (``audio_connector_steps``), so that the video connector's training is the same with or without it. Returns
    ``({attribute: params}, figures)``: ``beep_pitch_accuracy`` over the tokens that hold a beep and
    ``beep_count_accuracy`` (clips whose beeps the tokens count right) on held-out clips, ``audio_loss_curve``."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vjax.data.synthetic import PITCHES  # noqa: PLC0415

    if not model_spec.audio_connector:
        raise ValueError(f"{model_spec.name} has no audio connector to pretrain (its spec names none)")
    head = nn.Dense(1 + len(PITCHES))
    key_model, key_head = jax.random.split(jax.random.key(recipe.seed + 1))
    silent = fmt.prepare_audio(None)[None]  # [1, C, mel, frames]
    init = module.init(key_model, silent, method="audio_connector_queries")["params"]
    tower = {model_spec.audio_tower: audio_params}
    tokens = module.apply({"params": {**init, **tower}}, silent, method="audio_connector_queries")
    params = {"connector": {name: init[name] for name in model_spec.audio_connector},
              "head": head.init(key_head, tokens.astype(jnp.float32))["params"]}

    def outputs(p, audio):
        a = module.apply({"params": {**p["connector"], **tower}}, audio, method="audio_connector_queries")
        return head.apply({"params": p["head"]}, a.astype(jnp.float32))  # [B, tokens, 1 + pitches]

    def loss_fn(p, b):  # every token, "none" included: the count is how many are not
        return _cross_entropy(outputs(p, b["audio"]), b["beeps"], jnp.ones(b["beeps"].shape)), None

    batches = audio_batches(train_scenes, fmt, recipe.connector_batch, recipe.seed, clip_slots=tokens.shape[1])
    params, curve = fit(loss_fn, params, batches, recipe.audio_connector_steps, recipe.connector_lr,
                        recipe.warmup_steps, "stage 0: audio connector", progress)
    predict = jax.jit(lambda p, x: jnp.argmax(outputs(p, x), -1))
    held = audio_batches(held_out, fmt, 32, recipe.seed + 1, clip_slots=tokens.shape[1])
    hits = np.zeros(4, np.int64)
    for _ in range(4):
        b = next(held)
        hits += _beep_hits(np.asarray(predict(params, b["audio"])), b["beeps"])
    right, beeps, counted, clips = (int(x) for x in hits)
    return params["connector"], {"beep_pitch_accuracy": right / max(beeps, 1),
                                 "beep_count_accuracy": counted / max(clips, 1), "audio_loss_curve": curve}


# ------------------------------------------------------------------------------------------------ LLM
def described(record: dict, scene: dict) -> dict:
    """``record`` with its ``<video>`` marker replaced by the clip's :func:`~vjax.data.synthetic.description`."""
    from vjax.data.synthetic import description  # noqa: PLC0415

    text = description(scene)
    conv = [dict(t, value=t["value"].replace("<video>", text)) if t.get("from") == "human" else t
            for t in record["conversations"]]
    return {**record, "conversations": conv}


def text_scenes(syn_config, count: int, seed: int, turns: int) -> tuple[list[dict], dict[int, dict]]:
    """``count`` fresh training scenes (indices after the set's ``num_train`` clips: never a held-out clip) and
    every question each answers (:func:`~vjax.data.synthetic.every_question`), joined into conversations of up to
    ``turns`` questions about one clip. Returns ``(records, {index: scene})``; no frame is rendered."""
    from vjax.data.annotations import merge_turns  # noqa: PLC0415
    from vjax.data.synthetic import _sample_scene, every_question  # noqa: PLC0415

    records, scenes = [], {}
    for index in range(syn_config.num_train, syn_config.num_train + count):
        scene = _sample_scene(syn_config, "train", index)
        scenes[index] = scene
        records.extend(every_question(scene, syn_config, np.random.default_rng([seed, index]),
                                      f"videos/train/{index:06d}.mp4"))
    return merge_turns(records, turns, seed=seed), scenes


def lm_texts(records: list[dict], scenes, fmt, layout: str = "question") -> list[tuple[np.ndarray, np.ndarray]]:
    """Every record with its clip described in words, rendered by ``fmt`` (the run's template) and tokenized, no
    visual placeholder left. ``layout`` (:data:`LM_LAYOUTS`): ``"question"`` puts the whole
    :func:`~vjax.data.synthetic.description` where the record's ``<video>`` marker stands, at the start of the
    question; ``"slots"`` puts each part of it where the model's tokens that carry it go (:func:`slotted_pieces`).
    ``records`` name their clip by ``video`` (``videos/<split>/<index>.mp4``), ``scenes[index]`` is its ground
    truth (a list in index order or a dict)."""
    from vjax.data import templates  # noqa: PLC0415

    if layout not in LM_LAYOUTS:
        raise ValueError(f"lm_layout={layout!r} is not one of {LM_LAYOUTS}")
    placeholders = {pid for _, pid, _ in fmt.spec.visual}
    out = []
    for r in records:
        scene = scenes[int(os.path.splitext(os.path.basename(r["video"]))[0])]
        if layout == "slots":
            out.append(templates.tokenize(slotted_pieces(r, scene, fmt), fmt.tokenizer, {}))
            continue
        ids, mask = fmt.text(described(r, scene), 0)
        keep = ~np.isin(ids, list(placeholders))
        out.append((ids[keep], mask[keep]))
    return out


def slotted_pieces(record: dict, scene: dict, fmt) -> list[tuple[str, str]]:
    """The template's pieces of ``record`` (its ``spec.num_frames`` frames, no subtitles) with its clip in words in
    the visual slots: the audio slot holds what the clip sounds like, the first other slot what it shows (and,
    without an audio slot, what it sounds like), then its subtitle; further slots (per-frame pieces) are dropped.
    Video-LLaMA's audio-visual prompt, for one, puts the audio tokens and the video tokens in two sentences before
    the question: an LLM trained on this layout reads each fact where stage 2 puts the tokens that carry it."""
    from vjax.data.synthetic.questions import caption, sound_description, subtitle_description  # noqa: PLC0415

    pieces = fmt.pieces(record, fmt.spec.num_frames, subtitles=False)
    heard = ("visual", "audio") in pieces
    shown = caption(scene) + ("" if heard else " " + sound_description(scene)) + subtitle_description(scene)
    out, placed = [], False
    for kind, value in pieces:
        if kind != "visual":
            out.append((kind, value))
        elif value == "audio":
            out.append(("text", sound_description(scene)))
        elif not placed:
            out.append(("text", shown))
            placed = True
    if not placed:
        raise ValueError(f"template {fmt.spec.template!r} renders no visual slot for the description")
    return out


def padded(texts: list[tuple[np.ndarray, np.ndarray]], length: int, text_weight: float = 0.0) -> dict:
    """Right-padded ``{"input_ids", "answer", "weights": [len(texts), length]}``: ``answer`` the template's loss
    mask, ``weights`` 1 on answer tokens, ``text_weight`` on the other real tokens, 0 on padding."""
    ids = np.zeros((len(texts), length), np.int32)
    answer = np.zeros((len(texts), length), np.float32)
    weights = np.zeros((len(texts), length), np.float32)
    for row, (t, m) in enumerate(texts):
        n = min(len(t), length)
        ids[row, :n], answer[row, :n] = t[:n], m[:n]
        weights[row, :n] = np.where(m[:n] > 0, 1.0, text_weight)
    return {"input_ids": ids, "answer": answer, "weights": weights}


def lm_batches(texts: list[tuple[np.ndarray, np.ndarray]], batch: int, seed: int, text_weight: float,
               multiple: int = 64) -> Iterator[dict]:
    """Endless :func:`padded` batches of random texts, each padded to its longest text rounded up to ``multiple``
    (a few shapes, so a few compilations)."""
    rng = np.random.default_rng(seed)
    while True:
        chosen = [texts[int(k)] for k in rng.integers(len(texts), size=batch)]
        yield padded(chosen, -(-max(len(t) for t, _ in chosen) // multiple) * multiple, text_weight)


def pretrain_lm(llm_config, train: list[tuple[np.ndarray, np.ndarray]], held_out: list[tuple[np.ndarray, np.ndarray]],
                recipe: Recipe, progress: bool = True, held_out_kinds: list[str] | None = None) -> tuple[dict, dict]:
    """Train the decoder on the described texts (module docstring); returns ``(decoder params, figures)``, the
    figures on held-out texts: ``answer_exact`` (every answer token is the argmax under teacher forcing), the same
    per kind (``held_out_kinds``, one per text: ``exact/<kind>``), ``answer_token_accuracy``, the loss curve."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from vjax.models.decoder import CausalLM  # noqa: PLC0415
    from vjax.models.losses import next_token_loss, shifted_targets  # noqa: PLC0415
    from vjax.pretrained import init_params  # noqa: PLC0415

    lm = CausalLM(llm_config)
    params = init_params(lm, recipe.seed)

    def loss_fn(p, b):
        logits = lm.apply({"params": p}, b["input_ids"]).logits
        return next_token_loss(logits, b["input_ids"], b["weights"])

    batches = lm_batches(train, recipe.lm_batch, recipe.seed, recipe.text_weight)
    params, curve = fit(loss_fn, params, batches, recipe.lm_steps, recipe.lm_lr, recipe.warmup_steps,
                        "stage 0: LLM", progress)

    @jax.jit
    def right(p, ids, answer):
        targets, w = shifted_targets(ids, answer)
        hit = jnp.argmax(lm.apply({"params": p}, ids).logits, -1) == targets
        return (hit | (w == 0)).all(axis=1), (hit * w).sum(), w.sum()

    exact, tok, n = [], 0.0, 0.0
    length = -(-max(len(t) for t, _ in held_out) // 64) * 64
    for start in range(0, len(held_out), 64):
        b = padded(held_out[start:start + 64], length)
        e, t, m = right(params, b["input_ids"], b["answer"])
        exact.extend(np.asarray(e).tolist())
        tok, n = tok + float(t), n + float(m)
    figures = {"answer_exact": float(np.mean(exact)), "answer_token_accuracy": tok / max(n, 1.0),
               "held_out_texts": len(held_out), "loss_curve": curve}
    for kind in sorted(set(held_out_kinds or ())):
        hits = [e for e, k in zip(exact, held_out_kinds) if k == kind]
        figures[f"exact/{kind}"] = float(np.mean(hits))
    return params, figures


# ------------------------------------------------------------------------------------------------ driver
def ensure_parts(c, model, model_config, spec, tokenizer, paths, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, dict]:
    """The stage-0 parameters ``{attribute: params}`` of ``stage0.parts`` for run config ``c`` (its model spec,
    resolved model config, format spec and tokenizer; ``paths`` of its synthetic set): read from the cache, or built
    and cached (module docstring); the connector's modules each under its own attribute. ``log`` gets one line per
    part: where it is, its held-out figures."""
    from vjax.data import formats  # noqa: PLC0415
    from vjax.data.preprocess import FrameProcessor  # noqa: PLC0415
    from vjax.data.synthetic import SyntheticConfig, _sample_scene, every_question, read_scenes  # noqa: PLC0415

    recipe = Recipe.from_config(c.stage0)
    syn = SyntheticConfig(**c.data.synthetic.to_dict())
    syn_hash = syn.params_hash()
    template = json.dumps([spec.template, spec.template_variant, sorted(dict(spec.template_options).items())])
    fmt = formats.VideoQAFormat(spec, tokenizer)
    scenes = {}  # the set's ground truth: read at the first build, shared by every part this call builds
    out = {}
    parts = parse_parts(c.stage0.parts)
    for part in parts:
        key = part_key(part, model_config, recipe, syn_hash, template, audio="audio" in parts)
        directory = part_dir(key)
        cached = load_part(directory)
        if cached is None:
            t0 = time.perf_counter()
            if not scenes:
                scenes = {"train": read_scenes(paths, "train"),
                          "val": [_sample_scene(syn, "val", i) for i in range(HELD_OUT)]}
            if not scenes["train"]:
                raise ValueError("the tower recipe renders the set's training scenes: data.synthetic.num_train is 0")
            if part in ("vision", "connector"):
                frames_fn = FrameProcessor.for_model(model, model_config, native=False, size=c.data.image_size)
            if part == "vision":
                params, figures = pretrain_tower(model_config.vision, scenes["train"], scenes["val"], fmt, frames_fn,
                                                 recipe, progress)
            elif part == "audio":
                params, figures = pretrain_audio(model_config.audio, scenes["train"], scenes["val"], fmt, recipe,
                                                 progress)
            elif part == "connector":
                params, figures = pretrain_connector(model, model_config, out["vision"], scenes["train"],
                                                     scenes["val"], fmt, frames_fn, recipe, progress,
                                                     out.get(model.audio_tower) if "audio" in parts else None)
            else:
                train, fresh = text_scenes(syn, recipe.lm_scenes, recipe.seed, recipe.lm_turns)
                rng = np.random.default_rng([recipe.seed, 1])
                val = [r for s in scenes["val"]
                       for r in every_question(s, syn, rng, f"videos/val/{s['index']:06d}.mp4")]
                kinds = [f"{r['question_type']}/{'choice' if r.get('choices') else 'open'}" for r in val]
                params, figures = pretrain_lm(model_config.llm, lm_texts(train, fresh, fmt, recipe.lm_layout),
                                              lm_texts(val, scenes["val"], fmt, recipe.lm_layout), recipe,
                                              progress, kinds)
            manifest = {"key": key, "figures": figures, "seconds": time.perf_counter() - t0,
                        "built": time.strftime("%Y-%m-%d %H:%M:%S")}
            save_part(directory, params, manifest)
            cached = params, manifest  # host arrays already: no need to read back what was just written
        params, manifest = cached
        shown = {k: round(v, 3) for k, v in manifest["figures"].items() if isinstance(v, float) and "/" not in k}
        log(f"stage 0 {part}: {directory} (built in {manifest['seconds']:.0f} s; held out: {shown})")
        if part == "llm" and getattr(model_config.llm, "visual_experts", False):
            # text trains only the language experts: the visual ones start as their copies, as CogVLM's
            from vjax.layers.visual_expert import experts_from_language  # noqa: PLC0415

            params = experts_from_language(params)
        if part == "connector":
            out.update(params)  # its modules, each under its own attribute name
        else:
            out[model.audio_tower if part == "audio" else part] = params
    return out


def with_parts(params: dict, parts: dict[str, dict]) -> dict:
    """``params`` (a whole model's) with each ``parts[name]`` in place of ``params[name]``; a part whose tree or
    shapes differ is a ValueError naming the first differing path."""
    from vjax.pytree import flatten_params  # noqa: PLC0415

    out = dict(params)
    for name, sub in parts.items():
        want = {k: np.shape(v) for k, v in flatten_params(params[name]).items()}
        got = {k: np.shape(v) for k, v in flatten_params(sub).items()}
        if want != got:
            diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
            raise ValueError(f"pretrained part {name!r} does not fit the model at {name}/{diff[0]} "
                             f"(model {want.get(diff[0])}, part {got.get(diff[0])})")
        out[name] = sub
    return out


def main(argv: list[str]) -> int:
    """``python -m experiments.pretrain --config=<name>[:variant] [--config.a.b=v]``: build (or find) the run's
    stage-0 parts and print where they are and their held-out figures."""
    from experiments import build as build_lib  # noqa: PLC0415
    from experiments import cli, config, train  # noqa: PLC0415

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    c = train._CONFIG.value
    if not c.stage0.parts:
        cli.fail(f"config key 'stage0.parts': {c.model} uses no pretrained parts; set --config.stage0.parts=vision,llm")
    try:
        plan = config.validate(c)
    except config.ConfigError as err:
        cli.fail(str(err))
    from vjax.data import formats  # noqa: PLC0415

    paths = build_lib._synthetic_set(c, True)
    tokenizer = formats.TextTokenizer(paths.tokenizer_dir)
    model = plan["model"]
    mcfg = config.resolve_markers(model, plan["model_config"], tokenizer)
    ensure_parts(c, model, mcfg, config.data_format(model, mcfg, c), tokenizer, paths)
    return 0


if __name__ == "__main__":
    from experiments import cli, train

    cli.run(main, flags_parser=train.parse_flags)
