"""``guard_saved``: a tensor autograd saved for backward is read-only until backward used it.

While a ``guard_saved`` block is open, immutorch's pack hook (``saved_tensors_hooks``) sees
every tensor autograd saves: op outputs and inputs, parameters, ``ctx.save_for_backward``. Each
becomes a protection in the thread's registry, judged by the every-op dispatch mode like a
guard's, from the moment it is saved until its autograd node lets it go (backward without
``retain_graph``, or the graph freed): the packed object autograd keeps holds the protection,
and its death ends it. The block may close long before that; the dispatch mode stays on the
thread while any protection lives and leaves at the first safe moment after the last one goes.

Unpack re-does the check autograd skips under saved-tensor hooks (the version counter) and the
one it cannot do (``.data`` writes, seen by the mode): warn mode never turns autograd's error
into a silently wrong gradient. Clone mode copies a saved storage once, at its first write,
and unpack hands backward the copy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import weakref
from types import CodeType, TracebackType
from typing import Any, Callable, Optional, TypeVar

import torch
import wrapt

from . import _compat, _provenance
from ._backends import mode as _mode
from ._config import Mode, check_mode, resolve
from ._errors import ImmutableTensorError
from ._policy import _SKIP_DIRS, _USER_LEVEL, raise_original, user_frame
from ._registry import (
    STATE,
    TOTAL_STATS,
    CloneStats,
    Frame,
    Hit,
    Protection,
    add_protection,
    remove_protection,
)
from ._storage import PRIVATE_BORN, set_born, storage_of

F = TypeVar("F", bound=Callable[..., Any])

Pack = Callable[[torch.Tensor], Any]
Unpack = Callable[[Any], torch.Tensor]
Geometry = tuple[int, tuple[int, ...], tuple[int, ...]]  # storage offset, size, stride

# Batch norm in training mode writes the running statistics its own node saved, without an
# ``(a!)`` in its schema: autograd bumps no version and its training-mode backward never reads
# them (it uses the batch statistics it returned). Calling one BatchNorm twice before backward
# (GANs, siamese nets) is therefore fine, and not refused. ``_native_batch_norm_legit`` and
# ``_batch_norm_with_update`` are the kernels other releases reach; not run here (2.13 calls
# ``native_batch_norm``).
_RUNNING_STATS = frozenset({"running_mean", "running_var"})
_BATCH_NORMS = frozenset(
    {
        "aten::native_batch_norm",
        "aten::cudnn_batch_norm",
        "aten::miopen_batch_norm",
        "aten::_native_batch_norm_legit",
        "aten::_batch_norm_with_update",
    }
)

ADVICE = (
    "Autograd saved it for backward: written now, the gradient comes out wrong (or backward "
    "fails). Write out of place instead (`y = y.mul(2)` for `y.mul_(2)`, `y = y + 1` for "
    "`y += 1`), or write into a clone (`y = y.clone()` first); or use "
    'guard_saved(mode="clone"), which lets the write land and hands backward the values as '
    "saved. A parameter a live graph still needs (an optimizer step): run that graph's "
    "backward first (the GAN order: `loss_g.backward()` before `opt_d.step()`)."
)
CANNOT_ISOLATE = (
    "Clone mode cannot keep the saved values here: they were saved through your own "
    "saved_tensors_hooks (activation checkpointing recomputes from tensors it keeps itself), "
    "whose unpack does not read a copy immutorch could make. Write out of place, or into a "
    "clone."
)


class SavedFrame(Frame):
    """One ``guard_saved`` activation: the mode and place its saved tensors answer to. Not on
    the thread's frame stack; its protections are indexed one by one as autograd saves."""

    __slots__ = ("owner",)
    quotes_labels = False

    def __init__(self, mode: Mode, where: str, stats: CloneStats, owner: _Owner) -> None:
        super().__init__(mode, where, stats=stats)
        self.owner = owner

    def lets_through(self, op: str, arg: str) -> bool:
        return arg in _RUNNING_STATS and op in _BATCH_NORMS

    def isolate(self, t: torch.Tensor) -> bool:
        return _isolate(self, t)

    def advice(self, cannot_isolate: bool) -> Optional[str]:
        return CANNOT_ISOLATE if cannot_isolate else ADVICE


