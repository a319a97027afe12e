"""Storage identity: every view, ``.data``, ``.detach()`` and slice shares one StorageImpl.

Protection is keyed on the storage, never on the tensor object. PyTorch keeps one Python
object per live StorageImpl, so attributes set on ``t.untyped_storage()`` live exactly as long
as the memory does: immutorch uses that for lasting marks (read-only) and for recording which
storages a guarded block allocated itself, without holding any reference to user tensors.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Callable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ._compat import TORCH_FLOOR, functorch_unwrapped, is_functorch_wrapped

# Attribute names set on UntypedStorage objects.
READONLY_ATTR = "_immutorch_readonly"
BORN_ATTR = "_immutorch_born"
# A private copy made by clone mode: never protected.
PRIVATE_BORN = sys.maxsize

# On a scoped backend's alias: the caller's tensor object it stands for. A metadata write
# (unsqueeze_, t_, set_ ...) into the alias is judged as one into that tensor.
STANDS_FOR_ATTR = "_immutorch_stands_for"

# Tensor types whose memory is their own storage, judged directly: plain tensors, parameters,
# and the scoped backend's ``Protected`` aliases (which add themselves here).
PLAIN: set[type] = {torch.Tensor, torch.nn.Parameter}


# Births and read-only marks known outside Python: the native backend records births in C++
# and reads read-only marks there (``_backends.native`` installs both hooks).
_native_born: Optional[Callable[[Any], int]] = None
_native_keep: Optional[Callable[[Any, int], None]] = None
_readonly_hook: Optional[Callable[[Any, bool], None]] = None
# Every storage marked read-only, weakly, so that a hook installed later learns earlier marks.
_marked: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


# Births by StorageImpl address too, beside the attribute: torch 2.4 hands out a new Python
# object for a storage that some paths reach anew (``Tensor.new(TypedStorage)`` in DataLoader's
# collate, shared memory received from another process), and the attribute is not on it. A
# record is believed only while the storage still shows the bytes it was born with (a storage
# over older bytes at a reused address shows other bytes); the table is emptied when the
# process's last block guard ends (``_births.release``), so an address is reused meanwhile only
# by a storage made after the one recorded.
#
# A private copy (PRIVATE_BORN, whose writes are free) is also made outside any block, by
# named clone-mode guards, so its record can outlive it until some block ends: a storage made
# later at the same address over the same bytes (the allocator hands both back for a tensor of
# the same size) would pass for private, and a write into it go ahead unisolated (seen once in
# the suite: a caller's tensor written in place in a clone block). Its record holds a weak
# reference to the storage, which keeps the address from being reused while it lasts and tells
# when the storage is gone.
_born_at: dict[int, tuple[int, int, Optional[StorageWeakRef]]] = {}


def set_born(storage: Any, epoch: int) -> None:
    """Record that ``storage`` was born at ``epoch`` (or is a private copy: PRIVATE_BORN)."""
    setattr(storage, BORN_ATTR, epoch)
    data = _data_ptr(storage)
    if data is not None:
        ref = None
        if epoch == PRIVATE_BORN:
            ref = StorageWeakRef(storage)
            if len(_born_at) >= 4096:  # records of copies gone since: drop them
                for key in [k for k, r in _born_at.items() if r[2] is not None and r[2].expired()]:
                    del _born_at[key]
        _born_at[storage._cdata] = (epoch, data, ref)


def recorded_birth(cdata: int, data: Optional[int]) -> int:
    """The birth recorded for the storage at ``cdata`` showing bytes ``data`` (0: none, or a
    record of a storage gone since)."""
    record = _born_at.get(cdata)
    if record is None or record[1] != data:
        return 0
    if record[2] is not None and record[2].expired():
        del _born_at[cdata]
        return 0
    return record[0]


def _data_ptr(storage: Any) -> Optional[int]:
    """The storage's bytes, or None where it has none to show (functionalize's and nested
    tensors' bookkeeping storages raise on the question; a meta storage has no bytes, and a
    fake tensor's, on meta, warns at the question that it is "almost definitely a bug": asked
    by a block tagging what FakeTensorMode made, torch.export's non-strict tracing included).
    A meta storage's birth is on its Python object, which torch keeps while the storage
    lives."""
    if storage.device.type == "meta":
        return None
    try:
        return int(storage.data_ptr())
    except RuntimeError:
        return None


def forget_births() -> None:
    _born_at.clear()


def born_epoch(storage: Any) -> int:
    """The epoch at which ``storage`` was born inside a block (0: before any, or unknown)."""
    born: int = getattr(storage, BORN_ATTR, 0)
    if not born and _born_at:
        born = recorded_birth(storage._cdata, _data_ptr(storage))
    if _native_born is not None:
        native = _native_born(storage)
        if native > born:
            return native
    return born


def keep_birth(storage: Any, born: int) -> None:
    """``storage``'s bytes were replaced (``UntypedStorage.resize_``): it keeps its birth
    ``born``, whatever the native backend's allocator stamped its new bytes with. (A birth this
    module tags is the storage's own attribute, which a resize keeps.)"""
    if _native_keep is not None:
        _native_keep(storage, born)


