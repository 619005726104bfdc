"""Spectral transforms shared by the model families.

- :mod:`.stft`: STFT/ISTFT with Open-Unmix's conventions (also of a signal arriving in blocks),
  magnitudes, bandwidth -> bin.
- :mod:`.wiener`: multichannel Wiener filtering with EM refinement.
- :mod:`.slicqt`: the sliced constant-Q transform (sliCQT) on the frequency scales of :mod:`.scales`
  (also of a signal arriving in blocks).
- :mod:`.plot`: ragged sliCQT spectrogram plots (matplotlib, imported on use).
"""
from .stft import STFT, StreamingISTFT, StreamingSTFT, bandwidth_to_max_bin, magnitude  # noqa: F401
from .wiener import bins_contiguous, wiener  # noqa: F401
from .scales import SCALES, FrequencyScale, make_scale, suggested_lengths  # noqa: F401
from .slicqt import (SliCQT, StreamingInverseSliCQT, StreamingSliCQT, flatten_slices, overlap_add,  # noqa: F401
                     unflatten_slices)
