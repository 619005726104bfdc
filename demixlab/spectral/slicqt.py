"""Sliced constant-Q transform (sliCQT): a sliced non-stationary Gabor transform (NSGT).

The waveform is cut into slices of `slice_length` samples that overlap by 50% (hop
`slice_length / 2`), each multiplied by a Tukey window whose flat part is the middle half of the
slice, so that overlapping windows sum to one. Each slice is analysed by a bank of band-pass
windows placed on a frequency scale (:mod:`.scales`): channel ``k`` keeps ``T_k`` FFT bins
around its centre frequency, weighted by a Blackman-Harris window, and an inverse FFT of length
``T_k`` gives its ``T_k`` complex coefficients for the slice. Channels are DC, the scale's bands
below Nyquist, and Nyquist. Contiguous channels with the same ``T_k`` form a *block*, so the
transform is a ragged list of tensors ``(..., C, F_b, S, T_b)``: ``F_b`` channels, ``S`` slices,
``T_b`` coefficients per slice.

The inverse uses the canonical dual windows (the frame operator of these painless frames is
diagonal in frequency), then overlap-adds the slices: reconstruction is exact up to rounding
(about 1e-7 in float32, 1e-15 in float64). Coefficients match the NSGT reference (nsgt 0.19 with
``real=True``, including its per-slice coefficient rotation), which this module reproduces with
one gather (analysis) and one index-add (synthesis) over precomputed 1-D tables, one FFT over all
slices, and one inverse FFT per block: cheap to differentiate both ways, and memory that grows
with the signal only. Mirrored (negative-frequency) windows that reach the positive half of the
spectrum add the conjugate of their twin's coefficients in the inverse, as in nsgt 0.19.

Conventions of the flattened view used by sliCQ networks: :func:`flatten_slices` turns a block
``(..., F_b, S, T_b)`` into ``(..., F_b, S * T_b)`` (slices side by side, overlap not undone) and
:func:`unflatten_slices` goes back, cropping what a network added at the end.
:func:`overlap_add` adds the 50% overlapping slices instead (the time axis of a spectrogram plot).

:class:`StreamingSliCQT` and :class:`StreamingInverseSliCQT` compute the same transform and inverse
on a signal that arrives in blocks (a slice as soon as the samples under its window arrived).
"""
import math
import typing as tp

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DemixError
from .scales import make_scale, suggested_lengths

MIN_WINDOW = 16  # shortest band-pass window (coefficients per slice), as in the reference transform


