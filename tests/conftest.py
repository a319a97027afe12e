"""``--run-slow`` (or ``IMMUTORCH_RUN_SLOW=1``) runs the tests marked ``slow``."""

from __future__ import annotations

import os

import pytest

# Subprocesses (pytester's runpytest_subprocess, the CLI's) import the immutorch of this tree,
# not whichever one is installed: a worktree's tests test the worktree.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != _ROOT:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="run tests marked slow (also: IMMUTORCH_RUN_SLOW=1)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("IMMUTORCH_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or IMMUTORCH_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Modules marked both_backends run each test through both every-op backends.
    if metafunc.definition.get_closest_marker("both_backends") is not None:
        metafunc.parametrize("every_op_backend", ["python", "native"], indirect=True)


@pytest.fixture(autouse=True)
def every_op_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The every-op backend a test runs through: IMMUTORCH_BACKEND is read at each guard entry."""
    backend: str = getattr(request, "param", "")
    if not backend:
        from immutorch._backends import choice, native

        chosen = choice.requested()
        if chosen == "auto":  # the default: native where a build is cached
            chosen = "native" if native.available(build=False) else "python"
        return chosen
    if backend == "native":
        from immutorch._backends import native

        if not native.available():
            pytest.skip(f"native backend unavailable: {native.unavailable_reason()}")
    monkeypatch.setenv("IMMUTORCH_BACKEND", backend)
    return backend
