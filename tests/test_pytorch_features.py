"""PyTorch's own features under every front door, mode and scope, against the unguarded oracle.

Serialization of the aliases a boundary hands over (pickle, torch.save, deepcopy), messages
built from broken objects, activation checkpointing, autocast, parametrizations and custom ops.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from typing import Any, Callable

import pytest
import torch
from corpus import assert_same
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import immutorch
from immutorch._compat import current_dispatch_mode
from immutorch._registry import STATE

MODES = ["raise", "warn", "clone"]
SCOPES = ["all", "arguments"]
DOORS = ["decorator", "guard_named", "guard_block"]


def _guarded(door: str, mode: str, scope: str, fn: Callable[[Tensor], Any], x: Tensor) -> Any:
    if door == "decorator":
        return immutorch.immutable_inputs(mode=mode, scope=scope)(fn)(x)  # type: ignore[arg-type]
    tensors = (x,) if door == "guard_named" else ()
    with immutorch.guard(*tensors, mode=mode, scope=scope):  # type: ignore[arg-type]
        return fn(x)


# -- aliases serialize as the plain tensor they stand for -------------------------------------
def _saved_and_loaded(t: Tensor) -> Tensor:
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # the default since torch 2.6; 2.4 warns without it


def _deepcopy_pair(t: Tensor) -> Any:
    a, b = copy.deepcopy([t, t[1:]])
    a.add_(1)  # the two copies still share one new storage, and it is not the caller's
    return [a, b]


SERIALIZERS: dict[str, Callable[[Tensor], Any]] = {
    "pickle": lambda t: pickle.loads(pickle.dumps(t)),
    "pickle_view": lambda t: pickle.loads(pickle.dumps(t.t()[1:])),
    "torch_save": _saved_and_loaded,
    "deepcopy": lambda t: copy.deepcopy(t).mul_(2),
    "deepcopy_pair": _deepcopy_pair,
    "deepcopy_module": lambda t: copy.deepcopy(torch.nn.ParameterList([t])),
}


def _plain(value: Any) -> None:
    for t in value if isinstance(value, list) else [value]:
        t = next(iter(t.parameters())) if isinstance(t, torch.nn.Module) else t
        assert type(t) in (torch.Tensor, torch.nn.Parameter)
        assert not t.__dict__, t.__dict__


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", list(SERIALIZERS))
def test_aliases_serialize_as_plain_tensors(
    how: str, mode: str, scope: str, requires_grad: bool
) -> None:
    if requires_grad and how in ("deepcopy", "deepcopy_pair"):
        pytest.skip("in-place on a leaf that requires grad fails unguarded too")
    serialize = SERIALIZERS[how]
    x = torch.randn(3, 4, requires_grad=requires_grad)
    before = x.detach().clone()
    expected = serialize(x)
    result = immutorch.immutable_inputs(mode=mode, scope=scope)(serialize)(x)  # type: ignore[arg-type]
    _plain(result)
    if isinstance(expected, torch.nn.Module):
        expected, result = list(expected.parameters()), list(result.parameters())
    assert_same(result, expected)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", MODES)
def test_deepcopy_memo_never_outlives_its_keys(mode: str, scope: str) -> None:
    # deepcopy's memo maps id(original) to its copy; an entry whose original has died can be
    # claimed by a later object with the same id, which then gets the wrong copy (seen in CI:
    # the view of a deep-copied pair came back as the whole tensor). Every tensor entry must
    # belong to an object the memo keeps alive.
    def copies(t: Tensor) -> list[tuple[bool, bool]]:
        memo: dict[int, Any] = {}
        copy.deepcopy([t, t[1:]], memo)
        alive = {id(o) for o in memo.get(id(memo), [])} | {id(t)}
        return [k in alive for k, v in memo.items() if isinstance(v, Tensor)]

    entries = immutorch.immutable_inputs(mode=mode, scope=scope)(copies)(torch.randn(3, 4))  # type: ignore[arg-type]
    assert entries and all(entries)


# -- building a message never raises -----------------------------------------------------------
class _BrokenParameters(torch.nn.Module):
    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broken on purpose")


class _BrokenClass:
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise RuntimeError("broken on purpose")


class _BrokenTree(torch.nn.Module):
    """Writes into its argument; naming it (named_modules) fails."""

    def named_modules(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broken on purpose")

    def forward(self, x: Tensor) -> Tensor:
        return x.add_(1)


def _write_beside_broken_objects(x: Tensor) -> None:
    half_built = torch.nn.Linear.__new__(torch.nn.Linear)  # what copy.deepcopy holds midway
    broken, odd = _BrokenParameters(), _BrokenClass()
    x.add_(1)
    del half_built, broken, odd


def _write_in_a_broken_module(x: Tensor) -> None:
    _BrokenTree()(x)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("body", [_write_beside_broken_objects, _write_in_a_broken_module])
def test_a_refusal_survives_broken_objects(body: Callable[[Tensor], None], scope: str) -> None:
    x = torch.zeros(3)
    with pytest.raises(immutorch.ImmutableTensorError, match="aten::add_"):
        with immutorch.guard(scope=scope):  # type: ignore[arg-type]
            body(x)
    assert torch.equal(x, torch.zeros(3))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("body", [_write_beside_broken_objects, _write_in_a_broken_module])
def test_a_warning_survives_broken_objects(body: Callable[[Tensor], None], scope: str) -> None:
    x = torch.zeros(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with immutorch.guard(mode="warn", scope=scope):  # type: ignore[arg-type]
            body(x)
    assert [type(w.message) for w in caught] == [immutorch.MutationWarning]
    assert torch.equal(x, torch.ones(3))


@pytest.mark.parametrize("mode", MODES)
def test_deepcopy_of_a_module_inside_a_block(mode: str) -> None:
    bn = torch.nn.BatchNorm1d(4)
    expected = copy.deepcopy(bn).state_dict()
    with immutorch.guard(mode=mode):  # type: ignore[arg-type]
        result = copy.deepcopy(bn).state_dict()
    assert_same(list(result.values()), list(expected.values()))


# -- activation checkpointing, autocast, parametrizations ---------------------------------------
class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(torch.relu(self.lin(x)))


def _checkpointed(reentrant: bool) -> Callable[[Tensor], Any]:
    block = Block()

    def step(x: Tensor) -> list[Tensor]:
        out = checkpoint(block, x, use_reentrant=reentrant)
        out.sum().backward()  # the gradient of x is compared by the test, after the call
        grads = [p.grad.clone() for p in block.parameters() if p.grad is not None]
        block.zero_grad(set_to_none=True)
        return [out.detach(), *grads]

    return step


def _autocast(x: Tensor) -> Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return Block()(x).float()


def _weight_norm(x: Tensor) -> Tensor:
    torch.manual_seed(0)
    lin = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 4))
    return lin(x)


class _Symmetric(torch.nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w.triu() + w.triu(1).transpose(-1, -2)


def _parametrized(x: Tensor) -> Tensor:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", _Symmetric())
    with torch.nn.utils.parametrize.cached():
        return lin(x) + lin(x)


FEATURES: dict[str, Callable[[], Callable[[Tensor], Any]]] = {
    "checkpoint_reentrant": lambda: _checkpointed(True),
    "checkpoint": lambda: _checkpointed(False),
    "autocast": lambda: _autocast,
    "weight_norm": lambda: _weight_norm,
    "parametrize": lambda: _parametrized,
}


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_computes_what_it_computes_unguarded(
    feature: str, door: str, mode: str, scope: str
) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 4, requires_grad=True)
    x_oracle = x.detach().clone().requires_grad_()
    expected = FEATURES[feature]()(x_oracle)
    result = _guarded(door, mode, scope, FEATURES[feature](), x)
    assert_same(result, expected)
    if x_oracle.grad is not None:
        assert x.grad is not None
        assert_same(x.grad, x_oracle.grad, "x.grad")


class _InPlaceInput(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(2) + 1


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("door", DOORS)
def test_a_write_inside_checkpoint_is_refused(door: str, scope: str, reentrant: bool) -> None:
    def body(t: Tensor) -> Any:
        return checkpoint(_InPlaceInput(), t, use_reentrant=reentrant)

    x = torch.randn(3, 4)
    before = x.clone()
    with pytest.raises(immutorch.ImmutableTensorError, match="aten::mul_"):
        _guarded(door, "raise", scope, body, x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("mode", MODES)
def test_a_block_guard_holds_through_reentrant_checkpoints(mode: str) -> None:
    # Reentrant checkpoint calls the module again inside a backward node, where the engine puts
    # back the thread's dispatch modes after the node: the block's mode must still be the one on
    # the stack afterwards (torch 2.4.1 and 2.9.1 crashed at a later op when it was not), and
    # still refuse a write into the named tensor.
    torch.manual_seed(1)
    x = torch.randn(3, 4, requires_grad=True)
    x_oracle = x.detach().clone().requires_grad_()
    step, oracle_step = _checkpointed(True), _checkpointed(True)
    expected = [oracle_step(x_oracle) for _ in range(3)]
    stack = torch._C._len_torch_dispatch_stack()
    with immutorch.guard(x, mode=mode, scope="arguments"):  # type: ignore[arg-type]
        results = [step(x) for _ in range(3)]
        on_top = current_dispatch_mode()
        assert on_top is None or on_top is STATE.mode_handle
        if mode == "raise":
            with pytest.raises(immutorch.ImmutableTensorError):
                x.detach().add_(1)
    assert torch._C._len_torch_dispatch_stack() == stack
    assert_same(results, expected)
    assert_same(x.grad, x_oracle.grad, "x.grad")


# -- custom ops ---------------------------------------------------------------------------------
# Schemas given, not inferred: torch 2.4 cannot infer one from this module's string annotations.
@torch.library.custom_op(
    "immutorch_tests::scale_", mutates_args=("x",), schema="(Tensor(a!) x) -> ()"
)
def _declared_write(x: Tensor) -> None:
    x.mul_(2)


@torch.library.custom_op(
    "immutorch_tests::scale_undeclared", mutates_args=(), schema="(Tensor x) -> Tensor"
)
def _undeclared_write(x: Tensor) -> Tensor:
    x.mul_(2)  # the schema says it writes nothing: a dispatch mode cannot see this
    return x.clone()


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("door", DOORS)
def test_a_custom_op_that_declares_its_write_is_refused(door: str, scope: str) -> None:
    x = torch.randn(3)
    before = x.clone()
    with pytest.raises(immutorch.ImmutableTensorError, match="immutorch_tests::scale_"):
        _guarded(door, "raise", scope, _declared_write, x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_custom_op_that_declares_its_write_is_isolated_in_clone_mode(scope: str) -> None:
    def body(t: Tensor) -> Tensor:
        _declared_write(t)
        return t + 0

    x = torch.randn(3)
    expected = body(x.clone())
    before = x.clone()
    result = immutorch.immutable_inputs(mode="clone", scope=scope)(body)(x)  # type: ignore[arg-type]
    assert_same(result, expected)
    assert torch.equal(x, before)


def test_opcheck_finds_the_write_a_schema_does_not_declare() -> None:
    """immutorch trusts schemas (see docs/pytorch-features.md): torch.library.opcheck is the
    tool that finds a custom op writing what it did not declare."""
    with pytest.raises(Exception, match="mutat"):
        torch.library.opcheck(_undeclared_write, (torch.randn(3),))
