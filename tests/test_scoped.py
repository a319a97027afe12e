"""The scoped backend (``scope="arguments"``): what it intercepts, what it hands the callee and
gives back, and where it differs from the every-op mode by design (each difference pinned).

Corpus, differential and clone tests run through both scopes in their own files; this file holds
what only the scoped backend has.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
import threading
from typing import Any

import pytest
import torch
from corpus import Snapshot, assert_same
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

import immutorch
from immutorch import ImmutableTensorError, MutationWarning, guard, immutable_inputs, readonly
from immutorch._backends.scoped import Protected
from immutorch._registry import STATE

SCOPES = ["all", "arguments"]


# -- what the callee gets, and what the caller gets back ---------------------------------------
def test_the_callee_gets_an_alias_over_the_same_memory_and_no_mode_is_pushed() -> None:
    seen: dict[str, Any] = {}

    @immutable_inputs
    def f(x: Tensor) -> Tensor:
        seen["type"] = type(x)
        seen["ptr"] = x.data_ptr()
        seen["modes"] = list(_get_current_dispatch_mode_stack())
        seen["view"] = type(x[1:])
        seen["fresh"] = type(x * 2)
        return x * 2

    x = torch.randn(4, 5)
    out = f(x)
    assert seen["type"] is Protected and issubclass(Protected, Tensor)
    assert seen["ptr"] == x.data_ptr(), "the alias shares the caller's memory: no copy"
    assert seen["modes"] == [], "scope='arguments' installs no dispatch mode"
    assert seen["view"] is Protected, "views of an argument stay protected"
    assert seen["fresh"] is Tensor, "fresh results are plain tensors"
    assert type(out) is Tensor
    assert STATE.mode_handle is None


@pytest.mark.parametrize("mode", ["raise", "warn", "clone"])
def test_no_protected_alias_leaves_the_call(mode: str) -> None:
    @immutable_inputs(mode=mode)  # type: ignore[arg-type]
    def f(x: Tensor) -> Any:
        return x, x[0], {"t": x.t()}, [x.detach()]

    x = torch.randn(3, 4)
    same, row, d, lst = f(x)
    assert same is x, "an argument returned as it is comes back as the caller's own tensor"
    for t in (row, d["t"], lst[0]):
        assert type(t) is Tensor
        assert t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_a_metadata_write_in_clone_mode_gives_back_the_callees_view() -> None:
    @immutable_inputs(mode="clone")
    def f(x: Tensor) -> Tensor:
        return x.unsqueeze_(0)

    x = torch.randn(3, 4)
    out = f(x)
    assert out.shape == (1, 3, 4) and x.shape == (3, 4)
    assert type(out) is Tensor


def test_gradients_reach_the_callers_tensor() -> None:
    def f(x: Tensor, w: Tensor) -> Tensor:
        return (x[1:] * w).tanh().sum() + x.t().pow(2).mean()

    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(3, 5, requires_grad=True)
    f(x, w).backward()
    expected = (x.grad.clone(), w.grad.clone())  # type: ignore[union-attr]
    x.grad = w.grad = None
    for mode in ("raise", "warn", "clone"):
        immutable_inputs(mode=mode)(f)(x, w).backward()  # type: ignore[call-overload]
        assert torch.equal(x.grad, expected[0]) and torch.equal(w.grad, expected[1])  # type: ignore[arg-type]
        x.grad = w.grad = None


# -- the cost model: which ops reach Python ----------------------------------------------------
def test_ops_on_unrelated_tensors_never_reach_python(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = Protected.__torch_dispatch__.__func__  # type: ignore[attr-defined]

    def spy(cls: type, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        seen.append(str(func))
        return real(cls, func, types, args, kwargs)

    monkeypatch.setattr(Protected, "__torch_dispatch__", classmethod(spy))

    @immutable_inputs(only=("p",))
    def f(p: Tensor, x: Tensor, w: Tensor) -> Tensor:
        h = x
        for _ in range(50):
            h = torch.tanh(h @ w)
        return h + p.sum()

    x, w, p = torch.randn(8, 8), torch.randn(8, 8), torch.randn(3)
    f(p, x, w)
    assert seen == ["aten.sum.default"], seen


# -- what each scope catches: the documented differences ---------------------------------------
@pytest.mark.parametrize("scope", SCOPES)
def test_a_write_through_a_closure_is_caught_by_all_only(scope: str) -> None:
    x = torch.zeros(3)
    alias_outside = x[1:]  # another reference to the memory, made before the call

    @immutable_inputs(scope=scope)  # type: ignore[arg-type]
    def f(x: Tensor) -> None:
        alias_outside.add_(1)

    if scope == "all":
        with pytest.raises(ImmutableTensorError, match="`x`"):
            f(x)
        assert torch.equal(x, torch.zeros(3))
    else:
        f(x)  # by design: only the argument and its views are watched
        assert torch.equal(x, torch.tensor([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("scope", SCOPES)
def test_a_cached_attribute_written_inside_a_module_call(scope: str) -> None:
    class Cached(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            self.cache.mul_(0)  # the same memory as x, reached through an attribute
            return x + 1

    x = torch.ones(3)
    m = Cached()
    m.cache = x  # a plain attribute, not a buffer: not module state
    if scope == "all":
        with pytest.raises(ImmutableTensorError), guard(x, scope="all"):
            m(x)
        assert torch.equal(x, torch.ones(3))
    else:
        with guard(x, scope="arguments"):
            m(x)
        assert torch.equal(x, torch.zeros(3))


@pytest.mark.parametrize("scope", SCOPES)
def test_readonly_marks_on_tensors_that_are_not_arguments(scope: str) -> None:
    table = torch.zeros(3)
    readonly(table)

    @immutable_inputs(scope=scope)  # type: ignore[arg-type]
    def f(x: Tensor) -> Tensor:
        table.add_(1)
        return x

    try:
        if scope == "all":
            with pytest.raises(ImmutableTensorError, match="marked read-only"):
                f(torch.ones(2))
            assert torch.equal(table, torch.zeros(3))
        else:
            f(torch.ones(2))
            assert torch.equal(table, torch.ones(3))
    finally:
        immutorch.writable(table)


@pytest.mark.parametrize("scope", SCOPES)
def test_a_readonly_argument_is_protected_in_both_scopes(scope: str) -> None:
    x = torch.zeros(3)
    readonly(x)
    m = torch.nn.ReLU(inplace=True)
    try:
        with pytest.raises(ImmutableTensorError, match="marked read-only"), guard(scope=scope):  # type: ignore[arg-type]
            m(x)
    finally:
        immutorch.writable(x)


@pytest.mark.parametrize("scope", SCOPES)
def test_the_block_body_is_watched_in_both_scopes(scope: str) -> None:
    x = torch.zeros(3)
    with pytest.raises(ImmutableTensorError), guard(x, scope=scope):  # type: ignore[arg-type]
        x.add_(1)
    with pytest.raises(ImmutableTensorError), guard(scope=scope):  # type: ignore[arg-type]
        x.add_(1)
    assert torch.equal(x, torch.zeros(3))


@pytest.mark.parametrize("scope", SCOPES)
def test_block_guard_memory_made_inside_a_module_call_is_the_blocks_own(scope: str) -> None:
    class Make(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * 2

    x = torch.ones(3)
    with guard(scope=scope):  # type: ignore[arg-type]
        y = Make()(x)
        y.add_(1)  # the block's own memory: no refusal
        torch.nn.ReLU(inplace=True)(y)
        with pytest.raises(ImmutableTensorError):
            torch.nn.ReLU(inplace=True)(x)
    assert torch.equal(y, torch.full((3,), 3.0)) and torch.equal(x, torch.ones(3))


def test_the_mode_steps_off_inside_a_scoped_module_call() -> None:
    # Whichever every-op backend serves (the Python mode on the mode stack, or the native
    # fallback's key): it is on in the block body and off inside the scoped call.
    from immutorch._registry import STATE

    seen: list[bool] = []

    class Look(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(STATE.mode_handle is not None)
            return x + 1

    x = torch.ones(3)
    with guard(mode="clone", scope="arguments"):
        assert STATE.mode_handle is not None  # the block body
        Look()(x)
        assert STATE.mode_handle is not None
    with guard(mode="clone"):
        Look()(x)
    assert seen == [False, True]
    assert STATE.mode_handle is None
    assert _get_current_dispatch_mode_stack() == []


def test_nested_module_calls_do_no_boundary_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from immutorch import _boundaries

    handed: list[str] = []
    real = _boundaries._hand_over_scoped

    def spy(boundary: Any, args: Any, kwargs: Any) -> Any:
        handed.append(type(boundary.module).__name__)
        return real(boundary, args, kwargs)

    monkeypatch.setattr(_boundaries, "_hand_over_scoped", spy)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with guard(x, mode="raise", scope="arguments"):
        model(x)
        model(x)
    assert handed == ["Sequential", "Sequential"]


# -- ways out of the dispatcher ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["raise", "clone"])
def test_numpy_and_dlpack_get_private_memory_under_raise_and_clone(mode: str) -> None:
    x = torch.zeros(3)

    @immutable_inputs(mode=mode)  # type: ignore[arg-type]
    def f(x: Tensor) -> Tensor:
        a = x.numpy()
        a += 1
        torch.utils.dlpack.from_dlpack(x).add_(1)
        return torch.tensor(x.numpy())

    out = f(x)
    assert torch.equal(x, torch.zeros(3))
    # clone: the callee sees its own writes, as unguarded; raise: each escape reads a copy.
    expected = torch.full((3,), 2.0) if mode == "clone" else torch.zeros(3)
    assert torch.equal(out, expected)


def test_numpy_of_a_tensor_that_requires_grad_still_refuses() -> None:
    @immutable_inputs
    def f(x: Tensor) -> Any:
        return x.numpy()

    with pytest.raises(RuntimeError, match="requires grad"):
        f(torch.zeros(3, requires_grad=True))


def test_deepcopy_pickle_and_save_give_plain_tensors() -> None:
    got: dict[str, Any] = {}

    @immutable_inputs
    def f(x: Tensor) -> None:
        got["deepcopy"] = copy.deepcopy(x)
        got["pickle"] = pickle.loads(pickle.dumps(x))
        buffer = io.BytesIO()
        torch.save({"x": x}, buffer)
        buffer.seek(0)
        got["save"] = torch.load(buffer, weights_only=True)["x"]
        got["repr"] = repr(x)

    x = torch.arange(6.0).reshape(2, 3)
    f(x)
    for key in ("deepcopy", "pickle", "save"):
        assert type(got[key]) is Tensor, key
        assert torch.equal(got[key], x)
        assert got[key].data_ptr() != x.data_ptr()
    assert got["repr"] == repr(x)


@pytest.mark.parametrize("mode", ["raise", "warn", "clone"])
def test_set_from_a_protected_source_into_a_plain_tensor(mode: str) -> None:
    x = torch.zeros(3)

    @immutable_inputs(mode=mode)  # type: ignore[arg-type]
    def f(x: Tensor) -> Tensor:
        y = torch.empty(0)
        y.set_(x)  # y would be a second, unwatched reference to x's memory
        y.add_(1)
        return y

    if mode == "raise":
        with pytest.raises(ImmutableTensorError, match="aten::set_"):
            f(x)
        assert torch.equal(x, torch.zeros(3))
    elif mode == "warn":
        with pytest.warns(MutationWarning, match="aten::set_"):
            f(x)
        assert torch.equal(x, torch.ones(3))
    else:
        assert torch.equal(f(x), torch.ones(3))
        assert torch.equal(x, torch.zeros(3))


# -- fallbacks: where no scoped alias can be made, the call runs under the every-op mode -------
def test_a_sparse_argument_falls_back_to_the_every_op_mode() -> None:
    @immutable_inputs
    def f(s: Tensor) -> None:
        s.mul_(2)

    s = torch.eye(3).to_sparse()
    before = s.to_dense().clone()
    with pytest.raises(ImmutableTensorError):
        f(s)
    assert torch.equal(s.to_dense(), before)
    assert STATE.mode_handle is None


def test_a_module_call_with_a_sparse_argument_falls_back_too() -> None:
    class Double(torch.nn.Module):
        def forward(self, s: Tensor) -> Tensor:
            return s.mul_(2)

    s = torch.eye(3).to_sparse()
    with pytest.raises(ImmutableTensorError), guard(s, scope="arguments"):
        Double()(s)
    assert torch.equal(s.to_dense(), torch.eye(3))
    assert STATE.mode_handle is None and STATE.mode_users == 0


# -- other machinery the alias meets -----------------------------------------------------------
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")
def test_torchscript_callee_is_guarded() -> None:
    @torch.jit.script
    def scale_(x: Tensor) -> Tensor:
        return x.mul_(2)

    @immutable_inputs
    def f(x: Tensor) -> Tensor:
        return scale_(x)

    x = torch.ones(3)
    with pytest.raises(ImmutableTensorError, match="aten::mul_"):
        f(x)
    assert torch.equal(x, torch.ones(3))


def test_an_escaped_alias_is_unprotected_after_the_call() -> None:
    kept: list[Tensor] = []

    @immutable_inputs
    def f(x: Tensor) -> None:
        kept.append(x)  # a callee may keep the alias (a cache)

    x = torch.zeros(3)
    f(x)
    kept[0].add_(1)  # the call is over: nothing protects x any more, in either scope
    assert torch.equal(x, torch.ones(3))


def test_another_thread_using_the_alias_is_not_judged_by_this_threads_guard() -> None:
    errors: list[BaseException] = []

    @immutable_inputs
    def f(x: Tensor) -> None:
        def work() -> None:
            try:
                (x * 2).sum()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=work)
        t.start()
        t.join()

    f(torch.ones(3))
    assert errors == []


def test_nested_decorators_hand_the_same_alias_on() -> None:
    types: list[type] = []

    @immutable_inputs(mode="warn")
    def inner(x: Tensor) -> Tensor:
        types.append(type(x))
        return x.add_(1)

    @immutable_inputs(mode="raise")
    def outer(x: Tensor) -> Tensor:
        return inner(x)

    x = torch.zeros(3)
    with pytest.raises(ImmutableTensorError, match="immutable_inputs on"):
        outer(x)
    assert torch.equal(x, torch.zeros(3)) and types == [Protected]


def test_legacy_normalizer_in_clone_mode_copies_the_mel_once_bit_identical() -> None:
    from immutorch._reference import (
        LegacyInputNormalization,
        MelSpectrogramEncoder,
        synthetic_mel,
    )

    torch.manual_seed(0)
    encoder = MelSpectrogramEncoder(LegacyInputNormalization(norm_type="sentence")).eval()
    mel = synthetic_mel(2, 80, 40)
    expected = encoder.encode_mel_spectrogram(mel.clone())
    snapshot = Snapshot.of(mel)
    before = immutorch.clone_stats()
    guarded = immutable_inputs(mode="clone")(encoder.encode_mel_spectrogram)
    assert_same(guarded(mel), expected)
    assert snapshot.matches(mel)
    after = immutorch.clone_stats()
    assert after.copies - before.copies == 1
    assert after.bytes_copied - before.bytes_copied == mel.untyped_storage().nbytes()


def test_scope_is_validated() -> None:
    with pytest.raises(ValueError, match="scope must be one of 'all', 'arguments'"):
        immutable_inputs(scope="everything")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="scope must be one of"):
        guard(scope="args")  # type: ignore[arg-type]


def test_environment_variable_sets_the_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[type] = []

    @immutable_inputs
    def f(x: Tensor) -> None:
        seen.append(type(x))

    monkeypatch.setenv("IMMUTORCH_SCOPE", "all")
    f(torch.ones(1))
    monkeypatch.setenv("IMMUTORCH_SCOPE", "arguments")
    f(torch.ones(1))
    monkeypatch.setenv("IMMUTORCH_SCOPE", "bogus")
    with pytest.raises(ValueError, match="IMMUTORCH_SCOPE"):
        f(torch.ones(1))
    assert seen == [Tensor, Protected]


@pytest.mark.parametrize("scope", SCOPES)
def test_a_watch_in_each_scope(scope: str) -> None:
    from immutorch._boundaries import watch_modules

    class Writes(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            self.cache.zero_()  # the caller's memory, through an attribute
            return x + 1

    class WritesArgument(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x[1:].zero_()

    x = torch.ones(3)
    m = Writes()
    m.cache = x
    watched = (Writes, WritesArgument)
    with watch_modules(lambda mod: isinstance(mod, watched), scope=scope):  # type: ignore[arg-type]
        with pytest.raises(ImmutableTensorError, match="the watch on WritesArgument"):
            WritesArgument()(x)
        if scope == "all":
            with pytest.raises(ImmutableTensorError, match="the watch on Writes"):
                m(x)
        else:
            m(x)
    assert torch.equal(x, torch.ones(3) if scope == "all" else torch.zeros(3))


def test_a_tensor_default_crosses_as_an_alias_or_falls_back() -> None:
    default = torch.zeros(2)

    @immutable_inputs
    def by_keyword(a: int, d: Tensor = default) -> None:
        d.add_(1)

    @immutable_inputs
    def positional_only(a: int, d: Tensor = default, /) -> None:
        d.add_(1)  # cannot be passed by keyword: this call runs under the every-op mode

    for f in (by_keyword, positional_only):
        with pytest.raises(ImmutableTensorError, match="`d`"):
            f(1)
    assert torch.equal(default, torch.zeros(2))


@pytest.mark.parametrize("compiling", [False, True])
def test_global_hooks_are_off_inside_a_scoped_call_and_back_after(
    monkeypatch: pytest.MonkeyPatch, compiling: bool
) -> None:
    """Unless torch.compile is in use in the process: a compiled submodule must still get
    plain tensors at its own boundary, which the hooks make."""
    from immutorch import _boundaries

    monkeypatch.setattr(_boundaries, "compile_in_use", lambda: compiling)

    inside: list[bool] = []

    class Inner(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            inside.append(_boundaries.hooks_installed())
            return x + 1

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x) * 2

    x = torch.ones(3)
    outer = Outer()
    with guard(x, scope="arguments"):
        outer(x)
        assert _boundaries.hooks_installed()
        outer(x)
    assert inside == [compiling, compiling]  # the pre-hook, which does the boundary work
    assert not outer._forward_hooks and not outer._forward_pre_hooks


def test_a_module_that_calls_itself_inside_a_scoped_call() -> None:
    class Recursive(torch.nn.Module):
        def forward(self, x: Tensor, depth: int = 2) -> Tensor:
            if depth == 0:
                return x[1:].add_(1)  # a view of the argument, deep down
            return self(x, depth - 1)

    x = torch.zeros(3)
    m = Recursive()
    for _ in range(2):
        with pytest.raises(ImmutableTensorError, match="aten::add_"), guard(x, scope="arguments"):
            m(x)
    assert torch.equal(x, torch.zeros(3))
    assert STATE.boundaries == [] and STATE.scoped_calls == 0 and STATE.modules == []
    with guard(mode="clone", scope="arguments"):
        out = m(x)
    assert torch.equal(out, torch.ones(2)) and torch.equal(x, torch.zeros(3))


def test_a_compiled_function_inside_a_scoped_call(recwarn: pytest.WarningsRecorder) -> None:
    """No boundary around it: it gets the alias, Dynamo runs the aliased ops as graph breaks
    (without warnings about what it cannot trace), and writes are still refused."""
    torch._dynamo.reset()
    read = torch.compile(lambda t: t.sin() * 2, backend="eager")
    write = torch.compile(lambda t: t.add_(1), backend="eager")

    @immutable_inputs
    def f(x: Tensor) -> Tensor:
        return read(x)

    @immutable_inputs
    def g(x: Tensor) -> Tensor:
        return write(x)

    x = torch.randn(3)
    assert torch.equal(f(x), x.sin() * 2)
    with pytest.raises(ImmutableTensorError, match="aten::add_"):
        g(x)
    assert not [w for w in recwarn if "Dynamo" in str(w.message)]


def test_conjugate_views_of_a_scoped_argument() -> None:
    """Before torch 2.9 an op on a conjugate view of a tensor subclass fails inside torch: a
    conjugate argument falls back to the every-op mode there, and a conjugate view made in the
    callee is refused with a clear error instead of torch's SystemError."""
    from immutorch._backends.scoped import bit_views_broken

    c = torch.randn(3, dtype=torch.complex64)
    f = immutable_inputs(lambda x: x * 2)
    assert torch.equal(f(c.conj()), c.conj() * 2)  # a conjugate argument: either way

    @immutable_inputs
    def g(x: Tensor) -> Tensor:
        return x.conj() * 2

    if bit_views_broken():
        with pytest.raises(RuntimeError, match='scope="all"'):
            g(c)
    else:
        assert torch.equal(g(c), c.conj() * 2)
    assert torch.equal(immutable_inputs(scope="all")(g.__wrapped__)(c), c.conj() * 2)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", ["raise", "warn", "clone"])
