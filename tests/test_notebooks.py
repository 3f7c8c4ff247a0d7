"""Every notebook in colabs/ runs top to bottom on a CPU (headless, nbclient) and shows pictures."""

from __future__ import annotations

import os
from pathlib import Path

import nbclient
import nbformat
import pytest

COLABS = Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"layers_tour.ipynb", "convert_weights.ipynb"}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_shows_images(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    assert "colab.research.google.com" in nb.cells[0].source  # the "Open in Colab" badge
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(COLABS)}})
    # The quickstart trains 200 steps for a reader; here 8 (every cell still runs: the loss curve has 8 points,
    # eval and chat run on the checkpoint), compile-bound, so the suite's fast-compile XLA flags stay on.
    # What a notebook writes to a temporary directory (the quickstart's workdir) goes under pytest's, not /tmp's
    env = {**os.environ, "VJAX_QUICKSTART_STEPS": "8", "TMPDIR": str(tmp_path)}
    client.execute(env=env)  # raises CellExecutionError on any failing cell
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{path.name} shows no picture"
