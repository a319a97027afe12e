"""Find operators that write an argument their schema does not mark as written.

immutorch decides what an op writes from its schema (``_schema.py``); a write the schema does
not declare goes through unless ``_schema._UNDECLARED`` lists it. This audit runs PyTorch's own
operator samples (every ``OpInfo`` in ``op_db``, float32 on CPU) and the ``torch.distributed``
collectives (a gloo group of processes on loopback) under a recording dispatch mode that copies
the bytes, size, strides and storage of each tensor argument before each aten/c10d op and
compares them after. A change in an argument that the schema does not mark ``(a!)``, and that
does not share memory with one it does mark (a view of the ``out=`` tensor), is an undeclared
write. Each one is checked against ``_UNDECLARED`` through the same ``written_values`` the mode
uses, so "in the table" means "the mode refuses it".

Run ``python -m immutorch schema-audit`` after a torch upgrade: exit status 1 when it finds a
write the table lacks. The version counter is not compared: undeclared writes have no
ADInplaceOrView kernel, so it does not move for them.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Callable, NamedTuple, Optional, TextIO

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ._schema import _UNDECLARED, iter_tensors, op_facts, written_values

IN_TABLE = "in table"
NEW = "NEW"


class Write(NamedTuple):
    """One undeclared write: an op overload changed an argument its schema does not declare."""

    op: str  # the overload, e.g. "aten::native_batch_norm" or "c10d::allreduce_"
    argument: str
    kind: str  # "data" (bytes changed) or "meta" (size, strides, offset or storage changed)
    status: str  # IN_TABLE (the mode refuses it) or NEW
    example: str  # the first sample that showed it


class _Before(NamedTuple):
    position: int
    name: str
    tensor: torch.Tensor
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    storage: int  # the storage's data_ptr: its identity for the length of one op call


def _overload_name(func: Any) -> str:
    schema = func._schema
    return f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``t`` as uint8: NaN-safe, and it sees writes outside the view."""
    storage = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        storage, 0, (storage.nbytes(),), (1,)
    )


def _plain(t: Any) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.layout is torch.strided
        and t.device.type != "meta"
    )


