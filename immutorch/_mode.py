"""The interception: one TorchDispatchMode per thread, pushed while any frame is active.

Every aten op passes through ``__torch_dispatch__``. Ops that write nothing (most of them)
cost one cached lookup; for a write, the written tensors' storages are looked up in the
thread's registry and the strictest protection decides, *before* the op runs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _registry, _tracing
from ._clone import GROUP_ATTR
from ._registry import STATE, ThreadState, strictest
from ._schema import META, op_facts, written_values
from ._storage import BORN_ATTR, memory_leaves, storage_of


def _never_type_error(fn: Any) -> Any:
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
        facts = op_facts(func)
        if facts.writes:
            for written, value in written_values(facts, args, kwargs):
                if isinstance(value, torch.Tensor):
                    _check(state, facts.name, written.name, written.kind == META, value)
                elif isinstance(value, (list, tuple)):
                    for item in value:
                        if isinstance(item, torch.Tensor):
                            _check(state, facts.name, written.name, written.kind == META, item)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            explained = _explain_boxed_scalar_failure(func, args, exc)
            _remember_error(explained or exc)
            if explained is not None:
                raise explained from exc
            raise
        # lift_fresh also wraps torch.from_numpy(a): a new StorageImpl over bytes numpy owns,
        # maybe those of a tensor from before the block (x.numpy()). Such external memory is
        # not resizable; it must not count as the block's own.
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
        return out


def _explain_boxed_scalar_failure(
    func: Any, args: tuple[Any, ...], exc: Exception
) -> Optional[RuntimeError]:
    """TorchScript hands a Python dispatch mode the tensor constants of a traced graph as
    Python numbers (wrapped-number tensors become scalars on the way to Python), so the op
    cannot be called again from the mode. An empty TorchDispatchMode fails the same way
    (torch 2.13). Say so, instead of the bare schema mismatch."""
    if not isinstance(exc, RuntimeError) or "Expected a value of type 'Tensor'" not in str(exc):
        return None
    schema = getattr(func, "_schema", None)
    if schema is None:
        return None
    for arg, value in zip(schema.arguments, args):
        if isinstance(value, (int, float, bool)) and str(arg.type) == "Tensor":
            return RuntimeError(
                f"immutorch: {schema.name} was handed the number {value!r} where its schema "
                "takes a Tensor. TorchScript passes the tensor constants of a traced graph to "
                "any Python dispatch mode as plain numbers (torch's limitation: an empty "
                "TorchDispatchMode fails the same way), so this TorchScript code cannot run "
                "under an immutorch guard. Call it outside the guard, or script the code with "
                "torch.jit.script instead of tracing it."
            )
    return None


def _check(state: ThreadState, op: str, arg: str, meta: bool, t: torch.Tensor) -> None:
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    if meta:
        hits = state.object_hits(t)
        if hits:
            _handle_write(strictest(hits), op, "*" + arg, t, meta=True)
        return
    if t.layout is torch.strided and type(t) in (torch.Tensor, torch.nn.Parameter):
        storage = storage_of(t)
        if storage is not None:
            hits = state.storage_hits(t, storage)
            if hits:
                _handle_write(strictest(hits), op, arg, t)
        return

    # Sparse layouts and wrapper subclasses: judge each tensor that holds their memory.
    def visit(leaf: torch.Tensor) -> None:
        storage = storage_of(leaf)
        if storage is not None:
            hits = state.storage_hits(leaf, storage)
            if hits:
                _handle_write(strictest(hits), op, arg, leaf)

    memory_leaves(t, visit)


# Like _tag_births and _join: a TypeError from the check must not become NotImplemented.
_check = _never_type_error(_check)


def _owns_memory(out: Any) -> bool:
    storage = storage_of(out) if isinstance(out, torch.Tensor) else None
    return storage is not None and bool(storage.resizable())


@_never_type_error
def _tag_births(out: Any) -> None:
    epoch = _registry.current_epoch
    if isinstance(out, torch.Tensor):
        _tag_birth(out, epoch)
    elif isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                _tag_birth(item, epoch)


def _tag_birth(t: torch.Tensor, epoch: int) -> None:
    if type(t) is torch.Tensor:
        storage = storage_of(t)
        if storage is not None:
            setattr(storage, BORN_ATTR, epoch)
        return

    # A wrapper subclass (DTensor: FSDP2's parameters and optimizer state) holds its memory in
    # inner tensors allocated past this mode; they are as new as the wrapper.
    def tag(leaf: torch.Tensor) -> None:
        storage = storage_of(leaf)
        if storage is not None:
            setattr(storage, BORN_ATTR, epoch)

    memory_leaves(t, tag)


@_never_type_error
def _join(group: Any, out: Any) -> None:
    if isinstance(out, torch.Tensor):
        group.add(out)
    elif isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                group.add(item)


def enter(frame: _registry.Frame) -> None:
    """Activate ``frame`` on this thread, pushing the dispatch mode if it is the first.

    All or nothing: a frame that fails to enter leaves no half-pushed frame and, if it was the
    first, no dispatch mode behind on the thread. (Module hooks are the front doors' business:
    ``_boundaries.enter``.)
    """
    state = STATE
    if not state.frames:
        state.dispatch_error = None
        _tracing.install()
        handle_ = ImmutorchMode(state)
        handle_.__enter__()
        state.mode_handle = handle_
    try:
        state.push(frame)
    except BaseException:
        try:
            if frame in state.frames:
                state.pop(frame)
        finally:
            _pop_mode_if_idle(state)
        raise


def leave(frame: _registry.Frame) -> None:
    """Deactivate ``frame``; pop the dispatch mode when no frame is left on this thread."""
    state = STATE
    try:
        state.pop(frame)
    finally:
        # A failure above must not strand the mode on the thread.
        _pop_mode_if_idle(state)


def _pop_mode_if_idle(state: ThreadState) -> None:
    if not state.frames and state.mode_handle is not None:
        handle_, state.mode_handle = state.mode_handle, None
        handle_.__exit__(None, None, None)


# What to do at a write into protected memory: the policy layer above installs its handler
# (``_policy`` calls ``set_write_handler`` on import), so this backend never imports it.
def _no_policy(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("immutorch: internal error: no write policy installed (import immutorch)")


_handle_write: Any = _no_policy
_remember_error: Any = lambda error: None  # noqa: E731


def set_write_handler(handle: Any, remember_error: Any) -> None:
    """Install the policy: ``handle(hit, op, arg, tensor, meta=...)`` at each write into
    protected memory, ``remember_error(exc)`` for each exception raised through the mode."""
    global _handle_write, _remember_error
    _handle_write, _remember_error = handle, remember_error
