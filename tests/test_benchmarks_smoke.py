"""The benchmark runs end to end (``--quick``: tiny sizes) and writes what it promises.

It asserts what the benchmark counts, never how long anything took: the copy-on-write
accounting, the op counts, one row per guarded variant and backend (n/a where a backend is not
available), and that the JSON, the Compare tables and the plot (or the line saying it was
skipped) are there.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import pytest
import torch

import immutorch

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
# The rows that do not depend on immutorch's backend, so run once.
BACKEND_INDEPENDENT = {
    "unguarded",
    "empty_mode",
    "off",
    "clone_up_front",
    "legacy_unguarded",
    "legacy_clone_up_front",
    "schema_check",
}
WORKLOADS = [
    "encoder",
    "transformer",
    "small_ops",
    "normalizer",
    "unrelated_ops",
    "reading_ops",
    "encoder_forward",
    "encoder_train_step",
]
QuickRun = tuple[dict[str, Any], Path, str]


def _bench(name: str) -> ModuleType:
    """``benchmarks.<name>``, importable from the repository root (not an installed package)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k not in ("IMMUTORCH_MODE", "IMMUTORCH_BACKEND")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a timing claim
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return doc, out, proc.stdout


def _block(doc: dict[str, Any], workload: str) -> dict[str, Any]:
    return next(b for b in doc["workloads"] if b["key"] == workload)


def _rows(doc: dict[str, Any], workload: str, backend: str = "python") -> dict[str, Any]:
    """Variant key -> its row on ``backend``, or its backend-independent row."""
    rows = _block(doc, workload)["variants"]
    return {r["key"]: r for r in rows if r["backend"] in (None, backend)}


def _native_ran(doc: dict[str, Any]) -> bool:
    return doc["meta"]["backends"]["native"] is None


def test_every_workload_runs_every_variant_on_every_backend(quick_run: QuickRun) -> None:
    doc, _, _ = quick_run
    assert doc["meta"]["quick"] is True
    assert set(doc["meta"]["backends"]) == {"python", "native"}
    assert doc["meta"]["backends"]["python"] is None
    assert [b["key"] for b in doc["workloads"]] == WORKLOADS
    guarded = {v.key for v in _bench("variants").VARIANTS if v.guarded}
    for block in doc["workloads"]:
        rows = _rows(doc, block["key"])
        assert set(rows) >= COMMON_VARIANTS, block["key"]
        if block["key"] not in ("unrelated_ops", "reading_ops"):
            assert "schema_check" in rows, block["key"]
        assert rows["unguarded"]["ratio"] == 1.0
        for r in block["variants"]:
            assert r["median_s"] > 0 and r["reps"] >= 1
            assert (r["backend"] is None) == (r["key"] in BACKEND_INDEPENDENT), r["key"]
        native = {r["key"] for r in block["variants"] if r["backend"] == "native"}
        if _native_ran(doc):
            assert native >= guarded, block["key"]
        else:
            assert native == set()
            assert "native" in block["unavailable_backends"]
            assert any(n.startswith("Backend native: n/a") for n in block["notes"])


def test_the_worst_case_dispatches_exactly_its_ops(quick_run: QuickRun) -> None:
    doc, _, _ = quick_run
    ops = {b["key"]: b["ops_per_call"] for b in doc["workloads"]}
    assert ops["small_ops"] == 20  # --quick: 10 steps of mm + tanh
    assert ops["unrelated_ops"] == 20  # the same, beside p
    assert ops["reading_ops"] == 20  # --quick: 20 addmm reading p
    # A training step dispatches its forward's ops and more (the backward's).
    assert ops["encoder_train_step"] > ops["encoder_forward"] > 100