class SavedRecord(Protection):
    """One tensor autograd saved, as a protection of its storage.

    ``held`` is the tensor autograd would hold when no user hook stands below ours (the input
    itself; a detached alias of an output, since the output holds its node and the node its
    saved tensors: a cycle torch cannot free). Under a user's hook that keeps its own copy or
    nothing (offloading, checkpointing) the record holds no memory: a weak reference to the
    storage ends the protection when the storage dies.
    """

    __slots__ = (
        "code",
        "copy",
        "copy_like",
        "geometry",
        "held",
        "indexed",
        "inner_copy",
        "is_output",
        "keeps",
        "line",
        "node",
        "out_ref",
        "owner",
        "storage_ref",
        "tensor_ref",
        "version",
        "written",
    )

    def __init__(self, frame: SavedFrame, t: torch.Tensor, storage: Any) -> None:
        # Not Protection.__init__: that pins the storage and the tensor object.
        self.frame = frame
        self.owner = frame.owner
        self.label = ""
        self.cdata = storage._cdata
        self.start = self.end = 0
        self.storage = None
        self.obj: Any = _NOTHING
        self.held: Optional[torch.Tensor] = None
        self.keeps = True
        self.inner_copy = False
        self.version = t._version
        self.tensor_ref: Optional[weakref.ref[torch.Tensor]] = None
        self.storage_ref: Any = None
        self.code: Optional[CodeType] = None
        self.line = 0
        self.node: Optional[str] = None
        self.out_ref: Optional[weakref.ref[torch.Tensor]] = None
        self.is_output = False
        self.written: Optional[tuple[str, Optional[str]]] = None
        self.copy: Optional[torch.UntypedStorage] = None
        self.copy_like: Optional[torch.Tensor] = None  # dtype and device of the saved tensor
        self.geometry: Optional[Geometry] = None
        self.indexed: bool = False

    def hit(self) -> Hit:
        label = self.describe()
        holder = _holder(self.cdata)
        if holder is not None:
            label = f"{holder}, {label}"
        return Hit(self.frame, label, self.frame.mode, (), None)

    def note_write(self, op: str, location: Optional[str]) -> None:
        if self.written is None:
            self.written = (op, location)

    def node_name(self) -> str:
        if self.node is None and self.out_ref is not None:
            self.node = _grad_fn_name(self.out_ref())
        return self.node or "an autograd node"

    def site(self) -> str:
        return f"{self.code.co_filename}:{self.line}" if self.code is not None else "?"

    def describe(self) -> str:
        role = "its output" if self.is_output else "an input"
        return f"a tensor saved for backward by {self.node_name()} ({role}, saved at {self.site()})"

    def current_version(self) -> Optional[int]:
        t = self.held
        if t is None and self.tensor_ref is not None:
            t = self.tensor_ref()
        return None if t is None else t._version


def _holder(cdata: int) -> Optional[str]:
    """Name the parameter or buffer a judged write reaches (the GAN order: an optimizer step
    before the backward that needs it), from the optimizers and modules whose code is running
    between the write and the user's line (their frames' ``self``). Not from the user's own
    frames: reading a running frame's ``f_locals`` (Python < 3.13) keeps a snapshot of its
    locals alive, and with it a graph the user has just let go."""
    user = user_frame()
    frame: Any = sys._getframe(1)
    seen: set[int] = set()
    while frame is not None and frame is not user:
        obj = frame.f_locals.get("self")
        if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)) and id(obj) not in seen:
            seen.add(id(obj))
            found = _provenance.search(obj, cdata)
            if found is not None:
                return found.label
        frame = frame.f_back
    return None


_NOTHING = torch.empty(0)  # what ``Protection.obj`` reads for a record that holds no tensor


class _Packed:
    """What autograd keeps for one saved tensor: our record and the user's packed value. Its
    death (the node released it) ends the protection."""

    __slots__ = ("inner", "record", "unpack")

    def __init__(self, record: SavedRecord, inner: Any, unpack: Optional[Unpack]) -> None:
        self.record = record
        self.inner = inner
        self.unpack = unpack

    def __del__(self) -> None:
        # An exception cannot leave __del__; at interpreter shutdown there is nothing to guard.
        with contextlib.suppress(Exception):
            _release(self.record)


