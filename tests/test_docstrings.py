"""The examples in the public docstrings run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest


# _errors is left out: its classes report __module__ "immutorch", so doctest skips them there.
@pytest.mark.parametrize(
    "module", ["_guard", "_decorator", "_readonly", "_saved", "_stats", "_boundaries"]
)
def test_docstring_examples(module):
    mod = importlib.import_module(f"immutorch.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
