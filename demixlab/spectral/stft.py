"""STFT/ISTFT and magnitudes shared by every model family.

Conventions: waveforms are real tensors (..., C, T); spectrograms are (..., C, F, N) with
F = n_fft // 2 + 1 frequency bins and N frames (complex for STFTs, real for magnitudes).
The STFT uses a Hann window, `center=True` and reflect padding, like Open-Unmix's `Separator`.
"""
import math
import typing as tp

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
        flat = spec.reshape(-1, bins, frames)
        wav = None
        if spec.device.type == "cpu" and self.n_fft % self.hop_length == 0 \
                and not (torch.is_grad_enabled() and spec.requires_grad):
            wav = self._overlap_add(flat, length)
        if wav is None:
            wav = torch.istft(flat, n_fft=self.n_fft, hop_length=self.hop_length, window=self._window_like(spec),
                              center=True, normalized=False, onesided=True, length=length)
        return wav.reshape(*others, length)

    def _overlap_add(self, spec: torch.Tensor, length: int) -> tp.Optional[torch.Tensor]:
        """:func:`torch.istft` of (B, F, N) (`center=True`, `length`) within float rounding, for hops
        that divide `n_fft`, on CPU: the frames' inverse FFTs (no transposing copy when the bins are
        contiguous), windowed in place and added in `n_fft // hop` strided passes instead of torch's
        generic fold. None where the summed squared window vanishes (torch.istft raises there)."""
        n_fft, hop = self.n_fft, self.hop_length
        window = self._window_like(spec)
        frames = torch.fft.irfft(spec.transpose(-1, -2), n=n_fft).mul_(window)  # (B, N, n_fft)
        batch, count, _ = frames.shape
        overlap = n_fft // hop
        total = (count + overlap - 1) * hop
        out = frames.new_zeros(batch, total)
        envelope = window.new_zeros(total)
        squared = window * window
        for part in range(overlap):
            piece = slice(part * hop, (part + 1) * hop)
            out[:, part * hop:(part + count) * hop].view(batch, count, hop).add_(frames[..., piece])
            envelope[part * hop:(part + count) * hop].view(count, hop).add_(squared[piece])
        start = n_fft // 2
        end = min(start + length, total)
        if end > start and float(envelope[start:end].abs().min()) < 1e-11:
            return None
        wav = out[:, start:end].div_(envelope[start:end])
        return wav if end - start == length else torch.nn.functional.pad(wav, (0, length - (end - start)))