class _Owner:
    """One thread's saved-tensor bookkeeping, reachable from other threads: a graph may be
    freed, or its backward run, on another thread than the one that saved."""

    __slots__ = (
        "blocks",
        "bound",
        "by_storage",
        "holds_mode",
        "last_out",
        "last_site",
        "live",
        "lock",
        "packing",
        "pending",
        "thread",
    )

    def __init__(self) -> None:
        self.by_storage = STATE.by_storage  # this thread's registry index (the dict itself)
        self.thread = threading.get_ident()
        self.blocks: list[_Block] = []
        self.live = 0  # indexed records
        self.holds_mode = False
        self.lock = threading.Lock()
        # Naming the node that saved an input: autograd packs an op's inputs before the op
        # runs and its node exists only after. Records wait in ``pending`` until the dispatch
        # mode hands over the op's output (``bound``), whose grad_fn is read at the next op.
        self.pending: list[SavedRecord] = []
        self.bound: list[SavedRecord] = []
        self.last_out: tuple[int, ...] = ()
        self.last_site: tuple[int, int] = (0, -1)
        self.packing = False

    def after_op(self, out: Any) -> None:
        """Called by the every-op mode with each op's output while a block is open."""
        if self.packing:
            return
        if self.bound:
            self.resolve()
        caller = _op_caller(sys._getframe(1))
        self.last_site = (id(caller), caller.f_lasti) if caller is not None else (0, -1)
        if isinstance(out, torch.Tensor):
            self.last_out = (id(out),)
            first: Optional[torch.Tensor] = out
        elif isinstance(out, (tuple, list)):
            tensors = [o for o in out if isinstance(o, torch.Tensor)]
            self.last_out = tuple(id(o) for o in tensors)
            first = tensors[0] if tensors else None
        else:
            self.last_out = ()
            first = None
        if self.pending:
            ref = weakref.ref(first) if first is not None else None
            for record in self.pending:
                record.out_ref = ref
            self.bound, self.pending = self.pending, []

    def resolve(self) -> None:
        for record in self.bound:
            if record.node is None and record.out_ref is not None:
                record.node = _grad_fn_name(record.out_ref())
            record.out_ref = None
        self.bound = []


class _Block:
    __slots__ = ("frame", "pack", "pushed")

    def __init__(self, frame: SavedFrame) -> None:
        self.frame = frame
        self.pushed = False
        self.pack: Optional[tuple[Pack, Unpack]] = None  # the hooks it pushed


_local = threading.local()


def _owner() -> _Owner:
    owner: Optional[_Owner] = getattr(_local, "owner", None)
    if owner is None:
        owner = _local.owner = _Owner()
    return owner


def _grad_fn_name(t: Optional[torch.Tensor]) -> Optional[str]:
    grad_fn = None if t is None else t.grad_fn
    return None if grad_fn is None else type(grad_fn).__name__


_result_fields: dict[type, bool] = {}

# Frames between an op's caller and the dispatch mode: the mode itself and the wrappers torch
# puts around ``__torch_dispatch__`` (Dynamo's disable, ``torch._compile``).
_WRAPPER_FILES = tuple(
    os.path.join(os.path.dirname(os.path.abspath(f)), name)
    for f, name in (
        (_mode.__file__, "mode.py"),
        (torch._compile.__file__, "_compile.py"),
        (torch.__file__, os.path.join("_dynamo", "eval_frame.py")),
        (torch.__file__, os.path.join("utils", "_python_dispatch.py")),
    )
)
_wrappers: dict[CodeType, bool] = {}


def _op_caller(frame: Any) -> Any:
    """The innermost frame past the dispatch mode and its wrappers: where the op was called."""
    while frame is not None:
        code = frame.f_code
        wrapper = _wrappers.get(code)
        if wrapper is None:
            wrapper = _wrappers[code] = os.path.abspath(code.co_filename) in _WRAPPER_FILES
        if not wrapper:
            return frame
        frame = frame.f_back
    return None


def _is_output_save(owner: _Owner, t: torch.Tensor) -> bool:
    """``t`` is the last op's output: is its node saving it (an output save, right after the
    op), or is the next op saving it as an input (before that op runs)? Both come between the
    same two dispatches. An output save is still inside the call that ran the op (same Python
    frame, same bytecode offset), and only nodes with ``result`` fields save outputs."""
    caller = sys._getframe(2)
    if (id(caller), caller.f_lasti) != owner.last_site:
        return False
    grad_fn = t.grad_fn
    if grad_fn is None:
        return False
    cls = type(grad_fn)
    saves = _result_fields.get(cls)
    if saves is None:
        saves = _result_fields[cls] = any(n.startswith("_raw_saved_result") for n in dir(cls))
    return bool(saves)


