"""What immutorch costs: the guard's overhead on six CPU workloads, against its alternatives.

Run from the repository root::

    python benchmarks/run.py            # the full run: a few minutes on 2 cores
    python benchmarks/run.py --quick    # tiny sizes, 2 repetitions: a smoke test, no timings
    python benchmarks/run.py --out DIR  # where results.json and overhead.svg go

Everything runs in one process. Each repetition times every variant of a workload once, in a
shuffled order (round-robin), so slow drift of the machine (frequency, other tenants) lands on
all variants alike; the table shows the median over repetitions, after warmup, of the time per
call, and the median of the per-repetition ratios to the unguarded call.

How a sample is timed: ``torch.utils.benchmark.Timer(stmt="call()", globals={"call": call},
num_threads=torch.get_num_threads()).timeit(number)``, whose ``.median`` (here the one run's
time divided by ``number``) is the wall-clock time per call. ``timeit`` first runs
``max(number // 100, 2)`` warmup calls, and runs the timed calls with Python's garbage
collector off; on CUDA, torch's timer synchronizes before reading the clock. ``number`` is set
once per variant so that a sample lasts about ``--sample-ms``. ``x (CPU time)`` is this
process's CPU time (``time.process_time``) around the whole ``timeit``, divided by every call it
made, warmup included: it does not count time spent waiting for a core, so it is steadier on a
shared machine.

Variants, all running the same callee on the same inputs (each variant has its own copy). The
labels say which scope runs: ``scope='all'``, a ``TorchDispatchMode`` that sees every aten op
while the guard is active; scope ``arguments``, protected arguments handed to the callee as a
tensor subclass, so only the ops that take one reach Python (``immutorch/_scoped.py``):

- ``unguarded``: the plain call (1.00 by definition).
- ``empty_mode``: a ``TorchDispatchMode`` whose ``__torch_dispatch__`` only calls the op,
  entered around each call: the floor for anything built on a Python dispatch mode (scope all).
- ``raise``, ``warn``, ``clone``, ``off``: ``@immutorch.immutable_inputs(mode=...)`` on the
  callee, in its default scope, arguments.
- ``raise_all``, ``clone_all``: the same with ``scope="all"``.
- ``guard_block``: ``with immutorch.guard():`` around the call (mode raise, scope all).
- ``guard_clone``: ``with immutorch.guard(mode="clone"):`` (scope all).
- ``guard_clone_scoped``: ``with immutorch.guard(mode="clone", scope="arguments"):``: the block
  body stays under the every-op mode; inside each module call the protected arguments are
  handed over as scoped aliases and only their ops reach Python.
- ``clone_up_front``: what users do by hand, ``fn(*(x.clone() for x in inputs))``.
- ``SchemaCheckMode``: ``torch._subclasses.schema_check_mode.SchemaCheckMode``, PyTorch's own
  schema validator (clones every input of every op); very slow, so fewer repetitions.

Where a workload protects only some arguments (``unrelated_ops`` and ``reading_ops``: ``p``),
the decorator gets ``only=("p",)`` and the guards name it, ``guard(p, ...)``; elsewhere every
tensor argument is protected and the guards name nothing (everything that existed before the
block). Those two workloads call a module inside ``f(p, x, w)``, so that a guard in scope
arguments has a module call at which to hand ``p`` over.

Checks: for the callees that write into their input (the legacy normalizer), clone mode's
result is compared bit for bit with the unguarded call's on the same input, the caller's inputs
must be unchanged, and the copies counted (one copy of the written input expected); the lines
are printed under the table and kept in the JSON. Targets (``TARGETS``) are printed as met or
not, never asserted.

Memory: ``copied/call`` is what clone mode copied (``immutorch.clone_stats()``), or what the
up-front clones allocate; ``peak alloc`` is the high-water mark of torch CPU allocations made
during one call, from ``torch.profiler`` memory events (tracemalloc does not see them). The
process's peak RSS (``resource``) is in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Timer

import immutorch
from immutorch._reference import (
    LegacyInputNormalization,
    MelSpectrogramEncoder,
    synthetic_mel,
)
from immutorch.nn import InputNormalization

Call = Callable[[], object]

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results"


# -- variants --------------------------------------------------------------------------------


class EmptyMode(TorchDispatchMode):
    """The floor: a Python dispatch mode that does nothing but run the op."""

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:
        return func(*args, **(kwargs or {}))


class CountingMode(TorchDispatchMode):
    """Counts the aten ops a call dispatches (what the guard's per-op cost multiplies)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _schema_check_mode() -> Optional[type[TorchDispatchMode]]:
    try:
        from torch._subclasses.schema_check_mode import SchemaCheckMode
    except ImportError:  # pragma: no cover - present in every torch this supports
        return None
    return SchemaCheckMode  # type: ignore[no-any-return]


def _in_mode(mode_type: type[TorchDispatchMode], fn: Callable[..., object], inputs: Any) -> Call:
    def call() -> object:
        with mode_type():
            return fn(*inputs)

    return call


def _in_guard(
    fn: Callable[..., object], inputs: Any, protect: Optional[tuple[str, ...]], **kw: Any
) -> Call:
    """``with guard(**kw):`` around the call; with ``protect``, the guard names those leading
    inputs (``guard(p, ...)``), else none (everything that existed before the block)."""
    named = tuple(inputs[: len(protect)]) if protect else ()

    def call() -> object:
        with immutorch.guard(*named, **kw):
            return fn(*inputs)

    return call


def _decorated(
    mode: immutorch.Mode,
    fn: Callable[..., object],
    inputs: Any,
    protect: Optional[tuple[str, ...]] = None,
    scope: Optional[str] = None,
) -> Call:
    kw: dict[str, Any] = {} if scope is None else {"scope": scope}
    guarded = immutorch.immutable_inputs(mode=mode, only=protect, **kw)(fn)
    return lambda: guarded(*inputs)


def _cloned_up_front(fn: Callable[..., object], inputs: Any) -> Call:
    return lambda: fn(*(x.clone() for x in inputs))


# A factory builds a variant's call from the callee, its inputs (the variant's own copy) and
# the names of the protected leading parameters (None: every tensor argument).
VariantFactory = Callable[
    [Callable[..., object], tuple[Tensor, ...], Optional[tuple[str, ...]]], Call
]

# (key, label, factory); the first is the reference, the second the floor. In labels, {only}
# and {named} become the workload's protected parameters (", only=('p',)" and "p, "), and
# {what} says what a guard protects. Scope "arguments" is the decorator's default, "all" the
# guard's: every label says which one runs.
VARIANTS: list[tuple[str, str, VariantFactory]] = [
    ("unguarded", "unguarded", lambda fn, xs, _: lambda: fn(*xs)),
    (
        "empty_mode",
        "empty TorchDispatchMode (floor of scope all)",
        lambda fn, xs, _: _in_mode(EmptyMode, fn, xs),
    ),
    (
        "raise_all",
        "immutable_inputs(mode='raise'{only}, scope='all')",
        lambda fn, xs, p: _decorated("raise", fn, xs, p, "all"),
    ),
    (
        "raise",
        "immutable_inputs(mode='raise'{only}), scope arguments",
        lambda fn, xs, p: _decorated("raise", fn, xs, p),
    ),
    (
        "warn",
        "immutable_inputs(mode='warn'{only}), scope arguments",
        lambda fn, xs, p: _decorated("warn", fn, xs, p),
    ),
    (
        "clone_all",
        "immutable_inputs(mode='clone'{only}, scope='all')",
        lambda fn, xs, p: _decorated("clone", fn, xs, p, "all"),
    ),
    (
        "clone",
        "immutable_inputs(mode='clone'{only}), scope arguments",
        lambda fn, xs, p: _decorated("clone", fn, xs, p),
    ),
    (
        "off",
        "immutable_inputs(mode='off'{only})",
        lambda fn, xs, p: _decorated("off", fn, xs, p),
    ),
    (
        "guard_block",
        "with guard({named_only}): raise,{what} scope all",
        lambda fn, xs, p: _in_guard(fn, xs, p),
    ),
    (
        "guard_clone",
        "with guard({named}mode='clone'):{what} scope all",
        lambda fn, xs, p: _in_guard(fn, xs, p, mode="clone"),
    ),
    (
        "guard_clone_scoped",
        "with guard({named}mode='clone', scope='arguments'):{what_end}",
        lambda fn, xs, p: _in_guard(fn, xs, p, mode="clone", scope="arguments"),
    ),
    ("clone_up_front", "clone every input up front", lambda fn, xs, _: _cloned_up_front(fn, xs)),
]
SCHEMA_CHECK = "schema_check"


def _label(template: str, protect: Optional[tuple[str, ...]]) -> str:
    names = ", ".join(protect or ())
    return template.format(
        only=f", only={tuple(protect)!r}" if protect else "",
        named=f"{names}, " if protect else "",
        named_only=names,
        what="" if protect else " no tensors named,",
        what_end="" if protect else " no tensors named",
    )


# -- workloads -------------------------------------------------------------------------------


@dataclass
class Extra:
    """A variant particular to one workload (a callee that writes, say)."""

    key: str
    label: str
    fn: Callable[..., object]
    # "plain", "clone" (immutable_inputs(mode="clone"), scope arguments), "clone_all" (the
    # same, scope "all") or "clone_up_front"
    wrap: str


@dataclass
class Workload:
    key: str
    title: str
    shape: str
    fn: Callable[..., object]
    inputs: tuple[Tensor, ...]
    schema_check: bool = True  # SchemaCheckMode is run (with fewer repetitions) unless False
    note: str = ""
    # The leading parameters the guarded variants protect (``only=`` and ``guard(p, ...)``);
    # None: every tensor argument (and a guard that names nothing).
    protect: Optional[tuple[str, ...]] = None
    extras: list[Extra] = field(default_factory=list)


def small_ops(x: Tensor, w: Tensor, steps: int) -> Tensor:
    """``2 * steps`` small aten ops: ``mm`` then ``tanh``, over and over."""
    h = x
    for _ in range(steps):
        h = torch.tanh(h @ w)
    return h


class UnrelatedOps(nn.Module):
    """``2 * steps`` small ops (``mm``, ``tanh``) on ``x`` and ``w``; ``p`` is never touched."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, p: Tensor, x: Tensor, w: Tensor) -> Tensor:
        h = x
        for _ in range(self.steps):
            h = torch.tanh(h @ w)
        return h


class ReadingOps(nn.Module):
    """``steps`` small ops that all read ``p``: ``h = addmm(p, h, w)``."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, p: Tensor, h: Tensor, w: Tensor) -> Tensor:
        for _ in range(self.steps):
            h = torch.addmm(p, h, w)
        return h


def _calling_pxw(module: nn.Module) -> Callable[..., object]:
    """A plain function ``f(p, x, w)`` that calls ``module``: named parameters, so that
    ``only=("p",)`` protects ``p`` alone; and a module call inside, where
    ``guard(p, scope="arguments")`` hands ``p`` over as a scoped alias."""

    def call(p: Tensor, x: Tensor, w: Tensor) -> object:
        return module(p, x, w)

    call.__qualname__ = f"call_{type(module).__name__}"
    return call


def _calling(module: nn.Module) -> Callable[..., object]:
    """A plain function that calls ``module``: decorating the module itself would rewrite its
    ``forward`` for every variant at once."""

    def call(*args: Tensor) -> object:
        return module(*args)

    call.__qualname__ = f"call_{type(module).__name__}"
    return call


def make_workloads(quick: bool) -> list[Workload]:
    gen = torch.Generator().manual_seed(0)

    # 1. The reference case: the speaker encoder, fixed normalizer, through its public method.
    b, t = (2, 40) if quick else (8, 300)
    fixed_encoder = MelSpectrogramEncoder(InputNormalization(norm_type="sentence", std_norm=False))
    legacy_encoder = MelSpectrogramEncoder(
        LegacyInputNormalization(norm_type="sentence", std_norm=False)
    )
    encoder = Workload(
        key="encoder",
        title="ECAPA-style speaker encoder, encode_mel_spectrogram",
        shape=f"[{b}, 80, {t}]",
        fn=fixed_encoder.encode_mel_spectrogram,
        inputs=(synthetic_mel(b, 80, t),),
        extras=[
            Extra(
                "legacy_unguarded",
                "legacy normalizer, unguarded (writes into mel)",
                legacy_encoder.encode_mel_spectrogram,
                "plain",
            ),
            Extra(
                "legacy_clone_all",
                "legacy normalizer, immutable_inputs(mode='clone', scope='all')",
                legacy_encoder.encode_mel_spectrogram,
                "clone_all",
            ),
            Extra(
                "legacy_clone",
                "legacy normalizer, immutable_inputs(mode='clone'), scope arguments",
                legacy_encoder.encode_mel_spectrogram,
                "clone",
            ),
        ],
    )

    # 2. A transformer layer (eval, so PyTorch may take its fused fast path).
    b, s = (2, 16) if quick else (8, 128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, batch_first=True).eval()
    transformer = Workload(
        key="transformer",
        title="nn.TransformerEncoderLayer(d_model=256, nhead=4), eval",
        shape=f"[{b}, {s}, 256]",
        fn=_calling(layer),
        inputs=(torch.randn(b, s, 256, generator=gen),),
        note="In eval under no_grad PyTorch takes its fused fast path "
        "(`aten._transformer_encoder_layer_fwd`), guarded or not: one aten op per call, so "
        "any dispatch mode costs next to nothing here.",
    )

    # 3. The worst case: nothing but small ops, so the per-op cost is all there is.
    steps = 10 if quick else 500
    n = 16 if quick else 64
    ops = Workload(
        key="small_ops",
        title=f"{2 * steps} small ops (mm, tanh)",
        shape=f"[{n}, {n}]",
        fn=lambda x, w: small_ops(x, w, steps),
        inputs=(torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen) / n**0.5),
    )

    # 4. The normalizer alone: the fix against the bug, and clone mode catching the bug.
    b, t = (4, 50) if quick else (16, 300)
    fixed = InputNormalization(norm_type="sentence").eval()
    legacy_fn = _calling(LegacyInputNormalization(norm_type="sentence").eval())
    lengths = torch.linspace(0.6, 1.0, b)
    feats = synthetic_mel(b, 80, t).transpose(1, 2).contiguous()
    normalizer = Workload(
        key="normalizer",
        title="InputNormalization('sentence', lengths): fixed",
        shape=f"[{b}, {t}, 80]",
        fn=_calling(fixed),
        inputs=(feats, lengths),
        extras=[
            Extra("legacy_unguarded", "legacy, unguarded (writes into x)", legacy_fn, "plain"),
            Extra(
                "legacy_clone_all",
                "legacy, immutable_inputs(mode='clone', scope='all')",
                legacy_fn,
                "clone_all",
            ),
            Extra(
                "legacy_clone",
                "legacy, immutable_inputs(mode='clone'), scope arguments",
                legacy_fn,
                "clone",
            ),
            Extra(
                "legacy_clone_up_front",
                "legacy, clone every input up front",
                legacy_fn,
                "clone_up_front",
            ),
        ],
    )

    # 5. and 6. Small ops beside a protected argument: none of them touch it, or all read it.
    # p is the only protected parameter (only=("p",), guard(p, ...)); x and w are not.
    unrelated = Workload(
        key="unrelated_ops",
        title=f"{2 * steps} small ops (mm, tanh) that never touch the protected p",
        shape=f"[{n}, {n}]",
        fn=_calling_pxw(UnrelatedOps(steps)),
        inputs=(
            torch.randn(n, n, generator=gen),
            torch.randn(n, n, generator=gen),
            torch.randn(n, n, generator=gen) / n**0.5,
        ),
        protect=("p",),
        schema_check=False,
        note="`f(p, x, w)` calls a module whose ops use only x and w; p alone is protected.",
    )
    reading = Workload(
        key="reading_ops",
        title=f"{2 * steps} small ops (addmm) that all read the protected p",
        shape=f"[{n}, {n}]",
        fn=_calling_pxw(ReadingOps(2 * steps)),
        inputs=(
            torch.randn(n, n, generator=gen),
            torch.randn(n, n, generator=gen),
            torch.randn(n, n, generator=gen) * (0.5 / n**0.5),  # contracting: h stays finite
        ),
        protect=("p",),
        schema_check=False,
        note="`f(p, h, w)` calls a module that runs `h = torch.addmm(p, h, w)`; p alone is "
        "protected, so every op takes it.",
    )
    return [encoder, transformer, ops, normalizer, unrelated, reading]


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Measured:
    key: str
    label: str
    number: int = 1  # calls per sample
    times: list[float] = field(default_factory=list)  # seconds per call, one per repetition
    ratios: list[float] = field(default_factory=list)  # to unguarded, same repetition
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per call
    cpu_ratios: list[float] = field(default_factory=list)
    bytes_copied_per_call: Optional[int] = None
    peak_alloc_bytes: Optional[int] = None
    note: str = ""


