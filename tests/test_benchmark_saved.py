"""benchmarks/saved.py runs end to end (``--quick``) and reports every variant; no timings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "saved.py"


def test_quick_run_reports_every_variant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("saved_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "saved.json"
    with pytest.warns(UserWarning, match="Anomaly Detection has been enabled"):
        assert bench.main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["variants"]) == set(bench.variants())
    assert result["clone_bytes_copied_per_step"] == 0  # a clean step writes nothing saved
    assert "guard_saved_clone" in capsys.readouterr().out
