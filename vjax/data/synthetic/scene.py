"""Scene sampling: the objects, motions, appearance times, beeps and subtitle of one clip, from its seed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vjax.data.synthetic.config import MOTIONS, NAMES, PALETTE, PITCHES, SHAPES, SPLITS, TEXTURE_STD, SyntheticConfig

MIN_VISIBLE_S = 1.5  # a short clip shows a late object for at least this long (at most half of max_seconds)


def time_step(fps: float) -> float:
    """The grid of appearance times: 0.25 s, or 0.5 s / 1 s where 0.25 s is not a whole number of frames
    (so that an object appears exactly at a frame: at 8 fps every 2 frames)."""
    return next((s for s in (0.25, 0.5) if abs(s * fps - round(s * fps)) < 1e-9), 1.0)


def _clip_rng(cfg: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLITS.index(split), index]))


def _sample_scene(cfg: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    """Ground truth of one clip: frame count, objects (with paths; appearance times on the :func:`time_step`
    grid), beeps, subtitle."""
    rng = _clip_rng(cfg, split, index)
    fps, size = cfg.fps, cfg.size
    long = cfg.long_every > 0 and index % cfg.long_every == cfg.long_every - 1
    step = time_step(fps)
    appear: list[float] = []
    vanish: list[float | None] = []
    if long:
        n_frames = int(rng.integers(cfg.long_min_frames, cfg.long_max_frames + 1))
        n_obj = int(rng.integers(2, 4))
        duration = n_frames / fps
        # The first object vanishes early; the others appear one by one after it, until 1 s before the end.
        first_gone = float(rng.choice([1.0, 1.5, 2.0]))
        slots = np.arange(math.ceil((first_gone + 0.5) / step - 1e-9), int((duration - 1.0) / step + 1e-9) + 1)
        n_obj = min(n_obj, 1 + len(slots))
        appear = [0.0] + [float(s) * step for s in sorted(rng.choice(slots, n_obj - 1, replace=False))]
        vanish = [first_gone] + [None] * (n_obj - 1)
    else:
        n_obj = int(rng.integers(1, 4))
        # Each later object starts late with probability 0.7, at a time drawn first, uniformly over one range for
        # every clip (default 0.25-4 s, so that no single time is a good guess), then the clip is drawn long
        # enough to show it for MIN_VISIBLE_S.
        late = [rng.random() < 0.7 for _ in range(1, n_obj)]
        visible = min(MIN_VISIBLE_S, cfg.max_seconds / 2)
        grid = np.arange(1, int((cfg.max_seconds - visible) / step + 1e-9) + 1)  # in steps
        times = iter(float(s) * step for s in rng.choice(grid, min(sum(late), len(grid)), replace=False))
        appear = [0.0] + [next(times, 0.0) if is_late else 0.0 for is_late in late]
        shortest = max(round(cfg.min_seconds * fps), math.ceil((max(appear) + visible) * fps - 1e-9))
        n_frames = int(rng.integers(min(shortest, round(cfg.max_seconds * fps)), round(cfg.max_seconds * fps) + 1))
        duration = n_frames / fps
        vanish = [None] * n_obj
        for i in range(n_obj):
            if rng.random() < 0.2 and appear[i] + 1.5 <= duration - 0.5:
                vanish[i] = float(rng.choice(np.arange(appear[i] + 1.5, duration - 0.5 + 1e-9, 0.5)))
    colours = [str(c) for c in rng.choice(list(PALETTE), n_obj, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, n_obj, replace=False)]

    radius = max(3, round(size * 0.14))
    travel = round(size * 0.35)
    margin = radius + 2
    boxes: list[tuple[float, float, float, float]] = []
    objects = []
    for i in range(n_obj):
        for attempt in range(200):
            motion = str(rng.choice(MOTIONS)) if attempt < 150 else "none"
            dx, dy = {"left": (-travel, 0), "right": (travel, 0), "up": (0, -travel), "down": (0, travel),
                      "none": (0, 0)}[motion]
            x0 = float(rng.integers(margin - min(dx, 0), size - margin - max(dx, 0)))
            y0 = float(rng.integers(margin - min(dy, 0), size - margin - max(dy, 0)))
            x1, y1 = x0 + dx, y0 + dy
            box = (min(x0, x1) - radius - 2, min(y0, y1) - radius - 2, max(x0, x1) + radius + 2,
                   max(y0, y1) + radius + 2)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        else:  # could not place without overlap: drop this and later objects
            break
        boxes.append(box)
        objects.append({
            "colour": colours[i], "shape": shapes[i], "motion": motion, "appear_s": appear[i],
            "vanish_s": vanish[i], "start_xy": [x0, y0], "end_xy": [x1, y1], "radius": radius,
        })

    n_beeps = int(rng.integers(0, 4))
    slot_count = int(duration // 0.5)
    beep_slots = sorted(int(s) for s in rng.choice(slot_count, min(n_beeps, slot_count), replace=False))
    beeps = [{"start_s": s * 0.5 + 0.1, "duration_s": 0.2, "pitch": str(rng.choice(list(PITCHES)))}
             for s in beep_slots]

    subtitle = None
    if rng.random() < cfg.subtitle_fraction:
        k = int(rng.integers(0, len(objects)))
        name = str(rng.choice(NAMES))
        start = float(np.round(rng.uniform(0.0, max(0.0, duration - 1.5)), 1))
        subtitle = {"object": k, "name": name, "start_s": start, "end_s": min(duration, start + 1.5),
                    "text": f"The {objects[k]['colour']} {objects[k]['shape']} is called {name}."}
    return {"split": split, "index": index, "num_frames": n_frames, "fps": fps, "size": size,
            "long": long, "objects": objects, "beeps": beeps, "subtitle": subtitle,
            **({"texture_std": cfg.texture_std} if cfg.texture_std != TEXTURE_STD else {})}


def _visible(obj: dict, t: float) -> bool:
    return t >= obj["appear_s"] - 1e-9 and (obj["vanish_s"] is None or t < obj["vanish_s"] - 1e-9)


def _position(obj: dict, t: float, duration: float) -> tuple[float, float]:
    end = obj["vanish_s"] if obj["vanish_s"] is not None else duration
    a = min(max((t - obj["appear_s"]) / max(end - obj["appear_s"], 1e-6), 0.0), 1.0)
    (x0, y0), (x1, y1) = obj["start_xy"], obj["end_xy"]
    return x0 + a * (x1 - x0), y0 + a * (y1 - y0)
