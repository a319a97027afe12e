"""The schema audit's detector: it finds writes a schema does not declare, and only those.

The fast tests run the recorder on a handful of ops; the slow one (``--run-slow``) runs the
audit itself on a slice of op_db and the collectives on two gloo ranks.
"""

from __future__ import annotations

import doctest
import io
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from immutorch import _schema_audit
from immutorch._cli import main as cli_main
from immutorch._schema_audit import IN_TABLE, NEW, Coverage, Write, WriteRecorder

# Two ops whose schemas lie on purpose: they write their input but declare nothing.
_LIB = torch.library.Library("immutorch_audit_test", "DEF")
_LIB.define("sneaky_add(Tensor x) -> Tensor")
_LIB.define("sneaky_unsqueeze(Tensor x) -> Tensor")


def _sneaky_add(x: torch.Tensor) -> torch.Tensor:
    x.add_(1)
    return x.clone()


def _sneaky_unsqueeze(x: torch.Tensor) -> torch.Tensor:
    x.unsqueeze_(0)
    return x.clone()


_LIB.impl("sneaky_add", _sneaky_add, "CPU")
_LIB.impl("sneaky_unsqueeze", _sneaky_unsqueeze, "CPU")


def _found(recorder: WriteRecorder) -> set[tuple[str, str, str, str]]:
    return {(w.op, w.argument, w.kind, w.status) for w in recorder.writes.values()}


def test_finds_batch_norm_running_stats_and_knows_the_table_has_them() -> None:
    mean, var = torch.zeros(3), torch.ones(3)
    with WriteRecorder() as rec:
        F.batch_norm(torch.randn(4, 3), mean, var, training=True)
    assert _found(rec) == {
        ("aten::native_batch_norm", "running_mean", "data", IN_TABLE),
        ("aten::native_batch_norm", "running_var", "data", IN_TABLE),
    }


def test_batch_norm_in_eval_writes_nothing() -> None:
    with WriteRecorder() as rec:
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=False)
    assert rec.writes == {}
    assert rec.ops_seen  # it did see the op


def test_declared_writes_are_not_flagged() -> None:
    x = torch.arange(6.0)
    with WriteRecorder() as rec:
        x.add_(1)  # self is (a!)
        torch.add(x.view(2, 3), 1, out=x.view(2, 3))  # self changes through out's memory
        x.unsqueeze_(0)  # a declared metadata write
        torch.nn.functional.relu(x, inplace=True)
    assert rec.writes == {}
    assert {"aten::add_.Tensor", "aten::add.out", "aten::unsqueeze_"} <= rec.ops_seen


def test_an_undeclared_write_missing_from_the_table_is_new() -> None:
    x = torch.zeros(3)
    with WriteRecorder("demo") as rec:
        torch.ops.immutorch_audit_test.sneaky_add(x)
        torch.ops.immutorch_audit_test.sneaky_unsqueeze(torch.zeros(2))
    assert _found(rec) == {
        ("immutorch_audit_test::sneaky_add", "x", "data", NEW),
        ("immutorch_audit_test::sneaky_unsqueeze", "x", "meta", NEW),
    }
    assert {w.example for w in rec.writes.values()} == {"demo"}


def test_nan_bytes_compare_equal() -> None:
    # A NaN in an argument is not a write: the comparison is on bytes, not values.
    with WriteRecorder() as rec:
        torch.nan_to_num(torch.tensor([float("nan"), 1.0]))
    assert rec.writes == {}


@pytest.fixture
def world_of_one(tmp_path: object) -> Iterator[None]:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/s")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_finds_a_collective_write_that_the_table_lists(world_of_one: None) -> None:
    import torch.distributed as dist

    out = [torch.full((2,), -7.0)]
    with WriteRecorder() as rec:
        dist.all_gather(out, torch.arange(2.0))
    assert _found(rec) == {("c10d::allgather_", "output_tensors", "data", IN_TABLE)}


def _report(writes: list[Write]) -> tuple[int, str]:
    out = io.StringIO()
    coverage = Coverage(3, 1, 10, 2, 1, {"RuntimeError": 2}, {})
    code = _schema_audit.report(writes, [("op_db", coverage)], {"aten::add_.Tensor"}, 1.0, out)
    return code, out.getvalue()


def test_report_exits_1_on_a_write_missing_from_the_table() -> None:
    known = Write("aten::native_batch_norm", "running_mean", "data", IN_TABLE, "bn sample 0")
    new = Write("aten::foo", "x", "data", NEW, "foo sample 3")
    code, text = _report([known, new])
    assert code == 1
    assert "op_db: 3 run (1 skipped: no float32 on CPU), 10 calls, 2 failed, 1 timed out" in text
    assert "aten::foo" in text and "foo sample 3" in text
    assert "1 undeclared write(s) missing from immutorch._schema._UNDECLARED" in text
    assert _report([known])[0] == 0


def test_report_exits_1_when_a_table_entry_names_the_wrong_argument(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from immutorch import _schema

    assert _schema_audit.stale_table_entries() == []
    wrong = (_schema.WrittenArg(2, "running_mean", _schema.DATA, when=5),)
    monkeypatch.setitem(_schema._UNDECLARED, "aten::native_batch_norm", wrong)
    code, text = _report([])
    assert code == 1
    assert "aten::native_batch_norm: argument 2 is not `running_mean`" in text


def test_cli_runs_the_audit() -> None:
    out = io.StringIO()
    assert cli_main(["schema-audit", "--no-opinfo", "--no-collectives"], out=out) == 0
    assert "immutorch schema-audit on torch" in out.getvalue()


def test_recorder_docstring_example() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(WriteRecorder, "WriteRecorder", globs={}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


@pytest.mark.slow
def test_audit_on_a_slice_of_op_db_and_two_ranks() -> None:
    pytest.importorskip("expecttest")  # op_db imports it
    out = io.StringIO()
    patterns = ["nn.functional.batch_norm", "nn.functional.instance_norm", "add", "index_put"]
    code = cli_main(["schema-audit", "--ops", *patterns], out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "op_db OpInfos (float32, CPU): 4 run" in text
    assert "c10d collectives (2-process gloo): 16 run" in text
    for line in ("aten::native_batch_norm      running_mean", "c10d::allreduce_ "):
        assert line in text, text
