"""Module boundaries: inside any guard, every ``nn.Module`` call is a boundary.

While a guard needs them, ``Module._call_impl`` is immutorch's shell around torch's own, which
sees each ``Module.__call__`` (not direct ``.forward()`` calls). At a boundary immutorch
records the module's path for messages, exempts the module's own state from block guards,
hands protected arguments over as copy-on-write aliases in clone mode, and, under
:func:`watch_modules` (the pytest plugin's ``--immutorch-modules``), protects the arguments
of the modules it watches for the duration of their call.

The shell is installed only while some thread has a guard that needs it or a watch open, and
comes off as the last of those ends."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch

from . import _arguments, _module_state, _registry
from ._backends import choice as _choice  # noqa: F401  (installs the backend choice)
from ._backends import mode as _mode
from ._backends import native as _native
from ._backends.scoped import Protected, can_scope, to_plain, unwrap
from ._backends.scoped import hand_over as hand_over_scoped
from ._clone import alias, back_to_caller, group_of
from ._compat import functional_mutations, torch_release
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
# Whether Module._call_impl is immutorch's while it has users; False also while it is taken
# off for a scoped call (_detach_calls).
_installed = False

# Module._call_impl as it was when immutorch was imported: a function that stays in Module's
# dict for good. While the shell is on, its code is the shell's (_SHELL_CODE), not a new class
# attribute: assigning one invalidates the attribute caches of Module and of every subclass
# (every nn.Module class misses its next lookups, +0.4% on the encoder at each guard in clone
# mode), and from CPython 3.13 a class that has been modified 1,000 times is never cached
# again (typeobject.c, MAX_VERSIONS_PER_CLASS): ~500 guards in clone mode would leave every
# module in the process slower for good. A function's code is the function's own.
_torch_function: Callable[..., Any] = torch.nn.Module.__dict__["_call_impl"]
_SWAPPABLE = isinstance(_torch_function, types.FunctionType) and not (
    _torch_function.__code__.co_freevars
)
_TORCH_CODE: Optional[types.CodeType] = _torch_function.__code__ if _SWAPPABLE else None


def _same_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of the plain function ``fn``, running its code whatever ``fn.__code__`` becomes."""
    assert isinstance(fn, types.FunctionType)
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    copy.__dict__.update(fn.__dict__)
    return copy


# torch's code for Module._call_impl, in a function whose code is never swapped: what every
# module call runs, with or without immutorch's shell around it. Its frames run torch's own
# code object (_arguments.CALL_IMPL_CODE), as module calls do without the shell.
_torch_call_impl: Callable[..., Any] = (
    _same_function(_torch_function) if _SWAPPABLE else _torch_function
)
# Where the shell is a class attribute after all (Module._call_impl rebound by someone since
# immutorch's import, or not a plain function): (the shell, what it replaced).
_class_shell: Optional[tuple[Callable[..., Any], Callable[..., Any]]] = None


def acquire_hooks(*, rescan: bool = False) -> None:
    """Count one more user of the module-call shell (a thread's first frame, or a watch).
    ``rescan``: look for classes with a ``_call_impl`` of their own anew (a watch must see
    every call of the modules it watches)."""
    global _users
    with _lock:
        _users += 1
        if not _installed:
            _install_locked(rescan)
        else:
            _give_dynamo_torchs_call_impl()
            if rescan:
                _shell_own_classes_locked(rescan)


def release_hooks() -> None:
    """Count one user less; the last one takes the shell off at once.

    Nothing may outlive the last guard: off, every module call runs torch's own
    ``_call_impl`` with nothing of immutorch's around it.
    """
    global _users
    with _lock:
        _users -= 1
        if _users <= 0:
            _users = 0
            _remove_locked()


def _install_locked(rescan: bool = False) -> None:
    """Put immutorch's shell in ``Module._call_impl``'s place.

    Not a global forward hook: any global hook sends every ``Module.__call__`` down torch's
    slow path (~11,000 instructions a call with one empty pre-hook, ~17,000 with a post-hook
    too, and a Python call for each hook), and global pre-hooks are given no keyword arguments
    on torch 2.13 and older. ``Module.__call__`` (``_wrapped_call_impl``) looks ``_call_impl``
    up on the module at each call, so torch's function reaches every module whose class does
    not define its own: its code is swapped for the shell's, which changes no class (see
    ``_torch_function``). The classes that define their own get a shell of their own around
    it, as a class attribute.
    """
    global _installed, _class_shell
    current = torch.nn.Module.__dict__.get("_call_impl")
    if _SWAPPABLE and current is _torch_function:
        _torch_function.__globals__[_SHELL_GLOBAL] = _shell_body()
        _torch_function.__code__ = _SHELL_CODE
    elif current is not None:
        shell = _shell_around(current)
        torch.nn.Module._call_impl = shell  # type: ignore[method-assign]
        _class_shell = (shell, current)
    _installed = True
    _shell_own_classes_locked(rescan)


