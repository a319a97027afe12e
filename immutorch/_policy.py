"""What happens at a write into protected memory: raise, warn, or (clone) copy first.

Errors and warnings carry what a user needs to fix the code: the op, the protected argument,
the function or module that wrote, the user's source line, the tensor, and what to do.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from types import FrameType
from typing import Callable, Optional, TypeVar

import torch
import wrapt  # noqa: F401  (imported so its frames can be skipped in locations)

from . import _judge, _provenance, _recorder
from ._clone import group_of
from ._compat import tracing_now
from ._errors import ImmutableTensorError, MutationWarning
from ._naming import current_module_path
from ._registry import BLOCK, OUTSIDE, STATE, Hit
from ._storage import describe, shape_of, storage_of

T = TypeVar("T")


def _package_dir(module_name: str) -> Optional[str]:
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


# Frames in these packages are machinery, never the user's line.
_SKIP_DIRS = tuple(
    d for d in (_package_dir("immutorch"), _package_dir("torch"), _package_dir("wrapt")) if d
)


# immutorch's own model code (the reference encoder, immutorch.nn) is user-level code.
_USER_LEVEL = tuple(
    os.path.join(_SKIP_DIRS[0], name) for name in ("_reference.py", "nn" + os.sep, "_demo.py")
)


# co_filename -> whether its frames are the user's: every guard asks for its own line, and
# os.path.abspath on each frame's file cost ~1 us a frame. Bounded: a process running code
# from ever new files (exec'd strings name theirs) starts the cache over.
_is_user_file: dict[str, bool] = {}


def _user_file(name: str) -> bool:
    known = _is_user_file.get(name)
    if known is None:
        filename = os.path.abspath(name)
        known = filename.startswith(_USER_LEVEL) or (
            not filename.startswith(_SKIP_DIRS) and not filename.startswith("<frozen")
        )
        if len(_is_user_file) >= 4096:
            _is_user_file.clear()
        _is_user_file[name] = known
    return known


def user_frame() -> Optional[FrameType]:
    """The innermost frame outside immutorch's machinery, torch and wrapt: the user's line."""
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        if _user_file(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return None


def _where(hit: Hit) -> str:
    return current_module_path() or hit.frame.where


def _described(describe_it: Callable[[], T], fallback: T) -> T:
    """A piece of a refusal's message. Describing walks user objects (modules half built by
    ``copy.deepcopy``, frames' locals, tensors of odd types) that can fail in any way: a
    failure degrades the description to ``fallback``, never the refusal (and never turns a
    warning into an exception)."""
    try:
        return describe_it()
    except Exception:
        return fallback


def handle(hit: Hit, op: str, written_arg: str, t: torch.Tensor, *, meta: bool = False) -> None:
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    """Act on a write into protected memory according to the strictest hit's mode."""
    mode = hit.mode
    if mode == "clone":
        group = group_of(t)
        if group is not None and not group.copied:
            if _recorder.listening():
                frame = user_frame()
                location = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else None
                _record("cloned", hit, op, {"where": _where(hit), "location": location})
            if not meta:
                group.materialize()
            return
        if not meta and hit.frame.isolate(t):
            return
        _fail(hit, op, written_arg, t, cannot_isolate=True)
    elif mode == "warn":
        location = _warn(hit, op, written_arg, t)
        if not meta:
            _note_write(t, op, location)
    elif mode == "raise":
        _fail(hit, op, written_arg, t)


def _context(
    hit: Hit, op: str, written_arg: str, t: torch.Tensor
) -> tuple[str, dict[str, object], Optional[FrameType]]:
    frame = _described(user_frame, None)
    location = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else None
    where = _described(lambda: _where(hit), hit.frame.where)
    what = "change the size or strides of" if written_arg.startswith("*") else "write into"
    dtype: Optional[torch.dtype]
    if hit.dtype is not None:
        shape, dtype = hit.shape, hit.dtype
        tensor_desc = f"a {str(dtype).replace('torch.', '')} tensor of shape {list(shape)}"
    else:
        shape = _described(lambda: shape_of(t), ())
        dtype = _described(lambda: t.dtype, None)
        tensor_desc = _described(lambda: describe(t), "a tensor")
    arg = written_arg.lstrip("*")
    label = f"`{hit.label}`" if hit.frame.quotes_labels else hit.label
    allow_hint: Optional[str] = None
    if hit.frame.kind == BLOCK and hit.label == OUTSIDE:
        found = _described(lambda: _provenance.find(t, frame), None)
        if found is not None:
            label = f"{found.label}, {OUTSIDE}"
            allow_hint = found.allow
        else:
            allow_hint = "allow=..."
    head = (
        f"{op} would {what} {label} ({tensor_desc}, argument `{arg}` of {op}), "
        f"protected by {hit.frame.where}"
    )
    place = f"\n  in {where}" if not hit.frame.where.endswith(where) else ""
    if location:
        place += f"\n  at {location}"
    if allow_hint is not None:
        place += (
            f"\nIf the block may write it (state of a model, an optimizer or a framework), "
            f"exempt it: guard(..., {allow_hint}); allow= takes tensors, modules and optimizers."
        )
    attrs: dict[str, object] = {
        "op": op,
        "argument": hit.label,
        "where": where,
        "location": location,
        "shape": shape,
        "dtype": dtype,
    }
    return head + place, attrs, frame


def _record(action: _recorder.Action, hit: Hit, op: str, attrs: dict[str, object]) -> None:
    """Tell the recorder's listeners (a findings report, the audit) of this write, in the
    words of the error or warning (``attrs`` from :func:`_context`)."""
    location = attrs["location"]
    _recorder.record(
        _recorder.WriteEvent(
            action,
            str(attrs["where"]),
            op,
            hit.label,
            location if isinstance(location, str) else None,
        )
    )


