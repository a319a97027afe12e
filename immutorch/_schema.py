"""What an aten operator writes, read from its schema once per overload and cached.

A dispatched ``OpOverload`` writes argument *i* when ``arguments[i].alias_info.is_write`` is
set: in-place ops, ``out=`` arguments, written tensor lists (``_foreach_*_``) and metadata ops
tagged ``inplace_view``. A few operators write without saying so in their schema; they are
listed in ``_UNDECLARED``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

# A written argument either changes the bytes of its storage ("data") or only the tensor
# object's size, strides or storage pointer ("meta": unsqueeze_, t_, set_, as_strided_ ...).
DATA = "data"
META = "meta"


class WrittenArg(NamedTuple):
    position: int
    name: str
    kind: str
    # For undeclared writes that happen only when a flag argument is true (training=True).
    when: Optional[int] = None


class OpFacts(NamedTuple):
    name: str
    writes: tuple[WrittenArg, ...]
    # Every tensor it returns is new memory (no return aliases an input).
    fresh_outputs: bool
    # Index of the argument that a returned view aliases, for view ops; else None.
    view_of: Optional[int]


# Writes that schemas do not declare: the batch-norm kernels update running statistics in
# training mode (argument 5, ``training``) without an ``(a!)`` annotation.
_UNDECLARED: dict[str, tuple[WrittenArg, ...]] = {
    name: (
        WrittenArg(3, "running_mean", DATA, when=5),
        WrittenArg(4, "running_var", DATA, when=5),
    )
    for name in ("aten::native_batch_norm", "aten::cudnn_batch_norm", "aten::miopen_batch_norm")
}

# Declared writes that are not writes into user data: stream bookkeeping, autograd metadata and
# AMP scaler state.
_NOT_DATA_WRITES = frozenset(
    {"aten::record_stream", "aten::set_data", "aten::_amp_update_scale_", "aten::retain_grad"}
)

# inplace_view ops that can reallocate the storage shared by every view, so they count as data.
_STORAGE_METADATA_OPS = frozenset({"aten::resize_", "aten::resize_as_"})

_cache: dict[Any, OpFacts] = {}


def op_facts(func: Any) -> OpFacts:
    """Facts about ``func`` (an OpOverload), computed once."""
    facts = _cache.get(func)
    if facts is None:
        facts = _cache[func] = _compute(func)
    return facts


def _compute(func: Any) -> OpFacts:
    schema = getattr(func, "_schema", None)
    if schema is None:  # a HigherOrderOperator or something without a schema: nothing known
        return OpFacts(str(func), (), False, None)
    name = schema.name
    tags = getattr(func, "tags", ())
    inplace_view = torch.Tag.inplace_view in tags
    writes: list[WrittenArg] = []
    if name not in _NOT_DATA_WRITES and schema.is_mutable:
        for index, arg in enumerate(schema.arguments):
            info = arg.alias_info
            if info is None or not info.is_write:
                continue
            kind = DATA
            if inplace_view and index == 0 and name not in _STORAGE_METADATA_OPS:
                kind = META
            writes.append(WrittenArg(index, arg.name, kind))
    writes.extend(_UNDECLARED.get(name, ()))
    returns = schema.returns
    fresh = bool(returns) and all(r.alias_info is None for r in returns)
    view_of: Optional[int] = None
    view_returns = [r for r in returns if r.alias_info is not None and not r.alias_info.is_write]
    if view_returns:
        # List returns (split, unbind) carry their alias set on the element type: fall back to the
        # first non-written aliasing argument when the sets do not name it.
        sets = set().union(*(r.alias_info.before_set for r in view_returns))
        candidates = [
            i
            for i, arg in enumerate(schema.arguments)
            if arg.alias_info is not None and not arg.alias_info.is_write
        ]
        matching = [i for i in candidates if schema.arguments[i].alias_info.before_set & sets]
        view_of = (matching or candidates)[0] if candidates else None
    # lift_fresh wraps a constant made outside the dispatcher (torch.tensor(...)): new memory.
    if name in ("aten::lift_fresh", "aten::lift_fresh_copy"):
        fresh = True
    return OpFacts(name, tuple(writes), fresh, view_of)


def written_values(
    facts: OpFacts, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[WrittenArg, Any]]:
    """The (argument, value) pairs this call writes, skipping conditional writes that are off."""
    out: list[tuple[WrittenArg, Any]] = []
    for w in facts.writes:
        if w.when is not None:
            flag = args[w.when] if w.when < len(args) else None
            if not flag:
                continue
        value = args[w.position] if w.position < len(args) else kwargs.get(w.name)
        if value is not None:
            out.append((w, value))
    return out


def iter_tensors(value: Any, visit: Callable[[torch.Tensor], None]) -> None:
    """Call ``visit`` on each tensor in a written argument (a tensor or a list of tensors)."""
    if isinstance(value, torch.Tensor):
        visit(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                visit(item)
