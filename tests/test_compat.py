"""The torch range: the floor is checked at first use, and each private API wrapper works on
the installed release (the release matrix, ``python -m nox``, runs this on every one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import immutorch
from immutorch import _compat

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("version", "release"),
    [("2.5.1+cu124", (2, 5)), ("2.13.0+cpu", (2, 13)), ("2.15.0.dev20260101", (2, 15))],
)
def test_torch_release(version: str, release: tuple[int, int]) -> None:
    assert _compat.torch_release(version) == release


def test_older_torch_is_refused_with_both_versions() -> None:
    with pytest.raises(ImportError, match=r"needs torch >= 2\.4; this is torch 2\.3\.1 "):
        _compat.require_supported_torch("2.3.1")
    _compat.require_supported_torch("2.4.0")


def test_first_use_on_an_older_torch_raises_import_error() -> None:
    code = (
        "import torch; torch.__version__ = '2.1.2'\n"
        "import immutorch\n"  # the package itself imports no torch: the plugin stays cheap
        "try:\n"
        "    immutorch.guard\n"
        "except ImportError as err:\n"
        "    print('ImportError:', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "IMMUTORCH_IGNORE_TORCH_FLOOR"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    )
    assert "ImportError: immutorch needs torch >= 2.4; this is torch 2.1.2" in result.stdout


def test_the_floor_is_declared_once_everywhere() -> None:
    floor = ".".join(map(str, _compat.TORCH_FLOOR))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={floor}"' in pyproject
    noxfile = (ROOT / "noxfile.py").read_text()
    releases = re.search(r"TORCH_RELEASES = \[([^\]]*)\]", noxfile)
    assert releases is not None
    assert releases.group(1).split(",")[0].strip().strip('"').startswith(floor + ".")


def test_set_version_counter() -> None:
    t = torch.zeros(2)
    t.add_(1)
    t.add_(1)
    _compat.set_version_counter(t, 0)
    assert t._version == 0


def test_popped_mode_and_its_flags() -> None:
    from torch.utils import _python_dispatch as dispatch

    flags = [
        name
        for name in (
            "_is_in_torch_dispatch_mode",
            "_is_in_non_infra_torch_dispatch_mode",
            "_is_in_any_mode_without_ignore_compile_internals",
        )
        if hasattr(dispatch, name)
    ]
    assert flags, "torch no longer has the flags Dynamo read on 2.5-2.12; revisit _compat"
    with TorchDispatchMode() as mode:
        assert _compat.current_dispatch_mode() is mode
        before = {name: getattr(dispatch, name) for name in flags}
        assert all(before.values())
        popped = _compat.pop_dispatch_mode()
        try:
            assert popped is mode and _compat.current_dispatch_mode() is None
            with _compat.dispatch_mode_flags_match_stack():
                assert not any(getattr(dispatch, name) for name in flags)
            assert {name: getattr(dispatch, name) for name in flags} == before
        finally:
            _compat.push_dispatch_mode(popped)
        assert _compat.current_dispatch_mode() is mode


def test_guard_works_on_this_release() -> None:
    """A smoke test that says which torch ran it, for the matrix logs."""
    x = torch.ones(2)
    with pytest.raises(immutorch.ImmutableTensorError), immutorch.guard(x):
        x.add_(1)
    assert torch.__version__


class _InplaceScale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x.sin()


def _counting_backend() -> tuple[list[int], object]:
    runs: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        def run(*args: object) -> object:
            runs.append(1)
            return gm.forward(*args)

        return run

    return runs, backend


@pytest.mark.parametrize("mode", ["raise", "clone", "warn"])
@pytest.mark.parametrize("kind", ["module", "function"])
def test_a_guarded_compiled_call_runs_its_graph_during_and_after_the_guard(
    mode: str, kind: str
) -> None:
    """On 2.5-2.12 Dynamo read flags that popping the mode left set, skipped the frame, and
    kept skipping the code object for the rest of the process (eager, silently)."""
    torch._dynamo.reset()
    runs, backend = _counting_backend()
    if kind == "module":
        compiled = torch.compile(_InplaceScale(), backend=backend)
        guarded = compiled
    else:
        compiled = torch.compile(_InplaceScale().forward, backend=backend)
        guarded = immutorch.immutable_inputs(mode=mode)(compiled)  # type: ignore[arg-type]
    x = torch.randn(4)
    warns: Any = pytest.warns(immutorch.MutationWarning) if mode == "warn" else nullcontext()
    with warns, immutorch.guard(x, mode=mode):  # type: ignore[arg-type]
        try:
            guarded(x)
        except immutorch.ImmutableTensorError:
            assert mode == "raise"
    assert runs, "inside the guard the compiled graph must run, not eager code"
    before = len(runs)
    compiled(torch.randn(4))
    assert len(runs) == before + 1, "after the guard the call must still be compiled"
