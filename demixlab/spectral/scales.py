"""Monotone frequency scales for the sliced constant-Q transform (:mod:`.slicqt`).

A scale gives the centre frequency ``F(b)`` and the Q factor ``Q(b)`` of each band ``b``:

- ``bark``: equally spaced on the Bark scale (6 asinh(f / 600));
- ``mel``: equally spaced on the mel scale (2595 log10(1 + f / 700));
- ``cqlog``: constant-Q, geometrically spaced from ``fmin`` to ``fmax``;
- ``vqlog``: variable-Q, ``cqlog`` shifted up by ``gamma`` Hz (wider low bands);
- ``linear``: equally spaced in Hz;
- ``oct``: constant-Q with ``bins`` bands per octave (the band count follows from the range).

Q factors without a closed form (bark, mel) are the numerical derivative used by the NSGT
literature, so that window lengths match the published transforms exactly.
"""
import math
import typing as tp

import numpy as np

from ..errors import DemixError

SCALES = ("bark", "mel", "cqlog", "vqlog", "linear", "oct")


class FrequencyScale:
    """Base class: `bands` centre frequencies `F(b)` and Q factors `Q(b)`, b = 0 .. bands - 1."""

    step = 1e-8  # band step of the numerical derivative in `Q`

    def __init__(self, bands: int):
        self.bands = bands

    def __len__(self) -> int:
        return self.bands

    def F(self, band: float) -> float:  # noqa: N802 (the NSGT literature's name)
        """Centre frequency (Hz) of (fractional) band `band`."""
        raise NotImplementedError

    def Q(self, band: float) -> float:  # noqa: N802
        """Q factor (centre frequency / bandwidth) of band `band`."""
        return self.F(band) * self.step / (self.F(band + self.step) - self.F(band - self.step))

    def frequencies(self) -> tp.Tuple[np.ndarray, np.ndarray]:
        """(centre frequencies, Q factors) of all bands, float64 arrays."""
        freqs = np.array([self.F(b) for b in range(self.bands)], dtype=np.float64)
        q = np.array([self.Q(b) for b in range(self.bands)], dtype=np.float64)
        return freqs, q


class BarkScale(FrequencyScale):
    """Bands equally spaced in Bark between `fmin` and `fmax`."""

    def __init__(self, fmin: float, fmax: float, bands: int):
        super().__init__(bands)
        self.low = self.hz_to_bark(fmin)
        self.per_band = (self.hz_to_bark(fmax) - self.low) / (bands - 1)

    @staticmethod
    def hz_to_bark(freq: float) -> float:
        """Hz -> Bark."""
        return 6.0 * math.asinh(freq / 600.0)

    @staticmethod
    def bark_to_hz(bark: float) -> float:
        """Bark -> Hz."""
        return 600.0 * math.sinh(bark / 6.0)

    def F(self, band: float) -> float:  # noqa: N802
        """Centre frequency (Hz) of band `band`."""
        return self.bark_to_hz(band * self.per_band + self.low)


class MelScale(FrequencyScale):
    """Bands equally spaced in mel between `fmin` and `fmax`."""

    def __init__(self, fmin: float, fmax: float, bands: int):
        super().__init__(bands)
        self.low = self.hz_to_mel(fmin)
        self.per_band = (self.hz_to_mel(fmax) - self.low) / (bands - 1)

    @staticmethod
    def hz_to_mel(freq: float) -> float:
        """Hz -> mel."""
        return math.log10(freq / 700.0 + 1.0) * 2595.0

    @staticmethod
    def mel_to_hz(mel: float) -> float:
        """mel -> Hz."""
        return (math.pow(10.0, mel / 2595.0) - 1.0) * 700.0

    def F(self, band: float) -> float:  # noqa: N802
        """Centre frequency (Hz) of band `band`."""
        return self.mel_to_hz(band * self.per_band + self.low)


