"""What immutorch costs: the guard's overhead on CPU workloads, against its alternatives.

Run from the repository root::

    python benchmarks/run.py            # the full run: several minutes on 2 cores
    python benchmarks/run.py --quick    # tiny sizes, 2 repetitions: a smoke test, no timings
    python benchmarks/run.py --out DIR  # where results.json and overhead.svg go

What is timed is in ``workloads.py`` and ``variants.py``, how in ``harness.py`` (a shuffled
round-robin of ``torch.utils.benchmark.Timer`` samples, every guarded variant once per immutorch
backend, side by side in one process), what is written in ``report.py``: a Markdown table per
workload and thread count, a headline table, the targets (reported as met or not, never
asserted); and files: ``results.json``, ``compare.txt`` (``torch.utils.benchmark.Compare``'s
tables of every sample's time) and the plot ``overhead.svg`` (with matplotlib, the ``bench``
extra; without it the plot is skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.benchmark import Measurement

import immutorch
from benchmarks import harness, report, workloads

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 reps: a smoke test")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 15; quick 2)")
    p.add_argument("--schema-check-reps", type=int, default=None, help="default 3; 0 skips it")
    p.add_argument("--sample-ms", type=float, default=50.0, help="target length of one sample")
    p.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=workloads.KEYS,
        metavar="WORKLOAD",
        help=f"workloads to run ({', '.join(workloads.KEYS)})",
    )
    p.add_argument(
        "--threads",
        type=int,
        nargs="*",
        default=None,
        help="torch thread counts to run at (default: 1 and torch's default; quick: 1)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=list(harness.BACKENDS),
        choices=harness.BACKENDS,
        help="immutorch backends the guarded variants run on (default: all; one that is not "
        "available shows as n/a)",
    )
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if os.environ.pop("IMMUTORCH_MODE", None) is not None:
        print("note: IMMUTORCH_MODE was set; ignored for this run", file=sys.stderr)
    if harness.BACKEND_ENV in os.environ:
        print(
            f"note: {harness.BACKEND_ENV} is set; each guarded variant sets its own",
            file=sys.stderr,
        )
    quick: bool = args.quick
    reps: int = args.reps if args.reps is not None else (2 if quick else 15)
    schema_reps: int = (
        args.schema_check_reps if args.schema_check_reps is not None else (1 if quick else 3)
    )
    backends: list[str] = list(dict.fromkeys(args.backends))
    default_threads = torch.get_num_threads()
    thread_counts: list[int] = args.threads or ([1] if quick else sorted({1, default_threads}))
    rng = random.Random(0)
    started = time.perf_counter()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_before = os.getloadavg()
    availability = {b: harness.backend_unavailable(b) for b in backends}
    shown = ", ".join(f"{b} {f'n/a ({why})' if why else 'runs'}" for b, why in availability.items())
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch default threads {default_threads}, load average "
        f"{load_before[0]:.2f} (other processes compete for the cores: see the IQRs)\n"
        f"backends: {shown}\n",
        flush=True,
    )

    chosen = workloads.make_workloads(quick)
    if args.only:
        chosen = [w for w in chosen if w.key in args.only]
    blocks: list[report.Block] = []
    measurements: list[Measurement] = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for w in chosen:
            result = harness.measure(
                w,
                backends=backends,
                reps=reps,
                schema_check_reps=schema_reps,
                warmup=1 if quick else 3,
                sample_s=args.sample_ms / 1e3,
                rng=rng,
                calibrate=not quick,
            )
            measurements.extend(m for c in result.cases for m in c.measurements)
            block = report.summarize(result)
            blocks.append(block)
            print(report.markdown_table(block, quick), end="\n\n", flush=True)
    torch.set_num_threads(default_threads)

    targets = report.check_targets(blocks)
    print("**Headline** (median ratio to unguarded, wall clock, side by side in one run)\n")
    print(report.headline_table(blocks, backends), end="\n\n")
    print("**Targets**\n")
    print(report.targets_table(targets), end="\n\n")
    elapsed = time.perf_counter() - started
    print(f"({elapsed:.0f} s in all; load average now {os.getloadavg()[0]:.2f})")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": quick,
        "reps": reps,
        "schema_check_reps": schema_reps,
        "sample_ms": args.sample_ms,
        "backends": availability,  # backend -> None (ran) or why it did not
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
    (out / "compare.txt").write_text(report.compare_text(measurements), encoding="utf-8")
    print(f"wrote {out / 'results.json'} and {out / 'compare.txt'}")
    skipped = report.write_plot(blocks, out / "overhead.svg")
    if skipped:
        print(f"plot skipped: {skipped}")
    else:
        print(f"wrote {out / 'overhead.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
