"""The benchmark script runs end to end (``--quick``: tiny sizes) and writes what it promises.

It asserts what the benchmark counts, never how long anything took: the copy-on-write
accounting, the op counts, and that the JSON and the SVG are well formed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "run.py"

COMMON_VARIANTS = {
    "unguarded",
    "empty_mode",
    "raise",
    "warn",
    "clone",
    "off",
    "guard_block",
    "clone_up_front",
    "schema_check",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a timing claim
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return doc, out, proc.stdout


def _rows(doc: dict[str, Any], workload: str) -> dict[str, dict[str, Any]]:
    block = next(b for b in doc["workloads"] if b["key"] == workload)
    return {r["key"]: r for r in block["variants"]}


def test_every_workload_runs_every_variant(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    doc, _, _ = quick_run
    assert doc["meta"]["quick"] is True
    keys = [b["key"] for b in doc["workloads"]]
    assert keys == ["encoder", "transformer", "small_ops", "normalizer"]
    for block in doc["workloads"]:
        rows = {r["key"]: r for r in block["variants"]}
        assert set(rows) >= COMMON_VARIANTS, block["key"]
        assert rows["unguarded"]["ratio"] == 1.0
        for r in rows.values():
            assert r["median_s"] > 0 and r["reps"] >= 1


def test_the_worst_case_dispatches_exactly_its_ops(
    quick_run: tuple[dict[str, Any], Path, str],
) -> None:
    doc, _, _ = quick_run
    block = next(b for b in doc["workloads"] if b["key"] == "small_ops")
    assert block["ops_per_call"] == 20  # --quick: 10 steps of mm + tanh


def test_clone_mode_copies_only_what_is_written(
    quick_run: tuple[dict[str, Any], Path, str],
) -> None:
    doc, _, _ = quick_run
    encoder = _rows(doc, "encoder")
    mel_bytes = 2 * 80 * 40 * 4  # --quick: mel [2, 80, 40] float32
    assert encoder["clone"]["bytes_copied_per_call"] == 0  # the fixed normalizer only reads
    assert encoder["legacy_clone"]["bytes_copied_per_call"] == mel_bytes  # one copy, at the write
    assert encoder["legacy_unguarded"]["bytes_copied_per_call"] == 0
    assert encoder["clone_up_front"]["bytes_copied_per_call"] == mel_bytes
    norm = _rows(doc, "normalizer")
    feats_bytes = 4 * 50 * 80 * 4
    assert norm["clone"]["bytes_copied_per_call"] == 0
    assert norm["legacy_clone"]["bytes_copied_per_call"] == feats_bytes  # lengths is not copied
    for key in ("raise", "warn", "off", "guard_block", "empty_mode"):
        assert norm[key]["bytes_copied_per_call"] == 0


def test_memory_is_measured(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    doc, _, _ = quick_run
    encoder = _rows(doc, "encoder")
    peak = encoder["unguarded"]["peak_alloc_bytes"]
    assert peak is not None and peak > 0
    # Cloning up front holds one more mel than the plain call, at least.
    assert encoder["clone_up_front"]["peak_alloc_bytes"] >= peak


def test_targets_are_reported(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    doc, _, stdout = quick_run
    assert {t["target"] for t in doc["targets"]} >= {
        "encoder: raise ≤ 1.03x unguarded",
        "small ops: raise within 1 µs/op of floor",
    }
    assert "**Targets**" in stdout
    assert "| immutable_inputs(mode='clone') |" in stdout


def test_the_plot_is_an_svg_bar_chart(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    _, out, _ = quick_run
    root = ET.parse(out / "overhead.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    bars = root.findall("{http://www.w3.org/2000/svg}rect")
    assert len(bars) > 30
