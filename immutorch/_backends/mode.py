"""The every-op backend (``scope="all"``): one TorchDispatchMode per thread, pushed while a
frame that needs it is active.

Every aten op passes through ``__torch_dispatch__``. Ops that write nothing (most of them)
cost one cached lookup; for a write, the written tensors' storages are looked up in the
thread's registry and the strictest protection decides, *before* the op runs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import _births, _registry, _tracing
from .._clone import watch_unseen_views
from .._compat import current_dispatch_mode, in_backward
from .._judge import check_writes, join_view, lifted_fresh, remember_error, tag_births
from .._registry import STATE, ThreadState
from .._schema import op_facts


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
            check_writes(state, facts, args, kwargs)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            explained = _explain_boxed_scalar_failure(func, args, exc)
            remember_error(explained or exc)
            if explained is not None:
                raise explained from exc
            raise
        after = state.after_op
        if after is not None:
            after(out)
        # lift_fresh also wraps memory that exists (torch.from_numpy(x.numpy()),
        # torch.asarray(x.untyped_storage())): that must not count as the block's own.
        if (
            state.blocks
            and facts.fresh_outputs
            and (facts.name != "aten::lift_fresh" or lifted_fresh(out))
        ):
            if facts.name == "aten::lift_fresh":
                tag_births(out)  # its argument: a constant made outside the dispatcher
            else:
                tag_births(out, args, kwargs)
        if state.clone_frames and facts.view_of is not None:
            source = args[facts.view_of] if facts.view_of < len(args) else None
            if isinstance(source, torch.Tensor):
                join_view(source, out)
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


def enter(frame: _registry.Frame) -> None:
    """Activate ``frame`` on this thread, pushing the dispatch mode if the frame needs it and
    it is not there yet.

    All or nothing: a frame that fails to enter leaves no half-pushed frame and no dispatch
    mode of its own behind on the thread. (Module hooks are the front doors' business:
    ``_boundaries.enter``.)
    """
    state = STATE
    if not state.frames:
        state.dispatch_error = None
    if frame.needs_mode:
        require(body=frame.body_only, clone=frame.mode == "clone")
    try:
        if frame.kind == _registry.BLOCK:
            _births.acquire()  # memory made outside the dispatcher is dated too
        try:
            state.push(frame)
        except BaseException:
            if frame.kind == _registry.BLOCK:
                _births.release()
            raise
        _frames_changed(state)
        if _watches_views(frame):
            watch_unseen_views(True)
    except BaseException:
        try:
            if frame in state.frames:
                state.pop(frame)
        finally:
            if frame.needs_mode:
                release(body=frame.body_only)
        raise


def _watches_views(frame: _registry.Frame) -> bool:
    """An every-op clone frame: views no dispatcher reports must join their groups."""
    return frame.needs_mode and frame.mode == "clone"


def leave(frame: _registry.Frame) -> None:
    """Deactivate ``frame``; pop the dispatch mode when nothing on this thread needs it."""
    state = STATE
    try:
        if _watches_views(frame):
            watch_unseen_views(False)
        state.pop(frame)
        _frames_changed(state)
    finally:
        # A failure above must not strand the mode (or the birth wrappers) behind.
        try:
            if frame.kind == _registry.BLOCK:
                _births.release()
        finally:
            if frame.needs_mode:
                release(body=frame.body_only)


def require(*, body: bool = False, python: bool = False, clone: bool = False) -> None:
    """One more user of the every-op mode on this thread; push it if it is the first.

    ``body``: a ``guard(scope="arguments")`` frame, which needs the mode only in its block's
    body, not inside the module calls it hands over (see :func:`suspend`). ``python``: the user
    needs this module's Python mode, whatever backend serves the thread (see
    :func:`_push_if_absent`): ``guard_saved``'s protections, which come and go one by one
    outside any frame push, unseen by the native backend's mirror. ``clone``: a clone-mode
    frame, which a backend serves only if it keeps views of aliases in their groups.
    """
    state = STATE
    _push_if_absent(state, python=python, clone=clone)
    state.mode_users += 1
    if body:
        state.body_users += 1


# What serves the every-op check on a thread: this module's Python mode unless the layer above
# installs a chooser (``_backends.choice``: the native C++ fallback where it is available).
_make_handle: Callable[[ThreadState], Any] = ImmutorchMode


def set_handle_factory(make: Callable[[ThreadState], Any]) -> None:
    global _make_handle
    _make_handle = make


def _frames_changed(state: ThreadState) -> None:
    # The native backend mirrors the thread's protections in C++.
    changed = getattr(state.mode_handle, "frames_changed", None)
    if changed is not None:
        changed()


def _push_if_absent(state: ThreadState, *, python: bool = False, clone: bool = False) -> None:
    handle_ = state.mode_handle
    clone = clone or state.clone_frames > 0
    if (
        handle_ is not None
        and not isinstance(handle_, ImmutorchMode)
        and (python or (clone and not getattr(handle_, "serves_clone", False)))
    ):
        # guard_saved's protections come and go outside frame pushes, unseen by another
        # backend's mirror: a thread with live saved tensors is served by the Python mode
        # until its last guard ends (and so is clone mode by a backend that cannot serve it).
        state.mode_handle = None
        handle_.__exit__(None, None, None)
        handle_ = None
    if handle_ is None:
        _tracing.install()
        handle_ = ImmutorchMode(state) if python else _make_handle(state)
        handle_.__enter__()
        state.mode_handle = handle_


def release(*, body: bool = False) -> None:
    """One user less; pop the mode when none is left."""
    state = STATE
    state.mode_users -= 1
    if body:
        state.body_users -= 1
    if state.mode_users <= 0 and state.mode_handle is not None:
        handle_, state.mode_handle = state.mode_handle, None
        handle_.__exit__(None, None, None)


def suspend() -> Optional[tuple[int, int]]:
    """Take the every-op mode off the stack for a module call whose protected arguments were
    handed over as scoped aliases, when the only frames that need it are block bodies and it is
    on top of the stack. Returns what :func:`resume` needs, or None where it stays.

    Never inside a backward node (reentrant checkpoint's recompute, a hook): the engine runs
    each node under the thread-local state it captured when backward began and puts it back
    after, so what was popped there returns and what :func:`resume` pushed is dropped. The
    thread's record would then name a mode that is not on the stack, and torch below 2.13 frees
    the old one while the stack still points at it (a crash at a later op)."""
    state = STATE
    handle_ = state.mode_handle
    if (
        handle_ is None
        or state.mode_users != state.body_users
        or (getattr(handle_, "on_mode_stack", True) and current_dispatch_mode() is not handle_)
        or in_backward()
    ):
        return None
    users = (state.mode_users, state.body_users)
    state.mode_handle = None
    state.mode_users = state.body_users = 0
    handle_.__exit__(None, None, None)
    # Ops in the call that touch no handed-over argument now run unseen, their results
    # undated: the registry judges undated memory there by what was handed over.
    state.suspended_calls += 1
    return users


def resume(users: tuple[int, int]) -> None:
    """Put back what :func:`suspend` took off."""
    state = STATE
    state.suspended_calls -= 1
    _push_if_absent(state)
    state.mode_users += users[0]
    state.body_users += users[1]
