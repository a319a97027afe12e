"""Clone mode without copying up front: copy-on-write aliases.

At a boundary (a decorated call, a module call inside a guard) each protected tensor is handed
to the callee as an *alias*: a new TensorImpl over the same storage, made by an autograd
Function whose backward is the identity, so gradients still reach the caller's tensor. Every
view the callee makes from an alias joins the alias's group. The first write into the storage
through any member copies the storage once and re-points every live member at the copy; the
write then lands in the copy. A callee that only reads costs no copy.
"""

from __future__ import annotations

import copy
import threading
import weakref
from typing import Any, Callable, Optional

import torch

from ._arguments import replace
from ._compat import (
    disable_torch_dispatch,
    is_functional,
    is_traced,
    set_version_counter,
    tracing_now,
)
from ._registry import STATE, TOTAL_STATS, CloneStats
from ._storage import PLAIN, PRIVATE_BORN, leaf_storages, set_born, storage_of

GROUP_ATTR = "_immutorch_cow"

# The uncopied group of each (boundary stats, protected storage), per thread. Tensors handed
# over together that share memory (``f(x, x)``, ``f(x, x[1:])``) must join one group: with a
# group each, a write through one would copy only its own alias and the others would go on
# reading the stale original, unlike the unguarded call. Weak: a group lives while a member
# does, and it pins its stats and storage, so the (id, _cdata) key cannot be reused meanwhile.
_open_groups: threading.local = threading.local()


def _groups() -> weakref.WeakValueDictionary[tuple[int, int], CowGroup]:
    groups: weakref.WeakValueDictionary[tuple[int, int], CowGroup] | None = getattr(
        _open_groups, "groups", None
    )
    if groups is None:
        groups = _open_groups.groups = weakref.WeakValueDictionary()
    return groups


# Told of each tensor that joins a group (the native backend's mark_member, installed when
# it loads): views are handed to Python to join a group only where their source is a member.
_member_hook: Optional[Callable[[torch.Tensor], None]] = None


# Every group not copied yet, in any thread (weak): what install_member_hook catches up on.
_live_groups: weakref.WeakSet[CowGroup] = weakref.WeakSet()


def install_member_hook(hook: Callable[[torch.Tensor], None]) -> None:
    """Install ``hook`` and tell it of every member of the groups already open (a group made
    while the Python mode served can meet the native backend in a later guard)."""
    global _member_hook
    _member_hook = hook
    for group in list(_live_groups):
        for ref in list(group.members):
            t = ref()
            if t is not None:
                hook(t)


class CowGroup:
    """The alias of one protected storage handed across one boundary, and its views."""

    __slots__ = ("__weakref__", "copied", "members", "stats", "storage")

    def __init__(self, storage: torch.UntypedStorage, stats: CloneStats) -> None:
        self.storage = storage
        self.members: list[weakref.ref[torch.Tensor]] = []
        self.copied = False
        self.stats = stats
        if _member_hook is None:
            _live_groups.add(self)

    def add(self, t: torch.Tensor) -> None:
        if t.__dict__.get(GROUP_ATTR) is self:
            return  # joined already (a member's .data: the Python mode and the native getter)
        t.__dict__[GROUP_ATTR] = self
        if _member_hook is not None:
            _member_hook(t)  # the native backend joins views only to members' groups
        ref = weakref.ref(t)
        self.members.append(ref)
        if type(t) is torch.Tensor:
            _serialize_as_plain(t, ref)
        if len(self.members) % 1024 == 0:
            self.members = [r for r in self.members if r() is not None]

    def materialize(self) -> None:
        """Copy the storage once and move every live member onto the copy."""
        STATE.bypass += 1
        try:
            try:
                copy = self.storage.clone()  # type: ignore[no-untyped-call]
            except NotImplementedError as err:
                # A tracing mode below immutorch's (make_fx, which torch.func.linearize runs)
                # records every op and cannot record one on a bare storage.
                raise RuntimeError(
                    "immutorch: clone mode cannot copy the protected memory to isolate this "
                    f"write while torch traces the function ({err}); torch.func.linearize "
                    'and make_fx do. Use mode="raise" or mode="warn" for this call.'
                ) from err
            set_born(copy, PRIVATE_BORN)
            live = [t for t in (ref() for ref in self.members) if t is not None]
            moved: list[tuple[torch.Tensor, int]] = []
            with torch.no_grad(), disable_torch_dispatch():
                try:
                    for t in live:
                        version = t._version
                        moved.append((t, version))
                        t.set_(copy, t.storage_offset(), t.size(), t.stride())
                        set_version_counter(t, version)
                except BaseException:
                    # All members or none: a group half on the copy and half on the original
                    # would let the callee's views disagree about what they hold.
                    for t, version in moved:
                        t.set_(self.storage, t.storage_offset(), t.size(), t.stride())
                        set_version_counter(t, version)
                    raise
            for t in live:
                for name in _OWN_KEYS:
                    t.__dict__.pop(name, None)
        finally:
            STATE.bypass -= 1
        nbytes = copy.nbytes()
        self.stats.add(nbytes)
        TOTAL_STATS.add(nbytes)
        self.copied = True
        self.members = []
        groups, key = _groups(), (id(self.stats), self.storage._cdata)
        if groups.get(key) is self:
            del groups[key]
        self.storage = copy


