"""What is protected, per thread: a stack of frames, one per active guard, decorator call or
module boundary, indexed by storage so that a write is judged with a dict lookup.

Frames hold strong references to the protected storages only while they are active (it pins
the StorageImpl address, so a freed-and-reused address can never be mistaken for a protected
one). Read-only marks and births live on the storage objects themselves (see ``_storage``).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import _arguments
from ._compat import functional_mutations, is_functional, is_functorch_wrapped
from ._config import STRICTNESS, Mode, Scope
from ._storage import (
    PLAIN,
    READONLY_ATTR,
    STANDS_FOR_ATTR,
    born_epoch,
    byte_range,
    leaf_storages,
    shape_of,
    storage_of,
    tensor_leaves,
)


@dataclass
class CloneStats:
    """Copies made by clone mode: one per protected storage written, at the first write."""

    copies: int = 0
    bytes_copied: int = 0

    def add(self, nbytes: int) -> None:
        self.copies += 1
        self.bytes_copied += nbytes


TOTAL_STATS = CloneStats()


# The label of memory a block guard protects when no boundary named it.
OUTSIDE = "a tensor from outside the block"

NAMED = "named"  # protects the tensors it was given
BLOCK = "block"  # protects everything that existed before it started

# Block frames tell their own memory from outside memory by comparing a storage's birth tag
# with the epoch at which they started.
_epochs = itertools.count(1)
current_epoch = 0


def next_epoch() -> int:
    global current_epoch
    current_epoch = next(_epochs)
    return current_epoch


def _no_state(frame: Frame, cdata: int, t: Optional[torch.Tensor]) -> bool:
    return False


# Whether a storage is module state (a parameter, buffer or gradient of a live module, or a
# framework module's buffers): installed by ``_module_state``, a layer above this one, which
# needs the stack and the frameworks to answer.
_state_lookup: Callable[[Frame, int, Optional[torch.Tensor]], bool] = _no_state


def install_state_lookup(lookup: Callable[[Frame, int, Optional[torch.Tensor]], bool]) -> None:
    global _state_lookup
    _state_lookup = lookup


class Protection:
    """One protected tensor in one frame."""

    __slots__ = ("cdata", "end", "frame", "holder", "label", "obj", "start", "storage")

    def __init__(
        self,
        frame: Frame,
        label: str,
        obj: torch.Tensor,
        storage: Any,
        holder: Optional[torch.Tensor] = None,
    ) -> None:
        self.frame = frame
        self.label = label
        self.obj = obj
        # Where ``obj`` is a torch.func wrapper: the tensor under it that holds the memory. A
        # metadata write through the wrapper (``unsqueeze_`` under vmap) reaches the backends
        # on this tensor, and changes the caller's tensor when it is the caller's own.
        self.holder = holder
        self.storage = storage
        self.cdata: int = storage._cdata
        rng = byte_range(storage)
        self.start, self.end = rng if rng is not None else (0, 0)

    def hit(self) -> Hit:
        return Hit(self.frame, self.label, self.frame.mode, shape_of(self.obj), self.obj.dtype)

    def note_write(self, op: str, location: Optional[str]) -> None:
        """A write into this protection's storage went ahead (warn mode). Protections that
        keep a record of it (tensors saved for backward, ``_saved``) override this."""


class Frame:
    """One active guard, decorator call or module boundary."""

    __slots__ = (
        "allow",
        "body_only",
        "boundary",
        "deferred",
        "hooked",
        "kind",
        "mode",
        "module_root",
        "modules_scoped",
        "needs_mode",
        "protect_state",
        "protections",
        "scope",
        "start",
        "state_rebuilt",
        "stats",
        "where",
    )

    def __init__(
        self,
        mode: Mode,
        where: str,
        kind: str = NAMED,
        *,
        protect_state: bool = False,
        stats: Optional[CloneStats] = None,
        module_root: Optional[torch.nn.Module] = None,
        scope: Scope = "all",
        modules_scoped: bool = False,
    ) -> None:
        self.mode = mode
        self.scope = scope
        # scope="arguments" on a guard: module calls in the block take the protected arguments
        # as scoped aliases; the block body itself runs under the every-op mode.
        self.modules_scoped = modules_scoped and scope == "arguments"
        # Whether this frame needs the every-op mode (decorators and watches in scope
        # "arguments" do not, unless an argument cannot be handed over as a scoped alias), and
        # whether only in its block body.
        self.needs_mode = scope == "all" or self.modules_scoped
        self.body_only = self.modules_scoped
        self.where = where
        self.kind = kind
        self.start = next_epoch() if kind == BLOCK else 0
        self.protections: list[Protection] = []
        # Protected functionalize wrappers and the writes each had recorded when protected:
        # functionalize applies a callee's writes to the real tensor only after the callee
        # has returned (see _boundaries.finish).
        self.deferred: list[tuple[Protection, int]] = []
        # Storages this frame does not protect: allow= (and, for a block, the buffers of DDP
        # and FSDP2 modules, read as it starts). A block frame also exempts module
        # state, looked up where a write needs it (_module_state): whether it has had its
        # one rebuild of the state index.
        self.allow: dict[int, Any] = {}
        self.protect_state = protect_state
        self.stats = stats if stats is not None else CloneStats()
        self.module_root = module_root
        self.boundary = False
        self.hooked = False  # holds a reference on the module hooks
        self.state_rebuilt = False

    def exempt(self, cdata: int, t: Optional[torch.Tensor] = None) -> bool:
        """Whether this frame lets a write into storage ``cdata`` (reached through ``t``) go
        ahead: ``allow=``, and for a block frame that does not protect state, module state."""
        if cdata in self.allow:
            return True
        return self.kind == BLOCK and not self.protect_state and _state_lookup(self, cdata, t)

    # Hooks for frames whose protections come and go with autograd's saved tensors
    # (``_saved.SavedFrame``); a guard's frame keeps these defaults.
    quotes_labels = True  # labels are names (`x`, `guard argument 0`), not phrases

    def lets_through(self, op: str, arg: str) -> bool:
        """Whether a write by ``op`` into argument ``arg`` is harmless to what this frame
        protects (judged before the policy acts)."""
        return False

    def isolate(self, t: torch.Tensor) -> bool:
        """Clone mode, for a write that reaches this frame's memory without a copy-on-write
        alias: keep what the frame protects intact and let the write land (True), or not."""
        return False

    def advice(self, cannot_isolate: bool) -> Optional[str]:
        """What to do, for the refusal's last lines; None: the policy's own advice."""
        return None

    def protect(self, label: str, t: torch.Tensor) -> None:
        if t.layout is torch.strided and type(t) in PLAIN:
            storage = storage_of(t)
            if storage is not None:
                protection = Protection(self, label, t, storage)
                self.protections.append(protection)
                if not is_functional(t):
                    return
                # functionalize's wrapper: its storage is bookkeeping; the memory is under it.
                self.deferred.append((protection, functional_mutations(t)))
        holds = is_functorch_wrapped(t)
        for leaf in tensor_leaves(t):
            storage = storage_of(leaf)
            if storage is not None:
                holder = leaf if holds else None
                self.protections.append(Protection(self, label, t, storage, holder))

    def allow_tensor(self, t: torch.Tensor) -> None:
        for storage in leaf_storages(t):
            self.allow[storage._cdata] = storage


def _label_on_stack(cdata: int) -> Optional[str]:
    """The parameter a storage came in as, in the innermost ``Module.__call__`` on the
    interpreter stack that took it; called only to word a refusal."""
    for local in _arguments.module_calls_on_stack():
        label = _label_in_call(local, cdata)
        if label is not None:
            return label
    return None


def _label_in_call(local: dict[str, Any], cdata: int) -> Optional[str]:
    module, args, kwargs = local.get("self"), local.get("args"), local.get("kwargs")
    if not isinstance(module, torch.nn.Module) or not isinstance(args, tuple):
        return None
    found: list[str] = []

    def visit(name: str, t: torch.Tensor) -> None:
        storage = storage_of(t)
        if not found and storage is not None and storage._cdata == cdata:
            found.append(name)

    names = _arguments.forward_param_names(module)
    _arguments.label_call(names, args, kwargs if isinstance(kwargs, dict) else {}, visit)
    return found[0] if found else None


class Hit:
    """A protection that covers a written storage, as the mode reports it."""

    __slots__ = ("_label", "_outside", "dtype", "frame", "mode", "shape")

    def __init__(
        self,
        frame: Frame,
        label: Optional[str],
        mode: Mode,
        shape: tuple[int, ...],
        dtype: Optional[torch.dtype],
        outside: Optional[tuple[ThreadState, int]] = None,
    ) -> None:
        self.frame = frame
        self._label = label
        # A block's hit on memory from outside it: (the thread's state, the storage), named
        # by `label` only when asked. Naming walks the module calls on the interpreter stack
        # (~8 us), and most hits are never named: clone mode's hand-over asks only whether
        # and how an argument is protected.
        self._outside = outside
        self.mode = mode
        self.shape = shape
        self.dtype = dtype

    @property
    def label(self) -> str:
        """What the message calls the protected tensor (``x``, ``guard argument 0``)."""
        label = self._label
        if label is None:
            if self._outside is None:  # pragma: no cover - every Hit has one or the other
                return OUTSIDE
            state, cdata = self._outside
            label = self._label = state.outside_label(cdata)
        return label


class ThreadState(threading.local):
    """Everything immutorch knows on one thread. Dispatch modes are thread-local too."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.by_storage: dict[int, list[Protection]] = {}
        self.by_object: dict[int, list[Protection]] = {}
        self.ranged: list[Protection] = []
        self.blocks: list[Frame] = []
        self.clone_frames = 0
        self.bypass = 0
        # Users of the every-op mode (frames and fallbacks), and how many of them need it only
        # in a block body (see _mode.suspend); guard frames whose module calls hand over scoped
        # aliases; the module calls in progress that did so (their nested calls cost nothing).
        self.mode_users = 0
        self.body_users = 0
        self.scoped_guards = 0
        self.scoped_calls = 0
        # Scoped calls that took the every-op mode off the stack (_mode.suspend): births in
        # them go unrecorded, so block frames judge undated memory there by what crossed.
        self.suspended_calls = 0
        # The last exception raised inside the dispatch mode on this thread (a refusal, or an
        # op's own error): TorchScript's interpreter turns an exception raised inside it into
        # a RuntimeError with an empty message, and the front doors put this one back (see
        # _policy.recover_dispatch_error).
        self.dispatch_error: Optional[BaseException] = None
        self.mode_handle: Any = None
        # Called by the every-op mode with each op's output while a guard_saved block is open
        # on this thread (``_saved`` learns there which autograd node saved an op's inputs).
        self.after_op: Optional[Callable[[Any], None]] = None
        # (module, display path) for each nn.Module call in progress, outermost first.
        self.modules: list[torch.nn.Module] = []
        # Module-boundary bookkeeping, one entry per module call in progress.
        self.boundaries: list[Any] = []
        self.watchers: list[Any] = []

    # -- frames -------------------------------------------------------------------------------
    def push(self, frame: Frame) -> None:
        self.frames.append(frame)
        for p in frame.protections:
            self.by_storage.setdefault(p.cdata, []).append(p)
            self.by_object.setdefault(id(p.obj), []).append(p)
            if p.holder is not None:
                self.by_object.setdefault(id(p.holder), []).append(p)
            if p.start:
                self.ranged.append(p)
        if frame.kind == BLOCK:
            self.blocks.append(frame)
        if frame.mode == "clone":
            self.clone_frames += 1
        if frame.modules_scoped:
            self.scoped_guards += 1

    def pop(self, frame: Frame) -> None:
        # Frames end in LIFO order except when an exception unwinds several; remove by identity.
        for i in range(len(self.frames) - 1, -1, -1):
            if self.frames[i] is frame:
                del self.frames[i]
                break
        for p in frame.protections:
            _remove(self.by_storage, p.cdata, p)
            _remove(self.by_object, id(p.obj), p)
            if p.holder is not None:
                _remove(self.by_object, id(p.holder), p)
        if frame.protections and self.ranged:
            self.ranged = [p for p in self.ranged if p.frame is not frame]
        if frame.kind == BLOCK:
            self.blocks = [f for f in self.blocks if f is not frame]
        if frame.mode == "clone":
            self.clone_frames -= 1
        if frame.modules_scoped:
            self.scoped_guards -= 1

    def innermost_mode(self) -> Optional[Mode]:
        return self.frames[-1].mode if self.frames else None

    # -- lookups ------------------------------------------------------------------------------
    def storage_hits(self, t: torch.Tensor, storage: Any, *, blocks: bool = True) -> list[Hit]:
        """Every protection that covers a write into ``storage`` (reached through ``t``);
        without the block rule if not ``blocks``."""
        hits: list[Hit] = []
        cdata = storage._cdata
        for p in self.by_storage.get(cdata, ()):
            if not p.frame.exempt(cdata):
                hits.append(p.hit())
        if self.ranged:
            rng = byte_range(storage)
            if rng is not None:
                lo, hi = rng
                for p in self.ranged:
                    if p.cdata != cdata and p.start < hi and lo < p.end:
                        hits.append(p.hit())
        if blocks and self.blocks:
            born = born_epoch(storage)
            if born or self.older_than_blocks(cdata):
                for f in self.blocks:
                    if born < f.start and not _state_kept(f, t) and not f.exempt(cdata, t):
                        hits.append(Hit(f, None, f.mode, (), None, (self, cdata)))
        mark = getattr(storage, READONLY_ATTR, None)
        if mark is not None and self.frames:
            inner = self.frames[-1]
            hits.append(Hit(inner, f"{mark} (marked read-only)", inner.mode, (), None))
        return hits

    def older_than_blocks(self, cdata: int) -> bool:
        """Whether undated memory counts as older than the active block frames.

        Everywhere but one place, yes: a storage nothing dated is outside memory (see
        ``_births``). Inside a scoped call that took the every-op mode off the stack, the
        block's own new memory goes undated too (ops that take no handed-over argument run
        unseen there), and what the scoped backend promises inside a module call covers only
        the arguments handed over: there, undated memory counts as outside only if it crossed
        as one of them, or (for a block that protects module state) is state of a module in
        call. Rare: only writes by ops that take a handed-over argument get here.
        """
        if not self.suspended_calls:
            return True
        for boundary in self.boundaries:
            if cdata in getattr(boundary, "storages", ()):
                return True
        if any(f.protect_state for f in self.blocks):
            for boundary in self.boundaries:
                module = getattr(boundary, "module", None)
                if isinstance(module, torch.nn.Module) and _holds(module, cdata):
                    return True
        return False

    def outside_label(self, cdata: int) -> str:
        """Name memory from outside a block by the module parameter it came in as: from the
        module calls on record, then from those on the interpreter stack (block guards alone
        put none on record: ``_boundaries._only_noted``)."""
        for boundary in reversed(self.boundaries):
            label: Optional[str] = boundary.labels.get(cdata)
            if label is not None:
                return label
        return _label_on_stack(cdata) or OUTSIDE

    def object_hits(self, t: torch.Tensor) -> list[Hit]:
        """Protections of the tensor object itself, for ops that change its size or strides.
        A scoped backend's alias is judged as the caller's tensor it stands for."""
        t = t.__dict__.get(STANDS_FOR_ATTR, t)
        hits = [
            p.hit()
            for p in self.by_object.get(id(t), ())
            if (p.obj is t or p.holder is t) and not p.frame.exempt(p.cdata)
        ]
        if self.blocks:
            storage = storage_of(t)
            born = born_epoch(storage) if storage is not None else 0
            if storage is not None and (born or self.older_than_blocks(storage._cdata)):
                for f in self.blocks:
                    if born < f.start and not _state_kept(f, t) and not f.exempt(storage._cdata, t):
                        hits.append(Hit(f, OUTSIDE, f.mode, (), None))
        return hits


