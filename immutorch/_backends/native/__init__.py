"""The native every-op backend (``scope="all"``): a C++ dispatcher fallback (``guard.cpp``)
that does the fast reject per op and calls Python only at a write that may reach protected
memory, where it runs the same judgement as the Python mode (``_judge.check_writes``), and, in
clone mode, at a view of possibly protected memory (it joins the alias's copy-on-write group).
A thread with live ``guard_saved`` protections is served by the Python mode (``_backends.mode``).

This module is the Python side: the handle the every-op layer pushes per thread (it puts the
fallback's key into the thread's TLS), the callbacks the fallback makes, and the mirror of the
thread's protections the fallback reads (:func:`sync`, called whenever frames change).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Callable, Optional

import torch

from ... import _registry, _storage
from ..._arguments import CALL_IMPL_CODE, install_stack_reader
from ..._clone import (
    DATA_DESCRIPTOR,
    adopt,
    install_data_hook,
    install_member_hook,
    install_native_alias,
    install_view_flush,
)
from ..._judge import check_writes, join_view
from ..._registry import ThreadState
from ..._schema import DATA, META, OpFacts, WrittenArg, op_facts, undeclared_writers
from .. import requested_status
from .loader import NativeUnavailable, NotBuilt, load

_module: Optional[ModuleType] = None
_reason: Optional[str] = None  # why the native backend is not available, once tried
# Why the default (IMMUTORCH_BACKEND unset) found nothing to load, without building: no build
# for this installation (NotBuilt), or one that fails the loader's checks. Asked once per
# process; an explicit IMMUTORCH_BACKEND=native still builds.
_not_loaded: Optional[NativeUnavailable] = None
# The keys the fallback is on, each with what reaches it there ("every op", "writes", ...).
_keys: Optional[list[tuple[str, str]]] = None
# (name, overload) -> its OpOverload, as the fallback names ops: valid while no operator has
# been deregistered since (the C++ side's op_generation), after which a name may stand for an
# operator defined anew, with another schema.
_ops: dict[tuple[str, str], Any] = {}
_ops_generation = 0
# Clone mode's module-call check in C++ once loaded: (args, kwargs) -> whether any argument may
# have to be handed over (False: none can; True: ask Python). See may_hand_over in guard.cpp.
hand_over_filter: Optional[Callable[[tuple[Any, ...], Optional[dict[str, Any]]], bool]] = None
# The module-call shell's common case in C++ once loaded: (module, args, kwargs) -> True where
# the call needs no boundary work (_boundaries._only_noted's answer), False: ask Python. See
# quiet_call in guard.cpp.
quiet_call: Optional[Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], bool]] = None


def _resolve(name: str, overload: str) -> Any:
    global _ops_generation
    generation = int(_module.op_generation()) if _module is not None else 0
    if generation != _ops_generation:
        _ops.clear()
        _ops_generation = generation
    key = (name, overload)
    func = _ops.get(key, _ops)
    if func is _ops:
        func = None
        namespace, _, op = name.partition("::")
        try:
            packet = getattr(getattr(torch.ops, namespace), op)
            func = getattr(packet, overload or "default")
        except (AttributeError, RuntimeError):
            pass
        _ops[key] = func
    return func


def _facts(name: str, overload: str) -> Optional[tuple[list[tuple[int, int, bool]], bool, int]]:
    """The fallback's per-schema facts, from ``_schema`` (the one source of them)."""
    func = _resolve(name, overload)
    if func is None:
        return None
    facts = op_facts(func)
    writes = [(w.position, -1 if w.when is None else w.when, w.kind == META) for w in facts.writes]
    return writes, facts.fresh_outputs, -1 if facts.view_of is None else facts.view_of


def _write(
    state: ThreadState,
    name: str,
    overload: str,
    args: tuple[Any, ...],
    written: list[tuple[int, str, int, bool]],
) -> None:
    """A write that may reach protected memory: judge it as the Python mode does."""
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    if state.bypass:
        return
    func = _resolve(name, overload)
    if func is not None:
        facts = op_facts(func)
    else:  # not reachable through torch.ops: the writes its schema declares, read in C++
        writes = tuple(
            WrittenArg(position, arg, META if meta else DATA, when=None if when < 0 else when)
            for position, arg, when, meta in written
        )
        facts = OpFacts(name, writes, False, None)
    check_writes(state, facts, args, {})


def _join(source: torch.Tensor, out: Any) -> None:
    """Clone mode: ``out``, a view of ``source``, joins source's copy-on-write group."""
    if not _registry.STATE.bypass:
        join_view(source, out)


def _readonly(storage: Any, marked: bool) -> None:
    if _module is not None:
        _module.mark_readonly(storage, marked)


def _born(storage: Any) -> int:
    return int(_module.born(storage)) if _module is not None else 0


