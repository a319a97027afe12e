"""Drop-in modules that never write into the tensors they are handed.

``InputNormalization`` is immutorch's reference case: SpeechBrain's feature normalizer, whose
in-place per-row write changed the caller's mel spectrogram on CPU, rebuilt without the write.
"""

from ._normalization import InputNormalization as InputNormalization

__all__ = ["InputNormalization"]

InputNormalization.__module__ = "immutorch.nn"
