"""``python -m immutorch run``: a script under strict mode's settings, like ``coverage run``.

Most runs call the command in this process (``_cli.main``), as the command itself does; one
goes through ``python -m immutorch`` to check the exit status and stderr end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from immutorch import _cli, _config

ROOT = Path(__file__).resolve().parent.parent

SAVED_BUG = """
import sys
import torch

print("args", sys.argv[1:])
a = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
b = a.sigmoid()
b.mul_(2)
b.sum().backward()
print("grad", a.grad.tolist())
"""

MODULE_BUG = """
import torch
from mypkg.layers import Zeroing

x = torch.ones(3)
Zeroing()(x)
print("x", x.tolist())
"""

LAYERS = """
import torch


class Zeroing(torch.nn.Module):
    def forward(self, x):
        x.zero_()
        return x
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_config.ENV_VAR, raising=False)
    monkeypatch.delenv(_config.SCOPE_ENV_VAR, raising=False)


def test_saved_refuses_and_names_the_scripts_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _write(tmp_path, "train.py", SAVED_BUG)
    assert _cli.main(["run", "--saved", str(script), "--epochs", "1"]) == 1
    out, err = capsys.readouterr()
    assert "args ['--epochs', '1']" in out  # argv as the script sees it
    assert "grad" not in out  # stopped at the write
    assert "SigmoidBackward0 (its output, saved at " + f"{script}:6)" in err
    assert f'File "{script}", line 7, in <module>' in err
    assert "runpy" not in err and "torch" + os.sep not in err  # the script's frames only
    assert err.rstrip().endswith(f"stopped at a refused write at {script}:7.")
    # Nothing stays forced after the run.
    assert _config.get_override() is None and _config.get_scope_override() is None


def test_without_saved_autograd_reports_at_backward(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _write(tmp_path, "train.py", SAVED_BUG)
    assert _cli.main(["run", str(script)]) == 1
    err = capsys.readouterr().err
    assert "modified by an inplace operation" in err
    assert "refused write" not in err


def test_warn_mode_lets_the_write_land_then_backward_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _write(tmp_path, "train.py", SAVED_BUG)
    with pytest.warns(immutorch_warning()):
        status = _cli.main(["run", "--saved", "--mode", "warn", str(script)])
    assert status == 1
    assert "backward needs a tensor saved for backward" in capsys.readouterr().err


def immutorch_warning() -> type[Warning]:
    from immutorch import MutationWarning

    return MutationWarning


def test_modules_watch_from_a_module_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path, "mypkg/__init__.py", "")
    _write(tmp_path, "mypkg/layers.py", LAYERS)
    _write(tmp_path, "mypkg/main.py", MODULE_BUG)
    monkeypatch.chdir(tmp_path)
    try:
        assert _cli.main(["run", "--modules", "mypkg", "-m", "mypkg.main"]) == 1
        out, err = capsys.readouterr()
        assert "x" not in out
        assert "aten::zero_ would write into" in err and "Zeroing" in err
        # Unwatched, the module writes its caller's tensor, and the script ends normally.
        assert _cli.main(["run", "-m", "mypkg.main"]) == 0
        assert "x [0.0, 0.0, 0.0]" in capsys.readouterr().out
    finally:
        for name in ("mypkg", "mypkg.layers", "mypkg.main"):  # this test's own package
            sys.modules.pop(name, None)


def test_exit_status_is_the_scripts(tmp_path: Path) -> None:
    script = _write(tmp_path, "quits.py", "import sys\nsys.exit(3)\n")
    assert _cli.main(["run", str(script)]) == 3


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["run"]) == 2
    assert "give a SCRIPT to run" in capsys.readouterr().err
    assert _cli.main(["run", str(tmp_path / "missing.py")]) == 2
    assert "no such script" in capsys.readouterr().err
    script = _write(tmp_path, "ok.py", "pass\n")
    assert _cli.main(["run", "--mode", "strict", str(script)]) == 2
    assert "--mode must be one of" in capsys.readouterr().err


def test_end_to_end(tmp_path: Path) -> None:
    script = _write(tmp_path, "train.py", SAVED_BUG)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(_config.ENV_VAR, None)
    done = subprocess.run(
        [sys.executable, "-m", "immutorch", "run", "--saved", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1
    assert "immutorch.ImmutableTensorError: immutorch: aten::mul_" in done.stderr
    assert f"at {script}:7" in done.stderr
