"""What is timed: the callees and their inputs, one :class:`Workload` each.

``make_workloads(quick)`` builds them in report order. Each workload is a callee ``fn`` and
the ``inputs`` it is called with; every variant (``variants.py``) gets its own copy of the
inputs. Sizes shrink under ``--quick`` (a smoke run whose times mean nothing).

- ``encoder``: the reference case, the ECAPA-style speaker encoder with the fixed normalizer,
  through ``encode_mel_spectrogram``; the legacy normalizer (which writes into the mel) as
  extra rows.
- ``transformer``: one ``nn.TransformerEncoderLayer`` in eval (PyTorch's fused fast path).
- ``small_ops``: the worst case, 1000 small ops ``h = tanh(h @ w)`` on 64x64 tensors.
- ``normalizer``: ``InputNormalization`` alone, fixed against legacy.
- ``unrelated_ops`` / ``reading_ops``: 1000 small ops beside a protected ``p`` that none of
  them touch, or that all of them read.
- ``encoder_forward`` / ``encoder_train_step``: ``nn.TransformerEncoder``, 6 layers of d_model
  128, in training mode: its forward with autograd recording, and a training step (forward,
  loss, backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from immutorch._reference import (
    LegacyInputNormalization,
    MelSpectrogramEncoder,
    synthetic_mel,
)
from immutorch.nn import InputNormalization

KEYS = (
    "encoder",
    "transformer",
    "small_ops",
    "normalizer",
    "unrelated_ops",
    "reading_ops",
    "encoder_forward",
    "encoder_train_step",
)


@dataclass(frozen=True)
class Extra:
    """A row particular to one workload: another callee (one that writes into its input, say)
    called the way the variant ``wraps`` calls the workload's own (a key of ``VARIANTS``)."""

    key: str
    label: str
    fn: Callable[..., object]
    wraps: str


@dataclass
class Workload:
    key: str
    title: str
    shape: str
    fn: Callable[..., object]
    inputs: tuple[Tensor, ...]
    # SchemaCheckMode is run (with fewer repetitions) unless False.
    schema_check: bool = True
    note: str = ""
    # The leading parameters the guarded variants protect (``only=`` and ``guard(p, ...)``);
    # None: every tensor argument (and a guard that names nothing).
    protect: Optional[tuple[str, ...]] = None
    extras: list[Extra] = field(default_factory=list)
    # Autograd on while it runs (a training step); otherwise it runs under torch.no_grad().
    grad: bool = False


def small_ops(x: Tensor, w: Tensor, steps: int) -> Tensor:
    """``2 * steps`` small aten ops: ``mm`` then ``tanh``, over and over."""
    h = x
    for _ in range(steps):
        h = torch.tanh(h @ w)
    return h


class UnrelatedOps(nn.Module):
    """``2 * steps`` small ops (``mm``, ``tanh``) on ``x`` and ``w``; ``p`` is never touched."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, p: Tensor, x: Tensor, w: Tensor) -> Tensor:
        return small_ops(x, w, self.steps)


class ReadingOps(nn.Module):
    """``steps`` small ops that all read ``p``: ``h = addmm(p, h, w)``."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def forward(self, p: Tensor, h: Tensor, w: Tensor) -> Tensor:
        for _ in range(self.steps):
            h = torch.addmm(p, h, w)
        return h


def calling_pxw(module: nn.Module) -> Callable[..., object]:
    """A plain function ``f(p, x, w)`` that calls ``module``: named parameters, so that
    ``only=("p",)`` protects ``p`` alone; and a module call inside, where
    ``guard(p, scope="arguments")`` hands ``p`` over as a scoped alias."""

    def call(p: Tensor, x: Tensor, w: Tensor) -> object:
        return module(p, x, w)

    call.__qualname__ = f"call_{type(module).__name__}"
    return call


def calling(module: nn.Module) -> Callable[..., object]:
    """A plain function that calls ``module``: decorating the module itself would rewrite its
    ``forward`` for every variant at once."""

    def call(*args: Tensor) -> object:
        return module(*args)

    call.__qualname__ = f"call_{type(module).__name__}"
    return call


