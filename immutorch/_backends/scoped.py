"""The scoped backend: only ops on protected arguments reach Python.

At a boundary (a decorated call, a watched module, a module called inside a
``guard(scope="arguments")`` block) each protected tensor is handed to the callee as a
:class:`Protected` alias: a tensor subclass over the *same* storage, whose
``__torch_dispatch__`` runs for the ops that take it (or a view of it) and for no other op.
Those ops are judged exactly as the every-op mode judges them (``_judge.check_writes``, the same
policy and messages); views the callee makes of an argument come back as ``Protected`` too, and
fresh results as plain tensors. Ops on unrelated tensors never leave C++.

What it cannot see, by design: writes that reach the memory through another reference that
never crossed the boundary (a closure, a global, a cached attribute, ``untyped_storage()``), and
read-only marks on tensors that are not arguments. ``scope="all"`` (the every-op mode) sees them.

Raise and warn hand over ``x.as_subclass(Protected)``: an autograd alias of ``x`` (same storage,
same version counter, identity gradient). Clone hands over a copy-on-write alias (``_clone``)
of type ``Protected``. Where a tensor cannot be handed over this way (wrapper subclasses, sparse
and nested layouts, functorch wrappers) the front door falls back to the every-op mode for that
call, so nothing is lost.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from .. import _judge
from .._arguments import replace
from .._clone import GROUP_ATTR, alias, can_alias, group_of, shows_caller
from .._compat import (
    DisableTorchDispatch,
    disable_dynamo,
    disable_torch_dispatch,
    is_functorch_wrapped,
    tracing_now,
)
from .._compiled import compile_in_use
from .._registry import STATE, CloneStats, protection_of
from .._schema import OpFacts, op_facts
from .._storage import PLAIN, STANDS_FOR_ATTR, storage_of

# Ops that return views of an argument without an alias annotation in their schema: the
# ``unsafe_`` splits (PyTorch's own docs: "views ... without the view semantics"). Found by
# running PyTorch's OpInfo samples through the backend and comparing output storages with
# input storages (tests/test_scoped.py::test_every_view_stays_protected).
_UNDECLARED_VIEWS: dict[str, int] = {
    "aten::unsafe_split": 0,
    "aten::unsafe_split_with_sizes": 0,
    "aten::unsafe_chunk": 0,
}


# Per overload, what the dispatch below needs, computed once: (facts, whether its writes or
# set_ must be judged, the index of the argument a returned view aliases, the C++ callable).
_plans: dict[Any, tuple[OpFacts, bool, Optional[int], Any]] = {}


def _plan(func: Any) -> tuple[OpFacts, bool, Optional[int], Any]:
    facts = op_facts(func)
    view_of = facts.view_of
    if view_of is None:
        view_of = _UNDECLARED_VIEWS.get(facts.name)
    judged = bool(facts.writes) or facts.name == "aten::set_"
    plan = (facts, judged, view_of, getattr(func, "_op", func))
    _plans[func] = plan
    return plan


def _dispatch(
    cls: type,
    func: Any,
    types: Any,
    args: tuple[Any, ...] = (),
    kwargs: Optional[dict[str, Any]] = None,
) -> Any:
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    plan = _plans.get(func)
    if plan is None:
        plan = _plan(func)
    facts, judged, view_of, run = plan
    if kwargs is None:
        kwargs = {}
    if judged:
        state = STATE
        # With the every-op mode on the stack, it has judged this op already (modes come
        # before subclasses); immutorch's own ops run with bypass set.
        if state.mode_handle is None and not state.bypass:
            if facts.writes:
                _judge.check_writes(state, facts, args, kwargs)
            if facts.name == "aten::set_":
                _judge_set_source(state, args, kwargs)
    try:
        with DisableTorchDispatch():
            out = run(*args, **kwargs)
    except Exception as exc:
        _judge.remember_error(exc)
        raise
    if view_of is None:
        return out
    if facts.name in _BIT_VIEWS and bit_views_broken():
        raise RuntimeError(
            f"immutorch: {facts.name} made a conjugate or negative view of a scoped "
            f"argument; torch {torch.__version__} cannot run ops on such a view of a tensor "
            'subclass (fixed in newer torch). Use scope="all" for this call, or resolve '
            "the view first (x.resolve_conj(), x.resolve_neg())."
        )
    source = args[view_of] if view_of < len(args) else None
    if type(out) is torch.Tensor and (source is None or GROUP_ATTR not in source.__dict__):
        return out.as_subclass(Protected)  # the common case: one view, no clone group
    return _rewrap(out, source, STATE.mode_handle is None and not STATE.bypass)


# Views that set a lazy conjugate or negative bit. Before torch 2.9 (2.5.1 seen; 2.6 to 2.8 not
# tried), an op on such a view of a Python tensor subclass fails in torch's conjugate fallback
# with "SystemError: ... returned NULL without setting an exception".
_BIT_VIEWS = frozenset({"aten::_conj", "aten::_neg_view"})
_bit_views: Optional[bool] = None


def bit_views_broken() -> bool:
    """Whether this torch fails ops on a conjugate view of a tensor subclass (probed once)."""
    global _bit_views
    if _bit_views is None:

        class _Probe(torch.Tensor):
            __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

            @classmethod
            def __torch_dispatch__(  # type: ignore[override]
                cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
            ) -> Any:
                with DisableTorchDispatch():
                    out = func(*args, **(kwargs or {}))
                return out.as_subclass(_Probe) if func is torch.ops.aten._conj.default else out

        try:
            probe = torch.ones(1, dtype=torch.complex64).as_subclass(_Probe).conj()
            _ = probe * 2
            _bit_views = False
        except Exception:  # SystemError on the affected releases
            _bit_views = True
    return _bit_views


class Protected(torch.Tensor):
    """A protected argument, or a view of one, handed across a boundary.

    Same storage, dtype, shape and autograd graph as the caller's tensor; ``isinstance(x,
    torch.Tensor)`` holds. Front doors turn every ``Protected`` the callee returns back into a
    plain tensor.
    """

    # torch functions run as on plain tensors; only the aten ops below reach Python.
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    __torch_dispatch__ = classmethod(_dispatch)  # type: ignore[assignment,var-annotated]

    # -- ways out of the dispatcher ------------------------------------------------------------
    # numpy() and DLPack hand the memory to code no dispatcher sees. While raise or clone
    # protects it, that code gets private memory: under raise a copy (its writes cannot reach
    # the caller, though raise mode cannot report them), under clone the alias's own copy-on-
    # write copy (the callee then sees its writes, as unguarded). Under warn, the real memory.
    def numpy(self, *, force: bool = False) -> Any:
        if self.requires_grad and not force:
            return _plain_leaf(self).numpy()  # torch's own refusal, as for the caller's tensor
        return _plain_leaf(_escape_source(self)).numpy(force=force)

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return _plain_leaf(_escape_source(self)).__dlpack__(*args, **kwargs)

    # Python-level Tensor methods that refuse, or take another path for, any subclass.
    def tolist(self) -> Any:
        return _plain_leaf(self).tolist()

    def __format__(self, spec: str) -> str:
        return str(_plain_leaf(self).__format__(spec))

    def __deepcopy__(self, memo: dict[int, Any]) -> torch.Tensor:
        # A deep copy is new memory: a plain tensor, as deepcopy of the caller's tensor gives.
        return copy.deepcopy(_plain_leaf(self), memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickled (torch.save, multiprocessing) as the plain tensor it stands for.
        return _plain_leaf(self).__reduce_ex__(protocol)

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return repr(_plain_leaf(self))


PLAIN.add(Protected)

# Once torch.compile is in use, Dynamo must not trace into the dispatch above when a compiled
# function inside a scoped call gets an alias (it warns about what it cannot trace, then falls
# back to eager). torch._disable_dynamo costs ~0.5 us an op, so it goes on only then.
_dynamo_safe = False


def _make_dynamo_safe() -> None:
    global _dynamo_safe
    if compile_in_use():
        Protected.__torch_dispatch__ = classmethod(disable_dynamo(_dispatch))  # type: ignore[assignment]
        _dynamo_safe = True


def _plain_leaf(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor over the same memory, a leaf with ``t``'s requires_grad."""
    with disable_torch_dispatch():
        return torch.Tensor._make_subclass(torch.Tensor, t.detach(), t.requires_grad)


