"""What is written: Markdown tables, the targets, ``results.json`` and the plot.

A :class:`harness.Result` becomes a *block* (:func:`summarize`): a plain dict, as it is stored in
the JSON, with one row per case. The table columns:

- ``median ms``: the median over repetitions of the wall-clock time per call.
- ``x unguarded [IQR]``: the median (and interquartile range) of the per-repetition ratios to the
  unguarded call, measured side by side in the same repetition.
- ``x (CPU time)``: the same ratio of this process's CPU time per call.
- ``µs/op over unguarded`` / ``over floor``: the median time over the unguarded call's, or over
  the empty Python mode's, divided by the aten ops the unguarded call dispatches.
- ``copied/call``: what clone mode copied (``immutorch.clone_stats()``), or what the up-front
  clones allocate; ``peak alloc``: the high-water mark of torch CPU allocations during one call.

A backend that did not run shows as ``n/a``: in the headline table, in the targets, and in a
line under the workload's table that says why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch.utils.benchmark import Compare, Measurement

from .harness import BACKENDS, Result

Block = dict[str, Any]


# -- rows ------------------------------------------------------------------------------------


def _quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def summarize(result: Result) -> Block:
    """The JSON block of one workload at one thread count."""
    w, ops = result.workload, result.ops_per_call
    by_key = {(c.key, c.backend): c for c in result.cases}
    t_ref = statistics.median(by_key["unguarded", None].times)
    t_floor = statistics.median(by_key["empty_mode", None].times)
    rows = []
    for c in result.cases:
        q1, med, q3 = _quantiles(c.times)
        r1, rmed, r3 = _quantiles(c.ratios)
        c1, cmed, c3 = _quantiles(c.cpu_ratios)
        rows.append(
            {
                "key": c.key,
                "backend": c.backend,
                "label": c.label,
                "reps": len(c.times),
                "calls_per_sample": c.number,
                "median_s": med,
                "q1_s": q1,
                "q3_s": q3,
                "ratio": rmed,
                "ratio_q1": r1,
                "ratio_q3": r3,
                "cpu_median_s": statistics.median(c.cpu_times),
                "cpu_ratio": cmed,
                "cpu_ratio_q1": c1,
                "cpu_ratio_q3": c3,
                "us_per_op_over_unguarded": (med - t_ref) / ops * 1e6 if ops else None,
                "us_per_op_over_floor": (med - t_floor) / ops * 1e6 if ops else None,
                "bytes_copied_per_call": c.bytes_copied_per_call,
                "peak_alloc_bytes": c.peak_alloc_bytes,
                "note": c.note,
            }
        )
    notes = [w.note] if w.note else []
    if result.schema_check_reps and any(c.key == "schema_check" for c in result.cases):
        reps = len(by_key["unguarded", None].times)
        notes.append(
            f"SchemaCheckMode ran {result.schema_check_reps} of {reps} repetitions: it clones "
            "every input of every op."
        )
    notes.extend(f"Backend {b}: n/a ({why})." for b, why in result.unavailable.items())
    notes.extend(check_line(c) for c in result.checks)
    return {
        "key": w.key,
        "title": w.title,
        "shape": w.shape,
        "threads": result.threads,
        "grad": w.grad,
        "ops_per_call": ops,
        "input_bytes": w.inputs[0].untyped_storage().nbytes(),
        "variants": rows,
        "unavailable_backends": result.unavailable,
        "notes": notes,
        "checks": result.checks,
    }


def check_line(c: dict[str, Any]) -> str:
    return (
        f"Check {c['variant']} ({c['backend']} backend): output bit-identical to unguarded: "
        f"{'yes' if c['bit_identical'] else 'NO'}; caller's inputs unchanged: "
        f"{'yes' if c['inputs_unchanged'] else 'NO'}; {c['copies']} cop"
        f"{'y' if c['copies'] == 1 else 'ies'}, {c['bytes_copied']} B (one copy of the written "
        f"input is {c['one_copy_bytes']} B): {'ok' if c['ok'] else 'NOT OK'}."
    )


def find_row(block: Block, key: str, backend: Optional[str]) -> Optional[dict[str, Any]]:
    """The row of variant ``key`` on ``backend`` (a backend-independent row serves any)."""
    rows: list[dict[str, Any]] = block["variants"]
    for r in rows:
        if r["key"] == key and r["backend"] in (backend, None):
            return r
    return None


# -- tables ----------------------------------------------------------------------------------


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def markdown_table(block: Block, quick: bool) -> str:
    head = (
        f"**{block['title']}** {block['shape']}, {_threads(block['threads'])}, "
        f"{block['ops_per_call']} aten ops/call"
    )
    lines = [
        head,
        "",
        "| variant | backend | median ms | x unguarded [IQR] | x (CPU time) "
        "| µs/op over unguarded | µs/op over floor | copied/call | peak alloc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in block["variants"]:
        label = r["label"] + (f" ({r['note']})" if r["note"] else "")
        ratio = f"{r['ratio']:.3f} [{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}]"
        cpu = f"{r['cpu_ratio']:.3f}"
        if r["key"] == "unguarded":
            ratio = cpu = "1.000"
        lines.append(
            f"| {label} | {r['backend'] or '-'} | {r['median_s'] * 1e3:.2f} | {ratio} | {cpu} "
            f"| {r['us_per_op_over_unguarded']:+.2f} | {r['us_per_op_over_floor']:+.2f} "
            f"| {_human_bytes(r['bytes_copied_per_call'])} "
            f"| {_human_bytes(r['peak_alloc_bytes'])} |"
        )
    for note in block["notes"]:
        lines.append(f"\n{note}")
    if quick:
        lines.append("\n(--quick: tiny sizes and 2 repetitions; these times mean nothing.)")
    return "\n".join(lines)


# The guarded variants the headline compares across backends, with their column names.
HEADLINE = (
    ("guard_block", "guard()"),
    ("guard_clone", "guard(clone)"),
    ("raise_all", "raise all"),
    ("raise", "raise arguments"),
)


def headline_table(blocks: Sequence[Block], backends: Sequence[str] = BACKENDS) -> str:
    """One row per workload and thread count: the unguarded time, then each headline variant's
    median ratio to it (wall clock) on each backend, n/a where a backend did not run. The
    variants: ``guard()`` and ``guard(mode='clone')`` (scope all, naming the workload's protected
    inputs if it has some), and ``immutable_inputs(mode='raise')`` in scope all and arguments."""
    cols = [f"{name} {b}" for _, name in HEADLINE for b in backends]
    lines = [
        "| workload | threads | unguarded ms | empty Python mode | " + " | ".join(cols) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(cols),
    ]
    for block in blocks:
        ref = find_row(block, "unguarded", None)
        floor = find_row(block, "empty_mode", None)
        assert ref is not None and floor is not None
        cells = []
        for key, _ in HEADLINE:
            for b in backends:
                row = find_row(block, key, b)
                cells.append("n/a" if row is None else f"{row['ratio']:.2f}x")
        lines.append(
            f"| {block['key']} {block['shape']} | {block['threads']} "
            f"| {ref['median_s'] * 1e3:.2f} | {floor['ratio']:.2f}x | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def compare_text(measurements: Sequence[Measurement]) -> str:
    """Every sample's time, as ``torch.utils.benchmark.Compare`` lays them out: a table per
    workload, a row per variant and thread count, a column per backend ("-": no backend)."""
    compare = Compare(Measurement.merge(list(measurements)))
    compare.trim_significant_figures()
    return str(compare)


# -- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A target, reported as met or not (never asserted). ``value`` is ``what`` of ``variant``'s
    row on ``backend``; it must be ≤ ``limit``, or ≤ the same quantity of the ``versus``
    variant measured in the same run, or == the block's field ``equal_to``."""

    text: str
    workload: str
    variant: str
    what: str  # a row field: "ratio", "us_per_op_over_floor", "bytes_copied_per_call"
    limit: float = math.nan
    versus: Optional[str] = None
    equal_to: Optional[str] = None
    backend: str = "python"


