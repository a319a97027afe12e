"""immutorch: PyTorch code must not write into the tensors it was handed.

While a guard is active, immutorch sees every aten op (``scope="all"``, a
``TorchDispatchMode``) or only the ops on protected arguments (``scope="arguments"``, a tensor
subclass handed to the callee), and acts *before* an op writes into a protected tensor's
memory: ``raise`` (:class:`ImmutableTensorError`), ``warn`` (:class:`MutationWarning`),
``clone`` (the write lands in a private copy), or ``off``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._boundaries import watch_modules as watch_modules
    from ._config import Mode as Mode
    from ._config import Scope as Scope
    from ._decorator import immutable_inputs as immutable_inputs
    from ._errors import ImmutableTensorError as ImmutableTensorError
    from ._errors import MutationWarning as MutationWarning
    from ._guard import Guard as Guard
    from ._guard import guard as guard
    from ._readonly import is_readonly as is_readonly
    from ._readonly import readonly as readonly
    from ._readonly import writable as writable
    from ._registry import CloneStats as CloneStats
    from ._saved import GuardSaved as GuardSaved
    from ._saved import guard_saved as guard_saved
    from ._stats import clone_stats as clone_stats

# Public name -> the private module that defines it, imported on first use (PEP 562): the
# pytest plugin is loaded in every pytest run wherever immutorch is installed, and must not
# import torch there unless a setting asks for it.
_EXPORTS = {
    "CloneStats": "._registry",
    "Guard": "._guard",
    "GuardSaved": "._saved",
    "ImmutableTensorError": "._errors",
    "Mode": "._config",
    "Scope": "._config",
    "MutationWarning": "._errors",
    "clone_stats": "._stats",
    "guard": "._guard",
    "guard_saved": "._saved",
    "immutable_inputs": "._decorator",
    "is_readonly": "._readonly",
    "readonly": "._readonly",
    "watch_modules": "._boundaries",
    "writable": "._readonly",
}

__all__ = sorted(_EXPORTS)

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'immutorch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
