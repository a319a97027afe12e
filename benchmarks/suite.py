"""Strict mode's cost on a real test suite: the same pytest run unguarded and under
``--immutorch=raise --immutorch-modules=PKG`` with each every-op backend, side by side.

    python benchmarks/suite.py --modules kornia --rounds 3 -- /path/to/kornia/tests/filters

Everything after ``--`` is passed to pytest (test paths, ``-k``, ...). ``--also PATH`` adds the
two strict variants with the immutorch of another checkout (``PATH`` put first on
``PYTHONPATH``: an earlier commit, say, from ``git worktree add``). Each round runs the variants
once, in a new random order, each in a fresh interpreter (``python -m pytest -q -p
no:cacheprovider -p no:randomly``, one thread); the table gives, per variant, the median over
the rounds of the child's CPU time (user + system) and of the session time that pytest reports
("in N s", the interpreter's start-up excluded), and each as a ratio to the unguarded run. CPU
time moves less than wall-clock time where other processes share the machine; neither is exact
on a shared VM (callgrind is, for single workloads: ``benchmarks/instructions.py``). Each
variant's last summary line is shown beside it, not judged: a strict-mode failure is a finding.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time

# Each variant's environment on top of this process's ("unguarded" runs with the plugin off).
VARIANTS: dict[str, dict[str, str]] = {
    "unguarded": {},
    "strict, python": {"IMMUTORCH_BACKEND": "python"},
    "strict, native": {"IMMUTORCH_BACKEND": "native"},
}
_SECONDS = re.compile(r" in ([0-9.]+)s")


def run_once(
    variants: dict[str, dict[str, str]], variant: str, modules: str, pytest_args: list[str]
) -> tuple[float, float, str]:
    """(CPU seconds of the child, the session seconds pytest reports, its summary line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("IMMUTORCH_MODE", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    if variant != "unguarded":
        for key, value in variants[variant].items():
            if key == "PYTHONPATH" and env.get(key):
                value += os.pathsep + env[key]
            env[key] = value
        command += ["--immutorch=raise", f"--immutorch-modules={modules}"]
    else:
        command += ["-p", "no:immutorch"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command + pytest_args, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [line for line in done.stdout.splitlines() if _SECONDS.search(line)]
    if not lines:
        raise SystemExit(f"{variant}: pytest printed no summary:\n{done.stdout[-2000:]}")
    summary = re.sub(r"\x1b\[[0-9;]*m", "", lines[-1]).strip("= ")
    match = _SECONDS.search(summary)
    assert match is not None
    return cpu, float(match.group(1)), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", required=True, help="the package strict mode watches")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--also", metavar="PATH", help="also the strict runs with PYTHONPATH=PATH")
    parser.add_argument("pytest_args", nargs="+", help="after --: test paths and options")
    args = parser.parse_args()
    variants = dict(VARIANTS)
    if args.also:
        path = os.path.abspath(args.also)
        if not os.path.isfile(os.path.join(path, "immutorch", "__init__.py")):
            parser.error(f"--also {args.also}: no immutorch package there")
        label = os.path.basename(path.rstrip("/"))
        for backend in ("python", "native"):
            variants[f"strict, {backend} @{label}"] = {
                "IMMUTORCH_BACKEND": backend,
                "PYTHONPATH": path,
            }
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    session: dict[str, list[float]] = {v: [] for v in variants}
    summaries: dict[str, str] = {}
    start = time.monotonic()
    for round_ in range(args.rounds):
        order = list(variants)
        random.shuffle(order)
        for variant in order:
            c, t, summaries[variant] = run_once(variants, variant, args.modules, args.pytest_args)
            cpu[variant].append(c)
            session[variant].append(t)
            line = f"round {round_ + 1}: {variant:<24} cpu {c:7.1f} s  session {t:7.1f} s"
            print(line, flush=True)
    base_cpu = statistics.median(cpu["unguarded"])
    base_session = statistics.median(session["unguarded"])
    print(f"\n{args.rounds} rounds in {time.monotonic() - start:.0f} s; medians:")
    print(f"{'variant':<25}{'cpu s':>8}{'ratio':>8}{'session s':>11}{'ratio':>8}  pytest's summary")
    for variant in variants:
        c = statistics.median(cpu[variant])
        t = statistics.median(session[variant])
        print(
            f"{variant:<25}{c:8.1f}{c / base_cpu:7.2f}x{t:11.1f}{t / base_session:7.2f}x"
            f"  {summaries[variant]}"
        )


if __name__ == "__main__":
    main()
