"""The docstring examples of every library module run as tests (they are documentation)."""

import doctest
import importlib
import pkgutil

import pytest

import optax_gradflow

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(optax_gradflow.__path__, prefix="optax_gradflow.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"


def test_the_examples_exist():
    # A module list that found nothing would make the test above vacuous.
    attempted = 0
    for name in ("optax_gradflow.transform", "optax_gradflow.config", "optax_gradflow.presets"):
        finder = doctest.DocTestFinder()
        attempted += sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
    assert attempted >= 10