# Classes with a _call_impl of their own, which the shell on Module does not reach: in torch,
# torch.compiler.disable or torch.compile applied to an nn.Module class wraps the _call_impl
# the class had then. While the shell is on, each has a shell of its own around its own
# (_shelled: class -> its own _call_impl). Found by walking Module's subclasses (~150 us for
# torch's ~370, 0.4-1.4 ms for the ~840 of a test session importing kornia, where the walk
# cost more than every other thing a strict-mode test paid): again where modules were
# imported since the last walk (where classes come from), and at a watch, unless the shell
# has stayed on since the last walk: a class wrapped while the shell is on wraps the shell
# (the _call_impl it inherits), whose calls a watch sees without a walk.
_own_classes: weakref.WeakSet[type] = weakref.WeakSet()
_walked_at = -1
_walked_while_on = False  # a walk was made since the shell last came off (walks run with it on)
_shelled: dict[type, Callable[..., Any]] = {}


def _shell_own_classes_locked(rescan: bool) -> None:
    global _walked_at, _walked_while_on
    if _walked_at != len(sys.modules) or (rescan and not _walked_while_on):
        _walked_at = len(sys.modules)
        _walked_while_on = True
        _own_classes.clear()
        _own_classes.update(_classes_with_own_call_impl())
    for cls in list(_own_classes):
        own = cls.__dict__.get("_call_impl")
        if cls in _shelled or own is None or getattr(own, "_immutorch_inner", None) is not None:
            continue
        cls._call_impl = _shell_around(own)  # type: ignore[attr-defined]
        _shelled[cls] = own


def _classes_with_own_call_impl() -> list[type]:
    found: list[type] = []
    seen: set[type] = set()
    stack: list[type] = [torch.nn.Module]
    while stack:
        children: list[type] = type.__subclasses__(stack.pop())
        for sub in children:
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                if "_call_impl" in sub.__dict__:
                    found.append(sub)
    return found


def _remove_locked() -> None:
    global _installed, _walked_while_on, _class_shell
    _walked_while_on = False
    if _TORCH_CODE is not None and _torch_function.__code__ is _SHELL_CODE:
        _torch_function.__code__ = _TORCH_CODE
    if _class_shell is not None:
        shell, replaced = _class_shell
        if torch.nn.Module.__dict__.get("_call_impl") is shell:
            torch.nn.Module._call_impl = replaced  # type: ignore[method-assign]
        _give_dynamo_torchs_call_impl()
        _class_shell = None
    for cls, own in _shelled.items():
        if getattr(cls.__dict__.get("_call_impl"), "_immutorch_inner", None) is own:
            cls._call_impl = own  # type: ignore[attr-defined]
    _shelled.clear()
    _installed = False
    _give_dynamo_torchs_call_impl()


def _give_dynamo_torchs_call_impl() -> None:
    # Dynamo, first imported while the shell was on, took it for torch's own _call_impl (the
    # one whose calls it may shorten to ``forward``): give it torch's, at the shell's removal
    # and at each new user while it stays on (the plugin keeps it on for a whole run), so that
    # Dynamo's view is the one it has when imported before any guard.
    # (Only a shell that is a class attribute can be taken for it: torch's function stays.)
    if _class_shell is None:
        return
    shell, replaced = _class_shell
    for name in ("torch._dynamo.utils", "torch._dynamo.variables.nn_module"):
        dynamo = sys.modules.get(name)
        if getattr(dynamo, "unpatched_nn_module_call_impl", None) is shell:
            dynamo.unpatched_nn_module_call_impl = replaced  # type: ignore[union-attr]


def hooks_installed() -> bool:
    """Whether module calls run immutorch's shell, which does the boundary work."""
    current = torch.nn.Module.__dict__.get("_call_impl")
    if _SWAPPABLE and current is _torch_function:
        return _torch_function.__code__ is _SHELL_CODE
    return _class_shell is not None and current is _class_shell[0]


