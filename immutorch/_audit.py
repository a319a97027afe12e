"""``python -m immutorch audit``: run a model on random inputs and list every write into one.

The target's inputs are protected in warn mode, and so is every argument of every
``nn.Module`` call inside it (``watch_modules``), so a write into data handed from one
submodule to the next is found too. Warn mode lets each write go ahead, so the run completes
and every write is reported, not only the first.

A write can depend on settings (constructor arguments, train or eval) and on chance (the
inputs, the lengths, dropout): the target is built from JSON arguments, put in the mode asked
for, and run several times with fresh inputs; the writes of all runs are merged per place.
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from ._boundaries import watch_modules
from ._errors import MutationWarning
from ._guard import guard
from ._recorder import WriteEvent, listen
from ._rows import Write, count_writes, merge_runs

# Constructor arguments from --init: a JSON object (keywords) or a JSON list (positional).
InitArgs = Union[dict[str, Any], list[Any]]

# Relative lengths of the later runs are drawn from [MIN_LENGTH, 1.0]: SpeechBrain's range is
# (0, 1], but a length that rounds to zero frames makes an empty slice, and a crash there
# would be the audit's doing, not the target's.
MIN_LENGTH = 0.1


class AuditError(Exception):
    """The target could not be loaded, built or run; the message says why."""


@dataclass(frozen=True)
class Audit:
    """What was run, and the writes it found: the command's whole answer."""

    target: str
    init: Optional[InitArgs]
    training: Optional[bool]  # the module's mode during the runs; None: not a module
    training_from: Optional[str]  # "--train", "--eval", "as built"; None: not a module
    shapes: list[tuple[int, ...]]
    lengths: Optional[list[list[float]]]  # the relative lengths of each run, if passed
    runs: int
    seed: int
    writes: list[Write]

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form. Version 1 (immutorch 0.1) was the bare list now under
        ``"writes"``; version 2 puts what was run beside it."""
        return {
            "version": 2,
            "target": self.target,
            "init": self.init,
            "training": self.training,
            "training_from": self.training_from,
            "inputs": [list(shape) for shape in self.shapes],
            "lengths": self.lengths,
            "runs": self.runs,
            "seed": self.seed,
            "writes": [w.as_dict() for w in self.writes],
        }


def parse_init(text: str) -> InitArgs:
    """``--init``'s JSON: an object of keyword arguments or a list of positional ones."""
    example = """e.g. --init '{"norm_type": "sentence"}' or --init '[true, false]'"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AuditError(f"--init is not valid JSON ({exc}): {text!r}; {example}") from None
    if isinstance(value, (dict, list)):
        return value
    raise AuditError(
        f"--init takes a JSON object (keyword arguments) or list (positional arguments), "
        f"got {type(value).__name__} {text!r}; {example}"
    )


def load_target(spec: str, init: Optional[InitArgs] = None) -> Callable[..., Any]:
    """Resolve ``package.module:attr`` to the callable to audit.

    A module instance is audited as is; a class is instantiated with ``init`` (a dict of
    keyword or a list of positional arguments; none by default); a function with no required
    parameters is a factory and is called to get the module or function to audit; any other
    callable is audited itself. ``init`` is for classes only.
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
    if init is not None and not isinstance(obj, type):
        raise AuditError(
            f"--init builds a class, and {spec} is {_kind(obj)}; name the class itself "
            f"(package.module:ClassName), or give no --init"
        )
    if init is not None:
        return _construct(spec, obj, init)
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


def _construct(spec: str, cls: type, init: InitArgs) -> Callable[..., Any]:
    args, kwargs = (init, {}) if isinstance(init, list) else ([], init)
    call = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    try:
        built = cls(*args, **kwargs)
    except Exception as exc:
        accepts = _parameters(cls)
        raise AuditError(
            f"{spec}({call}) failed: {exc!r}{accepts}; fix the arguments given to --init"
        ) from exc
    if not callable(built):
        raise AuditError(f"{spec}({call}) built {type(built).__name__}, which is not callable")
    return built  # type: ignore[no-any-return]


