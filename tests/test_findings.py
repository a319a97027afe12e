"""The findings report of a test run: every place that wrote into protected memory, one row
per place, in pytest's terminal summary and (``--immutorch-report``) as JSON, merged over
pytest-xdist's workers.

The oracle is the suite itself: each call of ``Zeroing`` writes once at one line, each call of
``Scaling`` once at another, and the tests call them a known number of times.
"""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Any

import pytest
import torch
from project_files import LAYERS, write_files
from torch.utils._python_dispatch import TorchDispatchMode

from immutorch._findings import REPORT_VERSION, Findings
from immutorch._recorder import WriteEvent
from immutorch._rows import Write

pytest_plugins = ["pytester"]


def _setitem_op() -> str:
    """The op that writes ``x[0] = 0`` on this torch (``aten::copy_`` up to 2.13,
    ``aten::fill_`` on 2.15), recorded by a plain dispatch mode: what Zeroing's rows name."""
    written: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func._schema.is_mutable:
                written.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    x = torch.ones(3)
    with Record():
        x[0] = 0
    return written[-1]


SETITEM_OP = _setitem_op()

SUITE = {
    "pkg/__init__.py": "",
    "pkg/layers.py": LAYERS,
    "test_suite.py": """
        import pytest
        import torch
        from pkg.layers import Doubling, Scaling, Zeroing


        def test_zero_once():
            Zeroing()(torch.ones(3))


        def test_zero_three_times():
            for _ in range(3):
                Zeroing()(torch.ones(3))


        def test_scale_then_zero():
            Scaling()(torch.ones(3))
            Zeroing()(torch.ones(3))


        def test_clean():
            Doubling()(torch.ones(3))


        @pytest.mark.immutorch(mode="raise", modules="pkg")
        def test_zero_refused():
            with pytest.raises(Exception, match="SETITEM_OP"):
                Zeroing()(torch.ones(3))
    """.replace("SETITEM_OP", SETITEM_OP),
}
ZEROING_LINE = "pkg/layers.py:6"
SCALING_LINE = "pkg/layers.py:12"
SECTION = "immutorch: writes into protected memory"


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("IMMUTORCH_MODE", raising=False)
    monkeypatch.delenv("IMMUTORCH_SCOPE", raising=False)
    write_files(pytester.path, SUITE)
    return pytester


