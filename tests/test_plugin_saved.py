"""The pytest plugin's ``--immutorch-saved``: guard_saved around every test body.

The inner runs exercise torch, so they go through ``runpytest_subprocess`` (see
test_plugin.py). One inner test file holds the bug (a write into sigmoid's saved output) and a
clean training step; the settings decide which fail.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from immutorch import _config

pytest_plugins = ["pytester"]

BUG = """
import pytest
import torch


def test_bug():
    a = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    b = a.sigmoid()
    b.mul_(2)
    b.sum().backward()


def test_clean():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()


@pytest.mark.immutorch(saved=False)
def test_bug_opted_out():
    test_bug()
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(_config.ENV_VAR, raising=False)
    monkeypatch.delenv(_config.SCOPE_ENV_VAR, raising=False)
    monkeypatch.delenv("IMMUTORCH_SAVED", raising=False)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    # The inner runs import this checkout's immutorch, not whichever one is installed.
    root = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    yield


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_suite=BUG)
    return pytester


def test_off_by_default_autograd_reports_at_backward(suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*modified by an inplace operation*"])


def test_command_line_refuses_the_write(suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess("-p", "no:randomly", "--immutorch-saved")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "immutorch: saved (command line)",
            "*ImmutableTensorError: immutorch: aten::mul_ would write into a tensor saved for "
            "backward by SigmoidBackward0 (its output, saved at *test_suite.py:7)*"
            "protected by guard_saved() of pytest --immutorch-saved",
            "*at *test_suite.py:8",
        ]
    )
    # The opted-out test meets autograd's own error, at backward.
    result.stdout.fnmatch_lines(["FAILED *test_bug_opted_out - RuntimeError: one of the var*"])


def test_ini_and_environment(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    suite.makeini("[pytest]\nimmutorch_saved = true\n")
    result = suite.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["immutorch: saved (ini file)", "*SigmoidBackward0*"])
    monkeypatch.setenv("IMMUTORCH_SAVED", "0")  # the environment beats the ini file
    result = suite.runpytest_subprocess("-p", "no:randomly")
    result.stdout.no_fnmatch_line("immutorch: saved*")
    result.stdout.fnmatch_lines(["*modified by an inplace operation*"])


def test_environment_turns_it_on(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMMUTORCH_SAVED", "1")
    result = suite.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["immutorch: saved (environment IMMUTORCH_SAVED)"])


def test_bad_environment_value(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMMUTORCH_SAVED", "maybe")
    result = suite.runpytest_subprocess("-p", "no:randomly")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*IMMUTORCH_SAVED must be one of*got 'maybe'*"])


def test_warn_mode_lets_it_land_and_backward_fails(suite: pytest.Pytester) -> None:
    result = suite.runpytest_subprocess(
        "-p", "no:randomly", "--immutorch-saved", "--immutorch=warn", "-W", "default"
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*backward needs a tensor saved for*", "*MutationWarning*"])


def test_marker_turns_it_on_for_one_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_marked=textwrap.dedent(
            """
            import pytest
            import torch

            @pytest.mark.immutorch(saved=True)
            def test_marked():
                a = torch.ones(3, requires_grad=True)
                b = a.exp()
                b.add_(1)

            @pytest.mark.immutorch(saved="yes")
            def test_bad_marker():
                pass
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*ExpBackward0*", "*saved= of @pytest.mark.immutorch*must be True or False*"]
    )
