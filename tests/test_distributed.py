"""Distributed training under guards: 2 gloo processes on CPU (loopback), DDP and FSDP2.

One run of ``distributed_worker.py`` trains several scenarios, each guarded and against an
unguarded oracle from the same start, and writes what it saw per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

WORLD = 2
WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Through both every-op backends: the workers are one run per backend (a module fixture, so
# the conftest's per-test backend parameter cannot reach them).
@pytest.fixture(scope="module", params=["python", "native"])
def results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    backend: str = request.param
    if backend == "native":
        from immutorch._backends import native

        if not native.available():
            pytest.skip(f"native backend unavailable: {native.unavailable_reason()}")
    out = tmp_path_factory.mktemp(f"ddp-{backend}")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(WORLD), str(_free_port()), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "IMMUTORCH_BACKEND": backend},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize(
    "scenario",
    [
        "guard_allow_opt",  # with guard(mode="raise", allow=opt): DDP step with Adam
        "guard_sgd",  # with guard(mode="raise"): SGD keeps no state, nothing to allow
        "guard_clone",  # with guard(mode="clone", allow=opt)
        "watch_net",  # strict mode's module watch on the model DDP wraps
        "fsdp2_guard_allow_opt",  # fully_shard on a submodule and the root
        "fsdp2_guard_clone",
    ],
)
def test_training_step_refuses_nothing_on_framework_state(results, scenario):
    for rank in results:
        got = rank[scenario]
        if "skipped" in got:
            pytest.skip(got["skipped"])
        assert got["error"] is None, f"rank {rank['rank']}: {got['error']}"
        assert got["same_state"], "the guarded run must train exactly as the unguarded one"
        assert got["inputs_untouched"]


def test_optimizer_state_from_before_the_block_is_named_with_its_exemption(results):
    for rank in results:
        error = rank["guard_adam_no_allow"]["error"]
        assert error.startswith("ImmutableTensorError")
        assert "optimizer `opt` (Adam" in error
        assert "guard(..., allow=opt)" in error


def test_a_collective_writing_a_protected_tensor_is_refused_before_it_runs(results):
    for rank in results:
        got = rank["collective"]
        assert got["error"] is not None and got["error"].startswith("ImmutableTensorError")
        assert "c10d::allreduce_" in got["error"]
        assert got["untouched"]
