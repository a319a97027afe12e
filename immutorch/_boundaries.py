"""Module boundaries: inside any guard, every ``nn.Module`` call is a boundary.

PyTorch's global module hooks see each ``Module.__call__`` (not direct ``.forward()`` calls).
At a boundary immutorch records the module's path for messages, exempts the module's own
state from block guards, hands protected arguments over as copy-on-write aliases in clone
mode, and, under :func:`watch_modules` (the pytest plugin's ``--immutorch-modules``), protects
the arguments of the modules it watches for the duration of their call.

The hooks are installed only while some thread has a guard active or a watch open, and
come off as the last of those ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from torch.nn.modules import module as _module_mod

from . import _arguments, _module_state, _registry
from ._backends import choice as _choice  # noqa: F401  (installs the backend choice)
from ._backends import mode as _mode
from ._backends import native as _native
from ._backends.scoped import Protected, can_scope, to_plain, unwrap
from ._backends.scoped import hand_over as hand_over_scoped
from ._clone import alias, back_to_caller, group_of
from ._compat import functional_mutations
from ._compiled import CompiledBoundary, compile_in_use
from ._config import Mode, Scope, check_mode, check_scope, resolve, resolve_scope
from ._judge import check
from ._naming import display_path, is_compiled

# Importing the policy also installs it as the dispatch mode's write handler.
from ._policy import raise_original
from ._registry import BLOCK, STATE, Frame, Hit, protection_of
from ._storage import born_epoch, set_born, storage_of, tensor_leaves

_lock = threading.Lock()
_users = 0
_handles: list[Any] = []


def acquire_hooks() -> None:
    """Count one more user of the module hooks (a thread's first frame, or a watch)."""
    global _users
    with _lock:
        _users += 1
        if not _handles:
            _install()
        elif _handles[0] is None:
            _register_pre()  # taken off for another thread's scoped call: back for everyone
    # Also before torch.compile is first used: a watch opened at the start of a test is
    # already there when the test compiles a module (found in kornia's suite, where the
    # warning failed `-W error` runs).
    _hush_compile_hook_warning()


def release_hooks() -> None:
    """Count one user less; the last one takes the hooks off at once.

    Nothing may outlive the last guard: any global module hook sends ``Module.__call__`` down
    its slow path for the whole process and makes ``torch.export.export(strict=True)`` fail
    ("Attempted to inline function marked as skipped", torch 2.13, with any global hook at
    all). A clone-mode decorated forward called in a loop re-registers the two hooks per call
    (~8 us, measured: ``tests/test_export_and_leftovers.py`` pins only the behaviour).
    """
    global _users
    with _lock:
        _users -= 1
        if _users <= 0:
            _users = 0
            _remove_locked()


_COMPILE_HOOK_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"
_COMPILE_HOOK_TEXT = "Using `torch.compile(module)` when there are global hooks on modules"


def _hush_compile_hook_warning() -> None:
    """torch warns that global hooks also fire for torch.compile's wrapper module. The hooks
    are immutorch's and it handles that wrapper (see _compiled), so the warning is noise.

    Checked on each thread's first frame, since catch_warnings (pytest, per test) resets
    filters; a filter is added only when ours is not already the one that applies, because
    every change to the filters also resets each module's once-per-line warning registry.
    """
    for action, regex, category, _module, _lineno in warnings.filters:
        if issubclass(UserWarning, category) and (regex is None or regex.match(_COMPILE_HOOK_TEXT)):
            if action == "ignore" and regex is not None and regex.pattern == _COMPILE_HOOK_WARNING:
                return
            break
    warnings.filterwarnings("ignore", message=_COMPILE_HOOK_WARNING, category=UserWarning)


def compile_hook_warning_hushed() -> bool:
    """Whether the filter :func:`_hush_compile_hook_warning` adds is on."""
    return any(_is_hush_filter(f) for f in warnings.filters)


def unhush_compile_hook_warning() -> None:
    """Take that filter off again (the pytest plugin, at the end of a test whose watch put it
    on: the suite's warnings filters as the test found them)."""
    filters: list[Any] = warnings.filters  # type: ignore[assignment]  # a list at run time
    for f in filters:
        if _is_hush_filter(f):
            filters.remove(f)
            return


def _is_hush_filter(f: Any) -> bool:
    action, regex, category, module, lineno = f
    return (
        action == "ignore"
        and regex is not None
        and regex.pattern == _COMPILE_HOOK_WARNING
        and category is UserWarning
        and module is None
        and not lineno
    )


# Global hooks see keyword arguments only in newer torch (not 2.13): use them where they exist.
_GLOBAL_HOOKS_TAKE_KWARGS = (
    "with_kwargs" in inspect.signature(_module_mod.register_module_forward_pre_hook).parameters
)


def _install() -> None:
    """Register the pre-hook: ``_handles`` is [pre-hook handle, post-hook handle or None]."""
    _handles.extend((None, None))
    _register_pre()


# Module calls on record (boundaries), all threads together: the post-hook, which ends them,
# is registered only while there is one. A global forward hook costs every module call ~6,000
# instructions of torch's bookkeeping and a Python call, and most calls in a clone block take
# only the block's own memory and go on no record.
_on_record = 0


def _hold_post_hook() -> None:
    """A module call goes on record: its post-hook must run when it returns. Registered from
    the call's pre-hook, it does: torch reads the forward hooks after ``forward``."""
    global _on_record
    with _lock:
        _on_record += 1
        if _handles and _handles[1] is None:
            register_post: Any = _module_mod.register_module_forward_hook
            if _GLOBAL_HOOKS_TAKE_KWARGS:
                _handles[1] = register_post(
                    _post_hook_with_kwargs, with_kwargs=True, always_call=True
                )
            else:
                _handles[1] = register_post(_post_hook, always_call=True)


def _release_post_hook(failed: bool) -> None:
    """A call on record ended. The post-hook comes off with the last one, but not while an
    exception unwinds: then torch calls it from a loop over the live hooks dict (always_call
    hooks, ``Module._call_impl``), which must not change under it. It comes off at the next
    call that ends normally, or with the hooks."""
    global _on_record
    with _lock:
        _on_record = max(_on_record - 1, 0)
        if not _on_record and not failed and _handles and _handles[1] is not None:
            _handles[1].remove()
            _handles[1] = None


def _register_pre() -> None:
    register_pre: Any = _module_mod.register_module_forward_pre_hook
    if _GLOBAL_HOOKS_TAKE_KWARGS:
        _handles[0] = register_pre(_pre_hook_with_kwargs, with_kwargs=True)
    else:
        _handles[0] = register_pre(_pre_hook)


def _remove_locked() -> None:
    global _on_record
    for h in _handles:
        if h is not None:
            h.remove()
    _handles.clear()
    _on_record = 0


def hooks_installed() -> bool:
    """Whether the pre-hook, which does the boundary work, is installed."""
    return bool(_handles) and _handles[0] is not None


def enter(frame: Frame) -> None:
    """Activate ``frame``: the front doors' way in. Installs the module hooks where a frame
    needs them, then activates it in the dispatch mode; all or nothing."""
    # Module boundaries do work only for clone mode (aliases), scoped blocks and torch.compile
    # (compiled modules run outside the mode). Elsewhere the global hooks would only slow
    # every module call (torch's slow path and the hooks: ~2.5M instructions of the 3.2M a
    # raise-mode block added to a TransformerEncoder forward); errors find the module path by
    # walking the stack, and blocks find module state where a write needs it.
    # A decorator or watch in scope "arguments" hands over scoped aliases itself; they carry
    # their protection into every module the callee calls.
    scoped_call = frame.scope == "arguments" and not frame.modules_scoped
    if frame.kind == BLOCK and not frame.protect_state:
        _module_state.add_framework_state(frame)
    if frame.modules_scoped or (frame.mode == "clone" and not scoped_call) or compile_in_use():
        acquire_hooks()
        frame.hooked = True
    try:
        _mode.enter(frame)
    except BaseException:
        _unhook(frame)
        raise


# The op a functionalize write-back is reported as: functionalize copies what the callee wrote
# into the real tensor (aten::copy_) after the callee has returned.
FUNCTIONAL_WRITE_BACK = "functionalize's aten::copy_"


def finish(frame: Frame) -> None:
    """A call or block ended without an exception, ``frame`` still active: judge the writes
    that functionalize recorded on the frame's protected wrappers and will apply once the
    transformed function returns, so that raise refuses them before they land."""
    __tracebackhide__ = True
    for protection, recorded in frame.deferred:
        if functional_mutations(protection.obj) != recorded:
            check(STATE, FUNCTIONAL_WRITE_BACK, "self", False, protection.obj)


def leave(frame: Frame) -> None:
    """Deactivate ``frame`` and drop its reference on the module hooks."""
    try:
        _mode.leave(frame)
    finally:
        _unhook(frame)


def _unhook(frame: Frame) -> None:
    if frame.hooked:
        frame.hooked = False
        release_hooks()


class _Watch:
    __slots__ = ("include_inplace", "mode", "predicate", "scope")

    def __init__(
        self,
        predicate: Callable[[torch.nn.Module], bool],
        mode: Mode,
        include_inplace: bool,
        scope: Scope,
    ) -> None:
        self.predicate = predicate
        self.mode = mode
        self.include_inplace = include_inplace
        self.scope = scope


@contextlib.contextmanager
def watch_modules(
    predicate: Callable[[torch.nn.Module], bool],
    mode: Mode = "raise",
    *,
    include_inplace: bool = False,
    scope: Scope = "arguments",
) -> Iterator[None]:
    """Protect, on this thread, the tensor arguments of every ``nn.Module`` call that
    ``predicate`` accepts, for the duration of that call, with no change to the modules.

    This is what the pytest plugin's ``--immutorch-modules`` opens around each test, and what
    ``python -m immutorch audit`` uses to find writes into data handed from one submodule to
    the next. ``mode`` is what happens at a write (``"raise"``, ``"warn"``, ``"clone"`` or
    ``"off"``; ``IMMUTORCH_MODE`` and the plugin's ``--immutorch`` override it, as they do
    every guard's). Modules with ``inplace=True`` (``nn.ReLU(inplace=True)``) are exempt
    unless ``include_inplace``: writing into their input is what they are built for.
    ``scope`` as for :func:`immutable_inputs`: ``"arguments"`` intercepts only the ops on the
    arguments and their views, ``"all"`` every op while a watched module runs. Only calls
    through ``Module.__call__`` are seen, not direct ``.forward()`` calls.

    >>> import torch, immutorch
    >>> class Zeroing(torch.nn.Module):
    ...     def forward(self, x):
    ...         x[0] = 0
    ...         return x
    >>> x = torch.ones(3)
    >>> with immutorch.watch_modules(lambda module: isinstance(module, Zeroing)):
    ...     Zeroing()(x)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    immutorch.ImmutableTensorError: aten::fill_ would write into ...
    >>> x
    tensor([1., 1., 1.])
    """
    watch = _Watch(predicate, check_mode(mode), include_inplace, check_scope(scope))
    acquire_hooks()
    STATE.watchers.append(watch)
    try:
        yield
    except RuntimeError as exc:
        raise_original(exc)
        raise
    finally:
        STATE.watchers.remove(watch)
        release_hooks()


# -- the hooks --------------------------------------------------------------------------------
class _Boundary:
    __slots__ = (
        "aliased",
        "compiled",
        "detached",
        "frame",
        "label_source",
        "labels_found",
        "module",
        "originals",
        "rebuilt",
        "recursion",
        "required",
        "storages",
        "suspended",
    )

    def __init__(
        self,
        module: torch.nn.Module,
        frame: Optional[Frame],
        compiled: Optional[CompiledBoundary],
    ) -> None:
        self.module = module
        self.frame = frame
        self.compiled = compiled
        # What names block-guard hits by the module parameter they arrived as: (parameter
        # names, args, kwargs), read into storage -> name only when a hit asks (`labels`).
        self.label_source: Optional[tuple[list[str], tuple[Any, ...], dict[str, Any]]] = None
        self.labels_found: Optional[dict[int, str]] = None
        # Scoped hand-over: alias id -> the caller's tensor, None where this call handed
        # nothing over; the storages handed over; what _mode.suspend took off the stack;
        # whether the call needed the every-op mode instead; calls of this same module nested
        # in it (recursion), which skip the hooks.
        self.originals: Optional[dict[int, torch.Tensor]] = None
        # Clone mode's plain copy-on-write aliases: alias id -> the caller's tensor, so that a
        # module returning its argument gives the caller its own tensor back.
        self.aliased: dict[int, torch.Tensor] = {}
        self.storages: set[int] = set()
        self.suspended: Optional[tuple[int, int]] = None
        self.required = False
        self.recursion = 0
        self.rebuilt: list[_arguments.Rebuilt] = []
        # The Module.__call__ frame of this call while the global pre-hook is off for it
        # (_detach_hooks): what tells its post-hook from a recursive call's.
        self.detached: Optional[tuple[types.FrameType, Optional[types.FrameType]]] = None

    @property
    def labels(self) -> dict[int, str]:
        """storage -> the module parameter it arrived as (``input``, ``args[1]``)."""
        found = self.labels_found
        if found is None:
            found = self.labels_found = {}
            if self.label_source is not None:

                def label(name: str, t: torch.Tensor) -> None:
                    storage = storage_of(t)
                    if storage is not None:
                        found.setdefault(storage._cdata, name)

                _arguments.label_call(*self.label_source, label)
        return found


def _enter_boundary(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    hits: Optional[_Hits] = None,
) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    """A module call begins: returns replacement (args, kwargs), or None to keep them.
    ``hits``: the protections :func:`_only_noted` found on the call's tensor arguments.

    If it raises, it leaves nothing behind on the thread: once the boundary is on record,
    the ``always_call`` post hook (which torch runs when a pre hook raises) takes it off with
    its module and frame; before that, it is undone here.
    """
    state = STATE
    n_modules, n_boundaries, n_frames = len(state.modules), len(state.boundaries), len(state.frames)
    try:
        return _begin_boundary(module, args, kwargs, hits)
    except BaseException:
        if len(state.boundaries) == n_boundaries:
            try:
                for frame in reversed(state.frames[n_frames:]):
                    leave(frame)
            finally:
                del state.modules[n_modules:]
        raise


def _begin_boundary(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    hits: Optional[_Hits] = None,
) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    state = STATE
    if state.bypass or _users == 0 or not (state.frames or state.watchers):
        # Hooks held for another thread's guard, or immutorch stepping aside (tracing).
        return None
    state.modules.append(module)
    names = _arguments.forward_param_names(module)
    frame: Optional[Frame] = None
    for watch in state.watchers:
        if not watch.include_inplace and getattr(module, "inplace", False) is True:
            continue
        if watch.predicate(getattr(module, "_orig_mod", module)):
            mode = resolve(watch.mode)
            if mode != "off":
                path = display_path(module, state.modules[0])
                frame = Frame(mode, f"the watch on {path}", scope=resolve_scope(watch.scope))
                _arguments.label_call(names, args, kwargs, frame.protect)
                enter(frame)
            break
    if is_compiled(module):
        compiled = CompiledBoundary(display_path(module, state.modules[0]))
        boundary = _Boundary(module, frame, compiled)
        _hold_post_hook()
        state.boundaries.append(boundary)
        replaced = _replace_arguments(args, kwargs, lambda t: _hand_over_compiled(t, compiled))
        compiled.__enter__()
        return replaced
    boundary = _Boundary(module, frame, None)
    _hold_post_hook()
    state.boundaries.append(boundary)
    if state.blocks:
        # Read only if a write is refused in the call: walking the arguments at every call
        # cost ~1 us a tensor.
        boundary.label_source = (names, args, kwargs)
    if (frame is not None and frame.scope == "arguments") or (
        state.scoped_guards and not state.scoped_calls
    ):
        return _hand_over_scoped(boundary, args, kwargs)
    if state.clone_frames:
        # A watch's frame entered above protects the arguments anew: what was found is stale.
        known = hits if frame is None else None
        return _replace_arguments(args, kwargs, lambda t: _hand_over(t, boundary.aliased, known))
    return None


# id(tensor argument) -> its protection, as _only_noted found it: _hand_over, in the same hook
# call, need not ask again (a block's answer looks for module state: ~5 us a tensor).
_Hits = dict[int, Optional[Hit]]


def _may_hand_over(
    args: tuple[Any, ...], kwargs: dict[str, Any], hits: Optional[_Hits] = None
) -> bool:
    """Whether clone mode may hand any argument over (False only where every argument is a
    tensor that crosses as it is, or not a container): most module calls take the block's own
    activations, and rebuilding their arguments to find nothing cost ~5 us a call. Where the
    native backend serves the thread, C++ answers first (``_native.hand_over_filter``, ~4 us
    a call less): False where every argument is a scalar or a plain tensor over memory it knows
    to be unprotected, True (ask here) otherwise."""
    fast = _native.hand_over_filter
    if fast is not None and not fast(args, kwargs):
        return False
    return arguments_may_hand_over(args, kwargs, hits)


def arguments_may_hand_over(
    args: tuple[Any, ...], kwargs: dict[str, Any], hits: Optional[_Hits] = None
) -> bool:
    """``_may_hand_over``'s answer in Python, the one the C++ filter must never contradict.
    Records in ``hits`` the protection found on each tensor argument it asked about."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if group_of(value) is not None:
                continue
            hit = protection_of(value)
            if hits is not None:
                hits[id(value)] = hit
            if hit is not None:
                return True
        elif isinstance(value, (list, tuple, dict)) or dataclasses.is_dataclass(value):
            return True
    return False


def _hand_over_scoped(
    boundary: _Boundary, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Scope "arguments" at a module call: each protected argument crosses as a scoped alias,
    and the every-op mode steps off the stack for the call where only block bodies need it.
    Where an argument cannot cross that way, the call runs under the every-op mode instead."""
    state = STATE
    originals: dict[int, torch.Tensor] = {}
    fallback = False

    def hand_over(t: torch.Tensor) -> torch.Tensor:
        nonlocal fallback
        hit = protection_of(t)
        if hit is None:
            if not can_scope(t) and _protected_leaves(t):
                fallback = True  # sparse, a wrapper subclass ...: its memory is protected
            return t
        new = hand_over_scoped(t, hit.mode, hit.frame.stats)
        if new is None:
            fallback = True
            return _hand_over(t, boundary.aliased)
        storage = storage_of(t)
        if storage is not None:
            boundary.storages.add(storage._cdata)
        if new is not t:
            originals[id(new)] = t
        return new

    replaced = _replace_arguments(args, kwargs, hand_over)
    boundary.originals = originals
    state.scoped_calls += 1
    if fallback:
        _mode.require()
        boundary.required = True
    else:
        boundary.suspended = _mode.suspend()
        _detach_hooks(boundary)
    return replaced


def _detach_hooks(boundary: _Boundary) -> None:
    """Take the global pre-hook off for the rest of a scoped call, so that its nested module
    calls do no boundary work (the pre-hook's Python call and ``Module.__call__``'s slow path
    cost a few microseconds a call: ~3% on the encoder). The post-hook stays, to end this
    call; it returns at once for the nested ones. No hook goes on the module itself: modules
    such as ``nn.TransformerEncoderLayer`` leave their fused fast path when they have one.

    Only where nothing else needs the pre-hook during the call: no other user of the hooks (a
    guard on another thread), no watch, and torch.compile not in use (a compiled submodule
    must get plain tensors at its own boundary)."""
    module = boundary.module
    if STATE.watchers or compile_in_use() or isinstance(module, torch.jit.ScriptModule):
        return
    frame = _call_impl_frame()
    if frame is None:
        return
    with _lock:
        if _users != 1 or not _handles or _handles[0] is None:
            return
        _handles[0].remove()
        _handles[0] = None
    # Hooks run in ``inner``, but always-called ones run in ``_call_impl`` when the call
    # raises: either frame is this call's.
    boundary.detached = (frame, frame.f_back)


def _reattach() -> None:
    with _lock:
        if _handles and _handles[0] is None:
            _register_pre()


def _unwinding() -> bool:
    """Whether the post-hook runs because the module call raised. torch calls always-call
    hooks from ``Module._call_impl``'s except clause then, and every post-hook from its
    ``inner`` otherwise. ``sys.exc_info()`` cannot tell: a module called inside the caller's
    own ``except`` block sees the caller's exception there (and clone mode handed the caller
    the alias instead of its own tensor back)."""
    frame = _call_impl_frame() if _INNER_CODES else None
    if frame is None:  # a torch that calls hooks from _call_impl alone
        return sys.exc_info()[0] is not None
    return frame.f_code not in _INNER_CODES


def _call_impl_frame() -> Optional[types.FrameType]:
    """The ``Module.__call__`` frame (``_call_impl`` or its ``inner``) running the hooks."""
    frame: Optional[types.FrameType] = sys._getframe(1)
    while frame is not None and frame.f_code not in _CALL_IMPL_CODES:
        frame = frame.f_back
    return frame


def _replace_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]
) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    # The containers inside the arguments that get rebuilt are recorded on the boundary, so
    # that what the module does to them reaches the caller's own (_finish_boundary). The args
    # tuple and the kwargs dict themselves are the call's own, not the caller's.
    rebuilt: list[_arguments.Rebuilt] = []
    new_args, new_kwargs = _arguments.replace_call(args, kwargs, fn, rebuilt)
    if rebuilt and STATE.boundaries:
        STATE.boundaries[-1].rebuilt = rebuilt
    if new_args is args and new_kwargs is kwargs:
        return None
    return new_args, new_kwargs


