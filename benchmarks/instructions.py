"""Instructions a guard adds, counted by callgrind: exact where wall-clock ratios on a shared
machine move by 5-20% between runs.

    python benchmarks/instructions.py [--workload NAME] [--iterations K] [--backend B]
                                      [--hook-floor]

Runs itself under ``valgrind --tool=callgrind --dump-before=getppid``: one process times every
variant of one workload (``native_micro``'s workloads), each after two warm-up calls, and calls
``os.getppid()`` before and after its K measured calls, so that callgrind writes the counts of
exactly those calls to a dump of their own. The table gives instructions per call and what
each guard adds to the unguarded call. Instructions understate Python's share of wall-clock
time (callgrind runs the matmuls without AVX-512, and Python at low IPC): read the table as
what each variant's own code costs, beside ``native_micro.py``'s timings. About 2 minutes a
workload, most of it importing torch under valgrind.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

VARIANTS = [
    "unguarded",
    "guard(x) raise",
    "guard() raise",
    "immutable_inputs raise",
    "guard(x) clone",
    "guard() clone",
]
# With --hook-floor: what intercepting module calls costs by itself, with no guard
# (native_micro.floor_variants).
HOOK_FLOOR = ["unguarded, empty shell", "unguarded, empty pre-hook"]


def _variants(fn: Callable[[Any], Any]) -> dict[str, Callable[[Any], Any]]:
    import immutorch

    def guarded(mode: str, named: bool) -> Callable[[Any], Any]:
        def run(x: Any) -> Any:
            with immutorch.guard(*((x,) if named else ()), mode=mode, scope="all"):  # type: ignore[arg-type]
                return fn(x)

        return run

    from native_micro import floor_variants

    return {
        **floor_variants(fn),
        "unguarded": fn,
        "guard(x) raise": guarded("raise", True),
        "guard() raise": guarded("raise", False),
        "immutable_inputs raise": immutorch.immutable_inputs(mode="raise", scope="all")(fn),
        "guard(x) clone": guarded("clone", True),
        "guard() clone": guarded("clone", False),
    }


def _names(hook_floor: bool) -> list[str]:
    return VARIANTS + (HOOK_FLOOR if hook_floor else [])


def child(workload: str, iterations: int, hook_floor: bool) -> None:
    """Under callgrind: each variant's measured calls between two getppid() calls."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from native_micro import WORKLOADS

    torch.set_num_threads(1)
    torch.manual_seed(0)
    fn, x = WORKLOADS[workload]()
    variants = _variants(fn)
    gc.collect()
    gc.disable()  # a collection would land on whichever variant runs then
    for name in _names(hook_floor):
        f = variants[name]
        for _ in range(2):
            f(x)
        os.getppid()
        for _ in range(iterations):
            f(x)
        os.getppid()


def dump_totals(directory: Path, prefix: str) -> list[int]:
    """The instruction total of each numbered dump (``prefix.1``, ``prefix.2``, ...), in order."""
    found: dict[int, int] = {}
    for path in directory.glob(f"{prefix}.*"):
        number = path.name.rsplit(".", 1)[1]
        if not number.isdigit():
            continue
        match = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"{path}: no summary line (not a callgrind dump?)")
        found[int(number)] = int(match.group(1))
    return [found[n] for n in sorted(found)]


def per_call(totals: list[int], n_variants: int, iterations: int) -> list[float]:
    """Instructions per measured call of each variant. Dump 1 runs from start-up to the first
    getppid(); then each variant has its measured dump, and every variant but the last a dump
    of the next one's warm-up (the rest of the process is in a final dump, if any)."""
    if len(totals) < 2 * n_variants:
        raise RuntimeError(f"expected at least {2 * n_variants} dumps, found {len(totals)}")
    return [totals[1 + 2 * i] / iterations for i in range(n_variants)]


def table(workload: str, counts: list[float], names: list[str] = VARIANTS) -> str:
    base = counts[0]
    lines = [
        f"{workload}: instructions per call (callgrind)",
        f"{'variant':24} {'per call':>14} {'added':>12} {'ratio':>7}",
    ]
    for name, n in zip(names, counts):
        lines.append(f"{name:24} {n:14,.0f} {n - base:+12,.0f} {n / base:7.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="TransformerEncoder fwd")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument(
        "--hook-floor",
        action="store_true",
        help="also count unguarded calls under an empty module-call shell, and with an empty "
        "global pre-hook (torch's slow path)",
    )
    parser.add_argument("--backend", default="native", choices=["native", "python"])
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="copy callgrind's dumps there (cg.out.N, for callgrind_annotate: the measured "
        "calls of variant i, counted from 0, are in cg.out.(2i+2))",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.workload, args.iterations, args.hook_floor)
        return
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        sys.exit("valgrind not found: apt-get install valgrind")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        command = [
            valgrind,
            "--tool=callgrind",
            "--dump-before=getppid",
            f"--callgrind-out-file={out / 'cg.out'}",
            # the interpreter itself: a launcher script (pyenv's shim) would be what is traced
            os.path.realpath(sys.executable),
            __file__,
            "--child",
            "--workload",
            args.workload,
            "--iterations",
            str(args.iterations),
            *(["--hook-floor"] if args.hook_floor else []),
        ]
        env = {**os.environ, "IMMUTORCH_BACKEND": args.backend}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        names = _names(args.hook_floor)
        counts = per_call(dump_totals(out, "cg.out"), len(names), args.iterations)
        if args.keep:
            keep = Path(args.keep)
            keep.mkdir(parents=True, exist_ok=True)
            for dump in out.glob("cg.out*"):
                shutil.copy(dump, keep / dump.name)
    print(table(f"{args.workload} ({args.backend})", counts, names))


if __name__ == "__main__":
    main()