def test_clone_mode_copies_only_what_is_written(quick_run: QuickRun) -> None:
    doc, _, _ = quick_run
    backends = ["python", "native"] if _native_ran(doc) else ["python"]
    mel_bytes = 2 * 80 * 40 * 4  # --quick: mel [2, 80, 40] float32
    feats_bytes = 4 * 50 * 80 * 4
    for backend in backends:
        encoder = _rows(doc, "encoder", backend)
        assert encoder["clone"]["bytes_copied_per_call"] == 0  # the fixed normalizer only reads
        assert encoder["legacy_clone"]["bytes_copied_per_call"] == mel_bytes  # one copy
        assert encoder["legacy_clone_all"]["bytes_copied_per_call"] == mel_bytes
        for key in ("clone_all", "guard_clone", "guard_clone_scoped"):
            assert encoder[key]["bytes_copied_per_call"] == 0, key
        assert encoder["legacy_unguarded"]["bytes_copied_per_call"] == 0
        assert encoder["clone_up_front"]["bytes_copied_per_call"] == mel_bytes
        norm = _rows(doc, "normalizer", backend)
        assert norm["clone"]["bytes_copied_per_call"] == 0
        assert norm["legacy_clone"]["bytes_copied_per_call"] == feats_bytes  # not lengths
        for key in ("raise", "warn", "off", "guard_block", "empty_mode"):
            assert norm[key]["bytes_copied_per_call"] == 0
        train = _rows(doc, "encoder_train_step", backend)
        for key in ("clone", "clone_all", "guard_clone"):  # gradients are fresh memory
            assert train[key]["bytes_copied_per_call"] == 0, key
    checks = _block(doc, "encoder")["checks"]
    assert [(c["variant"], c["backend"]) for c in checks] == [
        (variant, backend)
        for variant in ("legacy_clone_all", "legacy_clone")
        for backend in backends
    ]
    assert all(c["ok"] for c in checks), checks


def test_memory_is_measured(quick_run: QuickRun) -> None:
    doc, _, _ = quick_run
    encoder = _rows(doc, "encoder")
    peak = encoder["unguarded"]["peak_alloc_bytes"]
    assert peak is not None and peak > 0
    # Cloning up front holds one more mel than the plain call, at least.
    assert encoder["clone_up_front"]["peak_alloc_bytes"] >= peak


def test_targets_and_headline_are_reported(quick_run: QuickRun) -> None:
    doc, _, stdout = quick_run
    assert {t["target"] for t in doc["targets"]} >= {
        "encoder: raise ≤ 1.03x unguarded",
        "encoder: clone ≤ 1.03x unguarded",
        "encoder: guard(mode='clone', scope='arguments') ≤ 1.03x unguarded",
        "unrelated ops: raise ≤ 1.01x unguarded",
        "reading ops: raise ≤ raise with scope='all'",
        "encoder: legacy clone copies one mel",
        "small ops: raise within 1 µs/op of floor",
        "native: small ops: raise, scope all ≤ 1.05x",
        "native: train step: guard() ≤ 1.05x",
        "native: encoder: guard() ≤ 1.03x",
    }
    versus = next(t for t in doc["targets"] if t["versus"] == "raise_all")
    reading = _rows(doc, "reading_ops")
    assert versus["limit"] == reading["raise_all"]["ratio"]
    assert versus["met"] == (reading["raise"]["ratio"] <= reading["raise_all"]["ratio"])
    native = [t for t in doc["targets"] if t["backend"] == "native"]
    assert len(native) == 8
    if not _native_ran(doc):
        assert all(t["met"] is None and t["measured"] is None for t in native)
    assert "**Targets**" in stdout and "**Headline**" in stdout
    headline = stdout.split("**Headline**")[1].split("**Targets**")[0]
    assert "| guard() python | guard() native |" in headline
    assert headline.count("| encoder_train_step ") == 1
    if not _native_ran(doc):
        assert "| n/a |" in headline
    assert "| immutable_inputs(mode='clone'), scope arguments | python |" in stdout
    assert "| immutable_inputs(mode='clone', scope='all') | python |" in stdout
    assert "| with guard(p, mode='clone', scope='arguments'): | python |" in stdout
    assert "| unguarded | - |" in stdout


def test_the_compare_tables_and_the_plot_are_written(quick_run: QuickRun) -> None:
    doc, out, stdout = quick_run
    compare = (out / "compare.txt").read_text(encoding="utf-8")
    for block in doc["workloads"]:
        assert f"{block['title']} {block['shape']}" in compare
    if importlib.util.find_spec("matplotlib") is None:
        assert "plot skipped: matplotlib is not installed" in stdout
        assert not (out / "overhead.svg").exists()
        return
    root = ET.parse(out / "overhead.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = {"".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")}
    for block in doc["workloads"]:  # one panel per workload
        assert f"{block['title']} {block['shape']}" in texts


