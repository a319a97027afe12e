"""Every corpus pattern through every front door in every mode, judged against the oracle.

Front doors: the decorator with ``x`` passed positionally, by keyword, inside a list, a dict and
a dataclass, ``guard(x)`` naming the tensor, and a module called inside ``guard(x)``; the
decorator and the guards in both scopes ("all": the every-op mode; "arguments": the scoped
backend). Modes: raise, warn, clone, off.

Where the scoped backend differs by design, the test says so (``_scoped_difference``): a
numpy/DLPack escape gets private memory instead of a refusal, and in warn mode a metadata
write changes the callee's alias, not the caller's tensor object.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple

import pytest
import torch
from corpus import (
    CLEAN,
    PATTERNS,
    WRITES,
    Pattern,
    Snapshot,
    any_op,
    assert_same,
    ids,
    run_oracle,
)
from torch import Tensor

import immutorch
from immutorch import ImmutableTensorError, MutationWarning, guard, immutable_inputs

pytestmark = pytest.mark.both_backends


@dataclasses.dataclass
class Batch:
    x: Tensor
    extra: tuple[Any, ...]


def _positional(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    return immutable_inputs(mode=mode, scope="arguments")(p.fn)(x, *extra)  # type: ignore[arg-type]


def _positional_all(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    return immutable_inputs(mode=mode, scope="all")(p.fn)(x, *extra)  # type: ignore[arg-type]


def _keyword(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    names = list(inspect.signature(p.fn).parameters)
    return immutable_inputs(mode=mode)(p.fn)(**dict(zip(names, (x, *extra))))  # type: ignore[arg-type]


def _in_list(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    @immutable_inputs(mode=mode)  # type: ignore[arg-type]
    def call(batch: list[Any]) -> Any:
        return p.fn(batch[0], *batch[1:])

    return call([x, *extra])


def _in_dict(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    @immutable_inputs(mode=mode)  # type: ignore[arg-type]
    def call(batch: dict[str, Any]) -> Any:
        return p.fn(batch["x"], *batch["extra"])

    return call({"x": x, "extra": extra})


def _in_dataclass(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    @immutable_inputs(mode=mode)  # type: ignore[arg-type]
    def call(batch: Batch) -> Any:
        return p.fn(batch.x, *batch.extra)

    return call(Batch(x, extra))


def _guard_named(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    with guard(x, mode=mode):  # type: ignore[arg-type]
        return p.fn(x, *extra)


def _guard_named_scoped(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    # The block body runs under the every-op mode in both scopes.
    with guard(x, mode=mode, scope="arguments"):  # type: ignore[arg-type]
        return p.fn(x, *extra)


class _Call(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *extra: Any) -> Any:
        return self.fn(x, *extra)


def _module_in_guard(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    with guard(x, mode=mode):  # type: ignore[arg-type]
        return _Call(p.fn)(x, *extra)


def _module_in_guard_scoped(p: Pattern, mode: str, x: Tensor, extra: tuple[Any, ...]) -> Any:
    with guard(x, mode=mode, scope="arguments"):  # type: ignore[arg-type]
        return _Call(p.fn)(x, *extra)


class Door(NamedTuple):
    name: str
    run: Callable[[Pattern, str, Tensor, tuple[Any, ...]], Any]
    label: str  # how the protected tensor is named in messages
    boundary: bool  # hands the callee a copy-on-write alias (clone mode can isolate)
    scoped: bool = False  # the callee gets the scoped backend's alias


DOORS = [
    Door("positional", _positional, "x", True, scoped=True),
    Door("positional_all", _positional_all, "x", True),
    # The default scope of the decorator is "arguments".
    Door("keyword", _keyword, "x", True, scoped=True),
    Door("list", _in_list, "batch[0]", True, scoped=True),
    Door("dict", _in_dict, "batch['x']", True, scoped=True),
    Door("dataclass", _in_dataclass, "batch.x", True, scoped=True),
    Door("guard_named", _guard_named, "guard argument 0", False),
    Door("guard_named_scoped", _guard_named_scoped, "guard argument 0", False),
    Door("module_in_guard", _module_in_guard, "guard argument 0", True),
    Door("module_in_guard_scoped", _module_in_guard_scoped, "guard argument 0", True, True),
]
MODES = ["raise", "warn", "clone", "off"]


@contextmanager
def mutation_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record MutationWarnings under the default filter (once per call site)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", MutationWarning)
        yield caught


def _message(p: Pattern, label: str) -> str:
    verb = "change the size or strides of" if p.effect == "meta" else "write into"
    return rf"{any_op(p.ops)} would {verb} `{re.escape(label)}` \(.*argument `{p.arg}` of "


def _scoped_difference(p: Pattern, door: Door, mode: str) -> str:
    """How the scoped backend's outcome differs from the every-op mode's, by design: "" (it
    does not), "private" (a numpy/DLPack escape writes private memory: no refusal, no
    warning, the caller's tensor untouched; warn mode: the real memory, unreported), or
    "alias_only" (warn mode, a write that changes the tensor object: it changes the callee's
    alias, reported once, and the caller's tensor keeps its size and strides)."""
    if not door.scoped or mode == "off":
        return ""
    if not p.isolable:
        return "private"
    if mode == "warn" and (p.effect == "meta" or p.name == "resize_shrink"):
        return "alias_only"
    return ""


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("door", DOORS, ids=[d.name for d in DOORS])
@pytest.mark.parametrize("p", WRITES, ids=ids(WRITES))
def test_write_pattern(p: Pattern, door: Door, mode: str) -> None:
    x, extra = p.make()
    oracle = run_oracle(p, x, extra)
    assert not Snapshot.of(x).matches(oracle.x_after, version=False), "oracle must write"
    before = Snapshot.of(x)
    before_clone = immutorch.clone_stats()

    difference = _scoped_difference(p, door, mode)
    if difference == "private":
        with mutation_warnings() as caught:
            result = door.run(p, mode, x, extra)
        assert not [w for w in caught if issubclass(w.category, MutationWarning)]
        assert_same(result, oracle.result)
        if mode == "warn":
            assert Snapshot.of(oracle.x_after).matches(x, version=False)
        else:
            assert before.matches(x), "the escape must have written private memory"
        return

    refuses = mode == "raise" or (mode == "clone" and not (door.boundary and p.isolable))
    if refuses:
        match = _message(p, door.label)
        if mode == "clone":
            match += r"(.|\n)*Clone mode cannot isolate this write"
        with pytest.raises(ImmutableTensorError, match=match) as info:
            door.run(p, mode, x, extra)
        assert info.value.op in p.ops
        assert info.value.argument == door.label
        assert before.matches(x), "a refused write must leave the data untouched"
        assert immutorch.clone_stats().copies == before_clone.copies
        return

    if mode == "warn":
        with mutation_warnings() as caught:
            result = door.run(p, mode, x, extra)
        mutation = [w for w in caught if issubclass(w.category, MutationWarning)]
        assert len(mutation) == 1, [str(w.message) for w in caught]
        warning = mutation[0].message
        assert isinstance(warning, MutationWarning)
        assert warning.op in p.ops
        assert warning.argument == door.label
        assert re.search(_message(p, door.label), str(warning))
        assert_same(result, oracle.result)
        if difference == "alias_only":
            assert before.matches(x, version=False), "only the callee's alias changes"
        else:
            assert Snapshot.of(oracle.x_after).matches(x, version=False)
        return

    result = door.run(p, mode, x, extra)
    assert_same(result, oracle.result)
    if mode == "off":
        assert Snapshot.of(oracle.x_after).matches(x, version=False)
    else:  # clone through a boundary: the write landed in a private copy
        assert before.matches(x), "clone mode must leave the caller's tensor untouched"
        copies = immutorch.clone_stats().copies - before_clone.copies
        if p.effect == "meta":
            assert copies == 0, "a metadata write changes the callee's view only"
        else:
            assert copies >= 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("door", DOORS, ids=[d.name for d in DOORS])
@pytest.mark.parametrize("p", CLEAN, ids=ids(CLEAN))
def test_clean_pattern(p: Pattern, door: Door, mode: str) -> None:
    x, extra = p.make()
    oracle = run_oracle(p, x, extra)
    before = Snapshot.of(x)
    before_clone = immutorch.clone_stats()
    # filterwarnings=error: any MutationWarning fails the test.
    result = door.run(p, mode, x, extra)
    assert_same(result, oracle.result)
    assert before.matches(x)
    copies = immutorch.clone_stats().copies - before_clone.copies
    if door.scoped and mode == "clone" and p.name == "numpy_read":
        # By design: numpy() hands code outside the dispatcher private memory, once.
        assert copies == 1
    else:
        assert copies == 0, "a clean call must copy nothing"


def test_corpus_size() -> None:
    assert len(WRITES) >= 30
    assert len(CLEAN) >= 15
    assert len({p.name for p in PATTERNS}) == len(PATTERNS)
    assert {p.effect for p in WRITES} == {"data", "meta"}
    for p in WRITES:
        assert p.ops and all(op.startswith("aten::") for op in p.ops), p.name


# -- guard() with no tensors: everything that existed before the block --------------------------
@pytest.mark.parametrize("p", WRITES, ids=ids(WRITES))
def test_block_guard_flags_writes_on_pre_existing(p: Pattern) -> None:
    x, extra = p.make()
    before = Snapshot.of(x)
    with pytest.raises(ImmutableTensorError, match=any_op(p.ops)), guard():
        p.fn(x, *extra)
    assert before.matches(x)


@pytest.mark.parametrize("p", WRITES, ids=ids(WRITES))
def test_block_guard_allows_writes_into_block_memory(p: Pattern) -> None:
    # numpy_alias_write and dlpack_alias_write included: a numpy or DLPack alias of the block's
    # own memory inherits its birth (immutorch/_births.py).
    with guard():
        x, extra = p.make()  # made inside the block: its own memory
        expected = run_oracle(p, x, extra)
        result = p.fn(x, *extra)
    assert_same(result, expected.result)


@pytest.mark.parametrize("p", CLEAN, ids=ids(CLEAN))
@pytest.mark.parametrize("mode", ["raise", "warn", "clone"])
def test_block_guard_clean(p: Pattern, mode: str) -> None:
    x, extra = p.make()
    oracle = run_oracle(p, x, extra)
    with guard(mode=mode):  # type: ignore[arg-type]
        result = p.fn(x, *extra)
    assert_same(result, oracle.result)


def test_block_guard_warn_lets_write_through() -> None:
    x = torch.zeros(3)
    with pytest.warns(MutationWarning, match="a tensor from outside the block"), guard(mode="warn"):
        x.add_(1)
    assert torch.equal(x, torch.ones(3))


def test_block_guard_exempts_module_state_by_default() -> None:
    bn = torch.nn.BatchNorm1d(5)
    expected_bn = torch.nn.BatchNorm1d(5)
    inp = torch.randn(8, 5)
    with guard():
        out = bn(inp)
    expected = expected_bn(inp.clone())
    assert torch.equal(out, expected)
    assert torch.equal(bn.running_mean, expected_bn.running_mean)
    assert bn.num_batches_tracked.item() == 1


def test_block_guard_protect_state() -> None:
    bn = torch.nn.BatchNorm1d(5)
    running_mean = bn.running_mean.clone()
    match = r"from outside the block(.|\n)*in BatchNorm1d"
    with pytest.raises(ImmutableTensorError, match=match), guard(protect_state=True):
        bn(torch.randn(8, 5))
    assert torch.equal(bn.running_mean, running_mean)


def test_block_guard_optimizer_step_on_parameters() -> None:
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    inp = torch.randn(4, 3)
    with guard():
        lin(inp).sum().backward()
        opt.step()
    with pytest.raises(ImmutableTensorError), guard(protect_state=True):
        opt.step()


def test_block_guard_allow() -> None:
    x, y = torch.zeros(3), torch.zeros(3)
    with guard(allow=y):
        y.add_(1)
        y[0:1].mul_(5)
        with pytest.raises(ImmutableTensorError):
            x.add_(1)
    assert torch.equal(y, torch.tensor([5.0, 1.0, 1.0]))
    assert torch.equal(x, torch.zeros(3))
    with guard(allow=[x, {"k": y}]):
        x.add_(1)
        y.add_(1)


def test_block_guard_allow_module_and_optimizer() -> None:
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters())
    lin(torch.randn(2, 3)).sum().backward()
    opt.step()  # state exists before the block
    lin(torch.randn(2, 3)).sum().backward()
    with guard(protect_state=True, allow=[lin, opt]):
        opt.step()
    with pytest.raises(ImmutableTensorError), guard(protect_state=True, allow=lin):
        opt.step()  # Adam's exp_avg is outside memory and not allowed


def test_block_guard_named_and_block_nest() -> None:
    x = torch.zeros(3)
    with guard(mode="warn"), guard(x, mode="raise"):
        with pytest.raises(ImmutableTensorError, match="guard argument 0"):
            x.add_(1)
        y = torch.zeros(2)
        y.add_(1)
