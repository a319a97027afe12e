"""The reference case, in one place: SpeechBrain's mel-spectrogram speaker encoder, in miniature.

Shared by ``python -m immutorch demo``, the examples, the tests and the benchmarks, so that the
bug they all show is written once:

- :class:`LegacyInputNormalization`: the normalizer as it was before SpeechBrain PR #2504, with
  its in-place per-row write into the tensor it is handed. Kept buggy on purpose; it is also
  the oracle the fixed :class:`immutorch.nn.InputNormalization` is tested against.
- :class:`SpeakerEncoder`: a small ECAPA-TDNN-style embedding model with random weights.
- :class:`MelSpectrogramEncoder`: the inference wrapper, following SpeechBrain's path from a
  caller's mel to an embedding (``.to(device)``, a ``transpose`` view, normalizer, model).
- :func:`synthetic_mel`: a plausible log-mel batch, so nothing needs audio or downloads.
- Factories for ``python -m immutorch audit immutorch._reference:NAME``:
  :func:`legacy_normalizer`, :func:`fixed_normalizer`, :func:`legacy_encoder`,
  :func:`fixed_encoder`.

Not public API: names and sizes here may change whenever the demo needs them to.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn._normalization import InputNormalization, NormType

__all__ = [
    "LegacyInputNormalization",
    "MelSpectrogramEncoder",
    "SpeakerEncoder",
    "fixed_encoder",
    "fixed_normalizer",
    "legacy_encoder",
    "legacy_normalizer",
    "mse",
    "synthetic_mel",
]

# SpeechBrain's spkrec-ecapa-voxceleb-mel-spec recipe normalizes each sentence by its mean only.
ENCODER_NORMALIZER: dict[str, object] = {"norm_type": "sentence", "std_norm": False}


class LegacyInputNormalization(nn.Module):
    """SpeechBrain's ``InputNormalization`` algorithm up to release 1.0.0, bug included.

    For ``norm_type`` ``"sentence"`` and ``"speaker"`` it writes each normalized row back into
    ``x`` (``x[i] = ...``: ``aten::select`` + ``aten::copy_``) and returns ``x`` itself, so the
    caller's tensor, and every tensor sharing its storage, is overwritten. ``"batch"`` and
    ``"global"`` compute out of place. Statistics, running averages and epochs behave exactly
    as in :class:`immutorch.nn.InputNormalization`; only the write differs.

    Use it to reproduce the bug and as the tests' oracle (run it on a clone). Never in code
    that cares about its inputs.
    """

    def __init__(
        self,
        mean_norm: bool = True,
        std_norm: bool = True,
        norm_type: NormType = "global",
        avg_factor: Optional[float] = None,
        requires_grad: bool = False,
        update_until_epoch: int = 3,
    ) -> None:
        super().__init__()
        self.mean_norm = mean_norm
        self.std_norm = std_norm
        self.norm_type = norm_type
        self.avg_factor = avg_factor
        self.requires_grad = requires_grad
        self.update_until_epoch = update_until_epoch
        self.eps = 1e-10
        self.count = 0
        self.glob_mean = torch.tensor([0.0])
        self.glob_std = torch.tensor([0.0])
        self.spk_dict_mean: dict[int, Tensor] = {}
        self.spk_dict_std: dict[int, Tensor] = {}
        self.spk_dict_count: dict[int, int] = {}

    def forward(
        self,
        x: Tensor,
        lengths: Optional[Tensor] = None,
        spk_ids: Optional[Tensor] = None,
        epoch: int = 0,
    ) -> Tensor:
        if lengths is None:
            lengths = torch.ones(x.shape[0])
        sentence_means: list[Tensor] = []
        sentence_stds: list[Tensor] = []
        for i in range(x.shape[0]):
            valid = int(torch.round(lengths[i] * x.shape[1]))
            mean, std = self._stats(x[i, 0:valid])
            sentence_means.append(mean)
            sentence_stds.append(std)
            if self.norm_type == "sentence":
                x[i] = (x[i] - mean) / std  # the bug: a write into the caller's tensor
            elif self.norm_type == "speaker":
                assert spk_ids is not None, "norm_type='speaker' needs spk_ids"
                spk_mean, spk_std = self._speaker(int(spk_ids[i].reshape(-1)[0]), mean, std)
                x[i] = (x[i] - spk_mean) / spk_std  # the same write

        if self.norm_type in ("batch", "global"):
            mean = torch.stack(sentence_means).mean(dim=0)
            std = torch.stack(sentence_stds).mean(dim=0)
            if self.norm_type == "batch":
                return (x - mean) / std
            if self.training:
                if self.count == 0:
                    self.glob_mean, self.glob_std = mean, std
                elif epoch < self.update_until_epoch:
                    w = 1 / (self.count + 1) if self.avg_factor is None else self.avg_factor
                    self.glob_mean = (1 - w) * self.glob_mean + w * mean
                    self.glob_std = (1 - w) * self.glob_std + w * std
                self.count += 1
            return (x - self.glob_mean) / self.glob_std
        return x

    def _stats(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        mean = frames.mean(dim=0).detach() if self.mean_norm else torch.tensor([0.0])
        std = frames.std(dim=0).detach() if self.std_norm else torch.tensor([1.0])
        return mean, torch.max(std, self.eps * torch.ones_like(std))

    def _speaker(self, spk: int, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            return self.spk_dict_mean.get(spk, mean), self.spk_dict_std.get(spk, std)
        if spk in self.spk_dict_mean:
            self.spk_dict_count[spk] += 1
            n = self.spk_dict_count[spk]
            w = 1 / n if self.avg_factor is None else self.avg_factor
            self.spk_dict_mean[spk] = (1 - w) * self.spk_dict_mean[spk] + w * mean
            self.spk_dict_std[spk] = (1 - w) * self.spk_dict_std[spk] + w * std
        else:
            self.spk_dict_mean[spk], self.spk_dict_std[spk] = mean, std
            self.spk_dict_count[spk] = 1
        return self.spk_dict_mean[spk], self.spk_dict_std[spk]


# -- the embedding model -------------------------------------------------------------------


class _TDNNBlock(nn.Module):
    """Conv1d over time, then ReLU, then BatchNorm (ECAPA's order)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(
            in_channels,
            out_channels,
            kernel,
            dilation=dilation,
            padding=dilation * (kernel - 1) // 2,
        )
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.norm(F.relu(self.conv(x)))
        return out


