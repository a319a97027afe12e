"""Mean and variance normalization of feature batches that never writes into its input.

This is immutorch's reference case: a rebuild of SpeechBrain's ``InputNormalization``
(``speechbrain.processing.features``), same constructor, same ``forward`` arguments, same
statistics, with the one behaviour that made it famous removed.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from typing_extensions import Literal, TypeAlias, get_args

NormType: TypeAlias = Literal["sentence", "batch", "speaker", "global"]
NORM_TYPES: tuple[NormType, ...] = get_args(NormType)


class InputNormalization(nn.Module):
    """Normalize ``[batch, time, features]`` tensors by their mean and standard deviation.

    The statistics are taken over time, frame by frame excluded where ``lengths`` says a
    sentence is padded, and applied in one of four ways (``norm_type``):

    - ``"sentence"``: each sentence by its own statistics;
    - ``"batch"``: every sentence by the average of the sentences' statistics in this batch;
    - ``"speaker"``: each sentence by a running average of its speaker's statistics
      (``spk_ids``), updated in training for every sentence, used as is in eval (a speaker
      never seen falls back to the sentence's own statistics);
    - ``"global"``: every sentence by a running average of the batch statistics, updated in
      training while ``epoch < update_until_epoch`` (``epoch=None``: always).

    The running averages weight the n-th update by ``1/n`` (a plain mean), or by
    ``avg_factor`` when it is set. ``std_norm=False`` divides by 1, ``mean_norm=False``
    subtracts 0. Standard deviations are unbiased and clamped below at ``1e-10``.

    **The bug this class exists to show.** SpeechBrain's original (releases up to 1.0.0)
    normalized ``"sentence"`` and ``"speaker"`` batches row by row with
    ``x[i] = (x[i] - mean) / std``: a ``select`` then ``copy_`` into the tensor it was handed,
    and returned that same tensor object. ``MelSpectrogramEncoder.encode_mel_spectrogram``
    reached it through ``mel.to(device)`` and a ``transpose`` view. On CUDA the ``.to`` made a
    copy, so nothing visible happened; on CPU ``.to`` returns the caller's own tensor and the
    view shares its storage, so every call silently overwrote the caller's mel spectrogram with
    its normalized version (SpeechBrain issue #2390, fixed by PR #2504, which writes into a
    fresh ``torch.empty_like(x)``). Call the encoder twice on the same mel and the second
    embedding came from normalized-twice features.

    **The fix here.** ``forward`` performs no in-place operation on anything: each row is
    computed out of place and the rows are joined with ``torch.stack``, so the result is always
    a new tensor and ``x`` (and ``lengths``, ``spk_ids``) are only read. The numbers are the
    original algorithm's, operation for operation (``immutorch``'s tests compare the two).
    Run it under ``immutorch.guard(x, mode="raise")`` and nothing is raised.

    **Differences from the original**, all at its edges: ``lengths`` defaults to full length
    (the original requires it) and ``spk_ids`` to None (it is required, and may be ``[B]`` or
    ``[B, 1]``, for ``"speaker"``); ``epoch=None`` means "always update" (as in later
    SpeechBrain); an unknown ``norm_type`` is a ``ValueError`` (the original returned its
    input unnormalized); ``"global"`` in eval before any statistics exist raises a
    ``RuntimeError`` (the original divided by zero and returned inf/nan).

    **State.** The running statistics live in ``get_extra_state`` (``state_dict()`` key
    ``"_extra_state"``), not in buffers: their shapes are known only after the first batch
    (the constructor takes no feature size, as in SpeechBrain) and speakers are an open-ended
    dictionary, while buffers need a fixed shape when ``load_state_dict`` copies into them.
    ``.to()``, ``.cuda()``, ``.double()`` move them with the module. ``_save(path)`` and
    ``_load(path)`` read and write the same dictionary as SpeechBrain's checkpoint hooks
    (``count``, ``glob_mean``, ``glob_std``, ``spk_dict_mean``, ``spk_dict_std``,
    ``spk_dict_count``).

    Examples:
        >>> import torch
        >>> from immutorch.nn import InputNormalization
        >>> norm = InputNormalization(norm_type="sentence")
        >>> feats = torch.randn(4, 100, 20, generator=torch.Generator().manual_seed(0)) * 3 + 5
        >>> before = feats.clone()
        >>> out = norm(feats, torch.tensor([1.0, 0.9, 0.8, 0.5]))
        >>> out is feats, torch.equal(feats, before)  # a new tensor; the input is unchanged
        (False, True)
        >>> valid = out[3, :50]  # statistics came from the first half of sentence 3 only
        >>> torch.allclose(valid.mean(dim=0), torch.zeros(20), atol=1e-5)
        True
        >>> torch.allclose(valid.std(dim=0), torch.ones(20), atol=1e-5)
        True
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
        if norm_type not in NORM_TYPES:
            choices = ", ".join(repr(t) for t in NORM_TYPES)
            raise ValueError(
                f"InputNormalization: norm_type must be one of {choices}, got {norm_type!r}"
            )
        self.mean_norm = mean_norm
        self.std_norm = std_norm
        self.norm_type: NormType = norm_type
        self.avg_factor = avg_factor
        # Kept for signature compatibility: the statistics never take part in autograd.
        self.requires_grad = requires_grad
        self.update_until_epoch = update_until_epoch
        self.eps = 1e-10
        self.count = 0
        self.glob_mean: Optional[Tensor] = None
        self.glob_std: Optional[Tensor] = None
        self.spk_dict_mean: dict[int, Tensor] = {}
        self.spk_dict_std: dict[int, Tensor] = {}
        self.spk_dict_count: dict[int, int] = {}

    def forward(
        self,
        x: Tensor,
        lengths: Optional[Tensor] = None,
        spk_ids: Optional[Tensor] = None,
        epoch: Optional[int] = 0,
    ) -> Tensor:
        """Return a new tensor holding ``x`` normalized; ``x`` itself is only read.

        Args:
            x: ``[batch, time, ...]`` features.
            lengths: relative length of each sentence in ``(0, 1]``, e.g. ``[0.7, 1.0]``;
                frames past ``round(length * time)`` are left out of the statistics (they are
                still normalized). None: every sentence is full length.
            spk_ids: one speaker id per sentence (``[batch]`` or ``[batch, 1]``); required for
                ``norm_type="speaker"``.
            epoch: the current epoch; ``"global"`` statistics stop updating once it reaches
                ``update_until_epoch``. None: they never stop.
        """
        n_sentences, n_frames = x.shape[0], x.shape[1]
        if n_sentences == 0:
            return x.clone()
        if lengths is None:
            valid_frames = [n_frames] * n_sentences
        else:
            # One host sync for the whole batch, same rounding as the original per row.
            valid_frames = [int(n) for n in torch.round(lengths[:n_sentences] * n_frames).tolist()]
        if self.norm_type == "speaker" and spk_ids is None:
            raise ValueError(
                "InputNormalization(norm_type='speaker') needs spk_ids, one per sentence"
            )

        means: list[Tensor] = []
        stds: list[Tensor] = []
        rows: list[Tensor] = []
        for i in range(n_sentences):
            mean, std = self._sentence_stats(x[i, : valid_frames[i]])
            if self.norm_type == "sentence":
                rows.append((x[i] - mean) / std)
            elif self.norm_type == "speaker":
                assert spk_ids is not None
                mean, std = self._speaker_stats(_speaker_of(spk_ids, i), mean, std)
                rows.append((x[i] - mean.to(x.device)) / std.to(x.device))
            else:
                means.append(mean)
                stds.append(std)

        if self.norm_type in ("sentence", "speaker"):
            # Out of place: the rows are joined into a new tensor, the caller's x is untouched.
            return torch.stack(rows)

        batch_mean = torch.mean(torch.stack(means), dim=0)
        batch_std = torch.mean(torch.stack(stds), dim=0)
        if self.norm_type == "batch":
            return (x - batch_mean) / batch_std
        glob_mean, glob_std = self._global_stats(batch_mean, batch_std, epoch)
        return (x - glob_mean.to(x.device)) / glob_std.to(x.device)

    def _sentence_stats(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clamped unbiased std over time of one sentence's valid frames, detached."""
        if self.mean_norm:
            mean = torch.mean(frames, dim=0).detach()
        else:
            mean = torch.zeros(1, dtype=frames.dtype, device=frames.device)
        if self.std_norm:
            std = torch.std(frames, dim=0).detach()
        else:
            std = torch.ones(1, dtype=frames.dtype, device=frames.device)
        return mean, torch.clamp_min(std, self.eps)

    def _speaker_stats(self, speaker: int, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """Update (in training) and return the running statistics of ``speaker``."""
        if not self.training:
            if speaker in self.spk_dict_mean:
                return self.spk_dict_mean[speaker], self.spk_dict_std[speaker]
            return mean, std
        if speaker not in self.spk_dict_mean:
            self.spk_dict_mean[speaker] = mean
            self.spk_dict_std[speaker] = std
            self.spk_dict_count[speaker] = 1
        else:
            self.spk_dict_count[speaker] += 1
            weight = self._update_weight(self.spk_dict_count[speaker])
            old_mean = self.spk_dict_mean[speaker].to(mean.device)
            old_std = self.spk_dict_std[speaker].to(std.device)
            self.spk_dict_mean[speaker] = (1 - weight) * old_mean + weight * mean
            self.spk_dict_std[speaker] = (1 - weight) * old_std + weight * std
        return self.spk_dict_mean[speaker], self.spk_dict_std[speaker]

    def _global_stats(
        self, mean: Tensor, std: Tensor, epoch: Optional[int]
    ) -> tuple[Tensor, Tensor]:
        """Update (in training, early epochs) and return the running global statistics."""
        if self.training:
            if self.count == 0 or self.glob_mean is None or self.glob_std is None:
                self.glob_mean, self.glob_std = mean, std
            elif epoch is None or epoch < self.update_until_epoch:
                weight = self._update_weight(self.count + 1)
                self.glob_mean = (1 - weight) * self.glob_mean.to(mean.device) + weight * mean
                self.glob_std = (1 - weight) * self.glob_std.to(std.device) + weight * std
            self.count += 1
        if self.glob_mean is None or self.glob_std is None:
            raise RuntimeError(
                "InputNormalization(norm_type='global') has no statistics yet: run it in "
                "training mode on some batches, or load them with load_state_dict() or _load(), "
                "before using it in eval mode"
            )
        return self.glob_mean, self.glob_std

    def _update_weight(self, n_updates: int) -> float:
        """Weight of the newest statistics in a running average after ``n_updates``."""
        return 1 / n_updates if self.avg_factor is None else self.avg_factor

    # -- state -------------------------------------------------------------------------------

    def _statistics_dict(self) -> dict[str, Any]:
        """The running statistics, in SpeechBrain's checkpoint layout (a snapshot, not views)."""
        return {
            "count": self.count,
            "glob_mean": self.glob_mean,
            "glob_std": self.glob_std,
            "spk_dict_mean": dict(self.spk_dict_mean),
            "spk_dict_std": dict(self.spk_dict_std),
            "spk_dict_count": dict(self.spk_dict_count),
        }

    def _load_statistics_dict(self, state: dict[str, Any]) -> None:
        """Replace the running statistics with those in ``state`` (see ``_statistics_dict``)."""
        self.count = int(state["count"])
        glob_mean, glob_std = state.get("glob_mean"), state.get("glob_std")
        # SpeechBrain saves placeholder zeros before the first update; treat them as "none".
        has_global = self.count > 0 and isinstance(glob_mean, Tensor)
        self.glob_mean = glob_mean if has_global else None
        self.glob_std = glob_std if has_global and isinstance(glob_std, Tensor) else None
        self.spk_dict_mean = {int(k): v for k, v in state.get("spk_dict_mean", {}).items()}
        self.spk_dict_std = {int(k): v for k, v in state.get("spk_dict_std", {}).items()}
        self.spk_dict_count = {int(k): int(v) for k, v in state.get("spk_dict_count", {}).items()}

    def get_extra_state(self) -> dict[str, Any]:
        return self._statistics_dict()

    def set_extra_state(self, state: Any) -> None:
        self._load_statistics_dict(state)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> InputNormalization:
        # Statistics are plain attributes, so .to()/.cuda()/.double() must reach them here.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if self.glob_mean is not None:
            self.glob_mean = fn(self.glob_mean)
        if self.glob_std is not None:
            self.glob_std = fn(self.glob_std)
        self.spk_dict_mean = {k: fn(v) for k, v in self.spk_dict_mean.items()}
        self.spk_dict_std = {k: fn(v) for k, v in self.spk_dict_std.items()}
        return self

    def _save(self, path: Union[str, os.PathLike[str]]) -> None:
        """Save the running statistics to ``path`` (SpeechBrain's checkpoint hook)."""
        torch.save(self._statistics_dict(), path)

    def _load(
        self,
        path: Union[str, os.PathLike[str]],
        end_of_epoch: bool = False,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        """Load statistics saved by ``_save`` (or by SpeechBrain's own ``InputNormalization``).

        ``end_of_epoch`` is accepted for checkpointer compatibility and ignored.
        """
        del end_of_epoch
        state = torch.load(path, map_location=device or "cpu", weights_only=True)
        self._load_statistics_dict(state)

    def extra_repr(self) -> str:
        return (
            f"norm_type={self.norm_type!r}, mean_norm={self.mean_norm}, "
            f"std_norm={self.std_norm}, avg_factor={self.avg_factor}, "
            f"update_until_epoch={self.update_until_epoch}"
        )


def _speaker_of(spk_ids: Tensor, index: int) -> int:
    """The speaker id of sentence ``index``; ids may be ``[batch]`` or ``[batch, 1]``."""
    spk = spk_ids[index]
    return int(spk.reshape(-1)[0]) if isinstance(spk, Tensor) else int(spk)
