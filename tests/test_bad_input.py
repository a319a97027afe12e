"""Unusual tensors and wrong arguments: handled, or refused with a clear error, never a crash
inside the dispatcher, and never a guard left installed."""

from __future__ import annotations

import collections
import warnings
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from corpus import Snapshot, assert_same
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from immutorch import ImmutableTensorError, MutationWarning, guard, immutable_inputs
from immutorch._registry import STATE


@pytest.fixture(autouse=True)
def _nothing_left_installed() -> Any:
    yield
    assert not STATE.frames and not STATE.by_storage and not STATE.by_object
    assert not _get_current_dispatch_mode_stack()


def clone_call(fn: Any, *args: Any) -> Any:
    return immutable_inputs(mode="clone")(fn)(*args)


# -- arguments that are not tensors ------------------------------------------------------------
Pair = collections.namedtuple("Pair", ["a", "b"])


class Holder:
    def __init__(self, t: Tensor) -> None:
        self.t = t


def test_non_tensor_arguments_are_ignored() -> None:
    @immutable_inputs
    def f(x: Tensor, n: int, s: str, nothing: None, mixed: list[Any], opts: dict[str, Any],
          obj: object, gen: Any, *rest: Any, **kw: Any) -> Tensor:  # fmt: skip
        return x * n

    x = torch.ones(2)
    out = f(x, 3, "s", None, [1, "a", 2.0], {"k": 2.0}, object(), iter([]), 5, k=Ellipsis)
    assert torch.equal(out, torch.full((2,), 3.0))


def test_namedtuple_and_star_arguments_are_searched() -> None:
    @immutable_inputs
    def f(pair: Pair, *rest: Tensor, **kw: Tensor) -> None:
        kw["z"].add_(1)

    x = torch.zeros(2)
    with pytest.raises(ImmutableTensorError, match=r"`kw\['z'\]`"):
        f(Pair(torch.ones(1), torch.ones(1)), torch.ones(1), z=x)

    @immutable_inputs
    def g(pair: Pair) -> None:
        pair.b.add_(1)

    with pytest.raises(ImmutableTensorError, match=r"`pair\[1\]`"):
        g(Pair(torch.ones(1), x))
    assert torch.equal(x, torch.zeros(2))


def test_tensor_inside_an_arbitrary_object_is_not_an_argument() -> None:
    # Only lists, tuples, dicts, namedtuples and dataclasses are searched: an attribute of an
    # arbitrary object is not protected (documented behaviour, not a bug).
    @immutable_inputs
    def f(h: Holder) -> None:
        h.t.add_(1)

    h = Holder(torch.zeros(2))
    f(h)
    assert torch.equal(h.t, torch.ones(2))


@pytest.mark.parametrize("bad", [3, 2.5, "x", None, object()])
def test_guard_of_a_non_tensor_is_a_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"immutorch.guard\(\) protects tensors and modules"):
        guard(bad)


@pytest.mark.parametrize("mode", ["strict", "RAISE", "", None, 1])
def test_bad_mode_names_the_choices(mode: Any) -> None:
    match = r"mode must be one of 'raise', 'warn', 'clone', 'off'"
    with pytest.raises(ValueError, match=match):
        guard(torch.ones(1), mode=mode)
    with pytest.raises(ValueError, match=match):
        immutable_inputs(mode=mode)


def test_bogus_environment_variable_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMMUTORCH_MODE", "bogus")
    f = immutable_inputs(lambda x: x + 1)
    with pytest.raises(ValueError, match=r"IMMUTORCH_MODE must be one of .*got 'bogus'"):
        f(torch.ones(1))
    with pytest.raises(ValueError, match="IMMUTORCH_MODE"), guard(torch.ones(1)):
        pass


def test_decorating_a_non_callable_and_unknown_only() -> None:
    with pytest.raises(TypeError, match="decorates functions"):
        immutable_inputs(3)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"names \['nope'\].*parameters are \['x'\]"):
        immutable_inputs(only=("nope",))(lambda x: x)


# -- sparse, meta, zero-size, complex, integer, bool, Parameter, inference tensors --------------
def _sparse() -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        i = torch.tensor([[0, 1, 2], [2, 0, 1]])
        return torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0, 3.0]), (3, 3)).coalesce()


