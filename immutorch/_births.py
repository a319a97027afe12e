"""When memory was born, for block guards: the storages made outside the dispatcher.

A block guard (``guard()`` with no tensors) refuses writes into memory that existed before it
and allows writes into memory the block made. A StorageImpl carries no creation stamp and torch
tells Python nothing when one is made, so birth is *evidence* collected where memory comes
into being, and a storage without evidence counts as older than the block:

- dispatched ops that return new memory (the every-op mode tags their outputs, ``_judge``);
- the ways Python code makes storages without such an op, wrapped here (the module functions
  while any block guard is active in the process, the storage classes' entry points from the
  first block on, see ``_install``), acting only on a thread that has one: storage constructors
  (``copy.deepcopy`` and ``storage.clone()`` reach them), ``torch.load`` / ``pickle.loads``
  (the archive reader), shared memory received from other processes (DataLoader workers,
  ``torch.multiprocessing``), memory-mapped files, and the wrappers of foreign memory
  (``from_numpy``, ``frombuffer``, ``from_dlpack``, ``as_tensor``, ``asarray``).

A wrapper of foreign memory makes a *new* StorageImpl over bytes that may already belong to a
tensor (``torch.from_numpy(x.numpy())``, ``from_dlpack(x)``). Such a storage inherits the birth
of the tensor whose bytes it shows: the source object is followed (an ndarray's ``.base`` chain,
a memoryview's ``.obj``) to the torch tensor at its end. Bytes no tensor owns (an ndarray that
owns its data, ``bytes``, ``bytearray``, ``array.array``) are not tensor memory, and a block's
wrap of them is the block's own. Any other owner (a DLPack capsule, another framework's array,
a ``mmap``, a file mapped shared) may show a tensor's bytes from before the block: no evidence,
so it stays outside memory.

Soundness rests on one rule: evidence only ever makes memory *younger* when the bytes are
provably new or provably a block tensor's. A path not wrapped here (a name imported before the
wrap, a C extension making its own storages) leaves its storages untagged, which refuses a
write into fresh memory; it never lets a write into older memory through.
"""

from __future__ import annotations

import array
import functools
import sys
import threading
from typing import Any, Callable

import torch

from . import _registry
from ._storage import born_epoch, forget_births, keep_birth, set_born, storage_of

_lock = threading.Lock()
_users = 0
# (owner, attribute name, original value or _ABSENT) for each wrap in place.
_saved: list[tuple[Any, str, Any]] = []
_ABSENT = object()
_NEW = object()  # an owner whose bytes are no tensor's
# Sources that are data, never memory: a tensor made from them is always new.
_PYTHON_DATA = (list, tuple, int, float, complex, bool)


def acquire() -> None:
    """One more block guard in the process: wrap the entry points if it is the first."""
    global _users
    with _lock:
        _users += 1
        if _users == 1:
            _install()


def release() -> None:
    """One block guard less: put every entry point back when none is left."""
    global _users
    with _lock:
        _users -= 1
        if _users <= 0:
            _users = 0
            _uninstall()
            forget_births()


def installed() -> bool:
    """Whether the wrappers swapped in for the blocks' duration are in place."""
    return bool(_saved)


def _blocks_here() -> bool:
    return bool(_registry.STATE.blocks)


def _tag_new(storage: Any) -> None:
    if storage is not None and born_epoch(storage) == 0:
        set_born(storage, _registry.current_epoch)


def _inherit(storage: Any, source: Any) -> None:
    """``storage`` shows bytes owned by ``source``'s owner: give it that owner's birth."""
    if storage is None or born_epoch(storage) != 0:
        return
    owner = _owner(source)
    if owner is _NEW:
        set_born(storage, _registry.current_epoch)
    elif isinstance(owner, torch.Tensor):
        mine = storage_of(owner)
        born = born_epoch(mine) if mine is not None else 0
        if born:
            set_born(storage, born)


