"""Shared pytest set-up: offline hub, fast XLA compiles, absl flags parsed (Grain workers read them), f32 matmuls."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The suite is compile-bound (hundreds of tiny models): LLVM's expensive optimisation passes cost more
# than they save at these sizes. HLO-level optimisation (fusion, layout) is unchanged; the published
# benchmark figures come from `python -m experiments.bench`, not from here. Subprocesses and notebook
# kernels inherit the flag (the quickstart notebook trains 30 steps under the suite: compile-bound too).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

# Parity tests compare against float32 PyTorch: keep XLA's CPU matmuls at full precision.
jax.config.update("jax_default_matmul_precision", "highest")
