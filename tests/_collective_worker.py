"""One rank of a gloo group on loopback, for test_collectives.py: ``python _collective_worker.py
SCENARIO RANK WORLD INIT_FILE``. Prints one JSON line ``RESULT {...}`` with what each step saw.

Every step runs the collective unguarded on a copy first (the oracle), then on the original
under a guard, so the parent can check that a refused write left the bytes alone and a warned
one gave the oracle's answer.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

import immutorch

PG_TIMEOUT_S = 3.0  # what a rank waits for a peer that never enters the collective


def data(rank: int) -> torch.Tensor:
    return torch.arange(4.0) + 10 * (rank + 1)


def guarded(
    mode: str, protect: list[torch.Tensor], call: Callable[[], Any], original: list[torch.Tensor]
) -> dict[str, Any]:
    """Run ``call`` under ``guard(*protect, mode=mode)``; report the outcome and the bytes."""
    outcome: dict[str, Any] = {"error": None, "warnings": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # guard() with no tensors would protect everything: an empty list means no guard.
            context = immutorch.guard(*protect, mode=mode) if protect else contextlib.nullcontext()
            with context:  # type: ignore[attr-defined]
                call()
        except immutorch.ImmutableTensorError as exc:
            outcome["error"] = "ImmutableTensorError: " + str(exc).splitlines()[0]
        except RuntimeError as exc:
            outcome["error"] = "RuntimeError: " + str(exc).splitlines()[0][:200]
    outcome["warnings"] = sum(issubclass(w.category, immutorch.MutationWarning) for w in caught)
    outcome["after"] = [t.tolist() for t in original]
    return outcome


def symmetric(rank: int, world: int) -> dict[str, Any]:
    """Both ranks make the same decision, so nothing waits on a refused peer."""
    steps: dict[str, Any] = {}

    # all_reduce of a guarded tensor: refused before the collective, on both ranks.
    x = data(rank)
    oracle = x.clone()
    dist.all_reduce(oracle)
    steps["all_reduce_raise"] = guarded("raise", [x], lambda: dist.all_reduce(x), [x])
    steps["all_reduce_raise"]["before"] = data(rank).tolist()
    steps["all_reduce_raise"]["oracle"] = oracle.tolist()

    # The group is still in step: had a refused rank entered the collective, this would pair
    # with it and give the wrong sum (or hang).
    y = data(rank)
    dist.all_reduce(y)
    steps["in_step_after_refusal"] = {"after": [y.tolist()], "oracle": oracle.tolist()}

    # warn mode: the write goes ahead and gives the oracle's result, with a warning.
    x = data(rank)
    steps["all_reduce_warn"] = guarded("warn", [x], lambda: dist.all_reduce(x), [x])
    steps["all_reduce_warn"]["oracle"] = oracle.tolist()

    # A guard on x does not stop a collective on another tensor y; x is untouched.
    x, y = data(rank), data(rank)
    steps["unprotected"] = guarded("raise", [x], lambda: dist.all_reduce(y), [x, y])
    steps["unprotected"]["oracle"] = [data(rank).tolist(), oracle.tolist()]

    # all_gather into a guarded output list: refused; the input tensor is only read.
    outs = [torch.full((4,), -7.0) for _ in range(world)]
    gathered = [torch.full((4,), -7.0) for _ in range(world)]
    dist.all_gather(gathered, data(rank))
    steps["all_gather_raise"] = guarded(
        "raise", outs, lambda: dist.all_gather(outs, data(rank)), outs
    )
    steps["all_gather_raise"]["oracle"] = [t.tolist() for t in gathered]
    x = data(rank)
    steps["all_gather_input_guarded"] = guarded("raise", [x], lambda: dist.all_gather(outs, x), [x])

    # reduce writes on every rank under gloo (partial sums on non-roots): refused on both.
    x = data(rank)
    reduced = data(rank)
    dist.reduce(reduced, dst=0)
    steps["reduce_raise"] = guarded("raise", [x], lambda: dist.reduce(x, dst=0), [x])
    steps["reduce_raise"]["oracle"] = reduced.tolist()

    # broadcast from a guarded root: the root only reads, so only rank 1's guard matters;
    # rank 1 guards nothing here and receives.
    x = data(rank)
    protect = [x] if rank == 0 else []
    steps["broadcast_guarded_root"] = guarded(
        "raise", protect, lambda: dist.broadcast(x, src=0), [x]
    )
    steps["broadcast_guarded_root"]["oracle"] = data(0).tolist()
    return steps


def one_rank_refuses(rank: int, world: int) -> dict[str, Any]:
    """Only rank 1 guards x: it refuses, rank 0 enters all_reduce and waits for it."""
    x = data(rank)
    protect = [x] if rank == 1 else []
    result = {"all_reduce": guarded("raise", protect, lambda: dist.all_reduce(x), [x])}
    if rank == 1:
        # Stay connected past rank 0's timeout: a rank that exits instead makes its peer fail
        # at once with "Connection closed by peer".
        time.sleep(PG_TIMEOUT_S + 2)
    return result


SCENARIOS = {"symmetric": symmetric, "one_rank_refuses": one_rank_refuses}


def main() -> None:
    scenario, rank, world, init_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world,
        init_method=f"file://{init_file}",
        timeout=timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        result = SCENARIOS[scenario](rank, world)
    finally:
        dist.destroy_process_group()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