_CALL_IMPL_CODES = _arguments.CALL_IMPL_CODES
_INNER_CODES = _CALL_IMPL_CODES[1:]  # Module._call_impl's inner(), where torch has one


def _caller_kwargs() -> Optional[dict[str, Any]]:
    """The keyword arguments of the module call whose pre-hook is running.

    Where global pre-hooks cannot take keyword arguments (torch 2.13 and older), they are the
    ``kwargs`` dict of ``Module._call_impl``, the frame that calls the hook. That dict is built
    afresh for each call and is the one ``forward`` is called with, so replacing values in it
    (clone mode) reaches ``forward`` and never the caller's own dict.
    """
    frame = sys._getframe(2)  # _caller_kwargs <- _pre_hook <- Module._call_impl
    if frame.f_code not in _CALL_IMPL_CODES:
        return None
    kwargs = frame.f_locals.get("kwargs")
    return kwargs if isinstance(kwargs, dict) else None


def _nested_in_scoped_call(module: torch.nn.Module) -> bool:
    """Inside a module call that handed its protected arguments over as scoped aliases, the
    aliases carry their protection into nested calls, which need nothing more (bar compiled
    modules, which must get plain tensors, and watches)."""
    state = STATE
    if not state.scoped_calls or state.watchers or is_compiled(module):
        return False
    top = state.boundaries[-1]
    if top.module is module:
        top.recursion += 1  # the same module called within itself: its post hook is not ours
    return True


