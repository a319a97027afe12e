"""Which backend serves the every-op check (``scope="all"``) on a thread, chosen each time a
thread's first guard needs it: ``IMMUTORCH_BACKEND=native|python`` forces one; by default the
Python mode serves and the native C++ fallback is opt-in (see docs/backends.md).

Where native is asked for but cannot be built or loaded, or its dispatch key is taken by
another library, the Python mode serves and one line on the ``immutorch`` logger says why.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .._registry import ThreadState
from . import mode, native

_log = logging.getLogger("immutorch")
CHOICES = ("native", "python")
DEFAULT = "python"
_told: set[str] = set()


def requested() -> str:
    """The backend ``IMMUTORCH_BACKEND`` asks for (read now, so a change applies at the next
    guard entry), or the default."""
    raw = os.environ.get("IMMUTORCH_BACKEND", "").strip().lower()
    if not raw:
        return DEFAULT
    if raw not in CHOICES:
        raise ValueError(
            f"IMMUTORCH_BACKEND={raw!r} is not a backend; use one of {', '.join(CHOICES)} "
            "(or unset it for the default)."
        )
    return raw


def make_handle(state: ThreadState) -> Any:
    if requested() == "native":
        if native.available():
            _tell(native.status())
            return native.NativeHandle(state)
        _tell(native.status(), warning=True)
    return mode.ImmutorchMode(state)


def _tell(line: str, *, warning: bool = False) -> None:
    if line not in _told:
        _told.add(line)
        _log.log(
            logging.WARNING if warning else logging.INFO, "immutorch: every-op backend: %s", line
        )


mode.set_handle_factory(make_handle)
