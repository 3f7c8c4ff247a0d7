"""Shared pytest set-up: offline hub, absl flags parsed (Grain workers read them), f32 matmuls."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

# Parity tests compare against float32 PyTorch: keep XLA's CPU matmuls at full precision.
jax.config.update("jax_default_matmul_precision", "highest")
