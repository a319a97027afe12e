"""Modes and their composition: strictest wins, protection ends at exit, warnings filterable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from corpus import Snapshot
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

import immutorch
from immutorch import ImmutableTensorError, MutationWarning, guard, immutable_inputs
from immutorch._registry import STATE

pytestmark = pytest.mark.both_backends

MODES = ["off", "warn", "clone", "raise"]
STRICT = {m: i for i, m in enumerate(MODES)}


def assert_nothing_installed() -> None:
    assert not STATE.frames and not STATE.blocks and not STATE.clone_frames
    assert not STATE.by_storage and not STATE.by_object and not STATE.ranged
    assert not _get_current_dispatch_mode_stack()


@pytest.mark.parametrize("inner", MODES)
@pytest.mark.parametrize("outer", MODES)
def test_nested_guards_keep_the_strictest(outer: str, inner: str) -> None:
    x = torch.zeros(3)
    winner = max(outer, inner, key=STRICT.__getitem__)
    with guard(x, mode=outer), guard(x, mode=inner):  # type: ignore[arg-type]
        if winner in ("raise", "clone"):  # named guards have no boundary: clone refuses
            match = "cannot isolate" if winner == "clone" else "guard argument 0"
            with pytest.raises(ImmutableTensorError, match=match):
                x.add_(1)
        elif winner == "warn":
            with pytest.warns(MutationWarning) as record:
                x.add_(1)
            assert len(record) == 1
        else:
            x.add_(1)
    assert_nothing_installed()


def test_inner_guard_exit_restores_the_outer_mode() -> None:
    x = torch.zeros(3)
    with guard(x, mode="warn"):
        with guard(x, mode="raise"), pytest.raises(ImmutableTensorError):
            x.add_(1)
        with pytest.warns(MutationWarning):
            x.add_(1)
    x.add_(1)
    assert torch.equal(x, torch.full((3,), 2.0))


def test_same_guard_object_reentered() -> None:
    x = torch.zeros(3)
    g = guard(x)
    with g, g, pytest.raises(ImmutableTensorError):
        x.add_(1)
    assert_nothing_installed()


def test_protection_ends_at_exit_even_on_exception() -> None:
    x = torch.zeros(3)
    with pytest.raises(KeyError), guard(x), guard():
        raise KeyError("boom")
    assert_nothing_installed()
    x.add_(1)

    @immutable_inputs
    def fails(x: Tensor) -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        fails(x)
    assert_nothing_installed()

    @immutable_inputs
    def writes(x: Tensor) -> None:
        x.add_(1)

    with pytest.raises(ImmutableTensorError):
        writes(x)
    assert_nothing_installed()
    x.add_(1)
    assert torch.equal(x, torch.full((3,), 2.0))


def test_guard_as_decorator() -> None:
    x = torch.zeros(3)

    @guard(x)
    def step() -> None:
        x.mul_(2)

    with pytest.raises(ImmutableTensorError):
        step()
    assert_nothing_installed()


def test_bare_decorator_raises_by_default() -> None:
    @immutable_inputs
    def f(x: Tensor) -> Tensor:
        return x.add_(1)

    x = torch.zeros(2)
    with pytest.raises(ImmutableTensorError, match=r"aten::add_ would write into `x`"):
        f(x)
    assert torch.equal(x, torch.zeros(2))


def test_only_protects_the_named_parameters() -> None:
    @immutable_inputs(only=("x",))
    def f(x: Tensor, out: Tensor) -> Tensor:
        out.copy_(x * 2)
        return out

    x, out = torch.ones(2), torch.zeros(2)
    assert torch.equal(f(x, out), torch.full((2,), 2.0))

    @immutable_inputs(only="out")
    def g(x: Tensor, out: Tensor) -> None:
        out.zero_()

    with pytest.raises(ImmutableTensorError, match="`out`"):
        g(x, out)


def test_error_and_warning_report_the_users_line_and_types() -> None:
    x = torch.zeros(2, 3, dtype=torch.float64)

    @immutable_inputs
    def f(x: Tensor) -> None:
        x[0] = 1.0

    with pytest.raises(ImmutableTensorError) as info:
        f(x)
    e = info.value
    assert type(e).__module__ == "immutorch"
    assert isinstance(e, RuntimeError)
    assert (e.op, e.argument, e.shape, e.dtype) == ("aten::fill_", "x", (2, 3), torch.float64)
    assert e.location is not None and e.location.startswith(__file__ + ":")
    assert "test_error_and_warning_report_the_users_line_and_types" in e.where
    assert "torch.empty_like" in str(e)  # says what to do instead

    with pytest.warns(MutationWarning) as record:
        immutable_inputs(mode="warn")(f.__wrapped__)(x)
    w = record[0].message
    assert type(w).__module__ == "immutorch"
    assert isinstance(w, MutationWarning) and isinstance(w, UserWarning)
    assert (w.op, w.argument) == ("aten::fill_", "x")
    assert record[0].filename == __file__
    assert torch.equal(x[0], torch.ones(3, dtype=torch.float64))


def test_warn_once_per_call_site_in_a_loop() -> None:
    @immutable_inputs(mode="warn")
    def f(x: Tensor) -> None:
        for _ in range(5):
            x.add_(1)
        x.mul_(2)

    x = torch.zeros(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        f(x)
        f(x)
    assert [w.message.op for w in caught] == ["aten::add_", "aten::mul_"]  # type: ignore[union-attr]
    assert torch.equal(x, torch.full((2,), 30.0))


def test_warning_filter_can_silence_warn_mode() -> None:
    x = torch.zeros(2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=MutationWarning)
        with guard(x, mode="warn"):
            x.add_(1)
    assert torch.equal(x, torch.ones(2))


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("IMMUTORCH_MODE", "PYTHONWARNINGS")}
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120
    )


def test_W_error_turns_the_warning_into_an_error(tmp_path: pytest.TempPathFactory) -> None:
    test_file = tmp_path / "test_writes.py"  # type: ignore[operator]
    test_file.write_text(
        textwrap.dedent(
            """
            import pytest, torch, immutorch

            def test_write_is_an_error_under_W_error():
                x = torch.zeros(3)
                with pytest.raises(immutorch.MutationWarning, match="aten::add_ would write"):
                    with immutorch.guard(x, mode="warn"):
                        x.add_(1)
                assert x.tolist() == [0.0, 0.0, 0.0]  # raised before the write went ahead
            """
        )
    )
    argv = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    result = _run([*argv, "-W", "error::immutorch.MutationWarning", str(test_file)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_W_error_on_the_interpreter_command_line() -> None:
    # CPython reads -W before site-packages can be imported and drops the option with a note
    # on stderr; immutorch re-applies it when imported, so the warning still becomes an error.
    code = (
        "import torch, immutorch\n"
        "x = torch.zeros(2)\n"
        "immutorch.immutable_inputs(mode='warn')(lambda t: t.add_(1))(x)\n"
    )
    result = _run(["-W", "error::immutorch.MutationWarning", "-c", code])
    assert result.returncode == 1
    assert "immutorch.MutationWarning: immutorch: aten::add_" in result.stderr


def test_environment_variable_overrides_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2)
    monkeypatch.setenv("IMMUTORCH_MODE", "warn")
    with pytest.warns(MutationWarning), guard(x, mode="raise"):
        x.add_(1)
    monkeypatch.setenv("IMMUTORCH_MODE", "off")
    with guard(x):
        x.add_(1)
        assert not _get_current_dispatch_mode_stack()
    assert torch.equal(x, torch.full((2,), 2.0))


def test_off_installs_nothing() -> None:
    x = torch.zeros(2)

    @immutable_inputs(mode="off")
    def f(x: Tensor) -> Tensor:
        assert not _get_current_dispatch_mode_stack()
        return x.add_(1)

    assert f(x) is x
    with guard(x, mode="off"):
        assert not _get_current_dispatch_mode_stack()


def test_raise_leaves_the_data_and_version_untouched_for_every_op_kind() -> None:
    x = torch.randn(3, 4)
    snapshot = Snapshot.of(x)
    with guard(x):
        for write in (
            lambda: x.add_(1),
            lambda: torch.add(x, 1, out=x),
            lambda: x.t_(),
            lambda: x.resize_(100),
            lambda: x.set_(torch.zeros(2)),
            lambda: torch._foreach_mul_([torch.zeros(2), x], 2.0),
        ):
            with pytest.raises(ImmutableTensorError):
                write()
            assert snapshot.matches(x)


def test_clone_mode_named_guard_refuses_with_the_reason() -> None:
    x = torch.zeros(2)
    match = r"Clone mode cannot isolate this write: it reaches the caller's own tensor"
    with pytest.raises(ImmutableTensorError, match=match), guard(x, mode="clone"):
        x.add_(1)
    assert torch.equal(x, torch.zeros(2))


def test_mode_survives_an_error_raised_by_torch_itself() -> None:
    x = torch.zeros(2)
    with guard(x):
        with pytest.raises(RuntimeError, match="size"):
            torch.zeros(3) + torch.zeros(4)
        with pytest.raises(ImmutableTensorError):
            x.add_(1)
    assert_nothing_installed()


def test_clone_stats_snapshot_is_independent() -> None:
    before = immutorch.clone_stats()
    immutable_inputs(mode="clone")(lambda x: x.add_(1))(torch.zeros(4))
    after = immutorch.clone_stats()
    assert (after.copies - before.copies, after.bytes_copied - before.bytes_copied) == (1, 16)


def test_a_refused_metadata_write_suggests_the_out_of_place_form():
    x = torch.zeros(3)
    with pytest.raises(immutorch.ImmutableTensorError, match=r"x = x\.unsqueeze\(0\)"):
        with immutorch.guard(x):
            x.unsqueeze_(0)
    assert x.shape == (3,)
