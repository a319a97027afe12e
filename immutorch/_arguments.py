"""Finding the tensors in call arguments, wherever they sit, and naming them for messages."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import weakref
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple, Optional

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


class Rebuilt(NamedTuple):
    """A mutable container ``replace`` rebuilt: the caller's, the copy the callee got, and
    what the copy held when it was handed over."""

    original: Any
    copy: Any
    placed: Any


def replace(
    value: Any,
    fn: Callable[[torch.Tensor], torch.Tensor],
    depth: int = 0,
    rebuilt: Optional[list[Rebuilt]] = None,
) -> Any:
    """``value`` with each tensor ``t`` replaced by ``fn(t)``; containers are rebuilt only when
    something inside them changed, so untouched arguments keep their identity. Each list, dict
    and dataclass rebuilt is recorded in ``rebuilt`` (innermost first), for :func:`write_back`."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if depth >= _MAX_DEPTH or isinstance(value, (str, bytes, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        items = [replace(item, fn, depth + 1, rebuilt) for item in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, list):
            if rebuilt is not None:
                rebuilt.append(Rebuilt(value, items, list(items)))
            return items
        if hasattr(value, "_fields"):  # namedtuple
            return type(value)(*items)
        try:
            return type(value)(items)
        except TypeError:
            return tuple(items)
    if isinstance(value, dict):
        new = {k: replace(v, fn, depth + 1, rebuilt) for k, v in value.items()}
        if all(new[k] is value[k] for k in value):
            return value
        try:
            out = type(value)()
            out.update(new)
        except TypeError:
            out = new
        if rebuilt is not None:
            rebuilt.append(Rebuilt(value, out, dict(out)))
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for field in dataclasses.fields(value):
            old = getattr(value, field.name, None)
            new_value = replace(old, fn, depth + 1, rebuilt)
            if new_value is not old:
                changes[field.name] = new_value
        if not changes:
            return value
        import copy

        clone = copy.copy(value)
        for name, new_value in changes.items():
            object.__setattr__(clone, name, new_value)
        if rebuilt is not None and hasattr(clone, "__dict__"):
            rebuilt.append(Rebuilt(value, clone, dict(vars(clone))))
        return clone
    return value


