"""A failure inside immutorch's own machinery leaves nothing behind on the thread.

Each test injects a failure (monkeypatch) at one step: alias creation, copy-on-write
materialization, a module boundary, mode entry, a compiled call's boundary. The error must
reach the caller, and afterwards the thread must hold no frame, boundary, module, hook
reference or dispatch mode, and a new guard must work as usual. An internal TypeError must
never turn into NotImplemented (``x += 1`` silently becoming ``x = x + 1``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

import immutorch
from immutorch import (
    ImmutableTensorError,
    _arguments,
    _boundaries,
    _clone,
    _compiled,
    _module_state,
    guard,
)
from immutorch import immutable_inputs as immutable_inputs
from immutorch._backends import mode as _mode
from immutorch._backends import native as _native
from immutorch._backends.native import NativeHandle
from immutorch._registry import STATE

pytestmark = pytest.mark.both_backends


class Injected(RuntimeError):
    pass


def _fail(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected failure")


def assert_nothing_left() -> None:
    assert STATE.frames == []
    assert STATE.blocks == []
    assert STATE.clone_frames == 0
    assert STATE.modules == []
    assert STATE.boundaries == []
    assert STATE.watchers == []
    assert STATE.bypass == 0
    assert STATE.mode_handle is None
    assert not _get_current_dispatch_mode_stack()
    assert _boundaries._users == 0
    # And the next guard works as usual, in each mode.
    x = torch.zeros(3)
    with pytest.raises(ImmutableTensorError), guard(x):
        x.add_(1)
    with guard(mode="clone"):
        torch.nn.ReLU(inplace=True)(x - 1)
        out = torch.nn.Sequential(torch.nn.ReLU(inplace=True))(x)
    assert torch.equal(x, torch.zeros(3)) and out is not x


@pytest.fixture(autouse=True)
def _clean_before_and_after() -> Any:
    assert not STATE.frames
    yield
    assert_nothing_left()


# -- alias creation ---------------------------------------------------------------------------
def test_alias_failure_in_a_decorated_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_clone, "_raw_alias", _fail)

    @immutable_inputs(mode="clone")
    def f(x: Tensor) -> Tensor:
        return x.mul_(2)

    x = torch.ones(3)
    with pytest.raises(Injected):
        f(x)
    assert torch.equal(x, torch.ones(3))
    monkeypatch.undo()


def test_alias_failure_at_a_module_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the alias is made: in Python, or by the native backend (_native_alias).
    monkeypatch.setattr(_clone, "_raw_alias", _fail)
    if _clone._native_alias is not None:
        monkeypatch.setattr(_clone, "_native_alias", _fail)
    x = torch.ones(3)
    with pytest.raises(Injected), guard(x, mode="clone"):
        torch.nn.ReLU(inplace=True)(x)
    assert torch.equal(x, torch.ones(3))
    monkeypatch.undo()


# -- copy-on-write materialization ------------------------------------------------------------
def test_materialize_failure_propagates_and_is_not_notimplemented(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On 2.5 a TypeError here made ``x += 1`` fall back to ``x = x + 1`` and return normally."""

    def wrong_signature(t: Tensor, version: int) -> None:
        raise TypeError("incompatible function arguments (injected)")

    monkeypatch.setattr(_clone, "set_version_counter", wrong_signature)
    reached: list[str] = []

    @immutable_inputs(mode="clone")
    def f(x: Tensor) -> Tensor:
        x += 1
        reached.append("after the write")
        return x

    x = torch.ones(3)
    with pytest.raises(
        RuntimeError,
        match=r"internal error in check: TypeError",
    ) as info:
        f(x)
    assert isinstance(info.value.__cause__, TypeError)
    assert reached == []
    assert torch.equal(x, torch.ones(3))
    monkeypatch.undo()


