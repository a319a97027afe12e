"""torch.distributed collectives write their tensors without an ``(a!)`` in the c10d schema;
immutorch reads those writes from ``_schema._UNDECLARED`` and refuses them before the collective.

One process: a gloo group of one, in this process. Two processes: ``_collective_worker.py`` on
loopback, each rank bounded by a process-group timeout and a subprocess timeout, so a rank
waiting for a refused peer fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from immutorch import ImmutableTensorError, MutationWarning, guard

pytestmark = pytest.mark.both_backends

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_collective_worker.py"
ROOT = HERE.parent
PAIR_TIMEOUT_S = 120  # both ranks, torch import included, on a loaded 2-core machine


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{store}")
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_collectives_reach_a_python_dispatch_mode(world_of_one: None) -> None:
    x = torch.ones(3)
    with _Record() as rec:
        dist.all_reduce(x)
        dist.broadcast(x, 0)
        dist.all_gather([torch.zeros(3)], x)
    assert [op for op in rec.ops if op.startswith("c10d.")] == [
        "c10d.allreduce_.default",
        "c10d.broadcast_.default",
        "c10d.allgather_.default",
    ]


def test_all_reduce_of_a_guarded_tensor_is_refused(world_of_one: None) -> None:
    x = torch.arange(3.0)
    with pytest.raises(ImmutableTensorError, match=r"c10d::allreduce_ .*argument `tensors`"):
        with guard(x):
            dist.all_reduce(x)
    assert torch.equal(x, torch.arange(3.0))


def test_all_gather_into_a_guarded_output_is_refused(world_of_one: None) -> None:
    out = [torch.full((3,), -7.0)]
    with pytest.raises(ImmutableTensorError, match=r"c10d::allgather_ .*`output_tensors`"):
        with guard(out[0]):
            dist.all_gather(out, torch.arange(3.0))
    assert torch.equal(out[0], torch.full((3,), -7.0))


def test_all_gather_only_reads_its_input(world_of_one: None) -> None:
    x, out = torch.arange(3.0), [torch.full((3,), -7.0)]
    with guard(x):
        dist.all_gather(out, x)
    assert torch.equal(out[0], x)


def test_broadcast_from_the_root_only_reads(world_of_one: None) -> None:
    x = torch.arange(3.0)
    with guard(x):
        dist.broadcast(x, 0)
    assert torch.equal(x, torch.arange(3.0))


def test_warn_mode_lets_the_collective_write(world_of_one: None) -> None:
    x, oracle = torch.arange(3.0), torch.arange(3.0)
    dist.all_reduce(oracle)
    with pytest.warns(MutationWarning, match="c10d::allreduce_"):
        with guard(x, mode="warn"):
            dist.all_reduce(x)
    assert torch.equal(x, oracle)


def test_a_collective_on_an_unguarded_tensor_goes_through(world_of_one: None) -> None:
    x, y = torch.arange(3.0), torch.arange(3.0)
    with guard(x):
        dist.all_reduce(y)
    assert torch.equal(x, torch.arange(3.0))


def _run_pair(
    scenario: str, tmp_path: Path, *, may_block: int | None = None, timeout: float = 0
) -> list[dict[str, Any]]:
    """Run both ranks; each prints its result. A rank named by ``may_block`` that is still
    running after ``timeout`` seconds is killed and reported as ``{"blocked": True}``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(rank), "2", str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    results: list[dict[str, Any]] = []
    for rank, proc in enumerate(procs):
        limit = timeout if rank == may_block and timeout else PAIR_TIMEOUT_S
        try:
            stdout, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            if rank == may_block:
                proc.kill()
                proc.communicate()  # reap it and close its pipes
                results.append({"blocked": True})
                continue
            for p in procs:
                p.kill()
                p.communicate()
            pytest.fail(f"rank {rank} of {scenario!r} still running after {limit} s")
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert lines, f"rank {rank} gave no result (exit {proc.returncode}):\n{stderr[-3000:]}"
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results


def test_two_ranks_refuse_before_the_collective_and_stay_in_step(tmp_path: Path) -> None:
    for rank, steps in enumerate(_run_pair("symmetric", tmp_path)):
        step = steps["all_reduce_raise"]
        assert step["error"].startswith("ImmutableTensorError: immutorch: c10d::allreduce_")
        assert step["after"] == [step["before"]], f"rank {rank}: bytes changed"
        # Neither rank entered the refused all_reduce: the next one pairs up and sums right.
        assert steps["in_step_after_refusal"]["after"] == [step["oracle"]]

        step = steps["all_reduce_warn"]
        assert (step["error"], step["warnings"]) == (None, 1)
        assert step["after"] == [step["oracle"]], f"rank {rank}: warn mode changed the result"

        step = steps["unprotected"]
        assert (step["error"], step["warnings"]) == (None, 0)
        assert step["after"] == step["oracle"]

        step = steps["all_gather_raise"]
        assert step["error"].startswith("ImmutableTensorError: immutorch: c10d::allgather_")
        assert step["after"] == [[-7.0] * 4, [-7.0] * 4]
        assert steps["all_gather_input_guarded"]["error"] is None

        # gloo's reduce leaves partial sums in the non-root's tensor: refused on both ranks.
        step = steps["reduce_raise"]
        assert step["error"].startswith("ImmutableTensorError: immutorch: c10d::reduce_")
        before = [float(v) for v in range(10 * (rank + 1), 10 * (rank + 1) + 4)]
        assert step["after"] == [before]
        assert step["oracle"] != before  # unguarded, even the non-root's tensor changes

        step = steps["broadcast_guarded_root"]
        assert step["error"] is None
        assert step["after"] == [step["oracle"]]


def test_a_rank_whose_peer_refuses_times_out_instead_of_hanging(tmp_path: Path) -> None:
    # Protection is per process: if only rank 1 protects x, only rank 1 refuses, and rank 0,
    # already inside all_reduce, waits for a peer that never comes until the process group's
    # timeout (3 s here; 30 min by default for gloo) and then raises: no hang, but a failed
    # step on a rank that protected nothing.
    # On torch 2.4's gloo, rank 0 blocks past that timeout: the test then ends it itself.
    rank0, rank1 = _run_pair("one_rank_refuses", tmp_path, may_block=0, timeout=60)
    assert rank1["all_reduce"]["error"].startswith("ImmutableTensorError")
    assert rank1["all_reduce"]["after"] == [[20.0, 21.0, 22.0, 23.0]]
    if rank0.get("blocked"):
        return
    assert rank0["all_reduce"]["error"].startswith("RuntimeError")
    # Timed out while rank 1 stays connected (as here); "Connection closed by peer" if it exits.
    assert re.search("Timed out|Connection closed by peer", rank0["all_reduce"]["error"])