def _owner(obj: Any) -> Any:
    """The torch tensor whose bytes ``obj`` shows, _NEW for bytes no tensor owns, or None
    where the owner cannot be known."""
    np = sys.modules.get("numpy")
    for _ in range(64):
        if isinstance(obj, torch.Tensor):
            return obj
        if isinstance(obj, (bytes, bytearray, array.array)):
            return _NEW
        if isinstance(obj, memoryview):
            obj = obj.obj
            continue
        if np is not None and isinstance(obj, np.ndarray):
            if obj.base is None:
                return _NEW if obj.flags.owndata else None
            obj = obj.base
            continue
        # numpy's stride tricks wrap their source in a small object with ``base`` and
        # ``__array_interface__``; follow that, nothing else.
        if hasattr(type(obj), "__array_interface__") or "__array_interface__" in getattr(
            obj, "__dict__", {}
        ):
            base = getattr(obj, "base", None)
            if base is not None:
                obj = base
                continue
        return None
    return None


def _result_storage(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return storage_of(out)
    if isinstance(out, torch.UntypedStorage):
        return out
    inner = getattr(out, "_untyped_storage", None)  # a TypedStorage
    return inner if isinstance(inner, torch.UntypedStorage) else None


# -- the wrappers ------------------------------------------------------------------------------
def _wrap_foreign(original: Callable[..., Any]) -> Callable[..., Any]:
    """A function that makes a tensor from an object (argument 0) whose bytes it may show."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if _blocks_here():
            storage = _result_storage(out)
            if storage is not None and born_epoch(storage) == 0:
                source = args[0] if args else next(iter(kwargs.values()), None)
                if storage.resizable():
                    # Allocated by this call (a copy) when the source is Python data or bytes
                    # no tensor owns. Never otherwise: ``torch.asarray(x.untyped_storage())``
                    # returns x's own storage, undated, and must stay so; a copy of a tensor
                    # was dated by the op that made it.
                    if isinstance(source, _PYTHON_DATA) or _owner(source) is _NEW:
                        _tag_new(storage)
                else:
                    _inherit(storage, source)
        return out

    return wrapper


def _wrap_new(original: Callable[..., Any]) -> Any:
    """A class method of the storage type whose result is new memory (``original`` is bound
    to the class already)."""

    def wrapper(cls: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if _blocks_here():
            _tag_new(_result_storage(out))
        return out

    functools.update_wrapper(wrapper, original, assigned=("__name__", "__qualname__", "__doc__"))
    return classmethod(wrapper)


def _storage_new(cls: Any, *args: Any, **kwargs: Any) -> Any:
    out = torch._C.StorageBase.__new__(cls, *args, **kwargs)
    # ``cdata=`` wraps a StorageImpl that already exists; every other form allocates.
    if "cdata" not in kwargs and _blocks_here():
        _tag_new(out)
    return out


def _from_file(original: Callable[..., Any]) -> Any:
    def from_file(cls: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        shared = args[1] if len(args) > 1 else kwargs.get("shared", False)
        # A private mapping is this storage's own; a shared one shows the same pages as every
        # other shared mapping of the file, maybe a tensor's from before the block.
        if not shared and _blocks_here():
            _tag_new(out)
        return out

    return classmethod(from_file)


def _storage_getitem(original: Callable[..., Any]) -> Callable[..., Any]:
    def __getitem__(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if isinstance(out, torch.UntypedStorage) and _blocks_here():
            born = born_epoch(self)  # a slice shows its storage's bytes
            if born and born_epoch(out) == 0:
                set_born(out, born)
        return out

    return __getitem__


def _storage_resize(original: Callable[..., Any]) -> Callable[..., Any]:
    def resize_(self: Any, *args: Any, **kwargs: Any) -> Any:
        # New bytes under an old storage, made without a dispatched op: the storage keeps its
        # birth, on any thread (an allocation stamps new bytes for every block in the process).
        if not _users:
            return original(self, *args, **kwargs)
        born = born_epoch(self)
        out = original(self, *args, **kwargs)
        keep_birth(self, born)
        return out

    return resize_


def _record_reader(original: Callable[..., Any]) -> Callable[..., Any]:
    def get_storage_from_record(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)  # bytes read from the archive: new memory
        if _blocks_here():
            _tag_new(_result_storage(out))
        return out

    return get_storage_from_record


_planned: list[tuple[Any, str, Callable[[Any], Any]]] = []


def _plan() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """(owner, attribute, make the wrapper from the current value), worked out once."""
    if not _planned:
        _planned.extend(_make_plan())
    return _planned


def _make_plan() -> list[tuple[Any, str, Callable[[Any], Any]]]:
    untyped = torch.UntypedStorage
    plan: list[tuple[Any, str, Callable[[Any], Any]]] = [
        (untyped, "__new__", lambda _original: staticmethod(_storage_new)),
        (untyped, "__getitem__", _storage_getitem),
        (untyped, "from_file", _from_file),
        (untyped, "resize_", _storage_resize),
    ]
    for name in ("_new_shared", "_new_shared_fd_cpu", "_new_shared_filename_cpu"):
        if hasattr(untyped, name):
            plan.append((untyped, name, _wrap_new))
    reader = getattr(torch._C, "PyTorchFileReader", None)
    if reader is not None and hasattr(reader, "get_storage_from_record"):
        plan.append((reader, "get_storage_from_record", _record_reader))
    import torch.utils.dlpack as dlpack

    for owner, name in (
        (torch, "from_numpy"),
        (torch, "frombuffer"),
        (torch, "from_dlpack"),
        (dlpack, "from_dlpack"),
        (torch, "as_tensor"),
        (torch, "asarray"),
    ):
        if hasattr(owner, name):
            plan.append((owner, name, _wrap_foreign))
    return plan


class _Wrap:
    """One entry point's wrap, made once: a guard entered in a loop pays the swap and two dict
    lookups that check nobody rebound the entry point since (~3 us for all of them), not the
    wrapper's making (~90 us) or a walk of the owner's MRO."""

    __slots__ = ("between", "dicts", "make", "name", "own", "owner", "raw", "where", "wrapper")

    def __init__(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        self.owner, self.name, self.make = owner, name, make
        self.wrapper: Any = None
        self.raw: Any = None
        self.refresh()

    def refresh(self) -> None:
        """Find the entry point as stored now, and wrap it anew if it changed."""
        owner, name = self.owner, self.name
        # What to put back: the owner's own attribute, or nothing where it was inherited.
        self.own = owner.__dict__.get(name, _ABSENT)
        mro = owner.__mro__ if isinstance(owner, type) else (owner,)
        where = next((k for k in mro if name in k.__dict__), owner)
        self.between = mro[1 : mro.index(where)] if where is not owner else ()
        raw = where.__dict__[name] if name in where.__dict__ else getattr(owner, name)
        if self.wrapper is None or raw is not self.raw:  # first time, or rebound since
            self.wrapper = self.make(getattr(owner, name))
        self.where, self.raw = where, raw
        # A class's __dict__ is a new read-only view at each access, of the same live dict.
        self.dicts = (owner.__dict__, where.__dict__)

    def current(self) -> bool:
        name = self.name
        own, where = self.dicts
        return (
            own.get(name, _ABSENT) is self.own
            and where.get(name, _ABSENT) is self.raw
            and not (self.between and any(name in k.__dict__ for k in self.between))
        )


_wraps: list[_Wrap] = []


# Where a wrap is a class attribute (the storage classes' entry points), it is swapped in at the
# first block and kept: each change to a class invalidates the attribute caches of it and every
# subclass, and from CPython 3.13 a class changed 1,000 times is never cached again, which two
# changes a block would reach after a few hundred blocks. A kept wrapper does nothing but call
# what it wraps while no block is active in the process (~0.3 us on calls that are rare:
# storage construction from Python, slicing, resizing, shared memory, torch.load's records).
# id(wrapper) -> the wrapper, for every one made: one of them in place is immutorch's, kept.
_kept: dict[int, Any] = {}


def _install() -> None:
    if not _wraps:
        _wraps.extend(_Wrap(owner, name, make) for owner, name, make in _plan())
    for wrap in _wraps:
        keep = isinstance(wrap.owner, type)
        if keep:
            present = wrap.owner.__dict__.get(wrap.name, _ABSENT)
            if _kept.get(id(present)) is present:
                continue  # one of immutorch's, in place since an earlier block
        if not wrap.current():
            wrap.refresh()
        try:
            setattr(wrap.owner, wrap.name, wrap.wrapper)
        except (AttributeError, TypeError):  # an owner that refuses attributes: not wrapped
            continue
        if keep:
            _kept[id(wrap.wrapper)] = wrap.wrapper
        else:
            _saved.append((wrap.owner, wrap.name, wrap.own))


def _uninstall() -> None:
    while _saved:
        owner, name, own = _saved.pop()
        if own is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, own)
