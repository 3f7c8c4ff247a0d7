"""``python -m experiments.bench``: run the suites named by ``--suite`` (see the package docstring)."""

from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging

from experiments import cli
from experiments.bench import SUITE_NAMES, SUITES, run


_SUITE = flags.DEFINE_string("suite", "all", f"'all' or a comma-separated subset of {SUITE_NAMES}")
_OUT = flags.DEFINE_string("out", "./bench_out", "directory for results.json and results.md")
_SIZE = flags.DEFINE_enum("size", "small", ["tiny", "small"], "tiny: seconds (tests); small: real figures")
_COMPILE = flags.DEFINE_bool("torch_compile", True, "train_step: also time transformers under torch.compile "
                             "(a contender where it compiles; about 2-3 minutes of compilation per model on a CPU)")
_REPEATS = flags.DEFINE_integer("repeats", None, "timed repeats per measurement (default: 5 small, 2 tiny)")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # optax logs its constant schedule at INFO
    # Exact float32 matmuls (as in the parity tests); on CPU this is XLA's default anyway.
    jax.config.update("jax_default_matmul_precision", "highest")
    suites = list(SUITES) if _SUITE.value == "all" else [s.strip() for s in _SUITE.value.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:  # a usage error: exit 2 (experiments.cli); a suite that fails below is an internal error: 1
        cli.fail(f"--suite: unknown suite(s) {unknown}; choose from {list(SUITES)}")
    results = run(suites, _SIZE.value, _OUT.value, _REPEATS.value, torch_compile=_COMPILE.value)
    with open(os.path.join(_OUT.value, "results.md")) as f:
        print(f.read())
    if results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