# -- the forward's line, cheaply ----------------------------------------------------------------
_MACHINERY, _USER, _APPLY, _CHECKPOINT = 0, 1, 2, 3
_kinds: dict[CodeType, int] = {}
# Function.apply is Python (a classmethod) up to torch 2.14 and a builtin from 2.15, which has
# no frame of its own: there a custom Function's saves are named only "an autograd node".
_APPLY_CODE = getattr(
    getattr(torch.autograd.function.Function.apply, "__func__", None), "__code__", None
)
_CHECKPOINT_CODES = _compat.checkpoint_input_saver_codes()
_CHECKPOINT_FUNCTIONS = _compat.checkpoint_input_saver_functions()
# How messages name what saved the inputs of a non-reentrant checkpoint (no node holds them).
CHECKPOINT_SAVER = "torch.utils.checkpoint (an input it recomputes from)"


def _kind(code: CodeType) -> int:
    if code is _APPLY_CODE:
        return _APPLY
    if code in _CHECKPOINT_CODES:
        return _CHECKPOINT
    filename = os.path.abspath(code.co_filename)
    if filename.startswith(_USER_LEVEL) or not (
        filename.startswith(_SKIP_DIRS) or filename.startswith("<frozen")
    ):
        return _USER
    return _MACHINERY


def _forward_site(record: SavedRecord) -> Optional[str]:
    """Set the record's user line (one dict lookup per frame, classified once per code
    object); return the custom Function's node name when ``ctx.save_for_backward`` saved it."""
    function_node: Optional[str] = None
    frame: Any = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        kind = _kinds.get(code)
        if kind is None:
            kind = _kinds[code] = _kind(code)
        if kind == _USER:
            record.code, record.line = code, frame.f_lineno
            break
        if kind == _APPLY and function_node is None:
            cls = frame.f_locals.get("cls")
            if cls in _CHECKPOINT_FUNCTIONS:
                function_node = CHECKPOINT_SAVER
            elif isinstance(cls, type):
                function_node = cls.__name__ + "Backward"
        elif kind == _CHECKPOINT and function_node is None:
            function_node = CHECKPOINT_SAVER
        frame = frame.f_back
    return function_node


# -- pack and unpack ------------------------------------------------------------------------
def _make_pack(frame: SavedFrame, below: Optional[Pack], below_unpack: Optional[Unpack]) -> Pack:
    """Our pack hook for one block, wrapped around the user's pair (``below``) if any."""
    owner = frame.owner

    def pack(t: torch.Tensor) -> Any:
        storage = storage_of(t) if t.layout is torch.strided else None
        if storage is None or STATE.bypass:  # sparse, nested: saved as autograd would
            if below is not None:
                return _Packed(_UNGUARDED, below(t), below_unpack)
            with _compat.DisableTorchDispatch():
                return _Packed(_UNGUARDED, t.detach(), None)
        if owner.bound:
            owner.resolve()
        record = SavedRecord(frame, t, storage)
        function_node = _forward_site(record)
        if function_node is not None:
            record.node = function_node
            record.is_output = _grad_fn_name(t) == function_node
        elif id(t) in owner.last_out and _is_output_save(owner, t):
            record.is_output = True
            record.node = _grad_fn_name(t)
        if record.node is None:
            owner.pending.append(record)
        inner: Any = None
        if below is None:
            # Not ``t`` itself: an output holds its node and the node its saved tensors, a
            # cycle torch never frees (and a leaf saved now may become an op's output later,
            # ``h.copy_(...)``). The detached alias shares storage and version counter.
            with _compat.DisableTorchDispatch():
                record.held = t.detach()
        else:
            owner.packing = True
            try:
                inner = below(t)
            finally:
                owner.packing = False
            record.keeps, record.inner_copy = _what_inner_holds(inner, t, record.cdata)
            record.tensor_ref = weakref.ref(t)
            if not record.keeps:
                record.storage_ref = weakref.ref(storage, _storage_died(record))
        record.obj = record.held if record.held is not None else _NOTHING
        _index(record)
        return _Packed(record, inner, below_unpack)

    # A block opened inside this one chains to the user's pair, not to this pack.
    pack._immutorch_below = (below, below_unpack)  # type: ignore[attr-defined]
    return pack


