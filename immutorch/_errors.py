"""The two things immutorch raises or warns, and the text they carry."""

from __future__ import annotations

from typing import Optional

import torch


class _WriteReport(Exception):
    """Attributes shared by the error and the warning: what was written, where, by whom."""

    op: str
    argument: str
    where: str
    location: Optional[str]
    shape: tuple[int, ...]
    dtype: Optional[torch.dtype]

    def __init__(
        self,
        message: str,
        *,
        op: str = "",
        argument: str = "",
        where: str = "",
        location: Optional[str] = None,
        shape: tuple[int, ...] = (),
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(message)
        self.op = op
        self.argument = argument
        self.where = where
        self.location = location
        self.shape = shape
        self.dtype = dtype


class ImmutableTensorError(_WriteReport, RuntimeError):
    """Raised before an operation writes into a protected tensor; the data is left untouched.

    Attributes: ``op`` (``"aten::copy_"``), ``argument`` (the protected parameter or
    ``guard`` position), ``where`` (function or module path), ``location`` (``"file.py:12"``
    of the user's line), ``shape`` and ``dtype`` of the protected tensor.

    Examples:
        >>> import torch, immutorch
        >>> x = torch.zeros(3)
        >>> with immutorch.guard(x):
        ...     x.add_(1)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        immutorch.ImmutableTensorError: aten::add_ would write into ...
    """


class MutationWarning(_WriteReport, UserWarning):
    """Issued in ``warn`` mode when an operation writes into a protected tensor.

    The write goes ahead. It carries the same attributes as ``ImmutableTensorError``.
    Turn it into an error with ``-W error::immutorch.MutationWarning``.
    """


# Tracebacks and ``-W error::immutorch.MutationWarning`` show and accept the public path.
ImmutableTensorError.__module__ = "immutorch"
MutationWarning.__module__ = "immutorch"


def _apply_interpreter_warning_options() -> None:
    """``python -W error::immutorch.MutationWarning`` is read before site-packages can be
    imported, so CPython drops it ("invalid module name"). Apply such options now."""
    import re
    import sys
    import warnings

    actions = ("default", "error", "ignore", "always", "module", "once")
    for option in sys.warnoptions:
        parts = [p.strip() for p in option.split(":")]
        if len(parts) < 3 or parts[2] != "immutorch.MutationWarning" or len(parts) > 5:
            continue
        action = next((a for a in actions if parts[0] and a.startswith(parts[0])), None)
        if action is None:
            continue  # malformed: CPython already said so at startup
        module = parts[3] if len(parts) > 3 else ""
        lineno = int(parts[4]) if len(parts) > 4 and parts[4].isdigit() else 0
        warnings.filterwarnings(
            action,  # type: ignore[arg-type]
            re.escape(parts[1]),
            MutationWarning,
            re.escape(module) + r"\Z" if module else "",
            lineno,
        )


_apply_interpreter_warning_options()
