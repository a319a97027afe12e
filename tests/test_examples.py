"""Every example runs to completion (exit 0) in a fresh interpreter, and says what it shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Each example, and a line its output must contain.
CASES = {
    "speechbrain_mel_encoder.py": "embedding bit-identical to the unguarded one: True",
    "decorator_forward.py": "raise mode: aten::clamp_ refused",
    "guard_call.py": "caller's batch unchanged: True",
    "readonly_mark.py": "with the mark: the write was refused before it landed",
    "strict_test_suite/run_strict.py": "ImmutableTensorError",
}


def test_every_example_is_covered() -> None:
    found = {p.name for p in EXAMPLES.glob("*.py")} | {"strict_test_suite/run_strict.py"}
    assert found == set(CASES)


@pytest.mark.parametrize("example", sorted(CASES))
def test_example_runs(example: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / example)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert CASES[example] in result.stdout, result.stdout
