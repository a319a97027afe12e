"""CUDA: the corpus on device tensors, device copies, side streams. Skipped without a GPU.

``IMMUTORCH_TEST_DEVICE=cpu`` runs the device-generic tests on the CPU, to check the tests
themselves on a machine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from corpus import BY_NAME, Pattern, Snapshot, any_op, assert_same, ids, run_oracle

import immutorch
from immutorch import ImmutableTensorError, guard, immutable_inputs

DEVICE = os.environ.get("IMMUTORCH_TEST_DEVICE", "cuda")
needs_device = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = needs_device

# Patterns that make no CPU tensors of their own, so they run unchanged on any device.
SUBSET: list[Pattern] = [
    BY_NAME[name]
    for name in (
        "slice_assign",
        "per_row_normalize",
        "mask_assign",
        "index_assign",
        "iadd",
        "out_into_input",
        "data_sub",
        "detach_mul",
        "view_chain_copy",
        "reshape_then_write",
        "as_strided_write",
        "foreach_add",
        "relu_inplace",
        "masked_fill",
        "clamp",
        "copy_from",
        "zero",
        "under_no_grad",
        "under_inference_mode",
        "dlpack_alias_write",
        "returns_written_input",
        "fill_one_column",
        "unsqueeze_",
        "t_",
        "set_other_storage",
        "out_of_place",
        "write_into_clone",
        "copy_from_protected",
        "reads_through_views",
        "inplace_on_intermediate",
        "where",
    )
]


@pytest.mark.parametrize("mode", ["raise", "clone"])
@pytest.mark.parametrize("p", SUBSET, ids=ids(SUBSET))
def test_corpus_on_device(p: Pattern, mode: str) -> None:
    x, extra = p.make(DEVICE)
    oracle = run_oracle(p, x, extra)
    before = Snapshot.of(x)
    f = immutable_inputs(mode=mode)(p.fn)  # type: ignore[arg-type]
    refuses = p.writes and (mode == "raise" or not p.isolable)
    if refuses:
        with pytest.raises(ImmutableTensorError, match=any_op(p.ops)):
            f(x, *extra)
    else:
        assert_same(f(x, *extra), oracle.result)
    assert before.matches(x)


def test_a_device_copy_is_not_flagged() -> None:
    x = torch.randn(4, 5)
    with guard(x):
        y = x.to(DEVICE, copy=True)
        y.add_(1)
        y.to("cpu", copy=True).mul_(2)  # a copy back: new memory too
        z = x.to(DEVICE, non_blocking=True) if DEVICE == "cuda" else x.clone()
        z.zero_()
    assert torch.equal(x.to(DEVICE) + 1, y)


def test_to_the_same_device_is_the_same_tensor() -> None:
    # The SpeechBrain bug: .to(device) on a tensor already there returns the tensor itself.
    x = torch.randn(4, 5, device=DEVICE)
    with pytest.raises(ImmutableTensorError), guard(x):
        x.to(DEVICE)[0].fill_(0)


def test_clone_mode_copies_on_the_device() -> None:
    x = torch.randn(8, device=DEVICE)
    before = immutorch.clone_stats()
    out = immutable_inputs(mode="clone")(lambda t: t.mul_(2))(x)
    assert out.device == x.device
    assert torch.equal(out, x * 2)
    assert immutorch.clone_stats().bytes_copied - before.bytes_copied == 8 * 4


@needs_cuda
def test_a_write_on_a_side_stream_is_caught() -> None:
    x = torch.zeros(1024, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with guard(x), torch.cuda.stream(side):
        with pytest.raises(ImmutableTensorError):
            x.add_(1)
        x.record_stream(side)  # stream bookkeeping is not a write
        y = torch.empty_like(x)
        y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(x.cpu(), torch.zeros(1024))


@needs_cuda
def test_pinned_host_memory_and_its_device_copy() -> None:
    x = torch.randn(16).pin_memory()
    with guard(x):
        x.to("cuda", non_blocking=True).add_(1)
        with pytest.raises(ImmutableTensorError):
            x.add_(1)