def _escape_source(t: torch.Tensor) -> torch.Tensor:
    hit = protection_of(t)
    mode = hit.mode if hit is not None else None
    if mode == "clone":
        group = group_of(t)
        if group is not None:
            if not group.copied:
                group.materialize()
            return t
    if mode in ("raise", "clone"):
        STATE.bypass += 1
        try:
            with disable_torch_dispatch(), torch.no_grad():
                return t.clone()
        finally:
            STATE.bypass -= 1
    return t


@_judge.never_type_error
def _judge_set_source(state: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``y.set_(x)`` makes a plain ``y`` a second, unwatched reference to ``x``'s memory: this
    backend would not see writes through it, so it is judged as a write into ``x`` (clone:
    ``x`` is copied first, and ``y`` then shares the private copy)."""
    target = args[0] if args else kwargs.get("self")
    source = args[1] if len(args) > 1 else kwargs.get("source")
    if isinstance(source, Protected) and not isinstance(target, Protected):
        _judge.check(state, "aten::set_", "source", False, source)


@_judge.never_type_error
def _rewrap(out: Any, source: Any, judge: bool) -> Any:
    group = source.__dict__.get(GROUP_ATTR) if isinstance(source, torch.Tensor) else None
    if group is not None and (group.copied or not judge):
        group = None  # copied: nothing left to isolate; not judging: the mode joins views
    if isinstance(out, torch.Tensor):
        return _protect_view(out, group)
    if isinstance(out, (list, tuple)):
        items = [_protect_view(o, group) if isinstance(o, torch.Tensor) else o for o in out]
        return type(out)(items) if isinstance(out, tuple) else items
    return out


def _protect_view(t: torch.Tensor, group: Any) -> torch.Tensor:
    if type(t) is not Protected:
        t = t.as_subclass(Protected)
    if group is not None:
        group.add(t)
    return t


# -- front doors' helpers ----------------------------------------------------------------------
def can_scope(t: torch.Tensor) -> bool:
    """Whether ``t`` can be handed over as a ``Protected`` alias."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter, Protected)
        and t.layout is torch.strided
        and not t.is_nested
        and storage_of(t) is not None
        and not is_functorch_wrapped(t)
        and not ((t.is_conj() or t.is_neg()) and bit_views_broken())
        # Under make_fx or torch.export the alias's ops would run past the proxy mode, out of
        # the recorded program: the every-op mode judges the call instead.
        and not tracing_now()
    )