def _native(text: str, workload: str, variant: str, limit: float) -> Target:
    return Target(f"native: {text}", workload, variant, "ratio", limit, backend="native")


# Issue 11's targets (scope "arguments", the decorator's default) and the earlier ones, on the
# Python backend; issue 16's, on the native backend.
TARGETS: list[Target] = [
    Target("encoder: raise ≤ 1.03x unguarded", "encoder", "raise", "ratio", 1.03),
    Target("encoder: clone ≤ 1.03x unguarded", "encoder", "clone", "ratio", 1.03),
    Target(
        "encoder: guard(mode='clone', scope='arguments') ≤ 1.03x unguarded",
        "encoder",
        "guard_clone_scoped",
        "ratio",
        1.03,
    ),
    Target("encoder: off ≤ 1.005x unguarded", "encoder", "off", "ratio", 1.005),
    Target("unrelated ops: raise ≤ 1.01x unguarded", "unrelated_ops", "raise", "ratio", 1.01),
    Target(
        "reading ops: raise ≤ raise with scope='all'",
        "reading_ops",
        "raise",
        "ratio",
        versus="raise_all",
    ),
    Target(
        "small ops: raise within 1 µs/op of floor",
        "small_ops",
        "raise",
        "us_per_op_over_floor",
        1.0,
    ),
    Target("encoder: clone copies 0 B (read-only)", "encoder", "clone", "bytes_copied_per_call", 0),
    Target(
        "normalizer: clone copies 0 B (fixed)",
        "normalizer",
        "clone",
        "bytes_copied_per_call",
        0,
    ),
    Target(
        "encoder: legacy clone copies one mel",
        "encoder",
        "legacy_clone",
        "bytes_copied_per_call",
        equal_to="input_bytes",
    ),
    _native("small ops: raise, scope all ≤ 1.05x", "small_ops", "raise_all", 1.05),
    _native("small ops: clone, scope all ≤ 1.05x", "small_ops", "clone_all", 1.05),
    _native("train step: guard() ≤ 1.05x", "encoder_train_step", "guard_block", 1.05),
    _native("train step: guard(mode='clone') ≤ 1.05x", "encoder_train_step", "guard_clone", 1.05),
    _native("encoder: raise, scope all ≤ 1.03x", "encoder", "raise_all", 1.03),
    _native("encoder: clone, scope all ≤ 1.03x", "encoder", "clone_all", 1.03),
    _native("encoder: guard() ≤ 1.03x", "encoder", "guard_block", 1.03),
    _native("encoder: guard(mode='clone') ≤ 1.03x", "encoder", "guard_clone", 1.03),
]