class StreamingSTFT:
    """:class:`STFT` of a signal that arrives in (..., n) blocks: :meth:`push` returns the frames
    that the samples so far complete, :meth:`finish` the rest (the reflect padding of the end).

    The frames are those of `STFT(n_fft, hop_length)` on the whole signal (`center=True`, reflect
    padding), within float rounding; frame t is complete once `t * hop_length + n_fft // 2`
    samples arrived (the first frame also needs `n_fft // 2 + 1` for its reflection)."""

    def __init__(self, stft: STFT):
        self.n_fft, self.hop_length = stft.n_fft, stft.hop_length
        self.window = stft.window
        self._buffer: tp.Optional[torch.Tensor] = None  # samples from position `_start` on
        self._start = 0
        self._received = 0
        self.frames = 0  # frames returned so far

    def _frames(self, padded: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """Frames first..first+count-1 from `padded`, the padded signal from frame `first`'s start."""
        frames = padded[..., :(count - 1) * self.hop_length + self.n_fft]
        *others, length = frames.shape
        spec = torch.stft(frames.reshape(-1, length), n_fft=self.n_fft, hop_length=self.hop_length,
                          window=self.window.to(device=frames.device, dtype=frames.dtype), center=False,
                          normalized=False, onesided=True, return_complex=True)
        return spec.reshape(*others, *spec.shape[-2:])

    def _padded_from(self, position: int) -> torch.Tensor:
        """The padded signal (reflected at the start) from padded position `position` on."""
        assert self._buffer is not None
        half = self.n_fft // 2
        begin = position - half  # in signal coordinates
        if begin >= self._start:
            return self._buffer[..., begin - self._start:]
        assert self._start == 0
        head = self._buffer[..., 1:1 - begin].flip(-1)  # x[-begin] ... x[1]
        return torch.cat([head, self._buffer], dim=-1)

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Add (..., n) samples; return the newly complete frames (..., F, m), m possibly 0."""
        self._buffer = block if self._buffer is None else torch.cat([self._buffer, block], dim=-1)
        self._received += block.shape[-1]
        half = self.n_fft // 2
        if self._received <= half:  # the first frame's reflection needs n_fft // 2 + 1 samples
            return self._empty(block)
        complete = (self._received - half) // self.hop_length + 1  # frames t with t * hop + half <= received
        return self._take(complete, block)

    def finish(self) -> torch.Tensor:
        """The remaining frames, with the end reflected (as the whole-signal STFT pads it)."""
        assert self._buffer is not None, "no samples were pushed"
        half = self.n_fft // 2
        if self._received <= half:
            raise DemixError(f"audio too short for the STFT: {self._received} samples, "
                             f"need more than {half} (n_fft={self.n_fft})")
        tail = self._buffer[..., -half - 1:-1].flip(-1)  # x[T-2] ... x[T-1-half]
        self._buffer = torch.cat([self._buffer, tail], dim=-1)
        return self._take(self._received // self.hop_length + 1, self._buffer)

    def _take(self, complete: int, like: torch.Tensor) -> torch.Tensor:
        if complete <= self.frames:
            return self._empty(like)
        spec = self._frames(self._padded_from(self.frames * self.hop_length), self.frames, complete - self.frames)
        self.frames = complete
        keep_from = complete * self.hop_length - self.n_fft // 2  # the next frame's first sample
        if keep_from > self._start:
            assert self._buffer is not None
            self._buffer = self._buffer[..., keep_from - self._start:]
            self._start = keep_from
        return spec

    def _empty(self, like: torch.Tensor) -> torch.Tensor:
        dtype = torch.complex128 if like.dtype == torch.float64 else torch.complex64
        return torch.zeros(*like.shape[:-1], self.n_fft // 2 + 1, 0, dtype=dtype, device=like.device)


class StreamingISTFT:
    """:meth:`STFT.inverse` of frames that arrive in order: :meth:`push` returns the samples that no
    later frame changes, :meth:`finish` the rest up to `length` samples.

    Window-weighted overlap-add divided by the summed squared window, like `torch.istft` with
    `center=True` (the same samples within float rounding)."""

    def __init__(self, stft: STFT):
        self.n_fft, self.hop_length = stft.n_fft, stft.hop_length
        self.window = stft.window
        self._sum: tp.Optional[torch.Tensor] = None  # overlap-added frames, padded coordinates from _start
        self._envelope: tp.Optional[torch.Tensor] = None
        self._start = 0  # padded position of _sum's first sample
        self.frames = 0
        self.emitted = 0  # output samples returned so far

    def push(self, spec: torch.Tensor) -> torch.Tensor:
        """Add frames (..., F, m); return the newly final samples (..., n), n possibly 0."""
        count = spec.shape[-1]
        if count == 0 and self._sum is None:
            return torch.zeros(*spec.shape[:-2], 0, dtype=spec.real.dtype, device=spec.device)
        window = self.window.to(device=spec.device, dtype=spec.real.dtype)
        if count:
            frames = torch.fft.irfft(spec.transpose(-1, -2), n=self.n_fft) * window  # (..., m, n_fft)
            end = (self.frames + count - 1) * self.hop_length + self.n_fft
            grow = end - self._start - (0 if self._sum is None else self._sum.shape[-1])
            if self._sum is None:
                self._sum = frames.new_zeros(*frames.shape[:-2], grow)
                self._envelope = window.new_zeros(grow)
            elif grow > 0:
                self._sum = torch.cat([self._sum, self._sum.new_zeros(*self._sum.shape[:-1], grow)], dim=-1)
                self._envelope = torch.cat([self._envelope, self._envelope.new_zeros(grow)])
            assert self._envelope is not None
            square = window * window
            for index in range(count):
                begin = (self.frames + index) * self.hop_length - self._start
                self._sum[..., begin:begin + self.n_fft] += frames[..., index, :]
                self._envelope[begin:begin + self.n_fft] += square
            self.frames += count
        # padded positions before the next frame's start are final; output sample k is padded k + n_fft // 2
        return self._emit(self.frames * self.hop_length - self.n_fft // 2)

    def finish(self, length: int) -> torch.Tensor:
        """The remaining samples, `length` in all (zeros past the last frame, as torch.istft pads)."""
        covered = (self.frames - 1) * self.hop_length + self.n_fft - self.n_fft // 2  # output samples the frames reach
        out = self._emit(min(length, covered))
        missing = length - self.emitted
        if missing > 0:
            out = torch.cat([out, out.new_zeros(*out.shape[:-1], missing)], dim=-1)
            self.emitted = length
        return out

    def _emit(self, final: int) -> torch.Tensor:
        """Output samples [emitted, final), dropped from the buffers (nothing before any frame)."""
        assert self._sum is not None and self._envelope is not None
        half = self.n_fft // 2
        end = final + half - self._start  # padded position relative to the buffers
        begin = self.emitted + half - self._start
        if end <= begin:
            return self._sum[..., :0]
        out = self._sum[..., begin:end] / self._envelope[begin:end]
        self.emitted = final
        self._sum, self._envelope = self._sum[..., end:], self._envelope[end:]
        self._start += end
        return out
