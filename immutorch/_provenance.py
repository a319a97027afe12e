"""What a refused tensor from outside a block is, for the message.

A block guard (``guard()`` with no tensors) protects every tensor that existed before it, so a
refusal can name no argument. When a write is refused, the places a training step keeps its
memory are searched for the written storage: the modules in call and those the block has
seen, and the modules, optimizers and DDP wrappers held in the user's frames. The search runs
only when a message is built, never on the hot path.
"""

from __future__ import annotations

from types import FrameType
from typing import Any, NamedTuple, Optional

import torch

from . import _arguments
from ._distributed import framework_state, is_ddp, is_framework
from ._registry import STATE
from ._storage import storage_of

# How far up the stack to look for the user's modules and optimizers.
_MAX_FRAMES = 40


class Provenance(NamedTuple):
    label: str  # what the tensor is: "model.0.weight.grad (a gradient)"
    allow: str  # how to exempt it: "allow=model"


def find(t: torch.Tensor, user: Optional[FrameType]) -> Optional[Provenance]:
    """Name the memory ``t`` writes into, or None where nothing known holds it."""
    storage = storage_of(t)
    if storage is None:
        return None
    target = storage._cdata
    for name, obj in _candidates(user):
        try:
            found = _search(name, obj, target)
        except Exception:  # a module half built (copy.deepcopy) or otherwise broken: skip it
            continue
        if found is not None:
            return found
    return None


def search(obj: Any, target: int) -> Optional[Provenance]:
    """Name the memory ``target`` (a storage's ``_cdata``) inside one module or optimizer."""
    return _search(None, obj, target)


def _candidates(user: Optional[FrameType]) -> list[tuple[Optional[str], Any]]:
    """(variable name or None, module or optimizer), the user's named ones first."""
    out: list[tuple[Optional[str], Any]] = []
    seen: set[int] = set()

    def add(name: Optional[str], obj: Any) -> None:
        if id(obj) not in seen:
            seen.add(id(obj))
            out.append((name, obj))

    frame = user
    depth = 0
    while frame is not None and depth < _MAX_FRAMES:
        for name, value in list(frame.f_locals.items()):
            try:
                wanted = isinstance(value, (torch.nn.Module, torch.optim.Optimizer))
            except Exception:  # an object whose __class__ raises
                continue
            if wanted:
                add(name, value)
        frame = frame.f_back
        depth += 1
    for module in STATE.modules:
        add(None, module)
    for local in _arguments.module_calls_on_stack():
        add(None, local["self"])
    return out


def _same(t: Optional[torch.Tensor], target: int) -> bool:
    if t is None:
        return False
    storage = storage_of(t)
    return storage is not None and storage._cdata == target


def _search(name: Optional[str], obj: Any, target: int) -> Optional[Provenance]:
    if isinstance(obj, torch.optim.Optimizer):
        return _search_optimizer(name, obj, target)
    module: torch.nn.Module = obj
    owner = name or type(module).__name__
    allow = f"allow={name}" if name else f"allow=<the {type(module).__name__} module>"
    for path, p in module.named_parameters():
        if _same(p, target):
            return Provenance(f"`{owner}.{path}` (a parameter)", allow)
        if _same(p.grad, target):
            return Provenance(f"`{owner}.{path}.grad` (a gradient)", allow)
    for path, b in module.named_buffers():
        if _same(b, target):
            return Provenance(f"`{owner}.{path}` (a buffer)", allow)
    for path, sub in module.named_modules():
        if is_framework(sub):
            for buffer in framework_state(sub):
                if _same(buffer, target):
                    where = f"{owner}.{path}" if path else owner
                    kind = "DistributedDataParallel" if is_ddp(sub) else "FSDP"
                    return Provenance(
                        f"a communication buffer of {kind} `{where}` (framework state; "
                        "immutorch exempts it unless the block protects module state)",
                        allow,
                    )
    return None


def _search_optimizer(
    name: Optional[str], opt: torch.optim.Optimizer, target: int
) -> Optional[Provenance]:
    owner = name or type(opt).__name__
    allow = f"allow={name}" if name else f"allow=<the {type(opt).__name__} optimizer>"
    index = 0
    for g, group in enumerate(opt.param_groups):
        for p in group["params"]:
            if _same(p, target):
                return Provenance(f"parameter {index} of optimizer `{owner}`", allow)
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and _same(value, target):
                    return Provenance(
                        f"the state `{key}` of optimizer `{owner}` ({type(opt).__name__}, "
                        f"param group {g}, parameter {index})",
                        allow,
                    )
            index += 1
    return None
