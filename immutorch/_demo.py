"""``python -m immutorch demo``: the SpeechBrain mel-encoder bug, and what each mode does to it.

One synthetic mel batch goes through the reference speaker encoder
(:mod:`immutorch._reference`) in each configuration, always from a fresh copy of the same mel:
how much the caller's mel changed, whether the embedding equals the unguarded one, and the
time against the unguarded call (best of several single-thread runs).
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

import torch

from ._errors import ImmutableTensorError, MutationWarning
from ._guard import guard
from ._reference import MelSpectrogramEncoder, fixed_encoder, legacy_encoder, mse, synthetic_mel


@dataclass
class DemoRow:
    mode: str
    mel_mse: float  # mean squared change of the caller's mel after the call
    embedding: str  # "yes", "no", or what happened instead
    ratio: Optional[float]  # best time / best unguarded time; None when it did not run
    note: str = ""


def _best_seconds(
    calls: Sequence[Callable[[torch.Tensor], object]], mel: torch.Tensor, repeats: int
) -> list[float]:
    """Best time of each call, round-robin: the minimum is what the code costs when nothing
    else competes for the cores (medians moved by 40% between runs on a busy 2-core machine)."""
    times: list[list[float]] = [[] for _ in calls]
    threads = torch.get_num_threads()
    # One thread: intra-op parallelism on a small batch adds jitter larger than what is measured.
    torch.set_num_threads(1)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection landing in one run is not the code's cost
    try:
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for i, call in enumerate(calls):
                fresh = mel.clone()
                start = time.perf_counter()
                call(fresh)
                times[i].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
        if gc_was_enabled:
            gc.enable()
    return [min(t[1:]) for t in times]


def _same(a: torch.Tensor, b: torch.Tensor) -> str:
    if torch.equal(a, b):
        return "yes"
    return "yes (within 1e-6)" if torch.allclose(a, b, atol=1e-6, rtol=1e-6) else "no"


def run(repeats: int = 5, batch: int = 8, frames: int = 300) -> list[DemoRow]:
    """Run every configuration and return the table's rows."""
    mel = synthetic_mel(batch=batch, frames=frames)
    legacy: MelSpectrogramEncoder = legacy_encoder()
    fixed: MelSpectrogramEncoder = fixed_encoder()

    def unguarded(m: torch.Tensor) -> torch.Tensor:
        return legacy.encode_mel_spectrogram(m)

    def warned(m: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MutationWarning)
            with guard(mode="warn"):
                return legacy.encode_mel_spectrogram(m)

    def cloned(m: torch.Tensor) -> torch.Tensor:
        with guard(mode="clone"):
            return legacy.encode_mel_spectrogram(m)

    def cloned_scoped(m: torch.Tensor) -> torch.Tensor:
        with guard(mode="clone", scope="arguments"):
            return legacy.encode_mel_spectrogram(m)

    def fixed_call(m: torch.Tensor) -> torch.Tensor:
        return fixed.encode_mel_spectrogram(m)

    def fixed_raise(m: torch.Tensor) -> torch.Tensor:
        with guard(mode="raise"):
            return fixed.encode_mel_spectrogram(m)

    timed = [
        ('guard(mode="warn")', warned),
        ('guard(mode="clone")', cloned),
        ('guard(mode="clone", scope="arguments")', cloned_scoped),
        ("fixed InputNormalization", fixed_call),
        ('fixed + guard(mode="raise")', fixed_raise),
    ]
    with torch.no_grad():
        reference = unguarded(mel.clone())
        base, *seconds = _best_seconds([unguarded] + [c for _, c in timed], mel, repeats)
        rows = [
            DemoRow("unguarded (legacy normalizer)", _changed(unguarded, mel), "reference", 1.0)
        ]

        attempt = mel.clone()
        try:
            with guard(mode="raise"):
                legacy.encode_mel_spectrogram(attempt)
            rows.append(DemoRow('guard(mode="raise")', mse(mel, attempt), "no error?", None))
        except ImmutableTensorError as err:
            note = f"{err.op} in {err.where}" + (f" at {err.location}" if err.location else "")
            rows.append(DemoRow('guard(mode="raise")', mse(mel, attempt), "raised", None, note))

        for (name, call), secs in zip(timed, seconds):
            fresh = mel.clone()
            out = call(fresh)
            rows.append(DemoRow(name, mse(mel, fresh), _same(out, reference), secs / base))
    return rows


def _changed(call: Callable[[torch.Tensor], object], mel: torch.Tensor) -> float:
    fresh = mel.clone()
    call(fresh)
    return mse(mel, fresh)


def format_table(rows: list[DemoRow]) -> str:
    header = ("mode", "mel MSE after", "embedding = unguarded", "time vs unguarded")
    body = [
        (
            r.mode,
            f"{r.mel_mse:.4g}",
            r.embedding,
            "n/a" if r.ratio is None else f"{r.ratio:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def main(out: TextIO, repeats: int = 5) -> int:
    print(
        "SpeechBrain's MelSpectrogramEncoder, in miniature: mel [8, 80, 300] -> .to('cpu') ->\n"
        "transpose view -> InputNormalization(norm_type='sentence') -> ECAPA-style encoder.\n"
        "The legacy normalizer writes each normalized row back into the caller's mel.\n",
        file=out,
    )
    rows = run(repeats=repeats)
    print(format_table(rows), file=out)
    notes = [f"{r.mode}: {r.note}" for r in rows if r.note]
    if notes:
        print("\n" + "\n".join(notes), file=out)
    print(
        f"\nTimes are the best of {repeats} runs on this machine (1 thread).",
        file=out,
    )
    return 0