class WriteRecorder(TorchDispatchMode):
    """Snapshots each op's tensor arguments, runs it, and records undeclared changes.

    Ops that run inside an op (a composite's kernels) are not seen one by one: a write is
    charged to the outermost op the mode saw, which is the one the schema must declare.

    Example::

        >>> import torch
        >>> from immutorch._schema_audit import WriteRecorder
        >>> mean, var = torch.zeros(2), torch.ones(2)
        >>> with WriteRecorder() as rec:
        ...     _ = torch.nn.functional.batch_norm(torch.randn(4, 2), mean, var, training=True)
        >>> sorted((w.op, w.argument) for w in rec.writes.values())
        [('aten::native_batch_norm', 'running_mean'), ('aten::native_batch_norm', 'running_var')]
    """

    def __init__(self, label: str = "") -> None:
        super().__init__()
        self.label = label
        self.writes: dict[tuple[str, str, str], Write] = {}
        self.ops_seen: set[str] = set()
        # Collectives return a Work before their bytes land; the torch.distributed call waits
        # on it after the op returns (waiting inside the mode deadlocks send/recv on gloo), so
        # their comparison is made when the recorder exits.
        self._pending: list[tuple[Any, tuple[Any, ...], dict[str, Any], list[Any], Any]] = []

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        pending, self._pending = self._pending, []
        for func, args, kwargs, before, saved in pending:
            self._compare(func, args, kwargs, before, saved)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Optional[dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        schema = func._schema
        before: list[_Before] = []
        saved: dict[int, torch.Tensor] = {}
        for position, argument in enumerate(schema.arguments):
            value = args[position] if position < len(args) else kwargs.get(argument.name)

            def take(t: torch.Tensor, position: int = position, name: str = argument.name) -> None:
                if not _plain(t):
                    return
                storage = t.untyped_storage().data_ptr()
                before.append(
                    _Before(
                        position,
                        name,
                        t,
                        tuple(t.shape),
                        tuple(t.stride()),
                        int(t.storage_offset()),
                        storage,
                    )
                )
                if storage not in saved:
                    saved[storage] = _storage_bytes(t).clone()

            iter_tensors(value, take)
        out = func(*args, **kwargs)
        self.ops_seen.add(_overload_name(func))
        if schema.name.startswith("c10d::"):
            self._pending.append((func, args, kwargs, before, saved))
        else:
            self._compare(func, args, kwargs, before, saved)
        return out

    def _compare(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        before: list[_Before],
        saved: dict[int, torch.Tensor],
    ) -> None:
        changed: list[tuple[_Before, str]] = []
        for b in before:
            t = b.tensor
            if (
                tuple(t.shape) != b.shape
                or tuple(t.stride()) != b.strides
                or t.storage_offset() != b.offset
                or t.untyped_storage().data_ptr() != b.storage
            ):
                changed.append((b, "meta"))
            elif not torch.equal(_storage_bytes(t), saved[b.storage]):
                changed.append((b, "data"))
        if changed:
            self._judge(func, args, kwargs, before, changed)

    def _judge(
        self,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        before: list[_Before],
        changed: list[tuple[_Before, str]],
    ) -> None:
        arguments = func._schema.arguments
        declared = {
            i for i, a in enumerate(arguments) if a.alias_info is not None and a.alias_info.is_write
        }
        # Memory shared with a declared-written argument (a view of out=, x.add_(x)) may change.
        declared_storages = {b.storage for b in before if b.position in declared}
        # What the mode would refuse: declared writes plus the _UNDECLARED table, as it reads them.
        refused = {w.position for w, _ in written_values(op_facts(func), args, kwargs)}
        op = _overload_name(func)
        for b, kind in changed:
            if b.position in declared:
                continue
            # Metadata belongs to the tensor object: only a write to the object itself changes it.
            if kind == "data" and b.storage in declared_storages:
                continue
            status = IN_TABLE if b.position in refused else NEW
            key = (op, b.name, kind)
            if key not in self.writes:
                self.writes[key] = Write(op, b.name, kind, status, self.label)


class Coverage(NamedTuple):
    """What one part of the audit ran."""

    targets: int  # OpInfos (or collectives) run
    skipped: int  # OpInfos without float32 on CPU
    samples: int  # calls made
    failed: int  # calls that raised (bad sample for this variant, unsupported on gloo ...)
    timed_out: int
    errors: dict[str, int]  # exception type -> count
    # The first failure of each call that failed: "<variant><OpInfo> sample i" -> message.
    failures: dict[str, str]


class _SampleTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_box(seconds: float) -> Iterator[None]:
    """Interrupt a sample that runs longer than ``seconds`` (main thread only, between ops)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _SampleTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _load_op_db() -> list[Any]:
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except ImportError as exc:  # it imports expecttest, a test-only dependency of torch
        raise SystemExit(
            f"immutorch schema-audit: cannot import PyTorch's op_db ({exc}); "
            "`pip install expecttest` and retry."
        ) from exc
    return list(op_db)


def _selected(opinfo: Any, patterns: Sequence[str]) -> bool:
    if not patterns:
        return True
    names = {opinfo.name, opinfo.full_name if hasattr(opinfo, "full_name") else opinfo.name}
    return any(fnmatch.fnmatch(n, p) for n in names for p in patterns)


def audit_opinfos(
    recorder: WriteRecorder,
    patterns: Sequence[str] = (),
    *,
    requires_grad: Sequence[bool] = (False,),
    max_samples: int = 0,
    timeout: float = 10.0,
    progress: Optional[TextIO] = None,
) -> Coverage:
    """Run every selected OpInfo's samples (function and in-place variants) under ``recorder``."""
    targets = skipped = samples = failed = timed_out = 0
    errors: Counter[str] = Counter()
    failures: dict[str, str] = {}
    for opinfo in _load_op_db():
        if not _selected(opinfo, patterns):
            continue
        if torch.float32 not in opinfo.supported_dtypes("cpu"):
            skipped += 1
            continue
        targets += 1
        name = opinfo.name + (f".{opinfo.variant_test_name}" if opinfo.variant_test_name else "")
        if progress is not None:
            print(f"[{targets}] {name}", file=progress, flush=True)
        variants = [("", opinfo.op)]
        if opinfo.inplace_variant is not None:
            variants.append(("inplace ", opinfo.inplace_variant))
        for grad in requires_grad:
            torch.manual_seed(0)
            try:
                with _time_box(timeout), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sample_list = list(opinfo.sample_inputs("cpu", torch.float32, grad))
            except _SampleTimeout:
                timed_out += 1
                continue
            except Exception as exc:
                failed += 1
                errors[f"sample_inputs: {type(exc).__name__}"] += 1
                continue
            if max_samples:
                sample_list = sample_list[:max_samples]
            for i, sample in enumerate(sample_list):
                for variant, fn in variants:
                    if variant and grad:
                        continue  # in-place on a leaf that requires grad only raises
                    samples += 1
                    recorder.label = f"{variant}{name} sample {i}" + (" (grad)" if grad else "")
                    try:
                        with _time_box(timeout), warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            with recorder:
                                fn(sample.input, *sample.args, **sample.kwargs)
                    except _SampleTimeout:
                        timed_out += 1
                    except Exception as exc:
                        failed += 1
                        errors[type(exc).__name__] += 1
                        message = (str(exc).strip().splitlines() or [""])[0][:200]
                        failures[recorder.label] = f"{type(exc).__name__}: {message}"
    return Coverage(targets, skipped, samples, failed, timed_out, dict(errors), failures)


# -- the collectives: each rank runs this list under a recorder and reports back as JSON --

COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "scatter",
    "gather",
    "send_recv",
    "recv_any_source",
    "barrier",
    "monitored_barrier",
)