def _unpack(packed: _Packed) -> torch.Tensor:
    record = packed.record
    if record is not _UNGUARDED:
        try:
            _check_unchanged(record)
        except ImmutableTensorError:
            # This saved value is refused for good; let go of the user's packed value now (an
            # output that save_on_cpu keeps on CPU holds its own node: a cycle that only a
            # completed backward would break).
            packed.inner = None
            raise
    if packed.unpack is not None:
        value = packed.unpack(packed.inner)
        if record.copy is not None and isinstance(value, torch.Tensor):
            storage = storage_of(value)
            if storage is not None and storage._cdata == record.cdata:
                # The user's unpack handed back the written memory itself (its packed value
                # keeps it alive, so the address is still that storage's): the copy stands in.
                return _rebuild(record.copy, value, _geometry(value))
        return value  # type: ignore[no-any-return]
    if record is _UNGUARDED:
        return packed.inner  # type: ignore[no-any-return]
    if record.copy is not None:
        assert record.geometry is not None
        return _rebuild(record.copy, record.copy_like, record.geometry)  # type: ignore[arg-type]
    assert record.held is not None
    return record.held


def _check_unchanged(record: SavedRecord) -> None:
    """Autograd's version check, which it skips under saved-tensor hooks, and the writes it
    never sees (``.data``, which has its own version counter), as immutorch's mode saw them."""
    if record.copy is not None or record.frame.mode == "off":
        return
    version = record.current_version()
    moved = version is not None and version != record.version
    if record.written is None and not moved:
        return
    op, location = record.written if record.written is not None else (None, None)
    by = f" by {op} at {location}" if op is not None else ""
    seen = (
        f"at version {version}; expected version {record.version}"
        if moved
        else "through `.data` or another alias autograd's version counter does not follow"
    )
    why = (
        f'{record.frame.where} runs in mode="{record.frame.mode}"'
        if record.written is not None
        else "immutorch's dispatch mode did not see it: another thread, a change of size or "
        "strides (t_(), unsqueeze_()), or memory written outside the dispatcher"
    )
    raise ImmutableTensorError(
        f"immutorch: backward needs {record.describe()}, and it was modified after it was "
        f"saved{by} ({seen}). Its gradient would be wrong. The write went ahead because "
        f"{why}. " + ADVICE,
        op=op or "",
        argument=record.describe(),
        where=record.frame.where,
        location=location,
    )


def _what_inner_holds(inner: Any, t: torch.Tensor, cdata: int) -> tuple[bool, bool]:
    """(the user's packed value shares the saved storage, it holds a copy of the same size)."""
    keeps = copy = False
    stack = [inner]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            storage = storage_of(value)
            if storage is not None and storage._cdata == cdata:
                keeps = True
            elif value.shape == t.shape and value.dtype == t.dtype:
                copy = True
        elif isinstance(value, (tuple, list)):
            stack.extend(value)
    return keeps, copy


# -- the registry -----------------------------------------------------------------------------
def _index(record: SavedRecord) -> None:
    owner = record.owner
    add_protection(owner.by_storage, record)
    record.indexed = True
    with owner.lock:
        owner.live += 1


def _unindex(record: SavedRecord) -> bool:
    """Drop the record's protection; True when it was the owner's last."""
    if not record.indexed:
        return False
    owner = record.owner
    record.indexed = False
    remove_protection(owner.by_storage, record)
    with owner.lock:
        owner.live -= 1
        return owner.live == 0


def _release(record: SavedRecord) -> None:
    if record is _UNGUARDED:
        return
    record.held = None
    record.obj = _NOTHING
    record.copy = None
    if _unindex(record):
        _settle(record.owner)


def _storage_died(record: SavedRecord) -> Callable[[Any], None]:
    def died(_: Any) -> None:
        if _unindex(record):
            _settle(record.owner)

    return died