def check_targets(blocks: Sequence[Block]) -> list[dict[str, Any]]:
    """Each target on each block it names; ``met`` is None where its backend did not run."""
    out = []
    for block in blocks:
        for t in TARGETS:
            if block["key"] != t.workload:
                continue
            row = find_row(block, t.variant, t.backend)
            if row is None and t.backend not in block["unavailable_backends"]:
                continue  # a variant this workload does not have
            value = None if row is None else row[t.what]
            if t.equal_to is not None:
                limit, relation = block[t.equal_to], "=="
            elif t.versus is not None:
                other = find_row(block, t.versus, t.backend)
                if other is None:
                    continue
                limit, relation = other[t.what], "<="
            else:
                limit, relation = t.limit, "<="
            met = None
            if value is not None:
                met = value == limit if relation == "==" else value <= limit
            out.append(
                {
                    "target": t.text,
                    "backend": t.backend,
                    "threads": block["threads"],
                    "what": t.what,
                    "measured": value,
                    "relation": relation,
                    "limit": limit,
                    "versus": t.versus,
                    "met": met,
                }
            )
    return out


def _shown(what: str, v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    if what == "bytes_copied_per_call":
        return f"{v:.0f} B"
    if what.startswith("us_per_op"):
        return f"{v:+.2f} µs/op"
    return f"{v:.3f}x"


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | threads | measured | limit | met |", "|---|---:|---:|---:|:---:|"]
    for t in targets:
        limit = ("= " if t["relation"] == "==" else "≤ ") + _shown(t["what"], t["limit"])
        if t["versus"]:
            limit += f" ({t['versus']})"
        met = "n/a" if t["met"] is None else "yes" if t["met"] else "NO"
        lines.append(
            f"| {t['target']} | {t['threads']} | {_shown(t['what'], t['measured'])} | {limit} "
            f"| {met} |"
        )
    return "\n".join(lines)


# -- the plot --------------------------------------------------------------------------------


def write_plot(blocks: Sequence[Block], path: Path) -> Optional[str]:
    """One panel per workload, a bar per row and thread count (hatched: the native backend), the
    ratio to unguarded on a log axis; written with matplotlib (the ``bench`` extra). Returns why
    it was not written, or None when it was."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"

    if not blocks:
        return "nothing was measured"
    panels: dict[str, list[Block]] = {}
    for block in blocks:
        panels.setdefault(block["key"], []).append(block)
    ratios = [r["ratio"] for b in blocks for r in b["variants"]]
    lo, hi = min(0.8, min(ratios) * 0.9), max(2.0, max(ratios) * 1.4)
    rows_of = {key: group[0]["variants"] for key, group in panels.items()}
    # In units of one bar: a bar per row and thread count, and room for the panel's title.
    heights = [len(rows_of[key]) * len(group) + 3 for key, group in panels.items()]
    # Text stays text in the SVG, and its ids do not change from run to run.
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "immutorch", "font.size": 8}):
        fig, axes = plt.subplots(
            len(panels),
            1,
            figsize=(11, 0.11 * sum(heights) + 0.6),
            gridspec_kw={"height_ratios": heights},
            squeeze=False,
        )
        bar = 0.8
        for ax, (key, group) in zip(axes[:, 0], panels.items()):
            rows = rows_of[key]
            names = [r["label"] + (f" [{r['backend']}]" if r["backend"] else "") for r in rows]
            for i, block in enumerate(group):
                height = bar / len(group)
                ys = [j - bar / 2 + height * (i + 0.5) for j in range(len(rows))]
                values = []
                for r in rows:
                    same = find_row(block, r["key"], r["backend"])
                    values.append(same["ratio"] if same is not None else math.nan)
                widths = [v - lo for v in values]
                bars = ax.barh(ys, widths, height=height, left=lo, label=_threads(block["threads"]))
                for patch, r in zip(bars, rows):
                    if r["backend"] == "native":  # the backends apart at a glance
                        patch.set_hatch("///")
                for y, v in zip(ys, values):
                    if not math.isnan(v):
                        ax.text(v * 1.02, y, f"{v:.2f}x", va="center", fontsize=6)
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            ax.axvline(1.0, color="#555", linewidth=0.8)
            ax.set_yticks(range(len(rows)), names)
            ax.invert_yaxis()
            ax.annotate(  # from the figure's left edge: the row labels take the axes' left
                f"{group[0]['title']} {group[0]['shape']}",
                xy=(0, 1),
                xycoords=("figure fraction", "axes fraction"),
                xytext=(6, 4),
                textcoords="offset points",
                fontsize=9,
                fontweight="bold",
            )
            ax.grid(axis="x", which="both", linestyle=":", linewidth=0.5)
        axes[0, 0].legend(loc="upper right")
        axes[-1, 0].set_xlabel(
            "time per call ÷ unguarded (log scale, median of paired repetitions)"
        )
        fig.tight_layout()
        fig.savefig(path, metadata={"Date": None})
        plt.close(fig)
    return None
