"""Front door 2: ``with immutorch.guard(mode="clone"):`` around code you do not own.

With no tensors named, the guard protects every tensor that existed before the block (module
parameters and buffers stay writable). Every ``nn.Module`` called inside is a boundary: in
clone mode the module receives a copy-on-write alias of each protected argument, so a write
lands in a private copy, made only when the write happens. The caller's data stays intact and
the result is what the unguarded call would have returned.

    python examples/guard_call.py
"""

from __future__ import annotations

import torch
from torch import nn

import immutorch


class ThirdPartyStandardize(nn.Module):
    """Someone else's module: standardizes each row in place and returns its input."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        batch -= batch.mean(dim=1, keepdim=True)
        batch /= batch.std(dim=1, keepdim=True)
        return batch


def main() -> None:
    standardize = ThirdPartyStandardize()
    batch = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    expected = standardize(batch.clone())  # the oracle: unguarded, on a copy
    snapshot = batch.clone()

    with immutorch.guard(mode="clone"):
        out = standardize(batch)

    print(f"caller's batch unchanged: {torch.equal(batch, snapshot)}")
    print(f"result identical to the unguarded call: {torch.equal(out, expected)}")

    try:
        with immutorch.guard(mode="raise"):
            standardize(batch)
    except immutorch.ImmutableTensorError as err:
        print(f'guard(mode="raise") instead: {err.op} refused in {err.where} at {err.location}')
    assert torch.equal(batch, snapshot)


if __name__ == "__main__":
    main()