# -- a view no dispatcher reports --------------------------------------------------------------
# ``x.data`` makes a view of x without dispatching an op. A Python dispatch mode on the thread
# is told of it (as an ``aten::detach``, which the mode joins to x's group like any view); a
# C++ key is not. So while an every-op clone frame is active anywhere, the native backend,
# where it is loaded, points TensorBase's own ``data`` descriptor at a getter of its own
# (``install_data_hook``), which joins a member's ``.data`` to its group as the backend joins
# the views ops make (both the mode and that getter may join one view: ``CowGroup.add`` takes
# a member once). A property in front of it on torch.Tensor (as before) changed a class at
# each guard, which invalidates the attribute caches of torch.Tensor and every subclass, and
# from CPython 3.13 stops them for good after 1,000 changes; the descriptor is one object, and
# pointing it elsewhere changes no class.
_views_lock = threading.Lock()
_views_users = 0
DATA_DESCRIPTOR: Any = torch._C.TensorBase.__dict__["data"]  # the getset descriptor
# (on) -> None: the native backend's switch for DATA_DESCRIPTOR; None where it is not loaded.
_data_hook: Optional[Callable[[bool], None]] = None


def install_data_hook(hook: Callable[[bool], None]) -> None:
    """The native backend's switch for the ``.data`` watch (``hook(on)``). Takes over at once
    where a clone frame is active."""
    global _data_hook
    with _views_lock:
        _data_hook = hook
        if _views_users > 0:
            hook(True)


def watch_unseen_views(on: bool) -> None:
    """One more (``on``) or one less every-op clone frame, process wide: members' ``.data``
    is watched while there is one, where the native backend is loaded."""
    global _views_users
    with _views_lock:
        _views_users += 1 if on else -1
        if on and _views_users == 1:
            if _data_hook is not None:
                _data_hook(True)
        elif _views_users <= 0:
            _views_users = 0
            if _data_hook is not None:
                _data_hook(False)


# -- serialization ------------------------------------------------------------------------------
# A plain alias pickles, torch.saves and deep-copies as the plain tensor it stands for. Tensor's
# own __reduce_ex__ and __deepcopy__ would carry the group along (its weak references cannot be
# pickled, and a deep copy would believe itself a member of the group). Python finds both
# methods on the instance before the class (they are not data descriptors), so each member
# carries a small stand-in under both names, holding the member only weakly.
_REDUCE, _DEEPCOPY = "__reduce_ex__", "__deepcopy__"
_OWN_KEYS = (GROUP_ATTR, _REDUCE, _DEEPCOPY)


class _AsPlain:
    __slots__ = ("ref",)

    def __init__(self, ref: weakref.ref[torch.Tensor]) -> None:
        self.ref = ref

    def __call__(self, arg: Any) -> Any:
        t = self.ref()
        if t is None:  # pragma: no cover - called through the member, which is alive
            raise RuntimeError("immutorch: internal error: a copy-on-write alias is gone")
        if isinstance(arg, dict):
            return _deepcopy_plain(t, arg)
        return _reduce_plain(t, arg)


