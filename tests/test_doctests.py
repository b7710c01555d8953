"""The examples in the public docstrings run: every module of the API reference (docs/reference/) whose examples are
written as doctests, and the version shims."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

REFERENCE = Path(__file__).parents[1] / "docs" / "reference"
MODULES = sorted(
    {name for page in REFERENCE.glob("*.md") for name in re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M)}
    | {"lightning_memopt.compat"}
)
# modules whose examples are all plain code (a Trainer, a recipe), not doctests
NO_DOCTESTS = {
    "lightning_memopt.callbacks.beta2_schedule",
    "lightning_memopt.callbacks.relative_step",
    "lightning_memopt.callbacks.update_clipping",
    "lightning_memopt.cli",
    "lightning_memopt.strategies.collectives",
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert (result.attempted > 0) != (name in NO_DOCTESTS), result
