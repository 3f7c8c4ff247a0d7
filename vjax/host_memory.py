"""Keep freed host memory in the process, so that XLA:CPU steps stop page-faulting their temporaries anew.

XLA:CPU allocates the temporaries of every call of a compiled function with ``malloc`` (one buffer for a whole
train step: 600 MiB for the benchmark's small LLaMA step). glibc serves every block larger than its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when it is freed, so each
step asks the kernel for the same memory again: 153,000 minor page faults and 0.2-1.3 s of system time per
0.5 s step, more when other processes press on memory. PyTorch's CPU allocator goes through the same
``malloc`` and pays the same.

:func:`keep_freed_memory` tells glibc's ``malloc`` to serve large blocks from its heap and to keep what is
freed there (``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` at its maximum, ``M_ARENA_MAX`` 1: blocks allocated on
XLA's worker threads would otherwise come from per-thread arenas, which still ``mmap`` large blocks). The
price is a resident set that stays at the process's peak instead of shrinking between steps (+16 % on the
benchmark). The ``experiments`` commands call it on hosts whose JAX backend will be the CPU; a script of
your own calls it first thing, before JAX runs anything (threads started before it keep their own arena).

Elsewhere (not glibc: macOS, musl) it does nothing and says so by returning False. This module imports
nothing but the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest; freed memory at the heap's top stays

# JAX plugins whose presence means the backend will not be the CPU (besides libtpu, which a CPU host may carry)
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin")

ENV = "VJAX_KEEP_FREED_MEMORY"  # "0": the experiments commands leave malloc as it is

_applied = False


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep large freed blocks for reuse (see the module docstring). Returns True
    when the settings are in force (now or from an earlier call), False where the C library is not glibc.
    Raises ``OSError`` naming the setting when glibc refuses one."""
    global _applied
    if _applied:
        return True
    if not is_glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for name, param, value in (("M_MMAP_MAX", M_MMAP_MAX, 0), ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                               ("M_ARENA_MAX", M_ARENA_MAX, 1)):
        if libc.mallopt(param, value) != 1:  # mallopt returns 1 on success
            raise OSError(f"glibc mallopt({name}, {value}) failed")
    _applied = True
    return True


def applied() -> bool:
    """Whether :func:`keep_freed_memory` is in force in this process."""
    return _applied


def wanted(environ=os.environ) -> bool:
    """Whether the ``experiments`` commands should call :func:`keep_freed_memory`: not when ``VJAX_KEEP_FREED_MEMORY``
    is ``0``, and only where JAX will run on the CPU (``JAX_PLATFORMS`` starting with ``cpu``, or unset on a host
    without a GPU plugin). On a GPU or TPU host the step's temporaries live on the device; the data pipeline's
    threads there are better served by glibc's per-thread arenas."""
    flag = environ.get(ENV, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag:
        raise ValueError(f"{ENV}={environ[ENV]!r}: use 0 (leave malloc as it is), 1 (always) or leave it unset "
                         "(on hosts where JAX runs on the CPU)")
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(m) for m in (*GPU_PLUGINS, "libtpu"))
