"""Ordinary tests: they check values, so they pass, and never notice the in-place write.

Run them in strict mode and immutorch fails the one whose module writes into its input:

    pytest --immutorch=raise --immutorch-modules=audio_pkg
"""

from __future__ import annotations

import torch
from audio_pkg import PeakNormalize, Preemphasis


def test_preemphasis_values() -> None:
    wav = torch.tensor([[1.0, 1.0, 1.0]])
    out = Preemphasis(coef=0.5)(wav)
    assert torch.allclose(out, torch.tensor([[1.0, 0.5, 0.5]]))


def test_peak_normalize_values() -> None:
    wav = torch.tensor([[0.5, -2.0, 1.0]])
    out = PeakNormalize()(wav)
    assert torch.allclose(out, torch.tensor([[0.25, -1.0, 0.5]]))
