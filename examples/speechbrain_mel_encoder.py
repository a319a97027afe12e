"""The reference case, narrated: SpeechBrain's mel encoder changed the caller's mel on CPU.

SpeechBrain's ``MelSpectrogramEncoder.encode_mel_spectrogram(mel)`` moved the mel with
``mel.to(device)`` (on CPU: the caller's own tensor), transposed it (a view), and handed it to
``InputNormalization``, which normalized each sentence with ``x[i] = (x[i] - mean) / std``,
a write into the caller's memory (SpeechBrain issue #2390, PR #2504). On CUDA the ``.to``
copy hid it. This script reproduces it with a miniature encoder and shows each way immutorch
deals with it.

    python examples/speechbrain_mel_encoder.py
"""

from __future__ import annotations

import warnings

import torch

import immutorch
from immutorch._reference import fixed_encoder, legacy_encoder, mse, synthetic_mel


def main() -> None:
    torch.set_grad_enabled(False)  # inference, as in SpeechBrain's pretrained interfaces
    original = synthetic_mel(batch=8, n_mels=80, frames=300)  # log-mel [B, 80, T]
    encoder = legacy_encoder()  # random ECAPA-style weights, the pre-fix normalizer
    expected = encoder.encode_mel_spectrogram(original.clone())  # what the embedding should be

    print("1. Unguarded, with the legacy normalizer")
    mel = original.clone()
    embedding = encoder.encode_mel_spectrogram(mel)
    print(f"   caller's mel MSE, before vs after the call: {mse(original, mel):.2f}")
    print("   -> non-zero: the encoder normalized the caller's mel in place (the bug).")
    again = encoder.encode_mel_spectrogram(mel)
    print(
        f"   a second call on the same mel gives another embedding: "
        f"{not torch.equal(again, embedding)}\n"
    )

    print('2. guard(mode="raise"): the write is refused before it happens')
    mel = original.clone()
    try:
        with immutorch.guard(mode="raise"):
            encoder.encode_mel_spectrogram(mel)
    except immutorch.ImmutableTensorError as err:
        print("   " + str(err).replace("\n", "\n   "))
        print(f"   -> op={err.op}, where={err.where}, line={err.location}")
    print(f"   caller's mel MSE: {mse(original, mel):.2f}\n")

    print('3. guard(mode="warn"): every write is reported, and goes ahead')
    mel = original.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", immutorch.MutationWarning)
        with immutorch.guard(mode="warn"):
            encoder.encode_mel_spectrogram(mel)
    reports = [w.message for w in caught if isinstance(w.message, immutorch.MutationWarning)]
    if reports:
        first = reports[0]
        print(
            f"   {len(reports)} warnings, the first: {first.op} in {first.where} "
            f"at {first.location}"
        )
    print(f"   caller's mel MSE: {mse(original, mel):.2f}\n")

    print('4. guard(mode="clone"): the encoder writes into a private copy')
    mel = original.clone()
    with immutorch.guard(mode="clone"):
        embedding = encoder.encode_mel_spectrogram(mel)
    print(
        f"   caller's mel MSE: {mse(original, mel):.2f}; embedding bit-identical to the "
        f"unguarded one: {torch.equal(embedding, expected)}\n"
    )

    print("5. The fix: immutorch.nn.InputNormalization builds a new tensor")
    mel = original.clone()
    embedding = fixed_encoder().encode_mel_spectrogram(mel)
    print(
        f"   caller's mel MSE: {mse(original, mel):.2f}; embedding equal: "
        f"{torch.allclose(embedding, expected, atol=1e-6, rtol=1e-6)}"
    )
    with immutorch.guard(mel, mode="raise"):
        fixed_encoder().encode_mel_spectrogram(mel)
    print('   and it runs cleanly under guard(mel, mode="raise").')


if __name__ == "__main__":
    main()
