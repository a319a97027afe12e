"""Clone mode (copy-on-write): copies made, autograd, aliasing inside the callee, composition."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import pytest
import torch
from corpus import WRITES, Pattern, Snapshot, assert_same, copy_value, ids
from torch import Tensor

import immutorch
from immutorch import (
    ImmutableTensorError,
    MutationWarning,
    _clone,
    clone_stats,
    guard,
    immutable_inputs,
)

pytestmark = pytest.mark.both_backends


@pytest.fixture(autouse=True, params=["all", "arguments"])
def scope(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs through both backends: IMMUTORCH_SCOPE overrides the scope each
    decorator, guard and watch asks for."""
    monkeypatch.setenv("IMMUTORCH_SCOPE", request.param)
    return str(request.param)


def copies_since(before: immutorch.CloneStats) -> tuple[int, int]:
    now = clone_stats()
    return now.copies - before.copies, now.bytes_copied - before.bytes_copied


# -- what clone mode costs ---------------------------------------------------------------------
def test_reading_callee_copies_nothing() -> None:
    @immutable_inputs(mode="clone")
    def read(x: Tensor, y: Tensor) -> Tensor:
        return x.t()[0] + y.sum() + x.detach()[1:].mean()

    x, y = torch.randn(4, 4), torch.randn(3)
    expected = x.t()[0] + y.sum() + x[1:].mean()
    before = clone_stats()
    assert torch.equal(read(x, y), expected)
    assert copies_since(before) == (0, 0)


def test_two_writes_into_one_input_copy_once() -> None:
    @immutable_inputs(mode="clone")
    def write_twice(x: Tensor) -> Tensor:
        x.add_(1)
        x[0].mul_(2)
        x.t()[1].zero_()
        return x

    x = torch.arange(12.0).reshape(3, 4)
    expected = write_twice.__wrapped__(x.clone())
    snapshot = Snapshot.of(x)
    before = clone_stats()
    assert_same(write_twice(x), expected)
    assert copies_since(before) == (1, x.untyped_storage().nbytes())
    assert snapshot.matches(x)


def test_guard_stats_count_its_own_copies() -> None:
    x = torch.zeros(4)
    g = immutorch.guard(mode="clone")
    with g:
        torch.nn.ReLU(inplace=True)(x)
        torch.nn.ReLU(inplace=True)(x)
    assert (g.stats.copies, g.stats.bytes_copied) == (2, 2 * 16)
    assert torch.equal(x, torch.zeros(4))


def test_a_copy_costs_the_whole_storage_of_a_view() -> None:
    @immutable_inputs(mode="clone")
    def zero_first(row: Tensor) -> Tensor:
        return row.zero_()

    base = torch.ones(4, 8)
    before = clone_stats()
    out = zero_first(base[1])
    assert torch.equal(out, torch.zeros(8)) and torch.equal(base, torch.ones(4, 8))
    assert copies_since(before) == (1, base.untyped_storage().nbytes())


def test_two_inputs_written_copy_twice() -> None:
    @immutable_inputs(mode="clone")
    def write_both(a: Tensor, b: Tensor) -> Tensor:
        a.add_(1)
        b.mul_(2)
        return a + b

    a, b = torch.ones(3), torch.ones(5, dtype=torch.float64)
    before = clone_stats()
    assert torch.equal(write_both(a, b[:3]), torch.full((3,), 4.0, dtype=torch.float64))
    assert copies_since(before) == (2, 12 + 40)
    assert torch.equal(a, torch.ones(3)) and torch.equal(b, torch.ones(5, dtype=torch.float64))


def test_same_tensor_passed_twice_both_parameters_see_the_write() -> None:
    @immutable_inputs(mode="clone")
    def f(a: Tensor, b: Tensor) -> Tensor:
        a.add_(1)
        return b * 10

    x = torch.zeros(3)
    expected = f.__wrapped__(x.clone(), x.clone())
    assert torch.equal(expected, torch.zeros(3))  # two copies do not alias: build it by hand
    y = torch.zeros(3)
    expected = f.__wrapped__(y, y)
    before = clone_stats()
    assert torch.equal(f(x, x), expected)
    assert copies_since(before) == (1, 12)
    assert torch.equal(x, torch.zeros(3))


def test_base_and_view_passed_together_see_each_others_writes() -> None:
    @immutable_inputs(mode="clone")
    def f(whole: Tensor, tail: Tensor, box: dict[str, Tensor]) -> Tensor:
        whole.add_(1)
        return torch.cat([tail, box["t"]])

    x = torch.zeros(4)
    y = torch.zeros(4)
    expected = f.__wrapped__(y, y[2:], {"t": y.t()})
    before = clone_stats()
    assert torch.equal(f(x, x[2:], {"t": x.t()}), expected)
    assert copies_since(before)[0] == 1
    assert torch.equal(x, torch.zeros(4))