def hand_over(t: torch.Tensor, mode: str, stats: CloneStats) -> Optional[torch.Tensor]:
    """``t`` as a ``Protected`` alias for a callee, or None where that cannot be done (the
    front door then falls back to the every-op mode)."""
    if type(t) is Protected and (mode != "clone" or group_of(t) is not None):
        return t  # already handed over by an outer boundary
    if not can_scope(t) or (mode == "clone" and not can_alias(t)):
        return None
    if not _dynamo_safe:
        _make_dynamo_safe()
    if mode == "clone":
        out = alias(t, stats, cls=Protected)
    else:
        STATE.bypass += 1
        try:
            with disable_torch_dispatch():
                out = t.as_subclass(Protected)
        finally:
            STATE.bypass -= 1
    out.__dict__[STANDS_FOR_ATTR] = t
    return out


def to_plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a ``Protected`` one (an autograd alias), else ``t`` itself."""
    if not isinstance(t, Protected):
        return t
    STATE.bypass += 1
    try:
        with disable_torch_dispatch():
            return t.as_subclass(torch.Tensor)
    finally:
        STATE.bypass -= 1


def unwrap(value: Any, originals: dict[int, torch.Tensor]) -> Any:
    """Replace each ``Protected`` in a callee's result: by the caller's own tensor where it is
    an alias handed over for it (and, in clone mode, still uncopied), else by a plain alias."""

    def back(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, Protected):
            return t
        original = originals.get(id(t))
        if original is not None and shows_caller(t, original):
            return original
        return to_plain(t)

    return replace(value, back)
