"""What guard_saved costs on a training step, beside autograd's own tools for the same bug.

Run from the repository root (about a minute and a half on a shared 2-core machine)::

    python benchmarks/saved.py              # the table
    python benchmarks/saved.py --quick      # tiny sizes, one round: a smoke test, no timings
    python benchmarks/saved.py --json out.json

The workload: one SGD training step (forward, mean-square loss, backward, ``opt.step()``,
``zero_grad``) of ``nn.TransformerEncoder`` with 4 layers, d_model 128, 4 heads, feed-forward
512, dropout 0, on a [16, 32, 128] batch, one thread. Variants, each around the whole step:

- ``unguarded``: the plain step (1.00 by definition).
- ``identity_hooks``: ``saved_tensors_hooks(lambda t: t, lambda t: t)``: the floor of any
  design built on saved-tensor hooks.
- ``allow_mutation``: ``torch.autograd.graph.allow_mutation_on_saved_tensors()``.
- ``anomaly``: ``torch.autograd.detect_anomaly(check_nan=False)``.
- ``guard_saved_raise`` / ``_warn`` / ``_clone``: ``immutorch.guard_saved(mode=...)``.

Timing: each round times every variant once, in a shuffled order, with
``torch.utils.benchmark.Timer(...).timeit(number)`` (``number`` fixed per variant so a sample
lasts about ``--sample-ms``); the table shows the median over rounds of the time per step and
of the per-round ratio to ``unguarded``, and the ratio of CPU time (``time.process_time``), which
does not count waiting for a core on a shared machine.

Memory: ``peak`` is the high-water mark of torch CPU allocations during one step, from
``torch.profiler`` memory events, beside what clone mode copied (``GuardSaved.stats``): clone
mode's peak must stay within unguarded + its copies. A clean step writes nothing saved, so
clone mode copies nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.benchmark import Timer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

import immutorch  # noqa: E402
from benchmarks.harness import peak_alloc  # noqa: E402  (one way to read peak memory)

Context = Callable[[], Any]


def _identity_hooks() -> Any:
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def variants() -> dict[str, Context]:
    return {
        "unguarded": contextlib.nullcontext,
        "identity_hooks": _identity_hooks,
        "allow_mutation": torch.autograd.graph.allow_mutation_on_saved_tensors,
        "anomaly": lambda: torch.autograd.detect_anomaly(check_nan=False),
        "guard_saved_raise": lambda: immutorch.guard_saved(mode="raise"),
        "guard_saved_warn": lambda: immutorch.guard_saved(mode="warn"),
        "guard_saved_clone": lambda: immutorch.guard_saved(mode="clone"),
    }


class Step:
    """One training step of the encoder, under a context, on its own copy of the model."""

    def __init__(self, context: Context, quick: bool) -> None:
        torch.manual_seed(0)
        d, layers, batch, length = (16, 1, 2, 4) if quick else (128, 4, 16, 32)
        layer = torch.nn.TransformerEncoderLayer(
            d, 4, dim_feedforward=4 * d, dropout=0.0, batch_first=True
        )
        self.model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(batch, length, d, generator=torch.Generator().manual_seed(1))
        self.context = context
        self.guard: Any = None

    def __call__(self) -> None:
        with self.context() as guard:
            self.guard = guard
            loss = self.model(self.x).pow(2).mean()
            loss.backward()
        self.opt.step()
        self.opt.zero_grad()


def _sample(call: Callable[[], None], number: int) -> tuple[float, float]:
    """(wall seconds per call, CPU seconds per call) of one ``Timer.timeit``."""
    timer = Timer(stmt="call()", globals={"call": call}, num_threads=1)
    warmup = max(number // 100, 2)
    cpu = time.process_time()
    wall = timer.timeit(number).median
    return wall, (time.process_time() - cpu) / (number + warmup)


def _calls_for(call: Callable[[], None], sample_ms: float) -> int:
    call()
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    return max(1, round(sample_ms / 1000 / max(once, 1e-6)))


def run(rounds: int, sample_ms: float, quick: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    steps = {name: Step(context, quick) for name, context in variants().items()}
    numbers = {name: _calls_for(step, sample_ms) for name, step in steps.items()}
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            w, c = _sample(steps[name], numbers[name])
            wall[name].append(w)
            cpu[name].append(c)
    rows = {}
    for name in steps:
        ratios = [w / u for w, u in zip(wall[name], wall["unguarded"])]
        cpu_ratios = [c / u for c, u in zip(cpu[name], cpu["unguarded"])]
        rows[name] = {
            "ms": statistics.median(wall[name]) * 1000,
            "x": statistics.median(ratios),
            "x_cpu": statistics.median(cpu_ratios),
            "peak_bytes": peak_alloc(steps[name]),
        }
    clone = steps["guard_saved_clone"]
    clone()
    copied = clone.guard.stats.bytes_copied if clone.guard is not None else 0
    return {
        "workload": "TransformerEncoder step" + (" (quick)" if quick else ""),
        "torch": torch.__version__,
        "threads": 1,
        "rounds": rounds,
        "variants": rows,
        "clone_bytes_copied_per_step": copied,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['workload']}, torch {result['torch']}, 1 thread, {result['rounds']} rounds",
        "",
        f"{'variant':<20} {'ms/step':>9} {'x (wall)':>9} {'x (CPU)':>8} {'peak MiB':>9}",
    ]
    for name, row in result["variants"].items():
        peak = row["peak_bytes"]
        peak_text = f"{peak / 2**20:9.1f}" if peak is not None else f"{'?':>9}"
        lines.append(f"{name:<20} {row['ms']:9.2f} {row['x']:9.2f} {row['x_cpu']:8.2f} {peak_text}")
    base = result["variants"]["unguarded"]["peak_bytes"]
    clone = result["variants"]["guard_saved_clone"]["peak_bytes"]
    copied = result["clone_bytes_copied_per_step"]
    if base is not None and clone is not None:
        verdict = "met" if clone <= base + copied else "NOT met"
        lines.append(
            f"\nclone peak {clone / 2**20:.1f} MiB <= unguarded {base / 2**20:.1f} MiB + copied "
            f"{copied / 2**20:.1f} MiB: {verdict}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _no_override() -> Iterator[None]:
    """Measure the modes as written, whatever IMMUTORCH_MODE says."""
    import os

    saved = os.environ.pop("IMMUTORCH_MODE", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["IMMUTORCH_MODE"] = saved


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--sample-ms", type=float, default=600.0, help="ms per sample")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with _no_override():
        if args.quick:
            result = run(rounds=1, sample_ms=1.0, quick=True)
        else:
            result = run(rounds=args.rounds, sample_ms=args.sample_ms, quick=False)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
