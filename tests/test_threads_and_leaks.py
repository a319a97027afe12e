"""Guards are per thread; many guarded calls leave no references and no registry entries."""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from typing import Any, Callable

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from immutorch import ImmutableTensorError, _clone, guard, immutable_inputs
from immutorch._registry import STATE

pytestmark = pytest.mark.both_backends(births=True)


def _in_thread(fn: Callable[[], Any]) -> Any:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def test_a_write_in_another_thread_is_not_flagged() -> None:
    x = torch.zeros(3)
    with guard(x), guard():
        _in_thread(lambda: x.add_(1))
        with pytest.raises(ImmutableTensorError):
            x.add_(1)
    assert torch.equal(x, torch.ones(3))


def test_guards_in_two_threads_are_independent() -> None:
    tensors = [torch.zeros(4), torch.zeros(4)]
    barrier = threading.Barrier(2, timeout=30)
    outcome: dict[int, list[str]] = {0: [], 1: []}

    def worker(i: int) -> None:
        mine, theirs = tensors[i], tensors[1 - i]
        mode = "raise" if i == 0 else "warn"
        with guard(mine, mode=mode):  # type: ignore[arg-type]
            barrier.wait()  # both guards are active now
            theirs[i].add_(1)  # the other thread's guard does not cover this thread
            outcome[i].append("wrote theirs")
            try:
                if i == 0:
                    mine.add_(1)
                else:
                    with pytest.warns(Warning, match="guard argument 0"):
                        mine.add_(1)
                    outcome[i].append("warned")
            except ImmutableTensorError:
                outcome[i].append("refused")
            barrier.wait()
        assert not STATE.frames

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outcome == {0: ["wrote theirs", "refused"], 1: ["wrote theirs", "warned"]}
    assert torch.equal(tensors[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(tensors[1], torch.tensor([2.0, 1.0, 1.0, 1.0]))  # warn: it went ahead


def test_decorated_function_called_from_many_threads() -> None:
    @immutable_inputs(mode="clone")
    def normalize(x: Tensor) -> Tensor:
        x -= x.mean()
        return x

    inputs = [torch.arange(8.0) + i for i in range(8)]
    results: list[Tensor] = [torch.empty(0)] * 8

    def work(i: int) -> None:
        for _ in range(50):
            results[i] = normalize(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(8):
        assert torch.equal(inputs[i], torch.arange(8.0) + i)
        assert torch.equal(results[i], torch.arange(8.0) - 3.5)


def test_autograd_backward_inside_a_guard_sees_the_guard() -> None:
    # The autograd engine's threads inherit the dispatch mode: a backward hook writing into a
    # protected tensor is still caught.
    x = torch.zeros(3)
    w = torch.ones(3, requires_grad=True)

    def hook(grad: Tensor) -> Tensor:
        x.add_(grad)
        return grad

    w.register_hook(hook)
    with guard(x), pytest.raises(ImmutableTensorError):
        (w * 2).sum().backward()
    assert torch.equal(x, torch.zeros(3))


def _assert_registry_empty() -> None:
    assert not STATE.frames and not STATE.blocks and not STATE.boundaries
    assert not STATE.by_storage and not STATE.by_object and not STATE.ranged
    assert not STATE.modules and STATE.clone_frames == 0 and STATE.bypass == 0
    assert not _get_current_dispatch_mode_stack()


@pytest.mark.parametrize("mode", ["raise", "clone"])
def test_many_calls_leave_no_references(mode: str) -> None:
    @immutable_inputs(mode=mode)  # type: ignore[arg-type]
    def f(x: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return x * 2 + batch["y"][0]

    @immutable_inputs(mode=mode)  # type: ignore[arg-type]
    def writes(x: Tensor) -> Tensor:
        x.add_(1)
        return x

    x = torch.ones(4)
    y = torch.ones(2, 4)
    x_ref, y_ref = weakref.ref(x), weakref.ref(y)
    out = None
    for _ in range(20_000):
        out = f(x, {"y": y})
    for _ in range(200):
        with contextlib.suppress(ImmutableTensorError):
            out = writes(x)
    del x, y, out
    gc.collect()
    assert x_ref() is None and y_ref() is None, "a guarded call kept its input alive"
    _assert_registry_empty()
    assert not len(_clone._groups())


def test_many_guard_blocks_leave_nothing_behind() -> None:
    x = torch.ones(4)
    x_ref = weakref.ref(x)
    for _ in range(5_000):
        with guard(x), guard():
            x.sum()
        with contextlib.suppress(ImmutableTensorError), guard(x):
            x.add_(1)
    del x
    gc.collect()
    assert x_ref() is None
    _assert_registry_empty()


def test_clone_aliases_do_not_outlive_their_callers() -> None:
    @immutable_inputs(mode="clone")
    def keep_view(x: Tensor) -> Tensor:
        return x[1:]

    x = torch.ones(4)
    views = [keep_view(x) for _ in range(100)]
    assert len(_clone._groups()) >= 1
    del views
    gc.collect()
    assert not len(_clone._groups())


def test_a_module_class_made_at_run_time_does_not_outlive_its_use() -> None:
    """A module class defined in a function (a test, a factory) dies with its last instance,
    though a guard's boundary work read its ``forward`` parameters (labels, by class)."""

    def make() -> tuple[torch.nn.Module, weakref.ref[type]]:
        class Local(torch.nn.Module):
            def forward(self, xs: list[Tensor]) -> Tensor:
                return xs[0] * 2  # a container: the call goes on record, labels read

        return Local(), weakref.ref(Local)

    module, cls_ref = make()
    x = torch.ones(3)
    with guard(mode="clone"):
        module([x])
    del module
    gc.collect()
    assert cls_ref() is None
