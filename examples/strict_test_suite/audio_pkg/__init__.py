"""A tiny package under test: two waveform modules, one of which writes into its input."""

from __future__ import annotations

import torch
from torch import nn


class Preemphasis(nn.Module):
    """``y[t] = x[t] - coef * x[t - 1]``, computed in place in the caller's waveform (a bug)."""

    def __init__(self, coef: float = 0.97) -> None:
        super().__init__()
        self.coef = coef

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        wav[..., 1:] -= self.coef * wav[..., :-1].clone()
        return wav


class PeakNormalize(nn.Module):
    """Scales each waveform to a peak of 1, out of place."""

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return wav / wav.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