def test_without_matplotlib_the_plot_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = _bench("report")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    why = report.write_plot([], tmp_path / "overhead.svg")
    assert why is not None and "matplotlib is not installed" in why
    assert not (tmp_path / "overhead.svg").exists()


def test_backend_detection_and_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = _bench("harness")
    assert harness.backend_unavailable("python") is None
    assert harness.backend_unavailable("nosuch") == "no module immutorch._backends.nosuch"
    monkeypatch.delenv("IMMUTORCH_BACKEND", raising=False)
    with harness.backend_selected("native"):
        assert os.environ["IMMUTORCH_BACKEND"] == "native"
    assert "IMMUTORCH_BACKEND" not in os.environ
    monkeypatch.setenv("IMMUTORCH_BACKEND", "python")
    with pytest.raises(RuntimeError), harness.backend_selected("native"):
        raise RuntimeError  # restored on the way out, error or not
    assert os.environ["IMMUTORCH_BACKEND"] == "python"


def test_guarded_variants_become_one_case_per_backend() -> None:
    harness, variants, workloads = _bench("harness"), _bench("variants"), _bench("workloads")
    w = next(w for w in workloads.make_workloads(quick=True) if w.key == "encoder")
    cases = harness.build_cases(w, ["python", "native"], with_schema_check=True)
    seen = [(c.key, c.backend) for c in cases]
    assert len(seen) == len(set(seen))
    for v in variants.VARIANTS:
        expected = ["python", "native"] if v.guarded else [None]
        assert [b for k, b in seen if k == v.key] == expected, v.key
    assert [b for k, b in seen if k == "legacy_clone"] == ["python", "native"]
    assert [b for k, b in seen if k in ("legacy_unguarded", "schema_check")] == [None, None]


def _available_backends() -> list[Optional[str]]:
    harness = _bench("harness")
    return [b for b in harness.BACKENDS if harness.backend_unavailable(b) is None]


