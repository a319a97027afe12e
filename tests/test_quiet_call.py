"""The module-call shell's common case in C++ (``_native.quiet_call``): where it says a
module call needs no boundary work, Python's own answer (``_boundaries._only_noted``) must
agree, or a call that must be on record (a watch, a scoped call, a compiled module, a
protected argument in clone mode, by position or by keyword) would go by unseen. Each state is
set up for real and both answers are asked with the same arguments."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
import torch

import immutorch
from immutorch import _arguments, _boundaries
from immutorch._backends import native
from immutorch._registry import STATE

FRAME_LOCALS = sys.version_info[:2] == (3, 11)  # frames.cpp reads frames on CPython 3.11 only


class Plain(torch.nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else None


class OptimizedModule(torch.nn.Module):
    """Named as torch.compile's wrapper is: the C++ side must leave it to Python."""

    _orig_mod = Plain()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture
def quiet() -> Callable[[torch.nn.Module, tuple[Any, ...], Optional[dict[str, Any]]], bool]:
    with immutorch.guard(mode="raise", scope="all"):
        pass  # the first guard loads the native backend where it is built
    if native.quiet_call is None:
        pytest.skip(f"native backend unavailable: {native.unavailable_reason()}")
    return native.quiet_call


def _agree(
    quiet: Any, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    fast = quiet(module, args, kwargs)
    python = _boundaries._only_noted(module, args, kwargs)
    assert python or not fast, "C++ says quiet where Python puts the call on record"
    return bool(fast)


def _states(x: torch.Tensor) -> Iterator[tuple[str, Any]]:
    """Each state a module hook can meet, entered; yields (name, whether Python must decide)."""
    with immutorch.guard(mode="clone", scope="all"):
        yield "clone block", None
    with immutorch.guard(x, mode="clone", scope="all"):
        yield "clone guard(x)", None
    with immutorch.guard(mode="raise", scope="all"):
        yield "raise block", None
    with immutorch.watch_modules(lambda m: False):
        yield "a watch", True
    with immutorch.guard(x, mode="raise", scope="arguments"):
        yield "a scoped guard", None
    STATE.bypass += 1
    try:
        yield "immutorch aside", True
    finally:
        STATE.bypass -= 1


@pytest.mark.parametrize(
    "kind", ["fresh", "protected", "keyword protected", "container", "scalars"]
)
def test_quiet_never_says_so_where_python_would_record(quiet: Any, kind: str) -> None:
    x = torch.arange(4.0)
    for _name, must_ask in _states(x):
        h = torch.ones(2)
        args, kwargs = {
            "fresh": ((h,), {"k": h + 1}),
            "protected": ((x,), {}),
            "keyword protected": ((h,), {"input": x[1:]}),
            "container": (([h],), {}),
            "scalars": ((1, 2.5, None, "s"), {}),
        }[kind]
        said = _agree(quiet, Plain(), args, kwargs)
        if must_ask:
            assert not said


def test_torch_compiles_wrapper_goes_to_python(quiet: Any) -> None:
    with immutorch.guard(mode="clone", scope="all"):
        h = torch.ones(2)
        assert not quiet(OptimizedModule(), (h,), {})
        assert quiet(Plain(), (h,), {})


def test_keyword_arguments_are_judged_as_positional_ones(quiet: Any) -> None:
    x = torch.arange(3.0)
    with immutorch.guard(mode="clone", scope="all"):
        h = torch.ones(2)
        assert _agree(quiet, Plain(), (h,), {"k": h + 1})  # fresh memory only
        assert not _agree(quiet, Plain(), (h,), {"k": x})  # protected, by keyword only
        assert not _agree(quiet, Plain(), (h,), {"k": [h]})  # a container Python rebuilds


def test_a_new_thread_gets_its_own_state(quiet: Any) -> None:
    """STATE is a threading.local: on a thread that never touched it, the C++ side builds it
    (ThreadState.__init__) as an attribute read would, and finds nothing in progress there."""
    out: list[Any] = []
    x = torch.arange(3.0)

    def run() -> None:
        try:
            out.append(quiet(Plain(), (x,), {}))
        except BaseException as err:  # pragma: no cover - reported below
            out.append(err)

    with immutorch.guard(x, mode="clone", scope="all"):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert out == [True]  # no guard on that thread: the hook has nothing to do there


def test_clone_mode_hands_over_a_keyword_only_argument_through_the_real_hook() -> None:
    """End to end, whichever way the hook answers: the write lands in a private copy."""

    class Writes(torch.nn.Module):
        def forward(self, a: torch.Tensor, *, into: torch.Tensor) -> torch.Tensor:
            into.add_(a)
            return into * 2

    x = torch.zeros(3)
    want = Writes()(torch.ones(3), into=torch.zeros(3))
    with immutorch.guard(mode="clone", scope="all"):
        got = Writes()(torch.ones(3), into=x)
    assert torch.equal(got, want)
    assert torch.equal(x, torch.zeros(3))


def test_modules_on_stack_read_natively_match_the_python_walk(quiet: Any) -> None:
    """The modules in call, read off the frames in C++ (module state's lookup uses them),
    are those the f_locals walk finds, innermost first; a recursion shows each call."""
    seen: list[tuple[Optional[list[Any]], list[Any]]] = []

    class Leaf(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            seen.append(
                (
                    native._module.modules_on_stack() if native._module is not None else None,
                    [local["self"] for local in _arguments.module_calls_on_stack()],
                )
            )
            return t

    class Twice(torch.nn.Module):
        def __init__(self, depth: int) -> None:
            super().__init__()
            self.depth = depth
            self.leaf = Leaf()

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            if self.depth:
                self.depth -= 1
                t = self(t)  # the same module within its own call
            return self.leaf(t)

    Twice(2)(torch.ones(1))
    assert seen
    for native_answer, walked in seen:
        assert len(walked) >= 2
        if FRAME_LOCALS:
            assert native_answer is not None
            assert [id(m) for m in native_answer] == [id(m) for m in walked]
    assert _arguments.modules_on_stack() == []  # none in call here


def test_only_views_of_group_members_are_handed_to_python(
    quiet: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clone mode: a view joins its source's copy-on-write group, so C++ hands Python the views
    of a group's members, and no others (a parameter's ``weight.t()`` inside ``F.linear``, in
    a block: memory from before it, but no member of any group). The views that do join still
    move with their group at its first write, as unguarded code would see them."""
    joined: list[Any] = []
    join_view = native.join_view

    def counting(source: torch.Tensor, out: Any) -> None:
        joined.append(source)
        join_view(source, out)

    monkeypatch.setattr(native, "join_view", counting)
    weight = torch.randn(4, 3)

    class ViewsAndWrites(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            first, second = t[0], t.t()  # views of the alias: they join its group
            first.add_(1)  # the first write: the group moves onto its private copy
            return second.sum() + torch.nn.functional.linear(t, weight).sum()

    x = torch.ones(2, 3)
    want = ViewsAndWrites()(x.clone())
    with immutorch.guard(mode="clone", scope="all"):
        served = native.enabled()
        torch.nn.functional.linear(torch.ones(2, 3), weight)  # weight.t(): no group, no call
        assert joined == []
        got = ViewsAndWrites()(x)
    assert torch.equal(got, want)
    assert torch.equal(x, torch.ones(2, 3))
    if served:
        assert 1 <= len(joined) <= 2  # the alias's two views (one per join), never weight's
