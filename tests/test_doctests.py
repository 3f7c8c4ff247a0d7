"""Every docstring example in the package runs and prints what it shows (``doctest``), so the formulas in
the layers' docstrings stay true as the code changes."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vjax

MODULES = sorted(m.name for m in pkgutil.walk_packages(vjax.__path__, "vjax."))


def test_the_layers_have_examples():
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for name in MODULES if name.startswith("vjax.layers.")
                   for t in finder.find(importlib.import_module(name)))
    assert examples >= 150, examples


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (output above)"
