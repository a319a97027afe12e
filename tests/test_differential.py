"""Differential testing: random programs of views, reads and writes over a protected tensor P
and an unprotected tensor U, run unguarded on copies (the oracle) and under the guard.

- raise mode flags a program exactly when its oracle run writes into P's memory (so every
  program that changes P's bytes, and none that writes only into U or into fresh copies), and
  leaves P bit-identical;
- clone mode, through the decorator, returns what the oracle returns and leaves P untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from corpus import Snapshot, assert_same
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from immutorch import ImmutableTensorError, guard, immutable_inputs

pytestmark = pytest.mark.both_backends

SHAPE = (4, 6)
VIEWS = ["select", "slice", "step", "transpose", "reshape", "detach", "contiguous", "clone",
         "unsqueeze", "expand_row", "flatten", "diagonal"]  # fmt: skip
ACTIONS = ["read", "add_", "mul_", "copy_", "fill_", "index_put_", "out=", "cross", "read_other"]


@dataclass(frozen=True)
class Step:
    base: str  # "p" or "u"
    views: tuple[tuple[str, float, float], ...]  # (op, two numbers in [0, 1) for its params)
    action: str
    value: float


unit = st.floats(0, 0.999, allow_nan=False)
steps = st.builds(
    Step,
    base=st.sampled_from(["p", "u"]),
    views=st.lists(st.tuples(st.sampled_from(VIEWS), unit, unit), max_size=4).map(tuple),
    action=st.sampled_from(ACTIONS),
    value=st.sampled_from([-2.0, 0.5, 1.5, 3.0]),
)
programs = st.lists(steps, min_size=1, max_size=6)


def _pick(n: int, f: float) -> int:
    return min(int(f * n), n - 1)


def _view(t: Tensor, op: str, a: float, b: float) -> Tensor:
    if t.dim() == 0:
        return t
    dim = _pick(t.dim(), a)
    n = t.shape[dim]
    if op == "select" and n:
        return t.select(dim, _pick(n, b))
    if op == "slice" and n:
        start = _pick(n, b)
        return t.narrow(dim, start, n - start)
    if op == "step":
        return t[(slice(None),) * dim + (slice(None, None, 2),)]
    if op == "transpose" and t.dim() >= 2:
        return t.transpose(0, t.dim() - 1)
    if op == "reshape":
        return t.reshape(-1)  # a view when it can be, else a copy
    if op == "detach":
        return t.detach()
    if op == "contiguous":
        return t.contiguous()  # a copy unless already contiguous
    if op == "clone":
        return t.clone()
    if op == "unsqueeze":
        return t.unsqueeze(0)
    if op == "expand_row" and t.dim() >= 1:
        return t.select(dim, 0).unsqueeze(0)  # a view with a size-1 dim, not overlapping
    if op == "flatten":
        return t.flatten()
    if op == "diagonal" and t.dim() >= 2:
        return t.diagonal()
    return t


def run(program: list[Step], p: Tensor, u: Tensor) -> tuple[list[Any], bool]:
    """Run ``program``; return (what it read and returns, whether it wrote into p's memory)."""
    reads: list[Any] = []
    wrote_p = False
    p_ptr = p.untyped_storage().data_ptr()
    for step in program:
        t = p if step.base == "p" else u
        other = u if step.base == "p" else p
        for op, a, b in step.views:
            t = _view(t, op, a, b)
        action, v = step.action, step.value
        if action == "read":
            reads.append(t.sum())
            continue
        if action == "read_other":
            reads.append(other.sum() + t.max())
            continue
        wrote_p = wrote_p or t.untyped_storage().data_ptr() == p_ptr
        if action == "add_":
            t.add_(v)
        elif action == "mul_":
            t.mul_(v)
        elif action == "copy_":
            t.copy_(t.flip(0) * v if t.dim() else t * v)
        elif action == "fill_":
            t.fill_(v)
        elif action == "index_put_":
            if t.dim() and t.shape[0]:
                t.index_put_((torch.tensor([t.shape[0] - 1]),), torch.tensor(v))
            else:
                t.fill_(v)
        elif action == "out=":
            torch.add(t.detach().clone(), v, out=t)
        elif action == "cross":
            t.add_(other.mean())  # reads the other base, writes this one
        reads.append(t.clone())
    reads.extend([p.clone(), u.clone()])
    return reads, wrote_p


def _inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _guarded_run(door: str, program: list[Step], p: Tensor, u: Tensor) -> Any:
    if door == "guard":
        with guard(p):
            return run(program, p, u)

    @immutable_inputs(only=("p",), scope=door)  # type: ignore[call-overload]
    def call(p: Tensor, u: Tensor) -> Any:
        return run(program, p, u)

    return call(p, u)


@pytest.mark.parametrize("door", ["guard", "all", "arguments"])
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(program=programs)
def test_raise_flags_exactly_the_writes_into_protected_memory(
    door: str, program: list[Step]
) -> None:
    """Through guard(p) and through the decorator in each scope."""
    p, u = _inputs()
    oracle_p, oracle_u = p.clone(), u.clone()
    _, writes_p = run(program, oracle_p, oracle_u)
    if not torch.equal(oracle_p, p):
        assert writes_p, "oracle bookkeeping: P changed without a write into its memory"

    snapshot = Snapshot.of(p)
    try:
        _guarded_run(door, program, p, u)
        raised = False
    except ImmutableTensorError:
        raised = True
    assert raised == writes_p
    assert snapshot.matches(p)
    if not writes_p:
        assert torch.equal(u, oracle_u)


@pytest.mark.parametrize("scope", ["all", "arguments"])
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(program=programs)
def test_clone_returns_the_oracle_and_leaves_protected_memory(
    scope: str, program: list[Step]
) -> None:
    p, u = _inputs()
    expected, _ = run(program, p.clone(), u.clone())
    snapshot = Snapshot.of(p)

    @immutable_inputs(mode="clone", only=("p",), scope=scope)  # type: ignore[call-overload]
    def call(p: Tensor, u: Tensor) -> list[Any]:
        return run(program, p, u)[0]

    assert_same(call(p, u), expected)
    assert snapshot.matches(p)
