"""Shared pytest set-up: offline hub, fast XLA compiles, absl flags parsed (Grain workers read them), f32 matmuls."""
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs on CPUs. libtpu (the plan extra, in the test extra) would otherwise initialise the TPU plugin in
# every process, and every subprocess, and print its errors about missing TPU workers on stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite is compile-bound (hundreds of tiny models): LLVM's expensive optimisation passes cost more
# than they save at these sizes. HLO-level optimisation (fusion, layout) is unchanged; the published
# benchmark figures come from `python -m experiments.bench`, not from here. Subprocesses and notebook
# kernels inherit the flag (the quickstart notebook trains 30 steps under the suite: compile-bound too).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

# One persistent compilation cache for the whole session — both xdist workers and every subprocess they start
# (the commands under test): the same tiny model compiled by several test files (chat_univi's train step in the
# CLI, loop and fault tests) compiles once. A size limit turns on JAX's file lock, so concurrent writers and
# readers of an entry are serialised. The directory is removed when the session ends.
CACHE_DIR = os.path.join(tempfile.gettempdir(),
                         f"vjax_tests_jax_cache_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

# Parity tests compare against float32 PyTorch: keep XLA's CPU matmuls at full precision.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
    """The controller (not an xdist worker) removes the session's compilation cache."""
    if "PYTEST_XDIST_WORKER" not in os.environ and os.environ.get("JAX_COMPILATION_CACHE_DIR") == CACHE_DIR:
        shutil.rmtree(CACHE_DIR, ignore_errors=True)


# pytest-xdist's --dist loadfile hands out whole files in collection order, and the slowest files (subprocess runs of
# every model) sort last alphabetically, so one worker used to run them alone at the end while the other idled.
# Longest first (seconds of the 2026-12-05 suite's slowest tests per file), then the other tests/train files (each
# compiles or starts training processes), then the rest in collection order: short tests fill the workers' tails.
LONGEST_FILES = ("tests/train/test_train_cli.py", "tests/test_pretrain.py", "tests/test_pretrain_connector.py",
                 "tests/train/test_train_faults.py",
                 "tests/train/test_sharded.py", "tests/train/test_train_faults_data.py", "tests/test_notebooks.py",
                 "tests/train/test_frame_buckets.py", "tests/test_bench.py", "tests/test_plan.py",
                 "tests/convert/test_convert_cli.py", "tests/test_quant.py", "tests/train/test_loop.py")


def pytest_collection_modifyitems(config, items):
    """Files in ``LONGEST_FILES`` first, in that order, then tests/train (a stable sort: tests keep their order within
    a file)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}

    def key(item):
        path = item.nodeid.split("::")[0]
        return rank.get(path, len(rank) + (0 if path.startswith("tests/train/") else 1))

    items.sort(key=key)
