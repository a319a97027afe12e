"""Front door 1: ``@immutorch.immutable_inputs`` on a module's ``forward``.

Every tensor argument of every call is protected for that call. A forward that writes into
its input fails loudly in raise mode, or writes into a private copy in clone mode.

    python examples/decorator_forward.py
"""

from __future__ import annotations

import torch
from torch import nn

import immutorch


class ClampScores(nn.Module):
    """Clamps scores to [0, 1]... into the caller's tensor (``clamp_`` is in place)."""

    @immutorch.immutable_inputs
    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.clamp_(0.0, 1.0)


class ClampScoresCloned(nn.Module):
    @immutorch.immutable_inputs(mode="clone")
    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.clamp_(0.0, 1.0)


class ClampScoresFixed(nn.Module):
    @immutorch.immutable_inputs
    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.clamp(0.0, 1.0)  # out of place: a new tensor


def main() -> None:
    scores = torch.tensor([-0.5, 0.25, 1.5])

    try:
        ClampScores()(scores)
    except immutorch.ImmutableTensorError as err:
        print(f"raise mode: {err.op} refused in {err.where} at {err.location}")
    print(f"  scores untouched: {scores.tolist()}")

    out = ClampScoresCloned()(scores)
    print(f"clone mode: returned {out.tolist()}, scores still {scores.tolist()}")

    out = ClampScoresFixed()(scores)
    print(f"fixed forward: returned {out.tolist()}, scores still {scores.tolist()}")
    assert scores.tolist() == [-0.5, 0.25, 1.5]


if __name__ == "__main__":
    main()
