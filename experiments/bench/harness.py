"""The benchmarks' harness: interleaved timing, statistics, compile counting, compiled memory, the
machine's description and load, and the results table. Nothing here knows a model."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

try:
    import resource  # Unix only: page-fault counts
except ImportError:
    resource = None

from experiments.bench.sizes import Size
from vjax import host_memory


# ------------------------------------------------------------------------------------------ helpers
def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                cpu: dict[str, list[float]] | None = None,
                faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each zero-argument, blocking callable; contenders alternate order per round.
    ``cpu``: filled with the process's CPU seconds (every thread) of each call, beside the wall time;
    ``faults``: with its minor page faults (memory the kernel had to map afresh: see vjax.host_memory)."""
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for extra in (cpu, faults):
        if extra is not None:
            extra.update({k: [] for k in names})
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            f0, c0, t0 = minor_faults(), time.process_time(), time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu[k].append(time.process_time() - c0)
            if faults is not None:
                faults[k].append(minor_faults() - f0)
    return times


def stats(ts: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}


class CompileCounter:
    """Counts XLA backend compilations (``/jax/core/compile/backend_compile_duration`` events)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, duration: float, **kw) -> None:
        if event == self.EVENT:
            self.count += 1

    @contextlib.contextmanager
    def span(self, out: dict, key: str):
        start = self.count
        try:
            yield
        finally:
            out[key] = self.count - start


_COMPILES: CompileCounter | None = None


def compiles() -> CompileCounter:
    global _COMPILES
    if _COMPILES is None:
        _COMPILES = CompileCounter()
    return _COMPILES


def compiled_memory(compiled) -> dict[str, int]:
    """Bytes XLA allocates for one call of a compiled executable (see the module docstring)."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k + "_in_bytes", 0) or 0)
           for k in ("argument_size", "output_size", "temp_size", "alias_size", "peak_memory")}
    out["total"] = out["argument_size"] + out["output_size"] + out["temp_size"] - out["alias_size"]
    return out


def mib(n: float) -> str:
    """Bytes in binary units (``1.5 MiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} B"


def gflop(n: float) -> str:
    """FLOPs in GFLOP, three significant digits below 100."""
    return f"{n / 1e9:.1f}" if n >= 1e11 else f"{n / 1e9:.3g}"


def machine() -> dict[str, Any]:
    """CPU model, cores, library versions, JAX device platform."""
    import flax
    import optax
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _pkg_version("jaxlib"),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "device_platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # both frameworks share the process, so both get it (see vjax.host_memory)
        "malloc_keeps_freed_memory": host_memory.applied(),
    }
    try:
        import torch
        import transformers
        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        info.update(torch=None, transformers=None)
    return info


def loadavg() -> float | None:
    """1-minute load average of the host (other jobs' load shows here, not in our own CPU time)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _pkg_version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass
class Row:
    """One line of the Markdown table."""

    suite: str
    measurement: str
    value: str
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclasses.dataclass
class Context:
    size_name: str
    size: Size
    repeats: int
    results: dict[str, Any]  # suite name -> its JSON entry (suites may read earlier ones)
    rows: list[Row]
    workdir: str
    torch_compile: bool = True  # train_step: also time transformers under torch.compile (minutes to compile)


# ------------------------------------------------------------------------------------------ output
def markdown(results: dict[str, Any], rows: list[Row]) -> str:
    m = results["machine"]
    lines = [
        f"Benchmarks (`--size={results['size']}`, {results['repeats']} repeats, medians; "
        f"{results['date']}).",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_affinity'] or m['cpu_count']} cores usable "
        f"(of {m['cpu_count']}); JAX {m['jax']} on {m['device_platform']} ({m['device_count']} device); "
        f"torch {m.get('torch')} ({m.get('torch_threads')} threads); transformers {m.get('transformers')}; "
        + ("malloc keeps freed memory (`vjax.host_memory`; both frameworks)." if m.get("malloc_keeps_freed_memory")
           else "glibc's default malloc (each step's large temporaries are page-faulted anew)."),
        "",
        "Host 1-min load average per suite (start -> end; above the core count means other jobs "
        "were competing for the cores): " + ", ".join(
            f"{k} {v[0]} -> {v[1]}" for k, v in results.get("loadavg_1min", {}).items()) + ".",
        "",
    ]
    cores = m["cpu_affinity"] or m["cpu_count"]
    loaded = [k for k, v in results.get("loadavg_1min", {}).items() if max(x or 0 for x in v) > cores]
    if loaded:
        lines += [f"**Warning: the load average exceeded the {cores} cores during {', '.join(loaded)}**: other "
                  "jobs competed for the CPU, and the ratios of those suites say more about the load than the "
                  "code.", ""]
    lines += [
        "| suite | measurement | value | target | met | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.suite} | {r.measurement} | {r.value} | {r.target} | {met} | {r.note} |")
    for name, err in results.get("errors", {}).items():
        lines.append(f"| {name} | **error** | {err.splitlines()[-1] if err else ''} | | **no** | |")
    return "\n".join(lines) + "\n"


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)