def _settle(owner: _Owner) -> None:
    """Hold the every-op mode while this thread has a block open or a saved tensor protected;
    let it go at the first safe moment after. Only the owner thread can pop its mode, and not
    inside a backward node (the engine puts the thread's modes back after each node) nor with
    another mode pushed above ours: there the release waits for the next safe moment (a block
    opening or closing, a backward or autograd.grad returning, another record released)."""
    if threading.get_ident() != owner.thread:
        return
    wanted = bool(owner.blocks) or owner.live > 0
    if wanted and not owner.holds_mode:
        # The Python mode: saved protections are added one by one, outside frame pushes,
        # where the native backend's C++ mirror of the registry would not see them.
        _mode.require(python=True)
        owner.holds_mode = True
    elif not wanted and owner.holds_mode:
        state = STATE
        only_user = state.mode_users <= 1
        if only_user and (
            _compat.in_backward() or _compat.current_dispatch_mode() is not state.mode_handle
        ):
            return
        owner.holds_mode = False
        _mode.release()


# A record for tensors immutorch does not guard (no storage of their own); never indexed.
_UNGUARDED: SavedRecord = SavedRecord.__new__(SavedRecord)
_UNGUARDED.copy = None
_UNGUARDED.indexed = False


# -- clone mode -------------------------------------------------------------------------------
def _isolate(frame: SavedFrame, t: torch.Tensor) -> bool:
    """Copy the written storage once, before the write, for every record of it; their
    protections end (the copy keeps what they saved), so later writes cost nothing."""
    storage = storage_of(t)
    if storage is None:
        return False
    index = frame.owner.by_storage
    records = [p for p in index.get(storage._cdata, ()) if isinstance(p, SavedRecord)]
    if any(not r.keeps and not r.inner_copy for r in records):
        return False
    copy: Optional[torch.UntypedStorage] = None
    STATE.bypass += 1
    try:
        for record in records:
            held = record.held
            if record.keeps:
                if copy is None:
                    with _compat.DisableTorchDispatch():
                        copy = storage.clone()  # type: ignore[no-untyped-call]
                    set_born(copy, PRIVATE_BORN)
                record.copy = copy
                if held is not None:
                    record.geometry = _geometry(held)
                    record.copy_like = torch.empty(0, dtype=held.dtype, device=held.device)
                    record.held = None  # the copy stands in: no second hold on the memory
                    record.obj = _NOTHING
            if _unindex(record):
                _settle(frame.owner)
    finally:
        STATE.bypass -= 1
    if copy is not None:
        nbytes = copy.nbytes()
        frame.stats.add(nbytes)
        TOTAL_STATS.add(nbytes)
    return True


def _geometry(t: torch.Tensor) -> Geometry:
    return int(t.storage_offset()), tuple(t.size()), tuple(t.stride())


