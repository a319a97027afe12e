"""torch.compile: keep the mode's promise without the dispatch mode.

With any dispatch mode on the stack Dynamo skips the frame and runs eager, and on torch 2.13
the skip lasts for the code object for the rest of the process (pytorch #190286). So a compiled
module or function is never run under immutorch's mode: at its boundary the mode is taken off
the stack for the call, and the protected inputs are handled from the outside:

- ``raise``: the call gets private clones; if it wrote into one (its version moved),
  ImmutableTensorError is raised after the call. The caller's data was never touched.
- ``clone``: the call gets private clones (copied up front, counted in the stats).
- ``warn``: the call gets the caller's tensors; a MutationWarning follows any version change.

What happened is logged once per compiled callable on the ``immutorch`` logger.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

import torch

from ._compat import (
    current_dispatch_mode,
    dispatch_mode_flags_match_stack,
    dynamo_backends,
    pop_dispatch_mode,
    push_dispatch_mode,
)
from ._errors import ImmutableTensorError, MutationWarning
from ._registry import STATE, TOTAL_STATS, CloneStats

_log = logging.getLogger("immutorch")
_told: set[str] = set()

COMPILED_OP = "torch.compile"


def compile_in_use() -> bool:
    """Whether torch.compile has been called in this process.

    ``"torch._dynamo" in sys.modules`` is no test: every TorchDispatchMode imports it (its
    ``__torch_dispatch__`` is wrapped in ``torch._disable_dynamo``). Dynamo records each
    backend a ``torch.compile`` call set up; the only one present otherwise is ``None``, the
    disabled backend. Where that record is missing (another torch), assume compile is in use.
    """
    backends = dynamo_backends()
    if backends is None:
        return True
    return any(backend is not None for backend in backends.values())


class CompiledBoundary:
    """Inputs handed to one compiled call, checked after it returns."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.checks: list[tuple[torch.Tensor, int, str, str]] = []
        self.popped: Optional[Any] = None
        self.flags: Optional[contextlib.AbstractContextManager[None]] = None
        self.entered = False

    def hand_over(self, t: torch.Tensor, mode: str, label: str, stats: CloneStats) -> torch.Tensor:
        if mode == "warn":
            self.checks.append((t, t._version, label, mode))
            return t
        STATE.bypass += 1
        try:
            copy = t.detach().clone(memory_format=torch.preserve_format)
            copy.requires_grad_(t.requires_grad)
        finally:
            STATE.bypass -= 1
        nbytes = t.numel() * t.element_size()
        stats.add(nbytes)
        TOTAL_STATS.add(nbytes)
        if mode == "raise":
            self.checks.append((copy, copy._version, label, mode))
        return copy

    def __enter__(self) -> CompiledBoundary:
        if self.where not in _told:
            _told.add(self.where)
            _log.warning(
                "immutorch: %s is compiled with torch.compile; it runs without immutorch's "
                "dispatch mode so that it stays compiled, and its protected inputs are checked "
                "at its boundary instead (raise/clone: it gets private copies; warn: version "
                "check after the call).",
                self.where,
            )
        # Our mode must not be on the stack while Dynamo looks at the frame.
        try:
            if STATE.mode_handle is not None and current_dispatch_mode() is STATE.mode_handle:
                self.popped = pop_dispatch_mode()
                # Popping is not enough on 2.5 to 2.12: Dynamo reads flags only __exit__ clears.
                flags = dispatch_mode_flags_match_stack()
                flags.__enter__()
                self.flags = flags
            STATE.bypass += 1
            self.entered = True
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        """Undo what __enter__ did, and only that (it may have failed half way)."""
        try:
            if self.entered:
                self.entered = False
                STATE.bypass -= 1
            if self.flags is not None:
                flags, self.flags = self.flags, None
                flags.__exit__(None, None, None)
        finally:
            if self.popped is not None:
                popped, self.popped = self.popped, None
                push_dispatch_mode(popped)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._restore()
        if exc_type is None:
            self.check()

    def check(self) -> None:
        for t, version, label, mode in self.checks:
            if t._version == version:
                continue
            text = (
                f"immutorch: compiled code in {self.where} wrote into `{label}` "
                f"(a {str(t.dtype).replace('torch.', '')} tensor of shape {list(t.shape)})"
            )
            attrs: dict[str, Any] = {
                "op": COMPILED_OP,
                "argument": label,
                "where": self.where,
                "location": None,
                "shape": tuple(t.shape),
                "dtype": t.dtype,
            }
            if mode == "raise":
                raise ImmutableTensorError(
                    text + ". It wrote into a private copy; your tensor is unchanged. Write into "
                    'a new tensor instead, or use mode="clone".',
                    **attrs,
                )
            import warnings

            warnings.warn(
                MutationWarning(text + '; the write went ahead (mode="warn").', **attrs),
                stacklevel=3,
            )
