"""Mel filter banks on the Slaney mel scale (the definition librosa uses by default).

The mel scale is linear below 1 kHz (200/3 Hz per mel) and logarithmic above (27 mels per factor
6.4). A filter bank of `n` triangles spans `n + 2` points equally spaced in mel between `fmin` and
`fmax`; each triangle rises from one point to the next and falls to the one after, and is scaled
to unit area ("Slaney" normalisation). The weights are float32, as librosa returns them, so
that which bins a triangle touches (a weight > 0) is the same bit for bit.
"""
import numpy as np

_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(frequencies: np.ndarray) -> np.ndarray:
    """Frequencies in Hz to Slaney mels (float64)."""
    frequencies = np.asarray(frequencies, dtype=np.float64)
    mels = frequencies / _F_SP
    log_part = frequencies >= _MIN_LOG_HZ
    safe = np.where(log_part, frequencies, _MIN_LOG_HZ)
    return np.where(log_part, _MIN_LOG_MEL + np.log(safe / _MIN_LOG_HZ) / _LOG_STEP, mels)


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Slaney mels to frequencies in Hz (float64)."""
    mels = np.asarray(mels, dtype=np.float64)
    frequencies = _F_SP * mels
    log_part = mels >= _MIN_LOG_MEL
    return np.where(log_part, _MIN_LOG_HZ * np.exp(_LOG_STEP * (mels - _MIN_LOG_MEL)), frequencies)


def mel_filter_bank(samplerate: int, n_fft: int, bands: int, fmin: float = 0.0,
                    fmax: float = None) -> np.ndarray:  # type: ignore[assignment]
    """Triangular mel filters, float32 of shape (bands, n_fft // 2 + 1), Slaney-normalised.

    Args:
        samplerate: sample rate in Hz of the signal the STFT analyses.
        n_fft: FFT size (the bins are those of a one-sided spectrum).
        bands: number of triangles.
        fmin, fmax: range in Hz covered by the triangles (default: 0 to half the sample rate).
    """
    fmax = samplerate / 2.0 if fmax is None else float(fmax)
    bins = np.fft.rfftfreq(n_fft, d=1.0 / samplerate)
    points = mel_to_hz(np.linspace(hz_to_mel(np.float64(fmin)), hz_to_mel(np.float64(fmax)), bands + 2))
    widths = np.diff(points)
    distances = points[:, None] - bins[None, :]
    weights = np.zeros((bands, len(bins)), dtype=np.float32)
    for band in range(bands):
        rising = -distances[band] / widths[band]
        falling = distances[band + 2] / widths[band + 1]
        weights[band] = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (points[2:bands + 2] - points[:bands]))[:, None]
    return weights