def _state_kept(frame: Frame, t: torch.Tensor) -> bool:
    """A parameter is module state wherever it is written from (checked before any lookup)."""
    return not frame.protect_state and isinstance(t, torch.nn.Parameter)


def _holds(module: torch.nn.Module, cdata: int) -> bool:
    """Whether ``cdata`` is the storage of a parameter, gradient or buffer of ``module``."""
    tensors: list[Optional[torch.Tensor]] = []
    for p in module.parameters():
        tensors += (p, p.grad)
    tensors += module.buffers()
    for t in tensors:
        storage = storage_of(t) if t is not None else None
        if storage is not None and storage._cdata == cdata:
            return True
    return False


def add_protection(index: dict[int, list[Protection]], p: Protection) -> None:
    """Index one protection in ``index`` (a thread's ``by_storage``) outside any frame push:
    tensors saved for backward come and go one by one. Lists are replaced, never changed in
    place, since another thread may remove one while the owner's judge iterates the list."""
    index[p.cdata] = [*index.get(p.cdata, ()), p]


def remove_protection(index: dict[int, list[Protection]], p: Protection) -> None:
    """Undo :func:`add_protection`; safe from any thread (``index`` is the owner's dict)."""
    items = index.get(p.cdata)
    if items is None:
        return
    kept = [q for q in items if q is not p]
    if kept:
        index[p.cdata] = kept
    else:
        index.pop(p.cdata, None)


def protection_of(t: torch.Tensor) -> Optional[Hit]:
    """The strictest protection over ``t``'s memory on this thread, if any. A tensor with no
    storage of its own (a torch.func wrapper, a sparse tensor) is judged by the tensors that
    hold its memory."""
    storage = storage_of(t)
    hits = STATE.storage_hits(t, storage) if storage is not None else []
    if storage is None or is_functorch_wrapped(t):  # functionalize's wrappers have a storage
        for leaf in tensor_leaves(t):
            if leaf is not t:
                hit = protection_of(leaf)
                if hit is not None:
                    hits.append(hit)
    return strictest(hits) if hits else None


def strictest(hits: list[Hit]) -> Hit:
    """The hit whose mode wins: the strictest, the innermost frame among equals."""
    best = hits[0]
    for h in hits[1:]:
        if STRICTNESS[h.mode] >= STRICTNESS[best.mode]:
            best = h
    return best


def _remove(index: dict[int, list[Protection]], key: int, p: Protection) -> None:
    items = index.get(key)
    if items is None:
        return
    for i, q in enumerate(items):
        if q is p:
            del items[i]
            break
    if not items:
        del index[key]


STATE = ThreadState()
