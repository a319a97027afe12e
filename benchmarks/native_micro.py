"""The native every-op backend beside the Python one, side by side in one run.

    python benchmarks/native_micro.py [--quick] [--build-time] [--workload NAME ...] [--native-only]
    python benchmarks/native_micro.py --paired [--steady-malloc] [--pairs N] [--workload NAME ...]

Workloads: 1000 small ops ``h = tanh(h @ W)`` (64x64), 200 calls of a module doing one tiny
op (the cost per ``Module.__call__``), a TransformerEncoder 6 x d128 forward
and forward + backward, and the demo encoder ``[8, 80, 300]``
(``MelSpectrogramEncoder.encode_mel_spectrogram``). Each runs unguarded and under
``guard(x)`` and ``guard()`` (scope "all") in raise and clone mode with ``IMMUTORCH_BACKEND``
python, then native.
Timing: ``torch.utils.benchmark.Timer`` (CPU time of the thread) on one thread; per backend,
each round times the unguarded call and every variant once (a sample of ~20 ms), in a new
random order, and the median over 60 rounds is reported as a ratio to that set's unguarded
call. ``--build-time`` also builds the native library from scratch into a temporary cache and
reports the build time and size; the cached load's cost is always reported.

``--paired`` measures the native rows another way, for ratios close to 1 on a noisy machine:
each variant is timed in pairs of calls beside the unguarded one, in the order unguarded,
variant, variant, unguarded (so a drift of the machine that is linear over the four calls
cancels), and the ratio is taken within the pair. The table gives the median of the pairs'
ratios with a 95% bootstrap interval, and control rows: the unguarded call again (the null,
which must read 1.00), the unguarded call after a guard was entered and left in each mode, and
after as long a stretch of other Python, in one small loop and in many of the standard
library's functions. The last reads what any code between two calls costs the next one
(caches and branch predictors trained on the call alone, retrained), which an unguarded call
timed in a tight loop never pays: compare the rows after a guard with it, not with 1.00.
Python's collector is off while pairs run and collects between them. ``--steady-malloc``
re-runs the process with glibc's malloc thresholds fixed (``MALLOC_MMAP_THRESHOLD_`` and
friends): by default glibc adapts them as the process runs, and a call then takes thousands
of page faults or none depending on what ran before it (3,500 a call on the encoder), which is
more than the guard costs.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import difflib
import fractions
import gc
import json
import os
import random
import re
import statistics
import string
import subprocess
import sys
import tempfile
import textwrap
import time
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.benchmark import Timer

import immutorch
from immutorch._reference import fixed_encoder, synthetic_mel


def small_ops() -> tuple[Callable[[torch.Tensor], Any], torch.Tensor]:
    w = torch.randn(64, 64) / 8

    def run(h: torch.Tensor) -> torch.Tensor:
        for _ in range(1000):
            h = torch.tanh(h @ w)
        return h

    return run, torch.randn(64, 64)


class _AddOne(nn.Module):
    def forward(self, x: torch.Tensor, scale: Any = None) -> torch.Tensor:
        return x + 1


def module_calls() -> tuple[Callable[[torch.Tensor], Any], torch.Tensor]:
    """What a guard costs per ``Module.__call__``: 200 calls of a module doing one tiny op."""
    mods = nn.ModuleList(_AddOne() for _ in range(200))

    def run(h: torch.Tensor) -> torch.Tensor:
        for m in mods:
            h = m(h, scale=None)
        return h

    return run, torch.randn(4)


def transformer(backward: bool) -> tuple[Callable[[torch.Tensor], Any], torch.Tensor]:
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
    params = list(model.parameters())

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def step(x: torch.Tensor) -> None:
        for p in params:
            p.grad = None
        model(x).sum().backward()

    return (step if backward else forward), torch.randn(8, 32, 128)


def encoder() -> tuple[Callable[[torch.Tensor], Any], torch.Tensor]:
    model = fixed_encoder()
    return model.encode_mel_spectrogram, synthetic_mel()


WORKLOADS = {
    "1000 small ops": small_ops,
    "200 module calls": module_calls,
    "TransformerEncoder fwd": lambda: transformer(False),
    "TransformerEncoder fwd+bwd": lambda: transformer(True),
    "encoder [8,80,300]": encoder,
}


def variants(fn: Callable[[torch.Tensor], Any]) -> dict[str, Callable[[torch.Tensor], Any]]:
    def guarded(mode: str, named: bool) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            with immutorch.guard(*((x,) if named else ()), mode=mode, scope="all"):  # type: ignore[arg-type]
                return fn(x)

        return run

    out: dict[str, Callable[[torch.Tensor], Any]] = {"unguarded": fn}
    for mode in ("raise", "clone"):
        out[f"guard(x) {mode}"] = guarded(mode, True)
        out[f"guard() {mode}"] = guarded(mode, False)
    out["immutable_inputs raise"] = immutorch.immutable_inputs(mode="raise", scope="all")(fn)
    return out


def floor_variants(fn: Callable[[torch.Tensor], Any]) -> dict[str, Callable[[torch.Tensor], Any]]:
    """``fn`` unguarded while module calls are intercepted and nothing more: under an empty
    shell in ``Module._call_impl``'s place (the floor under clone mode's boundaries), and with
    an empty global pre-hook (torch's slow path, what immutorch's global module hooks cost
    before the shell replaced them)."""
    from torch.nn.modules import module as module_mod

    def shelled(x: torch.Tensor) -> Any:
        own = torch.nn.Module.__dict__["_call_impl"]

        def shell(self: Any, *args: Any, **kwargs: Any) -> Any:
            return own(self, *args, **kwargs)

        torch.nn.Module._call_impl = shell  # type: ignore[method-assign]
        try:
            return fn(x)
        finally:
            torch.nn.Module._call_impl = own  # type: ignore[method-assign]

    def hooked(x: torch.Tensor) -> Any:
        handle = module_mod.register_module_forward_pre_hook(lambda m, a: None)
        try:
            return fn(x)
        finally:
            handle.remove()

    return {"unguarded, empty shell": shelled, "unguarded, empty pre-hook": hooked}


def bench(
    rounds: int,
    sample_s: float,
    hook_floor: bool = False,
    workloads: Optional[list[str]] = None,
    backends: tuple[str, ...] = ("python", "native"),
) -> None:
    """Per workload and backend, the unguarded call and every guarded variant timed once per
    round, in a new random order each round, so that the machine's drift (clock, neighbours,
    the allocator's state) lands on all of them alike; the median over rounds of each one's
    time, as a ratio to the unguarded call of the same set. The backends are timed in separate
    sets: the Python mode's garbage (a few objects per op) otherwise lands on the native
    variants' samples as collections."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    for name, make in WORKLOADS.items():
        if workloads and name not in workloads:
            continue
        fn, x = make()
        ratios: dict[tuple[str, str], float] = {}
        base_ms: list[float] = []
        for backend in backends:
            os.environ["IMMUTORCH_BACKEND"] = backend
            rows: dict[str, tuple[Timer, int]] = {}
            every = {**variants(fn), **(floor_variants(fn) if hook_floor else {})}
            for variant, call in every.items():
                # CPU time of this thread: the machine these figures come from is shared, and
                # wall-clock time there measures the neighbours.
                timer = Timer("fn(x)", globals={"fn": call, "x": x}, timer=time.thread_time)
                once = timer.timeit(3).median  # warm up (and the first guard's setup)
                rows[variant] = (timer, max(1, round(sample_s / max(once, 1e-6))))
            times: dict[str, list[float]] = {variant: [] for variant in rows}
            order = list(rows)
            for _ in range(rounds):
                rng.shuffle(order)
                for variant in order:
                    timer, number = rows[variant]
                    times[variant].append(timer.timeit(number).median)
            base = statistics.median(times["unguarded"])
            base_ms.append(base * 1e3)
            for variant in rows:
                ratios[(backend, variant)] = statistics.median(times[variant]) / base
        unguarded = ", ".join(f"{ms:.2f} ms ({b} set)" for ms, b in zip(base_ms, backends))
        print(f"\n{name}: unguarded {unguarded}")
        print(f"  {'variant':28}" + "".join(f" {b:>8}" for b in backends))
        for variant in list(rows)[1:]:
            cells = "".join(f" {ratios[(b, variant)]:7.2f}x" for b in backends)
            print(f"  {variant:28}{cells}")
    os.environ.pop("IMMUTORCH_BACKEND", None)


