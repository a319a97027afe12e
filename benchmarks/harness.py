"""How it is timed: ``torch.utils.benchmark.Timer``, a shuffled round-robin, one backend at a time.

Everything runs in one process. For one workload at one thread count, every variant
(``variants.py``), every extra row of the workload, and ``SchemaCheckMode`` become a
:class:`Case`; a guarded variant becomes one case per immutorch backend, run with
``IMMUTORCH_BACKEND`` set to it (:func:`backend_selected`) while it is built and around each
whole sample, so that no timed call pays for the switch. A backend this installation lacks
(:func:`backend_unavailable`) has no cases; the report shows it as n/a.

Each case first runs ``warmup`` times, is counted (what clone mode copied, the peak of torch
CPU allocations during one call), and is calibrated: ``Timer.blocked_autorange(min_run_time=
sample_s)`` estimates the time per call, and ``number`` is set so that one sample lasts about
``sample_s``. Then each repetition times every case once, in a shuffled order, so slow drift of
the machine (frequency, other tenants) lands on all cases alike; the ratio of a case to the
unguarded call is taken within each repetition.

A sample is ``Timer(stmt="call()", globals={"call": call}, num_threads=...).timeit(number)``:
its ``.median`` (one run, divided by ``number``) is the wall-clock time per call. ``timeit``
first runs ``max(number // 100, 2)`` warmup calls, and runs the timed calls with Python's garbage
collector off; on CUDA, torch's timer synchronizes before reading the clock. Beside it, this
process's CPU time (``time.process_time``) around the whole ``timeit``, divided by every call it
made, warmup included: it does not count time spent waiting for a core, so it is steadier on a
shared machine. The ``Measurement`` of every sample is kept, for ``torch.utils.benchmark.Compare``.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Measurement, Timer

import immutorch

from .variants import BY_KEY, SCHEMA_CHECK, VARIANTS, Call, in_mode, schema_check_mode
from .workloads import Workload

# -- backends --------------------------------------------------------------------------------

BACKEND_ENV = "IMMUTORCH_BACKEND"  # read by immutorch at each guard entry
BACKENDS = ("python", "native")


def backend_unavailable(name: str) -> Optional[str]:
    """Why immutorch's backend ``name`` cannot run in this process, or None when it can.

    The Python backend always can. Another is available when its module
    ``immutorch._backends.<name>`` exists, imports, and its ``available()`` (a bool), or failing
    that its ``status()`` (an object whose ``available`` is a bool and whose ``reason`` or
    ``str()`` says why not), says yes; a module with neither probe is taken at its word.
    """
    if name == "python":
        return None
    module_name = f"immutorch._backends.{name}"
    try:
        if importlib.util.find_spec(module_name) is None:
            return f"no module {module_name}"
        module = importlib.import_module(module_name)
        if callable(getattr(module, "available", None)):
            return None if module.available() else f"{module_name}.available() is false"
        if callable(getattr(module, "status", None)):
            status = module.status()
            if getattr(status, "available", False):
                return None
            return str(getattr(status, "reason", status))
    except Exception as exc:  # a backend that fails to load is one that cannot run
        return f"{module_name}: {type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def backend_selected(name: Optional[str]) -> Iterator[None]:
    """``IMMUTORCH_BACKEND=name`` while the block runs (None: left as it is)."""
    if name is None:
        yield
        return
    saved = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if saved is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = saved


# -- cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    """One row of a workload's table: a call, the backend it runs on (None: it does not depend
    on one), and what was measured of it."""

    key: str
    label: str
    backend: Optional[str]
    call: Call = field(repr=False)
    timer: Timer = field(repr=False)
    number: int = 1  # calls per sample
    times: list[float] = field(default_factory=list)  # seconds per call, one per repetition
    ratios: list[float] = field(default_factory=list)  # to unguarded, same repetition
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per call
    cpu_ratios: list[float] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list, repr=False)
    bytes_copied_per_call: Optional[int] = None
    peak_alloc_bytes: Optional[int] = None
    note: str = ""


@dataclass
class Result:
    """A workload measured at one thread count."""

    workload: Workload
    threads: int
    ops_per_call: int
    cases: list[Case]
    # Backend -> why it did not run; its guarded rows are n/a.
    unavailable: dict[str, str]
    checks: list[dict[str, Any]]
    schema_check_reps: int


def _copy_inputs(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(x.clone() for x in inputs)


def _backends_of(guarded: bool, backends: Sequence[str]) -> Sequence[Optional[str]]:
    return backends if guarded else (None,)


def _case(w: Workload, key: str, label: str, backend: Optional[str], call: Call) -> Case:
    timer = Timer(
        stmt="call()",
        globals={"call": call},
        label=f"{w.title} {w.shape}",
        sub_label=label,
        description=backend or "-",
        num_threads=torch.get_num_threads(),  # the Timer's own default is one thread
    )
    return Case(key, label, backend, call, timer)


def build_cases(w: Workload, backends: Sequence[str], with_schema_check: bool) -> list[Case]:
    """Every row of ``w``'s table, the guarded ones once per backend in ``backends``."""
    rows = [(v.key, v.label_for(w.protect), v, w.fn) for v in VARIANTS]
    rows += [(e.key, e.label, BY_KEY[e.wraps], e.fn) for e in w.extras]
    cases = []
    for key, label, v, fn in rows:
        for backend in _backends_of(v.guarded, backends):
            with backend_selected(backend):  # in case a front door reads it when it is made
                call = v.build(fn, _copy_inputs(w.inputs), w.protect)
            cases.append(_case(w, key, label, backend, call))
    mode = schema_check_mode()
    if with_schema_check and w.schema_check and mode is not None:
        call = in_mode(mode, w.fn, _copy_inputs(w.inputs))
        cases.append(_case(w, SCHEMA_CHECK, "SchemaCheckMode (torch)", None, call))
    return cases


