"""torch.jit.trace under a guard: trace as if immutorch were not there.

With any Python dispatch mode on the stack, the tracer records the ops a mode runs as if
called from Python and fails on the first parameter it meets ("Cannot insert a Tensor that
requires grad as a constant", seen on torch 2.13 with an empty ``TorchDispatchMode`` and an
``nn.Conv1d``). Tracing is a one-off export step, not the code a guard is for, so immutorch
steps aside for it: the C++ entry points that run a trace (for functions, modules and
``torch.onnx``'s legacy exporter) are wrapped once, when immutorch first pushes its mode, and
while one of them runs on a thread whose innermost dispatch mode is immutorch's, that mode is
taken off the stack and module boundaries do nothing. The trace is then the one torch makes
without a guard. What that costs is said once on the ``immutorch`` logger; a write into a
protected tensor during the trace is reported after it (its version moved) as a
:class:`MutationWarning`, since it can no longer be stopped.

Scripted code (``torch.jit.script``) needs none of this: its ops reach the dispatch mode and
are checked like any other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch

from ._compat import current_dispatch_mode, pop_dispatch_mode, push_dispatch_mode
from ._errors import MutationWarning
from ._registry import STATE

_log = logging.getLogger("immutorch")
_lock = threading.Lock()
_installed = False
_depth = threading.local()  # trace entry points nest (trace -> trace_module -> C++)
_told: set[str] = set()

# (owner, attribute): the functions that run a trace. The Python ones cover the whole of
# torch.jit.trace, its check_trace re-run included; the C++ ones catch any other caller (the
# legacy ONNX exporter). Looked up by name, so a release that lacks one leaves it out.
_ENTRY_POINTS: tuple[tuple[Any, str], ...] = (
    (torch.jit, "trace"),
    (torch.jit, "trace_module"),
    (torch.jit._trace, "trace"),
    (torch.jit._trace, "trace_module"),
    (torch._C, "_create_function_from_trace"),
    (torch._C, "_create_function_from_trace_with_dict"),
    (torch._C, "_create_graph_by_tracing"),
    (torch._C.ScriptModule, "_create_method_from_trace"),
    (torch._C.ScriptModule, "_create_method_from_trace_with_dict"),
)

TRACE_OP = "torch.jit.trace"


def install() -> None:
    """Wrap the trace entry points, once per process."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        for owner, name in _ENTRY_POINTS:
            original = getattr(owner, name, None)
            if original is None or getattr(original, "_immutorch_wrapped", False):
                continue
            setattr(owner, name, _wrap(original))
        _installed = True


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    # One plain function serves both: set on a class it binds like a method, and ``self``
    # arrives as args[0], which is what the unbound original takes first.
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stepped_aside():
            return original(*args, **kwargs)

    functools.update_wrapper(wrapper, original, assigned=("__name__", "__qualname__", "__doc__"))
    wrapper._immutorch_wrapped = True  # type: ignore[attr-defined]
    return wrapper


@contextlib.contextmanager
def stepped_aside() -> Iterator[None]:
    """Run a trace with immutorch out of the way on this thread: its mode off the stack (if
    it is on top), and every front door passing calls straight through (``STATE.bypass``), so
    that a decorated or watched module met while tracing pushes no mode of its own."""
    state = STATE
    depth: int = getattr(_depth, "value", 0)
    if depth:
        _depth.value = depth + 1
        try:
            yield
        finally:
            _depth.value = depth
        return
    handle = state.mode_handle
    popped = None
    # The native backend's handle is no Python mode: state.bypass below is all it needs.
    on_stack = handle is not None and getattr(handle, "on_mode_stack", True)
    if on_stack and current_dispatch_mode() is not handle:
        # Another mode above ours: popping would pop that one. Leave the stack alone.
        _tell(
            "immutorch: torch.jit.trace runs under another dispatch mode pushed after "
            "immutorch's; immutorch leaves the mode stack as it is, and the trace may fail."
        )
    elif handle is not None or state.watchers:
        _tell(
            "immutorch: torch.jit.trace ran under an immutorch guard or watch; the trace is "
            "recorded with immutorch out of the way (a Python dispatch mode breaks tracing), "
            "so writes made while tracing are not stopped, only reported afterwards as a "
            "MutationWarning. Guards apply again to the traced module when it runs."
        )
        if on_stack:
            popped = pop_dispatch_mode()
    watched = [(p, p.obj._version) for ps in state.by_storage.values() for p in ps]
    state.bypass += 1
    _depth.value = 1
    try:
        yield
    finally:
        _depth.value = 0
        state.bypass -= 1
        if popped is not None:
            push_dispatch_mode(popped)
    for protection, version in watched:
        if protection.obj._version != version:
            t = protection.obj
            warnings.warn(
                MutationWarning(
                    f"immutorch: the code traced by torch.jit.trace wrote into "
                    f"`{protection.label}` (a {str(t.dtype).replace('torch.', '')} tensor of "
                    f"shape {list(t.shape)}), protected by {protection.frame.where}; tracing "
                    "runs without immutorch's checks, so the write went ahead.",
                    op=TRACE_OP,
                    argument=protection.label,
                    where=protection.frame.where,
                    shape=tuple(t.shape),
                    dtype=t.dtype,
                ),
                stacklevel=4,
            )


def _tell(message: str) -> None:
    if message not in _told:
        _told.add(message)
        _log.warning(message)
