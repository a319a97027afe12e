"""The findings of a test run: every place that wrote into protected memory, one row each.

The pytest plugin starts a :class:`Findings` for each test it is on for; the recorder tells it
of each write the policy refused, warned of or isolated in a copy, and it counts them per
place (module path and class, op, argument, line) with the tests that hit each place. At the
end of the run the rows go into pytest's terminal summary and, with ``--immutorch-report``,
into a JSON file whose rows are ``audit --json``'s (:class:`immutorch._rows.Write`) with the
tests added. pytest-xdist's workers hand their findings to the controller as plain data
(:meth:`Findings.to_wire`), which merges them (:meth:`Findings.merge_wire`) into one report.

Nothing here imports torch: an xdist controller runs no test and need not import it.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from ._recorder import WriteEvent
from ._rows import Key, Write, key_of, relative_location, source_line, table

# The JSON report's format. Its rows are audit --json's (version 2) with keys added.
REPORT_VERSION = 1
# The key of a worker's findings in pytest-xdist's workeroutput.
WIRE_KEY = "immutorch_findings"
ACTIONS = ("refused", "warned", "cloned")
# Where a place hit outside any test (at collection) sorts: after every test.
_NEVER = sys.maxsize


@dataclass
class _Place:
    """One place's tally, as it grows."""

    where: str
    op: str
    argument: str
    location: Optional[str]
    source: str
    count: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    per_test: dict[str, int] = field(default_factory=dict)  # node id -> count, first hit first
    # (the test's position in the run, the write's position in that test) of the first write,
    # and that test: positions, not arrival, so xdist's workers merge to the same order.
    first: tuple[int, int] = (_NEVER, 0)
    first_test: Optional[str] = None

    def write(self) -> Write:
        return Write(self.where, self.op, self.argument, self.location, self.source, self.count)

    def how(self) -> str:
        """``"refused"``, or ``"refused 2, warned 1"`` where a place was met in two modes."""
        done = [(a, self.actions[a]) for a in ACTIONS if self.actions.get(a)]
        if len(done) == 1:
            return done[0][0]
        return ", ".join(f"{action} {n}" for action, n in done)

    def as_dict(self, base: Optional[str]) -> dict[str, Any]:
        """An ``audit --json`` row (the session is one run) with ``location`` relative to
        ``base``, and the test run's own keys."""
        row = self.write().as_dict()
        row["location"] = relative_location(self.location, base)
        row["tests"] = len(self.per_test)
        row["first_test"] = self.first_test
        row["per_test"] = dict(self.per_test)
        for action in ACTIONS:
            row[action] = self.actions.get(action, 0)
        return row


class Findings:
    """The writes into protected memory of one session (or one xdist worker), per place."""

    def __init__(self) -> None:
        self._places: dict[Key, _Place] = {}
        self._lock = threading.Lock()  # writes may come from other threads (autograd, loaders)
        self._test: Optional[tuple[str, int]] = None
        self._writes_in_test = 0
        self.tests = 0  # tests run with the plugin on

    # -- while the run goes ---------------------------------------------------------------
    def start_test(self, nodeid: str, position: int) -> None:
        """The writes heard from now on are ``nodeid``'s, the ``position``-th test of the run."""
        with self._lock:
            self._test = (nodeid, position)
            self._writes_in_test = 0
            self.tests += 1

    def end_test(self) -> None:
        with self._lock:
            self._test = None

    def hear(self, event: WriteEvent) -> None:
        """The recorder's listener: count ``event`` at its place, for the running test."""
        key = key_of(event)
        with self._lock:
            place = self._places.get(key)
            if place is None:
                place = self._places[key] = _Place(*key, source=source_line(event.location))
            place.count += 1
            place.actions[event.action] = place.actions.get(event.action, 0) + 1
            if self._test is not None:
                nodeid, position = self._test
                place.per_test[nodeid] = place.per_test.get(nodeid, 0) + 1
                at = (position, self._writes_in_test)
                if at < place.first:
                    place.first, place.first_test = at, nodeid
            self._writes_in_test += 1

    # -- pytest-xdist: from the workers to the controller ------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """Plain data (execnet carries dicts, lists, strings and numbers)."""
        with self._lock:
            return {
                "tests": self.tests,
                "places": [
                    {
                        "key": list(key),
                        "source": p.source,
                        "count": p.count,
                        "actions": dict(p.actions),
                        "per_test": dict(p.per_test),
                        "first": list(p.first),
                        "first_test": p.first_test,
                    }
                    for key, p in self._places.items()
                ],
            }

    def merge_wire(self, data: dict[str, Any]) -> None:
        """Add a worker's :meth:`to_wire` to these findings."""
        with self._lock:
            self.tests += int(data.get("tests", 0))
            for item in data.get("places", []):
                where, op, argument, location = item["key"]
                key: Key = (where, op, argument, location)
                place = self._places.get(key)
                if place is None:
                    place = self._places[key] = _Place(*key, source=item["source"])
                place.count += item["count"]
                for action, n in item["actions"].items():
                    place.actions[action] = place.actions.get(action, 0) + n
                for nodeid, n in item["per_test"].items():
                    place.per_test[nodeid] = place.per_test.get(nodeid, 0) + n
                first = (int(item["first"][0]), int(item["first"][1]))
                if first < place.first:
                    place.first, place.first_test = first, item["first_test"]

    # -- at the end ------------------------------------------------------------------------
    def places(self) -> list[_Place]:
        """In the order of the first write at each, over the run's test order."""
        with self._lock:
            return sorted(self._places.values(), key=lambda p: p.first)

    def __bool__(self) -> bool:
        return bool(self._places)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_lines(findings: Findings, base: Optional[str]) -> list[str]:
    """The terminal section: the table, then one line of totals; [] when nothing wrote."""
    places = findings.places()
    if not places:
        return []
    header = ("module", "op", "argument", "times", "tests", "how", "first test", "line", "source")
    rows: Sequence[Sequence[str]] = [
        (
            p.where,
            p.op,
            p.argument,
            str(p.count),
            str(len(p.per_test)),
            p.how(),
            p.first_test or "(outside tests)",
            relative_location(p.location, base) or "?",
            p.source,
        )
        for p in places
    ]
    total = sum(p.count for p in places)
    hit = len({nodeid for p in places for nodeid in p.per_test})
    by_action = ", ".join(
        f"{action} {n}"
        for action in ACTIONS
        if (n := sum(p.actions.get(action, 0) for p in places))
    )
    totals = (
        f"{_plural(total, 'write')} into protected memory at {_plural(len(places), 'place')}, "
        f"in {hit} of {_plural(findings.tests, 'test')} ({by_action})."
    )
    return [*table(header, rows).splitlines(), "", totals]


def report(findings: Findings, base: Optional[str], settings: dict[str, Any]) -> dict[str, Any]:
    """The ``--immutorch-report`` JSON: the version, what the plugin was asked to do
    (``settings``), the root the locations are relative to, the number of tests it was on
    for, and the rows (``"writes"``, as in ``audit --json``)."""
    return {
        "version": REPORT_VERSION,
        **settings,
        "rootdir": base,
        "tests": findings.tests,
        "writes": [p.as_dict(base) for p in findings.places()],
    }
