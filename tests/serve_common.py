"""The tiny checkpoint that the chat, eval and serve tests load: a random-parameter
tiny Chat-UniVi saved as a converted checkpoint, its tokenizer, an experiment config file whose synthetic set is
three test clips (``--config=<file>``: the page's clip list), and a clip of odd size."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import vjax
from experiments import config
from experiments.configs import chat_univi as chat_univi_config
from vjax.data.synthetic import train_tokenizer, write_mp4

from tests.models.tiny import random_params

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = {"num_train": 0, "num_val": 1, "num_test": 3, "long_every": 0, "show_progress": False}
CONFIG_FILE = '''from experiments.configs import chat_univi


def get_config(variant="tiny"):
    c = chat_univi.get_config(variant)
    c.data.root = {root!r}
    for k, v in {synthetic!r}.items():
        c.data.synthetic[k] = v
    return c
'''


def tiny_checkpoint(d: Path, clip_shape: tuple[int, int, int] = (24, 48, 40)) -> dict[str, str]:
    """Writes the checkpoint, tokenizer, config file and a clip (``clip_shape`` = frames, height, width) under
    ``d``; their paths by name."""
    c = chat_univi_config.get_config("tiny")
    model, mcfg = config.model_config(c)
    module = model.module(mcfg)
    vjax.save_pretrained(d / "ckpt", module, random_params(module, seed=0, std=0.2))
    tok = train_tokenizer(["What colour is the circle? red green blue", "How many objects? two three"] * 20,
                          str(d / "tok"), c.data.synthetic.vocab_size)
    (d / "serve_config.py").write_text(CONFIG_FILE.format(root=str(d / "synthetic"), synthetic=SYNTHETIC))
    rng = np.random.default_rng(0)
    write_mp4(str(d / "a.mp4"), rng.integers(0, 255, (*clip_shape, 3), dtype=np.uint8), fps=8)
    return {"ckpt": str(d / "ckpt"), "tokenizer": tok, "config": str(d / "serve_config.py"), "clip": str(d / "a.mp4")}
