"""STFT/ISTFT and magnitudes shared by every model family.

Conventions: waveforms are real tensors (..., C, T); spectrograms are (..., C, F, N) with
F = n_fft // 2 + 1 frequency bins and N frames (complex for STFTs, real for magnitudes).
The STFT uses a Hann window, `center=True` and reflect padding, like Open-Unmix's `Separator`.
"""
import math

import torch
from torch import nn

from ..errors import DemixError


def bandwidth_to_max_bin(rate: float, n_fft: int, bandwidth: float) -> int:
    """Number of STFT bins whose centre frequency is at most `bandwidth` Hz.

    16 kHz at 44.1 kHz with `n_fft=4096` gives 1487. The result is capped at `n_fft // 2 + 1`.
    """
    if bandwidth < 0:
        raise ValueError(f"bandwidth must be non-negative, got {bandwidth}")
    # bin k is at k * rate / n_fft Hz; kept when k * rate <= bandwidth * n_fft.
    last = math.floor(bandwidth * n_fft / rate)
    return min(last, n_fft // 2) + 1


def magnitude(spec: torch.Tensor) -> torch.Tensor:
    """Magnitude of a complex spectrogram."""
    return spec.abs()


class STFT(nn.Module):
    """Short-time Fourier transform of (..., T) waveforms into (..., F, N) complex spectrograms.

    `inverse` undoes it, cropping or padding to an exact length. The Hann window is a
    non-persistent buffer: it follows `.to(device)` but is not part of the state dict.
    """

    def __init__(self, n_fft: int = 4096, hop_length: int = 1024):
        super().__init__()
        if n_fft < 2 or not 0 < hop_length <= n_fft:
            raise ValueError(f"invalid STFT settings: n_fft={n_fft}, hop_length={hop_length}")
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    @property
    def nb_bins(self) -> int:
        """Number of frequency bins F."""
        return self.n_fft // 2 + 1

    def nb_frames(self, length: int) -> int:
        """Number of frames N for a waveform of `length` samples."""
        return length // self.hop_length + 1

    def _window_like(self, x: torch.Tensor) -> torch.Tensor:
        # Callers may hand CPU batches to a GPU model (or float64 signals): follow the input.
        return self.window.to(device=x.device, dtype=x.real.dtype)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(..., T) real waveform -> (..., F, N) complex spectrogram."""
        *others, length = wav.shape
        if length <= self.n_fft // 2:
            raise DemixError(f"audio too short for the STFT: {length} samples, "
                             f"need more than {self.n_fft // 2} (n_fft={self.n_fft})")
        spec = torch.stft(wav.reshape(-1, length), n_fft=self.n_fft, hop_length=self.hop_length,
                          window=self._window_like(wav), center=True, pad_mode="reflect",
                          normalized=False, onesided=True, return_complex=True)
        return spec.reshape(*others, *spec.shape[-2:])

    def inverse(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """(..., F, N) complex spectrogram -> (..., length) real waveform."""
        *others, bins, frames = spec.shape
        wav = torch.istft(spec.reshape(-1, bins, frames), n_fft=self.n_fft, hop_length=self.hop_length,
                          window=self._window_like(spec), center=True, normalized=False, onesided=True,
                          length=length)
        return wav.reshape(*others, length)
