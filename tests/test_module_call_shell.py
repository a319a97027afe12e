"""Module boundaries come from immutorch's shell around ``Module._call_impl``, installed while
a guard needs them (clone mode, a watch, a scoped block, torch.compile in use) and taken off
as the last one ends. No global module hook is ever registered: any global hook sends every
module call down torch's slow path. What the shell must keep: every call on record ends,
normally or by an exception, recursion included; the caller gets its own tensor back; user
hooks, global or not, run as before and count as the callee's code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any, Callable

import pytest
import torch
from torch.nn.modules import module as module_mod

import immutorch
from immutorch import _boundaries
from immutorch._registry import STATE

pytestmark = pytest.mark.both_backends

# torch's Module._call_impl: the shell swaps its code, never the class attribute.
TORCH_CALL_IMPL = torch.nn.Module.__dict__["_call_impl"]
TORCH_CODE = TORCH_CALL_IMPL.__code__


def _torchs_own() -> bool:
    return (
        torch.nn.Module.__dict__["_call_impl"] is TORCH_CALL_IMPL
        and TORCH_CALL_IMPL.__code__ is TORCH_CODE
    )


def _global_hooks() -> int:
    return sum(
        len(getattr(module_mod, name))
        for name in (
            "_global_forward_pre_hooks",
            "_global_forward_hooks",
            "_global_backward_pre_hooks",
            "_global_backward_hooks",
        )
    )


class Probe(torch.nn.Module):
    """Records, inside its forward, whether the shell is on; writes or fails if asked."""

    def __init__(self, write: bool = False, fail: bool = False) -> None:
        super().__init__()
        self.write, self.fail = write, fail
        self.seen: list[bool] = []

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(_boundaries.hooks_installed())
        if self.write:
            t.add_(1)
        if self.fail:
            raise ValueError("the module's own error")
        return t * 2


def test_the_shell_is_on_for_the_block_only_and_registers_no_global_hook() -> None:
    probe = Probe(write=True)
    x = torch.zeros(3)
    hooks_before = _global_hooks()
    with immutorch.guard(mode="clone", scope="all"):
        assert _global_hooks() == hooks_before
        out = probe(x)
    assert probe.seen == [True]
    assert _torchs_own()
    assert not _boundaries.hooks_installed()
    assert torch.equal(x, torch.zeros(3)) and torch.equal(out, torch.full((3,), 2.0))


def test_raise_mode_needs_no_shell() -> None:
    probe = Probe()
    with immutorch.guard(mode="raise", scope="all"):
        probe(torch.ones(2))
    assert probe.seen == [_boundaries.compile_in_use()]


def test_a_module_returning_its_argument_gives_the_caller_its_own_tensor() -> None:
    class Same(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t

    x = torch.ones(2)
    with immutorch.guard(mode="clone", scope="all"):
        assert Same()(x) is x
        assert STATE.boundaries == []


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
    assert not _boundaries.hooks_installed()
    assert torch.equal(x, torch.zeros(3))


def test_after_an_exception_caught_inside_the_block_calls_still_end() -> None:
    x = torch.zeros(3)
    failing, writing = Probe(write=True, fail=True), Probe(write=True)
    with immutorch.guard(mode="clone", scope="all"):
        with pytest.raises(ValueError):
            failing(x)
        assert STATE.boundaries == []
        out = writing(x)
        assert STATE.boundaries == []
    assert torch.equal(x, torch.zeros(3))
    assert torch.equal(out, torch.full((3,), 2.0))


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


@torch.compiler.disable
class DisabledWrites(torch.nn.Module):
    """Defined at import, as a library's classes are."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t.add_(1)
        return t * 2


class Recursive(torch.nn.Module):
    """Calls itself on its own argument, writing into it at each depth."""

    def forward(self, t: torch.Tensor, depth: int = 2) -> torch.Tensor:
        t.mul_(2)
        if depth:
            inner = self(t, depth - 1)
            return t + inner
        return t


def test_a_module_called_within_its_own_call_computes_as_unguarded() -> None:
    x = torch.arange(3.0)
    want = Recursive()(x.clone())
    with immutorch.guard(mode="clone", scope="all"):
        got = Recursive()(x)
        assert STATE.boundaries == []
    assert torch.equal(got, want)
    assert torch.equal(x, torch.arange(3.0))


