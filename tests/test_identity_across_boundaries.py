"""Argument identity across boundaries: a tensor passed several times crosses as one object.

PyTorch code tests argument identity: ``nn.MultiheadAttention`` takes its fused fast path only
when ``query is key is value``, and ``F.multi_head_attention_forward`` packs the in-projection
into one matmul for self-attention. A guard that hands each occurrence over as its own alias
changes what such code computes (other strides, last-bit different values). Every test
compares bytes and strides with the unguarded call.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import pytest
import torch
from corpus import Snapshot, assert_same
from torch import Tensor

import immutorch
from immutorch import guard, immutable_inputs

MODES = ["raise", "warn", "clone"]
SCOPES = ["all", "arguments"]
MODE_SCOPE = list(itertools.product(MODES, SCOPES))


def _bytes(t: Tensor) -> tuple[bytes, tuple[int, ...], tuple[int, ...]]:
    t = t.detach()
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), t.shape, t.stride()


class _Spy(torch.nn.Module):
    """Records, for one call, which of its arguments are the same object."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, ...]] = []

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, extra: Any = None) -> Tensor:
        same = [q is k, k is v]
        if extra is not None:
            same += [extra["k"] is q, extra["list"][0] is q, extra["list"][1] is q]
        self.seen.append(tuple(same))
        return q * 1


def _spy_call(spy: _Spy, x: Tensor) -> Tensor:
    return spy(x, x, x, extra={"k": x, "list": [x, x]})


def _in(g: immutorch.Guard, run: Callable[[], Any]) -> Any:
    with g:
        return run()


def _run(
    front: str, module: Any, call: Callable[[Any], Any], x: Tensor, mode: str, scope: str
) -> Any:
    """``call(module)`` through one front door: the decorator on the module's forward,
    ``guard(x)`` or ``guard()`` around the call."""
    if front == "decorator":
        return call(immutable_inputs(module, mode=mode, scope=scope))
    if front == "guard_x":
        return _in(guard(x, mode=mode, scope=scope), lambda: call(module))
    return _in(guard(mode=mode, scope=scope), lambda: call(module))


FRONTS = ["decorator", "guard_x", "guard"]


@pytest.mark.parametrize(("mode", "scope"), MODE_SCOPE)
@pytest.mark.parametrize("front", FRONTS)
def test_the_same_tensor_crosses_as_one_object(front: str, mode: str, scope: str) -> None:
    """q is k is v, positional, keyword and inside containers, as unguarded."""
    x = torch.randn(2, 3)
    spy = _Spy()
    _spy_call(spy, x)
    assert spy.seen == [(True,) * 5]  # unguarded
    spy.seen.clear()
    _run(front, spy, lambda m: _spy_call(m, x), x, mode, scope)
    assert spy.seen == [(True,) * 5]


@pytest.mark.parametrize(("mode", "scope"), MODE_SCOPE)
def test_a_decorated_function_sees_one_object(mode: str, scope: str) -> None:
    seen: list[bool] = []

    @immutable_inputs(mode=mode, scope=scope)
    def f(a: Tensor, b: Tensor, *, c: Tensor, items: list[Tensor]) -> Tensor:
        seen.extend([a is b, a is c, items[0] is a, items[1] is a])
        return a + b

    x = torch.randn(3)
    f(x, x, c=x, items=[x, x])
    assert seen == [True] * 4


def _mha() -> torch.nn.MultiheadAttention:
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()


def _encoder_layer() -> torch.nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()


def _attend(m: Any, x: Tensor) -> Tensor:
    out: Tensor = m(x, x, x, need_weights=False)[0]
    return out


# model -> (factory, call, the slow path's call of an unguarded model: it must give other bytes)
FAST_PATHS: dict[str, tuple[Callable[[], Any], Callable[[Any, Tensor], Tensor], Any]] = {
    "multihead_attention": (
        _mha,
        _attend,
        lambda m, x: m(x, x.clone(), x.clone(), need_weights=False)[0],  # q is not k
    ),
    "transformer_encoder_layer": (
        _encoder_layer,
        lambda m, x: m(x),
        lambda m, x: torch.enable_grad()(m)(x).detach(),  # grad on: the layer by layer path
    ),
}


@pytest.mark.parametrize(("mode", "scope"), MODE_SCOPE)
@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("model", list(FAST_PATHS))
def test_fused_fast_paths_stay_fused(model: str, front: str, mode: str, scope: str) -> None:
    """Eval mode, batch_first, no grad (and need_weights=False): the fused kernels, bit for
    bit, strides included."""
    make, call, slow_call = FAST_PATHS[model]
    x = torch.randn(2, 5, 16)
    before = Snapshot.of(x)
    with torch.no_grad():
        fast = call(make(), x)
        assert _bytes(fast) != _bytes(slow_call(make(), x))  # the test tells the paths apart
        out = _run(front, make(), lambda m: call(m, x), x, mode, scope)
    assert _bytes(out) == _bytes(fast)
    assert before.matches(x)


@pytest.mark.parametrize(("mode", "scope"), MODE_SCOPE)
@pytest.mark.parametrize("front", FRONTS)
def test_self_attention_with_gradients_packs_its_projection(
    front: str, mode: str, scope: str
) -> None:
    """Training with autograd: F.multi_head_attention_forward projects q, k and v with one
    matmul when they are one tensor. Outputs and every gradient, bit for bit."""

    def step(m: Any, mha: torch.nn.MultiheadAttention, x: Tensor) -> list[Tensor]:
        out = m(x, x, x)[0]
        out.square().sum().backward()
        return [out, x.grad, *(p.grad for p in mha.parameters())]  # type: ignore[list-item]

    torch.manual_seed(1)
    x0 = torch.randn(2, 5, 16)
    ref_mha = _mha().train()
    x_ref = x0.clone().requires_grad_()
    expected = step(ref_mha, ref_mha, x_ref)

    mha = _mha().train()
    x = x0.clone().requires_grad_()
    got = _run(front, mha, lambda m: step(m, mha, x), x, mode, scope)
    assert [_bytes(t) for t in got] == [_bytes(t) for t in expected]


@pytest.mark.parametrize("scope", SCOPES)
def test_views_of_one_storage_share_one_copy(scope: str) -> None:
    """Clone mode: a tensor and a view of it, handed over together, are copied once at the
    first write, and the view then shows the write, as unguarded."""

    def f(a: Tensor, tail: Tensor, same: Tensor) -> tuple[Tensor, Tensor, bool]:
        a.add_(1)
        return tail * 1, same * 1, a is same

    x = torch.arange(6.0)
    before = Snapshot.of(x)
    x_ref = x.clone()
    expected = f(x_ref, x_ref[2:], x_ref)
    g = guard(mode="clone", scope=scope)

    class M(torch.nn.Module):
        def forward(self, a: Tensor, tail: Tensor, same: Tensor) -> Any:
            return f(a, tail, same)

    with g:
        out = M()(x, x[2:], x)
    assert out[2] is True
    assert_same(list(out[:2]), list(expected[:2]))
    assert g.stats.copies == 1
    assert before.matches(x)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_callee_returning_its_argument_returns_the_callers_tensor(scope: str) -> None:
    """Unguarded, ``f(x) is x`` for a function that returns its argument: so in clone mode
    (nothing written, no copy made), through the decorator and through a module boundary."""

    @immutable_inputs(mode="clone", scope=scope)
    def f(a: Tensor) -> Tensor:
        return a

    x = torch.randn(3)
    assert f(x) is x
    with guard(mode="clone", scope=scope):
        assert torch.nn.Identity()(x) is x
