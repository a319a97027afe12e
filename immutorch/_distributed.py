"""Distributed training: the memory DistributedDataParallel owns.

DDP's reducer copies each gradient into a flat bucket allocated when the DDP module was built
(``aten::copy_``, and ``aten::mul`` with ``out=`` to divide by the world size), all-reduces the
bucket and copies it back, during ``backward``. A block guard around a training step sees
writes into memory from before the block; the buckets are the framework's state, like
parameters and gradients, and are exempt the same way.

Python sees the buckets nowhere, but ``Reducer._get_zeros_like_grad_buckets()`` calls
``zeros_like`` on each of them: a dispatch mode that records that op's argument, and answers
with an empty tensor instead of allocating, finds them without a copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ZEROS_LIKE = torch.ops.aten.zeros_like.default


def is_ddp(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "DistributedDataParallel" and cls.__module__.startswith("torch.")


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