def enter(frame: Frame) -> None:
    """Activate ``frame``: the front doors' way in. Installs the module-call shell where a
    frame needs it, then activates it in the dispatch mode; all or nothing."""
    # Module boundaries do work only for clone mode (aliases), scoped blocks and torch.compile
    # (compiled modules run outside the mode). Elsewhere the shell would only slow every module
    # call; errors find the module path by walking the stack, and blocks find module state
    # where a write needs it.
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
    acquire_hooks(rescan=True)
    STATE.watchers.append(watch)
    try:
        yield
    except RuntimeError as exc:
        raise_original(exc)
        raise
    finally:
        STATE.watchers.remove(watch)
        release_hooks()


# -- the boundaries ---------------------------------------------------------------------------
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
        # whether the call needed the every-op mode instead.
        self.originals: Optional[dict[int, torch.Tensor]] = None
        # Clone mode's plain copy-on-write aliases: alias id -> the caller's tensor, so that a
        # module returning its argument gives the caller its own tensor back.
        self.aliased: dict[int, torch.Tensor] = {}
        self.storages: set[int] = set()
        self.suspended: Optional[tuple[int, int]] = None
        self.required = False
        self.rebuilt: list[_arguments.Rebuilt] = []
        # Whether the module-call shell is off for the rest of this call (_detach_calls).
        self.detached = False

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
    :func:`_boundary_call` takes it off with its module and frame; before that, it is undone
    here.
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
        state.boundaries.append(boundary)
        replaced = _replace_arguments(args, kwargs, lambda t: _hand_over_compiled(t, compiled))
        compiled.__enter__()
        return replaced
    boundary = _Boundary(module, frame, None)
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
        _detach_calls(boundary)
    return replaced


def _detach_calls(boundary: _Boundary) -> None:
    """Take the module-call shell off for the rest of a scoped call, so that its nested module
    calls do no boundary work (the shell's Python call and C++ check cost ~1 us a call). No
    hook goes on the module itself: modules such as ``nn.TransformerEncoderLayer`` leave their
    fused fast path when they have one.

    Only where nothing else needs the shell during the call: no other user of it (a guard on
    another thread), no watch, and torch.compile not in use (a compiled submodule must get
    plain tensors at its own boundary)."""
    if STATE.watchers or compile_in_use() or isinstance(boundary.module, torch.jit.ScriptModule):
        return
    with _lock:
        if _users != 1 or not _installed:
            return
        _remove_locked()
    boundary.detached = True


def _reattach() -> None:
    with _lock:
        if _users and not _installed:
            _install_locked()


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


def _nested_in_scoped_call(module: torch.nn.Module) -> bool:
    """Inside a module call that handed its protected arguments over as scoped aliases, the
    aliases carry their protection into nested calls, which need nothing more (bar compiled
    modules, which must get plain tensors, and watches)."""
    state = STATE
    return bool(state.scoped_calls) and not state.watchers and not is_compiled(module)


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
        or (state.clone_frames and _may_hand_over(args, kwargs, hits))
    )


_is_compiling = torch.compiler.is_compiling


def _module_call(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    inner: Callable[..., Any] = _torch_call_impl,
) -> Any:
    """A module call through the shell: ``inner`` (torch's ``_call_impl``, or a class's own)
    with the boundary work around it where the call needs any."""
    if _is_compiling():
        # Dynamo inlines this: keep immutorch out of compiled graphs (it folds the test).
        return inner(module, *args, **kwargs)
    quiet = _native.quiet_call
    if quiet is not None and quiet(module, args, kwargs):
        return inner(module, *args, **kwargs)  # the common case, answered in C++
    return _boundary_call(module, args, kwargs, inner)