def _only_noted(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    hits: Optional[_Hits] = None,
) -> bool:
    """The common case, done here: nothing needs the boundary on record (no watch or scoped
    call; not a compiled module; in clone mode, no argument to hand over). Nothing goes on
    record: messages find the module path and the parameter a refused tensor came in as on
    the interpreter stack (``_naming``, ``ThreadState.outside_label``), as where no hooks are
    installed, and block guards find module state where a write needs it (``_module_state``).
    The boundary's bookkeeping cost ~15 us a module call; this ~1 us.
    """
    state = STATE
    return not (
        state.watchers
        or state.scoped_guards
        or state.scoped_calls
        or state.bypass
        # is_compiled's own test, its cheap half first (this runs at every module call)
        or (type(module).__name__ == "OptimizedModule" and is_compiled(module))
        # A recursive call of a module whose outer call is on record: its post-hook would
        # take this call for that one.
        or (state.boundaries and state.boundaries[-1].module is module)
        or (state.clone_frames and _may_hand_over(args, kwargs, hits))
    )


_is_compiling = torch.compiler.is_compiling


def _pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
    if _is_compiling():
        return None  # Dynamo traces hooks: keep them out of compiled graphs
    quiet = _native.quiet_call
    if quiet is not None and quiet(module, args, None):
        return None  # the common case, answered in C++ (kwargs read from the calling frame)
    if STATE.scoped_calls and _nested_in_scoped_call(module):
        return None
    kwargs = _caller_kwargs() or {}
    hits: _Hits = {}
    if _only_noted(module, args, kwargs, hits):
        return None
    replaced = _enter_boundary(module, args, kwargs, hits)
    if replaced is None:
        return None
    new_args, new_kwargs = replaced
    if new_kwargs is not kwargs:
        kwargs.update(new_kwargs)
    return new_args