def replace_call(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    fn: Callable[[torch.Tensor], torch.Tensor],
    rebuilt: Optional[list[Rebuilt]] = None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's positional and keyword arguments with :func:`replace` applied to each; the
    tuple and the dict come back as the same objects when nothing in them changed.

    ``fn`` runs once per tensor object: one passed several times (``f(x, x)``, ``mha(x, x,
    x)``, in a list and as a keyword) is replaced by one object everywhere, so the callee's
    identity tests (``q is k``) and the fused paths that rest on them go as unguarded."""
    fn = once_per_tensor(fn)
    new_args = tuple(replace(a, fn, rebuilt=rebuilt) for a in args)
    if all(a is b for a, b in zip(new_args, args)):
        new_args = args
    new_kwargs = {k: replace(v, fn, rebuilt=rebuilt) for k, v in kwargs.items()}
    if all(new_kwargs[k] is kwargs[k] for k in kwargs):
        new_kwargs = kwargs
    return new_args, new_kwargs


def once_per_tensor(
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn``, remembering its result for each tensor object it has seen. Keyed by ``id``: use
    it only while the tensors it sees are alive (the arguments of the call being handed over
    hold them), so that no id can be reused meanwhile."""
    seen: dict[int, torch.Tensor] = {}

    def replace_once(t: torch.Tensor) -> torch.Tensor:
        new = seen.get(id(t))
        if new is None:
            new = seen[id(t)] = fn(t)
        return new

    return replace_once


def write_back(rebuilt: list[Rebuilt], back: Callable[[Any], Any]) -> None:
    """Carry what the callee did to the containers it was handed (keys and items it added,
    replaced or removed, attributes it set) over to the caller's own, as without the guard.
    What is still as it was handed over stays the caller's; anything new passes through
    ``back`` (which turns immutorch's aliases back into plain tensors)."""
    for entry in rebuilt:
        original, new, placed = entry
        if isinstance(new, dict):
            # A value the callee moved to another key (d["y"] = d["x"]) is the caller's.
            by_id = {id(p): original[k] for k, p in placed.items() if k in original}
            for key in [k for k in original if k not in new]:
                del original[key]
            for key, item in new.items():
                if key in placed and placed[key] is item and key in original:
                    continue
                original[key] = by_id[id(item)] if id(item) in by_id else back(item)
        elif isinstance(new, list):
            if len(new) == len(placed) and all(a is b for a, b in zip(new, placed)):
                continue
            by_id = {id(p): o for p, o in zip(placed, list(original))}
            original[:] = [by_id[id(i)] if id(i) in by_id else back(i) for i in new]
        else:  # a dataclass instance
            for name, item in vars(new).items():
                if placed.get(name) is item:
                    continue
                object.__setattr__(original, name, back(item))


# -- labels -----------------------------------------------------------------------------------
# Weak: a module class made at run time (in a function, a test) must not live for good, and
# with it whatever its methods' closures hold.
_param_names: weakref.WeakKeyDictionary[type, list[str]] = weakref.WeakKeyDictionary()


def forward_param_names(module: torch.nn.Module) -> list[str]:
    """The names of ``forward``'s positional parameters, for labels; [] where unknown.

    A ScriptModule's class attribute ``forward`` raises AttributeError on access (its
    ``_CachedForward`` descriptor); its compiled method carries a schema instead.
    """
    cls = type(module)
    names = _param_names.get(cls)
    if names is not None:
        return names
    if isinstance(module, torch.jit.ScriptModule):
        try:
            schema = module.forward.schema  # type: ignore[attr-defined]
            return [a.name for a in schema.arguments[1:]]  # per instance: no class cache
        except (AttributeError, RuntimeError):
            return []
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError, AttributeError):
        names = []
    _param_names[cls] = names
    return names


def arg_label(names: list[str], index: int) -> str:
    return names[index] if index < len(names) else f"args[{index}]"


def label_call(
    names: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    visit: Callable[[str, torch.Tensor], None],
) -> None:
    """:func:`walk` over a call's arguments, each labelled by its parameter name in ``names``
    (``forward``'s, from :func:`forward_param_names`) or its keyword."""
    for i, value in enumerate(args):
        walk(value, arg_label(names, i), visit)
    for key, value in kwargs.items():
        walk(value, key, visit)


# torch's Module._call_impl, whose frame (``self``, ``args``, ``kwargs``) each module call
# runs, with or without immutorch's shell around it (read at import, before any shell).
CALL_IMPL_CODE = torch.nn.Module._call_impl.__code__


# Reads the modules in call off the interpreter's frames without f_locals: the native
# backend's, installed when it loads (install_stack_reader). Returns None where it cannot.
_stack_reader: Optional[Callable[[], Optional[list[Any]]]] = None


def install_stack_reader(reader: Callable[[], Optional[list[Any]]]) -> None:
    global _stack_reader
    _stack_reader = reader


def modules_on_stack() -> list[torch.nn.Module]:
    """The module of each ``Module.__call__`` running on this thread, innermost first. Asked
    at a block's write into memory from before it (is it module state?), and by clone mode at
    each argument it may hand over: each frame's ``f_locals`` cost ~1 us, read natively ~0.1."""
    read = _stack_reader
    found = read() if read is not None else None
    if found is None:
        found = [local["self"] for local in module_calls_on_stack()]
    return [m for m in found if isinstance(m, torch.nn.Module)]


def module_calls_on_stack() -> Iterator[dict[str, Any]]:
    """The locals (``self``, ``args``, ``kwargs``) of each ``Module.__call__`` running on this
    thread's interpreter stack, innermost first; for messages, never on a hot path."""
    frame: Any = sys._getframe(1)
    while frame is not None:
        if frame.f_code is CALL_IMPL_CODE:
            local = frame.f_locals
            if isinstance(local.get("self"), torch.nn.Module):
                yield local
        frame = frame.f_back
