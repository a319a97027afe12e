"""Clone mode's module-call check in C++ (``_native.hand_over_filter``): where it says no
argument of a module call can need handing over, Python's own answer
(``_boundaries.arguments_may_hand_over``) must agree, or a protected argument would reach the
callee as itself and its write be refused instead of isolated. Each case is also run as a
module that writes into every tensor it is given, against the same call unguarded on copies:
the callee computes what it would have, the caller's tensors stay as they were."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import pytest
import torch

import immutorch
from immutorch import _boundaries
from immutorch._backends import native

pytestmark = pytest.mark.both_backends


# Seen on 2.4.1 and 2.5.1; 2.9.1 and later copy a subclass under a dispatch mode.
TORCH_BEFORE_2_9 = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 9)


class Sub(torch.Tensor):
    pass


@dataclasses.dataclass
class Batch:
    x: torch.Tensor


# What reaches the module call, made inside the block from the caller's tensor `x`, its view
# `xv` and its subclass view `xs` (both made before the guard: torch 2.4 and 2.5 cannot make
# a subclass view under a dispatch mode): (args, kwargs) of the call.
Made = tuple[tuple[Any, ...], dict[str, Any]]
CASES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Made]] = {
    "the protected tensor": lambda x, xv, xs: ((x,), {}),
    "a view made before the guard": lambda x, xv, xs: ((xv,), {}),
    "a view made in the block": lambda x, xv, xs: ((x[1:],), {}),
    "by keyword": lambda x, xv, xs: ((), {"input": x}),
    "after scalars": lambda x, xv, xs: ((1, 2.0, None, "s", True, x), {}),
    "in a tuple": lambda x, xv, xs: (((x, 1),), {}),
    "in a list": lambda x, xv, xs: (([x],), {}),
    "in a dict": lambda x, xv, xs: (({"k": x},), {}),
    "in a dataclass": lambda x, xv, xs: ((Batch(x),), {}),
    "as a subclass": lambda x, xv, xs: ((xs,), {}),
    "another storage over its bytes": lambda x, xv, xs: ((torch.from_numpy(x.numpy()),), {}),
    "fresh memory": lambda x, xv, xs: ((x + 1,), {"other": torch.zeros(2)}),
    "nothing": lambda x, xv, xs: ((), {}),
}


class WritesAll(torch.nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = torch.zeros(())
        for t in _tensors((args, kwargs)):
            t.add_(1)
            total = total + t.sum()
        return total


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, Batch):
        return [value.x]
    return []


GUARDS = {
    "guard(x)": lambda x: immutorch.guard(x, mode="clone", scope="all"),
    "guard()": lambda x: immutorch.guard(mode="clone", scope="all"),
}


@pytest.mark.parametrize("guard", list(GUARDS))
@pytest.mark.parametrize("case", list(CASES))
def test_filter_never_says_no_where_python_says_yes(case: str, guard: str) -> None:
    x = torch.arange(6.0)
    xv, xs = x[2:], x.as_subclass(Sub)
    with GUARDS[guard](x):
        args, kwargs = CASES[case](x, xv, xs)
        python = _boundaries.arguments_may_hand_over(args, kwargs)
        fast = native.hand_over_filter
        if fast is not None and native.enabled():
            assert fast(args, kwargs) or not python
        if case not in ("fresh memory", "nothing"):
            assert python  # each case but those two does take protected memory


@pytest.mark.parametrize("guard", list(GUARDS))
@pytest.mark.parametrize("case", list(CASES))
def test_clone_isolates_each_case_like_the_unguarded_call(
    case: str, guard: str, every_op_backend: str
) -> None:
    if case == "as a subclass" and every_op_backend == "python" and TORCH_BEFORE_2_9:
        pytest.xfail(
            "torch 2.4 and 2.5 cannot make a tensor subclass's copy under a dispatch mode (the "
            "mode wraps the copy first: 'already associated to a python object'); the Python "
            "mode is one"
        )
    x = torch.arange(6.0)
    xv, xs = x[2:], x.as_subclass(Sub)
    before = x.clone()
    oracle_x = x.clone()
    oracle_args, oracle_kwargs = CASES[case](oracle_x, oracle_x[2:], oracle_x.as_subclass(Sub))
    want = WritesAll()(*oracle_args, **oracle_kwargs)
    with GUARDS[guard](x):
        args, kwargs = CASES[case](x, xv, xs)
        got = WritesAll()(*args, **kwargs)
    assert torch.equal(got, want)
    assert torch.equal(x, before)


def test_filter_answers_no_for_the_blocks_own_memory() -> None:
    """The point of the filter: a call taking only activations made in the block costs no
    Python (where native serves)."""
    if native.hand_over_filter is None:
        pytest.skip("native backend not loaded")
    x = torch.ones(3)
    with immutorch.guard(x, mode="clone", scope="all"):
        if not native.enabled():
            pytest.skip("python backend serves this run")
        h = x * 2
        assert not native.hand_over_filter((h, 1, None), {"k": h.t()})
        assert native.hand_over_filter((x,), {})
    with immutorch.guard(mode="clone", scope="all"):
        h = x * 2
        assert not native.hand_over_filter((h,), {})
        assert native.hand_over_filter((x,), {})
    # Not served (outside any guard): the filter leaves the answer to Python.
    assert native.hand_over_filter((torch.ones(2),), {})


def test_filter_sees_a_readonly_mark_in_a_block() -> None:
    x = torch.ones(3)
    immutorch.readonly(x)
    try:
        y = torch.ones(3)
        with immutorch.guard(mode="clone", scope="all"):
            python = _boundaries.arguments_may_hand_over((x,), {})
            if native.hand_over_filter is not None and native.enabled():
                assert native.hand_over_filter((x,), {}) or not python
            assert python
            assert _boundaries.arguments_may_hand_over((y,), {})  # older than the block
    finally:
        immutorch.writable(x)


def test_filter_leaves_vmapped_arguments_to_python() -> None:
    x = torch.arange(6.0).reshape(2, 3)
    before = x.clone()

    class Scale(torch.nn.Module):
        def forward(self, row: torch.Tensor) -> torch.Tensor:
            return row.mul_(2).sum()

    want = torch.func.vmap(Scale())(x.clone())
    with immutorch.guard(x, mode="clone", scope="all"):
        got = torch.func.vmap(Scale())(x)
    assert torch.equal(got, want)
    assert torch.equal(x, before)


def test_numpy_memory_from_before_the_block_is_handed_over() -> None:
    a = np.arange(4.0)
    t = torch.from_numpy(a)
    with immutorch.guard(mode="clone", scope="all"):
        out = WritesAll()(t)
    assert out.item() == float((a + 1).sum())
    assert a.tolist() == [0.0, 1.0, 2.0, 3.0]
