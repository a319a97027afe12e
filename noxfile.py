"""The torch release matrix, run before a release: `python -m nox` (docs/releases.md).

One session per torch release that pyproject's range rests on: the floor (2.4.1); 2.5.1, the
first whose Dynamo skips frames under a dispatch mode, with the old version-counter signature;
2.9.1 in the middle; the release CI runs (2.13, CPU); and the newest. Each session installs
that torch exactly, immutorch from this checkout, builds the native backend, and runs README's
test command, the demo and the examples.

Releases other than 2.13 come from PyPI as the default CUDA builds (~6 GB a venv with their
nvidia-* wheels); they import and run on a CPU-only machine. Keep venvs outside the repository
with `--envdir`, e.g. `python -m nox --envdir ../venvs`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

# Keep in step with pyproject's `torch>=` floor and the release table in docs/releases.md.
TORCH_RELEASES = ["2.4.1", "2.5.1", "2.9.1", "2.13.0", "2.15.0"]

# What each release needs beside torch: wheels built against numpy 1 break on numpy 2 below 2.3.
_EXTRA_PINS = {release: ["numpy<2"] for release in ("2.1.2", "2.2.2")}
# Below the floor, for trying a lower one: `python -m nox -s below_floor` (not run by default).
BELOW_FLOOR = ["2.1.2", "2.2.2", "2.3.1"]


def _constraints(session: nox.Session, torch: str) -> str:
    """Write this session's pip constraints, replacing the machine's own (`PIP_CONSTRAINT`).

    A machine-wide constraints file may cap torch below the release under test (this project's
    build machine caps it at 2.14.1); pip reads `PIP_CONSTRAINT` before its config files.
    """
    path = Path(session.create_tmp()) / f"constraints-torch-{torch}.txt"
    path.write_text("\n".join([f"torch=={torch}", *_EXTRA_PINS.get(torch, [])]) + "\n")
    return str(path)


def _install(session: nox.Session, torch: str, *, below_floor: bool = False) -> None:
    env = {"PIP_CONSTRAINT": _constraints(session, torch)}
    session.install(f"torch=={torch}", env=env)
    if below_floor:  # pyproject's `torch>=` would refuse this torch: install around it
        session.install("--no-deps", "-e", ".", env=env)
        session.install("wrapt", "typing-extensions", "pytest", "numpy", "hypothesis", env=env)
    else:
        session.install("-e", ".[test]", env=env)
    session.run("python", "-c", "import torch; print('torch', torch.__version__)")


def _run(session: nox.Session, env: dict[str, str]) -> None:
    # The native backend for this release (its tests' native halves skip where it is absent;
    # a build that fails fails the session, as in CI).
    session.run("python", "-m", "immutorch", "build-native", env=env)
    session.run("python", "-m", "pytest", "-q", "-p", "no:randomly", *session.posargs, env=env)
    session.run("python", "-m", "immutorch", "demo", silent=True, env=env)
    examples = [
        *sorted(Path("examples").glob("*.py")),
        Path("examples/strict_test_suite/run_strict.py"),
    ]
    for example in examples:
        session.run("python", str(example), silent=True, env=env)


@nox.session
@nox.parametrize("torch", TORCH_RELEASES)
def tests(session: nox.Session, torch: str) -> None:
    """README's test suite, the demo and every example on one torch release."""
    _install(session, torch)
    _run(session, {})


@nox.session(default=False)
@nox.parametrize("torch", BELOW_FLOOR)
def below_floor(session: nox.Session, torch: str) -> None:
    """The same on a release below the floor, with immutorch's torch check switched off."""
    _install(session, torch, below_floor=True)
    _run(session, {"IMMUTORCH_IGNORE_TORCH_FLOOR": "1"})


if __name__ == "__main__":  # pragma: no cover - `python noxfile.py` is not how nox runs it
    sys.exit("run it with `python -m nox` (pip install nox)")
