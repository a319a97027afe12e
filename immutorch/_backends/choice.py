"""Which backend serves the every-op check (``scope="all"``) on a thread, chosen each time a
thread's first guard needs it. By default the native C++ fallback serves wherever a build for
this torch and Python is in the cache (``python -m immutorch build-native``; a guard never
starts a compiler unasked), and the Python mode elsewhere. ``IMMUTORCH_BACKEND=native``
forces the native one (built at the first guard if missing), ``IMMUTORCH_BACKEND=python`` the
Python mode (see docs/backends.md).

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
CHOICES = ("auto", "native", "python")
DEFAULT = "auto"
_told: set[str] = set()
_told_native = False


def requested() -> str:
    """The backend ``IMMUTORCH_BACKEND`` asks for (read now, so a change applies at the next
    guard entry), or the default."""
    raw = os.environ.get("IMMUTORCH_BACKEND", "").strip().lower()
    if not raw:
        return DEFAULT
    if raw not in CHOICES:
        raise ValueError(
            f"IMMUTORCH_BACKEND={raw!r} is not a backend; use one of {', '.join(CHOICES)} "
            "(or unset it for the default, auto: native where built, else python)."
        )
    return raw


def make_handle(state: ThreadState) -> Any:
    global _told_native
    wanted = requested()
    if wanted != "python":
        if native.available(build=wanted == "native"):
            if not _told_native:  # its line is fixed once loaded: not worded at every guard
                _tell(native.status())
                _told_native = True
            return native.NativeHandle(state)
        # Asked for by name and not there: a warning. The default without a build: a note.
        _tell(native.status(), warning=wanted == "native")
    return mode.ImmutorchMode(state)


def _tell(line: str, *, warning: bool = False) -> None:
    if line not in _told:
        _told.add(line)
        _log.log(
            logging.WARNING if warning else logging.INFO, "immutorch: every-op backend: %s", line
        )


mode.set_handle_factory(make_handle)