@pytest.mark.parametrize("write", ["values", "mul_", "zero_"])
def test_sparse_coo_writes_are_caught(write: str) -> None:
    s = _sparse()
    dense = s.to_dense()
    writes = {
        "values": lambda: s._values().add_(1),
        "mul_": lambda: s.mul_(2),
        "zero_": lambda: s.zero_(),
    }
    with pytest.raises(ImmutableTensorError, match="guard argument 0"), guard(s):
        writes[write]()
    assert torch.equal(s.to_dense(), dense)


def test_sparse_coo_clone_mode_and_reads() -> None:
    s = _sparse()
    dense = s.to_dense()
    out = clone_call(lambda t: t.mul_(2), s)
    assert torch.equal(out.to_dense(), dense * 2)
    assert torch.equal(s.to_dense(), dense)
    with guard(s):
        assert torch.equal((s * 3).to_dense(), dense * 3)
        torch.sparse.sum(s)


def test_meta_tensors() -> None:
    m = torch.empty(3, 4, device="meta")
    with pytest.raises(ImmutableTensorError, match=r"shape \[3, 4\]"), guard(m):
        m.add_(1)
    with guard(m):
        torch.empty(3, 4, device="meta").add_(1)  # no bytes to compare: never confused
        (m * 2).add_(1)
    out = clone_call(lambda t: t.add_(1), m)
    assert out.device.type == "meta" and out.shape == (3, 4)


def test_zero_size_tensors() -> None:
    z = torch.empty(0, 3)
    with pytest.raises(ImmutableTensorError), guard(z):
        z.add_(1)
    with guard(z):
        torch.empty(0, 3).add_(1)
        torch.empty(0).fill_(2)
    out = clone_call(lambda t: t.unsqueeze_(0).add_(1), z)
    assert out.shape == (1, 0, 3) and z.shape == (0, 3)


@pytest.mark.parametrize("how", ["direct", "conj_view", "as_real", "imag"])
def test_complex_and_conj_views(how: str) -> None:
    c = torch.randn(3, dtype=torch.complex64)
    snapshot = Snapshot.of(c)
    writes = {
        "direct": lambda: c.mul_(2j),
        "conj_view": lambda: c.conj().mul_(2),
        "as_real": lambda: torch.view_as_real(c).add_(1),
        "imag": lambda: c.imag.zero_(),
    }
    with pytest.raises(ImmutableTensorError), guard(c):
        writes[how]()
    assert snapshot.matches(c)


def test_clone_mode_on_a_conj_view() -> None:
    c = torch.randn(3, dtype=torch.complex64)
    cc = c.conj()
    assert cc.is_conj()
    expected = cc.clone().mul_(2j).add_(1)
    snapshot = Snapshot.of(c)
    out = clone_call(lambda t: t.mul_(2j).add_(1), cc)
    assert torch.equal(out.resolve_conj(), expected.resolve_conj())
    assert snapshot.matches(c) and cc.is_conj()


def test_clone_mode_on_a_neg_view() -> None:
    n = torch._neg_view(torch.arange(3.0))
    expected = n.clone().add_(1)
    out = clone_call(lambda t: t.add_(1), n)
    assert torch.equal(out, expected)
    assert torch.equal(n, -torch.arange(3.0))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool])
def test_integer_and_bool_tensors(dtype: torch.dtype) -> None:
    x = torch.tensor([0, 1, 1, 0], dtype=dtype)
    expected = x.clone().bitwise_not_()
    with pytest.raises(ImmutableTensorError, match="aten::bitwise_not_"), guard(x):
        x.bitwise_not_()
    out = clone_call(lambda t: t.bitwise_not_(), x)
    assert torch.equal(out, expected)
    assert torch.equal(x, torch.tensor([0, 1, 1, 0], dtype=dtype))


def test_parameters() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ImmutableTensorError), guard(p), torch.no_grad():
        p.add_(1)

    def scale(w: Tensor) -> Tensor:
        w.mul_(2)
        return (w * w).sum()

    scale_guarded = immutable_inputs(mode="clone")(scale)
    scale_guarded(p).backward()
    assert torch.equal(p.grad, torch.full((3,), 8.0))
    assert torch.equal(p.detach(), torch.ones(3)) and isinstance(p, torch.nn.Parameter)


