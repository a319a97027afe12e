"""The reference case: immutorch.nn.InputNormalization against the original algorithm.

The oracle is ``immutorch._reference.LegacyInputNormalization`` (SpeechBrain's algorithm up to
1.0.0, in-place write included) run on a clone of each input.
"""

from __future__ import annotations

import doctest
import io
from collections.abc import Iterator
from typing import Any, Optional

import pytest
import torch
from torch import Tensor

import immutorch
import immutorch._reference as reference
import immutorch.nn
from immutorch._reference import LegacyInputNormalization, mse, synthetic_mel
from immutorch.nn import InputNormalization

CONFIGS: list[dict[str, Any]] = [
    {"norm_type": "sentence"},
    {"norm_type": "sentence", "std_norm": False},
    {"norm_type": "sentence", "mean_norm": False},
    {"norm_type": "batch"},
    {"norm_type": "batch", "mean_norm": False, "std_norm": False},
    {"norm_type": "global"},
    {"norm_type": "global", "avg_factor": 0.2},
    {"norm_type": "global", "update_until_epoch": 1},
    {"norm_type": "global", "std_norm": False},
    {"norm_type": "speaker"},
    {"norm_type": "speaker", "avg_factor": 0.3},
    {"norm_type": "speaker", "mean_norm": False},
]
IDS = ["-".join(f"{k}={v}" for k, v in cfg.items()) for cfg in CONFIGS]

# Relative lengths with padding; every sentence keeps at least a few frames.
LENGTHS = torch.tensor([1.0, 0.9, 0.75, 0.5, 1.0, 0.6])
EPOCHS = [0, 0, 1, 2, 3, 4]  # past the default update_until_epoch=3


def _batch(seed: int, batch: int = 6, frames: int = 40, feats: int = 13) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, feats, generator=gen) * 2.0 + 3.0


def _speakers(seed: int, batch: int = 6) -> Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, 3, (batch, 1), generator=gen)  # repeats within a batch


def _steps(n: int, first_seed: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor, int]]:
    for step in range(n):
        yield _batch(first_seed + step), LENGTHS, _speakers(first_seed + step), EPOCHS[step]


def _bytes(t: Tensor) -> bytes:
    return bytes(t.detach().contiguous().numpy().tobytes())


def _assert_matches(fixed_out: Tensor, legacy_out: Tensor) -> None:
    torch.testing.assert_close(fixed_out, legacy_out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_matches_original_in_training_then_eval(config: dict[str, Any]) -> None:
    fixed = InputNormalization(**config)
    legacy = LegacyInputNormalization(**config)
    for x, lengths, spk_ids, epoch in _steps(len(EPOCHS)):
        out = fixed(x, lengths, spk_ids, epoch)
        _assert_matches(out, legacy(x.clone(), lengths, spk_ids, epoch))
    fixed.eval()
    legacy.eval()
    for x, lengths, _, epoch in _steps(2, first_seed=50):
        spk_ids = torch.tensor([[0], [1], [2], [7], [0], [7]])  # 7 was never seen
        out = fixed(x, lengths, spk_ids, epoch)
        _assert_matches(out, legacy(x.clone(), lengths, spk_ids, epoch))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_never_writes_into_its_inputs(config: dict[str, Any]) -> None:
    norm = InputNormalization(**config)
    for x, lengths, spk_ids, epoch in _steps(3):
        snapshot = [_bytes(t) for t in (x, lengths, spk_ids)]
        versions = [t._version for t in (x, lengths, spk_ids)]
        out = norm(x, lengths, spk_ids, epoch)
        assert [_bytes(t) for t in (x, lengths, spk_ids)] == snapshot
        assert [t._version for t in (x, lengths, spk_ids)] == versions
        assert out is not x
        assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_global_statistics_stop_updating_at_update_until_epoch() -> None:
    norm = InputNormalization(norm_type="global", update_until_epoch=2)
    seen = []
    for x, lengths, _, epoch in _steps(len(EPOCHS)):
        norm(x, lengths, epoch=epoch)
        assert norm.glob_mean is not None
        seen.append((epoch, norm.glob_mean.clone()))
    assert norm.count == len(EPOCHS)
    frozen = [mean for epoch, mean in seen if epoch >= 1]  # the last update ran at epoch 1
    assert all(torch.equal(frozen[0], m) for m in frozen)
    assert not torch.equal(seen[0][1], seen[1][1])


def test_epoch_none_always_updates() -> None:
    norm = InputNormalization(norm_type="global", update_until_epoch=0)
    x = _batch(0)
    norm(x)
    first = norm.glob_mean
    norm(_batch(1), epoch=None)
    assert first is not None and norm.glob_mean is not None
    assert not torch.equal(first, norm.glob_mean)


def test_lengths_default_to_full_sentences() -> None:
    x = _batch(0)
    norm = InputNormalization(norm_type="sentence")
    torch.testing.assert_close(norm(x), norm(x, torch.ones(x.shape[0])), atol=0, rtol=0)


def test_speaker_ids_may_be_one_dimensional() -> None:
    x, lengths, spk_ids, _ = next(_steps(1))
    a = InputNormalization(norm_type="speaker")(x, lengths, spk_ids)
    b = InputNormalization(norm_type="speaker")(x, lengths, spk_ids.reshape(-1))
    assert torch.equal(a, b)


def test_gradients_match_the_original() -> None:
    x = _batch(3).requires_grad_()
    InputNormalization(norm_type="sentence")(x, LENGTHS).pow(2).sum().backward()
    x_legacy = x.detach().clone().requires_grad_()
    legacy = LegacyInputNormalization(norm_type="sentence")
    legacy(x_legacy.clone(), LENGTHS).pow(2).sum().backward()
    assert x.grad is not None and x_legacy.grad is not None
    torch.testing.assert_close(x.grad, x_legacy.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if c["norm_type"] in ("global", "speaker")], ids=str
)
def test_state_dict_round_trip_gives_identical_outputs(config: dict[str, Any]) -> None:
    trained = InputNormalization(**config)
    for x, lengths, spk_ids, epoch in _steps(4):
        trained(x, lengths, spk_ids, epoch)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    restored = InputNormalization(**config)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for module in (trained, restored):
        module.eval()
    x, lengths, spk_ids, _ = next(_steps(1, first_seed=77))
    assert torch.equal(trained(x, lengths, spk_ids), restored(x, lengths, spk_ids))