def note_readonly(storage: Any, marked: bool) -> None:
    """Tell a native backend that ``storage`` gained or lost its read-only mark."""
    if marked:
        _marked[id(storage)] = storage
    else:
        _marked.pop(id(storage), None)
    if _readonly_hook is not None:
        _readonly_hook(storage, marked)


def install_native_hooks(
    born: Callable[[Any], int],
    readonly: Callable[[Any, bool], None],
    keep: Optional[Callable[[Any, int], None]] = None,
) -> None:
    global _native_born, _readonly_hook, _native_keep
    _native_born, _readonly_hook, _native_keep = born, readonly, keep
    for storage in list(_marked.values()):
        readonly(storage, True)


def storage_of(t: torch.Tensor) -> Optional[torch.UntypedStorage]:
    """The tensor's storage, or None for layouts without one (sparse, nested, some subclasses)."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def byte_range(storage: torch.UntypedStorage) -> Optional[tuple[int, int]]:
    """[start, end) of the storage's bytes, or None where there are no real bytes (meta, fake)."""
    try:
        start = storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    if start == 0:
        return None
    return start, start + storage.nbytes()


def memory_leaves(t: torch.Tensor, visit: Callable[[torch.Tensor], None]) -> None:
    """Visit the dense tensors that hold ``t``'s memory.

    Sparse tensors have no storage of their own: their values and indices do. Wrapper
    subclasses hold their data in inner tensors, reached with ``__tensor_flatten__``. The
    wrappers torch.func makes (vmap's BatchedTensor, grad's TensorWrapper) have no storage
    either: they are unwrapped level by level down to the tensor that holds the memory, which
    is also the tensor a write reaches the dispatch mode and the scoped subclass as.
    """
    if is_functorch_wrapped(t):
        memory_leaves(functorch_unwrapped(t), visit)
        return
    layout = t.layout
    if layout is torch.strided:
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t) is not torch.Tensor and _is_wrapper(t):
            names, _ = flatten(t)
            for name in names:
                inner = getattr(t, name)
                if isinstance(inner, torch.Tensor):
                    memory_leaves(inner, visit)
            return
        visit(t)
    elif layout is torch.sparse_coo:
        visit(t._values())
        visit(t._indices())
    elif layout in (torch.sparse_csr, torch.sparse_bsr):
        visit(t.values())
        visit(t.crow_indices())
        visit(t.col_indices())
    elif layout in (torch.sparse_csc, torch.sparse_bsc):
        visit(t.values())
        visit(t.ccol_indices())
        visit(t.row_indices())
    else:  # jagged and other layouts: the storage if it has one
        if storage_of(t) is not None:
            visit(t)


def _is_wrapper(t: torch.Tensor) -> bool:
    storage = storage_of(t)
    if storage is None:
        return True
    try:
        data_ptr = storage.data_ptr()
    except RuntimeError:
        # _make_wrapper_subclass tensors have a storage whose data pointer cannot be read
        # ("invalid python storage"): that is exactly a wrapper.
        return True
    return data_ptr == 0 and t.device.type != "meta"


def tensor_leaves(t: torch.Tensor) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    memory_leaves(t, out.append)
    return out


def leaf_storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages that hold ``t``'s memory (its own, or its leaves' for a wrapper)."""
    found = []
    for leaf in tensor_leaves(t):
        storage = storage_of(leaf)
        if storage is not None:
            found.append(storage)
    return found


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    """``t.shape`` for reports. A strided nested tensor has ragged sizes and raises on
    ``.shape``; it reports its outer size, so a write into one is refused, not a crash."""
    try:
        return tuple(t.shape)
    except RuntimeError:
        return (t.size(0),) if t.is_nested else ()


def describe(t: torch.Tensor) -> str:
    dtype = str(t.dtype).replace("torch.", "")
    return f"a {dtype} tensor of shape {list(shape_of(t))}" + (
        f" on {t.device}" if t.device.type != "cpu" else ""
    )


def get_attr(storage: Any, name: str) -> Any:
    return getattr(storage, name, None)


def _storage_objects_persist() -> bool:
    """Read-only marks and birth records live on storage objects; that needs PyTorch to keep
    one Python object per live storage (PyObject preservation, not in torch 2.1)."""
    t = torch.empty(1)
    t.untyped_storage()._immutorch_probe = True  # type: ignore[attr-defined]
    return bool(getattr(t[0:].untyped_storage(), "_immutorch_probe", False))


if not _storage_objects_persist():  # pragma: no cover - only on unsupported torch
    raise ImportError(
        f"immutorch needs torch >= {'.'.join(map(str, TORCH_FLOOR))} (Python storage objects "
        f"that live as long as their memory); this is torch {torch.__version__}. Upgrade torch."
    )