# glibc reads these when the process starts: large blocks from the heap, never trimmed back.
STEADY_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def steady_malloc() -> bool:
    """Whether this process was started with ``STEADY_MALLOC``."""
    return all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items())


def paired_ratios(
    base: Callable[[], Any],
    variant: Callable[[], Any],
    pairs: int,
    clock: Callable[[], float] = time.thread_time,
) -> list[float]:
    """``pairs`` ratios of ``variant``'s time to ``base``'s, each from the four calls base,
    variant, variant, base in a row: (v1 + v2) / (b1 + b2)."""
    out = []
    for _ in range(pairs):
        t0 = clock()
        base()
        t1 = clock()
        variant()
        variant()
        t3 = clock()
        base()
        t4 = clock()
        out.append((t3 - t1) / max((t1 - t0) + (t4 - t3), 1e-9))
    return out


def median_ci(
    values: list[float], rng: random.Random, resamples: int = 1000
) -> tuple[float, float, float]:
    """The median of ``values`` and a 95% bootstrap interval for it."""
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    return statistics.median(values), meds[int(0.025 * resamples)], meds[int(0.975 * resamples)]


def controls(fn: Callable[[torch.Tensor], Any]) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Rows that must read 1.00: the unguarded call again, and after a guard entered and left
    (beside the same after as much unrelated Python)."""

    def again(x: torch.Tensor) -> Any:
        return fn(x)

    def after(mode: str) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> Any:
            with immutorch.guard(mode=mode, scope="all"):  # type: ignore[arg-type]
                pass
            return fn(x)

        return run

    def after_python(x: torch.Tensor) -> Any:
        # As long as a guard's entry and exit (~30 us), one small loop: caches and branch
        # predictors barely disturbed.
        [object() for _ in range(600)]
        return fn(x)

    def after_stdlib(x: torch.Tensor) -> Any:
        # About as long, in as many different functions as a guard's entry and exit run, none
        # of them immutorch's or torch's: what any code between two calls leaves behind.
        _diverse_python()
        return fn(x)

    return {
        "control: unguarded again": again,
        "control: after guard() raise": after("raise"),
        "control: after guard() clone": after("clone"),
        "control: after 600 objects": after_python,
        "control: after stdlib Python": after_stdlib,
    }


_SAMPLE = {"a": [1, 2, 3], "b": {"c": "d"}}


def _diverse_python() -> None:
    """~35 us of the standard library's Python, in a few hundred different functions."""
    json.loads(json.dumps(_SAMPLE))
    re.sub(r"(\w)+", "x", "hello world foo")
    collections.Counter("abracadabra")
    textwrap.fill("lorem ipsum dolor sit amet " * 3, 20)
    fractions.Fraction(3, 7) + fractions.Fraction(1, 3)
    datetime.datetime(2020, 1, 1).isoformat()
    string.Template("$a").substitute(a=1)
    difflib.SequenceMatcher(None, "abcd", "abed").ratio()


