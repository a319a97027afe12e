"""Front door 4: the pytest plugin's strict mode, on an existing test suite, with no code change.

This folder is a small project: ``audio_pkg`` (two ``nn.Module``s, one writing into its
input) and ``tests/`` (ordinary value tests, which pass). This script runs the suite twice:

    pytest                                                  # passes: values are right
    pytest --immutorch=raise --immutorch-modules=audio_pkg  # fails the writing module's test

``--immutorch-modules`` protects the inputs of every call to an ``nn.Module`` defined in those
packages; ``--immutorch=raise`` makes any write an error. ``-p no:immutorch`` turns the plugin
off. The script exits 0 when both runs behave as described.

    python examples/strict_test_suite/run_strict.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest(*args: str) -> subprocess.CompletedProcess[str]:
    print(f"$ pytest {' '.join(args)}".rstrip())
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        check=False,
    )
    return result


def main() -> int:
    plain = pytest()
    print("  " + plain.stdout.strip().splitlines()[-1] + "\n")

    strict = pytest("--immutorch=raise", "--immutorch-modules=audio_pkg")
    lines = strict.stdout.splitlines()
    first_error = next((i for i, line in enumerate(lines) if "ImmutableTensorError:" in line), None)
    if first_error is not None:
        for line in lines[first_error : first_error + 4]:  # the message: op, module, line, fix
            print("  " + line.removeprefix("E").strip())
    print("  " + (lines[-1] if lines else ""))

    ok = (
        plain.returncode == 0
        and strict.returncode == 1
        and "test_preemphasis_values" in strict.stdout
        and "ImmutableTensorError" in strict.stdout
        and "test_peak_normalize_values FAILED" not in strict.stdout
    )
    if not ok:
        print(plain.stdout, plain.stderr, strict.stdout, strict.stderr, sep="\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
