"""The command-line entry points (train, pretrain, chat, eval, convert, bench, demo); ``config`` (configuration) and
``build`` (a training run from a config) are what they share, ``cli`` their exit-code convention.

Importing the package keeps every command offline by default: nothing loads from a model hub unless
``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set to 0 by the user. It also silences transformers'
advisory warnings ("PyTorch was not found ...": the commands need PyTorch only to read .pth/.bin files, and
say so then); set ``TRANSFORMERS_NO_ADVISORY_WARNINGS=`` (empty) to see them.

With libtpu installed (the ``plan`` extra, which the test extra pulls in) on a host without TPU chips, JAX would
initialise the TPU plugin in every command and print libtpu's errors about missing TPU workers; there, without a
GPU plugin and without ``JAX_PLATFORMS`` set by the user, the commands run with ``JAX_PLATFORMS=cpu``
(``experiments.plan`` still compiles for abstract TPU chips through ``jax.experimental.topologies``).

Where JAX will run on the CPU, importing the package also makes glibc's ``malloc`` keep freed memory
(:func:`vjax.host_memory.keep_freed_memory`): without it every XLA:CPU step page-faults its temporaries anew
(1.3x the benchmark's LLaMA step time). ``VJAX_KEEP_FREED_MEMORY=0`` turns that off, ``1`` forces it.
"""

import glob
import importlib.util
import os

# stdlib only: safe before JAX is imported
from vjax import host_memory as _host_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _cpu_only_host_with_libtpu() -> bool:
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU chips (v2-v4: accel, v5+: vfio)
        return False
    return not any(importlib.util.find_spec(m) for m in _host_memory.GPU_PLUGINS)


if _cpu_only_host_with_libtpu():
    os.environ["JAX_PLATFORMS"] = "cpu"

# Before JAX starts its threads: XLA:CPU's step temporaries are reused instead of page-faulted anew every step
# (vjax.host_memory; VJAX_KEEP_FREED_MEMORY=0 leaves malloc as it is).
if _host_memory.wanted():
    _host_memory.keep_freed_memory()
