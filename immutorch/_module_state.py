"""Module state for block guards: which storages are a module's parameters, buffers,
gradients, or a framework module's own buffers (DDP's gradient buckets, FSDP2's), found
without watching module calls.

A block guard (``guard()``) lets code write into module state from before the block: batch
norm's running statistics, gradients accumulated into, an optimizer zeroing them. Finding that
state by noting each module called in the block took a global module hook, and any global
forward hook sends every ``Module.__call__`` down torch's slow path (measured on a
TransformerEncoder forward: 2.5M of the 3.2M instructions a raise-mode block added). Here the
question is asked only where it matters, when a write into memory from before the block is
about to be refused, and is answered from:

- an index (storage -> where in which module it sits), checked against the module as it is
  now, so that a buffer replaced or a ``.data`` swapped never leaves a stale exemption;
- the modules on the interpreter stack at the write (their whole trees: scripted submodules
  run inside TorchScript, where nothing else sees them);
- every module in the process that registered state: torch's global *registration* hooks
  (``register_module_parameter_registration_hook`` and its siblings, which fire only when a
  module gains a parameter, buffer or submodule and cost nothing at a module call) keep a weak
  set of them, and one scan of the garbage collector's objects finds those made before
  immutorch was imported. The index is rebuilt from them at most once per block, at the
  block's first write that the index and the stack did not answer.

So module state is that of *every* live module, whether or not the block called it. The
buffers DDP and FSDP2 keep are read once, as a block starts (``add_framework_state``).
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules import module as _module_mod

from . import _arguments, _registry
from ._distributed import framework_state, is_framework
from ._storage import leaf_storages

# Where a storage sits: (the module, how it is held, the attribute name). Kinds: "p" a
# parameter, "g" a parameter's gradient, "b" a buffer.
_Place = tuple["weakref.ref[torch.nn.Module]", str, str]

_lock = threading.RLock()
_index: dict[int, list[_Place]] = {}
_known: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_scanned = False  # whether the collector's objects were searched for older modules
# Storages a rebuild found not to be state: cdata -> (a weak reference to the storage, which
# keeps its address from being reused while it lasts, and the generation). The generation
# moves at every registration, where a module may have gained them.
_not_state: dict[int, tuple[StorageWeakRef, int]] = {}
_generation = 0
# The modules on the stack whose trees were walked: id -> (the module, generation walked at).
_walked: dict[int, tuple[weakref.ref[torch.nn.Module], int]] = {}
_handles: list[Any] = []


def is_state(frame: _registry.Frame, cdata: int, t: Optional[torch.Tensor] = None) -> bool:
    """Whether storage ``cdata`` (written through ``t``) is module state now. ``frame`` is the
    block asking: it may rebuild the index once. Each module on the stack has its tree walked
    once per generation, not once per block: a clone-mode block asks about the caller's
    argument at every call, and walking the encoder's 55 modules again each time cost
    ~0.3 ms a forward (3%)."""
    with _lock:
        if _indexed(cdata):
            return True
        for module in _arguments.modules_on_stack():
            seen = _walked.get(id(module))
            if seen is not None and seen[1] == _generation and seen[0]() is module:
                continue
            _walked[id(module)] = (weakref.ref(module), _generation)
            _known.add(module)
            for sub in _modules_of(module):
                _index_module(sub)
        if _indexed(cdata):
            return True
        if _known_not_state(cdata):
            return False
        if not frame.state_rebuilt:
            frame.state_rebuilt = True
            _rebuild()
            if _indexed(cdata):
                return True
        if t is not None:
            _remember_not_state(cdata, t)
        return False


def _remember_not_state(cdata: int, t: torch.Tensor) -> None:
    for storage in leaf_storages(t):
        if storage._cdata == cdata:
            if len(_not_state) >= 1024:  # drop the entries of storages gone since
                for key in [k for k, (ref, _) in _not_state.items() if ref.expired()]:
                    del _not_state[key]
            _not_state[cdata] = (StorageWeakRef(storage), _generation)
            return


def _known_not_state(cdata: int) -> bool:
    """Whether a rebuild since the last registration found ``cdata`` not to be state, and the
    storage is still the one it found (its weak reference has not expired, so the address was
    not reused). Asked again each time, a caller's tensor handed to a clone-mode block would
    rebuild the index at every call (~2 us a module tensor in the process). The storage, not
    the tensor asked through: a caller's input reaches a module as a new view at each call
    (``x.transpose(1, 2)``), and a reference to the view died with it (measured: a rebuild,
    ~0.3 ms, at every encoder forward)."""
    seen = _not_state.get(cdata)
    if seen is None:
        return False
    ref, generation = seen
    if generation == _generation and not ref.expired():
        return True
    del _not_state[cdata]
    return False


def _indexed(cdata: int) -> bool:
    places = _index.get(cdata)
    if not places:
        return False
    for place in places:
        if cdata in _storages_at(place):
            return True
    del _index[cdata]  # all stale: the module is gone or holds other memory there now
    return False


def _storages_at(place: _Place) -> set[int]:
    ref, kind, name = place
    module = ref()
    if module is None:
        return set()
    tensors: list[Optional[torch.Tensor]]
    if kind == "b":
        tensors = [_entry(module._buffers, name)]
    else:
        p = _entry(module._parameters, name)
        tensors = [p if kind == "p" else _grad(p)]
    return {cdata for t in tensors if t is not None for cdata in _cdatas(t)}


def _entry(table: Any, name: str) -> Optional[torch.Tensor]:
    # A dict, or a scripted module's OrderedDictWrapper (no .get).
    try:
        value = table[name] if name in table else None  # noqa: SIM401
    except Exception:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _grad(p: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Only a leaf (or a tensor that retains its gradient) has one: asking any other warns.
    if p is None or not (p.is_leaf or p.retains_grad):
        return None
    return p.grad


def _cdatas(t: torch.Tensor) -> list[int]:
    return [storage._cdata for storage in leaf_storages(t)]


def _modules_of(module: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        return list(module.modules())
    except Exception:  # a tree that cannot be walked: the module's own state at least
        return [module]


def _index_module(module: torch.nn.Module) -> None:
    ref = weakref.ref(module)
    try:
        params = list(getattr(module, "_parameters", {}).items())
        buffers = list(getattr(module, "_buffers", {}).items())
    except Exception:
        return
    places: list[tuple[Optional[torch.Tensor], _Place]] = []
    for name, p in params:
        if isinstance(p, torch.Tensor):
            places.append((p, (ref, "p", name)))
            places.append((_grad(p), (ref, "g", name)))
    for name, b in buffers:
        if isinstance(b, torch.Tensor):
            places.append((b, (ref, "b", name)))
    for t, place in places:
        if t is None:
            continue
        for cdata in _cdatas(t):
            entries = _index.setdefault(cdata, [])
            if place not in entries:
                entries.append(place)


def _rebuild() -> None:
    global _scanned
    if not _scanned:
        _scanned = True
        module_type = torch.nn.Module
        for obj in gc.get_objects():
            # type(), not isinstance: that asks __class__, which some objects answer with a
            # deprecation warning (torch.distributed.reduce_op).
            if issubclass(type(obj), module_type):
                _known.add(obj)
    _index.clear()
    for module in list(_known):
        scripted = isinstance(module, torch.jit.ScriptModule)
        for sub in _modules_of(module) if scripted else [module]:
            _index_module(sub)


def add_framework_state(frame: _registry.Frame) -> None:
    """At a block's start: exempt the buffers DDP and FSDP2 modules keep (gradient buckets,
    all-gather buffers), held by the frame for its life. Read here, not at a write: a write
    into a bucket happens inside DDP's reducer, whose lock reading the buckets takes again.
    Only with a process group up, the only way such a module exists (~0.2 us a module)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    with _lock:
        modules = list(_known)
    for module in modules:
        if is_framework(module):
            for t in framework_state(module):
                frame.allow_tensor(t)


def _registered(module: torch.nn.Module, _name: str, value: Any) -> None:
    global _generation
    # Under the lock: another thread's is_state may be reading the caches (a registration runs
    # on whichever thread builds a module).
    with _lock:
        _generation += 1
        _walked.clear()  # every entry is stale now: let go of the dead modules' ids too
        _not_state.clear()
        _known.add(module)
        if isinstance(value, torch.nn.Module):
            _known.add(value)


def _install() -> None:
    """The registration hooks, for the life of the process: they run when a module gains a
    parameter, buffer or submodule (at construction, mostly), never at a module call."""
    for register in (
        getattr(_module_mod, "register_module_parameter_registration_hook", None),
        getattr(_module_mod, "register_module_buffer_registration_hook", None),
        getattr(_module_mod, "register_module_module_registration_hook", None),
    ):
        if register is not None:
            _handles.append(register(_registered))


_install()
_registry.install_state_lookup(is_state)
