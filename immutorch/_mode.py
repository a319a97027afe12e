"""The interception: one TorchDispatchMode per thread, pushed while any frame is active.

Every aten op passes through ``__torch_dispatch__``. Ops that write nothing (most of them)
cost one cached lookup; for a write, the written tensors' storages are looked up in the
thread's registry and the strictest protection decides, *before* the op runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _boundaries, _policy, _registry
from ._clone import GROUP_ATTR
from ._compiled import compile_in_use
from ._registry import STATE, ThreadState, strictest
from ._schema import META, op_facts, written_values
from ._storage import BORN_ATTR, memory_leaves, storage_of


class ImmutorchMode(TorchDispatchMode):
    """Checks each op's written arguments against the thread's protections."""

    def __init__(self, state: ThreadState) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
        if kwargs is None:
            kwargs = {}
        state = self.state
        if state.bypass:
            return func(*args, **kwargs)
        try:
            facts = op_facts(func)
            if facts.writes:
                for written, value in written_values(facts, args, kwargs):
                    if isinstance(value, torch.Tensor):
                        _check(state, facts.name, written.name, written.kind == META, value)
                    elif isinstance(value, (list, tuple)):
                        for item in value:
                            if isinstance(item, torch.Tensor):
                                _check(state, facts.name, written.name, written.kind == META, item)
        except TypeError as err:
            raise _internal_error(str(func), err, ran=False) from err
        out = func(*args, **kwargs)
        try:
            # lift_fresh also wraps torch.from_numpy(a): a new StorageImpl over bytes numpy
            # owns, maybe those of a tensor from before the block (x.numpy()). Such external
            # memory is not resizable; it must not count as the block's own.
            if (
                state.blocks
                and facts.fresh_outputs
                and (facts.name != "aten::lift_fresh" or _owns_memory(out))
            ):
                _tag_births(out)
            if state.clone_frames and facts.view_of is not None:
                source = args[facts.view_of] if facts.view_of < len(args) else None
                if isinstance(source, torch.Tensor):
                    group = source.__dict__.get(GROUP_ATTR)
                    if group is not None and not group.copied:
                        _join(group, out)
        except TypeError as err:
            # After the op: a NotImplemented here would make `x += 1` run a second time.
            raise _internal_error(facts.name, err, ran=True) from err
        return out


def _internal_error(op: str, err: TypeError, *, ran: bool) -> RuntimeError:
    """A TypeError raised by immutorch's own bookkeeping around an op, as a RuntimeError.

    Tensor operators (``__iadd__``, ``__add__`` ...) turn a TypeError into NotImplemented, and
    Python then silently falls back: a failed check inside ``x += 1`` became ``x = x + 1``
    (seen on torch 2.5). Nothing from immutorch's machinery may be mistaken for "this operand
    type is not supported".
    """
    outcome = "The op ran." if ran else "The op did not run."
    return RuntimeError(
        f"immutorch: internal error around {op}: {type(err).__name__}: {err}. {outcome} "
        f"This is a bug in immutorch (torch {torch.__version__}); please report it with this "
        "traceback."
    )


def _check(state: ThreadState, op: str, arg: str, meta: bool, t: torch.Tensor) -> None:
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    if meta:
        hits = state.object_hits(t)
        if hits:
            _policy.handle(strictest(hits), op, "*" + arg, t, meta=True)
        return
    if t.layout is torch.strided and type(t) in (torch.Tensor, torch.nn.Parameter):
        storage = storage_of(t)
        if storage is not None:
            hits = state.storage_hits(t, storage)
            if hits:
                _policy.handle(strictest(hits), op, arg, t)
        return

    # Sparse layouts and wrapper subclasses: judge each tensor that holds their memory.
    def visit(leaf: torch.Tensor) -> None:
        storage = storage_of(leaf)
        if storage is not None:
            hits = state.storage_hits(leaf, storage)
            if hits:
                _policy.handle(strictest(hits), op, arg, leaf)

    memory_leaves(t, visit)


def _owns_memory(out: Any) -> bool:
    storage = storage_of(out) if isinstance(out, torch.Tensor) else None
    return storage is not None and bool(storage.resizable())


def _tag_births(out: Any) -> None:
    epoch = _registry.current_epoch
    if isinstance(out, torch.Tensor):
        storage = storage_of(out)
        if storage is not None:
            setattr(storage, BORN_ATTR, epoch)
    elif isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                storage = storage_of(item)
                if storage is not None:
                    setattr(storage, BORN_ATTR, epoch)


def _join(group: Any, out: Any) -> None:
    if isinstance(out, torch.Tensor):
        group.add(out)
    elif isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                group.add(item)


def enter(frame: _registry.Frame) -> None:
    """Activate ``frame`` on this thread, pushing the dispatch mode if it is the first.

    All or nothing: if any step fails, the steps before it are undone, so no mode, hook
    reference or frame is left behind on the thread.
    """
    state = STATE
    pushed: ImmutorchMode | None = None
    try:
        if not state.frames:
            pushed = ImmutorchMode(state)
            pushed.__enter__()
            state.mode_handle = pushed
        # Module boundaries do work only for block guards (module state, argument names),
        # clone mode (aliases) and torch.compile (compiled modules run outside the mode).
        # Elsewhere the global hooks would only slow every module call (~6 us each, measured
        # on the encoder); errors then find the module path by walking the stack.
        if frame.kind == _registry.BLOCK or frame.mode == "clone" or compile_in_use():
            _boundaries.acquire_hooks()
            frame.hooked = True
        state.push(frame)
    except BaseException:
        if frame.hooked:
            frame.hooked = False
            _boundaries.release_hooks()
        if pushed is not None and state.mode_handle is pushed:
            state.mode_handle = None
            pushed.__exit__(None, None, None)
        raise


def leave(frame: _registry.Frame) -> None:
    """Deactivate ``frame``; pop the dispatch mode when no frame is left on this thread.

    Each step runs even if an earlier one raised: a failure here must not strand the mode.
    """
    state = STATE
    try:
        state.pop(frame)
    finally:
        try:
            if frame.hooked:
                frame.hooked = False
                _boundaries.release_hooks()
        finally:
            if not state.frames and state.mode_handle is not None:
                handle_, state.mode_handle = state.mode_handle, None
                handle_.__exit__(None, None, None)
