"""TorchScript: scripted code is guarded like eager code; tracing under a guard traces as if
immutorch were not there. Each case is checked against the same call unguarded on a copy."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Callable

import pytest
import torch

import immutorch
from immutorch import ImmutableTensorError, MutationWarning
from immutorch._boundaries import watch_modules

MODES = ("raise", "warn", "clone")

# torch 2.13 deprecates TorchScript (a FutureWarning from 2.15); real code still uses it.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated"),
    pytest.mark.both_backends,
]


class Scale(torch.nn.Module):
    """Writes into its input, the SpeechBrain way (through a row view)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[0] = x[0] * 2
        return x + 1


class Pure(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x)).relu()


@contextmanager
def _watch_all(mode: str) -> Iterator[None]:
    with watch_modules(lambda m: True, mode):  # type: ignore[arg-type]
        yield


def _guards(x: torch.Tensor, mode: str) -> dict[str, Callable[[], AbstractContextManager[object]]]:
    return {
        "guard(x)": lambda: immutorch.guard(x, mode=mode),  # type: ignore[arg-type]
        "guard()": lambda: immutorch.guard(mode=mode),  # type: ignore[arg-type]
        "watch": lambda: _watch_all(mode),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("door", ["guard(x)", "guard()", "watch"])
def test_scripted_module_that_only_reads_runs_in_every_guard(mode, door):
    torch.manual_seed(0)
    model = torch.jit.script(Pure())
    x = torch.randn(5, 4)
    expected = Pure()
    expected.load_state_dict(model.state_dict())
    oracle_model = torch.jit.script(expected)
    want = oracle_model(x.clone())
    before = x.clone()
    with _guards(x, mode)[door]():
        got = model(x)
    assert torch.equal(got, want)
    assert torch.equal(x, before)
    # Training-mode batch norm updated the module's own running stats, as unguarded.
    assert torch.equal(model.bn.running_mean, oracle_model.bn.running_mean)


@pytest.mark.parametrize("door", ["guard(x)", "guard()", "watch"])
def test_scripted_module_write_is_refused_before_it_lands(door):
    model = torch.jit.script(Scale())
    x = torch.arange(6.0).reshape(2, 3)
    before = x.clone()
    with pytest.raises(ImmutableTensorError, match=r"aten::\w+_ would write into") as info:
        with _guards(x, "raise")[door]():
            model(x)
    assert torch.equal(x, before)
    assert info.value.op.endswith("_")  # the in-place op torch dispatched
    # The message names the scripted module by its own class name.
    if door != "guard(x)":
        assert "Scale, scripted" in str(info.value)


@pytest.mark.parametrize("door", ["guard()", "watch"])
def test_scripted_module_write_lands_in_a_private_copy_in_clone_mode(door):
    model = torch.jit.script(Scale())
    x = torch.arange(6.0).reshape(2, 3)
    before = x.clone()
    want = Scale()(x.clone())
    with _guards(x, "clone")[door]():
        got = model(x)
    assert torch.equal(got, want)
    assert torch.equal(x, before)


@pytest.mark.parametrize("door", ["guard(x)", "guard()", "watch"])
def test_scripted_module_write_is_reported_in_warn_mode(door):
    model = torch.jit.script(Scale())
    x = torch.arange(6.0).reshape(2, 3)
    oracle = x.clone()
    want = Scale()(oracle)
    with pytest.warns(MutationWarning, match="would write into"):
        with _guards(x, "warn")[door]():
            got = model(x)
    assert torch.equal(got, want)
    assert torch.equal(x, oracle)  # the write went ahead, as unguarded


def test_scripted_function_write_is_refused_with_immutorchs_own_error():
    @torch.jit.script
    def bump(t: torch.Tensor) -> torch.Tensor:
        t.add_(1)
        return t

    x = torch.zeros(3)
    with pytest.raises(ImmutableTensorError, match=r"aten::add_ would write into") as info:
        with immutorch.guard(x):
            bump(x)
    assert torch.equal(x, torch.zeros(3))
    # TorchScript's own report (the TorchScript line) stays attached as the cause.
    assert "TorchScript" in str(info.value.__cause__)


def test_decorated_function_calling_scripted_code():
    @torch.jit.script
    def bump(t: torch.Tensor) -> torch.Tensor:
        t.add_(1)
        return t * 2

    def caller(t: torch.Tensor) -> torch.Tensor:
        return bump(t)

    x = torch.zeros(3)
    with pytest.raises(ImmutableTensorError, match="immutable_inputs on"):
        immutorch.immutable_inputs(caller)(x)
    assert torch.equal(x, torch.zeros(3))
    got = immutorch.immutable_inputs(mode="clone")(caller)(x)
    assert torch.equal(got, torch.full((3,), 2.0)) and torch.equal(x, torch.zeros(3))


def test_an_ops_own_error_inside_torchscript_keeps_its_message():
    # TorchScript empties the message of any exception raised through a Python dispatch mode;
    # the guard puts the op's own error back, chained to TorchScript's.
    @torch.jit.script
    def fails(t: torch.Tensor) -> torch.Tensor:
        return t.view(7)

    x = torch.zeros(3)
    with pytest.raises(RuntimeError) as unguarded:
        fails(x)
    with pytest.raises(RuntimeError, match=r"shape '\[7\]' is invalid") as info:
        with immutorch.guard(x):
            fails(x)
    assert not isinstance(info.value, ImmutableTensorError)
    assert "shape '[7]' is invalid" in str(unguarded.value)


# -- tracing -----------------------------------------------------------------------------------
class Traced(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 4, 3)
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        y.relu_()
        return y + x[..., :8].mean()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("named", [False, True])
def test_trace_under_a_guard_is_the_trace_without_one(mode, named, caplog):
    torch.manual_seed(0)
    model = Traced().eval()
    x = torch.randn(2, 3, 10)
    want = torch.jit.trace(model, x.clone())
    before = x.clone()
    guard = immutorch.guard(x, mode=mode) if named else immutorch.guard(mode=mode)
    with caplog.at_level(logging.WARNING, logger="immutorch"), guard:
        got = torch.jit.trace(model, x)
    assert got.code == want.code
    assert torch.equal(got(before.clone()), want(before.clone()))
    assert torch.equal(x, before)


def test_trace_steps_aside_once_on_the_logger(caplog):
    from immutorch import _tracing

    _tracing._told.clear()
    model = Traced().eval()
    x = torch.randn(2, 3, 10)
    with caplog.at_level(logging.WARNING, logger="immutorch"):
        for _ in range(3):
            with immutorch.guard(x):
                torch.jit.trace(model, x)
    said = [r for r in caplog.records if "torch.jit.trace" in r.getMessage()]
    assert len(said) == 1


def test_a_write_made_while_tracing_is_reported_after_the_trace():
    def bump(t: torch.Tensor) -> torch.Tensor:
        t.add_(1)
        return t * 2

    x = torch.zeros(3)
    with pytest.warns(MutationWarning, match="traced by torch.jit.trace wrote into"):
        with immutorch.guard(x):
            torch.jit.trace(bump, x, check_trace=False)


def test_traced_module_runs_guarded_and_its_writes_are_refused():
    class Writes(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)
            return x.relu()

    traced = torch.jit.trace(Writes(), torch.randn(3), check_trace=False)
    x = torch.randn(3)
    before = x.clone()
    with pytest.raises(ImmutableTensorError):
        with immutorch.guard(x):
            traced(x)
    assert torch.equal(x, before)


def test_traced_graph_with_tensor_constants_says_why_it_cannot_run_guarded(every_op_backend):
    # TorchScript hands any Python dispatch mode a traced graph's tensor constants as numbers;
    # an empty TorchDispatchMode fails the same way. immutorch says what to do instead.
    def double(t: torch.Tensor) -> torch.Tensor:
        return t * 2  # traced as a wrapped-number tensor constant

    traced = torch.jit.trace(double, torch.zeros(3), check_trace=False)
    if every_op_backend == "native":
        # The native backend boxes nothing into Python per op: the graph runs guarded.
        x = torch.arange(3.0)
        with immutorch.guard(x):
            assert torch.equal(traced(x), x * 2)
        return
    with pytest.raises(RuntimeError, match=r"script the code with torch\.jit\.script"):
        with immutorch.guard():
            traced(torch.zeros(3))


@pytest.mark.parametrize("boundary", ["decorated", "watched"])
def test_trace_of_a_module_that_is_itself_a_boundary(boundary):
    # Found on kornia's HardNet under --immutorch-modules: the boundary of the traced module
    # pushed immutorch's mode during the trace, and tracing a conv then failed.
    torch.manual_seed(0)
    model = Traced().eval()
    x = torch.randn(2, 3, 10)
    want = torch.jit.trace(model, x)
    if boundary == "decorated":
        got = torch.jit.trace(immutorch.immutable_inputs(model), x)
    else:
        with _watch_all("raise"):
            got = torch.jit.trace(model, x)
    assert got.code == want.code