def available(*, build: bool = True) -> bool:
    """Whether the native backend can serve; builds it the first time if ``build``, else only
    loads a build the cache holds for this installation."""
    global _module, _reason, _keys, _not_loaded, hand_over_filter, quiet_call
    if _module is not None:
        return True
    if _reason is not None or (not build and _not_loaded is not None):
        return False
    try:
        module = load(build_if_missing=build)
        # leaf_storages: where a fresh output the fallback saw wrapped by torch.func has its
        # memory (the birth belongs to those storages).
        installed = module.install(
            _facts, _write, _storage.leaf_storages, _join, undeclared_writers()
        )
        _keys = [(str(key), str(sees)) for key, sees in installed]
    except NativeUnavailable as err:
        if build:
            _reason = str(err)
        else:
            _not_loaded = err
        return False
    except RuntimeError as err:  # install: the dispatch keys are taken
        _reason = f"the native backend's dispatch key is taken ({err})"
        return False
    _module = module
    set_births_by_allocation(only_cpu())
    hand_over_filter = module.may_hand_over
    module.install_call_check(_registry.STATE, CALL_IMPL_CODE)
    quiet_call = module.quiet_call
    install_stack_reader(module.modules_on_stack)
    install_member_hook(module.mark_member)
    install_view_flush(module.flush_views)
    module.install_adopt(adopt)
    install_native_alias(module.alias_for)
    install_data_hook(lambda on: module.watch_data(DATA_DESCRIPTOR, on))
    _storage.install_native_hooks(_born, _readonly, module.keep_birth)
    return True


def module_call_through(
    inner: Callable[..., Any],
    boundary: Callable[..., Any],
    hand_over: Callable[[torch.Tensor], torch.Tensor],
    back: Callable[[Any, dict[int, torch.Tensor]], Any],
) -> Optional[Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], Any]]:
    """The module-call shell's body in C++, ``(module, args, kwargs)``: ``inner(module, *args,
    **kwargs)`` where the call needs nothing; where it needs only clone mode's hand-over of
    top-level tensor arguments, ``hand_over(t)`` for each that may be protected (the alias it
    crosses as, or ``t``) and ``back(result, {id(alias): t})`` after; else ``boundary(module,
    args, kwargs, inner)``. None where the backend is not loaded."""
    if _module is None:
        return None
    _module.install_shell(inner, boundary, hand_over, back)
    call: Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], Any] = _module.module_call
    return call


def only_cpu() -> bool:
    """Whether this process can make tensor memory on CPU (and meta) only: no accelerator."""
    for name in ("cuda", "xpu", "mps", "mtia"):
        device = getattr(torch, name, None)
        is_available = getattr(device, "is_available", None)
        if is_available is not None and is_available():
            return False
    return torch._C._get_privateuse1_backend_name() == "privateuseone"


def set_births_by_allocation(on: bool) -> bool:
    """Date a block's births by allocation (CPU's allocator stamps the memory made while a
    block is active) instead of by op (a boxed call on every op of the block, to date its
    fresh outputs); see DatingAllocator in guard.cpp. Only where no accelerator can make
    memory: CUDA's caching allocator is not reached that way. Returns whether it is on."""
    return _module is not None and bool(_module.set_births_by_allocation(on))


def unavailable_reason() -> Optional[str]:
    return _reason


def status() -> str:
    """One line saying which every-op backend serves and why (for logs and pytest headers)."""
    choice = os.environ.get("IMMUTORCH_BACKEND", "").strip().lower()
    if choice != "python":
        if _module is not None and _keys is not None:
            return f"native ({describe_keys(_keys)})"
        if _reason is not None:
            return f"python (native unavailable: {_reason})"
        if choice != "native" and _not_loaded is not None:
            if isinstance(_not_loaded, NotBuilt):
                return (
                    "python (native not built for this torch and Python: "
                    "`python -m immutorch build-native` builds it)"
                )
            return f"python (native not loaded: {_not_loaded})"
    return requested_status()


def describe_keys(keys: list[tuple[str, str]]) -> str:
    """``C++ fallback on K for writes, ...``: each key and what reaches the fallback there."""
    return "C++ fallback on " + ", ".join(f"{key} for {sees}" for key, sees in keys)


def sync(state: ThreadState) -> None:
    """Mirror ``state``'s protections into the fallback (on this thread)."""
    module = _module
    if module is None:
        return
    storages: dict[int, Any] = {}
    for protections in state.by_storage.values():
        for p in protections:
            storages[p.cdata] = p.storage
    # The protected objects, for writes of size or strides (ThreadState.object_hits).
    objects: dict[int, torch.Tensor] = {}
    for protections in state.by_object.values():
        for p in protections:
            objects[id(p.obj)] = p.obj
            if p.holder is not None:
                objects[id(p.holder)] = p.holder
    block_start = max((f.start for f in state.blocks), default=0)
    module.sync(
        list(storages.values()),
        list(objects.values()),
        block_start,
        _registry.current_epoch,
        state.clone_frames > 0,
    )


class NativeHandle:
    """What ``state.mode_handle`` holds when the native backend serves a thread: entering it
    puts the fallback's key into this thread's TLS (carried into autograd engine threads and
    jit._fork tasks by torch's ThreadLocalState), leaving takes it out. Not on the Python mode
    stack: code that pops immutorch's mode (tracing, compiled calls) leaves it alone and relies
    on ``state.bypass``, which the fallback's Python side honours."""

    on_mode_stack = False
    serves_clone = True

    def __init__(self, state: ThreadState) -> None:
        self.state = state

    def __enter__(self) -> NativeHandle:
        assert _module is not None
        _module.activate(self.state)
        self.frames_changed()
        return self

    def __exit__(self, *exc: Any) -> None:
        if _module is not None:
            _module.activate(None)

    def frames_changed(self) -> None:
        sync(self.state)


def enabled() -> bool:
    """Whether the fallback's key is on for this thread (a guard served by native is active)."""
    return _module is not None and bool(_module.enabled())