def test_inference_tensors() -> None:
    with torch.inference_mode():
        t = torch.ones(3)
    # Unguarded, torch writes and *then* raises (2.13); the guard refuses before the write.
    with pytest.raises(ImmutableTensorError), guard(t):
        t.add_(1)
    assert torch.equal(t, torch.ones(3))
    with pytest.raises(ImmutableTensorError), guard(t), torch.inference_mode():
        t.add_(1)
    assert torch.equal(t, torch.ones(3))
    out = clone_call(lambda x: x.add_(1), t)
    assert torch.equal(out, torch.full((3,), 2.0)) and torch.equal(t, torch.ones(3))


def test_tensors_created_in_inference_mode_inside_a_block_guard() -> None:
    with guard(), torch.inference_mode():
        t = torch.zeros(2)
        t.add_(1)
    assert torch.equal(t, torch.ones(2))


# -- a wrapper subclass ------------------------------------------------------------------------
class Wrapper(Tensor):
    """A minimal wrapper subclass: the data lives in ``inner``."""

    inner: Tensor

    @staticmethod
    def __new__(cls, inner: Tensor) -> Wrapper:
        return Tensor._make_wrapper_subclass(  # type: ignore[attr-defined,no-any-return]
            cls, inner.shape, dtype=inner.dtype, device=inner.device, strides=inner.stride()
        )

    def __init__(self, inner: Tensor) -> None:
        self.inner = inner

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, Tensor], meta: Any, size: Any, stride: Any) -> Any:
        return Wrapper(inner["inner"])

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Wrapper({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def unwrap(t: Any) -> Any:
            return t.inner if isinstance(t, Wrapper) else t

        out = func(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs or {}))
        if func._schema.is_mutable and args and isinstance(args[0], Wrapper):
            return args[0]
        return pytree.tree_map(
            lambda t: Wrapper(t) if type(t) is Tensor else t,
            out,
        )


def test_wrapper_subclass_writes_are_caught() -> None:
    w = Wrapper(torch.zeros(3))
    with pytest.raises(ImmutableTensorError, match="aten::add_"), guard(w):
        w.add_(1)
    assert torch.equal(w.inner, torch.zeros(3))
    with pytest.raises(ImmutableTensorError), guard(w):
        w.inner[1:].fill_(5)  # the memory underneath is protected too
    with guard(w):
        other = Wrapper(torch.zeros(3))
        other.add_(1)
        (w * 2).add_(1)
    assert torch.equal(other.inner, torch.ones(3))


def test_wrapper_subclass_warn_and_clone() -> None:
    w = Wrapper(torch.zeros(3))
    with pytest.warns(MutationWarning) as record, guard(w, mode="warn"):
        w.add_(1)
    assert len(record) == 1
    assert torch.equal(w.inner, torch.ones(3))

    out = clone_call(lambda t: t.mul_(5).add_(1), w)
    assert isinstance(out, Wrapper)
    assert torch.equal(out.inner, torch.full((3,), 6.0))
    assert torch.equal(w.inner, torch.ones(3))


def test_wrapper_subclass_in_the_corpus_oracle() -> None:
    w = Wrapper(torch.arange(4.0))
    expected = Wrapper(torch.arange(4.0)).inner.clone().mul_(-1)
    result = clone_call(lambda t: t.mul_(-1), w)
    assert_same(result.inner, expected)


# -- nested tensors -----------------------------------------------------------------------------
def test_jagged_nested_tensor() -> None:
    nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    with pytest.raises(ImmutableTensorError, match=r"shape \[2, j\d+\]"), guard(nt):
        nt.mul_(2)
    assert torch.equal(nt.values(), torch.ones(5))
    out = clone_call(lambda t: t.mul_(2), nt)
    assert torch.equal(out.values(), torch.full((5,), 2.0))
    assert torch.equal(nt.values(), torch.ones(5))


def test_strided_nested_tensor() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    before = nt.clone()
    with pytest.raises(ImmutableTensorError, match=r"shape \[2\]"), guard(nt):
        nt.mul_(2)
    assert all(torch.equal(a, b) for a, b in zip(nt.unbind(), before.unbind()))
    out = clone_call(lambda t: t.mul_(2), nt)
    assert torch.equal(out.unbind()[1], torch.full((3,), 2.0))
    assert all(torch.equal(a, b) for a, b in zip(nt.unbind(), before.unbind()))
