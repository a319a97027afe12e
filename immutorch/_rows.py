"""One row per place that wrote into protected memory: the audit's rows and the pytest
plugin's findings report are made, keyed, written as JSON and laid out here, once.

A place is (module path and class, op, argument, line): the same line writing through two
modules, or two ops, is two places. Nothing here imports torch: the plugin merges the rows of
pytest-xdist's workers in a controller that need not have imported it.
"""

from __future__ import annotations

import linecache
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from ._recorder import WriteEvent

# (where, op, argument, location): what makes two writes the same place.
Key = tuple[str, str, str, Optional[str]]


def key_of(event: WriteEvent) -> Key:
    return (event.where, event.op, event.argument, event.location)


@dataclass(frozen=True)
class Write:
    """One place where the code writes into a tensor it was handed."""

    where: str  # module path and class, or the protecting function
    op: str  # e.g. "aten::copy_"
    argument: str  # the protected argument, e.g. "x"
    location: Optional[str]  # "file.py:12" of the line that wrote
    source: str  # that line's text, stripped
    count: int  # how many times it wrote there, all runs together
    per_run: tuple[int, ...] = field(default=())  # the count in each run, in order

    @property
    def runs(self) -> int:
        """In how many runs it wrote there at least once."""
        return sum(1 for n in self.per_run if n) if self.per_run else 1

    def as_dict(self) -> dict[str, Any]:
        """A row of ``audit --json`` (version 2), and the start of a findings report's row."""
        return {
            "where": self.where,
            "op": self.op,
            "argument": self.argument,
            "location": self.location,
            "source": self.source,
            "count": self.count,
            "runs": self.runs,
            "per_run": list(self.per_run) if self.per_run else [self.count],
        }


def count_writes(events: Iterable[WriteEvent]) -> list[Write]:
    """One row per place over ``events`` (one run), in the order first seen."""
    counts: dict[Key, int] = {}
    for event in events:
        key = key_of(event)
        counts[key] = counts.get(key, 0) + 1
    return [
        Write(where, op, argument, location, source_line(location), count, (count,))
        for (where, op, argument, location), count in counts.items()
    ]


def merge_runs(per_run: list[list[Write]]) -> list[Write]:
    """One row per place (module, op, argument, line) over all runs, in the order first
    seen, with the total count and the count in each run."""
    counts: dict[Key, list[int]] = {}
    first: dict[Key, Write] = {}
    for i, writes in enumerate(per_run):
        for w in writes:
            key = (w.where, w.op, w.argument, w.location)
            first.setdefault(key, w)
            counts.setdefault(key, [0] * len(per_run))[i] += w.count
    return [
        Write(w.where, w.op, w.argument, w.location, w.source, sum(counts[k]), tuple(counts[k]))
        for k, w in first.items()
    ]


def source_line(location: Optional[str]) -> str:
    """The text of the line at ``location`` (``"file.py:12"``), stripped; "" where unknown."""
    if not location:
        return ""
    filename, _, lineno = location.rpartition(":")
    if not lineno.isdigit():
        return ""
    return linecache.getline(filename, int(lineno)).strip()


def relative_location(location: Optional[str], base: Optional[str] = None) -> Optional[str]:
    """``location`` relative to ``base`` (default: the working directory) where it lies
    below it, else as it is."""
    if not location:
        return location
    rel = os.path.relpath(location, base) if base is not None else os.path.relpath(location)
    return location if rel.startswith("..") else rel


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell, a dashed rule under the header; the last column
    (the source line) is not padded."""
    lines_of: list[Sequence[str]] = [header, *rows]
    widths = [max(len(r[i]) for r in lines_of) for i in range(len(header) - 1)]
    lines = []
    for r in lines_of:
        cells = [cell.ljust(width) for cell, width in zip(r, widths)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ------")
    return "\n".join(lines)