def _fail(
    hit: Hit, op: str, written_arg: str, t: torch.Tensor, *, cannot_isolate: bool = False
) -> None:
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    text, attrs, _ = _context(hit, op, written_arg, t)
    if _recorder.listening():
        _record("refused", hit, op, attrs)
    advice = hit.frame.advice(cannot_isolate)
    if advice is not None:
        text += "\n" + advice
    elif cannot_isolate and tracing_now():
        text += (
            "\nClone mode cannot isolate a write while torch.export or make_fx records the "
            "program: a copy-on-write alias cannot be traced, and a copy made up front would "
            "stay in the program for every call. Export the code without the write (write into "
            "a new tensor), or export it undecorated and guard the exported module's calls."
        )
    elif cannot_isolate:
        text += (
            "\nClone mode cannot isolate this write: it reaches the caller's own tensor, not a "
            "copy-on-write alias handed across a boundary (a decorated call, or an nn.Module "
            "called inside the guard). Pass the tensor through such a boundary, or clone it "
            "before writing."
        )
    elif written_arg.startswith("*"):
        text += (
            "\nUse the out-of-place form, which returns a new tensor object (e.g. "
            "`x = x.unsqueeze(0)` for `x.unsqueeze_(0)`), or clone first (`x = x.clone()`)."
        )
    else:
        text += (
            "\nWrite into a new tensor instead (e.g. `out = torch.empty_like(x)` or an "
            "out-of-place op), clone it first (`x = x.clone()`), or use clone mode to let the "
            'call write into a private copy (mode="clone" in code; --immutorch=clone or '
            "IMMUTORCH_MODE=clone for a whole run)."
        )
    error = ImmutableTensorError("immutorch: " + text, **attrs)  # type: ignore[arg-type]
    remember_dispatch_error(error)
    try:
        raise error
    finally:
        # The error's traceback holds this frame: with the error left in its locals, the two
        # form a cycle that only the cyclic collector frees, and with them every frame of the
        # code that failed (torch 2.9's non-reentrant checkpoint keeps its saved-tensor hooks
        # pushed until its generator frame is freed).
        del error


def remember_dispatch_error(error: BaseException) -> None:
    """Keep a copy of ``error`` for :func:`recover_dispatch_error`. A copy, without the
    traceback the raised one collects: that traceback holds the frames, and so the tensors,
    of the code that failed, which must not outlive the call."""
    try:
        STATE.dispatch_error = copy.copy(error)
    except Exception:  # an exception type that cannot be rebuilt: nothing to put back
        STATE.dispatch_error = None


def recover_dispatch_error(exc: BaseException) -> Optional[BaseException]:
    """The exception raised inside the dispatch mode behind ``exc``, if ``exc`` is
    TorchScript's rewrap of it.

    An exception raised while TorchScript code runs an op through a Python dispatch mode (an
    immutorch refusal, or the op's own error) reaches Python as a RuntimeError "The following
    operation failed in the TorchScript interpreter" whose last line has lost the message. The
    front doors call this on a RuntimeError leaving them and raise the original, chained to
    TorchScript's error, which shows the TorchScript line.
    """
    original = STATE.dispatch_error
    if original is None or original is exc or isinstance(exc, ImmutableTensorError):
        return None
    if isinstance(exc, RuntimeError) and _lost_message(str(exc)):
        STATE.dispatch_error = None
        return original
    return None


def _lost_message(text: str) -> bool:
    """Whether ``text`` is TorchScript's rewrap of an exception raised through Python, whose
    last line keeps the type and loses the message (``RuntimeError: ``). An op's own C++ error
    keeps its message there, and is never replaced by a record: the native backend's
    writes-only key lets most ops run without passing through it, so a refusal caught earlier
    can still be on record when such an op fails."""
    lines = text.rstrip().splitlines()
    return "TorchScript" in text and bool(lines) and lines[-1].rstrip().endswith(":")


def raise_original(exc: BaseException) -> None:
    """Raise the exception that TorchScript rewrapped into ``exc``, chained to it (see
    :func:`recover_dispatch_error`); return where ``exc`` is no such rewrap. Each front door
    calls this on an exception leaving it."""
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    original = recover_dispatch_error(exc)
    if original is not None:
        raise original from exc


def _note_write(t: torch.Tensor, op: str, location: Optional[str]) -> None:
    """Tell every protection of the written storage that the write went ahead: those that
    keep a record (tensors saved for backward) make backward fail instead of using it."""
    storage = storage_of(t)
    if storage is not None:
        for p in STATE.by_storage.get(storage._cdata, ()):
            p.note_write(op, location)


def _warn(hit: Hit, op: str, written_arg: str, t: torch.Tensor) -> Optional[str]:
    """Issue the warning; return the user's line it names."""
    __tracebackhide__ = True  # pytest shows the user's line, not immutorch's
    text, attrs, frame = _context(hit, op, written_arg, t)
    if _recorder.listening():
        _record("warned", hit, op, attrs)
    warning = MutationWarning(
        "immutorch: " + text + '\nThe write went ahead (mode="warn").',
        **attrs,  # type: ignore[arg-type]
    )
    location: Optional[str] = attrs["location"]  # type: ignore[assignment]
    if frame is None:
        warnings.warn(warning, stacklevel=2)
        return location
    # One warning per call site, deduplicated the way warnings.warn does for that line.
    module_globals = frame.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(
        warning,
        MutationWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=module_globals.get("__name__", "<unknown>"),
        registry=registry,
    )
    return location


_judge.set_write_handler(handle, remember_dispatch_error)
