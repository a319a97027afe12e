"""``guard``: protect named tensors, or everything that existed before, inside a block."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any, Callable, Optional, TypeVar, Union

import torch
import wrapt

from . import _arguments
from ._boundaries import enter, finish, leave
from ._config import Mode, Scope, check_mode, check_scope, resolve, resolve_scope
from ._policy import raise_original, user_frame
from ._registry import BLOCK, NAMED, STATE, CloneStats, Frame

F = TypeVar("F", bound=Callable[..., Any])

Allowed = Union[torch.Tensor, torch.nn.Module, torch.optim.Optimizer, Iterable[Any]]


class Guard:
    """A context manager (and decorator) returned by ``guard``.

    ``stats`` counts the copies clone mode made for this guard, over all its uses.
    """

    def __init__(
        self,
        tensors: tuple[Any, ...],
        mode: Mode,
        allow: Allowed,
        protect_state: bool,
        scope: Scope = "all",
    ) -> None:
        for i, value in enumerate(tensors):
            if not isinstance(value, (torch.Tensor, torch.nn.Module, list, tuple, dict)):
                raise TypeError(
                    f"immutorch.guard() protects tensors and modules; argument {i} is a "
                    f"{type(value).__name__}. Pass the tensors to protect, or nothing to "
                    "protect every tensor that exists before the block."
                )
        self.tensors = tensors
        self.mode: Mode = check_mode(mode)
        self.scope: Scope = check_scope(scope)
        self.allow = allow
        self.protect_state = protect_state
        self.stats = CloneStats()
        self._active: list[Optional[Frame]] = []

    def _frame(self) -> Optional[Frame]:
        mode = resolve(self.mode)
        if mode == "off" or STATE.bypass:  # bypass: immutorch stepped aside (tracing)
            return None
        user = user_frame()
        where = "guard()"
        if user is not None:
            where = f"guard() at {user.f_code.co_filename}:{user.f_lineno}"
        kind = NAMED if self.tensors else BLOCK
        frame = Frame(
            mode,
            where,
            kind,
            protect_state=self.protect_state,
            stats=self.stats,
            scope=resolve_scope(self.scope),
            modules_scoped=True,
        )
        for i, value in enumerate(self.tensors):
            label = f"guard argument {i}"
            if isinstance(value, torch.nn.Module):
                for name, t in _module_tensors(value):
                    frame.protect(f"{label} ({name})", t)
            else:
                _arguments.walk(value, label, frame.protect)
        _allow(frame, self.allow)
        return frame

    def __enter__(self) -> Guard:
        frame = self._frame()
        if frame is not None:
            enter(frame)
        self._active.append(frame)
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        frame = self._active.pop()
        if frame is not None:
            try:
                if exc is None and frame.deferred:
                    finish(frame)
            finally:
                leave(frame)
        if exc is not None:
            raise_original(exc)

    def __call__(self, fn: F) -> F:
        @wrapt.decorator  # type: ignore[misc]
        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            __tracebackhide__ = True
            frame = self._frame()
            if frame is None:
                return wrapped(*args, **kwargs)
            enter(frame)
            try:
                out = wrapped(*args, **kwargs)
                if frame.deferred:
                    finish(frame)
                return out
            except RuntimeError as exc:
                raise_original(exc)
                raise
            finally:
                leave(frame)

        return wrapper(fn)  # type: ignore[no-any-return,return-value]


def guard(
    *tensors: Any,
    mode: Mode = "raise",
    allow: Allowed = (),
    protect_state: bool = False,
    scope: Scope = "all",
) -> Guard:
    """Protect tensors from writes inside a ``with`` block (or a decorated function).

    ``guard(x, y)`` protects ``x`` and ``y`` (every view of them included); ``guard()`` with no
    tensors protects every tensor that existed before the block, so the block may write only
    into memory it allocated itself. Module parameters, buffers and gradients (of any module,
    called in the block or not) are state, not data, and stay writable unless
    ``protect_state=True``; ``allow=`` exempts tensors, modules (their
    parameters, buffers and gradients) and optimizers (their state).

    ``scope="all"`` (the default) intercepts every op in the block. ``scope="arguments"``
    intercepts every op of the block body itself, but inside each module call only the ops
    that take a protected argument of that call (or a view of it): the module's other ops run
    at full speed, and a write that reaches protected memory there through another reference
    (a closure, a global, a cached attribute) goes unseen.

    Examples:
        >>> import torch, immutorch
        >>> mel = torch.randn(2, 80, 10)
        >>> with immutorch.guard(mode="clone"):
        ...     out = torch.nn.ReLU(inplace=True)(mel)
        >>> bool((mel < 0).any())
        True
    """
    return Guard(tensors, mode, allow, protect_state, scope)


def _module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _allow(frame: Frame, allow: Any) -> None:
    if isinstance(allow, torch.Tensor):
        frame.allow_tensor(allow)
    elif isinstance(allow, torch.nn.Module):
        for _, t in _module_tensors(allow):
            frame.allow_tensor(t)
            if t.grad is not None:
                frame.allow_tensor(t.grad)
    elif isinstance(allow, torch.optim.Optimizer):
        for group in allow.param_groups:
            for p in group["params"]:
                frame.allow_tensor(p)
        for per_param in allow.state.values():
            for value in per_param.values():
                if isinstance(value, torch.Tensor):
                    frame.allow_tensor(value)
    elif isinstance(allow, dict):
        for value in allow.values():
            _allow(frame, value)
    elif isinstance(allow, Iterable) and not isinstance(allow, (str, bytes)):
        for value in allow:
            _allow(frame, value)
    else:
        raise TypeError(
            "immutorch.guard(allow=...) takes tensors, modules, optimizers or iterables of "
            f"them; got {type(allow).__name__}"
        )