@pytest.mark.parametrize("op", ["unsqueeze_", "t_", "transpose_", "as_strided_", "set_"])
def test_metadata_write_changes_the_callees_view_only(op: str) -> None:
    calls = {
        "unsqueeze_": lambda t: t.unsqueeze_(0),
        "t_": lambda t: t.t_(),
        "transpose_": lambda t: t.transpose_(0, 1),
        "as_strided_": lambda t: t.as_strided_((2,), (3,)),
        "set_": lambda t: t.set_(torch.ones(7)),
    }

    @immutable_inputs(mode="clone")
    def f(x: Tensor) -> Tensor:
        out = calls[op](x)
        assert out is x
        return x.clone()

    x = torch.arange(6.0).reshape(2, 3)
    expected = calls[op](x.clone()).clone()
    snapshot = Snapshot.of(x)
    before = clone_stats()
    assert_same(f(x), expected)
    assert copies_since(before) == (0, 0)
    assert snapshot.matches(x)


def test_metadata_then_data_write() -> None:
    @immutable_inputs(mode="clone")
    def f(x: Tensor) -> Tensor:
        x.t_()
        x[0].fill_(-1)
        return x

    x = torch.arange(6.0).reshape(2, 3)
    expected = f.__wrapped__(x.clone())
    snapshot = Snapshot.of(x)
    assert_same(f(x), expected)
    assert snapshot.matches(x)


def test_views_made_before_the_write_follow_the_copy() -> None:
    @immutable_inputs(mode="clone")
    def f(x: Tensor) -> list[Tensor]:
        views = [x[0], x.t(), x.view(-1)[2:], x.detach(), x.data, *x.unbind(1)]
        x.add_(100)
        return [v.clone() for v in views]

    x = torch.arange(6.0).reshape(2, 3)
    expected = f.__wrapped__(x.clone())
    assert_same(f(x), expected)
    assert torch.equal(x, torch.arange(6.0).reshape(2, 3))


# -- autograd ----------------------------------------------------------------------------------
def _loss(result: Any) -> Any:
    """A scalar from every differentiable tensor the callee returned, or None."""
    parts: list[Tensor] = []

    def collect(value: Any) -> None:
        if isinstance(value, Tensor) and value.requires_grad:
            parts.append(
                (value.float() * torch.linspace(1, 2, value.numel()).view(value.shape)).sum()
            )
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)

    collect(result)
    return torch.stack(parts).sum() if parts else None


def _run_grad(p: Pattern, leaf: bool, clone: bool) -> tuple[Any, Tensor, Any]:
    """(result, gradient reaching the caller's leaf, caller's x) for one call."""
    x0, extra = p.make()
    base = x0.detach().clone().requires_grad_(True)
    x = base if leaf else base * 2
    fn = immutable_inputs(mode="clone")(p.fn) if clone else p.fn
    result = fn(x, *copy_value(extra))
    loss = _loss(result)
    if loss is not None:
        loss.backward()
    return result, base.grad, x


def _autograd_cases(leaf: bool) -> list[Pattern]:
    """Write patterns the unguarded call can run on a float input that requires grad."""
    out = []
    for p in WRITES:
        if p.effect != "data" or not p.dtype.is_floating_point or not p.isolable:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _run_grad(p, leaf, clone=False)
        except RuntimeError:
            continue
        out.append(p)
    return out


LEAF_CASES = _autograd_cases(leaf=True)
NON_LEAF_CASES = _autograd_cases(leaf=False)


def test_autograd_cases_are_many() -> None:
    assert len(LEAF_CASES) >= 4
    assert len(NON_LEAF_CASES) >= 15


@pytest.mark.parametrize("p", LEAF_CASES, ids=ids(LEAF_CASES))
def test_gradients_leaf(p: Pattern) -> None:
    expected, expected_grad, _ = _run_grad(p, leaf=True, clone=False)
    result, grad, x = _run_grad(p, leaf=True, clone=True)
    assert_same(result, expected)
    assert (grad is None) == (expected_grad is None)
    if grad is not None:
        assert torch.equal(grad, expected_grad)
    assert x._version == 0 and x.grad_fn is None and x.is_leaf