def test_what_a_callee_does_to_containers_it_was_handed_reaches_the_caller(
    scope: str, mode: str
) -> None:
    """Containers holding a protected tensor are rebuilt to carry the aliases; the callee's
    changes to them (found in kornia-style code passing params dicts) are carried back."""

    @dataclasses.dataclass
    class Batch:
        x: Tensor
        note: str = ""

    def callee(d: dict[str, Any], items: list[Any], batch: Batch) -> Tensor:
        d["last"] = d["x"].shape
        d["same"] = d["x"]  # a handed-over value moved to another key
        del d["drop"]
        items.append(items[0] * 2)
        items.pop(0)
        batch.note = "seen"
        return d["x"].sum()

    def run(guarded: bool) -> tuple[Any, ...]:
        x = torch.ones(3)
        d: dict[str, Any] = {"x": x, "drop": 1}
        items: list[Any] = [x, "keep"]
        batch = Batch(x)
        f = immutable_inputs(mode=mode, scope=scope)(callee) if guarded else callee  # type: ignore[call-overload]
        f(d, items, batch)
        return x, d, items, batch

    x, d, items, batch = run(True)
    _, ed, eitems, _ = run(False)
    assert sorted(d) == sorted(ed) == ["last", "same", "x"]
    assert d["x"] is x and d["same"] is x and d["last"] == ed["last"]
    assert items[0] == "keep" and torch.equal(items[1], eitems[1]) and type(items[1]) is Tensor
    assert batch.note == "seen" and batch.x is x


