"""Modes and scopes, and where the one in force comes from: code < environment < the pytest
plugin (``IMMUTORCH_MODE``, ``IMMUTORCH_SCOPE``)."""

from __future__ import annotations

import os
from typing import Any, Optional

from typing_extensions import Literal, TypeAlias, get_args

Mode: TypeAlias = Literal["raise", "warn", "clone", "off"]

MODES: tuple[Mode, ...] = get_args(Mode)
ENV_VAR = "IMMUTORCH_MODE"

# Which ops a guard intercepts: every op on the thread ("all", the TorchDispatchMode), or only
# the ops whose arguments include protected memory handed across a boundary ("arguments", a
# tensor subclass; see ``_scoped``).
Scope: TypeAlias = Literal["all", "arguments"]

SCOPES: tuple[Scope, ...] = get_args(Scope)
SCOPE_ENV_VAR = "IMMUTORCH_SCOPE"

# How strict each mode is; a tensor protected by several guards gets the strictest.
STRICTNESS: dict[str, int] = {"off": 0, "warn": 1, "clone": 2, "raise": 3}

_override: Optional[Mode] = None
_scope_override: Optional[Scope] = None


def check_mode(mode: object, *, source: str = "mode") -> Mode:
    """Return ``mode`` if it is a valid mode, else raise a ValueError that lists the choices."""
    return _check_choice(mode, MODES, source)  # type: ignore[return-value]


def _check_choice(value: object, choices: tuple[str, ...], source: str) -> str:
    if isinstance(value, str) and value in choices:
        return value
    listed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"immutorch: {source} must be one of {listed}, got {value!r}")


def check_scope(scope: object, *, source: str = "scope") -> Scope:
    """Return ``scope`` if it is a valid scope, else raise a ValueError that lists the choices."""
    return _check_choice(scope, SCOPES, source)  # type: ignore[return-value]


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


def _encoded(name: str) -> Any:
    return os.environ.encodekey(name) if hasattr(os.environ, "encodekey") else name


_env_key: Any = _encoded(ENV_VAR)
_scope_env_key: Any = _encoded(SCOPE_ENV_VAR)


def _env_mode() -> Optional[str]:
    return _env(_env_key, ENV_VAR)


def _env(key: Any, name: str) -> Optional[str]:
    if _environ_data is not None:
        raw = _environ_data.get(key)
        if raw is None:
            return None
        return os.environ.decodevalue(raw) if hasattr(os.environ, "decodevalue") else str(raw)
    return os.environ.get(name)


def resolve(requested: Mode) -> Mode:
    """The mode a guard runs in: the plugin's override, else ``IMMUTORCH_MODE``, else the code's."""
    if _override is not None:
        return _override
    env = _env_mode()
    if env:
        return check_mode(env.strip().lower(), source=f"the environment variable {ENV_VAR}")
    return requested


def set_scope_override(scope: Optional[Scope]) -> Optional[Scope]:
    """Force every guard, decorator and watch into ``scope`` (None lifts it); return the
    previous one. The pytest plugin forces ``"all"`` in strict mode unless told otherwise."""
    global _scope_override
    previous = _scope_override
    _scope_override = None if scope is None else check_scope(scope)
    return previous


def get_scope_override() -> Optional[Scope]:
    return _scope_override


def resolve_scope(requested: Scope) -> Scope:
    """The scope a guard runs in: the plugin's override, else ``IMMUTORCH_SCOPE``, else the
    code's."""
    if _scope_override is not None:
        return _scope_override
    env = _env(_scope_env_key, SCOPE_ENV_VAR)
    if env:
        return check_scope(env.strip().lower(), source=f"the environment variable {SCOPE_ENV_VAR}")
    return requested
