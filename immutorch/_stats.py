"""Counters clone mode keeps: copies made and bytes copied."""

from __future__ import annotations

from ._registry import TOTAL_STATS, CloneStats


def clone_stats() -> CloneStats:
    """Copies made by clone mode in this process so far (a snapshot).

    Examples:
        >>> import immutorch
        >>> before = immutorch.clone_stats()
        >>> immutorch.clone_stats().copies - before.copies
        0
    """
    return CloneStats(TOTAL_STATS.copies, TOTAL_STATS.bytes_copied)