class LogScale(FrequencyScale):
    """Geometrically spaced bands from `fmin` to `fmax` with one Q; `gamma` Hz shifts every band up
    (variable-Q: the low bands get wider)."""

    def __init__(self, fmin: float, fmax: float, bands: int, gamma: float = 0.0):
        super().__init__(bands)
        octaves_per_band = (math.log2(fmax) - math.log2(fmin)) / (bands - 1)
        self.fmin = float(fmin)
        self.ratio = 2.0 ** octaves_per_band
        self.q = math.sqrt(self.ratio) / (self.ratio - 1.0) / 2.0
        self.gamma = float(gamma)

    def F(self, band: float) -> float:  # noqa: N802
        """Centre frequency (Hz) of band `band`."""
        return self.fmin * self.ratio ** band + self.gamma

    def Q(self, band: float) -> float:  # noqa: N802
        """The one Q factor of every band."""
        return self.q


class OctScale(LogScale):
    """Constant-Q bands, `bins_per_octave` per octave from `fmin`, the last one at `fmax`."""

    def __init__(self, fmin: float, fmax: float, bins_per_octave: int):
        bands = int(math.ceil((math.log2(fmax) - math.log2(fmin)) * bins_per_octave)) + 1
        super().__init__(fmin, fmax, bands)


class LinearScale(FrequencyScale):
    """Bands equally spaced in Hz from `fmin` to `fmax`."""

    def __init__(self, fmin: float, fmax: float, bands: int):
        super().__init__(bands)
        self.fmin = float(fmin)
        self.spacing = float(fmax - fmin) / (bands - 1)

    def F(self, band: float) -> float:  # noqa: N802
        """Centre frequency (Hz) of band `band`."""
        return band * self.spacing + self.fmin

    def Q(self, band: float) -> float:  # noqa: N802
        """Q factor of band `band` (bandwidth twice the spacing)."""
        return self.F(band) / (self.spacing * 2.0)


def make_scale(scale: str, fbins: int, fmin: float, fmax: float = 22050.0, gamma: float = 15.0) -> FrequencyScale:
    """The frequency scale `scale` (one of :data:`SCALES`) with `fbins` bands from `fmin` to `fmax` Hz.

    For ``oct``, `fbins` is the number of bands per octave; `gamma` (Hz) is only used by ``vqlog``.
    Raises :class:`DemixError` for an unknown scale or an empty / inverted range.
    """
    if scale not in SCALES:
        raise DemixError(f"unknown sliCQT scale {scale!r}: expected one of {', '.join(SCALES)}")
    if not 0 < fmin < fmax:
        raise DemixError(f"sliCQT frequency range must satisfy 0 < fmin < fmax, got fmin={fmin}, fmax={fmax}")
    if int(fbins) != fbins or fbins < 2:
        raise DemixError(f"sliCQT fbins must be an integer >= 2, got {fbins}")
    fbins = int(fbins)
    if scale == "bark":
        return BarkScale(fmin, fmax, fbins)
    if scale == "mel":
        return MelScale(fmin, fmax, fbins)
    if scale == "cqlog":
        return LogScale(fmin, fmax, fbins)
    if scale == "vqlog":
        return LogScale(fmin, fmax, fbins, gamma=gamma)
    if scale == "linear":
        return LinearScale(fmin, fmax, fbins)
    return OctScale(fmin, fmax, fbins)


def suggested_lengths(freqs: np.ndarray, q: np.ndarray, samplerate: float) -> tp.Tuple[int, int]:
    """(slice length, transition length) in samples for bands `freqs` with Q factors `q`.

    The slice holds 8 periods of the widest analysis window: ceil(max(q * 8 * rate / f)), rounded up to a
    multiple of 4; the transition is a quarter of it, rounded up to an even number.
    """
    slice_length = int(math.ceil(float(np.max(q * 8.0 * samplerate / freqs))))
    slice_length += -slice_length % 4
    transition = slice_length // 4
    transition += -transition % 2
    return slice_length, transition
