"""Small modules whose writes into their input depend on a setting or on the data, for the
audit command's tests (``python -m immutorch audit audit_targets:NAME``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TrainingTimeMask(nn.Module):
    """SpecAugment-style time masking, written in place and in training only: the shape of
    torchaudio's ``TimeMasking`` bug (#1478). In eval mode it returns its input untouched."""

    def __init__(self, width: int = 5) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            start = int(torch.randint(0, x.shape[1] - self.width + 1, ()))
            x[:, start : start + self.width] = 0.0  # the write: only in training
        return x


class PaddingZeroer(nn.Module):
    """Zeroes each item's padding frames in place, ``[batch, time, ...]`` with relative
    lengths: it writes only into items shorter than the batch's longest."""

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        frames = x.shape[1]
        for i in range(x.shape[0]):
            valid = padded_from(float(lengths[i]), frames)
            if valid < frames:
                x[i, valid:] = 0.0  # the write: only where there is padding
        return x * 2


def padded_from(length: float, frames: int) -> int:
    """The first padding frame of an item of relative ``length``, as SpeechBrain rounds it."""
    return int(torch.round(torch.tensor(length) * frames))


class CoinFlipScale(nn.Module):
    """Scales its input in place on a coin flip from torch's global generator, as dropout-like
    code does: whether a run writes is chance, and the seed decides it."""

    def forward(self, x: Tensor) -> Tensor:
        if float(torch.rand(())) < 0.5:
            x.mul_(2.0)  # the write: in about half the runs
        return x