@pytest.mark.parametrize(("scope", "where"), [("all", "join_view"), ("arguments", "_rewrap")])
def test_a_failure_after_the_op_is_not_notimplemented(
    monkeypatch: pytest.MonkeyPatch, scope: str, where: str
) -> None:
    """After the op has written, a NotImplemented would make ``x += 1`` add a second time."""

    real_add = _clone.CowGroup.add

    def add_fails_for_views(group: _clone.CowGroup, t: Tensor) -> None:
        if group.members:  # the alias itself joins first, at the boundary
            raise TypeError("injected")
        real_add(group, t)

    monkeypatch.setattr(_clone.CowGroup, "add", add_fails_for_views)

    @immutable_inputs(mode="clone", scope=scope)  # type: ignore[call-overload]
    def f(x: Tensor) -> Tensor:
        y = x[0:]  # a view of the alias: joins its group (after the op ran)
        y += 1
        return y

    x = torch.ones(3)
    with pytest.raises(RuntimeError, match=rf"internal error in {where}: TypeError"):
        f(x)
    assert torch.equal(x, torch.ones(3))
    monkeypatch.undo()


def test_materialize_failure_midway_leaves_every_member_on_the_original(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = _clone.set_version_counter
    calls: list[int] = []

    def fail_second(t: Tensor, version: int) -> None:
        calls.append(version)
        if len(calls) == 2:
            raise Injected("injected failure")
        real(t, version)

    monkeypatch.setattr(_clone, "set_version_counter", fail_second)
    seen: dict[str, int] = {}

    @immutable_inputs(mode="clone")
    def f(x: Tensor) -> Tensor:
        view = x[1:]
        try:
            view.add_(1)
        finally:
            seen["alias"] = x.untyped_storage().data_ptr()
            seen["view"] = view.untyped_storage().data_ptr()
        return x

    x = torch.ones(3)
    with pytest.raises(Injected):
        f(x)
    assert seen == {"alias": x.data_ptr(), "view": x.data_ptr()}
    assert torch.equal(x, torch.ones(3))
    monkeypatch.undo()


# -- module boundaries ------------------------------------------------------------------------
class _Sums(torch.nn.Module):
    """Takes its tensors in a list: a container, which the hand-over rebuilds in Python with
    the call on record (the native shell hands over top-level tensors itself, off the record)."""

    def forward(self, xs: list[Tensor]) -> Tensor:
        return sum(xs, torch.zeros(()))


def test_boundary_failure_before_it_is_on_record(monkeypatch: pytest.MonkeyPatch) -> None:
    # Clone mode with an argument from outside: the boundary goes on record (without one to
    # hand over, a module call is only noted).
    monkeypatch.setattr(_arguments, "forward_param_names", _fail)
    x = torch.ones(3)
    with pytest.raises(Injected), guard(mode="clone"):
        _Sums()([x])
    monkeypatch.undo()


def test_boundary_failure_after_it_is_on_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_boundaries, "_replace_arguments", _fail)
    x = torch.ones(3)
    with pytest.raises(Injected), guard(x, mode="clone"):
        torch.nn.Sequential(_Sums())([x])
    monkeypatch.undo()


