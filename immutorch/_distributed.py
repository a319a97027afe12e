"""Distributed training: the memory DistributedDataParallel and FSDP2 own.

DDP's reducer copies each gradient into a flat bucket allocated when the DDP module was built
(``aten::copy_``, and ``aten::mul`` with ``out=`` to divide by the world size), all-reduces the
bucket and copies it back, during ``backward``. A block guard around a training step sees
writes into memory from before the block; the buckets are the framework's state, like
parameters and gradients, and are exempt the same way.

Python sees the buckets nowhere, but ``Reducer._get_zeros_like_grad_buckets()`` calls
``zeros_like`` on each of them: a dispatch mode that records that op's argument, and answers
with an empty tensor instead of allocating, finds them without a copy.

FSDP2 (``fully_shard``) all-gathers each step into buffers it keeps between steps (their
storage is resized to nothing after resharding and grown again) and copies them out with
``fsdp::split_with_sizes_copy``: the tensors its ``FSDPParam`` objects hold are its state.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ZEROS_LIKE = torch.ops.aten.zeros_like.default


def is_ddp(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "DistributedDataParallel" and cls.__module__.startswith("torch.")


def is_fsdp2(module: torch.nn.Module) -> bool:
    # fully_shard swaps the module's class for a subclass of FSDPModule, which defines it.
    return callable(getattr(type(module), "_get_fsdp_state", None))


# Asked at every module call inside a guard: per class (an instance lookup goes through
# Module.__getattr__, which raises and catches for a missing name, ~1.5 us a call).
_framework_classes: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def is_framework(module: torch.nn.Module) -> bool:
    """A wrapper that owns memory beyond its parameters and buffers."""
    cls = type(module)
    known = _framework_classes.get(cls)
    if known is None:
        known = _framework_classes[cls] = is_ddp(module) or is_fsdp2(module)
    return known


def framework_state(module: torch.nn.Module) -> list[torch.Tensor]:
    """The memory a DDP or FSDP2 module owns beyond its parameters and buffers."""
    if is_ddp(module):
        return ddp_buckets(module)
    if is_fsdp2(module):
        return fsdp2_buffers(module)
    return []


def fsdp2_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor an FSDP2 module's parameter group keeps (all-gather outputs, unsharded
    and sharded parameter data); [] where the layout is not the one known (torch 2.13)."""
    try:
        group = module._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
        params = list(group.fsdp_params) if group is not None else []
    except (AttributeError, RuntimeError):
        return []
    found: list[torch.Tensor] = []
    for fsdp_param in params:
        for value in vars(fsdp_param).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, (list, tuple)):
                found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


class _BucketFinder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[torch.Tensor] = []

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is _ZEROS_LIKE and args and isinstance(args[0], torch.Tensor):
            self.found.append(args[0])
            return torch.empty(0, dtype=args[0].dtype, device=args[0].device)
        return func(*args, **(kwargs or {}))


def ddp_buckets(module: torch.nn.Module) -> list[torch.Tensor]:
    """The gradient buckets of a DDP module's reducer; [] where they cannot be found (no
    reducer yet, or a torch whose reducer lacks the method)."""
    reducer = getattr(module, "reducer", None)
    get = getattr(reducer, "_get_zeros_like_grad_buckets", None)
    if get is None:
        return []
    finder = _BucketFinder()
    try:
        with finder, torch.no_grad():
            get()
    except RuntimeError:
        return []
    return finder.found