def _serialize_as_plain(t: torch.Tensor, ref: weakref.ref[torch.Tensor]) -> None:
    stand_in = _AsPlain(ref)
    t.__dict__[_REDUCE] = stand_in
    t.__dict__[_DEEPCOPY] = stand_in


def _user_state(t: torch.Tensor) -> dict[str, Any]:
    return {k: v for k, v in t.__dict__.items() if k not in _OWN_KEYS}


def _reduce_plain(t: torch.Tensor, protocol: Any) -> Any:
    func, args = torch.Tensor._reduce_ex_internal(t, protocol)
    state = _user_state(t)
    if not state:
        return func, args
    return torch._tensor._rebuild_from_type_v2, (func, torch.Tensor, args, state)


def _deepcopy_plain(t: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    if not t.is_leaf and not _alias_of_leaf(t):
        # The caller's tensor had autograd history: deepcopy refuses it unguarded, and so here.
        return torch.Tensor.__deepcopy__(t, memo)  # type: ignore[no-any-return]
    STATE.bypass += 1
    try:
        with disable_torch_dispatch():
            plain = torch.Tensor._make_subclass(torch.Tensor, t.detach(), t.requires_grad)
    finally:
        STATE.bypass -= 1
    # Through copy.deepcopy, which keeps ``plain`` alive in the memo: Tensor.__deepcopy__ alone
    # files the copy under id(plain), and once ``plain`` died that id could come back as
    # another tensor of the same deep copy, which would then be handed this copy.
    new: torch.Tensor = copy.deepcopy(plain, memo)
    state = _user_state(t)
    if state:
        new.__dict__.update(copy.deepcopy(state, memo))
    return new


def _alias_of_leaf(t: torch.Tensor) -> bool:
    """Whether ``t`` is an alias (``_Alias``) of a leaf that requires grad."""
    node = t.grad_fn
    if node is None or type(node).__name__ != "_AliasBackward":
        return False
    nexts = node.next_functions
    source = nexts[0][0] if nexts else None
    return source is not None and type(source).__name__ == "AccumulateGrad"


# The native backend's: the views of members made on this thread and not joined yet join
# their groups now (it joins them where membership is asked, not as they are made).
_flush_views: Optional[Callable[[], None]] = None


def install_view_flush(flush: Callable[[], None]) -> None:
    global _flush_views
    _flush_views = flush


def group_of(t: torch.Tensor) -> CowGroup | None:
    if _flush_views is not None:
        _flush_views()
    group: CowGroup | None = t.__dict__.get(GROUP_ATTR)
    return group


class _Alias(torch.autograd.Function):
    """Same storage, new TensorImpl, identity gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cls: Optional[type]) -> torch.Tensor:
        return _raw_alias(x, cls)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _raw_alias(x: torch.Tensor, cls: Optional[type] = None) -> torch.Tensor:
    # Past the Python dispatch key: these two ops are immutorch's own, and going through a
    # Python mode costs ~9 us each (measured), more than the rest of alias() together.
    with disable_torch_dispatch():
        out = torch.empty(0, dtype=x.dtype, device=x.device)
        if cls is not None:
            # Not as_subclass: that makes a view, and an autograd Function may not return one.
            out = torch.Tensor._make_subclass(cls, out)
        return out.set_(x.untyped_storage(), x.storage_offset(), x.size(), x.stride())


def can_alias(x: torch.Tensor) -> bool:
    storage = storage_of(x)
    return (
        storage is not None
        and x.layout is torch.strided
        and type(x) in PLAIN
        and not x.is_quantized
        and not x.is_neg()
        # A strided nested tensor has no single size/stride to set_ an alias with.
        and not x.is_nested
        # A functionalize wrapper's storage is bookkeeping, not memory: set_ onto it crashes.
        and not is_functional(x)
    )


def _copy(x: torch.Tensor, stats: CloneStats) -> torch.Tensor:
    """A private copy, where no alias over the same bytes exists: sparse, quantized, wrapper
    subclasses, functorch wrappers. Made in sight of the every-op mode, so that a block guard
    counts what the copy allocates as the block's own (under forward AD that includes the
    copy's tangent, which an in-place op on the copy then writes); the copy itself is marked
    private for the guards that are off the stack."""
    copy = x.clone()
    for storage in leaf_storages(copy):
        set_born(storage, PRIVATE_BORN)
    nbytes = x.numel() * x.element_size()
    stats.add(nbytes)
    TOTAL_STATS.add(nbytes)
    return copy


# The native backend's alias_for(x, stats): the alias of a plain tensor that requires no grad
# made in C++, a member of its group for the C++ side at once, adopted into the group here
# (adopt) only where one is needed: before a write the backend judges, and wherever Python
# asks a tensor's group (group_of). None where this thread is not served by the backend.
_native_alias: Optional[Callable[[torch.Tensor, CloneStats], Optional[torch.Tensor]]] = None


def install_native_alias(
    make: Callable[[torch.Tensor, CloneStats], Optional[torch.Tensor]],
) -> None:
    global _native_alias
    _native_alias = make


def adopt(t: torch.Tensor, stats: CloneStats) -> CowGroup:
    """``t``, an alias handed over for ``stats``' frame, joins the uncopied group of its
    storage (made now where there is none), which is returned."""
    storage = t.untyped_storage()
    key = (id(stats), storage._cdata)
    groups = _groups()
    group = groups.get(key)
    if group is None or group.copied:
        group = groups[key] = CowGroup(storage, stats)
    group.add(t)
    return group


def alias(x: torch.Tensor, stats: CloneStats, cls: Optional[type] = None) -> torch.Tensor:
    """Hand ``x`` across a boundary: a copy-on-write alias (of type ``cls``, the scoped
    backend's subclass, if given), or a copy where none can be made."""
    if tracing_now() or (type(x) not in PLAIN and is_traced(x)):
        # torch.export (strict=False) and make_fx record the ops the callee runs: an alias
        # made past the dispatcher would enter the program as a constant (the trace-time
        # input, baked in), and a copy up front as an aten.clone of the input where nothing
        # writes. The tensor crosses as it is; a write into it is refused (see _policy:
        # clone mode cannot isolate it).
        return x
    if not can_alias(x):
        return _copy(x, stats)
    if (
        _native_alias is not None
        and cls is None
        and type(x) is torch.Tensor
        and not x.requires_grad
        and not x.is_conj()
    ):
        made = _native_alias(x, stats)
        if made is not None:
            return made
    STATE.bypass += 1
    try:
        conj = x.is_conj()
        base = x.conj() if conj else x  # the raw memory, without the lazy conjugation bit
        if base.requires_grad:
            # Connected to the caller's graph even under no_grad, so a callee that turns grad
            # back on still sends gradients to the caller's tensor.
            with torch.enable_grad():
                out = _Alias.apply(base, cls)  # type: ignore[no-untyped-call]
        else:
            with torch.no_grad():
                out = _raw_alias(base, cls)
        group = adopt(out, stats)
        if conj:
            out = out.conj()
            group.add(out)
    finally:
        STATE.bypass -= 1
    return out  # type: ignore[no-any-return]


def shows_caller(alias: torch.Tensor, original: torch.Tensor) -> bool:
    """Whether the alias still shows exactly the caller's tensor: the same memory (not clone
    mode's private copy) and the same size, strides and offset (no metadata write such as
    ``unsqueeze_`` changed the alias alone)."""
    storage, mine = storage_of(alias), storage_of(original)
    return (
        storage is not None
        and mine is not None
        and storage._cdata == mine._cdata
        and alias.size() == original.size()
        and alias.stride() == original.stride()
        and alias.storage_offset() == original.storage_offset()
        and alias.dtype == original.dtype
    )


def back_to_caller(value: Any, originals: dict[int, torch.Tensor]) -> Any:
    """A callee's result with each alias handed over for a caller's tensor (``originals``: id
    of the alias -> the caller's tensor) that still shows exactly that tensor replaced by it:
    a callee that returns its argument gives the caller its own object back, as unguarded. An
    alias clone mode has copied stays the callee's private result."""

    def back(t: torch.Tensor) -> torch.Tensor:
        original = originals.get(id(t))
        return original if original is not None and shows_caller(t, original) else t

    return replace(value, back)
