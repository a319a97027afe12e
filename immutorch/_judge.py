"""Judging a write, shared by both backends: the every-op dispatch mode (``_mode``) and the
scoped subclass (``_scoped``) call :func:`check` on each tensor an op writes, and the policy
layer above decides what happens (``set_write_handler``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import _registry
from ._clone import group_of
from ._compat import is_functorch_wrapped, storage_use_count
from ._registry import ThreadState, strictest
from ._schema import META, OpFacts, iter_tensors, written_values
from ._storage import PLAIN, leaf_storages, memory_leaves, set_born, storage_of


def never_type_error(fn: Any) -> Any:
    """Re-raise a TypeError from immutorch's bookkeeping around an op as a RuntimeError.

    Tensor operators (``__iadd__``, ``__add__`` ...) turn a TypeError into NotImplemented and
    Python then silently falls back: a failed copy-on-write inside ``x += 1`` became
    ``x = x + 1`` (seen on torch 2.5), and a failure after the write would add a second time.
    Nothing from immutorch's machinery may pass for "this operand type is not supported".
    """

    def wrapper(*args: Any) -> Any:
        __tracebackhide__ = True
        try:
            return fn(*args)
        except TypeError as err:
            raise RuntimeError(
                f"immutorch: internal error in {fn.__name__}: {type(err).__name__}: {err}. "
                f"This is a bug in immutorch (torch {torch.__version__}); please report it "
                "with this traceback."
            ) from err

    wrapper.__name__ = wrapper.__qualname__ = fn.__name__
    return wrapper


def check(state: ThreadState, op: str, arg: str, meta: bool, t: torch.Tensor) -> None:
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    if meta:
        hits = state.object_hits(t)
        if hits:
            _handle_write(strictest(hits), op, "*" + arg, t, meta=True)
        return
    if t.layout is torch.strided and type(t) in PLAIN:
        storage = storage_of(t)
        if storage is not None:
            # functionalize's wrapper has a storage, but only as bookkeeping: a protection
            # put on the wrapper itself (a decorator inside the transform) counts; when it was
            # born is its memory's question, asked below.
            wrapped = is_functorch_wrapped(t)
            hits = _effective(state.storage_hits(t, storage, blocks=not wrapped), op, arg)
            if hits:
                _handle_write(strictest(hits), op, arg, t)
                return
            if not wrapped:
                return
        # A torch.func wrapper (BatchedTensor, TensorWrapper: no storage of its own), which the
        # native backend's key sees above functorch (the Python mode only ever sees the tensor
        # underneath): judged by the tensor that holds its memory, below.

    # Sparse layouts, wrapper subclasses, functorch wrappers: judge each tensor that holds
    # their memory.
    def visit(leaf: torch.Tensor) -> None:
        storage = storage_of(leaf)
        if storage is not None:
            hits = _effective(state.storage_hits(leaf, storage), op, arg)
            if hits:
                _handle_write(strictest(hits), op, arg, leaf)

    memory_leaves(t, visit)


def _effective(hits: list[_registry.Hit], op: str, arg: str) -> list[_registry.Hit]:
    """The hits whose frame does not let this write through (see ``Frame.lets_through``)."""
    if hits and any(h.frame.lets_through(op, arg) for h in hits):
        return [h for h in hits if not h.frame.lets_through(op, arg)]
    return hits


# Like tag_births and join: a TypeError from the check must not become NotImplemented.
check = never_type_error(check)


def check_writes(state: ThreadState, facts: OpFacts, args: Any, kwargs: Any) -> None:
    """Judge every tensor the op described by ``facts`` would write, before it runs."""
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    for written, value in written_values(facts, args, kwargs):
        if isinstance(value, torch.Tensor):
            check(state, facts.name, written.name, written.kind == META, value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    check(state, facts.name, written.name, written.kind == META, item)


def lifted_fresh(out: Any) -> bool:
    """Whether ``aten::lift_fresh`` wrapped new memory (``torch.tensor(data)``), not memory that
    exists already: ``torch.from_numpy`` wraps bytes numpy owns (not resizable), and
    ``torch.asarray(x.untyped_storage())`` wraps x's own storage. A storage made for the new
    tensor is held by it and by the Python storage object just looked up, nothing else; more
    holders mean it was there before. (Two holders is also a storage held only by a Python
    storage object from before: the one case this cannot tell, see docs/pytorch-features.md.)
    """
    storage = storage_of(out) if isinstance(out, torch.Tensor) else None
    if storage is None or not storage.resizable():
        return False
    holders = storage_use_count(storage)
    return holders is None or holders <= 2


@never_type_error
def tag_births(
    out: Any, args: tuple[Any, ...] = (), kwargs: Optional[dict[str, Any]] = None
) -> None:
    """Date the new memory an op with fresh outputs returned. An output over one of the op's
    own inputs' storages is not new, whatever the schema says: ``aten::_unsafe_view`` declares
    no alias and returns a view of its argument (found running kornia's suite under a block)."""
    epoch = _registry.current_epoch
    outs = [out] if isinstance(out, torch.Tensor) else out if isinstance(out, (tuple, list)) else ()
    taken: Optional[set[int]] = None
    for item in outs:
        if isinstance(item, torch.Tensor):
            if taken is None:
                taken = _input_storages(args, kwargs or {})
            _tag_birth(item, epoch, taken)


def _input_storages(args: tuple[Any, ...], kwargs: dict[str, Any]) -> set[int]:
    found: set[int] = set()

    def add(t: torch.Tensor) -> None:
        storage = storage_of(t)
        if storage is not None:
            found.add(storage._cdata)

    for value in (*args, *kwargs.values()):
        iter_tensors(value, add)
    return found


def _tag_birth(t: torch.Tensor, epoch: int, taken: set[int]) -> None:
    if type(t) is torch.Tensor:
        storage = storage_of(t)
        if storage is not None and storage._cdata not in taken:
            set_born(storage, epoch)
        return

    # A wrapper subclass (DTensor: FSDP2's parameters and optimizer state) holds its memory in
    # inner tensors allocated past this mode; they are as new as the wrapper.
    for storage in leaf_storages(t):
        set_born(storage, epoch)


@never_type_error
def join_view(source: torch.Tensor, out: Any) -> None:
    """Clone mode: ``out``, a view (or views) of ``source``, joins source's copy-on-write
    group while the group is not copied yet."""
    group = group_of(source)
    if group is None or group.copied:
        return
    if isinstance(out, torch.Tensor):
        group.add(out)
    elif isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                group.add(item)


# What to do at a write into protected memory: the policy layer above installs its handler
# (``_policy`` calls ``set_write_handler`` on import), so this backends never import it.
def _no_policy(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("immutorch: internal error: no write policy installed (import immutorch)")


_handle_write: Any = _no_policy
_remember_error: Any = lambda error: None  # noqa: E731


def remember_error(error: BaseException) -> None:
    """Hand an exception raised through a backend to the policy (see ``set_write_handler``)."""
    _remember_error(error)


def set_write_handler(handle: Any, remember_error: Any) -> None:
    """Install the policy: ``handle(hit, op, arg, tensor, meta=...)`` at each write into
    protected memory, ``remember_error(exc)`` for each exception raised through the mode."""
    global _handle_write, _remember_error
    _handle_write, _remember_error = handle, remember_error
