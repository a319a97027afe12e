"""The ways each workload's callee is called: the reference, the floor, and every guard.

All variants run the same callee on the same inputs (each variant its own copy). The labels
say which scope runs: ``scope='all'``, a dispatch mode that sees every aten op while the guard
is active; scope ``arguments``, protected arguments handed to the callee as a tensor subclass,
so only the ops that take one reach Python (``immutorch/_backends/scoped.py``).

- ``unguarded``: the plain call (1.00 by definition).
- ``empty_mode``: a ``TorchDispatchMode`` whose ``__torch_dispatch__`` only calls the op,
  entered around each call: the floor for anything built on a Python dispatch mode.
- ``raise``, ``warn``, ``clone``, ``off``: ``@immutorch.immutable_inputs(mode=...)`` on the
  callee, in its default scope, arguments.
- ``raise_all``, ``clone_all``: the same with ``scope="all"``.
- ``guard_block``: ``with immutorch.guard():`` around the call (mode raise, scope all).
- ``guard_clone``: ``with immutorch.guard(mode="clone"):`` (scope all).
- ``guard_clone_scoped``: ``with immutorch.guard(mode="clone", scope="arguments"):``: the block
  body stays under the every-op check; inside each module call the protected arguments are
  handed over as scoped aliases and only their ops reach Python.
- ``clone_up_front``: what users do by hand, ``fn(*(x.clone() for x in inputs))``.
- ``schema_check``: ``torch._subclasses.schema_check_mode.SchemaCheckMode``, PyTorch's own
  schema validator (clones every input of every op); very slow, so fewer repetitions.

The variants marked ``guarded`` run once per immutorch backend (``harness.py`` sets
``IMMUTORCH_BACKEND`` around them); the others do not depend on it and run once.

Where a workload protects only some arguments (``Workload.protect``), the decorator gets
``only=`` and the guards name them, ``guard(p, ...)``; elsewhere every tensor argument is
protected and the guards name nothing (everything that existed before the block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import immutorch

Call = Callable[[], object]
# Builds a variant's call from the callee, its inputs (the variant's own copy) and the names
# of the protected leading parameters (None: every tensor argument).
Factory = Callable[[Callable[..., object], tuple[Tensor, ...], Optional[tuple[str, ...]]], Call]


class EmptyMode(TorchDispatchMode):
    """The floor: a Python dispatch mode that does nothing but run the op."""

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:
        return func(*args, **(kwargs or {}))


def schema_check_mode() -> Optional[type[TorchDispatchMode]]:
    try:
        from torch._subclasses.schema_check_mode import SchemaCheckMode
    except ImportError:  # pragma: no cover - present in every torch this supports
        return None
    return SchemaCheckMode  # type: ignore[no-any-return]


def in_mode(mode_type: type[TorchDispatchMode], fn: Callable[..., object], inputs: Any) -> Call:
    def call() -> object:
        with mode_type():
            return fn(*inputs)

    return call


def in_guard(
    fn: Callable[..., object], inputs: Any, protect: Optional[tuple[str, ...]], **kw: Any
) -> Call:
    """``with guard(**kw):`` around the call; with ``protect``, the guard names those leading
    inputs (``guard(p, ...)``), else none (everything that existed before the block)."""
    named = tuple(inputs[: len(protect)]) if protect else ()

    def call() -> object:
        with immutorch.guard(*named, **kw):
            return fn(*inputs)

    return call


def decorated(
    mode: immutorch.Mode,
    fn: Callable[..., object],
    inputs: Any,
    protect: Optional[tuple[str, ...]] = None,
    scope: Optional[str] = None,
) -> Call:
    kw: dict[str, Any] = {} if scope is None else {"scope": scope}
    guarded = immutorch.immutable_inputs(mode=mode, only=protect, **kw)(fn)
    return lambda: guarded(*inputs)


def cloned_up_front(fn: Callable[..., object], inputs: Any) -> Call:
    return lambda: fn(*(x.clone() for x in inputs))


@dataclass(frozen=True)
class Variant:
    key: str
    # In labels, {only} and {named} become the workload's protected parameters
    # (", only=('p',)" and "p, "), and {what} says what a guard protects.
    label: str
    build: Factory
    # Runs once per immutorch backend.
    guarded: bool = True

    def label_for(self, protect: Optional[tuple[str, ...]]) -> str:
        names = ", ".join(protect or ())
        return self.label.format(
            only=f", only={tuple(protect)!r}" if protect else "",
            named=f"{names}, " if protect else "",
            named_only=names,
            what="" if protect else " no tensors named,",
            what_end="" if protect else " no tensors named",
        )


# The first is the reference, the second the floor. Scope "arguments" is the decorator's
# default, "all" the guard's: every label says which one runs.
VARIANTS: list[Variant] = [
    Variant("unguarded", "unguarded", lambda fn, xs, _: lambda: fn(*xs), guarded=False),
    Variant(
        "empty_mode",
        "empty TorchDispatchMode (floor of a Python mode)",
        lambda fn, xs, _: in_mode(EmptyMode, fn, xs),
        guarded=False,
    ),
    Variant(
        "raise_all",
        "immutable_inputs(mode='raise'{only}, scope='all')",
        lambda fn, xs, p: decorated("raise", fn, xs, p, "all"),
    ),
    Variant(
        "raise",
        "immutable_inputs(mode='raise'{only}), scope arguments",
        lambda fn, xs, p: decorated("raise", fn, xs, p),
    ),
    Variant(
        "warn",
        "immutable_inputs(mode='warn'{only}), scope arguments",
        lambda fn, xs, p: decorated("warn", fn, xs, p),
    ),
    Variant(
        "clone_all",
        "immutable_inputs(mode='clone'{only}, scope='all')",
        lambda fn, xs, p: decorated("clone", fn, xs, p, "all"),
    ),
    Variant(
        "clone",
        "immutable_inputs(mode='clone'{only}), scope arguments",
        lambda fn, xs, p: decorated("clone", fn, xs, p),
    ),
    Variant(
        "off",
        "immutable_inputs(mode='off'{only})",
        lambda fn, xs, p: decorated("off", fn, xs, p),
        guarded=False,
    ),
    Variant(
        "guard_block",
        "with guard({named_only}): raise,{what} scope all",
        lambda fn, xs, p: in_guard(fn, xs, p),
    ),
    Variant(
        "guard_clone",
        "with guard({named}mode='clone'):{what} scope all",
        lambda fn, xs, p: in_guard(fn, xs, p, mode="clone"),
    ),
    Variant(
        "guard_clone_scoped",
        "with guard({named}mode='clone', scope='arguments'):{what_end}",
        lambda fn, xs, p: in_guard(fn, xs, p, mode="clone", scope="arguments"),
    ),
    Variant(
        "clone_up_front",
        "clone every input up front",
        lambda fn, xs, _: cloned_up_front(fn, xs),
        guarded=False,
    ),
]
BY_KEY: dict[str, Variant] = {v.key: v for v in VARIANTS}

SCHEMA_CHECK = "schema_check"