@pytest.mark.parametrize("scope", SCOPES)
def test_a_module_adding_to_a_dict_argument_inside_a_clone_guard(scope: str) -> None:
    class Fill(torch.nn.Module):
        def forward(self, params: dict[str, Any]) -> Tensor:
            params["scale"] = params["x"].mean()
            return params["x"] * 2

    x = torch.ones(3)
    params: dict[str, Any] = {"x": x}
    with guard(mode="clone", scope=scope):  # type: ignore[arg-type]
        Fill()(params)
    assert params["x"] is x and torch.equal(params["scale"], torch.tensor(1.0))
    assert type(params["scale"]) is Tensor


@pytest.mark.parametrize("scope", SCOPES)
def test_a_fused_fast_path_survives_the_guard(monkeypatch: pytest.MonkeyPatch, scope: str) -> None:
    """nn.TransformerEncoderLayer leaves its fused path when hooks sit on it or its
    submodules: the guard must put none there (global hooks do not count)."""
    fused: list[bool] = []
    real = torch._transformer_encoder_layer_fwd

    def spy(*args: Any, **kwargs: Any) -> Any:
        fused.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = layer(x)
        with guard(mode="clone", scope=scope):  # type: ignore[arg-type]
            out = layer(x)
    assert fused == [True, True]
    assert torch.equal(out, expected)