def _collective_call(name: str, rank: int, world: int) -> Callable[[], Any]:
    import torch.distributed as dist

    # Rank-dependent inputs and outputs filled with a sentinel, so every real write shows.
    x = torch.arange(4.0) + 10 * (rank + 1)

    def sentinel(n: int = 4) -> torch.Tensor:
        return torch.full((n,), -7.0)

    calls: dict[str, Callable[[], Any]] = {
        "all_reduce": lambda: dist.all_reduce(x),
        "all_reduce_coalesced": lambda: dist.all_reduce_coalesced([x, x + 1]),
        "broadcast": lambda: dist.broadcast(x, src=0),
        "reduce": lambda: dist.reduce(x, dst=0),
        "all_gather": lambda: dist.all_gather([sentinel() for _ in range(world)], x),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(sentinel(4 * world), x),
        "reduce_scatter": lambda: dist.reduce_scatter(sentinel(), [x + i for i in range(world)]),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(
            sentinel(), torch.arange(4.0 * world) + rank
        ),
        "all_to_all": lambda: dist.all_to_all(
            [sentinel() for _ in range(world)], [x + i for i in range(world)]
        ),
        "all_to_all_single": lambda: dist.all_to_all_single(
            sentinel(4 * world), torch.arange(4.0 * world) + rank
        ),
        "scatter": lambda: dist.scatter(
            sentinel(), [x + i for i in range(world)] if rank == 0 else None, src=0
        ),
        "gather": lambda: dist.gather(
            x, [sentinel() for _ in range(world)] if rank == 0 else None, dst=0
        ),
        "barrier": lambda: dist.barrier(),
        "monitored_barrier": lambda: dist.monitored_barrier(),
    }
    if world > 1:
        # Rank 0 sends to rank 1; other ranks (world > 2) sit these two out.
        calls["send_recv"] = lambda: (
            dist.send(x, 1) if rank == 0 else dist.recv(sentinel(), 0) if rank == 1 else None
        )
        calls["recv_any_source"] = lambda: (
            dist.send(x, 1) if rank == 0 else dist.recv(sentinel()) if rank == 1 else None
        )
    return calls[name]


