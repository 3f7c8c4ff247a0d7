"""Scene sampling: the objects, motions, appearance times, beeps and subtitle of one clip, from its seed."""

from __future__ import annotations

from typing import Any

import numpy as np

from vjax.data.synthetic.config import MOTIONS, NAMES, PALETTE, PITCHES, SHAPES, SPLITS, TEXTURE_STD, SyntheticConfig


def _clip_rng(cfg: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLITS.index(split), index]))


def _sample_scene(cfg: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    """Ground truth of one clip: frame count, objects (with paths), beeps, subtitle."""
    rng = _clip_rng(cfg, split, index)
    fps, size = cfg.fps, cfg.size
    long = cfg.long_every > 0 and index % cfg.long_every == cfg.long_every - 1
    if long:
        n_frames = int(rng.integers(cfg.long_min_frames, cfg.long_max_frames + 1))
        n_obj = int(rng.integers(2, 4))
    else:
        n_frames = int(rng.integers(round(cfg.min_seconds * fps), round(cfg.max_seconds * fps) + 1))
        n_obj = int(rng.integers(1, 4))
    duration = n_frames / fps
    colours = [str(c) for c in rng.choice(list(PALETTE), n_obj, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, n_obj, replace=False)]

    # Appearance / vanishing times on a 0.5 s grid (frame = time * fps).
    half_steps = max(1, int(duration // 0.5))
    appear = [0.0] * n_obj
    vanish: list[float | None] = [None] * n_obj
    if long:
        vanish[0] = float(rng.choice([1.0, 1.5, 2.0]))
        slots = np.arange(int(vanish[0] / 0.5) + 1, max(int((duration / 2) / 0.5), int(duration / 0.5) - 2) + 1)
        n_obj = min(n_obj, 1 + len(slots))
        later = rng.choice(slots, n_obj - 1, replace=False)
        for i, t in enumerate(sorted(later), start=1):
            appear[i] = float(t) * 0.5
    else:
        slots = [s for s in range(1, max(2, half_steps // 2 + 1))]
        for i in range(1, n_obj):
            if rng.random() < 0.7 and slots:
                s = int(rng.choice(slots))
                slots.remove(s)
                appear[i] = s * 0.5
        for i in range(n_obj):
            if rng.random() < 0.2 and appear[i] + 1.5 <= duration - 0.5:
                vanish[i] = float(rng.choice(np.arange(appear[i] + 1.5, duration - 0.5 + 1e-9, 0.5)))

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
