"""Spectral transforms shared by the model families.

- :mod:`.stft`: STFT/ISTFT with Open-Unmix's conventions, magnitudes, bandwidth -> bin.
- :mod:`.wiener`: multichannel Wiener filtering with EM refinement.
"""
from .stft import STFT, bandwidth_to_max_bin, magnitude  # noqa: F401
from .wiener import wiener  # noqa: F401