@pytest.mark.parametrize("p", NON_LEAF_CASES, ids=ids(NON_LEAF_CASES))
def test_gradients_non_leaf(p: Pattern) -> None:
    expected, expected_grad, _ = _run_grad(p, leaf=False, clone=False)
    x0, extra = p.make()
    base = x0.detach().clone().requires_grad_(True)
    x = base * 2
    grad_fn = x.grad_fn
    snapshot = Snapshot.of(x)
    result = immutable_inputs(mode="clone")(p.fn)(x, *copy_value(extra))
    assert_same(result, expected)
    assert x.grad_fn is grad_fn, "the caller's autograd history must not change"
    assert snapshot.matches(x)
    loss = _loss(result)
    if loss is not None:
        loss.backward()
    assert (base.grad is None) == (expected_grad is None)
    if base.grad is not None:
        assert torch.equal(base.grad, expected_grad)


def test_backward_through_tensors_saved_before_the_call() -> None:
    @immutable_inputs(mode="clone")
    def scale(x: Tensor) -> Tensor:
        x.mul_(3)
        return x.sum()

    base = torch.randn(5, requires_grad=True)
    x = base.exp()
    saved = x * x  # saves x for backward
    out = scale(x)
    # Unguarded, this backward fails: x was modified by an in-place operation.
    (saved.sum() + out).backward()
    expected_base = base.detach().clone().requires_grad_(True)
    ex = expected_base.exp()
    ((ex * ex).sum() + (ex.detach() * 0 + ex * 3).sum()).backward()
    assert torch.allclose(base.grad, expected_base.grad)


def test_leaf_gradient_through_a_written_alias() -> None:
    # Unguarded this is an error (in-place on a leaf that requires grad); through the clone
    # boundary the callee writes its alias and the gradient still reaches the caller's leaf.
    @immutable_inputs(mode="clone")
    def f(w: Tensor) -> Tensor:
        w.mul_(2)
        return (w * w).sum()

    w = torch.tensor([1.0, 2.0], requires_grad=True)
    f(w).backward()
    assert torch.equal(w.grad, torch.tensor([8.0, 16.0]))
    assert torch.equal(w, torch.tensor([1.0, 2.0])) and w._version == 0


def test_callee_turns_grad_on_under_callers_no_grad() -> None:
    @immutable_inputs(mode="clone")
    def f(w: Tensor) -> Tensor:
        with torch.enable_grad():
            return (w * 3).sum()

    w = torch.ones(2, requires_grad=True)
    with torch.no_grad():
        out = f(w)
    out.backward()
    assert torch.equal(w.grad, torch.full((2,), 3.0))


# -- composition: the strictest mode wins ------------------------------------------------------
MODES = ["off", "warn", "clone", "raise"]
STRICT = {m: i for i, m in enumerate(MODES)}


@pytest.mark.parametrize("inner", MODES)
@pytest.mark.parametrize("outer", MODES)
def test_nested_decorators_strictest_wins(outer: str, inner: str) -> None:
    @immutable_inputs(mode=inner)  # type: ignore[arg-type]
    def write(x: Tensor) -> Tensor:
        x.add_(1)
        return x

    @immutable_inputs(mode=outer)  # type: ignore[arg-type]
    def call(x: Tensor) -> Tensor:
        return write(x) * 1

    x = torch.zeros(3)
    expected = torch.ones(3)
    winner = max(outer, inner, key=STRICT.__getitem__)
    if winner == "raise":
        with pytest.raises(ImmutableTensorError, match="aten::add_"):
            call(x)
        assert torch.equal(x, torch.zeros(3))
    elif winner == "clone":
        assert torch.equal(call(x), expected)
        assert torch.equal(x, torch.zeros(3)) and x._version == 0
    elif winner == "warn":
        with pytest.warns(MutationWarning) as record:
            assert torch.equal(call(x), expected)
        assert len(record) == 1
        assert torch.equal(x, expected)
    else:
        assert torch.equal(call(x), expected)
        assert torch.equal(x, expected)


def test_clone_guard_isolates_module_calls() -> None:
    mel = torch.randn(2, 8, 5)
    snapshot = Snapshot.of(mel)
    model = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Dropout(0.0))
    expected = model(mel.clone())
    with immutorch.guard(mode="clone"):
        out = model(mel)
    assert_same(out, expected)
    assert snapshot.matches(mel)