# -- counting --------------------------------------------------------------------------------


class CountingMode(TorchDispatchMode):
    """Counts the aten ops a call dispatches (what a guard's per-op cost multiplies)."""

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


def count_ops(call: Call) -> int:
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


def peak_alloc(call: Call) -> Optional[int]:
    """High-water mark of torch CPU allocations made during one call, in bytes, at op
    granularity (a workspace an op frees before it returns is not seen). tracemalloc does not
    see torch's allocations; the profiler's memory events do."""
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


def bytes_copied(case: Case, inputs: tuple[Tensor, ...]) -> int:
    """What one call copies: clone mode's count (``immutorch.clone_stats()``), or what cloning
    by hand allocates."""
    if case.key.endswith("clone_up_front"):
        return sum(x.untyped_storage().nbytes() for x in inputs)
    before = immutorch.clone_stats().bytes_copied
    case.call()
    return immutorch.clone_stats().bytes_copied - before


def check_clone_extras(w: Workload, backends: Sequence[str]) -> list[dict[str, Any]]:
    """Clone mode on the callees that write, on each backend: the result must be bit-identical
    to the unguarded call's on the same input, the caller's inputs unchanged, and one copy made
    of the written input (the first) and nothing else."""
    out = []
    for extra in w.extras:
        if extra.wraps not in ("clone", "clone_all"):
            continue
        for backend in backends:
            xs = _copy_inputs(w.inputs)
            pristine = _copy_inputs(w.inputs)
            with torch.set_grad_enabled(w.grad), backend_selected(backend):
                expected = extra.fn(*_copy_inputs(w.inputs))
                call = BY_KEY[extra.wraps].build(extra.fn, xs, w.protect)
                before = immutorch.clone_stats()
                got = call()
                after = immutorch.clone_stats()
            one_copy = w.inputs[0].untyped_storage().nbytes()
            check = {
                "variant": extra.key,
                "backend": backend,
                "bit_identical": isinstance(got, Tensor)
                and isinstance(expected, Tensor)
                and torch.equal(got, expected),
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


# -- timing ----------------------------------------------------------------------------------


def _sample(case: Case) -> tuple[float, float]:
    """One sample of ``case``: seconds per call, wall clock and process CPU time."""
    with backend_selected(case.backend):
        cpu = time.process_time()
        m = case.timer.timeit(case.number)
        cpu = time.process_time() - cpu
    case.measurements.append(m)
    return m.median, cpu / (case.number + max(case.number // 100, 2))


def _calibrate(case: Case, sample_s: float) -> int:
    """Calls per sample so that one sample lasts about ``sample_s``."""
    with backend_selected(case.backend):
        per_call = case.timer.blocked_autorange(min_run_time=sample_s).median
    return max(1, round(sample_s / max(per_call, 1e-9)))


def measure(
    w: Workload,
    *,
    backends: Sequence[str],
    reps: int,
    schema_check_reps: int,
    warmup: int,
    sample_s: float,
    rng: random.Random,
    calibrate: bool,
) -> Result:
    """Measure every row of ``w`` at the current torch thread count; ``backends`` are the
    backends asked for, of which those available run."""
    unavailable = {b: why for b in backends if (why := backend_unavailable(b)) is not None}
    running = [b for b in backends if b not in unavailable]
    cases = build_cases(w, running, with_schema_check=schema_check_reps > 0)
    reference = next(c for c in cases if c.key == "unguarded")
    with torch.set_grad_enabled(w.grad):
        ops = count_ops(reference.call)
        for case in cases:
            with backend_selected(case.backend):
                for _ in range(1 if case.key == SCHEMA_CHECK else warmup):
                    case.call()
                if case.key != SCHEMA_CHECK:
                    case.bytes_copied_per_call = bytes_copied(case, w.inputs)
                    case.peak_alloc_bytes = peak_alloc(case.call)
            if calibrate:
                case.number = _calibrate(case, sample_s)
        for rep in range(reps):
            order = [c for c in cases if c.key != SCHEMA_CHECK or rep < schema_check_reps]
            rng.shuffle(order)
            gc.collect()
            sample = {id(c): _sample(c) for c in order}
            wall_ref, cpu_ref = sample[id(reference)]
            for c in order:
                wall, cpu = sample[id(c)]
                c.times.append(wall)
                c.ratios.append(wall / wall_ref)
                c.cpu_times.append(cpu)
                c.cpu_ratios.append(cpu / cpu_ref if cpu_ref > 0 else math.nan)
    ran_schema_check = min(reps, schema_check_reps)
    for c in cases:
        if c.key == SCHEMA_CHECK:
            c.note = f"{ran_schema_check} reps"
    return Result(
        workload=w,
        threads=torch.get_num_threads(),
        ops_per_call=ops,
        cases=cases,
        unavailable=unavailable,
        checks=check_clone_extras(w, running),
        schema_check_reps=ran_schema_check,
    )