def _pre_hook_with_kwargs(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    if _is_compiling():
        return None
    quiet = _native.quiet_call
    if quiet is not None and quiet(module, args, kwargs):
        return None
    if STATE.scoped_calls and _nested_in_scoped_call(module):
        return None
    hits: _Hits = {}
    if _only_noted(module, args, kwargs, hits):
        return None
    return _enter_boundary(module, args, kwargs, hits)


def _post_hook_with_kwargs(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
    return _post_hook(module, args, output)


def _post_hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
    if _is_compiling():
        return None
    state = STATE
    if not state.boundaries or state.boundaries[-1].module is not module:
        return None
    top = state.boundaries[-1]
    if top.detached is not None:
        if _call_impl_frame() not in top.detached:
            return None  # the same module, called again within its own scoped call
        top.detached = None
        _reattach()
    elif top.recursion:
        top.recursion -= 1
        return None
    return _finish_boundary(module, output)


def _finish_boundary(module: torch.nn.Module, output: Any) -> Any:
    state = STATE
    boundary = state.boundaries.pop()
    # always_call hooks also run while an exception unwinds: then only restore state.
    failed = _unwinding()
    _release_post_hook(failed)
    try:
        if boundary.compiled is not None:
            boundary.compiled.__exit__(RuntimeError if failed else None, None, None)
    finally:
        state.modules.pop()
        try:
            if boundary.originals is not None:
                state.scoped_calls -= 1
                if boundary.suspended is not None:
                    _mode.resume(boundary.suspended)
                elif boundary.required:
                    _mode.release()
        finally:
            if boundary.frame is not None:
                leave(boundary.frame)
            if boundary.rebuilt:
                originals = boundary.originals or {}
                _arguments.write_back(boundary.rebuilt, lambda v: unwrap(v, originals))
    if failed:
        return None
    if boundary.originals is None:
        if not boundary.aliased:
            return None
        new = back_to_caller(output, boundary.aliased)
        return None if new is output else new
    return _scoped_output(boundary, output)


def _scoped_output(boundary: _Boundary, output: Any) -> Any:
    """A scoped call's result, as the caller gets it: no ``Protected`` alias leaves the call,
    and, inside a block guard, its fresh tensors count as the block's own memory (the block's
    every-op mode, which records births, was off the stack during the call)."""
    new = unwrap(output, boundary.originals or {})
    if boundary.aliased:
        new = back_to_caller(new, boundary.aliased)
    if STATE.blocks:
        epoch = _registry.current_epoch
        handed = boundary.storages

        def tag(_label: str, t: torch.Tensor) -> None:
            storage = storage_of(t)
            if storage is not None and storage._cdata not in handed and born_epoch(storage) == 0:
                set_born(storage, epoch)

        _arguments.walk(new, "", tag)
    return None if new is output else new


def _protected_leaves(t: torch.Tensor) -> bool:
    """Whether any tensor holding ``t``'s memory (sparse values and indices, a wrapper's inner
    tensors) is protected."""
    return any(protection_of(leaf) is not None for leaf in tensor_leaves(t) if leaf is not t)


def _hand_over_compiled(t: torch.Tensor, compiled: CompiledBoundary) -> torch.Tensor:
    hit = protection_of(t)
    if hit is None:
        return to_plain(t) if isinstance(t, Protected) else t
    # Compiled code gets plain tensors: Dynamo cannot trace the scoped backend's subclass.
    return compiled.hand_over(to_plain(t), hit.mode, hit.label, hit.frame.stats)


def _hand_over(
    t: torch.Tensor, aliased: dict[int, torch.Tensor], hits: Optional[_Hits] = None
) -> torch.Tensor:
    """In clone mode, a protected tensor crosses a boundary as a copy-on-write alias (recorded
    in ``aliased``: the alias's id -> ``t``). ``hits``: protections already found, by id."""
    if group_of(t) is not None:
        return t  # already an alias from an outer boundary: its writes are isolated
    hit = hits[id(t)] if hits is not None and id(t) in hits else protection_of(t)
    if hit is None or hit.mode != "clone":
        return t
    new = alias(t, hit.frame.stats)
    aliased[id(new)] = t
    return new