class _SEResBlock(nn.Module):
    """1x1 -> dilated conv -> 1x1, squeeze-excitation gate, residual (a Res2-free SE-Res2)."""

    def __init__(self, channels: int, dilation: int, se_channels: int = 32) -> None:
        super().__init__()
        self.tdnn1 = _TDNNBlock(channels, channels, 1, 1)
        self.tdnn2 = _TDNNBlock(channels, channels, 3, dilation)
        self.tdnn3 = _TDNNBlock(channels, channels, 1, 1)
        self.se_down = nn.Conv1d(channels, se_channels, 1)
        self.se_up = nn.Conv1d(se_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h: Tensor = self.tdnn3(self.tdnn2(self.tdnn1(x)))
        gate = torch.sigmoid(self.se_up(F.relu(self.se_down(h.mean(dim=2, keepdim=True)))))
        return h * gate + x


class _AttentiveStatsPool(nn.Module):
    """Attention-weighted mean and std over the valid frames, concatenated: [B, 2C]."""

    def __init__(self, channels: int, attention_channels: int = 64) -> None:
        super().__init__()
        self.attend = _TDNNBlock(channels, attention_channels, 1, 1)
        self.score = nn.Conv1d(attention_channels, channels, 1)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        n_frames = x.shape[2]
        if lengths is None:
            valid = torch.ones(x.shape[0], 1, n_frames, dtype=torch.bool, device=x.device)
        else:
            frame = torch.arange(n_frames, device=x.device)
            valid = (frame < torch.round(lengths * n_frames)[:, None])[:, None, :]
        logits = self.score(torch.tanh(self.attend(x))).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(logits, dim=2)
        mean = (weights * x).sum(dim=2)
        var = (weights * (x - mean[:, :, None]) ** 2).sum(dim=2)
        return torch.cat([mean, var.clamp_min(1e-8).sqrt()], dim=1)


class SpeakerEncoder(nn.Module):
    """A small ECAPA-TDNN-style speaker embedding model: ``[B, T, n_mels] -> [B, 1, emb]``.

    TDNN front, SE-residual blocks with growing dilation, multi-layer feature aggregation,
    attentive statistics pooling, linear embedding. Random weights from ``seed``; evaluation
    mode by default. Sized to run in a few tens of milliseconds at ``[8, 300, 80]`` on CPU.

    >>> enc = SpeakerEncoder(seed=0)
    >>> enc(torch.randn(2, 50, 80)).shape
    torch.Size([2, 1, 192])
    """

    def __init__(
        self,
        n_mels: int = 80,
        channels: int = 64,
        embedding_size: int = 192,
        dilations: tuple[int, ...] = (2, 3, 4),
        seed: int = 0,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.front = _TDNNBlock(n_mels, channels, 5, 1)
            self.blocks = nn.ModuleList(_SEResBlock(channels, d) for d in dilations)
            self.aggregate = _TDNNBlock(channels * len(dilations), channels * 3, 1, 1)
            self.pool = _AttentiveStatsPool(channels * 3)
            self.pool_norm = nn.BatchNorm1d(channels * 6)
            self.embed = nn.Linear(channels * 6, embedding_size)
        self.eval()

    def forward(self, feats: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        h = self.front(feats.transpose(1, 2))
        outputs = []
        for block in self.blocks:
            h = block(h)
            outputs.append(h)
        pooled = self.pool_norm(self.pool(self.aggregate(torch.cat(outputs, dim=1)), lengths))
        out: Tensor = self.embed(pooled).unsqueeze(1)
        return out


class MelSpectrogramEncoder(nn.Module):
    """Mel spectrogram to speaker embedding, along SpeechBrain's inference path.

    ``encode_mel_spectrogram_batch`` does what SpeechBrain's did: ``mel.to(device)`` (on CPU
    the caller's own tensor, not a copy), ``transpose(1, 2)`` to ``[B, T, n_mels]`` (a view of
    it), ``mods.normalizer(feats, lengths)``, then ``mods.embedding_model(feats)``. With a
    normalizer that writes into its input, the caller's mel changes on CPU.

    >>> enc = MelSpectrogramEncoder(LegacyInputNormalization(norm_type="sentence"))
    >>> mel = synthetic_mel(batch=2, frames=100)
    >>> before = mel.clone()
    >>> enc.encode_mel_spectrogram(mel).shape
    torch.Size([2, 1, 192])
    >>> mse(before, mel) > 0  # the legacy normalizer wrote into the caller's mel
    True
    """

    def __init__(
        self,
        normalizer: nn.Module,
        embedding_model: Optional[nn.Module] = None,
        device: Union[str, torch.device] = "cpu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        model = embedding_model if embedding_model is not None else SpeakerEncoder(seed=seed)
        self.mods = nn.ModuleDict({"normalizer": normalizer, "embedding_model": model})
        self.device = torch.device(device)
        self.to(self.device)
        self.eval()

    def encode_mel_spectrogram(self, mel_spec: Tensor) -> Tensor:
        """Embed one mel spectrogram ``[n_mels, T]`` or a batch ``[B, n_mels, T]``."""
        batch = mel_spec.unsqueeze(0) if mel_spec.dim() == 2 else mel_spec
        return self.encode_mel_spectrogram_batch(batch)

    def encode_mel_spectrogram_batch(
        self, mel_specs: Tensor, lens: Optional[Tensor] = None
    ) -> Tensor:
        """Embed ``[B, n_mels, T]`` with relative lengths ``lens`` (default: all 1.0)."""
        if lens is None:
            lens = torch.ones(mel_specs.shape[0], device=self.device)
        mel_specs, lens = mel_specs.to(self.device), lens.to(self.device)
        feats = torch.transpose(mel_specs, 1, 2)
        feats = self.mods["normalizer"](feats, lens)
        embeddings: Tensor = self.mods["embedding_model"](feats)
        return embeddings

    def forward(self, mel_specs: Tensor, lens: Optional[Tensor] = None) -> Tensor:
        return self.encode_mel_spectrogram_batch(mel_specs, lens)


# -- inputs and helpers --------------------------------------------------------------------


def synthetic_mel(batch: int = 8, n_mels: int = 80, frames: int = 300, seed: int = 0) -> Tensor:
    """A plausible natural-log mel spectrogram batch ``[batch, n_mels, frames]``, float32.

    Spectral tilt, three drifting formant-like bumps, syllable-rate energy modulation with
    short pauses near the log floor, and noise: values roughly in ``[-11, 3]``, mean near
    ``-5``, as from ``log(mel_power + 1e-5)`` of 16 kHz speech. Deterministic in ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    freq = torch.linspace(0.0, 1.0, n_mels)[None, :, None]  # [1, F, 1]
    time = torch.arange(frames, dtype=torch.float32)[None, None, :] / 100.0  # seconds
    level = -1.5 - 4.5 * freq + 0.5 * torch.randn(batch, 1, 1, generator=gen)
    formants = torch.zeros(batch, n_mels, frames)
    for _ in range(3):
        centre = 0.1 + 0.6 * torch.rand(batch, 1, 1, generator=gen)
        drift = 0.05 * torch.sin(
            2 * math.pi * 0.7 * time + 6.0 * torch.rand(batch, 1, 1, generator=gen)
        )
        formants = formants + 2.5 * torch.exp(-(((freq - centre - drift) / 0.06) ** 2))
    rate = 3.0 + 2.0 * torch.rand(batch, 1, 1, generator=gen)
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * rate * time)
    voiced = level + formants * envelope - 3.0 * (1.0 - envelope)
    pause = envelope < 0.08
    noise = 0.6 * torch.randn(batch, n_mels, frames, generator=gen)
    mel = torch.where(pause, torch.full_like(voiced, -10.0), voiced) + noise
    return mel.clamp(min=math.log(1e-5))


def mse(a: Tensor, b: Tensor) -> float:
    """Mean squared difference, as a float (0.0 exactly when the tensors are equal)."""
    return float(((a.double() - b.double()) ** 2).mean())


def legacy_normalizer() -> LegacyInputNormalization:
    """The encoder's normalizer before the fix: writes each sentence back into its input."""
    return LegacyInputNormalization(norm_type="sentence", std_norm=False)


def fixed_normalizer() -> InputNormalization:
    """The encoder's normalizer after the fix: :class:`immutorch.nn.InputNormalization`."""
    return InputNormalization(norm_type="sentence", std_norm=False)


def legacy_encoder(seed: int = 0) -> MelSpectrogramEncoder:
    """The speaker encoder with the legacy normalizer (changes the caller's mel on CPU)."""
    return MelSpectrogramEncoder(legacy_normalizer(), seed=seed)


def fixed_encoder(seed: int = 0) -> MelSpectrogramEncoder:
    """The same encoder, same weights, with the fixed normalizer."""
    return MelSpectrogramEncoder(fixed_normalizer(), seed=seed)
