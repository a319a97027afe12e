"""Front door 3: ``immutorch.readonly(t)``, a lasting mark like numpy's ``writeable = False``.

A guard or decorator protects what it is handed; a read-only mark protects a tensor wherever
it is reached from, e.g. a lookup table held in a global or a closure. The mark sits on the
memory, so every view shares it. It is enforced wherever a guard is active (``guard``,
``immutable_inputs``, the pytest plugin's strict mode), in that guard's mode;
``immutorch.writable(t)`` removes it.

    python examples/readonly_mark.py
"""

from __future__ import annotations

import torch

import immutorch

TABLE = torch.arange(15, dtype=torch.float32).reshape(5, 3)


@immutorch.immutable_inputs
def lookup_once(ids: torch.Tensor) -> torch.Tensor:
    """Returns the rows for ``ids`` and, by mistake, zeroes them in the shared table."""
    rows = TABLE[ids]  # advanced indexing: a new tensor
    TABLE[ids] = 0.0  # the mistake: TABLE is not an argument, so the decorator alone misses it
    return rows


def main() -> None:
    ids = torch.tensor([1, 3])
    backup = TABLE.clone()

    lookup_once(ids)
    print(f"without a mark, the write goes through: row 1 is now {TABLE[1].tolist()}")
    TABLE.copy_(backup)

    immutorch.readonly(TABLE)
    print(f"is_readonly(TABLE[1:3]), a view: {immutorch.is_readonly(TABLE[1:3])}")
    try:
        lookup_once(ids)
    except immutorch.ImmutableTensorError as err:
        # err.op is what torch dispatched: index_put_ (up to 2.14) or index_fill_ (2.15).
        print(f"with the mark: the write was refused before it landed ({err.op} at {err.location})")
    print(f"row 1 intact: {TABLE[1].tolist()}")
    assert torch.equal(TABLE, backup)

    immutorch.writable(TABLE)
    print(f"after writable(): is_readonly = {immutorch.is_readonly(TABLE)}")


if __name__ == "__main__":
    main()
