"""``--run-slow`` (or ``IMMUTORCH_RUN_SLOW=1``) runs the tests marked ``slow``."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
    # Modules marked both_backends run each test through both every-op backends; with
    # births=True, the native one twice: blocks dating births by allocation (where no
    # accelerator is, as here) and by op (as wherever one is).
    marker = metafunc.definition.get_closest_marker("both_backends")
    if marker is not None:
        backends = ["python", "native"]
        if marker.kwargs.get("births"):
            backends.append(NATIVE_OP_BIRTHS)
        metafunc.parametrize("every_op_backend", backends, indirect=True)


NATIVE_OP_BIRTHS = "native-op-births"


@pytest.fixture(autouse=True)
def every_op_backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The every-op backend a test runs through: IMMUTORCH_BACKEND is read at each guard entry.
    ``native-op-births`` is the native backend with blocks dating births by op; the test sees
    ``"native"``."""
    backend: str = getattr(request, "param", "")
    if not backend:
        from immutorch._backends import choice, native

        chosen = choice.requested()
        if chosen == "auto":  # the default: native where a build is cached
            chosen = "native" if native.available(build=False) else "python"
        yield chosen
        return
    if backend == "python":
        monkeypatch.setenv("IMMUTORCH_BACKEND", backend)
        yield backend
        return
    from immutorch._backends import native

    if not native.available():
        pytest.skip(f"native backend unavailable: {native.unavailable_reason()}")
    monkeypatch.setenv("IMMUTORCH_BACKEND", "native")
    by_allocation = native.only_cpu()
    if backend == NATIVE_OP_BIRTHS:
        native.set_births_by_allocation(False)
    try:
        yield "native"
    finally:
        native.set_births_by_allocation(by_allocation)