def test_global_hooks_of_the_users_run_as_before_and_are_the_callees_code() -> None:
    """A user's global pre-hook that writes into the argument writes into the callee's alias
    in clone mode: hooks are part of the module call."""
    calls: list[str] = []

    def pre(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        args[0].add_(10)

    def post(module: torch.nn.Module, args: Any, output: Any) -> None:
        calls.append(type(module).__name__)

    handles = [
        module_mod.register_module_forward_pre_hook(pre),
        module_mod.register_module_forward_hook(post),
    ]
    try:
        x = torch.zeros(2)
        want = Probe()(x.clone())
        calls.clear()
        with immutorch.guard(mode="clone", scope="all"):
            got = Probe()(x)  # handed over
            Probe()(torch.ones(2))  # the block's own memory
    finally:
        for h in handles:
            h.remove()
    assert calls == ["Probe", "Probe"]
    assert torch.equal(got, want) and torch.equal(x, torch.zeros(2))


@pytest.mark.parametrize("guarded", [False, True])
def test_an_always_call_hook_registered_inside_a_failing_call_runs_as_unguarded(
    guarded: bool,
) -> None:
    """torch reads the hooks as a call starts: one registered inside a call that had none
    does not run for it, guarded or not (a global post-hook of immutorch's made it run)."""
    ran: list[bool] = []
    handles: list[Any] = []

    class RegistersThenFails(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            handles.append(
                module_mod.register_module_forward_hook(
                    lambda m, a, o: ran.append(True), always_call=True
                )
            )
            raise ValueError("the module's own error")

    x = torch.zeros(3)
    try:
        with pytest.raises(ValueError, match="the module's own error"):
            if guarded:
                with immutorch.guard(mode="clone", scope="all"):
                    RegistersThenFails()(x)
            else:
                RegistersThenFails()(x)
        with pytest.raises(ValueError):  # registered now: it runs at the next call
            RegistersThenFails()(x)
    finally:
        for h in handles:
            h.remove()
    assert ran == [True, True]  # the second call's hooks: the first call's and its own
    assert STATE.boundaries == []


@pytest.mark.parametrize("mode", ["clone", "raise"])
def test_a_class_with_its_own_call_impl_gets_a_shell_of_its_own(mode: str) -> None:
    """torch.compiler.disable on an nn.Module class gives it a _call_impl of its own (a wrapper
    of torch's), which the shell on Module does not reach: the class gets its own shell."""
    own = DisabledWrites.__dict__["_call_impl"]
    x = torch.zeros(3)
    want = DisabledWrites()(x.clone())
    if mode == "clone":
        with immutorch.guard(x, mode="clone"):
            assert DisabledWrites.__dict__["_call_impl"] is not own
            got = DisabledWrites()(x)
        assert torch.equal(got, want)
    else:
        with pytest.raises(immutorch.ImmutableTensorError, match="DisabledWrites"):
            with immutorch.watch_modules(lambda m: isinstance(m, DisabledWrites), mode="raise"):
                DisabledWrites()(x)
    assert torch.equal(x, torch.zeros(3))
    assert DisabledWrites.__dict__["_call_impl"] is own  # its own again, after the guard


def test_a_class_made_with_its_own_call_impl_in_a_test_is_seen_by_a_watch() -> None:
    """A watch looks for such classes anew as it starts; a guard only where modules were
    imported since it last looked. Either way a write is never let through: clone mode that
    cannot hand an argument over refuses the write ("cannot isolate")."""

    @torch.compiler.disable
    class Writes(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            t.add_(1)
            return t * 2

    x = torch.zeros(3)
    with pytest.raises(immutorch.ImmutableTensorError, match="the watch on Writes"):
        with immutorch.watch_modules(lambda m: isinstance(m, Writes), mode="raise"):
            Writes()(x)
    assert torch.equal(x, torch.zeros(3))
    want = Writes()(x.clone())
    try:
        with immutorch.guard(x, mode="clone"):
            got = Writes()(x)
    except immutorch.ImmutableTensorError as err:
        assert "cannot isolate" in str(err)
    else:
        assert torch.equal(got, want)
    assert torch.equal(x, torch.zeros(3))


def test_dynamo_imported_inside_a_block_keeps_torchs_call_impl_as_its_own() -> None:
    """Dynamo records ``Module._call_impl`` at its import (to shorten calls to ``forward``);
    imported first inside a clone block, it would record the shell."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        import immutorch
        from immutorch import _boundaries

        assert "torch._dynamo.utils" not in sys.modules
        x = torch.zeros(3)
        with immutorch.guard(x, mode="clone"):
            torch.compile(torch.nn.ReLU(), backend="eager")(torch.ones(2))
        from torch._dynamo import utils
        from torch._dynamo.variables import nn_module

        torch_own = _boundaries._torch_function
        for dynamo in (utils, nn_module):  # where this torch's Dynamo records it (2.5 and newer)
            assert getattr(dynamo, "unpatched_nn_module_call_impl", torch_own) is torch_own
        assert torch.nn.Module.__dict__["_call_impl"] is torch_own
        assert torch_own.__code__ is _boundaries._TORCH_CODE
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _version_tag(cls: type) -> int:
    """CPython's attribute-cache tag of ``cls`` (``tp_version_tag``), assigned at a lookup and
    cleared by any change to the class or a base; 0 where this interpreter's layout is not the
    one read here (then the callers skip)."""
    import ctypes

    offset = 48 * ctypes.sizeof(ctypes.c_void_p)  # after tp_del, CPython 3.9 to 3.14
    cls.__init__  # noqa: B018  (a lookup assigns a tag where the class has none)
    return ctypes.c_uint.from_address(id(cls) + offset).value


def _tags_are_readable() -> bool:
    if sys.implementation.name != "cpython":
        return False
    base = type("Base", (), {})
    sub = type("Sub", (base,), {})
    before = _version_tag(sub)
    base.changed = True  # type: ignore[attr-defined]
    return before != 0 and _version_tag(sub) not in (0, before)


class Scoped(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.inner(t).relu()


def test_guards_change_no_module_or_tensor_class() -> None:
    """Each change to a class invalidates the attribute caches of it and of every subclass, and
    from CPython 3.13 a class changed 1,000 times is never cached again: the shell swaps the
    code of torch's ``_call_impl``, so that no guard changes ``nn.Module`` or a subclass, in
    clone mode, under a watch, or in a scoped call that takes the shell off and on again; and
    clone mode watches members' ``.data`` in torch's own descriptor (the native backend) or
    in the dispatch mode (the Python one), not with a property on ``torch.Tensor``."""
    if not _tags_are_readable():
        pytest.skip("this interpreter's type layout is not the one _version_tag reads")
    classes = (torch.nn.Module, torch.nn.Linear, Probe, Scoped, torch.Tensor, torch.nn.Parameter)
    model, probe, x = Scoped(), Probe(write=True), torch.zeros(3)
    model(x), probe(x.clone())
    before = [_version_tag(c) for c in classes]
    for _ in range(3):
        with immutorch.guard(mode="clone", scope="all"):
            model(x), probe(x)
        with immutorch.guard(x, mode="clone"):
            model(x), probe(x)
        with immutorch.watch_modules(lambda m: isinstance(m, Scoped), mode="raise"):
            model(x)
        immutorch.immutable_inputs(scope="arguments")(model)(x)
        with immutorch.guard(mode="raise", scope="arguments"):
            model(x)
    assert [_version_tag(c) for c in classes] == before
    assert torch.equal(x, torch.zeros(3)) and _torchs_own()


def test_a_call_impl_rebound_after_import_is_shelled_and_given_back() -> None:
    """Where someone rebinds ``Module._call_impl`` after immutorch's import, the shell goes
    around theirs as a class attribute, and theirs is put back after the guard."""
    calls: list[str] = []

    def theirs(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(self).__name__)
        return TORCH_CALL_IMPL(self, *args, **kwargs)

    x = torch.zeros(3)
    torch.nn.Module._call_impl = theirs  # type: ignore[method-assign]
    try:
        with immutorch.guard(x, mode="clone"):
            assert _boundaries.hooks_installed()
            out = Probe(write=True)(x)
        assert torch.nn.Module.__dict__["_call_impl"] is theirs
        assert not _boundaries.hooks_installed()
    finally:
        torch.nn.Module._call_impl = TORCH_CALL_IMPL  # type: ignore[method-assign]
    assert calls == ["Probe"]
    assert torch.equal(x, torch.zeros(3)) and torch.equal(out, torch.full((3,), 2.0))
    assert _torchs_own()


class Echo(torch.nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if kwargs.get("fail"):
            raise KeyError("the module's own")
        return args, kwargs


@pytest.mark.parametrize("n", [0, 1, 7, 12])
def test_the_shell_passes_the_arguments_as_they_came(n: int, every_op_backend: str) -> None:
    """The shell's body (C++ where the native backend is loaded, Python otherwise) calls
    torch's ``_call_impl`` with the arguments the call was given: positional ones past any
    small buffer, keyword ones or none, the objects themselves; an exception propagates."""
    from immutorch._backends import native

    x = torch.zeros(3)
    args = tuple(object() for _ in range(n))
    kwargs = {"k": object()} if n % 2 else {}
    with immutorch.guard(x, mode="clone"):
        body = TORCH_CALL_IMPL.__globals__["__immutorch_module_call__"]
        if every_op_backend == "native":
            assert body is native._module.module_call  # type: ignore[union-attr]
        got_args, got_kwargs = Echo()(*args, **kwargs)
        with pytest.raises(KeyError, match="the module's own"):
            Echo()(*args, fail=True)
    assert got_args == args and all(a is b for a, b in zip(got_args, args))
    assert got_kwargs == kwargs and all(got_kwargs[k] is v for k, v in kwargs.items())
    assert STATE.boundaries == [] and STATE.modules == [] and _torchs_own()


class _Crossing(torch.nn.Module):
    """Writes into its first argument (or not), and reports what it was handed."""

    def __init__(self, write: bool) -> None:
        super().__init__()
        self.write = write
        self.seen: dict[str, Any] = {}

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, n: int, none: None, *, kw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen = {
            "a is b": a is b,
            "a is kw": a is kw,
            "on record": len(STATE.boundaries),
        }
        if self.write:
            a.mul_(n)
        return a, kw + b


@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("named", [True, False])
def test_a_clone_hand_over_of_plain_tensor_arguments_computes_as_unguarded(
    write: bool, named: bool, every_op_backend: str
) -> None:
    """The hand-over of top-level tensor arguments (done in C++ by the native backend's shell,
    with nothing put on record; by Python's boundary work otherwise): one alias per tensor
    passed twice or by keyword, the callee's results as unguarded, the caller's tensor
    untouched, and the caller's own tensor back where the callee returns it unwritten."""
    x = torch.arange(6.0)
    oracle_in = x.clone()
    oracle = _Crossing(write)(oracle_in, oracle_in, 3, None, kw=oracle_in)
    module = _Crossing(write)
    with immutorch.guard(*((x,) if named else ()), mode="clone"):
        out = module(x, x, 3, None, kw=x)
    assert torch.equal(x, torch.arange(6.0))  # the caller's bytes
    assert [t.tolist() for t in out] == [t.tolist() for t in oracle]
    assert module.seen["a is b"] and module.seen["a is kw"]
    assert (out[0] is x) is (not write)  # unwritten: the caller's own tensor back
    if every_op_backend == "native":
        assert module.seen["on record"] == 0  # the C++ hand-over: nothing on record
    assert STATE.boundaries == [] and STATE.modules == [] and _torchs_own()


def test_an_exception_in_a_module_given_aliases_propagates_and_leaves_nothing(
    every_op_backend: str,
) -> None:
    class Fails(torch.nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            a.add_(1)
            raise KeyError("the module's own")

    x = torch.zeros(3)
    with immutorch.guard(x, mode="clone"):
        with pytest.raises(KeyError, match="the module's own"):
            Fails()(x)
        again = torch.nn.Identity()(x)
    assert torch.equal(x, torch.zeros(3)) and again is x
    assert STATE.boundaries == [] and STATE.modules == [] and _torchs_own()


def test_while_torch_traces_outside_dynamo_the_shell_calls_torchs_own(
    every_op_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.compiler.is_compiling()`` outside Dynamo (non-strict export, a compile session
    set its flag): the call crosses as it came, with no alias (as when the shell's code asked
    ``is_compiling()`` itself)."""

    class Same(torch.nn.Module):
        def forward(self, a: torch.Tensor) -> bool:
            return a is x

    x = torch.zeros(3)
    with immutorch.guard(x, mode="clone"):
        assert Same()(x) is False  # an alias
        monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
        assert Same()(x) is True
        monkeypatch.setattr(torch.compiler, "_is_compiling_flag", False)
        assert Same()(x) is False


_SHAPES: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "tensor": lambda a, b: a,
    "tuple": lambda a, b: (a, 1, None, b),
    "nested tuple": lambda a, b: ((a, "s"), b),
    "list": lambda a, b: [a, b],
    "dict": lambda a, b: {"a": a, "b": b},
    "namedtuple": lambda a, b: torch.return_types.max((a, b)),
}


@pytest.mark.parametrize("shape", list(_SHAPES))
def test_the_caller_gets_its_own_tensors_back_in_any_result(
    shape: str, every_op_backend: str
) -> None:
    """A result holding the aliases it was handed (C++ reads a tensor or a plain tuple, Python
    the rest): each unwritten one is the caller's own tensor again, and a written one stays the
    callee's private copy, with what the callee wrote."""

    class Returns(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> Any:
            b.add_(1)
            return _SHAPES[shape](a, b)

    x, y = torch.zeros(3), torch.zeros(3)
    with immutorch.guard(x, y, mode="clone"):
        out = Returns()(x, y)
    found = [v for v in _leaves(out) if isinstance(v, torch.Tensor)]
    assert found[0] is x
    if shape != "tensor":
        assert found[1] is not y and found[1].tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(y, torch.zeros(3))
    assert type(out).__name__ == type(_SHAPES[shape](x, y)).__name__


def _leaves(v: Any) -> list[Any]:
    if isinstance(v, dict):
        return [leaf for item in v.values() for leaf in _leaves(item)]
    if isinstance(v, (list, tuple)):
        return [leaf for item in v for leaf in _leaves(item)]
    return [v]
