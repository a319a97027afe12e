"""immutorch: PyTorch code must not write into the tensors it was handed.

A ``TorchDispatchMode`` watches every aten op while a guard is active and acts *before* an op
writes into a protected tensor's memory: ``raise`` (:class:`ImmutableTensorError`), ``warn``
(:class:`MutationWarning`), ``clone`` (the write lands in a private copy), or ``off``.
"""

from ._config import Mode
from ._decorator import immutable_inputs
from ._errors import ImmutableTensorError, MutationWarning
from ._guard import Guard, guard
from ._readonly import is_readonly, readonly, writable
from ._registry import CloneStats
from ._stats import clone_stats

__all__ = [
    "CloneStats",
    "Guard",
    "ImmutableTensorError",
    "Mode",
    "MutationWarning",
    "clone_stats",
    "guard",
    "immutable_inputs",
    "is_readonly",
    "readonly",
    "writable",
]

__version__ = "0.1.0"