def paired(pairs: int, workloads: Optional[list[str]] = None) -> None:
    """The native rows of ``bench``, timed in pairs beside the unguarded call (module docstring)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    malloc = "steady (--steady-malloc)" if steady_malloc() else "glibc default (adaptive)"
    print(f"\nmalloc: {malloc}")
    os.environ["IMMUTORCH_BACKEND"] = "native"
    for name, make in WORKLOADS.items():
        if workloads and name not in workloads:
            continue
        fn, x = make()
        rows = {**variants(fn), **controls(fn)}
        base = rows.pop("unguarded")
        for call in (base, *rows.values()):
            for _ in range(3):
                call(x)
        ratios: dict[str, list[float]] = {k: [] for k in rows}
        order = list(rows)
        enabled = gc.isenabled()
        gc.disable()
        try:
            batch = 10
            for done in range(0, pairs, batch):
                rng.shuffle(order)
                for k in order:
                    n = min(batch, pairs - done)
                    ratios[k] += paired_ratios(partial(base, x), partial(rows[k], x), n)
                gc.collect()
        finally:
            if enabled:
                gc.enable()
        started = time.thread_time()
        base(x)
        print(f"\n{name}: unguarded {(time.thread_time() - started) * 1e3:.2f} ms, {pairs} pairs")
        print(f"  {'variant':30} {'median':>8}  95% interval")
        for k, got in ratios.items():
            med, lo, hi = median_ci(got, rng)
            print(f"  {k:30} {med:7.3f}x  [{lo:.3f}, {hi:.3f}]")
    os.environ.pop("IMMUTORCH_BACKEND", None)


def load_cost() -> None:
    """Import immutorch and load the cached library in a fresh process, against import alone."""
    code = (
        "import time, sys; t = time.perf_counter(); import immutorch._boundaries; "
        "t1 = time.perf_counter(); {load} t2 = time.perf_counter(); print(t1 - t, t2 - t1)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    load = "from immutorch._backends.native import loader; loader.load();"
    samples = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", code.format(load=load)], capture_output=True, text=True, env=env
        )
        samples.append(float(out.stdout.split()[1]))
    print(f"\ncached load of the native library: {statistics.median(samples) * 1e3:.1f} ms")


def build_time() -> None:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "IMMUTORCH_CACHE_DIR": os.path.join(root, "cache")}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "immutorch", "build-native"], env=env, check=True)
        print(f"first build: {time.perf_counter() - started:.1f} s (including interpreter start)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, short timings")
    parser.add_argument("--build-time", action="store_true", help="also time a first build")
    parser.add_argument(
        "--hook-floor",
        action="store_true",
        help="also time the unguarded call under an empty module-call shell and under an "
        "empty global pre-hook",
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=list(WORKLOADS),
        help="only this workload (repeatable; default: all)",
    )
    parser.add_argument(
        "--native-only", action="store_true", help="time the native backend's set alone"
    )
    parser.add_argument(
        "--paired", action="store_true", help="the native rows timed in pairs (see above)"
    )
    parser.add_argument("--pairs", type=int, default=150, help="pairs per row (--paired)")
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="run with glibc's malloc thresholds fixed (re-executes the interpreter)",
    )
    args = parser.parse_args()
    if args.steady_malloc and not steady_malloc():
        env = {**os.environ, **STEADY_MALLOC}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    from immutorch._backends import native

    if not native.available():
        sys.exit(f"native backend unavailable: {native.unavailable_reason()}")
    if args.build_time:
        build_time()
    if args.paired:
        paired(3 if args.quick else args.pairs, args.workload)
        return
    load_cost()
    bench(
        rounds=3 if args.quick else 60,
        sample_s=0.005 if args.quick else 0.02,
        hook_floor=args.hook_floor,
        workloads=args.workload,
        backends=("native",) if args.native_only else ("python", "native"),
    )


if __name__ == "__main__":
    main()
