"""vjax.host_memory: with it, repeated calls of an XLA:CPU executable stop page-faulting their temporaries; the
experiments package turns it on where JAX runs on the CPU, and the environment can turn it off."""

import os
import subprocess
import sys
import textwrap

import pytest

from vjax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose [4096, 4096] float32 matmul result (64 MiB, above glibc's largest mmap threshold of
# 32 MiB) is a temporary of the executable; prints the minor page faults of each of 40 calls after 3 warm-up calls.
FAULTS = textwrap.dedent("""
    import resource, sys
    if sys.argv[1] == "keep":
        from vjax import host_memory
        assert host_memory.keep_freed_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(0) + jnp.cos(x @ w).sum(0))
    x = jnp.ones((4096, 256)) / 256
    w = jnp.ones((256, 4096))
    for _ in range(3):
        f(x, w).block_until_ready()
    faults = []
    for _ in range(40):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x, w).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*faults)
""")


def _faults(mode: str) -> list[int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [int(n) for n in out.stdout.split()[-40:]]


@pytest.mark.skipif(not host_memory.is_glibc(), reason="mallopt is glibc's; elsewhere keep_freed_memory is a no-op")
def test_temporaries_are_reused_instead_of_faulted_anew():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")  # one 64 MiB temporary per call
    default, kept = _faults("default"), _faults("keep")
    # glibc's default: every call's temporary is a fresh mmap, touched page by page
    assert min(default) >= pages // 2, (default, pages)
    # kept: the freed block is served again from malloc's heap, already mapped. Most calls fault nothing, but until
    # the heap holds enough free space for the executable's allocation pattern it still grows now and then by a
    # temporary or two (under load, when XLA's threads allocate in another order, 5 of the first 20 calls did in
    # one run; CI once saw 5 of the first 10), so the median call and the total over the 40 calls are asserted.
    assert sorted(kept)[len(kept) // 2] <= pages // 50, (kept, pages)
    assert sum(kept) <= sum(default) / 2, (kept, default)


def test_wanted_reads_the_environment_and_the_platform():
    assert not host_memory.wanted({"VJAX_KEEP_FREED_MEMORY": "0", "JAX_PLATFORMS": "cpu"})
    assert host_memory.wanted({"VJAX_KEEP_FREED_MEMORY": "1", "JAX_PLATFORMS": "cuda"})
    assert host_memory.wanted({"JAX_PLATFORMS": "cpu"})
    assert host_memory.wanted({"JAX_PLATFORMS": " CPU ,tpu"})
    assert not host_memory.wanted({"JAX_PLATFORMS": "cuda,cpu"})
    assert not host_memory.wanted({"JAX_PLATFORMS": "tpu"})
    with pytest.raises(ValueError, match="VJAX_KEEP_FREED_MEMORY='sometimes'"):
        host_memory.wanted({"VJAX_KEEP_FREED_MEMORY": "sometimes"})


@pytest.mark.parametrize("setting, expected", [(None, host_memory.is_glibc()), ("0", False)])
def test_the_experiments_package_turns_it_on_where_jax_runs_on_the_cpu(setting, expected):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop(host_memory.ENV, None)
    if setting is not None:
        env[host_memory.ENV] = setting
    code = "import experiments; from vjax import host_memory; print(host_memory.applied())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == str(expected)