def _collective_child(rank: int, world: int, init_file: str, timeout: float) -> None:
    """One rank of the collective audit (run in its own process); prints a JSON report."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world,
        init_method=f"file://{init_file}",
        timeout=timedelta(seconds=timeout),
    )
    recorder = WriteRecorder()
    ran, failed, errors = [], [], {}
    try:
        for name in COLLECTIVES:
            if name in ("send_recv", "recv_any_source") and world < 2:
                continue
            call = _collective_call(name, rank, world)
            recorder.label = f"dist.{name} (rank {rank} of {world})"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with recorder:
                        call()
                ran.append(name)
            except Exception as exc:
                failed.append(name)
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        dist.destroy_process_group()
    report = {
        "ran": ran,
        "failed": failed,
        "errors": errors,
        "ops": sorted(recorder.ops_seen),
        "writes": [list(w) for w in recorder.writes.values()],
    }
    print("SCHEMA-AUDIT " + json.dumps(report), flush=True)


def audit_collectives(recorder: WriteRecorder, world: int = 2, timeout: float = 120.0) -> Coverage:
    """Run the collectives on a ``world``-process gloo group on loopback; merge what they saw.

    Each rank's findings are merged into ``recorder``. Ranks that do not finish within
    ``timeout`` seconds are killed and counted as timed out.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        code = (
            "import sys; from immutorch._schema_audit import _collective_child as c; "
            "c(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))"
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(r), str(world), init_file, str(timeout / 6)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for r in range(world)
        ]
        deadline = time.monotonic() + timeout
        reports: list[dict[str, Any]] = []
        timed_out = 0
        problems: dict[str, str] = {}
        for rank, proc in enumerate(procs):
            try:
                stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                timed_out += 1
                problems[f"rank {rank}"] = f"killed after {timeout:.0f} s"
                continue
            lines = [ln for ln in stdout.splitlines() if ln.startswith("SCHEMA-AUDIT ")]
            if not lines:
                tail = stderr.strip().splitlines()[-1:] or ["no output"]
                problems[f"rank {rank}"] = f"exit {proc.returncode}: {tail[0][:200]}"
                continue
            reports.append(json.loads(lines[-1][len("SCHEMA-AUDIT ") :]))
    ran: set[str] = set()
    failed: set[str] = set()
    for report in reports:
        ran.update(report["ran"])
        failed.update(report["failed"])
        problems.update(report["errors"])
        recorder.ops_seen.update(report["ops"])
        for fields in report["writes"]:
            w = Write(*fields)
            recorder.writes.setdefault((w.op, w.argument, w.kind), w)
    ran -= failed  # a collective that failed on any rank counts as failed
    errors = {f"dist.{k} ({v.split(':')[0]})": 1 for k, v in problems.items() if k in failed}
    errors.update({f"{k}: {v}": 1 for k, v in problems.items() if k.startswith("rank ")})
    return Coverage(
        len(ran | failed), 0, len(ran | failed), len(failed), timed_out, errors, problems
    )


# -- the report --


def missing_from_table(writes: Sequence[Write]) -> list[Write]:
    return [w for w in writes if w.status == NEW]


def _table_entries() -> list[tuple[str, str]]:
    return sorted((op, w.name) for op, entries in _UNDECLARED.items() for w in entries)


def _schema_name(op: str) -> str:
    return op.split(".", 1)[0]


def stale_table_entries() -> list[str]:
    """Table entries whose schema no longer has the named argument at that position.

    A torch release that reorders or renames an argument would otherwise make the mode check
    the wrong one, silently; an op that no longer exists is only reported.
    """
    import torch.distributed  # registers the c10d schemas

    schemas: dict[str, list[Any]] = {}
    for schema in torch._C._jit_get_all_schemas():
        schemas.setdefault(schema.name, []).append(schema)
    problems = []
    for op, entries in sorted(_UNDECLARED.items()):
        if op not in schemas:
            problems.append(f"{op}: no such operator in this torch (kept for other builds)")
            continue
        for schema in schemas[op]:
            names = [a.name for a in schema.arguments]
            for w in entries:
                expected = [(w.position, w.name)]
                if w.when is not None:
                    expected.append((w.when, "training"))
                if w.root is not None:
                    expected += [(w.root.group, "process_group"), (w.root.root, "root_rank")]
                for position, name in expected:
                    if position >= len(names) or names[position] != name:
                        overload = f"{op}.{schema.overload_name}".rstrip(".")
                        problems.append(f"{overload}: argument {position} is not `{name}`")
    return problems


