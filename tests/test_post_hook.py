"""The global module post-hook is registered only while some module call is on record (a
clone-mode hand-over, a watch, a compiled module): calls taking only a block's own memory pay
for no forward hook. It must still end every call on record, normally or by an exception,
and never change the hooks dict torch is iterating (``Module._call_impl`` runs always-call
hooks from a loop over the live dict while an exception unwinds)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.modules import module as module_mod

import immutorch
from immutorch import _boundaries
from immutorch._registry import STATE

pytestmark = pytest.mark.both_backends


def _ours_registered() -> bool:
    hooks = module_mod._global_forward_hooks.values()
    return any(h in (_boundaries._post_hook, _boundaries._post_hook_with_kwargs) for h in hooks)


class Probe(torch.nn.Module):
    """Records, inside its forward, whether the post-hook is registered; writes if asked."""

    def __init__(self, write: bool = False, fail: bool = False) -> None:
        super().__init__()
        self.write, self.fail = write, fail
        self.seen: list[bool] = []

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(_ours_registered())
        if self.write:
            t.add_(1)
        if self.fail:
            raise ValueError("the module's own error")
        return t * 2


def test_a_call_on_the_blocks_own_memory_registers_no_post_hook() -> None:
    probe = Probe(write=True)
    with immutorch.guard(mode="clone", scope="all"):
        h = torch.ones(3)
        out = probe(h)
    assert probe.seen == [False]
    assert torch.equal(out, torch.full((3,), 4.0))
    assert not _ours_registered()


def test_a_handed_over_call_holds_it_for_its_duration_only() -> None:
    x = torch.zeros(3)
    outer, after = Probe(write=True), Probe()
    with immutorch.guard(mode="clone", scope="all"):
        out = outer(x)  # x is from before the block: handed over, on record
        assert not _ours_registered()  # taken off as the call returned
        after(out)
    assert outer.seen == [True]
    assert after.seen == [False]
    assert torch.equal(x, torch.zeros(3))
    assert torch.equal(out, torch.full((3,), 2.0))


def test_a_module_returning_its_argument_gives_the_caller_its_own_tensor() -> None:
    class Same(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t

    x = torch.ones(2)
    with immutorch.guard(mode="clone", scope="all"):
        assert Same()(x) is x


@pytest.mark.parametrize("nested", [False, True])
def test_an_exception_in_a_call_on_record_propagates_and_leaves_nothing(nested: bool) -> None:
    x = torch.zeros(3)
    failing = Probe(write=True, fail=True)

    class Outer(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return failing(t)

    call = Outer() if nested else failing
    with pytest.raises(ValueError, match="the module's own error"):
        with immutorch.guard(mode="clone", scope="all"):
            call(x)
    assert STATE.boundaries == [] and STATE.modules == []
    assert not _ours_registered()
    assert not _boundaries.hooks_installed()
    assert torch.equal(x, torch.zeros(3))


def test_unwinding_never_changes_the_hooks_dict_torch_iterates() -> None:
    """A global always-call hook registered after ours (here: inside the failing call) comes
    after it in the dict torch walks while the exception unwinds: taking ours off there would
    raise "OrderedDict mutated during iteration" in place of the module's own error."""
    x = torch.zeros(3)
    ran: list[bool] = []

    class RegistersThenFails(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            handles.append(
                module_mod.register_module_forward_hook(
                    lambda m, a, o: ran.append(True), always_call=True
                )
            )
            raise ValueError("the module's own error")

    handles: list[Any] = []
    try:
        with pytest.raises(ValueError, match="the module's own error"):
            with immutorch.guard(mode="clone", scope="all"):
                RegistersThenFails()(x)
    finally:
        for h in handles:
            h.remove()
    assert ran == [True]
    assert STATE.boundaries == []
    assert not _ours_registered()


def test_after_an_exception_caught_inside_the_block_calls_still_end() -> None:
    """The post-hook stays registered through the unwinding (it comes off at the next call on
    record that ends normally): the next call is still ended, its alias still swapped back."""
    x = torch.zeros(3)
    failing, writing = Probe(write=True, fail=True), Probe(write=True)
    with immutorch.guard(mode="clone", scope="all"):
        with pytest.raises(ValueError):
            failing(x)
        assert STATE.boundaries == []
        out = writing(x)
        assert STATE.boundaries == []
        assert not _ours_registered()
    assert torch.equal(x, torch.zeros(3))
    assert torch.equal(out, torch.full((3,), 2.0))


def test_other_global_forward_hooks_run_as_before() -> None:
    calls: list[str] = []

    def user_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        calls.append(type(module).__name__)

    handle = module_mod.register_module_forward_hook(user_hook)
    try:
        x = torch.zeros(2)
        with immutorch.guard(mode="clone", scope="all"):
            Probe()(x)  # on record
            Probe()(torch.ones(2))  # not
    finally:
        handle.remove()
    assert calls == ["Probe", "Probe"]


def test_a_call_inside_the_callers_except_block_ends_normally() -> None:
    """The caller's own exception being handled is no failure of the module call: the module
    returning its argument still gives the caller its own tensor back."""

    class Same(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t

    x = torch.ones(2)
    with immutorch.guard(mode="clone", scope="all"):
        try:
            raise KeyError("the caller's")
        except KeyError:
            assert Same()(x) is x
            assert STATE.boundaries == []
        assert not _ours_registered()