def _copy_inputs(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(x.clone() for x in inputs)


def _build_calls(w: Workload, with_schema_check: bool) -> dict[str, tuple[str, Call]]:
    calls: dict[str, tuple[str, Call]] = {}
    for key, label, factory in VARIANTS:
        calls[key] = (_label(label, w.protect), factory(w.fn, _copy_inputs(w.inputs), w.protect))
    for extra in w.extras:
        xs = _copy_inputs(w.inputs)
        if extra.wrap in ("clone", "clone_all"):
            scope = "all" if extra.wrap == "clone_all" else None
            call = _decorated("clone", extra.fn, xs, w.protect, scope)
        elif extra.wrap == "clone_up_front":
            call = _cloned_up_front(extra.fn, xs)
        else:
            call = (lambda f, a: lambda: f(*a))(extra.fn, xs)
        calls[extra.key] = (extra.label, call)
    mode = _schema_check_mode()
    if with_schema_check and w.schema_check and mode is not None:
        calls[SCHEMA_CHECK] = ("SchemaCheckMode (torch)", _in_mode(mode, w.fn, w.inputs))
    return calls


def _timer(call: Call) -> Timer:
    """A ``torch.utils.benchmark.Timer`` for ``call()`` at the current torch thread count (the
    Timer's own default is one thread)."""
    return Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())


