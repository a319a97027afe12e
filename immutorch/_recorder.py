"""Who hears of each write into protected memory: the policy tells :func:`record` what it did
(refused, warned of, isolated in a copy), and a listener keeps it (the pytest plugin's findings
report, the audit). With no listener, recording costs one truth test at each such write.

Only strings cross here, never a tensor or a frame: a listener may outlive the code it heard.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional

from typing_extensions import Literal, TypeAlias

# What the policy did at the write: raise (refused), warn (warned, the write went ahead),
# clone (cloned: the write landed in the callee's private copy).
Action: TypeAlias = Literal["refused", "warned", "cloned"]


@dataclass(frozen=True)
class WriteEvent:
    """One write into protected memory, as the policy saw it."""

    action: Action
    where: str  # module path and class, or the protecting function / guard
    op: str  # e.g. "aten::copy_"
    argument: str  # the protected argument, e.g. "x"
    location: Optional[str]  # "file.py:12" of the user's line, None where none was found


Listener = Callable[[WriteEvent], None]

_lock = threading.Lock()
# Replaced, never mutated, so record() reads it without the lock.
_listeners: tuple[Listener, ...] = ()


def listening() -> bool:
    """Whether anyone listens: the policy builds no event otherwise."""
    return bool(_listeners)


def record(event: WriteEvent) -> None:
    """Tell every listener, on the thread that wrote."""
    for listener in _listeners:
        listener(event)


def add_listener(listener: Listener) -> None:
    global _listeners
    with _lock:
        _listeners = (*_listeners, listener)


def remove_listener(listener: Listener) -> None:
    """Take ``listener`` off (once, if added more than once); nothing if it is not on."""
    global _listeners
    with _lock:
        if listener in _listeners:
            at = _listeners.index(listener)
            _listeners = _listeners[:at] + _listeners[at + 1 :]


@contextlib.contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Call ``listener`` with each write into protected memory while the block runs."""
    add_listener(listener)
    try:
        yield
    finally:
        remove_listener(listener)
