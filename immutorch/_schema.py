"""What an aten operator writes, read from its schema once per overload and cached.

A dispatched ``OpOverload`` writes argument *i* when ``arguments[i].alias_info.is_write`` is
set: in-place ops, ``out=`` arguments, written tensor lists (``_foreach_*_``) and metadata ops
tagged ``inplace_view``. A few operators write without saying so in their schema; they are
listed in ``_UNDECLARED``, which ``python -m immutorch schema-audit`` (``_schema_audit.py``)
checks against what PyTorch's own operator samples actually write.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

# A written argument either changes the bytes of its storage ("data") or only the tensor
# object's size, strides or storage pointer ("meta": unsqueeze_, t_, set_, as_strided_ ...).
DATA = "data"
META = "meta"


class RootRule(NamedTuple):
    """A collective that writes on the root rank only, or everywhere but the root."""

    group: int  # index of the ``process_group`` argument
    root: int  # index of the root rank argument (a rank in that group)
    on_root: bool  # True: only the root is written; False: all but the root (broadcast_)


class WrittenArg(NamedTuple):
    position: int
    name: str
    kind: str
    # For undeclared writes that happen only when a flag argument is true (training=True).
    when: Optional[int] = None
    # For collectives whose write depends on this process's rank (broadcast_).
    root: Optional[RootRule] = None


class OpFacts(NamedTuple):
    name: str
    writes: tuple[WrittenArg, ...]
    # Every tensor it returns is new memory (no return aliases an input).
    fresh_outputs: bool
    # Index of the argument that a returned view aliases, for view ops; else None.
    view_of: Optional[int]


# Writes that schemas do not declare, keyed by schema name (every overload). Each entry says how
# it was found and on which torch; ``python -m immutorch schema-audit`` re-checks the table
# against PyTorch's OpInfo samples and the c10d collectives, and exits 1 on a write missing here.
_UNDECLARED: dict[str, tuple[WrittenArg, ...]] = {
    # The batch-norm kernels update running statistics in training mode (argument 5,
    # ``training``) without an ``(a!)``. native_batch_norm: found by hand, confirmed by the
    # audit on 2.13.0 (OpInfo nn.functional.batch_norm, training=True samples). cudnn/miopen:
    # the same signature on GPU builds, by reading their schemas; no CPU sample runs them.
    name: (
        WrittenArg(3, "running_mean", DATA, when=5),
        WrittenArg(4, "running_var", DATA, when=5),
    )
    for name in ("aten::native_batch_norm", "aten::cudnn_batch_norm", "aten::miopen_batch_norm")
}

# The c10d collectives behind torch.distributed (all_reduce, broadcast, all_gather, ...) take
# ``Tensor[]`` / ``Tensor[][]`` with no alias annotation and write them in place. Which argument
# each writes was read from its schema on 2.13.0 and confirmed by the audit's 2-process gloo run
# (rank-dependent data, bytes compared before and after) unless the comment says otherwise.
_BROADCAST_ROOT = RootRule(group=1, root=2, on_root=False)
_COLLECTIVE_WRITES: dict[str, tuple[WrittenArg, ...]] = {
    "c10d::allreduce_": (WrittenArg(0, "tensors", DATA),),
    "c10d::allreduce_coalesced_": (WrittenArg(0, "tensors", DATA),),
    # Every rank but the root receives; the root's tensors are only read.
    "c10d::broadcast_": (WrittenArg(0, "tensors", DATA, root=_BROADCAST_ROOT),),
    # Only the root receives the result, but gloo leaves partial sums in the other ranks'
    # tensors too (seen on rank 1 of 2 by the audit): written on every rank.
    "c10d::reduce_": (WrittenArg(0, "tensors", DATA),),
    "c10d::allgather_": (WrittenArg(0, "output_tensors", DATA),),
    "c10d::_allgather_base_": (WrittenArg(0, "output_tensor", DATA),),
    # The two *_coalesced_ gathers and reduce_scatter_tensor_coalesced_ are reached through
    # torch.distributed._coalescing_manager; read from their schemas, not run by the audit.
    "c10d::allgather_coalesced_": (WrittenArg(0, "output_lists", DATA),),
    "c10d::allgather_into_tensor_coalesced_": (WrittenArg(0, "outputs", DATA),),
    "c10d::reduce_scatter_": (WrittenArg(0, "output_tensors", DATA),),
    "c10d::_reduce_scatter_base_": (WrittenArg(0, "output_tensor", DATA),),
    "c10d::reduce_scatter_tensor_coalesced_": (WrittenArg(0, "outputs", DATA),),
    "c10d::alltoall_": (WrittenArg(0, "output_tensors", DATA),),
    "c10d::alltoall_base_": (WrittenArg(0, "output", DATA),),
    "c10d::scatter_": (WrittenArg(0, "output_tensors", DATA),),
    # Non-root ranks pass an empty output list, so no rank rule is needed.
    "c10d::gather_": (WrittenArg(0, "output_tensors", DATA),),
    "c10d::recv_": (WrittenArg(0, "tensors", DATA),),
    "c10d::recv_any_source_": (WrittenArg(0, "tensors", DATA),),
    # send, barrier, monitored_barrier_ and check_for_nan write nothing.
}
_UNDECLARED.update(_COLLECTIVE_WRITES)

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


def undeclared_writers() -> list[str]:
    """The schema names (``"aten::native_batch_norm"``) that write without declaring it.

    Every other aten overload whose schema declares no write falls through the native
    backend's writes-only key at no cost; these must reach its fallback.
    """
    return list(_UNDECLARED)


def written_values(
    facts: OpFacts, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[WrittenArg, Any]]:
    """The (argument, value) pairs this call writes, skipping conditional writes that are off.

    A value is a tensor or a flat list of tensors: nested ``Tensor[][]`` arguments (the gather
    collectives' outputs) are flattened.
    """
    out: list[tuple[WrittenArg, Any]] = []
    for w in facts.writes:
        if w.when is not None:
            flag = args[w.when] if w.when < len(args) else None
            if not flag:
                continue
        if w.root is not None and not _rank_writes(w.root, args):
            continue
        value = args[w.position] if w.position < len(args) else kwargs.get(w.name)
        if value is None:
            continue
        if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
            flat: list[torch.Tensor] = []
            iter_tensors(value, flat.append)
            value = flat
        out.append((w, value))
    return out


def _rank_writes(rule: RootRule, args: tuple[Any, ...]) -> bool:
    """Whether a collective with a root (broadcast_) writes this process's tensors."""
    try:
        group = args[rule.group]
        if isinstance(group, torch.ScriptObject):
            import torch.distributed as dist

            group = dist.ProcessGroup.unbox(group)
        is_root = bool(group.rank() == args[rule.root])
    except Exception:  # an unknown group object: assume the write happens
        return True
    return is_root == rule.on_root


def iter_tensors(value: Any, visit: Callable[[torch.Tensor], None]) -> None:
    """Call ``visit`` on each tensor in a written argument (a tensor or a nested list of them)."""
    if isinstance(value, torch.Tensor):
        visit(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            iter_tensors(item, visit)