def _time(timer: Timer, number: int) -> tuple[float, float]:
    """Seconds per call: ``Timer.timeit(number)`` (wall clock: ``timeit`` with the garbage
    collector off, after its own warmup of ``max(number // 100, 2)`` calls), and this process's
    CPU time around it (which does not count the time the process waited for a core: steadier
    on a shared machine), divided by every call it covered, warmup included."""
    cpu = time.process_time()
    wall = timer.timeit(number).median
    cpu = time.process_time() - cpu
    return wall, cpu / (number + max(number // 100, 2))


def _count_ops(call: Call) -> int:
    counter = CountingMode()
    with counter:
        call()
    return counter.count


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto logs two lines per profiling session on file descriptor 2, whatever the log
    level; keep them out of the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_alloc(call: Call) -> Optional[int]:
    """High-water mark of torch CPU allocations made during one call, in bytes, at op
    granularity (a workspace an op frees before it returns is not seen)."""
    try:
        with _native_stderr_silenced():
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as prof:
                call()
    except Exception:  # the profiler is optional equipment here
        return None
    # Each allocation is charged to the innermost op that made it ("self" memory), or to a
    # "[memory]" event when no op was running (a tensor freed by Python, say).
    events = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def _bytes_copied(key: str, call: Call, inputs: tuple[Tensor, ...]) -> int:
    if key.endswith("clone_up_front"):
        return sum(x.untyped_storage().nbytes() for x in inputs)
    before = immutorch.clone_stats().bytes_copied
    call()
    return immutorch.clone_stats().bytes_copied - before


def check_clone_extras(w: Workload) -> list[dict[str, Any]]:
    """Clone mode on the callees that write: the result must be bit-identical to the unguarded
    call's on the same input, the caller's inputs unchanged, and one copy made of the written
    input (the first) and nothing else."""
    out = []
    for extra in w.extras:
        if extra.wrap not in ("clone", "clone_all"):
            continue
        scope = "all" if extra.wrap == "clone_all" else None
        xs = _copy_inputs(w.inputs)
        pristine = _copy_inputs(w.inputs)
        with torch.no_grad():
            expected = extra.fn(*_copy_inputs(w.inputs))
            call = _decorated("clone", extra.fn, xs, w.protect, scope)
            before = immutorch.clone_stats()
            got = call()
            after = immutorch.clone_stats()
        one_copy = w.inputs[0].untyped_storage().nbytes()
        check = {
            "variant": extra.key,
            "bit_identical": isinstance(got, Tensor) and torch.equal(got, expected),
            "inputs_unchanged": all(torch.equal(a, b) for a, b in zip(xs, pristine)),
            "copies": after.copies - before.copies,
            "bytes_copied": after.bytes_copied - before.bytes_copied,
            "one_copy_bytes": one_copy,
        }
        check["ok"] = (
            check["bit_identical"]
            and check["inputs_unchanged"]
            and check["copies"] == 1
            and check["bytes_copied"] == one_copy
        )
        out.append(check)
    return out


def check_line(c: dict[str, Any]) -> str:
    return (
        f"Check {c['variant']}: output bit-identical to unguarded: "
        f"{'yes' if c['bit_identical'] else 'NO'}; caller's inputs unchanged: "
        f"{'yes' if c['inputs_unchanged'] else 'NO'}; {c['copies']} cop"
        f"{'y' if c['copies'] == 1 else 'ies'}, {c['bytes_copied']} B (one copy of the written "
        f"input is {c['one_copy_bytes']} B): {'ok' if c['ok'] else 'NOT OK'}."
    )


def measure(
    w: Workload,
    *,
    reps: int,
    schema_check_reps: int,
    warmup: int,
    sample_s: float,
    rng: random.Random,
    quick: bool,
) -> tuple[int, list[Measured]]:
    calls = _build_calls(w, with_schema_check=schema_check_reps > 0)
    results = {key: Measured(key, label) for key, (label, _) in calls.items()}
    timers = {key: _timer(call) for key, (_, call) in calls.items()}
    with torch.no_grad():
        ops = _count_ops(calls["unguarded"][1])
        for key, (_, call) in calls.items():
            m = results[key]
            for _ in range(1 if key == SCHEMA_CHECK else warmup):
                call()
            if key != SCHEMA_CHECK:
                m.bytes_copied_per_call = _bytes_copied(key, call, w.inputs)
                m.peak_alloc_bytes = _peak_alloc(call)
            if not quick:  # enough calls per sample to last about sample_s
                once = min(_time(timers[key], 1)[0] for _ in range(2))
                m.number = max(1, round(sample_s / max(once, 1e-9)))
        for rep in range(reps):
            order = [k for k in calls if k != SCHEMA_CHECK or rep < schema_check_reps]
            rng.shuffle(order)
            gc.collect()
            sample = {k: _time(timers[k], results[k].number) for k in order}
            wall_ref, cpu_ref = sample["unguarded"]
            for k, (wall, cpu) in sample.items():
                results[k].times.append(wall)
                results[k].ratios.append(wall / wall_ref)
                results[k].cpu_times.append(cpu)
                results[k].cpu_ratios.append(cpu / cpu_ref if cpu_ref > 0 else math.nan)
    if SCHEMA_CHECK in results:
        results[SCHEMA_CHECK].note = f"{min(reps, schema_check_reps)} reps"
    return ops, list(results.values())


# -- reporting -------------------------------------------------------------------------------


def _quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def summarize(ops: int, measured: list[Measured]) -> list[dict[str, Any]]:
    by_key = {m.key: m for m in measured}
    t_ref = statistics.median(by_key["unguarded"].times)
    t_floor = statistics.median(by_key["empty_mode"].times)
    rows = []
    for m in measured:
        q1, med, q3 = _quantiles(m.times)
        r1, rmed, r3 = _quantiles(m.ratios)
        c1, cmed, c3 = _quantiles(m.cpu_ratios)
        rows.append(
            {
                "key": m.key,
                "label": m.label,
                "reps": len(m.times),
                "calls_per_sample": m.number,
                "median_s": med,
                "q1_s": q1,
                "q3_s": q3,
                "ratio": rmed,
                "ratio_q1": r1,
                "ratio_q3": r3,
                "cpu_median_s": statistics.median(m.cpu_times),
                "cpu_ratio": cmed,
                "cpu_ratio_q1": c1,
                "cpu_ratio_q3": c3,
                "us_per_op_over_unguarded": (med - t_ref) / ops * 1e6 if ops else None,
                "us_per_op_over_floor": (med - t_floor) / ops * 1e6 if ops else None,
                "bytes_copied_per_call": m.bytes_copied_per_call,
                "peak_alloc_bytes": m.peak_alloc_bytes,
                "note": m.note,
            }
        )
    return rows


def markdown_table(block: dict[str, Any], quick: bool) -> str:
    head = (
        f"**{block['title']}** {block['shape']}, {block['threads']} thread"
        f"{'s' if block['threads'] != 1 else ''}, {block['ops_per_call']} aten ops/call"
    )
    lines = [
        head,
        "",
        "| variant | median ms | x unguarded [IQR] | x (CPU time) | µs/op over unguarded "
        "| µs/op over floor | copied/call | peak alloc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in block["variants"]:
        label = r["label"] + (f" ({r['note']})" if r["note"] else "")
        ratio = f"{r['ratio']:.3f} [{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}]"
        cpu = f"{r['cpu_ratio']:.3f}"
        if r["key"] == "unguarded":
            ratio = cpu = "1.000"
        lines.append(
            f"| {label} | {r['median_s'] * 1e3:.2f} | {ratio} | {cpu} "
            f"| {r['us_per_op_over_unguarded']:+.2f} | {r['us_per_op_over_floor']:+.2f} "
            f"| {_human_bytes(r['bytes_copied_per_call'])} "
            f"| {_human_bytes(r['peak_alloc_bytes'])} |"
        )
    for note in block["notes"]:
        lines.append(f"\n{note}")
    if quick:
        lines.append("\n(--quick: tiny sizes and 2 repetitions; these times mean nothing.)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """A target, reported as met or not (never asserted). ``value`` is ``what`` of ``variant``'s
    row; it must be ≤ ``limit``, or ≤ the same quantity of the ``versus`` variant measured in
    the same run, or == the block's field ``equal_to``."""

    text: str
    workload: str
    variant: str
    what: str  # a row field: "ratio", "us_per_op_over_floor", "bytes_copied_per_call"
    limit: float = math.nan
    versus: Optional[str] = None
    equal_to: Optional[str] = None


# Issue 11's targets (scope "arguments", the decorator's default), and the earlier ones.
TARGETS: list[Target] = [
    Target("encoder: raise ≤ 1.03x unguarded", "encoder", "raise", "ratio", 1.03),
    Target("encoder: clone ≤ 1.03x unguarded", "encoder", "clone", "ratio", 1.03),
    Target(
        "encoder: guard(mode='clone', scope='arguments') ≤ 1.03x unguarded",
        "encoder",
        "guard_clone_scoped",
        "ratio",
        1.03,
    ),
    Target("encoder: off ≤ 1.005x unguarded", "encoder", "off", "ratio", 1.005),
    Target("unrelated ops: raise ≤ 1.01x unguarded", "unrelated_ops", "raise", "ratio", 1.01),
    Target(
        "reading ops: raise ≤ raise with scope='all'",
        "reading_ops",
        "raise",
        "ratio",
        versus="raise_all",
    ),
    Target(
        "small ops: raise within 1 µs/op of floor",
        "small_ops",
        "raise",
        "us_per_op_over_floor",
        1.0,
    ),
    Target("encoder: clone copies 0 B (read-only)", "encoder", "clone", "bytes_copied_per_call", 0),
    Target(
        "normalizer: clone copies 0 B (fixed)",
        "normalizer",
        "clone",
        "bytes_copied_per_call",
        0,
    ),
    Target(
        "encoder: legacy clone copies one mel",
        "encoder",
        "legacy_clone",
        "bytes_copied_per_call",
        equal_to="input_bytes",
    ),
]


def check_targets(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for block in blocks:
        rows = {r["key"]: r for r in block["variants"]}
        for t in TARGETS:
            if block["key"] != t.workload or t.variant not in rows:
                continue
            value = rows[t.variant][t.what]
            if t.equal_to is not None:
                limit, relation = block[t.equal_to], "=="
            elif t.versus is not None:
                if t.versus not in rows:
                    continue
                limit, relation = rows[t.versus][t.what], "<="
            else:
                limit, relation = t.limit, "<="
            met = value is not None and (value == limit if relation == "==" else value <= limit)
            out.append(
                {
                    "target": t.text,
                    "threads": block["threads"],
                    "what": t.what,
                    "measured": value,
                    "relation": relation,
                    "limit": limit,
                    "versus": t.versus,
                    "met": met,
                }
            )
    return out


def _shown(what: str, v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    if what == "bytes_copied_per_call":
        return f"{v:.0f} B"
    if what.startswith("us_per_op"):
        return f"{v:+.2f} µs/op"
    return f"{v:.3f}x"


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | threads | measured | limit | met |", "|---|---:|---:|---:|:---:|"]
    for t in targets:
        limit = ("= " if t["relation"] == "==" else "≤ ") + _shown(t["what"], t["limit"])
        if t["versus"]:
            limit += f" ({t['versus']})"
        lines.append(
            f"| {t['target']} | {t['threads']} | {_shown(t['what'], t['measured'])} | {limit} "
            f"| {'yes' if t['met'] else 'NO'} |"
        )
    return "\n".join(lines)


# -- the plot: a hand-written SVG, so the benchmark needs nothing beyond torch ---------------


def write_svg(blocks: list[dict[str, Any]], path: Path) -> None:
    """One panel per workload, one pair of bars (1 thread, default threads) per variant.

    The x axis is logarithmic: the ratios run from 1.00 to tens.
    """
    workloads: dict[str, list[dict[str, Any]]] = {}
    for block in blocks:
        workloads.setdefault(block["key"], []).append(block)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    label_w, plot_w, bar_h, gap = 420, 430, 9, 6
    all_ratios = [r["ratio"] for b in blocks for r in b["variants"]]
    hi = max(2.0, max(all_ratios) * 1.3)
    lo = min(0.8, min(all_ratios) * 0.9)

    def x_of(ratio: float) -> float:
        ratio = min(max(ratio, lo), hi)
        return label_w + plot_w * (math.log(ratio) - math.log(lo)) / (math.log(hi) - math.log(lo))

    parts: list[str] = []
    y = 30
    ticks = [t for t in (0.8, 1, 1.05, 1.5, 2, 5, 10, 20, 50, 100) if lo <= t <= hi]
    for group in workloads.values():
        first = group[0]
        parts.append(
            f'<text x="10" y="{y}" font-weight="bold">{_esc(first["title"])} '
            f"{_esc(first['shape'])}</text>"
        )
        y += 10
        top = y
        variants = [r["key"] for r in first["variants"]]
        for vkey in variants:
            label = next(r["label"] for r in first["variants"] if r["key"] == vkey)
            parts.append(
                f'<text x="{label_w - 6}" y="{y + bar_h * len(group) / 2 + 4}" '
                f'text-anchor="end" font-size="11">{_esc(label)}</text>'
            )
            for i, block in enumerate(group):
                row = next(r for r in block["variants"] if r["key"] == vkey)
                x0, x1 = x_of(lo), x_of(row["ratio"])
                parts.append(
                    f'<rect x="{x0:.1f}" y="{y}" width="{x1 - x0:.1f}" height="{bar_h - 1}" '
                    f'fill="{colors[i % len(colors)]}"/>'
                )
                parts.append(
                    f'<text x="{x1 + 3:.1f}" y="{y + bar_h - 1}" font-size="9">'
                    f"{row['ratio']:.3f}x</text>"
                )
                y += bar_h
            y += gap
        for t in ticks:
            x = x_of(t)
            dash = "" if t == 1 else ' stroke-dasharray="2,3"'
            parts.append(
                f'<line x1="{x:.1f}" y1="{top - 2}" x2="{x:.1f}" y2="{y}" stroke="#888"{dash}/>'
            )
            parts.append(
                f'<text x="{x:.1f}" y="{y + 11}" font-size="9" text-anchor="middle">{t}x</text>'
            )
        y += 36
    legend_y = y - 10
    for i, block in enumerate(next(iter(workloads.values()))):
        n = block["threads"]
        parts.append(
            f'<rect x="{label_w + i * 120}" y="{legend_y - 9}" width="10" height="10" '
            f'fill="{colors[i % len(colors)]}"/>'
            f'<text x="{label_w + i * 120 + 14}" y="{legend_y}" font-size="11">'
            f"{n} thread{'s' if n != 1 else ''}</text>"
        )
    width, height = label_w + plot_w + 60, legend_y + 14
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">\n'
        f'<rect width="100%" height="100%" fill="white"/>\n'
        f'<text x="10" y="14" font-size="11">time per call ÷ unguarded (log scale, '
        f"median of paired repetitions)</text>\n" + "\n".join(parts) + "\n</svg>\n"
    )
    path.write_text(svg, encoding="utf-8")


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 reps: a smoke test")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 15; quick 2)")
    p.add_argument("--schema-check-reps", type=int, default=None, help="default 3; 0 skips it")
    p.add_argument("--sample-ms", type=float, default=50.0, help="target length of one sample")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="workloads to run (encoder, transformer, small_ops, normalizer, unrelated_ops, "
        "reading_ops)",
    )
    p.add_argument(
        "--threads",
        type=int,
        nargs="*",
        default=None,
        help="torch thread counts to run at (default: 1 and torch's default; quick: 1)",
    )
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if os.environ.pop("IMMUTORCH_MODE", None) is not None:
        print("note: IMMUTORCH_MODE was set; ignored for this run", file=sys.stderr)
    quick: bool = args.quick
    reps: int = args.reps if args.reps is not None else (2 if quick else 15)
    schema_reps: int = (
        args.schema_check_reps if args.schema_check_reps is not None else (1 if quick else 3)
    )
    default_threads = torch.get_num_threads()
    thread_counts: list[int] = args.threads or ([1] if quick else sorted({1, default_threads}))
    rng = random.Random(0)
    started = time.perf_counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_before = os.getloadavg()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch default threads {default_threads}, load average "
        f"{load_before[0]:.2f} (other processes compete for the cores: see the IQRs)\n",
        flush=True,
    )

    blocks: list[dict[str, Any]] = []
    workloads = make_workloads(quick)
    if args.only:
        workloads = [w for w in workloads if w.key in args.only]
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for w in workloads:
            ops, measured = measure(
                w,
                reps=reps,
                schema_check_reps=schema_reps,
                warmup=1 if quick else 3,
                sample_s=args.sample_ms / 1e3,
                rng=rng,
                quick=quick,
            )
            notes = [w.note] if w.note else []
            if schema_reps and w.schema_check:
                notes.append(
                    f"SchemaCheckMode ran {min(reps, schema_reps)} of {reps} repetitions: it "
                    "clones every input of every op."
                )
            checks = check_clone_extras(w)
            notes.extend(check_line(c) for c in checks)
            block = {
                "key": w.key,
                "title": w.title,
                "shape": w.shape,
                "threads": threads,
                "ops_per_call": ops,
                "input_bytes": w.inputs[0].untyped_storage().nbytes(),
                "variants": summarize(ops, measured),
                "notes": notes,
                "checks": checks,
            }
            blocks.append(block)
            print(markdown_table(block, quick), end="\n\n", flush=True)
    torch.set_num_threads(default_threads)

    targets = check_targets(blocks)
    print("**Targets**\n")
    print(targets_table(targets))
    elapsed = time.perf_counter() - started
    print(f"\n({elapsed:.0f} s in all; load average now {os.getloadavg()[0]:.2f})")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": quick,
        "reps": reps,
        "schema_check_reps": schema_reps,
        "sample_ms": args.sample_ms,
        "torch": torch.__version__,
        "immutorch": immutorch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "default_threads": default_threads,
        "seconds": elapsed,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "peak_rss_kib_before": rss_before,
        "peak_rss_kib_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    doc = {"meta": meta, "workloads": blocks, "targets": targets}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    write_svg(blocks, out / "overhead.svg")
    print(f"wrote {out / 'results.json'} and {out / 'overhead.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