# -- every kind of view made inside the callee follows the copy --------------------------------
VIEWS = {
    "split": lambda x: x.split(2, 1)[1],
    "unbind": lambda x: x.unbind()[1],
    "chunk": lambda x: x.chunk(2, 1)[1],
    "tensor_split": lambda x: x.tensor_split(2, 1)[1],
    "unfold": lambda x: x.unfold(1, 2, 2),
    "view_as_real": lambda x: torch.view_as_real(x.view(torch.complex64)),
    "real": lambda x: x.view(torch.complex64).real,
    "imag": lambda x: x.view(torch.complex64).imag,
    "conj": lambda x: x.view(torch.complex64).conj(),
    "neg_view": lambda x: torch._neg_view(x),
    "permute": lambda x: x.permute(1, 0),
    "movedim": lambda x: x.movedim(0, 1),
    "mT": lambda x: x.mT,
    "diagonal": lambda x: x.diagonal(),
    "narrow": lambda x: x.narrow(1, 1, 2),
    "none_index": lambda x: x[None],
    "ellipsis": lambda x: x[..., 0],
    "step": lambda x: x[:, ::2],
    "as_strided": lambda x: x.as_strided((2,), (3,)),
    "unflatten": lambda x: x.unflatten(1, (2, 2)),
    "view_dtype": lambda x: x.view(torch.int32),
    "alias": lambda x: torch.ops.aten.alias(x),
    "squeeze": lambda x: x[:1].squeeze(0),
    "to_same_dtype": lambda x: x.to(torch.float32),
    "contiguous": lambda x: x.contiguous(),
}


def _bump(t: Tensor) -> None:
    if t.is_complex():
        t.mul_(2j)
    elif t.dtype == torch.int32:
        t.add_(7)
    else:
        t.add_(1.5)


def _plain(t: Tensor) -> Tensor:
    return t.resolve_conj().resolve_neg().clone()


@pytest.mark.parametrize("through", ["base", "view"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_every_view_follows_the_copy(view: str, through: str, scope: str) -> None:
    from immutorch._backends.scoped import bit_views_broken

    if scope == "arguments" and view in ("conj", "neg_view") and bit_views_broken():
        # torch < 2.9 cannot run ops on such a view of a tensor subclass: refused, clearly.
        with pytest.raises(RuntimeError, match='scope="all"'):
            immutable_inputs(mode="clone")(VIEWS[view])(torch.zeros(2, 4))
        return

    def f(x: Tensor) -> Tensor:
        v = VIEWS[view](x)
        if through == "base":
            _bump(x)
            return _plain(v)
        _bump(v)
        return _plain(x)

    x = torch.arange(8.0).reshape(2, 4)
    expected = f(x.clone())
    snapshot = Snapshot.of(x)
    before = clone_stats()
    assert_same(immutable_inputs(mode="clone")(f)(x), expected)
    assert snapshot.matches(x)
    assert copies_since(before)[0] == 1


def _groups_made(monkeypatch: pytest.MonkeyPatch) -> list[_clone.CowGroup]:
    made: list[_clone.CowGroup] = []
    init = _clone.CowGroup.__init__

    def counting(self: _clone.CowGroup, *args: Any) -> None:
        init(self, *args)
        made.append(self)

    monkeypatch.setattr(_clone.CowGroup, "__init__", counting)
    return made


def test_a_group_is_made_only_where_a_write_or_a_question_needs_it(
    monkeypatch: pytest.MonkeyPatch, every_op_backend: str, scope: str
) -> None:
    """A callee that reads its alias and the views it takes: no copy, and with the native
    backend no copy-on-write group either (the alias and its views join one only where a
    write into them comes, or Python asks). Where one is needed, the alias, a view of it made
    before, and another alias of the same memory handed over with it all join the one group,
    and follow the copy together."""
    made = _groups_made(monkeypatch)

    class Reads(torch.nn.Module):
        def forward(self, a: Tensor) -> Tensor:
            return sum((a[i].mean() for i in range(a.shape[0])), torch.zeros(()))

    class Writes(torch.nn.Module):
        def forward(self, a: Tensor, tail: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            row = a[1]  # a view, made before the write
            tail.mul_(10)  # a write through the other alias of the same memory
            return a.clone(), row.clone(), tail.clone()

    x = torch.arange(12.0).reshape(4, 3)
    before = clone_stats()
    with guard(x, mode="clone"):
        read = Reads()(x)
        if every_op_backend == "native" and scope == "all":
            assert made == []
        got = Writes()(x, x[1:])
    want = Writes()(*(lambda c: (c, c[1:]))(x.clone()))
    assert torch.equal(read, Reads()(x))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(x, torch.arange(12.0).reshape(4, 3))
    assert copies_since(before) == (1, x.numel() * x.element_size())
    assert len([m for m in made if m.copied]) == 1


def test_an_alias_asked_for_its_group_joins_one_at_once(every_op_backend: str) -> None:
    seen: list[Optional[_clone.CowGroup]] = []

    class Asks(torch.nn.Module):
        def forward(self, a: Tensor) -> Tensor:
            view = a.t()
            seen.extend([_clone.group_of(a), _clone.group_of(view), _clone.group_of(a.data)])
            return a

    x = torch.ones(2, 3)
    with guard(x, mode="clone"):
        assert Asks()(x) is x  # unwritten: the caller's own tensor back
    group = seen[0]
    assert group is not None and all(s is group for s in seen)
