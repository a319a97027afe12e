"""The native backend's blocks date memory by allocation where no accelerator is: CPU's and the
meta device's allocators are wrapped, and stamp what they allocate while a block is active, so
a block needs only the writes key (no call per op). Each test runs with births dated by
allocation and by op (what a machine with an accelerator gets), and both must rule alike:
the block's own memory writable, memory from before it refused, the data untouched.

test_births.py, test_module_state.py and test_threads_and_leaks.py run whole through both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from immutorch import ImmutableTensorError, MutationWarning, guard
from immutorch._backends import native
from immutorch._registry import STATE
from immutorch._storage import born_epoch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["allocation", "op"])
def births(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if not native.available():
        pytest.skip(f"native backend unavailable: {native.unavailable_reason()}")
    if not native.only_cpu():
        pytest.skip("an accelerator is present: blocks date births by op only")
    monkeypatch.setenv("IMMUTORCH_BACKEND", "native")
    by_allocation = request.param == "allocation"
    assert native.set_births_by_allocation(by_allocation) == by_allocation
    try:
        yield request.param
    finally:
        native.set_births_by_allocation(True)


def _key(sees: str) -> str:
    return next(key for key, what in native._keys or [] if what == sees)


def test_a_block_is_served_on_the_writes_key_where_births_are_dated_by_allocation(
    births: str,
) -> None:
    assert native._module.births_by_allocation() == (births == "allocation")
    x = torch.arange(4.0)
    with guard():
        expected = "writes" if births == "allocation" else "writes and fresh outputs"
        assert native._module.serving() == _key(expected)
        y = x * 2
        y.add_(1)  # the block's own
        with pytest.raises(ImmutableTensorError, match="outside the block"):
            x.add_(1)
    assert torch.equal(x, torch.arange(4.0))
    assert torch.equal(y, torch.arange(4.0) * 2 + 1)


def test_cpu_and_meta_allocators_are_wrapped(births: str) -> None:
    assert {"cpu", "meta"} <= set(native._module.wrapped_devices())
    assert isinstance(torch.empty(1), torch.Tensor)  # still allocates as before


def test_empty_tensors_made_in_the_block_are_its_own(births: str) -> None:
    z = torch.empty(0)
    with guard():
        e = torch.empty(0)
        # Nothing the block can see changed: no elements, no bytes, a null data pointer.
        assert e.data_ptr() == 0 and e.untyped_storage().nbytes() == 0 and e.numel() == 0
        torch.arange(6.0, out=e)  # resizes, then writes: the block's own
        r = torch.arange(3.0)  # arange makes an empty tensor and resizes it
        r.mul_(2)
        with pytest.raises(ImmutableTensorError, match="outside the block"):
            torch.arange(6.0, out=z)
    assert z.shape == (0,) and z.untyped_storage().nbytes() == 0
    assert torch.equal(e, torch.arange(6.0)) and torch.equal(r, torch.arange(3.0) * 2)


def test_a_nested_block_refuses_what_the_outer_block_made_before_it(births: str) -> None:
    with guard():
        t = torch.ones(3)
        e = torch.empty(0)
        m = torch.empty(2, device="meta")
        with guard():
            fresh = torch.ones(3)
            fresh.add_(1)
            for older in (t, m):
                with pytest.raises(ImmutableTensorError, match="outside the block"):
                    older.add_(1)
            with pytest.raises(ImmutableTensorError, match="outside the block"):
                torch.arange(2.0, out=e)
        t.add_(1)  # the outer block's own again
        torch.arange(2.0, out=e)
        m.add_(1)
    assert torch.equal(t, torch.full((3,), 2.0)) and torch.equal(e, torch.arange(2.0))


def test_many_allocations_in_one_block_are_all_its_own(births: str) -> None:
    # More stamps than the address table starts with (it grows), some freed and their
    # addresses reused; then a second block, to which all of them are from before.
    before = torch.zeros(64)
    kept: list[torch.Tensor] = []
    with guard(mode="raise"):
        for i in range(6000):
            t = torch.empty(8 + i % 50)
            if i % 3:
                kept.append(t)
        for t in kept:
            t.fill_(1.0)
        with pytest.raises(ImmutableTensorError):
            before.add_(1)
    assert torch.equal(before, torch.zeros(64))
    with guard(mode="raise"):
        torch.empty(8).fill_(2.0)
        for t in kept[::500]:
            with pytest.raises(ImmutableTensorError):
                t.add_(1)
    assert all(torch.equal(t, torch.ones_like(t)) for t in kept)
    # More than the table keeps between blocks (it is let go when the last block ends).
    with guard(mode="raise"):
        many = [torch.empty(2) for _ in range(40000)]
        many[-1].fill_(1.0)
    with guard(mode="raise"):
        torch.empty(2).fill_(1.0)
        with pytest.raises(ImmutableTensorError):
            many[0].fill_(1.0)


def test_meta_tensors_are_dated_like_cpu_ones(births: str) -> None:
    m = torch.empty(3, device="meta")
    with guard():
        fresh = torch.empty(3, device="meta")
        fresh.add_(1)
        (m * 2).add_(1)
        with pytest.raises(ImmutableTensorError, match="outside the block"):
            m.add_(1)
    assert m.device.type == "meta"


def test_memory_made_on_another_thread_before_the_block_stays_refused(births: str) -> None:
    made: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: made.append(torch.ones(3)))
    worker.start()
    worker.join()
    with guard():
        with pytest.raises(ImmutableTensorError, match="outside the block"):
            made[0].add_(1)
    assert torch.equal(made[0], torch.ones(3))


def test_a_storage_resized_in_the_block_is_still_from_before_it(births: str) -> None:
    # Its new bytes are allocated in the block, but the storage (the caller's) is older.
    s = torch.ones(2)
    with guard():
        with pytest.raises(ImmutableTensorError):
            s.resize_(1000)
    assert s.shape == (2,) and torch.equal(s, torch.ones(2))


def test_an_older_storage_given_new_bytes_in_the_block_is_still_older(births: str) -> None:
    # The allocator stamps the new bytes as new; the storage (the caller's) keeps its birth,
    # whether they came by UntypedStorage.resize_ (no dispatched op), by a resize or a write
    # with out= that a warn-mode block let through, or by share_memory_ (a mapping, at an
    # address the allocator may have stamped before): each later write still warns.
    replacements = {
        "UntypedStorage.resize_": lambda x: x.untyped_storage().resize_(8000),
        "resize_": lambda x: x.resize_(5000),
        "out= resizing": lambda x: torch.cat([torch.zeros(1000), torch.zeros(1000)], out=x),
        "share_memory_": lambda x: x.share_memory_(),
    }
    for name, replace in replacements.items():
        x = torch.ones(1000)
        with guard(mode="warn"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                replace(x)
            with pytest.warns(MutationWarning, match="outside the block"):
                x.add_(1)
        assert x.untyped_storage().nbytes() >= 4000, name


def test_a_storage_emptied_and_grown_again_keeps_its_birth(births: str) -> None:
    # FSDP2's way with the all-gather buffers it makes in a step: UntypedStorage.resize_(0)
    # after each use, resize_(n) before the next. No bytes in between to carry a stamp.
    def empty_and_grow(t: torch.Tensor) -> None:
        t.untyped_storage().resize_(0)
        t.untyped_storage().resize_(4 * t.numel())

    with guard(mode="raise"):
        mine = torch.zeros(1000)
        empty_and_grow(mine)
        empty_and_grow(mine)
        mine.fill_(2.0)  # the block's own memory: no refusal
    assert torch.equal(mine, torch.full((1000,), 2.0))

    # The caller's storage, emptied before the block or inside it, is the caller's still.
    for inside in (False, True):
        theirs = torch.zeros(1000)
        if not inside:
            theirs.untyped_storage().resize_(0)
        with guard(mode="raise"):
            if inside:
                theirs.untyped_storage().resize_(0)
            theirs.untyped_storage().resize_(4000)
            with pytest.raises(ImmutableTensorError, match="outside the block"):
                theirs.fill_(2.0)


def _tensors(value: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, out)
    return out


def test_every_fresh_output_in_op_db_is_the_blocks_own(births: str) -> None:
    """The oracle for allocation dating: whatever op made a CPU tensor in the block, the block
    may write it. One sample of each OpInfo (float32, CPU), its inputs made before the block."""
    pytest.importorskip("expecttest")  # op_db imports it
    from torch.testing._internal.common_methods_invocations import op_db

    checked = 0
    undated: list[str] = []
    for info in op_db:
        try:
            samples = info.sample_inputs("cpu", torch.float32, False)
            sample = next(iter(samples))
        except Exception:  # a sample op_db cannot make here is not ours to test
            continue
        inputs = _tensors([sample.input, sample.args, sample.kwargs], [])
        theirs = {t.untyped_storage()._cdata for t in inputs if t.layout == torch.strided}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with guard(mode="warn"):
                    start = STATE.blocks[-1].start
                    out = info.op(sample.input, *sample.args, **sample.kwargs)
                    for t in _tensors(out, []):
                        if t.layout != torch.strided or t.device.type != "cpu":
                            continue
                        storage = t.untyped_storage()
                        if storage._cdata in theirs:
                            continue  # a view of an input, or the input itself
                        checked += 1
                        if born_epoch(storage) < start:
                            undated.append(info.name)
            except ImmutableTensorError:
                raise
            except Exception:  # the op's own error on this sample
                continue
    assert checked > 500, checked
    assert undated == [], undated


def test_a_process_without_an_accelerator_dates_births_by_allocation_from_its_first_block() -> None:
    # Turned on as the backend loads, before any block; turned off, blocks are back on the
    # births key and rule alike.
    code = """
        import os, torch, immutorch
        from immutorch._backends import native
        os.environ["IMMUTORCH_BACKEND"] = "native"
        assert native.available()
        key = {s: k for k, s in native._keys}
        x = torch.ones(2)
        with immutorch.guard():
            assert native._module.serving() == key["writes"], native._module.serving()
        native.set_births_by_allocation(False)
        with immutorch.guard():
            assert native._module.serving() == key["writes and fresh outputs"]
            y = x + 1
            y.add_(1)
            try:
                x.add_(1)
                raise SystemExit("missed")
            except immutorch.ImmutableTensorError:
                pass
        print("ok")
    """
    if not native.available():
        pytest.skip(f"native backend unavailable: {native.unavailable_reason()}")
    if not native.only_cpu():
        pytest.skip("an accelerator is present: blocks date births by op only")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
