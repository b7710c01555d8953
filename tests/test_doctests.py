"""The examples in the public docstrings run."""

import doctest

import pytest

import lightning_memopt.adafactor_rules
import lightning_memopt.blocks
import lightning_memopt.compat
import lightning_memopt.data
import lightning_memopt.engine
import lightning_memopt.instruct
import lightning_memopt.lm
import lightning_memopt.optimizers
import lightning_memopt.precision
import lightning_memopt.strategies


@pytest.mark.parametrize(
    "module",
    [
        lightning_memopt.adafactor_rules,
        lightning_memopt.blocks,
        lightning_memopt.compat,
        lightning_memopt.data,
        lightning_memopt.engine,
        lightning_memopt.instruct,
        lightning_memopt.lm,
        lightning_memopt.optimizers,
        lightning_memopt.precision,
        lightning_memopt.strategies,
    ],
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