def _blackman_harris(length: int) -> np.ndarray:
    """Blackman-Harris window of `length` samples centred on index 0 (i.e. fft-shifted)."""
    period = (length // 2) * 2
    k = np.arange(length) * (2 * np.pi / period)
    window = 0.35872 - 0.48832 * np.cos(k) + 0.14128 * np.cos(2 * k) - 0.01168 * np.cos(3 * k)
    return np.roll(window, length // 2)


def _hann_centred(length: int) -> np.ndarray:
    """Hann window of `length` samples centred on index 0."""
    return 0.5 + 0.5 * np.cos(np.arange(length) * (2 * np.pi / length))


def _tukey_slice_window(slice_length: int, transition: int) -> np.ndarray:
    """Slice window: 0 in the outer quarters, 1 in the middle half, Hann ramps of `transition` samples
    centred on the quarter points, so that windows shifted by half a slice sum to one."""
    quarter, half_transition = slice_length // 4, transition // 2
    ramp = _hann_centred(2 * transition)
    window = np.zeros(slice_length)
    window[quarter - half_transition:quarter + half_transition] = ramp[transition:]
    window[quarter + half_transition:3 * quarter - half_transition] = 1.0
    window[3 * quarter - half_transition:3 * quarter + half_transition] = ramp[:transition]
    return window


class _Frame(tp.NamedTuple):
    """Band-pass windows of all channels of one slice, positive and mirrored (negative) frequencies."""

    windows: tp.List[np.ndarray]  # analysis window per channel, centred on index 0 (length = T_k)
    duals: tp.List[np.ndarray]  # canonical dual (synthesis) windows
    indices: tp.List[np.ndarray]  # FFT bin of each window sample, in [0, slice_length)
    centres: np.ndarray  # centre bin per channel (even)
    positive: int  # channels 0 .. positive - 1 are DC, the bands, Nyquist; the rest mirror 1 .. positive - 2


def _frame(freqs: np.ndarray, q: np.ndarray, samplerate: float, slice_length: int) -> _Frame:
    """Windows, dual windows and bin positions of the sliced NSGT of bands `freqs` (Hz) with Q `q`."""
    nyquist = samplerate / 2.0
    keep = (freqs > 0) & (freqs < nyquist)  # bands at or above Nyquist are replaced by the Nyquist channel
    freqs, q = freqs[keep], q[keep]
    if len(freqs) < 2 or np.any(np.diff(freqs) <= 0) or np.any(q <= 0):
        raise DemixError("sliCQT scale must give at least 2 increasing band frequencies below Nyquist "
                         f"({nyquist:g} Hz) with positive Q factors")
    bands = len(freqs)
    centre_hz = np.concatenate(([0.0], freqs, [nyquist]))
    centre = np.concatenate((centre_hz, samplerate - centre_hz[-2:0:-1])) * (slice_length / samplerate)

    # Bandwidths in bins: distance between neighbours, Q-based for the outer bands, a multiple of 4.
    width = np.zeros(len(centre))
    width[0] = 2 * centre[1]
    width[1] = centre[1] / q[0]
    for k in [*range(2, bands), bands + 1]:
        width[k] = centre[k + 1] - centre[k - 1]
    width[bands] = centre[bands] / q[bands - 1]
    width[bands + 2:] = width[bands:0:-1]
    lengths = np.maximum(np.round(width / 4.0).astype(np.int64) * 4, MIN_WINDOW)
    if lengths.max() > slice_length:
        raise DemixError(f"sliCQT band too wide for the slice ({lengths.max()} > {slice_length} bins): "
                         "use more bins or a higher fmin")

    windows = [_blackman_harris(int(n)) for n in lengths]
    for outer, inner in ((0, 1), (bands + 1, bands + 2)):  # flat-top DC and Nyquist windows
        if lengths[outer] > lengths[inner]:
            n_outer, n_inner = int(lengths[outer]), int(lengths[inner])
            flat = np.ones(n_outer)
            flat[n_outer // 2 - n_inner // 2:n_outer // 2 + math.ceil(n_inner / 2)] = _hann_centred(n_inner)
            windows[outer] = flat

    centres = np.round(centre / 2.0).astype(np.int64) * 2
    shifts = np.concatenate(([(-centres[-1]) % slice_length], np.diff(centres)))
    positions = np.cumsum(shifts)
    if positions[-1] != slice_length:
        raise DemixError(f"sliCQT windows do not tile the slice ({positions[-1]} != {slice_length} bins)")
    positions -= shifts[0]

    indices = []
    for window, position in zip(windows, positions):
        n = len(window)
        signed = np.arange(n)
        signed[(n + 1) // 2:] -= n  # sample m of a window centred on index 0 sits at offset m or m - n
        indices.append((position + signed) % slice_length)

    diagonal = np.zeros(slice_length)  # the frame operator is diagonal in frequency
    for window, index in zip(windows, indices):
        np.add.at(diagonal, index, len(window) * window ** 2)
    duals = [window / diagonal[index] for window, index in zip(windows, indices)]
    return _Frame(windows, duals, indices, positions, bands + 2)


def flatten_slices(block: torch.Tensor) -> torch.Tensor:
    """(..., F_b, S, T_b) -> (..., F_b, S * T_b): slices side by side (sliCQ-CDAE's input layout)."""
    return block.flatten(-2)


def unflatten_slices(flat: torch.Tensor, num_slices: int, width: int) -> torch.Tensor:
    """Inverse of :func:`flatten_slices`: (..., F_b, >= S * T_b) -> (..., F_b, S, T_b).

    Trailing entries beyond S * T_b (what a strided convolution stack may add) are cropped.
    """
    if flat.shape[-1] < num_slices * width:
        raise DemixError(f"cannot unflatten {flat.shape[-1]} coefficients into {num_slices} slices of {width}")
    return flat[..., :num_slices * width].unflatten(-1, (num_slices, width))


def overlap_add(block: torch.Tensor) -> torch.Tensor:
    """(..., F_b, S, T_b) -> (..., F_b, (S + 1) * T_b / 2): slices added at 50% overlap.

    Coefficient n then sits at sample n * slice_length / T_b of the signal padded by half a slice
    in front (the time axis of a spectrogram). T_b must be even (it always is: a multiple of 4).
    """
    width = block.shape[-1]
    if width % 2:
        raise DemixError(f"overlap_add needs an even number of coefficients per slice, got {width}")
    hop = width // 2
    added = F.pad(block[..., :hop], (0, 0, 0, 1)) + F.pad(block[..., hop:], (0, 0, 1, 0))
    return added.flatten(-2)


class SliCQT(nn.Module):
    """Sliced NSGT. Built once per configuration; tables are buffers (move with .to(device)).

    `forward` maps a real waveform (..., C, T) to a list of complex blocks (..., C, F_b, S, T_b),
    in frequency order; `inverse` maps such a list back to (..., C, length). Both run on the
    input's device. float64 input gives complex128 blocks, any other real input complex64 ones
    (tables are cast as needed; `dtype` only sets the precision they are stored in).

    `scale`/`fbins`/`fmin`/`fmax` choose the frequency bands (see :mod:`.scales`; for ``oct``,
    `fbins` is bands per octave). The default, Bark with 262 bands from 32.9 Hz to 22.05 kHz at
    44.1 kHz, has 263 channels in 70 blocks, slices of 18060 samples and transitions of 4516;
    `slice_support` (15803 there) is how many samples of a slice its window reaches.
    """

    def __init__(self, scale: str = "bark", fbins: int = 262, fmin: float = 32.9, fmax: float = 22050.0,
                 samplerate: int = 44100, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise DemixError(f"sliCQT dtype must be torch.float32 or torch.float64, got {dtype}")
        if samplerate <= 0:
            raise DemixError(f"sliCQT samplerate must be positive, got {samplerate}")
        self.scale = scale
        self.samplerate = samplerate
        freqs, q = make_scale(scale, fbins, fmin, fmax).frequencies()
        self.slice_length, self.transition_length = suggested_lengths(freqs, q, samplerate)
        frame = _frame(freqs, q, samplerate, self.slice_length)
        n, half = self.slice_length, self.slice_length // 2

        lengths = [len(w) for w in frame.windows[:frame.positive]]
        self.block_shapes: tp.List[tp.Tuple[int, int]] = []
        for length in lengths:
            if self.block_shapes and self.block_shapes[-1][1] == length:
                self.block_shapes[-1] = (self.block_shapes[-1][0] + 1, length)
            else:
                self.block_shapes.append((1, length))
        offsets = np.cumsum([0] + lengths)  # start of each channel in the concatenated coefficients
        # The NSGT reference rotates every slice by a quarter and its coefficients back; both
        # rotations are phase ramps (i^k) that cancel to a sign per channel: (-1)^(centre / 2).
        signs = [1.0 - 2.0 * ((c // 2) % 2) for c in frame.centres]
        centre_hz = np.concatenate(([0.0], freqs[(freqs > 0) & (freqs < samplerate / 2.0)], [samplerate / 2.0]))
        self.frequencies: tp.List[float] = centre_hz.tolist()  # centre frequency (Hz) of each channel

        # Analysis: coefficient j of the concatenated channels reads FFT bin forward_index[j].
        forward_index = np.concatenate(frame.indices[:frame.positive])
        forward_weight = np.concatenate([w * s for w, s in zip(frame.windows[:frame.positive], signs)])

        # Synthesis: every (positive or mirrored) channel sample that lands on a bin in [0, n/2]
        # adds its weighted coefficient-FFT value there; mirrored channels read the conjugate of
        # their positive twin at the reversed position (the negative frequencies of a real signal).
        sources, targets, weights, conjugate = [], [], [], []
        for channel in range(len(frame.windows)):
            if channel < frame.positive:
                twin, mirrored = channel, False
            else:
                twin, mirrored = len(frame.windows) - channel, True
            length = lengths[twin]
            position = np.arange(length)
            if mirrored:
                position = (-position) % length
            index = frame.indices[channel]
            used = index <= half
            sources.append(offsets[twin] + position[used])
            targets.append(index[used])
            weights.append(length * frame.duals[channel][used] * signs[channel])
            conjugate.append(np.full(int(used.sum()), mirrored))
        conjugate_mask = np.concatenate(conjugate)
        order = np.argsort(conjugate_mask, kind="stable")  # plain sources first, conjugated ones last
        self.plain_count = int((~conjugate_mask).sum())

        slice_window = _tukey_slice_window(n, self.transition_length)
        # Samples of a slice up to its window's last non-zero one: what a slice needs (block-wise analysis).
        self.slice_support = int(np.flatnonzero(slice_window)[-1]) + 1
        self.register_buffer("slice_window", torch.as_tensor(slice_window, dtype=dtype), persistent=False)
        self.register_buffer("forward_index", torch.as_tensor(forward_index, dtype=torch.long), persistent=False)
        self.register_buffer("forward_weight", torch.as_tensor(forward_weight, dtype=dtype), persistent=False)
        self.register_buffer("inverse_source", torch.as_tensor(np.concatenate(sources)[order], dtype=torch.long),
                             persistent=False)
        self.register_buffer("inverse_target", torch.as_tensor(np.concatenate(targets)[order], dtype=torch.long),
                             persistent=False)
        self.register_buffer("inverse_weight", torch.as_tensor(np.concatenate(weights)[order], dtype=dtype),
                             persistent=False)

    @property
    def num_channels(self) -> int:
        """Number of frequency channels (DC, the bands below Nyquist, Nyquist)."""
        return sum(f for f, _ in self.block_shapes)

    # the flattened / overlap-added views of a block (module functions, here for convenience)
    flatten_slices = staticmethod(flatten_slices)
    unflatten_slices = staticmethod(unflatten_slices)
    overlap_add = staticmethod(overlap_add)

    def num_slices(self, length: int) -> int:
        """Number of slices S for a waveform of `length` samples."""
        return (math.ceil(length / (self.slice_length // 4)) + 1) // 2 + 1

    def _buffer(self, name: str, device: torch.device, dtype: tp.Optional[torch.dtype] = None) -> torch.Tensor:
        """A table on `device` (and in `dtype`): a no-op when the module already is there."""
        return getattr(self, name).to(device=device, dtype=dtype)

    def forward(self, waveform: torch.Tensor) -> tp.List[torch.Tensor]:
        """(..., C, T) real waveform -> list of (..., C, F_b, S, T_b) complex blocks, in frequency order."""
        if not isinstance(waveform, torch.Tensor) or waveform.dim() < 2 or waveform.is_complex() \
                or not waveform.is_floating_point():
            raise DemixError("sliCQT input must be a real floating-point tensor (..., channels, time), got "
                             f"{getattr(waveform, 'dtype', type(waveform).__name__)} of shape "
                             f"{tuple(getattr(waveform, 'shape', ()))}")
        *others, length = waveform.shape
        if length < 1:
            raise DemixError("sliCQT input is empty (0 samples)")
        dtype = waveform.dtype if waveform.dtype == torch.float64 else torch.float32
        n, hop = self.slice_length, self.slice_length // 2
        slices = self.num_slices(length)
        signal = waveform.to(dtype).reshape(-1, length)
        # Half a slice of zeros in front, as many as the last slice needs behind.
        signal = F.pad(signal, (hop, (slices + 1) * hop - hop - length))
        return self.analyse_slices(signal.unfold(-1, n, hop), others)

    def analyse_slices(self, frames: torch.Tensor, others: tp.Sequence[int]) -> tp.List[torch.Tensor]:
        """Slices (B, S, slice_length) of the padded signal (float32 or float64, B = prod(`others`))
        -> the blocks (*others, F_b, S, T_b): window, FFT, band-pass windows, inverse FFT per block."""
        slices, device, dtype = frames.shape[-2], frames.device, frames.dtype
        frames = frames * self._buffer("slice_window", device, dtype)  # (B, S, n)
        spectrum = torch.fft.fft(frames)
        del frames
        coefficients = spectrum[..., self._buffer("forward_index", device)]  # (B, S, sum of F_b * T_b)
        del spectrum  # intermediates go as soon as possible: peak memory matters at inference
        coefficients.mul_(self._buffer("forward_weight", device, dtype))
        blocks = []
        # split, not slicing: its backward is one concatenation instead of one full-size zero tensor per block
        parts = coefficients.split([bins * width for bins, width in self.block_shapes], dim=-1)
        for part, (bins, width) in zip(parts, self.block_shapes):
            part = part.unflatten(-1, (bins, width))  # (B, S, F_b, T_b)
            block = torch.fft.ifft(part, dim=-1).transpose(1, 2).contiguous()
            blocks.append(block.reshape(*others, bins, slices, width))
        return blocks

    def inverse(self, blocks: tp.Sequence[torch.Tensor], length: int) -> torch.Tensor:
        """List of (..., C, F_b, S, T_b) complex blocks -> (..., C, length) real waveform.

        A `length` beyond what the slices cover is zero-padded.
        """
        others, slices = self._check_blocks(blocks)
        if int(length) != length or length < 1:
            raise DemixError(f"sliCQT inverse length must be a positive integer, got {length}")
        length = int(length)
        hop = self.slice_length // 2
        frames = self.synthesise_slices(blocks)  # (B, S, n)
        # Overlap-add: the first half of slice s and the second half of slice s - 1 share a hop.
        signal = F.pad(frames[..., :hop], (0, 0, 0, 1)) + F.pad(frames[..., hop:], (0, 0, 1, 0))
        signal = signal.flatten(-2)[..., hop:]  # drop the front padding
        if signal.shape[-1] < length:
            signal = F.pad(signal, (0, length - signal.shape[-1]))
        return signal[..., :length].reshape(*others, length)

    def synthesise_slices(self, blocks: tp.Sequence[torch.Tensor]) -> torch.Tensor:
        """Blocks (..., C, F_b, S, T_b) -> the real slices (B, S, slice_length) that the inverse
        overlap-adds, B the product of the leading dimensions (..., C)."""
        others, slices = self._check_blocks(blocks)
        dtype = torch.float64 if blocks[0].dtype == torch.complex128 else torch.float32
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        device = blocks[0].device
        n = self.slice_length
        batch = math.prod(others)
        spectra = []
        for block, (bins, width) in zip(blocks, self.block_shapes):
            spectrum = torch.fft.fft(block.to(complex_dtype).reshape(batch, bins, slices, width), dim=-1)
            spectra.append(spectrum.transpose(1, 2).reshape(batch, slices, bins * width))
        spectrum = torch.cat(spectra, dim=-1)  # (B, S, sum of F_b * T_b)
        del spectra
        values = spectrum[..., self._buffer("inverse_source", device)]
        del spectrum
        if self.plain_count < values.shape[-1]:  # mirrored windows read conjugated coefficients
            plain, mirrored = values.split([self.plain_count, values.shape[-1] - self.plain_count], dim=-1)
            values = torch.cat([plain, mirrored.conj()], dim=-1)
        values.mul_(self._buffer("inverse_weight", device, dtype))
        half = torch.zeros(batch, slices, n // 2 + 1, dtype=complex_dtype, device=device)
        half = half.index_add(-1, self._buffer("inverse_target", device), values)
        return torch.fft.irfft(half, n=n, dim=-1)  # (B, S, n)

    def _check_blocks(self, blocks: tp.Sequence[torch.Tensor]) -> tp.Tuple[tp.List[int], int]:
        """Leading shape (..., C) and slice count S of a list of blocks; DemixError if they do not fit."""
        if not isinstance(blocks, (list, tuple)) or len(blocks) != len(self.block_shapes):
            raise DemixError(f"sliCQT inverse expects a list of {len(self.block_shapes)} blocks, got "
                             f"{len(blocks) if isinstance(blocks, (list, tuple)) else type(blocks).__name__}")
        first = blocks[0]
        if not isinstance(first, torch.Tensor) or first.dim() < 4:
            raise DemixError("sliCQT blocks must be complex tensors (..., C, F_b, S, T_b)")
        others, slices = list(first.shape[:-3]), first.shape[-2]
        for index, (block, (bins, width)) in enumerate(zip(blocks, self.block_shapes)):
            expected = (*others, bins, slices, width)
            if not isinstance(block, torch.Tensor) or not block.is_complex() or tuple(block.shape) != expected:
                raise DemixError(f"sliCQT block {index}: expected a complex tensor of shape {expected}, got "
                                 f"{getattr(block, 'dtype', type(block).__name__)} "
                                 f"{tuple(getattr(block, 'shape', ()))}")
        return others, slices


class StreamingSliCQT:
    """:class:`SliCQT` of a signal that arrives in (..., C, n) blocks: :meth:`push` returns the
    slices that the samples so far complete, :meth:`finish` the rest (the zero padding of the end).

    The blocks (..., C, F_b, m, T_b) are those of `transform` on the whole signal (within float
    rounding; float64 blocks give complex128, any other float complex64), m slices at a time, m
    possibly 0. The signal is padded as the whole-signal transform pads it: half a slice of zeros
    in front, zeros behind up to the last of its :meth:`SliCQT.num_slices` slices. Slice s covers
    samples [(s - 1) * hop, (s + 1) * hop) (hop = slice_length / 2) but its window is zero after
    `slice_support` of them, so it is complete once `(s - 1) * hop + slice_support` samples arrived.
    """

    def __init__(self, transform: SliCQT):
        self.transform = transform
        self._buffer: tp.Optional[torch.Tensor] = None  # the padded signal from padded position `_start` on
        self._start = 0
        self.received = 0  # samples pushed so far
        self.slices = 0  # slices returned so far

    def push(self, block: torch.Tensor) -> tp.List[torch.Tensor]:
        """Add (..., C, n) samples; return the newly complete slices [(..., C, F_b, m, T_b)]."""
        if not isinstance(block, torch.Tensor) or block.dim() < 2 or not block.is_floating_point():
            raise DemixError("sliCQT input must be a real floating-point tensor (..., channels, time), got "
                             f"{getattr(block, 'dtype', type(block).__name__)} {tuple(getattr(block, 'shape', ()))}")
        dtype = torch.float64 if block.dtype == torch.float64 else torch.float32
        hop = self.transform.slice_length // 2
        if self._buffer is None:  # half a slice of zeros in front
            self._buffer = block.new_zeros(*block.shape[:-1], hop, dtype=dtype)
        elif block.shape[:-1] != self._buffer.shape[:-1]:
            raise DemixError(f"sliCQT blocks must keep their leading shape {tuple(self._buffer.shape[:-1])}, got "
                             f"{tuple(block.shape)}")
        self._buffer = torch.cat([self._buffer, block.to(dtype)], dim=-1)
        self.received += block.shape[-1]
        available = hop + self.received - self.transform.slice_support  # slice s is complete if s * hop <= this
        return self._take(available // hop + 1 if available >= 0 else 0)

    def finish(self) -> tp.List[torch.Tensor]:
        """The remaining slices, the end padded with zeros as the whole-signal transform pads it."""
        if self._buffer is None or self.received == 0:
            raise DemixError("sliCQT input is empty (0 samples)")
        total = self.transform.num_slices(self.received)
        hop = self.transform.slice_length // 2
        missing = (total + 1) * hop - self._start - self._buffer.shape[-1]
        self._buffer = F.pad(self._buffer, (0, missing))
        return self._take(total)

    def _take(self, complete: int) -> tp.List[torch.Tensor]:
        """Slices `slices` .. `complete - 1` (an empty list of slices when there are none)."""
        assert self._buffer is not None
        n, hop = self.transform.slice_length, self.transform.slice_length // 2
        count = complete - self.slices
        if count <= 0:
            dtype = torch.complex128 if self._buffer.dtype == torch.float64 else torch.complex64
            return [self._buffer.new_zeros(*self._buffer.shape[:-1], bins, 0, width, dtype=dtype)
                    for bins, width in self.transform.block_shapes]
        signal = self._buffer[..., self.slices * hop - self._start:]
        needed = (count - 1) * hop + n
        if signal.shape[-1] < needed:  # the window is zero past the support: zeros stand for later samples
            signal = F.pad(signal, (0, needed - signal.shape[-1]))
        others = list(signal.shape[:-1])
        frames = signal[..., :needed].reshape(-1, needed).unfold(-1, n, hop)  # (B, count, n)
        blocks = self.transform.analyse_slices(frames, others)
        self.slices = complete
        self._buffer = self._buffer[..., complete * hop - self._start:]
        self._start = complete * hop
        return blocks


class StreamingInverseSliCQT:
    """:meth:`SliCQT.inverse` of slices that arrive in order: :meth:`push` returns the samples no
    later slice changes (a slice overlaps the next one by half), :meth:`finish` the rest up to
    `length` samples. The same samples as the inverse of all slices, within float rounding."""

    def __init__(self, transform: SliCQT):
        self.transform = transform
        self._tail: tp.Optional[torch.Tensor] = None  # second half of the last slice (B, hop)
        self._others: tp.List[int] = []
        self.slices = 0
        self.emitted = 0  # samples returned so far

    def push(self, blocks: tp.Sequence[torch.Tensor]) -> torch.Tensor:
        """Add the next slices [(..., C, F_b, m, T_b)]; return the newly final samples (..., C, k)."""
        hop = self.transform.slice_length // 2
        self._others, count = self.transform._check_blocks(blocks)
        if count == 0:
            dtype = torch.float64 if blocks[0].dtype == torch.complex128 else torch.float32
            return torch.zeros(*self._others, 0, dtype=dtype, device=blocks[0].device)
        frames = self.transform.synthesise_slices(blocks)  # (B, m, n)
        first, second = frames[..., :hop], frames[..., hop:]
        tail = self._tail if self._tail is not None else torch.zeros_like(second[:, 0])
        # Each slice's first half adds to the previous slice's second half, as the whole inverse adds them.
        signal = (first + torch.cat([tail[:, None], second[:, :-1]], dim=1)).flatten(-2)
        self._tail = second[:, -1]
        if self.slices == 0:
            signal = signal[..., hop:]  # the front padding
        self.slices += count
        self.emitted += signal.shape[-1]
        return signal.reshape(*self._others, signal.shape[-1])

    def finish(self, length: int) -> torch.Tensor:
        """The remaining samples, `length` in all: the last slice's second half, zeros past it."""
        if self._tail is None:
            raise DemixError("no sliCQT slices were pushed")
        if length < self.emitted:
            raise DemixError(f"sliCQT inverse length {length} is shorter than the {self.emitted} samples "
                             "already returned")
        rest = self._tail[..., :length - self.emitted]
        rest = F.pad(rest, (0, length - self.emitted - rest.shape[-1]))
        self.emitted = length
        return rest.reshape(*self._others, rest.shape[-1])
