"""``python -m immutorch audit``: run a model once and list every write into an input.

The target's inputs are protected in warn mode, and so is every argument of every
``nn.Module`` call inside it (``watch_modules``), so a write into data handed from one
submodule to the next is found too. Warn mode lets each write go ahead, so the run completes
and every write is reported, not only the first.
"""

from __future__ import annotations

import importlib
import inspect
import linecache
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

from ._boundaries import watch_modules
from ._errors import MutationWarning
from ._guard import guard


class AuditError(Exception):
    """The target could not be loaded, built or run; the message says why."""


@dataclass(frozen=True)
class Write:
    """One place where the audited code writes into a tensor it was handed."""

    where: str  # module path and class, or the protecting function
    op: str  # e.g. "aten::copy_"
    argument: str  # the protected argument, e.g. "x"
    location: Optional[str]  # "file.py:12" of the line that wrote
    source: str  # that line's text, stripped
    count: int  # how many times the run wrote there

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_target(spec: str) -> Callable[..., Any]:
    """Resolve ``package.module:attr`` to the callable to audit.

    A module instance is audited as is; a class is instantiated with no arguments; a function
    with no required parameters is a factory and is called to get the module or function to
    audit; any other callable is audited itself.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise AuditError(f"TARGET must look like package.module:callable, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise AuditError(f"cannot import {module_name!r}: {exc}") from exc
    for name in attr_path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise AuditError(f"{module_name!r} has no attribute {attr_path!r}") from None
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, type) or (callable(obj) and not _required_params(obj)):
        try:
            built = obj()
        except Exception as exc:
            what = "instantiating" if isinstance(obj, type) else "calling"
            raise AuditError(f"{what} {spec} with no arguments failed: {exc!r}") from exc
        if not callable(built):
            raise AuditError(f"{spec}() returned {type(built).__name__}, not a module or function")
        return built  # type: ignore[no-any-return]
    if callable(obj):
        return obj  # type: ignore[no-any-return]
    raise AuditError(f"{spec} is a {type(obj).__name__}, not a module, class or function")


def _required_params(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        for p in params
    )


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,80,300"`` -> ``(8, 80, 300)``; raises ValueError with a readable message."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        msg = f"a shape is comma-separated integers like 8,80,300, got {text!r}"
        raise ValueError(msg) from None
    if not shape or any(n < 0 for n in shape):
        raise ValueError(f"a shape is comma-separated non-negative integers, got {text!r}")
    return shape


def make_inputs(shapes: list[tuple[int, ...]], lengths: bool, seed: int = 0) -> list[torch.Tensor]:
    """Random float32 inputs of ``shapes``, then (``lengths``) relative lengths of ones."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=gen) for shape in shapes]
    if lengths:
        batch = shapes[0][0] if shapes and shapes[0] else 1
        inputs.append(torch.ones(batch))
    return inputs


def audit(target: Callable[..., Any], inputs: list[torch.Tensor]) -> list[Write]:
    """Call ``target(*inputs)`` once and return each write site into a protected tensor."""
    seen: dict[tuple[str, str, str, Optional[str]], list[Any]] = {}

    def record(message: Any, category: Any, *_: Any, **__: Any) -> None:
        if not isinstance(message, MutationWarning):
            return
        location, source = _writing_line(message.location)
        key = (message.where, message.op, message.argument, location)
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [source, 1]

    with warnings.catch_warnings():
        warnings.simplefilter("always", MutationWarning)
        # Called synchronously inside warnings.warn, so the writing frame is still on the stack.
        warnings.showwarning = record
        with watch_modules(lambda module: True, "warn"), guard(*inputs, mode="warn"):
            try:
                target(*inputs)
            except Exception as exc:
                raise AuditError(f"running the target raised {exc!r}") from exc
    return [
        Write(where, op, argument, location, source, count)
        for (where, op, argument, location), (source, count) in seen.items()
    ]


def _writing_line(location: Optional[str]) -> tuple[Optional[str], str]:
    """The line that wrote (immutorch's ``location``: the innermost frame outside torch and
    immutorch's machinery) and its source text."""
    if not location:
        return None, ""
    filename, _, lineno = location.rpartition(":")
    if not lineno.isdigit():
        return location, ""
    return location, linecache.getline(filename, int(lineno)).strip()