def _shell_around(inner: Callable[..., Any]) -> Callable[..., Any]:
    """A ``_call_impl`` to set as a class attribute, calling ``inner`` through the shell."""

    def shell(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _module_call(self, args, kwargs, inner)

    shell._immutorch_inner = inner  # type: ignore[attr-defined]
    return shell


# The global names by which the shell's code finds immutorch: the code runs as torch's
# function, in torch's module's globals, where these three names are set once, for good
# (adding and removing a global would invalidate every cached global lookup of that module's
# code): the first to the shell's body (C++ where the native backend is loaded, _module_call
# otherwise), the second to torch's own code, the third to the question Dynamo folds.
# torch.compiler.is_dynamo_compiling (from torch 2.5, which Dynamo folds there) is one Python
# call where is_compiling is two; what is_compiling adds outside Dynamo (non-strict export, a
# compile session: its flag) the body asks itself (_module_call, and module_call in
# guard.cpp). Before 2.5, is_compiling, as the shell always asked.
_SHELL_GLOBAL = "__immutorch_module_call__"
_TORCH_GLOBAL = "__immutorch_torch_call_impl__"
_DYNAMO_GLOBAL = "__immutorch_dynamo__"
_is_dynamo_compiling: Callable[[], bool] = (
    torch.compiler.is_dynamo_compiling
    if torch_release() >= (2, 5) and hasattr(torch.compiler, "is_dynamo_compiling")
    else torch.compiler.is_compiling
)
_native_body: Optional[Callable[..., Any]] = None


def _shell_body() -> Callable[..., Any]:
    """What the shell's code calls outside Dynamo: ``(module, args, kwargs)``."""
    global _native_body
    if _native_body is None:
        _native_body = _native.module_call_through(
            _torch_call_impl, _boundary_call, hand_over_one, back_to_caller
        )
    return _native_body if _native_body is not None else _module_call


def _call_impl(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The code torch's ``Module._call_impl`` runs while the shell is on. While Dynamo traces
    (which it folds), torch's own, with nothing of immutorch's: it cannot trace C++. The body
    asks ``torch.compiler.is_compiling()``'s flag for the rest (non-strict export)."""
    if __immutorch_dynamo__():  # type: ignore[name-defined]  # noqa: F821
        return __immutorch_torch_call_impl__(self, *args, **kwargs)  # type: ignore[name-defined]  # noqa: F821
    return __immutorch_module_call__(self, args, kwargs)  # type: ignore[name-defined]  # noqa: F821


_SHELL_CODE = _call_impl.__code__
del _call_impl
if _SWAPPABLE:
    _torch_function.__globals__[_SHELL_GLOBAL] = _module_call
    _torch_function.__globals__[_TORCH_GLOBAL] = _torch_call_impl
    _torch_function.__globals__[_DYNAMO_GLOBAL] = _is_dynamo_compiling


def _boundary_call(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    inner: Callable[..., Any],
) -> Any:
    state = STATE
    if state.scoped_calls and _nested_in_scoped_call(module):
        return inner(module, *args, **kwargs)
    hits: _Hits = {}
    if _only_noted(module, args, kwargs, hits):
        return inner(module, *args, **kwargs)
    n_boundaries = len(state.boundaries)
    try:
        replaced = _enter_boundary(module, args, kwargs, hits)
    except BaseException:
        if len(state.boundaries) > n_boundaries:  # on record: take it off with the rest
            _end_boundary(failed=True)
        raise
    if len(state.boundaries) == n_boundaries:  # nothing went on record
        return inner(module, *args, **kwargs)
    if replaced is not None:
        args, kwargs = replaced
    try:
        output = inner(module, *args, **kwargs)
    except BaseException:
        _end_boundary(failed=True)
        raise
    return _end_boundary(output)


def _end_boundary(output: Any = None, failed: bool = False) -> Any:
    """The call on top of the record ended: restore the thread's state, and return what the
    caller gets (its own tensors back where the module returned an alias of one). On
    ``failed``, only restore: the exception the call raised propagates."""
    state = STATE
    boundary = state.boundaries.pop()
    try:
        if boundary.detached:
            _reattach()
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
            return output
        return back_to_caller(output, boundary.aliased)
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
    return new


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
    new = hand_over_one(t, hits)
    if new is not t:
        aliased[id(new)] = t
    return new


def hand_over_one(t: torch.Tensor, hits: Optional[_Hits] = None) -> torch.Tensor:
    """What ``t`` crosses a boundary as in clone mode: a copy-on-write alias where clone mode
    protects it, else ``t`` itself (also the native shell's hand-over of one argument)."""
    if group_of(t) is not None:
        return t  # already an alias from an outer boundary: its writes are isolated
    hit = hits[id(t)] if hits is not None and id(t) in hits else protection_of(t)
    if hit is None or hit.mode != "clone":
        return t
    return alias(t, hit.frame.stats)