def test_state_dict_is_a_snapshot() -> None:
    norm = InputNormalization(norm_type="speaker")
    x, lengths, spk_ids, _ = next(_steps(1))
    norm(x, lengths, spk_ids)
    saved = norm.state_dict()["_extra_state"]
    means = {k: v.clone() for k, v in saved["spk_dict_mean"].items()}
    norm(_batch(9), lengths, spk_ids)  # keeps training
    assert all(torch.equal(saved["spk_dict_mean"][k], v) for k, v in means.items())


def test_save_and_load_files(tmp_path: Any) -> None:
    trained = InputNormalization(norm_type="global")
    for x, lengths, _, epoch in _steps(3):
        trained(x, lengths, epoch=epoch)
    trained._save(tmp_path / "normalizer.ckpt")
    restored = InputNormalization(norm_type="global")
    restored._load(tmp_path / "normalizer.ckpt")
    assert restored.count == trained.count
    trained.eval()
    restored.eval()
    x = _batch(5)
    assert torch.equal(trained(x, LENGTHS), restored(x, LENGTHS))


def test_to_moves_the_running_statistics() -> None:
    norm = InputNormalization(norm_type="speaker")
    x, lengths, spk_ids, _ = next(_steps(1))
    norm(x, lengths, spk_ids)
    norm.double()
    assert all(v.dtype == torch.float64 for v in norm.spk_dict_mean.values())


def test_refuses_what_the_original_got_silently_wrong() -> None:
    with pytest.raises(ValueError, match="norm_type must be one of"):
        InputNormalization(norm_type="utterance")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs spk_ids"):
        InputNormalization(norm_type="speaker")(_batch(0))
    with pytest.raises(RuntimeError, match="no statistics yet"):
        InputNormalization(norm_type="global").eval()(_batch(0))


# -- the encoder path: where the bug was seen ------------------------------------------------


def test_legacy_normalizer_changes_the_callers_mel_on_cpu() -> None:
    encoder = reference.legacy_encoder()
    mel = synthetic_mel(batch=4, frames=120)
    before = mel.clone()
    encoder.encode_mel_spectrogram(mel)
    assert mse(before, mel) > 1.0
    x = _batch(0)
    assert LegacyInputNormalization(norm_type="sentence")(x) is x


def test_fixed_encoder_keeps_the_mel_and_the_embedding() -> None:
    mel = synthetic_mel(batch=4, frames=120)
    snapshot = _bytes(mel)
    embedding = reference.fixed_encoder().encode_mel_spectrogram(mel)
    assert _bytes(mel) == snapshot
    expected = reference.legacy_encoder().encode_mel_spectrogram(mel.clone())
    torch.testing.assert_close(embedding, expected, atol=1e-6, rtol=1e-6)


def test_encoder_construction_is_deterministic() -> None:
    a, b = reference.fixed_encoder(seed=3), reference.fixed_encoder(seed=3)
    mel = synthetic_mel(batch=2, frames=60)
    assert torch.equal(a.encode_mel_spectrogram(mel), b.encode_mel_spectrogram(mel))
    assert torch.equal(synthetic_mel(seed=1), synthetic_mel(seed=1))


def test_docstring_examples() -> None:
    for module in (immutorch.nn, reference):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0


# -- under immutorch's own guard -------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_fixed_normalizer_passes_a_raising_guard(config: dict[str, Any]) -> None:
    norm = InputNormalization(**config)
    for x, lengths, spk_ids, epoch in _steps(3):
        with immutorch.guard(x, lengths, spk_ids, mode="raise"):
            norm(x, lengths, spk_ids, epoch)


def test_fixed_normalizer_passes_immutable_inputs() -> None:
    norm = InputNormalization(norm_type="sentence")

    @immutorch.immutable_inputs
    def normalize(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
        out: Tensor = norm(x, lengths)
        return out

    x = _batch(0)
    snapshot = _bytes(x)
    normalize(x, LENGTHS)
    assert _bytes(x) == snapshot


def test_guard_stops_the_legacy_write_before_it_happens() -> None:
    x = _batch(0)
    snapshot = _bytes(x)
    with pytest.raises(immutorch.ImmutableTensorError) as info, immutorch.guard(x, mode="raise"):
        LegacyInputNormalization(norm_type="sentence")(x, LENGTHS)
    assert info.value.op == "aten::copy_"
    assert _bytes(x) == snapshot
