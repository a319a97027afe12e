"""The benchmark script runs end to end (``--quick``: tiny sizes) and writes what it promises.

It asserts what the benchmark counts, never how long anything took: the copy-on-write
accounting, the op counts, and that the JSON and the SVG are well formed.
"""

from __future__ import annotations

import importlib.util
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
    "raise_all",
    "clone_all",
    "guard_block",
    "guard_clone",
    "guard_clone_scoped",
    "clone_up_front",
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
    assert keys == [
        "encoder",
        "transformer",
        "small_ops",
        "normalizer",
        "unrelated_ops",
        "reading_ops",
    ]
    for block in doc["workloads"]:
        rows = {r["key"]: r for r in block["variants"]}
        assert set(rows) >= COMMON_VARIANTS, block["key"]
        if block["key"] not in ("unrelated_ops", "reading_ops"):
            assert "schema_check" in rows, block["key"]
        assert rows["unguarded"]["ratio"] == 1.0
        for r in rows.values():
            assert r["median_s"] > 0 and r["reps"] >= 1


def test_the_worst_case_dispatches_exactly_its_ops(
    quick_run: tuple[dict[str, Any], Path, str],
) -> None:
    doc, _, _ = quick_run
    ops = {b["key"]: b["ops_per_call"] for b in doc["workloads"]}
    assert ops["small_ops"] == 20  # --quick: 10 steps of mm + tanh
    assert ops["unrelated_ops"] == 20  # the same, beside p
    assert ops["reading_ops"] == 20  # --quick: 20 addmm reading p


def test_clone_mode_copies_only_what_is_written(
    quick_run: tuple[dict[str, Any], Path, str],
) -> None:
    doc, _, _ = quick_run
    encoder = _rows(doc, "encoder")
    mel_bytes = 2 * 80 * 40 * 4  # --quick: mel [2, 80, 40] float32
    assert encoder["clone"]["bytes_copied_per_call"] == 0  # the fixed normalizer only reads
    assert encoder["legacy_clone"]["bytes_copied_per_call"] == mel_bytes  # one copy, at the write
    assert encoder["legacy_clone_all"]["bytes_copied_per_call"] == mel_bytes
    for key in ("clone_all", "guard_clone", "guard_clone_scoped"):
        assert encoder[key]["bytes_copied_per_call"] == 0, key
    block = next(b for b in doc["workloads"] if b["key"] == "encoder")
    assert [c["variant"] for c in block["checks"]] == ["legacy_clone_all", "legacy_clone"]
    assert all(c["ok"] for c in block["checks"]), block["checks"]
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
        "encoder: clone ≤ 1.03x unguarded",
        "encoder: guard(mode='clone', scope='arguments') ≤ 1.03x unguarded",
        "unrelated ops: raise ≤ 1.01x unguarded",
        "reading ops: raise ≤ raise with scope='all'",
        "encoder: legacy clone copies one mel",
        "small ops: raise within 1 µs/op of floor",
    }
    versus = next(t for t in doc["targets"] if t["versus"] == "raise_all")
    reading = _rows(doc, "reading_ops")
    assert versus["limit"] == reading["raise_all"]["ratio"]
    assert versus["met"] == (reading["raise"]["ratio"] <= reading["raise_all"]["ratio"])
    assert "**Targets**" in stdout
    assert "| immutable_inputs(mode='clone'), scope arguments |" in stdout
    assert "| immutable_inputs(mode='clone', scope='all') |" in stdout
    assert "| with guard(p, mode='clone', scope='arguments'): |" in stdout


def test_the_plot_is_an_svg_bar_chart(quick_run: tuple[dict[str, Any], Path, str]) -> None:
    _, out, _ = quick_run
    root = ET.parse(out / "overhead.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    bars = root.findall("{http://www.w3.org/2000/svg}rect")
    assert len(bars) > 30


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("immutorch_benchmarks_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_every_guarded_variant_protects_the_argument() -> None:
    """Each variant's wrapping really protects p: a callee of the same shape that writes into
    p is refused (raise) or writes into a copy (clone), and leaves x alone."""
    import torch

    import immutorch

    run = _load_script()

    class Writer(torch.nn.Module):
        def forward(self, p: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(x @ w)
            p.add_(1)
            return h

    fn = run._calling_pxw(Writer())
    for key, _, factory in run.VARIANTS:
        if key in ("unguarded", "empty_mode", "off", "clone_up_front", "warn"):
            continue
        p, x, w = torch.zeros(4, 4), torch.randn(4, 4), torch.randn(4, 4)
        call = factory(fn, (p, x, w), ("p",))
        if "clone" in key:
            before = immutorch.clone_stats().copies
            call()
            assert immutorch.clone_stats().copies == before + 1, key
        else:
            with pytest.raises(immutorch.ImmutableTensorError):
                call()
        assert torch.equal(p, torch.zeros(4, 4)), key