@pytest.mark.parametrize("backend", _available_backends())
def test_every_guarded_variant_protects_the_argument(backend: str) -> None:
    """Each variant's wrapping really protects p, on each available backend: a callee of the
    same shape that writes into p is refused (raise) or writes into a copy (clone), and leaves
    the caller's p alone."""
    harness, variants, workloads = _bench("harness"), _bench("variants"), _bench("workloads")

    class Writer(torch.nn.Module):
        def forward(self, p: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(x @ w)
            p.add_(1)
            return h

    fn = workloads.calling_pxw(Writer())
    checked = 0
    for v in variants.VARIANTS:
        if not v.guarded or v.key == "warn":
            continue
        p, x, w = torch.zeros(4, 4), torch.randn(4, 4), torch.randn(4, 4)
        call = v.build(fn, (p, x, w), ("p",))
        with harness.backend_selected(backend):
            if "clone" in v.key:
                before = immutorch.clone_stats().copies
                call()
                assert immutorch.clone_stats().copies == before + 1, v.key
            else:
                with pytest.raises(immutorch.ImmutableTensorError):
                    call()
        assert torch.equal(p, torch.zeros(4, 4)), v.key
        checked += 1
    assert checked == 7


def test_two_backends_run_side_by_side(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With both backends available, each guarded row runs under its own IMMUTORCH_BACKEND, in
    the same repetitions as the unguarded call, and the headline and targets fill both columns.
    (Here both rows run the Python backend: the switch is what is checked, not the backend.)"""
    harness, report, workloads = _bench("harness"), _bench("report"), _bench("workloads")
    monkeypatch.setattr(harness, "backend_unavailable", lambda name: None)
    monkeypatch.delenv("IMMUTORCH_BACKEND", raising=False)
    seen: list[Optional[str]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(os.environ.get("IMMUTORCH_BACKEND"))
        return torch.tanh(x @ x)

    w = workloads.Workload("small_ops", "tanh", "[4, 4]", fn, (torch.randn(4, 4),))
    result = harness.measure(
        w,
        backends=["python", "native"],
        reps=2,
        schema_check_reps=0,
        warmup=1,
        sample_s=0.001,
        rng=random.Random(0),
        calibrate=False,
    )
    assert set(seen) == {None, "python", "native"}
    assert "IMMUTORCH_BACKEND" not in os.environ
    block = report.summarize(result)
    assert block["unavailable_backends"] == {}
    for r in block["variants"]:
        assert r["reps"] == 2 and len(r) > 10
    headline = report.headline_table([block]).splitlines()[-1]
    assert "n/a" not in headline and headline.count("x |") == 9
    native = [t for t in report.check_targets([block]) if t["backend"] == "native"]
    assert [t["target"] for t in native] == [
        "native: small ops: raise, scope all ≤ 1.05x",
        "native: small ops: clone, scope all ≤ 1.05x",
    ]
    assert all(t["met"] is not None for t in native)
    if importlib.util.find_spec("matplotlib") is not None:
        assert report.write_plot([block], tmp_path / "plot.svg") is None
        assert "[native]" in (tmp_path / "plot.svg").read_text(encoding="utf-8")


def test_instruction_counts_are_read_per_variant_from_the_dumps(tmp_path: Path) -> None:
    """benchmarks/instructions.py: the measured dump of each variant is the one between its
    two getppid() calls (dumps 2, 4, 6, ...), divided by the calls measured."""
    instructions = _bench("instructions")
    n = len(instructions.VARIANTS)
    # start-up, then (measured, next warm-up) per variant, then the rest of the process
    totals = [10_000]
    for i in range(n):
        totals += [3 * (1000 + 10 * i), 77]
    totals[-1] = 5
    for number, total in enumerate(totals, start=1):
        (tmp_path / f"cg.out.{number}").write_text(f"events: Ir\nsummary: {total}\n")
    (tmp_path / "cg.out").write_text("not a numbered dump")
    read = instructions.dump_totals(tmp_path, "cg.out")
    assert read == totals
    counts = instructions.per_call(read, n, 3)
    assert counts == [1000 + 10 * i for i in range(n)]
    table = instructions.table("w", counts)
    assert "+10" in table.splitlines()[3] and "1.010" in table.splitlines()[3]
    with pytest.raises(RuntimeError, match="dumps"):
        instructions.per_call(read[:3], n, 3)


def test_the_suite_benchmark_runs_a_suite_plain_and_strict(tmp_path: Path) -> None:
    """benchmarks/suite.py: the plain run passes, the strict one fails the test whose module
    writes into its input, and each run's summary and times are read back."""
    suite = _bench("suite")
    (tmp_path / "pkg_bench").mkdir()
    (tmp_path / "pkg_bench" / "__init__.py").write_text(
        "import torch\n\n\nclass Writes(torch.nn.Module):\n"
        "    def forward(self, x):\n        return x.add_(1)\n"
    )
    (tmp_path / "test_bench.py").write_text(
        "import torch\nfrom pkg_bench import Writes\n\n\n"
        "def test_writes():\n    Writes()(torch.zeros(2))\n"
    )
    args = [str(tmp_path / "test_bench.py"), "--rootdir", str(tmp_path)]
    cpu, seconds, summary = suite.run_once(suite.VARIANTS, "unguarded", "pkg_bench", args)
    assert "1 passed" in summary and cpu > 0 and seconds > 0
    _, _, summary = suite.run_once(suite.VARIANTS, "strict, python", "pkg_bench", args)
    assert "1 failed" in summary


def test_paired_timing_takes_each_ratio_within_its_pair() -> None:
    """benchmarks/native_micro.py --paired: a pair is base, variant, variant, base, and its
    ratio is the variant's two calls over the base's two, so a machine whose speed drifts
    linearly over the four calls still gives the true ratio."""
    micro = _bench("native_micro")
    now = [0.0]
    cost = {"base": 1.0, "variant": 1.5}
    slowdown = [1.0]

    def clock() -> float:
        return now[0]

    def call(kind: str) -> Callable[[], None]:
        def run() -> None:
            slowdown[0] += 0.01  # each call a little slower than the one before
            now[0] += cost[kind] * slowdown[0]

        return run

    ratios = micro.paired_ratios(call("base"), call("variant"), 4, clock=clock)
    assert len(ratios) == 4
    assert all(r == pytest.approx(1.5, rel=1e-3) for r in ratios)
    rng = random.Random(0)
    med, lo, hi = micro.median_ci([1.0, 1.1, 0.9, 1.05, 0.95] * 10, rng)
    assert med == 1.0 and lo <= med <= hi and hi - lo < 0.2
    assert set(micro.controls(lambda x: x)) == {
        "control: unguarded again",
        "control: after guard() raise",
        "control: after guard() clone",
        "control: after 600 objects",
        "control: after stdlib Python",
    }
