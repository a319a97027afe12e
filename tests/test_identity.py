"""Identity: protection follows the memory (the storage and its bytes), not the tensor object."""

from __future__ import annotations

import gc
from typing import Callable

import numpy as np
import pytest
import torch
import torch.utils.dlpack
from corpus import Snapshot
from torch import Tensor

import immutorch
from immutorch import ImmutableTensorError, guard, immutable_inputs

ALIASES: dict[str, Callable[[Tensor], Tensor]] = {
    "itself": lambda x: x,
    "slice": lambda x: x[1:3],
    "step_slice": lambda x: x[:, ::2],
    "select": lambda x: x[2],
    "transpose": lambda x: x.t(),
    "view": lambda x: x.view(-1),
    "reshape_view": lambda x: x.reshape(5, 4),
    "unsqueeze": lambda x: x.unsqueeze(0),
    "expand": lambda x: x[0:1].expand(3, 5),
    "diagonal": lambda x: x.diagonal(),
    "unbind": lambda x: x.unbind(1)[3],
    "data": lambda x: x.data,
    "detach": lambda x: x.detach(),
    "as_strided": lambda x: x.as_strided((3,), (6,), 2),
    "view_dtype": lambda x: x.view(torch.int32),
    "as_complex": lambda x: torch.view_as_complex(x.view(10, 2)),
    "from_numpy": lambda x: torch.from_numpy(x.numpy()),
    "from_numpy_slice": lambda x: torch.from_numpy(x.numpy()[1:, 2:]),
    "dlpack": lambda x: torch.utils.dlpack.from_dlpack(x),
    "dlpack_of_view": lambda x: torch.utils.dlpack.from_dlpack(x[1:].t()),
    "numpy_frombuffer": lambda x: torch.frombuffer(memoryview(x.numpy()), dtype=torch.float32),
}


def _write(t: Tensor) -> None:
    t.fill_(0) if t.is_complex() else t.add_(1)


@pytest.mark.parametrize("when", ["before", "inside"])
@pytest.mark.parametrize("how", list(ALIASES))
def test_aliases_are_protected(how: str, when: str) -> None:
    """Every way to reach x's bytes, made before the guard or inside it, is protected."""
    x = torch.randn(4, 5)
    snapshot = Snapshot.of(x)
    alias = ALIASES[how](x) if when == "before" else None
    with pytest.raises(ImmutableTensorError, match="guard argument 0"), guard(x):
        target = alias if alias is not None else ALIASES[how](x)
        _write(target)
    assert snapshot.matches(x)


@pytest.mark.parametrize("scope", ["all", "arguments"])
@pytest.mark.parametrize("how", ["itself", "slice", "transpose", "data", "from_numpy", "dlpack"])
def test_aliases_of_a_decorated_argument(how: str, scope: str) -> None:
    """An alias made before the call, used inside it: another reference to the argument's
    memory. The every-op mode refuses the write; the scoped backend, by design, watches only
    the argument it handed over and the views made of it, so the write lands."""
    x = torch.randn(4, 5)
    snapshot = Snapshot.of(x)
    alias = ALIASES[how](x)

    @immutable_inputs(scope=scope)  # type: ignore[call-overload]
    def f(x: Tensor) -> None:
        _write(alias)

    if scope == "arguments":
        f(x)
        assert not snapshot.matches(x)
        return
    with pytest.raises(ImmutableTensorError, match="`x`"):
        f(x)
    assert snapshot.matches(x)


def test_protecting_a_view_protects_the_memory_it_shares() -> None:
    x = torch.zeros(4, 5)
    with guard(x[0]):
        with pytest.raises(ImmutableTensorError):
            x[3].add_(1)  # the same storage: the guard keys on memory, not on the slice
        torch.zeros(3).add_(1)
    assert torch.equal(x, torch.zeros(4, 5))


@pytest.mark.parametrize("mode", ["raise", "warn", "clone"])
def test_unrelated_tensors_are_never_flagged(mode: str) -> None:
    x = torch.randn(4, 5)
    others = [
        torch.randn(4, 5),
        x.clone(),
        x.contiguous().clone(),
        x.t().contiguous(),
        x.to(torch.float64),
        torch.from_numpy(x.numpy().copy()),
        torch.from_numpy(np.zeros(20, dtype=np.float32)),
        torch.empty_like(x),
        x.new_zeros(3),
        torch.tensor(x.tolist()),
    ]
    with guard(x, mode=mode):  # type: ignore[arg-type]
        for o in others:
            o.add_(1)
            o.zero_()
        fresh = torch.empty(4, 5)
        fresh.copy_(x)
        fresh.mul_(2)


def test_storages_freed_and_reused_are_not_mistaken_for_protected() -> None:
    x = torch.randn(256)
    with guard(x):
        for _ in range(300):
            y = torch.empty(256)
            y.fill_(1.0)
            del y
        gc.collect()
        z = torch.empty(256)
        z.add_(1)


def test_a_protected_tensor_deleted_inside_the_guard_keeps_its_memory_pinned() -> None:
    # The frame pins the protected storage: its address cannot be handed to a new tensor while
    # the guard is active, so a new tensor can never be mistaken for it.
    x = torch.randn(512)
    address = x.untyped_storage().data_ptr()
    with guard(x):
        del x
        gc.collect()
        for _ in range(100):
            y = torch.empty(512)
            assert y.untyped_storage().data_ptr() != address
            y.fill_(2.0)


def test_protection_does_not_outlive_the_guard() -> None:
    x = torch.randn(64)
    with guard(x):
        pass
    del x
    gc.collect()
    for _ in range(100):
        y = torch.empty(64)
        with guard(torch.zeros(1)):
            y.add_(1)  # maybe x's old address: no guard protects it now


def test_readonly_marks_die_with_the_memory() -> None:
    for _ in range(50):
        x = torch.randn(128)
        immutorch.readonly(x)
        assert immutorch.is_readonly(x[3:])
        del x
        y = torch.empty(128)
        assert not immutorch.is_readonly(y)
        with guard(torch.zeros(1)):
            y.add_(1)


def test_readonly_covers_numpy_and_views_and_writable_lifts_it() -> None:
    w = torch.ones(6)
    immutorch.readonly(w)
    with guard(mode="raise"):
        with pytest.raises(ImmutableTensorError, match="marked read-only"):
            w[2:].mul_(2)
        with pytest.raises(ImmutableTensorError, match="marked read-only"):
            w.t().zero_()
    immutorch.writable(w[1:])
    assert not immutorch.is_readonly(w)
    with guard():
        pass
    assert torch.equal(w, torch.ones(6))


def test_block_guard_memory_born_inside_survives_storage_object_churn() -> None:
    with guard():
        y = torch.zeros(8)
        for _ in range(3):
            gc.collect()
            y.view(2, 4)[1].add_(1)  # the block's own memory, reached through new objects
        y[2:].mul_(3)
    assert torch.equal(y, torch.tensor([0.0] * 4 + [9.0] * 4))
