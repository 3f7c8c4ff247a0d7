"""Training metrics: a JSONL file and TensorBoard event files side by side, and a PNG of the curves.

Every record is ``{"step": int, "split": "train"|"val"|..., <name>: float, ...}``, one JSON object
per line in ``<workdir>/metrics.jsonl`` (appended across restarts, so a resumed run continues it).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Mapping


class MetricsWriter:
    """Writes scalars to ``metrics.jsonl`` and ``tensorboard/`` under ``workdir`` (process 0 only)."""

    def __init__(self, workdir: str | Path, enabled: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split}
        rec.update({k: float(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in metrics.items():
            if math.isfinite(float(v)):  # a skipped NaN step stays in metrics.jsonl; TensorBoard would warn
                self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """All records of ``metrics.jsonl`` (later records for a step replace earlier ones on resume)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            latest[(rec["split"], rec["step"])] = rec
    return sorted(latest.values(), key=lambda r: (r["split"], r["step"]))


def plot_curves(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Loss (train and val) and every ``accuracy*`` metric against step, saved as a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = read_metrics(workdir)
    series: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in records:
        for k, v in r.items():
            if k in ("step", "split") or not isinstance(v, (int, float)) or math.isnan(v):
                continue
            if k == "loss" or k.startswith("accuracy"):
                xs, ys = series[f"{r['split']}/{k}"]
                xs.append(r["step"])
                ys.append(v)
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (xs, ys) in sorted(series.items()):
        (ax_l if name.endswith("/loss") else ax_a).plot(xs, ys, label=name, marker="." if len(xs) < 30 else None)
    ax_l.set(title="loss", xlabel="step")
    ax_a.set(title="accuracy", xlabel="step", ylim=(0, 1))
    for ax in (ax_l, ax_a):
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out or Path(workdir) / "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
