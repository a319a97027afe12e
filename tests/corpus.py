"""The shared corpus of write patterns and clean patterns, and the unguarded oracle.

Each pattern is a small function ``f(x, *extra)``. WRITE patterns write into ``x`` (its bytes,
or only its size/strides/storage for ``effect == "meta"``); CLEAN patterns must never be
flagged. Every test that needs "code that writes" or "code that only reads" parametrizes over
this one list rather than inventing its own.

The oracle runs a pattern unguarded on a copy of its inputs (same strides); a guarded run is
judged against that, never against what immutorch prints.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.dlpack
from torch import Tensor

Effect = Literal["data", "meta", "clean"]

# What one statement dispatches is torch's choice and changes between releases: 2.15 lowers
# `x[mask] = v` to masked_fill_ and `x[idx] = v` to index_fill_ (2.5 to 2.14: index_put_),
# and `x[0] = 0` on a 1-D tensor to fill_ (2.5 to 2.14: copy_). A test accepts any op of the
# statement's set, as the guard names what torch actually dispatched; never one release's.
MASK_ASSIGN = ("aten::index_put_", "aten::masked_fill_")
INDEX_ASSIGN = ("aten::index_put_", "aten::index_fill_")
ELEMENT_ASSIGN = ("aten::copy_", "aten::fill_")


def any_op(ops: Union[str, Sequence[str]]) -> str:
    """A regex that matches any of ``ops`` (one op name, or a statement's set)."""
    names = [ops] if isinstance(ops, str) else list(ops)
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"


@dataclass(frozen=True)
class Pattern:
    name: str
    fn: Callable[..., Any]
    effect: Effect
    # The aten op the guard must name (or the set a statement lowers to across torch
    # releases), and the schema argument it writes.
    op: Union[str, tuple[str, ...]] = ""
    arg: str = "self"
    shape: tuple[int, ...] = (4, 5)
    dtype: torch.dtype = torch.float32
    requires_grad: bool = False
    # Builds the extra (read-only) arguments after ``x``.
    extra: Callable[[], tuple[Any, ...]] = field(default=lambda: ())
    # Whether clone mode can isolate the write (False: a numpy/DLPack alias the dispatcher
    # never saw being made; clone mode must refuse it).
    isolable: bool = True
    # Runs on tensors without autograd history only (numpy(), from_dlpack of a leaf ...).
    cpu_only: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return (self.op,) if isinstance(self.op, str) else self.op

    @property
    def writes(self) -> bool:
        return self.effect != "clean"

    def make(self, device: str = "cpu") -> tuple[Tensor, tuple[Any, ...]]:
        """Deterministic inputs: the same for every run of the same pattern."""
        torch.manual_seed(zlib.crc32(self.name.encode()))
        if self.dtype.is_floating_point or self.dtype.is_complex:
            x = torch.randn(self.shape, dtype=self.dtype, device=device)
        elif self.dtype is torch.bool:
            x = torch.randint(0, 2, self.shape, device=device).bool()
        else:
            x = torch.randint(-5, 6, self.shape, dtype=self.dtype, device=device)
        x.requires_grad_(self.requires_grad)
        extra = tuple(_to(e, device) for e in self.extra())
        return x, extra

    def __repr__(self) -> str:
        return self.name


def _to(value: Any, device: str) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


# -- helpers for the patterns -------------------------------------------------------------------
def _idx() -> tuple[Tensor]:
    return (torch.tensor([0, 2]),)


def _other() -> tuple[Tensor]:
    return (torch.full((4, 5), 7.0),)


# -- WRITE patterns: data ----------------------------------------------------------------------
def slice_assign(x: Tensor) -> Tensor:
    x[1:3] = 0.0
    return x.sum()


def per_row_normalize(x: Tensor) -> Tensor:
    # SpeechBrain InputNormalization up to 1.0.0: a select view of the caller's tensor, copy_.
    for i in range(x.shape[0]):
        x[i] = (x[i] - x[i].mean()) / x[i].std()
    return x


def mask_assign(x: Tensor) -> None:
    x[x > 0] = 0.0


def index_assign(x: Tensor, idx: Tensor) -> None:
    x[idx] = 1.5


def iadd(x: Tensor) -> Tensor:
    x += 1
    return x


def out_into_input(x: Tensor) -> Tensor:
    return torch.add(x, 1, out=x)


def data_sub(x: Tensor) -> Tensor:
    x.data.sub_(0.5)
    return x * 2


def detach_mul(x: Tensor) -> Tensor:
    x.detach().mul_(3)
    return x + 0


def view_chain_copy(x: Tensor, other: Tensor) -> None:
    x.transpose(0, 1).select(0, 1).copy_(other[0, :4])


def reshape_then_write(x: Tensor) -> Tensor:
    flat = x.reshape(-1)  # contiguous input: a view
    flat[:3].fill_(9.0)
    return flat


def as_strided_write(x: Tensor) -> None:
    x.as_strided((2, 2), (5, 1), 1).zero_()


def foreach_add(x: Tensor) -> None:
    torch._foreach_add_([x], 1.0)


def init_normal(x: Tensor) -> Tensor:
    torch.manual_seed(1)
    return torch.nn.init.normal_(x)


def relu_inplace(x: Tensor) -> Tensor:
    return F.relu(x, inplace=True)


def dropout_inplace(x: Tensor) -> Tensor:
    torch.manual_seed(2)  # oracle and guarded run draw the same mask
    return F.dropout(x, 0.5, training=True, inplace=True)


def masked_fill(x: Tensor) -> None:
    x.masked_fill_(x < 0, -1.0)


def index_add(x: Tensor, idx: Tensor) -> None:
    x.index_add_(0, idx, torch.ones(2, 5))


def scatter(x: Tensor) -> Tensor:
    return x.scatter_(1, torch.tensor([[0], [1], [2], [3]]), 5.0)


def clamp(x: Tensor) -> None:
    x.clamp_(-0.5, 0.5)


def copy_from(x: Tensor, other: Tensor) -> Tensor:
    return x.copy_(other)


def zero(x: Tensor) -> None:
    x.zero_()


def under_no_grad(x: Tensor) -> Tensor:
    with torch.no_grad():
        x.mul_(2)
    return x


def under_inference_mode(x: Tensor) -> None:
    # On 2.13 an in-place op on a normal tensor inside inference_mode is allowed (and
    # dispatched): the guard must still see it.
    with torch.inference_mode():
        x.add_(1)


def numpy_alias_write(x: Tensor) -> None:
    torch.from_numpy(x.numpy()).add_(1)


def dlpack_alias_write(x: Tensor) -> None:
    torch.utils.dlpack.from_dlpack(x).add_(1)


def batch_norm_running_stats(x: Tensor, inp: Tensor) -> Tensor:
    # x is the running mean: CPU native_batch_norm updates it without declaring the write.
    running_var = torch.ones(5)
    return F.batch_norm(inp, running_mean=x[0], running_var=running_var, training=True)


def returns_written_input(x: Tensor) -> Tensor:
    x.mul_(-1)
    return x


def fill_one_column(x: Tensor) -> Tensor:
    x[:, 2] = 3.0
    return x[:, 2]


def int_floor_divide(x: Tensor) -> None:
    x.floor_divide_(2)


def bool_logical_not(x: Tensor) -> None:
    x.logical_not_()


def complex_mul(x: Tensor) -> Tensor:
    return x.mul_(1j)


def sort_out(x: Tensor) -> Tensor:
    values = torch.empty_like(x)
    torch.sort(x.detach().clone(), dim=1, out=(values, x.new_empty(x.shape, dtype=torch.long)))
    x.copy_(values)  # a sorting "in place"
    return x


def resize_shrink(x: Tensor) -> Tensor:
    return x.resize_(3)


# -- WRITE patterns: metadata only -------------------------------------------------------------
def unsqueeze_(x: Tensor) -> Tensor:
    return x.unsqueeze_(0)


def transpose_(x: Tensor) -> Tensor:
    return x.transpose_(0, 1)


def t_(x: Tensor) -> Tensor:
    return x.t_()


def squeeze_(x: Tensor) -> Tensor:
    return x.squeeze_()


def set_other(x: Tensor, other: Tensor) -> Tensor:
    return x.set_(other)


def as_strided_(x: Tensor) -> Tensor:
    return x.as_strided_((2, 2), (1, 2))


# -- CLEAN patterns ----------------------------------------------------------------------------
def out_of_place(x: Tensor) -> Tensor:
    return (x * 2 + 1).exp()


def write_into_clone(x: Tensor) -> Tensor:
    y = x.clone()
    y[0] = 0.0
    y.add_(1)
    return y


def out_into_fresh(x: Tensor) -> Tensor:
    return torch.add(x, 1, out=torch.empty_like(x))


def copy_from_protected(x: Tensor) -> Tensor:
    # SpeechBrain's fix (PR #2504): write into new memory, read the input.
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = (x[i] - x[i].mean()) / x[i].std()
    return out


def reads_through_views(x: Tensor) -> Tensor:
    parts = [
        x.t()[1],
        x[1:3, ::2],
        x.view(-1)[:4],
        x.reshape(5, 4)[0],
        x.as_strided((2,), (3,), 1),
        x.unsqueeze(0)[0, 0],
        x.detach()[2],
        x.data[3],
        x.expand(2, 4, 5)[1, 0],
        x.unbind(0)[1],
        x.split(2, dim=1)[0].flatten(),
        x.narrow(1, 1, 2).flatten(),
        x.diagonal(),
        x.view_as(x)[0],
    ]
    return torch.cat([p.reshape(-1) for p in parts])


def inplace_on_intermediate(x: Tensor) -> Tensor:
    y = x * 2
    y.relu_()
    y[0] = 1.0
    y.unsqueeze_(0)
    return y


def to_cpu_read(x: Tensor) -> Tensor:
    y = x.to("cpu")  # the same tensor on CPU: a read is fine
    return y.sum(dim=0)


def numpy_read(x: Tensor) -> Tensor:
    return torch.tensor(x.numpy().sum(axis=0))


def where(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def contiguous_copy_write(x: Tensor) -> Tensor:
    y = x.t().contiguous()  # a copy: x.t() is not contiguous
    y.add_(1)
    return y


def dtype_copy_write(x: Tensor) -> Tensor:
    y = x.to(torch.float64)
    y.mul_(2)
    return y


def batch_norm_fresh_stats(x: Tensor) -> Tensor:
    mean, var = torch.zeros(5), torch.ones(5)
    out = F.batch_norm(x, mean, var, training=True)
    return torch.cat([out.reshape(-1), mean, var])


def batch_norm_eval_reads_stats(x: Tensor, inp: Tensor) -> Tensor:
    return F.batch_norm(inp, x[0], x[1].abs() + 1, training=False)


def dropout_eval_inplace(x: Tensor) -> Tensor:
    return F.dropout(x, 0.5, training=False, inplace=True)


def new_tensor_index_add(x: Tensor, idx: Tensor) -> Tensor:
    return torch.zeros(3, 5).index_add_(0, idx, x[:2])


def reductions(x: Tensor) -> Tensor:
    values, indices = x.sort(dim=1)
    return torch.cat([values.flatten(), indices.flatten().float(), x.max(dim=0).values])


def metadata_on_clone(x: Tensor) -> Tensor:
    y = x.clone()
    y.t_()
    y.unsqueeze_(0)
    return y


def empty_like_normal(x: Tensor) -> Tensor:
    torch.manual_seed(3)
    return torch.empty_like(x).normal_() + x


def masked_fill_out_of_place(x: Tensor) -> Tensor:
    return x.masked_fill(x < 0, 0.0).clamp(-1, 1)


def foreach_out_of_place(x: Tensor) -> Tensor:
    return torch._foreach_add([x, x[0]], 1.0)[0]


def relu_not_inplace(x: Tensor) -> Tensor:
    return F.relu(x) + F.dropout(x, 0.0, training=True)


def cat_stack(x: Tensor) -> Tensor:
    return torch.stack([torch.cat([x, x]), torch.cat([x, x])])


WRITES: list[Pattern] = [
    Pattern("slice_assign", slice_assign, "data", "aten::fill_"),
    Pattern("per_row_normalize", per_row_normalize, "data", "aten::copy_"),
    Pattern("mask_assign", mask_assign, "data", MASK_ASSIGN),
    Pattern("index_assign", index_assign, "data", INDEX_ASSIGN, extra=_idx),
    Pattern("iadd", iadd, "data", "aten::add_"),
    Pattern("out_into_input", out_into_input, "data", "aten::add", arg="out"),
    Pattern("data_sub", data_sub, "data", "aten::sub_"),
    Pattern("detach_mul", detach_mul, "data", "aten::mul_"),
    Pattern("view_chain_copy", view_chain_copy, "data", "aten::copy_", extra=_other),
    Pattern("reshape_then_write", reshape_then_write, "data", "aten::fill_"),
    Pattern("as_strided_write", as_strided_write, "data", "aten::zero_"),
    Pattern("foreach_add", foreach_add, "data", "aten::_foreach_add_"),
    Pattern("init_normal", init_normal, "data", "aten::normal_"),
    Pattern("relu_inplace", relu_inplace, "data", "aten::relu_"),
    Pattern("dropout_inplace", dropout_inplace, "data", "aten::mul_"),
    Pattern("masked_fill", masked_fill, "data", "aten::masked_fill_"),
    Pattern("index_add", index_add, "data", "aten::index_add_", extra=_idx),
    Pattern("scatter", scatter, "data", "aten::scatter_"),
    Pattern("clamp", clamp, "data", "aten::clamp_"),
    Pattern("copy_from", copy_from, "data", "aten::copy_", extra=_other),
    Pattern("zero", zero, "data", "aten::zero_"),
    Pattern("under_no_grad", under_no_grad, "data", "aten::mul_"),
    Pattern("under_inference_mode", under_inference_mode, "data", "aten::add_"),
    Pattern(
        "numpy_alias_write",
        numpy_alias_write,
        "data",
        "aten::add_",
        isolable=False,
        cpu_only=True,
    ),
    Pattern("dlpack_alias_write", dlpack_alias_write, "data", "aten::add_", isolable=False),
    Pattern(
        "batch_norm_running_stats",
        batch_norm_running_stats,
        "data",
        "aten::native_batch_norm",
        arg="running_mean",
        extra=lambda: (torch.randn(3, 5),),
    ),
    Pattern("returns_written_input", returns_written_input, "data", "aten::mul_"),
    Pattern("fill_one_column", fill_one_column, "data", "aten::fill_"),
    Pattern("int_floor_divide", int_floor_divide, "data", "aten::floor_divide_", dtype=torch.int64),
    Pattern("bool_logical_not", bool_logical_not, "data", "aten::logical_not_", dtype=torch.bool),
    Pattern("complex_mul", complex_mul, "data", "aten::mul_", dtype=torch.complex64),
    Pattern("sort_then_copy", sort_out, "data", "aten::copy_"),
    Pattern("resize_shrink", resize_shrink, "data", "aten::resize_"),
    Pattern("unsqueeze_", unsqueeze_, "meta", "aten::unsqueeze_"),
    Pattern("transpose_", transpose_, "meta", "aten::transpose_"),
    Pattern("t_", t_, "meta", "aten::t_"),
    Pattern("squeeze_", squeeze_, "meta", "aten::squeeze_", shape=(1, 5, 1)),
    Pattern("set_other_storage", set_other, "meta", "aten::set_", extra=_other),
    Pattern("as_strided_", as_strided_, "meta", "aten::as_strided_"),
]

CLEAN: list[Pattern] = [
    Pattern("out_of_place", out_of_place, "clean"),
    Pattern("write_into_clone", write_into_clone, "clean"),
    Pattern("out_into_fresh", out_into_fresh, "clean"),
    Pattern("copy_from_protected", copy_from_protected, "clean"),
    Pattern("reads_through_views", reads_through_views, "clean"),
    Pattern("inplace_on_intermediate", inplace_on_intermediate, "clean"),
    Pattern("to_cpu_read", to_cpu_read, "clean"),
    Pattern("numpy_read", numpy_read, "clean", cpu_only=True),
    Pattern("where", where, "clean"),
    Pattern("contiguous_copy_write", contiguous_copy_write, "clean"),
    Pattern("dtype_copy_write", dtype_copy_write, "clean"),
    Pattern("batch_norm_fresh_stats", batch_norm_fresh_stats, "clean"),
    Pattern(
        "batch_norm_eval_reads_stats",
        batch_norm_eval_reads_stats,
        "clean",
        extra=lambda: (torch.randn(3, 5),),
    ),
    Pattern("dropout_eval_inplace", dropout_eval_inplace, "clean"),
    Pattern("new_tensor_index_add", new_tensor_index_add, "clean", extra=_idx),
    Pattern("reductions", reductions, "clean"),
    Pattern("metadata_on_clone", metadata_on_clone, "clean"),
    Pattern("empty_like_normal", empty_like_normal, "clean"),
    Pattern("masked_fill_out_of_place", masked_fill_out_of_place, "clean"),
    Pattern("foreach_out_of_place", foreach_out_of_place, "clean"),
    Pattern("relu_not_inplace", relu_not_inplace, "clean"),
    Pattern("cat_stack", cat_stack, "clean"),
]

PATTERNS: list[Pattern] = WRITES + CLEAN
BY_NAME: dict[str, Pattern] = {p.name: p for p in PATTERNS}


# -- the oracle ------------------------------------------------------------------------------
def same_strides_copy(t: Tensor) -> Tensor:
    """A copy with the same size, strides and dtype (and requires_grad for leaves)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    if t.requires_grad:
        out.requires_grad_(True)
    return out


def copy_value(value: Any) -> Any:
    if isinstance(value, Tensor):
        return same_strides_copy(value)
    if isinstance(value, (list, tuple)):
        return type(value)(copy_value(v) for v in value)
    return value


@dataclass
class Snapshot:
    """Everything about a tensor a write could change, to compare bit for bit."""

    values: Tensor
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    version: int

    @classmethod
    def of(cls, t: Tensor) -> Snapshot:
        return cls(same_strides_copy(t.detach()), t.shape, t.stride(), t.storage_offset(),
                   t.dtype, t._version)  # fmt: skip

    def matches(self, t: Tensor, *, version: bool = True) -> bool:
        return (
            tuple(t.shape) == tuple(self.shape)
            and t.stride() == self.stride
            and t.storage_offset() == self.offset
            and t.dtype == self.dtype
            and torch.equal(t.detach(), self.values)
            and (not version or t._version == self.version)
        )


def assert_same(actual: Any, expected: Any, what: str = "result") -> None:
    """Bit-identical: dtype, shape, strides and values of every tensor in a nested result."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), f"{what}: expected a tensor, got {type(actual)}"
        assert actual.dtype == expected.dtype, what
        assert actual.shape == expected.shape, what
        assert actual.stride() == expected.stride(), what
        assert torch.equal(actual.detach(), expected.detach()), f"{what}: values differ"
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{what}[{i}]")
    else:
        assert actual == expected, what


@dataclass
class Outcome:
    result: Any
    x_after: Tensor
    extra_after: tuple[Any, ...]


def run_oracle(p: Pattern, x: Tensor, extra: Sequence[Any] = ()) -> Outcome:
    """Run the pattern unguarded on copies of its inputs."""
    x_copy, extra_copy = same_strides_copy(x), copy_value(tuple(extra))
    result = p.fn(x_copy, *extra_copy)
    return Outcome(result, x_copy, extra_copy)


def ids(patterns: Sequence[Pattern]) -> list[str]:
    return [p.name for p in patterns]


def find(name: str) -> Optional[Pattern]:
    return BY_NAME.get(name)