def report(
    writes: Sequence[Write],
    parts: Sequence[tuple[str, Coverage]],
    ops_seen: set[str],
    seconds: float,
    out: TextIO,
) -> int:
    """Print what was covered and found; return 1 if a write is missing from the table."""
    print(f"immutorch schema-audit on torch {torch.__version__} ({seconds:.0f} s)", file=out)
    for title, c in parts:
        skipped = f" ({c.skipped} skipped: no float32 on CPU)" if c.skipped else ""
        print(
            f"  {title}: {c.targets} run{skipped}, "
            f"{c.samples} calls, {c.failed} failed, {c.timed_out} timed out",
            file=out,
        )
        if c.errors:
            top = ", ".join(f"{k} {v}" for k, v in sorted(c.errors.items(), key=lambda kv: -kv[1]))
            print(f"    failures by type: {top}", file=out)
    print(f"  distinct op overloads dispatched: {len(ops_seen)}", file=out)
    print("", file=out)
    if writes:
        rows = [("op", "argument", "kind", "table", "first seen in")]
        rows += [(w.op, w.argument, w.kind, w.status, w.example) for w in writes]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        print("Writes the schemas do not declare:", file=out)
        for r in rows:
            cells = [c.ljust(n) for c, n in zip(r[:4], widths)]
            print("  " + "  ".join([*cells, r[4]]), file=out)
    else:
        print("No undeclared writes found.", file=out)
    found = {(_schema_name(w.op), w.argument) for w in writes}
    seen = {_schema_name(op) for op in ops_seen}
    entries = _table_entries()
    unconfirmed = [f"{op} {arg}" for op, arg in entries if op in seen and (op, arg) not in found]
    not_run = sorted({op for op, _ in entries if op not in seen})
    if unconfirmed:
        print("\nTable entries whose op ran but did not write them here:", file=out)
        for line in unconfirmed:
            print(f"  {line}", file=out)
    if not_run:
        print(f"\nTable entries whose op did not run: {', '.join(not_run)}", file=out)
    stale = stale_table_entries()
    moved = [line for line in stale if "no such operator" not in line]
    if stale:
        print("\nTable entries that do not match this torch's schemas:", file=out)
        for line in stale:
            print(f"  {line}", file=out)
    new = missing_from_table(writes)
    if new:
        print(
            f"\n{len(new)} undeclared write(s) missing from immutorch._schema._UNDECLARED: "
            "the mode lets them through. Add them to the table.",
            file=out,
        )
        return 1
    if moved:
        print(f"\n{len(moved)} table entry(ies) point at the wrong argument: fix them.", file=out)
        return 1
    print(f"\nEvery undeclared write found ({len(writes)}) is in the table.", file=out)
    return 0


def run(args: argparse.Namespace, out: TextIO) -> int:
    """Run the audit the parsed ``args`` ask for; print the report; return the exit status."""
    start = time.perf_counter()
    recorder = WriteRecorder()
    parts: list[tuple[str, Coverage]] = []
    if not args.no_opinfo:
        grads = (False, True) if args.grad else (False,)
        coverage = audit_opinfos(
            recorder,
            args.ops,
            requires_grad=grads,
            max_samples=args.max_samples,
            timeout=args.timeout,
            progress=sys.stderr if args.progress else None,
        )
        parts.append(("op_db OpInfos (float32, CPU)", coverage))
    if not args.no_collectives:
        coverage = audit_collectives(recorder, world=args.world_size)
        parts.append((f"c10d collectives ({args.world_size}-process gloo)", coverage))
    writes = sorted(recorder.writes.values())
    return report(writes, parts, recorder.ops_seen, time.perf_counter() - start, out)