def _rebuild(copy: torch.UntypedStorage, like: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """A tensor over clone mode's copy, where the saved tensor was in the original."""
    offset, size, stride = geometry
    with torch.no_grad(), _compat.DisableTorchDispatch():
        out = torch.empty(0, dtype=like.dtype, device=like.device)
        return out.set_(copy, offset, size, stride)


# -- composing with the user's own hooks --------------------------------------------------------
_install_lock = threading.Lock()
_installed = False


def _install() -> None:
    """Once per process: hooks the user pushes inside a block get ours wrapped around them
    (only the innermost saved_tensors_hooks pair runs, so ours would see nothing there), and
    backward and autograd.grad settle the mode when they return (the last saved tensor is
    usually released inside them, where the mode cannot be popped)."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        hooks_cls = torch.autograd.graph.saved_tensors_hooks
        original_enter = hooks_cls.__enter__

        recomputing = _compat.recomputing_hook_types()

        @functools.wraps(original_enter)
        def __enter__(self: Any) -> None:
            owner: Optional[_Owner] = getattr(_local, "owner", None)
            if owner is None or not owner.blocks or isinstance(self, recomputing):
                # Inside a non-reentrant checkpoint nothing saved is read back: backward
                # recomputes from the inputs, which checkpoint saved through our hook.
                return original_enter(self)
            frame = owner.blocks[-1].frame
            pack = _make_pack(frame, self.pack_hook, self.unpack_hook)
            _compat.push_saved_tensors_hooks(pack, _unpack)
            return None

        hooks_cls.__enter__ = __enter__  # type: ignore[method-assign]
        for name in ("backward", "grad"):
            setattr(torch.autograd, name, _settling(getattr(torch.autograd, name)))
        _installed = True


def _settling(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            owner: Optional[_Owner] = getattr(_local, "owner", None)
            if owner is not None and owner.holds_mode and not owner.blocks:
                _settle(owner)

    return wrapper


def _open(mode: Mode, stats: CloneStats, where: Optional[str]) -> Optional[_Block]:
    mode = resolve(mode)
    if mode == "off" or STATE.bypass:
        return None
    _install()
    if where is None:
        user = user_frame()
        where = "guard_saved()"
        if user is not None:
            where = f"guard_saved() at {user.f_code.co_filename}:{user.f_lineno}"
    owner = _owner()
    frame = SavedFrame(mode, where, stats, owner)
    below: tuple[Optional[Pack], Optional[Unpack]] = (None, None)
    top = _compat.top_saved_tensors_hooks()
    if top is None and owner.blocks and not _compat.can_read_saved_hooks():
        # torch 2.4 cannot say which hooks are on top: chain through this thread's own
        # innermost block (a user's saved_tensors_hooks outside it are not called inside).
        top = owner.blocks[-1].pack
    if top is not None:
        # An outer block's pack: chain to what it chains to, so a tensor gets one record.
        below = getattr(top[0], "_immutorch_below", top)
    block = _Block(frame)
    owner.blocks.append(block)
    try:
        _settle(owner)
        pack = _make_pack(frame, *below)
        _compat.push_saved_tensors_hooks(pack, _unpack)
        block.pushed = True
        block.pack = (pack, _unpack)
        STATE.after_op = owner.after_op
    except BaseException:
        _close(block)
        raise
    return block


def _close(block: _Block) -> None:
    owner = block.frame.owner
    try:
        if block.pushed:
            _compat.pop_saved_tensors_hooks()
    finally:
        owner.blocks.remove(block)
        if not owner.blocks:
            STATE.after_op = None
            owner.resolve()
            owner.pending = []
            owner.last_out = ()
        _settle(owner)


class GuardSaved:
    """The context manager (and decorator) :func:`guard_saved` returns.

    ``stats`` counts the copies clone mode made for it, over all its uses.
    """

    def __init__(self, mode: Mode, *, where: Optional[str] = None) -> None:
        self.mode: Mode = check_mode(mode)
        # How messages name the block: its line in the code, else what opened it (the pytest
        # plugin, ``python -m immutorch run``).
        self.where = where
        self.stats = CloneStats()
        self._active: list[Optional[_Block]] = []

    def __enter__(self) -> GuardSaved:
        self._active.append(_open(self.mode, self.stats, self.where))
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        block = self._active.pop()
        if block is not None:
            _close(block)
        if exc is not None:
            raise_original(exc)

    def __call__(self, fn: F) -> F:
        @wrapt.decorator  # type: ignore[misc]
        def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            __tracebackhide__ = True
            with self:  # __exit__ puts back what TorchScript rewrapped
                return wrapped(*args, **kwargs)

        return wrapper(fn)  # type: ignore[no-any-return,return-value]


def guard_saved(mode: Mode = "raise") -> GuardSaved:
    """Make every tensor autograd saves for backward read-only until backward has used it.

    Inside the block (or the decorated function), each tensor autograd saves (op outputs and
    inputs, parameters, ``ctx.save_for_backward``) is protected from the moment it is saved
    until its node releases it: backward without ``retain_graph``, or the graph freed, whether
    or not the block is still open. ``raise`` refuses a write into it before the data changes,
    naming the op and line that wrote and the node and forward line that saved; ``warn`` lets
    it land with a :class:`MutationWarning`, and backward then fails instead of computing a
    wrong gradient; ``clone`` lets it land and backward uses the values as saved;
    ``off`` does nothing. ``IMMUTORCH_MODE`` and the pytest plugin override the mode.

    >>> import torch, immutorch
    >>> a = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> with immutorch.guard_saved(mode="clone"):
    ...     b = a.sigmoid()
    ...     _ = b.mul_(2)  # lands; sigmoid's backward still gets b as it was saved
    ...     b.sum().backward()
    >>> s = torch.sigmoid(a.detach())
    >>> torch.allclose(a.grad, 2 * s * (1 - s))
    True
    """
    return GuardSaved(mode)


def live_protections() -> int:
    """How many saved tensors this thread protects now (tests: nothing is left behind)."""
    owner: Optional[_Owner] = getattr(_local, "owner", None)
    return 0 if owner is None else owner.live
