"""Lasting read-only marks, like numpy's ``arr.flags.writeable = False``.

The mark sits on the storage, so every view shares it, and it lives exactly as long as the
memory: no reference to the tensor is held.
"""

from __future__ import annotations

from typing import Union

import torch

from ._storage import READONLY_ATTR, describe, leaf_storages, note_readonly

Markable = Union[torch.Tensor, torch.nn.Module]


def _storages(items: tuple[Markable, ...], fn: str) -> list[tuple[str, torch.UntypedStorage]]:
    out: list[tuple[str, torch.UntypedStorage]] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.nn.Module):
            named = list(item.named_parameters()) + list(item.named_buffers())
            tensors = [(f"{type(item).__name__}.{name}", t) for name, t in named]
        elif isinstance(item, torch.Tensor):
            tensors = [(describe(item), item)]
        else:
            raise TypeError(
                f"immutorch.{fn}() takes tensors and modules; argument {i} is a "
                f"{type(item).__name__}"
            )
        for label, t in tensors:
            out += [(label, storage) for storage in leaf_storages(t)]
    return out


def readonly(*tensors: Markable) -> None:
    """Mark tensors (or a module's parameters and buffers) read-only for every guard.

    The mark is enforced wherever a guard is active (``guard``, ``immutable_inputs``, the
    pytest plugin's strict mode), in that guard's mode. It covers every view of the memory.

    Examples:
        >>> import torch, immutorch
        >>> w = torch.ones(3)
        >>> immutorch.readonly(w)
        >>> immutorch.is_readonly(w[1:])
        True
    """
    for label, storage in _storages(tensors, "readonly"):
        setattr(storage, READONLY_ATTR, label)
        note_readonly(storage, True)


def writable(*tensors: Markable) -> None:
    """Remove the read-only mark from tensors (and from every view of their memory)."""
    for _, storage in _storages(tensors, "writable"):
        if hasattr(storage, READONLY_ATTR):
            delattr(storage, READONLY_ATTR)
            note_readonly(storage, False)


def is_readonly(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory carries a read-only mark."""
    return any(hasattr(s, READONLY_ATTR) for _, s in _storages((t,), "is_readonly"))
