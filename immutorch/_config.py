"""Modes and where the mode in force comes from: code < IMMUTORCH_MODE < the pytest plugin."""

from __future__ import annotations

import os
from typing import Any, Optional

from typing_extensions import Literal, TypeAlias, get_args

Mode: TypeAlias = Literal["raise", "warn", "clone", "off"]

MODES: tuple[Mode, ...] = get_args(Mode)
ENV_VAR = "IMMUTORCH_MODE"

# How strict each mode is; a tensor protected by several guards gets the strictest.
STRICTNESS: dict[str, int] = {"off": 0, "warn": 1, "clone": 2, "raise": 3}

_override: Optional[Mode] = None


def check_mode(mode: object, *, source: str = "mode") -> Mode:
    """Return ``mode`` if it is a valid mode, else raise a ValueError that lists the choices."""
    if isinstance(mode, str) and mode in STRICTNESS:
        return mode  # type: ignore[return-value]
    choices = ", ".join(repr(m) for m in MODES)
    raise ValueError(f"immutorch: {source} must be one of {choices}, got {mode!r}")


def set_override(mode: Optional[Mode]) -> Optional[Mode]:
    """Force every guard and decorator into ``mode`` (None lifts it); return the previous one.

    Used by the pytest plugin, which resolves ini < environment < command line < marker.
    """
    global _override
    previous = _override
    _override = None if mode is None else check_mode(mode)
    return previous


def get_override() -> Optional[Mode]:
    return _override


# resolve() runs on every decorated call: os.environ.get costs ~1 us (it encodes the key each
# time), a lookup in the mapping behind os.environ costs ~40 ns and sees the same updates.
_environ_data: Optional[dict[Any, Any]] = getattr(os.environ, "_data", None)
_env_key: Any = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR


def _env_mode() -> Optional[str]:
    if _environ_data is not None:
        raw = _environ_data.get(_env_key)
        if raw is None:
            return None
        return os.environ.decodevalue(raw) if hasattr(os.environ, "decodevalue") else str(raw)
    return os.environ.get(ENV_VAR)


def resolve(requested: Mode) -> Mode:
    """The mode a guard runs in: the plugin's override, else ``IMMUTORCH_MODE``, else the code's."""
    if _override is not None:
        return _override
    env = _env_mode()
    if env:
        return check_mode(env.strip().lower(), source=f"the environment variable {ENV_VAR}")
    return requested
