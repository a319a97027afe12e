"""Finding the tensors in call arguments, wherever they sit, and naming them for messages."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

_MAX_DEPTH = 6


def walk(
    value: Any, label: str, visit: Callable[[str, torch.Tensor], None], depth: int = 0
) -> None:
    """Call ``visit(label, tensor)`` for each tensor in ``value``: lists, tuples, dicts,
    namedtuples and dataclasses are searched, labels read like code (``batch['mel']``)."""
    if isinstance(value, torch.Tensor):
        visit(label, value)
        return
    if depth >= _MAX_DEPTH or isinstance(value, (str, bytes, int, float, bool, type(None))):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            walk(item, f"{label}[{i}]", visit, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            walk(item, f"{label}[{key!r}]", visit, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            walk(getattr(value, field.name, None), f"{label}.{field.name}", visit, depth + 1)


def replace(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], depth: int = 0) -> Any:
    """``value`` with each tensor ``t`` replaced by ``fn(t)``; containers are rebuilt only when
    something inside them changed, so untouched arguments keep their identity."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if depth >= _MAX_DEPTH or isinstance(value, (str, bytes, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        items = [replace(item, fn, depth + 1) for item in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, list):
            return items
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*items)
        try:
            return type(value)(items)
        except TypeError:
            return tuple(items)
    if isinstance(value, dict):
        new = {k: replace(v, fn, depth + 1) for k, v in value.items()}
        if all(new[k] is value[k] for k in value):
            return value
        try:
            out = type(value)()
            out.update(new)
            return out
        except TypeError:
            return new
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for field in dataclasses.fields(value):
            old = getattr(value, field.name, None)
            new_value = replace(old, fn, depth + 1)
            if new_value is not old:
                changes[field.name] = new_value
        if not changes:
            return value
        import copy

        clone = copy.copy(value)
        for name, new_value in changes.items():
            object.__setattr__(clone, name, new_value)
        return clone
    return value
