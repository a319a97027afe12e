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
from typing import Any, Optional

import torch

from ._config import STRICTNESS, Mode, Scope
from ._storage import (
    PLAIN,
    READONLY_ATTR,
    STANDS_FOR_ATTR,
    born_epoch,
    byte_range,
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


class Protection:
    """One protected tensor in one frame."""

    __slots__ = ("cdata", "end", "frame", "label", "obj", "start", "storage")

    def __init__(self, frame: Frame, label: str, obj: torch.Tensor, storage: Any) -> None:
        self.frame = frame
        self.label = label
        self.obj = obj
        self.storage = storage
        self.cdata: int = storage._cdata
        rng = byte_range(storage)
        self.start, self.end = rng if rng is not None else (0, 0)

    def hit(self) -> Hit:
        return Hit(self.frame, self.label, self.frame.mode, shape_of(self.obj), self.obj.dtype)


class Frame:
    """One active guard, decorator call or module boundary."""

    __slots__ = (
        "allow",
        "body_only",
        "boundary",
        "hooked",
        "kind",
        "mode",
        "module_root",
        "modules_scoped",
        "needs_mode",
        "protect_state",
        "protections",
        "scope",
        "seen_modules",
        "start",
        "state",
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
        # Storages this frame does not protect: allow= and, for block frames, module state.
        self.allow: dict[int, Any] = {}
        self.state: dict[int, Any] = {}
        self.protect_state = protect_state
        self.stats = stats if stats is not None else CloneStats()
        self.module_root = module_root
        self.boundary = False
        self.hooked = False  # holds a reference on the module hooks
        self.seen_modules: dict[tuple[int, object], torch.nn.Module] = {}

    def exempt(self, cdata: int) -> bool:
        return cdata in self.allow or cdata in self.state

    def protect(self, label: str, t: torch.Tensor) -> None:
        if t.layout is torch.strided and type(t) in PLAIN:
            storage = storage_of(t)
            if storage is not None:
                self.protections.append(Protection(self, label, t, storage))
                return
        for leaf in tensor_leaves(t):
            storage = storage_of(leaf)
            if storage is not None:
                self.protections.append(Protection(self, label, t, storage))

    def allow_tensor(self, t: torch.Tensor) -> None:
        for leaf in tensor_leaves(t):
            storage = storage_of(leaf)
            if storage is not None:
                self.allow[storage._cdata] = storage

    def add_module_state(self, module: torch.nn.Module, *, recurse: bool) -> None:
        # Once per module per frame: gradients that appear later in the block are the block's
        # own memory anyway, and walking parameters on every call cost ~10 us per module call.
        key = (id(module), recurse)
        if key in self.seen_modules:
            return
        self.seen_modules[key] = module
        for p in module.parameters(recurse=recurse):
            self._add_state(p)
            if p.grad is not None:
                self._add_state(p.grad)
        for b in module.buffers(recurse=recurse):
            self._add_state(b)

    def add_framework_state(self, owner: torch.nn.Module, find: Any) -> None:
        """Exempt memory a framework module owns beyond its parameters (DDP's gradient
        buckets), found by ``find(owner)``, once per module per frame."""
        key = (id(owner), "framework")
        if key in self.seen_modules:
            return
        self.seen_modules[key] = owner
        for t in find(owner):
            self._add_state(t)

    def _add_state(self, t: torch.Tensor) -> None:
        for leaf in tensor_leaves(t):
            storage = storage_of(leaf)
            if storage is not None:
                self.state[storage._cdata] = storage


class Hit:
    """A protection that covers a written storage, as the mode reports it."""

    __slots__ = ("dtype", "frame", "label", "mode", "shape")

    def __init__(
        self,
        frame: Frame,
        label: str,
        mode: Mode,
        shape: tuple[int, ...],
        dtype: Optional[torch.dtype],
    ) -> None:
        self.frame = frame
        self.label = label
        self.mode = mode
        self.shape = shape
        self.dtype = dtype


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
        # The last exception raised inside the dispatch mode on this thread (a refusal, or an
        # op's own error): TorchScript's interpreter turns an exception raised inside it into
        # a RuntimeError with an empty message, and the front doors put this one back (see
        # _policy.recover_dispatch_error).
        self.dispatch_error: Optional[BaseException] = None
        self.mode_handle: Any = None
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
    def storage_hits(self, t: torch.Tensor, storage: Any) -> list[Hit]:
        """Every protection that covers a write into ``storage`` (reached through ``t``)."""
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
        if self.blocks:
            born = born_epoch(storage)
            for f in self.blocks:
                if born < f.start and not f.exempt(cdata):
                    if not f.protect_state and isinstance(t, torch.nn.Parameter):
                        continue
                    hits.append(Hit(f, self.outside_label(cdata), f.mode, (), None))
        mark = getattr(storage, READONLY_ATTR, None)
        if mark is not None and self.frames:
            inner = self.frames[-1]
            hits.append(Hit(inner, f"{mark} (marked read-only)", inner.mode, (), None))
        return hits

    def outside_label(self, cdata: int) -> str:
        """Name memory from outside a block by the module parameter it came in as."""
        for boundary in reversed(self.boundaries):
            label: Optional[str] = boundary.labels.get(cdata)
            if label is not None:
                return label
        return OUTSIDE

    def object_hits(self, t: torch.Tensor) -> list[Hit]:
        """Protections of the tensor object itself, for ops that change its size or strides.
        A scoped backend's alias is judged as the caller's tensor it stands for."""
        t = t.__dict__.get(STANDS_FOR_ATTR, t)
        hits = [
            p.hit()
            for p in self.by_object.get(id(t), ())
            if p.obj is t and not p.frame.exempt(p.cdata)
        ]
        if self.blocks:
            storage = storage_of(t)
            if storage is not None:
                born = born_epoch(storage)
                for f in self.blocks:
                    if born < f.start and not f.exempt(storage._cdata):
                        if not f.protect_state and isinstance(t, torch.nn.Parameter):
                            continue
                        hits.append(Hit(f, OUTSIDE, f.mode, (), None))
        return hits


def protection_of(t: torch.Tensor) -> Optional[Hit]:
    """The strictest protection over ``t``'s memory on this thread, if any."""
    storage = storage_of(t)
    if storage is None:
        return None
    hits = STATE.storage_hits(t, storage)
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