@pytest.mark.parametrize("named", [True, False])
def test_a_failing_hand_over_of_a_plain_argument_leaves_nothing(
    named: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The alias of a top-level tensor argument fails to be made (in C++'s hand-over where the
    # native backend serves, in Python's boundary work otherwise): the error propagates, and
    # the caller's tensor and the thread's record are as before the call.
    monkeypatch.setattr(_boundaries, "alias", _fail)
    x = torch.ones(3)
    with pytest.raises(Injected), guard(*((x,) if named else ()), mode="clone"):
        torch.nn.ReLU()(x)
    monkeypatch.undo()
    assert STATE.modules == [] and STATE.boundaries == [] and STATE.frames == []
    assert torch.equal(x, torch.ones(3))


def test_a_failure_looking_up_module_state_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A block looks module state up at a write into memory from before it, before the write.
    monkeypatch.setattr(_module_state, "_rebuild", _fail)
    x = torch.ones(3)
    with pytest.raises(Injected), guard():
        x.add_(1)
    monkeypatch.undo()
    assert torch.equal(x, torch.ones(3))


def test_a_watch_predicate_that_raises() -> None:
    def predicate(module: torch.nn.Module) -> bool:
        raise Injected("injected failure")

    with _boundaries.watch_modules(predicate):
        with pytest.raises(Injected):
            torch.nn.ReLU()(torch.ones(3))
        assert STATE.modules == [] and STATE.boundaries == [] and STATE.frames == []


def test_a_watch_frame_that_fails_to_enter(monkeypatch: pytest.MonkeyPatch) -> None:
    with _boundaries.watch_modules(lambda m: True):
        monkeypatch.setattr(STATE, "push", _fail)
        with pytest.raises(Injected):
            torch.nn.ReLU()(torch.ones(3))
        monkeypatch.undo()
        assert STATE.modules == [] and STATE.boundaries == [] and STATE.frames == []


# -- mode entry -------------------------------------------------------------------------------
def test_mode_entry_failure_in_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_boundaries, "acquire_hooks", _fail)
    with pytest.raises(Injected), guard(mode="clone"):  # clone mode hooks module calls
        pass
    monkeypatch.undo()


def test_mode_entry_failure_in_the_dispatch_mode(
    monkeypatch: pytest.MonkeyPatch, every_op_backend: str
) -> None:
    handle = NativeHandle if every_op_backend == "native" else _mode.ImmutorchMode
    monkeypatch.setattr(handle, "__enter__", _fail)
    x = torch.ones(3)
    with pytest.raises(Injected), guard(x):
        pass
    monkeypatch.undo()


def test_mode_entry_failure_in_an_inner_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(3)
    with guard(x):
        monkeypatch.setattr(STATE, "push", _fail)
        with pytest.raises(Injected), guard(mode="clone"):
            pass
        monkeypatch.undo()
        assert len(STATE.frames) == 1
        with pytest.raises(ImmutableTensorError):
            x.add_(1)


# -- a compiled call's boundary ---------------------------------------------------------------
def test_compiled_boundary_failure_puts_the_mode_back(
    monkeypatch: pytest.MonkeyPatch, every_op_backend: str
) -> None:
    def fake_compiled(x: Tensor) -> Tensor:
        return x * 2

    fake_compiled._torchdynamo_orig_callable = fake_compiled  # type: ignore[attr-defined]
    f = immutorch.immutable_inputs(fake_compiled)
    monkeypatch.setattr(_compiled, "dispatch_mode_flags_match_stack", _fail)
    x = torch.ones(3)
    with guard(torch.zeros(1)):
        if every_op_backend == "native":
            # No Python mode to pop, so nothing that can fail: the key stays on throughout.
            assert torch.equal(f(x), x * 2)
            assert isinstance(STATE.mode_handle, NativeHandle) and _native.enabled()
        else:
            with pytest.raises(Injected):
                f(x)
            assert isinstance(_get_current_dispatch_mode_stack()[-1], _mode.ImmutorchMode)
        assert STATE.bypass == 0
    monkeypatch.undo()


@pytest.mark.parametrize("scope", ["all", "arguments"])
def test_a_refusal_leaves_no_reference_cycle(scope: str) -> None:
    # What the failing code held must be freed as soon as the caller drops the error, without
    # the cyclic collector: torch 2.9's non-reentrant checkpoint keeps its saved-tensor hooks
    # pushed for as long as its generator's frame lives.
    import gc
    import weakref

    held: list[weakref.ref[Tensor]] = []

    def callee(t: Tensor) -> None:
        local = torch.ones(2)  # only this frame holds it
        held.append(weakref.ref(local))
        t.add_(1)

    x = torch.zeros(3)
    guarded = immutable_inputs(scope=scope)(callee)  # type: ignore[arg-type]
    gc.disable()
    try:
        # The first refusal in a process may import lazily (a module whose own import caught
        # an ImportError keeps that cycle, and the frames under it, until a collection).
        for _ in range(2):
            held.clear()
            try:
                guarded(x)
            except ImmutableTensorError:
                pass
            else:
                pytest.fail("the write was not refused")
        assert held[0]() is None, "the failing frame outlived its error"
    finally:
        gc.enable()
    assert torch.equal(x, torch.zeros(3))
