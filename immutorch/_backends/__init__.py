"""The backends: how a guard sees the ops that may write into protected memory.

Each backend intercepts aten ops its own way and hands every written tensor to the same
judgement (``immutorch._judge``), so policies, messages and the block rule are shared:

- ``mode``: a ``TorchDispatchMode`` that sees every op on the thread (``scope="all"``);
- ``scoped``: the ``Protected`` tensor subclass handed to a callee in place of each protected
  argument, so only ops on protected memory leave C++ (``scope="arguments"``);
- ``native``: the every-op check as a C++ dispatcher fallback, serving ``scope="all"`` by
  default wherever it is built (``python -m immutorch build-native``).

The backends never import each other.
"""

from __future__ import annotations

import os


def requested_status() -> str:
    """Which every-op backend ``IMMUTORCH_BACKEND`` asks for, as one line, without importing
    torch (the pytest plugin's header runs before the suite imports it); once the native
    backend has been tried, ``native.status()`` says what came of it."""
    choice = os.environ.get("IMMUTORCH_BACKEND", "").strip().lower()
    if choice == "python":
        return "python (IMMUTORCH_BACKEND=python)"
    if choice == "native":
        return "native (IMMUTORCH_BACKEND=native; built or loaded at the first guard)"
    return "native where built, else python (default; known at the first guard)"