def _run(pytester: pytest.Pytester, *options: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", *options)


def _section(result: pytest.RunResult) -> list[list[str]]:
    """The rows of the terminal section (cells split on runs of 2+ spaces), header first."""
    lines = result.outlines
    starts = [i for i, line in enumerate(lines) if SECTION in line]
    assert len(starts) == 1, "\n".join(lines)
    table = []
    for line in lines[starts[0] + 1 :]:
        if not line.strip():
            break
        if not line.startswith("---"):
            table.append(re.split(r"\s{2,}", line.strip()))
    return table


def _totals(result: pytest.RunResult) -> str:
    lines = result.outlines
    at = next(i for i, line in enumerate(lines) if SECTION in line)
    return next(line for line in lines[at:] if "into protected memory at" in line)


def test_warn_mode_runs_to_the_end_and_lists_each_place_once(suite: pytest.Pytester) -> None:
    result = _run(suite, "--immutorch=warn", "--immutorch-modules=pkg")
    result.assert_outcomes(passed=5, warnings=4)  # warnings: one per call site and test
    header, *rows = _section(result)
    assert header == [
        "module",
        "op",
        "argument",
        "times",
        "tests",
        "how",
        "first test",
        "line",
        "source",
    ]
    # In the order of each place's first write; every write counted, not once per line.
    assert rows == [
        [
            "Zeroing",
            SETITEM_OP,
            "x",
            "6",
            "4",
            "refused 1, warned 5",
            "test_suite.py::test_zero_once",
            ZEROING_LINE,
            "x[0] = 0",
        ],
        [
            "Scaling",
            "aten::mul_",
            "x",
            "1",
            "1",
            "warned",
            "test_suite.py::test_scale_then_zero",
            SCALING_LINE,
            "x.mul_(2)",
        ],
    ]
    assert _totals(result) == (
        "7 writes into protected memory at 2 places, in 4 of 5 tests (refused 1, warned 6)."
    )


def test_raise_mode_lists_the_refused_writes(suite: pytest.Pytester) -> None:
    result = _run(suite, "--immutorch=raise", "--immutorch-modules=pkg")
    result.assert_outcomes(passed=2, failed=3)
    _, *rows = _section(result)
    # A refused write stops its test: test_zero_three_times writes once, test_scale_then_zero
    # stops at Scaling before it reaches Zeroing.
    assert [(r[0], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("Zeroing", "3", "3", "refused", "test_suite.py::test_zero_once"),
        ("Scaling", "1", "1", "refused", "test_suite.py::test_scale_then_zero"),
    ]


def _json_report(pytester: pytest.Pytester, path: str = "reports/immutorch.json") -> Any:
    return json.loads((pytester.path / path).read_text())


def test_the_json_report_has_a_version_and_the_audits_rows(suite: pytest.Pytester) -> None:
    result = _run(
        suite,
        "--immutorch=warn",
        "--immutorch-modules=pkg",
        "--immutorch-report=reports/immutorch.json",
    )
    result.assert_outcomes(passed=5, warnings=4)
    path = suite.path / "reports" / "immutorch.json"
    result.stdout.fnmatch_lines([f"immutorch: findings report written to {path}"])
    report = _json_report(suite)
    assert report["version"] == REPORT_VERSION
    assert (report["mode"], report["mode_source"], report["scope"]) == (
        "warn",
        "command line",
        "all",
    )
    assert report["modules"] == ["pkg"]
    assert report["rootdir"] == str(suite.path) and report["tests"] == 5
    zeroing, scaling = report["writes"]
    # Every key of an `audit --json` row, from the same code, then the test run's own.
    audit_keys = list(Write("m", "op", "x", "f.py:1", "", 1).as_dict())
    assert list(zeroing)[: len(audit_keys)] == audit_keys
    assert zeroing == {
        "where": "Zeroing",
        "op": SETITEM_OP,
        "argument": "x",
        "location": ZEROING_LINE,
        "source": "x[0] = 0",
        "count": 6,
        "runs": 1,
        "per_run": [6],
        "tests": 4,
        "first_test": "test_suite.py::test_zero_once",
        "per_test": {
            "test_suite.py::test_zero_once": 1,
            "test_suite.py::test_zero_three_times": 3,
            "test_suite.py::test_scale_then_zero": 1,
            "test_suite.py::test_zero_refused": 1,
        },
        "refused": 1,
        "warned": 5,
        "cloned": 0,
    }
    assert (scaling["where"], scaling["location"], scaling["count"]) == ("Scaling", SCALING_LINE, 1)
    assert scaling["per_test"] == {"test_suite.py::test_scale_then_zero": 1}


def test_the_ini_option_names_the_report_relative_to_the_ini_file(suite: pytest.Pytester) -> None:
    suite.makeini(
        "[pytest]\nimmutorch = warn\nimmutorch_modules = pkg\nimmutorch_report = out.json\n"
    )
    (suite.path / "sub").mkdir()
    result = suite.runpytest_subprocess(
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(suite.path),
        str(suite.path / "test_suite.py"),
    )
    result.assert_outcomes(passed=5, warnings=4)
    assert [w["count"] for w in _json_report(suite, "out.json")["writes"]] == [6, 1]


def test_nothing_written_means_no_section_and_an_empty_report(suite: pytest.Pytester) -> None:
    result = _run(
        suite,
        "--immutorch=raise",
        "--immutorch-modules=pkg",
        "--immutorch-report=r.json",
        "-k",
        "clean",
    )
    result.assert_outcomes(passed=1, deselected=4)
    assert SECTION not in result.stdout.str()
    report = _json_report(suite, "r.json")
    assert report["writes"] == [] and report["tests"] == 1


def test_a_plain_run_reports_only_the_marked_tests(suite: pytest.Pytester) -> None:
    # No option: the plugin is on only for the marked test, whose refusal the test expects.
    result = _run(suite)
    result.assert_outcomes(passed=5)
    _, *rows = _section(result)
    assert [(r[0], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("Zeroing", "1", "1", "refused", "test_suite.py::test_zero_refused")
    ]
    result = _run(suite, "-k", "not refused")
    assert SECTION not in result.stdout.str()


def test_clone_mode_lists_the_writes_it_isolated(suite: pytest.Pytester) -> None:
    result = _run(suite, "--immutorch=clone", "--immutorch-modules=pkg", "-k", "scale")
    result.assert_outcomes(passed=1, deselected=4)
    _, *rows = _section(result)
    assert [(r[0], r[3], r[5]) for r in rows] == [
        ("Scaling", "1", "cloned"),
        ("Zeroing", "1", "cloned"),
    ]


@pytest.mark.skipif(
    importlib.util.find_spec("xdist") is None, reason="pytest-xdist is not installed"
)
def test_xdist_workers_merge_into_the_report_of_a_run_without_xdist(
    suite: pytest.Pytester,
) -> None:
    options = ("--immutorch=warn", "--immutorch-modules=pkg")
    _run(suite, *options, "--immutorch-report=alone.json").assert_outcomes(passed=5, warnings=4)
    result = _run(suite, *options, "--immutorch-report=xdist.json", "-n", "2")
    result.assert_outcomes(passed=5)
    alone, merged = _json_report(suite, "alone.json"), _json_report(suite, "xdist.json")
    assert merged == alone
    _, *rows = _section(result)
    assert [(r[0], r[3], r[4], r[6]) for r in rows] == [
        ("Zeroing", "6", "4", "test_suite.py::test_zero_once"),
        ("Scaling", "1", "1", "test_suite.py::test_scale_then_zero"),
    ]


# -- the tally itself, without pytest ---------------------------------------------------------
def _event(where: str, line: int, action: str = "warned") -> WriteEvent:
    return WriteEvent(action, where, "aten::add_", "x", f"/src/m.py:{line}")  # type: ignore[arg-type]


def test_merged_wire_data_equals_one_tally_of_every_write() -> None:
    one, left, right = Findings(), Findings(), Findings()
    plan = [
        ("t::a", 0, [_event("A", 1)]),
        ("t::b", 1, [_event("B", 2), _event("A", 1, "refused")]),
        ("t::c", 2, [_event("A", 1), _event("A", 1)]),
    ]
    for nodeid, position, events in plan:
        for tally in (one, left if position != 1 else right):
            tally.start_test(nodeid, position)
            for event in events:
                tally.hear(event)
            tally.end_test()
    merged = Findings()
    merged.merge_wire(right.to_wire())  # the later tests' worker reports first
    merged.merge_wire(left.to_wire())
    assert merged.tests == one.tests == 3
    assert [p.as_dict(None) for p in merged.places()] == [p.as_dict(None) for p in one.places()]
    a, b = (p.as_dict(None) for p in one.places())
    assert (a["count"], a["tests"], a["first_test"], a["refused"], a["warned"]) == (
        4,
        3,
        "t::a",
        1,
        3,
    )
    assert (b["where"], b["first_test"], b["per_test"]) == ("B", "t::b", {"t::b": 1})


def test_a_write_outside_any_test_is_counted_but_in_no_test() -> None:
    findings = Findings()
    findings.hear(_event("A", 1))
    (place,) = findings.places()
    row = place.as_dict(None)
    assert (row["count"], row["tests"], row["first_test"]) == (1, 0, None)