def _parameters(cls: type) -> str:
    """``"; it accepts Name(a, b=1)"``: the names and defaults, without annotations (which
    are strings under postponed evaluation and only clutter the message)."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return ""
    shown = [p.replace(annotation=inspect.Parameter.empty) for p in params]
    return f"; it accepts {cls.__name__}({', '.join(map(str, shown))})"


def _kind(obj: Any) -> str:
    if isinstance(obj, torch.nn.Module):
        return f"a module instance ({type(obj).__name__})"
    if inspect.isroutine(obj):
        return "a function"
    return f"a {type(obj).__name__}"


def set_training(target: Callable[..., Any], train: Optional[bool]) -> Optional[bool]:
    """Put a module target in training (``True``) or eval (``False``) mode, or leave it as
    built (``None``); return the mode it runs in, or ``None`` when it is not a module."""
    if not isinstance(target, torch.nn.Module):
        if train is not None:
            flag = "--train" if train else "--eval"
            raise AuditError(
                f"{flag} sets an nn.Module's mode, and the target is {_kind(target)}; "
                f"leave out {flag}, or audit the module"
            )
        return None
    if train is not None:
        target.train(train)
    return target.training


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


def make_inputs(
    shapes: list[tuple[int, ...]], lengths: bool, seed: int = 0, vary_lengths: bool = False
) -> list[torch.Tensor]:
    """Random float32 inputs of ``shapes``, then (``lengths``) relative lengths, one per item
    of the first input's first dimension: all 1.0, or (``vary_lengths``) 1.0 for the first
    item, as SpeechBrain's longest item in a padded batch, and uniform in
    ``[MIN_LENGTH, 1.0]`` for the others."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=gen) for shape in shapes]
    if lengths:
        batch = shapes[0][0] if shapes and shapes[0] else 1
        rel = torch.ones(batch)
        if vary_lengths and batch > 1:
            rel[1:] = MIN_LENGTH + (1.0 - MIN_LENGTH) * torch.rand(batch - 1, generator=gen)
        inputs.append(rel)
    return inputs


def audit_runs(
    spec: str,
    shapes: list[tuple[int, ...]],
    lengths: bool = False,
    *,
    init: Optional[InitArgs] = None,
    train: Optional[bool] = None,
    runs: int = 1,
    seed: int = 0,
) -> Audit:
    """Build ``spec`` (with ``init``, in the mode ``train`` asks for), run it ``runs`` times
    and merge the writes per place.

    Run ``i`` draws its inputs from seed ``seed + i`` and seeds torch's global generator with
    it too (weights built at random, dropout), restored afterwards. With ``lengths``, the
    first run passes lengths of 1.0 and later runs random ones (:func:`make_inputs`). The
    same built target serves every run, so state a module keeps between calls carries over,
    as in real use.
    """
    if runs < 1:
        raise AuditError(f"--runs must be at least 1, got {runs}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = load_target(spec, init)
        training = set_training(target, train)
        per_run: list[list[Write]] = []
        used_lengths: list[list[float]] = []
        for i in range(runs):
            torch.manual_seed(seed + i)
            inputs = make_inputs(shapes, lengths, seed + i, vary_lengths=i > 0)
            if lengths:
                used_lengths.append(inputs[-1].tolist())
            try:
                per_run.append(audit(target, inputs))
            except AuditError as exc:
                if runs == 1:
                    raise
                raise AuditError(f"run {i + 1} of {runs} (seed {seed + i}): {exc}") from exc
    if training is None:
        training_from = None
    else:
        training_from = "as built" if train is None else ("--train" if train else "--eval")
    return Audit(
        target=spec,
        init=init,
        training=training,
        training_from=training_from,
        shapes=list(shapes),
        lengths=used_lengths if lengths else None,
        runs=runs,
        seed=seed,
        writes=merge_runs(per_run),
    )


def audit(target: Callable[..., Any], inputs: list[torch.Tensor]) -> list[Write]:
    """Call ``target(*inputs)`` once and return each write site into a protected tensor."""
    warned: list[WriteEvent] = []

    def hear(event: WriteEvent) -> None:
        # Only the audit's own warn-mode protection: a guard inside the target that refuses
        # or clones protects the target's memory, not its inputs.
        if event.action == "warned":
            warned.append(event)

    with warnings.catch_warnings():
        # Every write is heard by the recorder; the warnings themselves would only be noise.
        warnings.simplefilter("ignore", MutationWarning)
        with listen(hear), watch_modules(lambda module: True, "warn"):
            with guard(*inputs, mode="warn"):
                try:
                    target(*inputs)
                except Exception as exc:
                    raise AuditError(f"running the target raised {exc!r}") from exc
    return count_writes(warned)