def training_step(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``step(x)``: forward, a scalar loss, backward into fresh gradients (``zero_grad`` with
    ``set_to_none``, so that every ``.grad`` is born in the call); no optimizer step, which would
    write into the parameters a guard with no tensors named protects."""

    def step(x: Tensor) -> Tensor:
        model.zero_grad(set_to_none=True)
        loss: Tensor = model(x).square().mean()
        loss.backward()
        return loss.detach()

    step.__qualname__ = f"train_step_{type(model).__name__}"
    return step


def _legacy_extras(what: str, fn: Callable[..., object], up_front: bool) -> list[Extra]:
    """The legacy normalizer's rows: unguarded (it writes into ``what``), and clone mode in
    both scopes (and, with ``up_front``, cloning by hand) keeping the caller's data."""
    extras = [
        Extra("legacy_unguarded", f"{what}, unguarded (writes into the input)", fn, "unguarded"),
        Extra(
            "legacy_clone_all",
            f"{what}, immutable_inputs(mode='clone', scope='all')",
            fn,
            "clone_all",
        ),
        Extra(
            "legacy_clone", f"{what}, immutable_inputs(mode='clone'), scope arguments", fn, "clone"
        ),
    ]
    if up_front:
        extras.append(
            Extra(
                "legacy_clone_up_front", f"{what}, clone every input up front", fn, "clone_up_front"
            )
        )
    return extras


def make_workloads(quick: bool) -> list[Workload]:
    gen = torch.Generator().manual_seed(0)

    # 1. The reference case: the speaker encoder, fixed normalizer, through its public method.
    b, t = (2, 40) if quick else (8, 300)
    fixed_encoder = MelSpectrogramEncoder(InputNormalization(norm_type="sentence", std_norm=False))
    legacy_encoder = MelSpectrogramEncoder(
        LegacyInputNormalization(norm_type="sentence", std_norm=False)
    )
    encoder = Workload(
        key="encoder",
        title="ECAPA-style speaker encoder, encode_mel_spectrogram",
        shape=f"[{b}, 80, {t}]",
        fn=fixed_encoder.encode_mel_spectrogram,
        inputs=(synthetic_mel(b, 80, t),),
        extras=_legacy_extras(
            "legacy normalizer", legacy_encoder.encode_mel_spectrogram, up_front=False
        ),
    )

    # 2. A transformer layer (eval, so PyTorch may take its fused fast path).
    b, s = (2, 16) if quick else (8, 128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, batch_first=True).eval()
    transformer = Workload(
        key="transformer",
        title="nn.TransformerEncoderLayer(d_model=256, nhead=4), eval",
        shape=f"[{b}, {s}, 256]",
        fn=calling(layer),
        inputs=(torch.randn(b, s, 256, generator=gen),),
        note="In eval under no_grad PyTorch takes its fused fast path "
        "(`aten._transformer_encoder_layer_fwd`), guarded or not: one aten op per call, so "
        "any dispatch mode costs next to nothing here.",
    )

    # 3. The worst case: nothing but small ops, so the per-op cost is all there is.
    steps = 10 if quick else 500
    n = 16 if quick else 64
    ops = Workload(
        key="small_ops",
        title=f"{2 * steps} small ops h = tanh(h @ w)",
        shape=f"[{n}, {n}]",
        fn=lambda x, w: small_ops(x, w, steps),
        inputs=(torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen) / n**0.5),
    )

    # 4. The normalizer alone: the fix against the bug, and clone mode catching the bug.
    b, t = (4, 50) if quick else (16, 300)
    fixed = InputNormalization(norm_type="sentence").eval()
    lengths = torch.linspace(0.6, 1.0, b)
    feats = synthetic_mel(b, 80, t).transpose(1, 2).contiguous()
    normalizer = Workload(
        key="normalizer",
        title="InputNormalization('sentence', lengths): fixed",
        shape=f"[{b}, {t}, 80]",
        fn=calling(fixed),
        inputs=(feats, lengths),
        extras=_legacy_extras(
            "legacy",
            calling(LegacyInputNormalization(norm_type="sentence").eval()),
            up_front=True,
        ),
    )

    # 5. and 6. Small ops beside a protected argument: none of them touch it, or all read it.
    # p is the only protected parameter (only=("p",), guard(p, ...)); x and w are not.
    unrelated = Workload(
        key="unrelated_ops",
        title=f"{2 * steps} small ops (mm, tanh) that never touch the protected p",
        shape=f"[{n}, {n}]",
        fn=calling_pxw(UnrelatedOps(steps)),
        inputs=(
            torch.randn(n, n, generator=gen),
            torch.randn(n, n, generator=gen),
            torch.randn(n, n, generator=gen) / n**0.5,
        ),
        protect=("p",),
        schema_check=False,
        note="`f(p, x, w)` calls a module whose ops use only x and w; p alone is protected.",
    )
    reading = Workload(
        key="reading_ops",
        title=f"{2 * steps} small ops (addmm) that all read the protected p",
        shape=f"[{n}, {n}]",
        fn=calling_pxw(ReadingOps(2 * steps)),
        inputs=(
            torch.randn(n, n, generator=gen),
            torch.randn(n, n, generator=gen),
            torch.randn(n, n, generator=gen) * (0.5 / n**0.5),  # contracting: h stays finite
        ),
        protect=("p",),
        schema_check=False,
        note="`f(p, h, w)` calls a module that runs `h = torch.addmm(p, h, w)`; p alone is "
        "protected, so every op takes it.",
    )

    # 7. and 8. A small transformer in training: its forward, and a whole training step.
    b, s = (2, 8) if quick else (2, 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stack = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True),
            num_layers=6,
            enable_nested_tensor=False,
        ).train()
    tokens = torch.randn(b, s, 128, generator=gen)
    title = "nn.TransformerEncoder 6 x d128, train mode"
    forward = Workload(
        key="encoder_forward",
        title=f"{title}, forward",
        shape=f"[{b}, {s}, 128]",
        fn=calling(stack),
        inputs=(tokens,),
        grad=True,
        note="6 layers of `nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512)`"
        " in training mode (dropout 0.1), autograd recording: the forward half of the training "
        "step below.",
    )
    train_step = Workload(
        key="encoder_train_step",
        title=f"{title}, forward + backward",
        shape=f"[{b}, {s}, 128]",
        fn=training_step(stack),
        inputs=(tokens,),
        grad=True,
        note="One training step: `zero_grad(set_to_none=True)`, forward, "
        "`out.square().mean()`, backward (no optimizer step).",
    )
    return [encoder, transformer, ops, normalizer, unrelated, reading, forward, train_step]
