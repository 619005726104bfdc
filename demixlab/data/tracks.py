"""Tracks: multi-source recordings that can be read in segments.

A :class:`Track` hides where the audio lives (a folder of stems, a MUSDB18 ``.stem.mp4``) and
always returns float32 arrays of shape (sources, channels, time) or (channels, time).
"""
import abc
import math
import typing as tp
from pathlib import Path

import numpy as np
import torch

from ..audio import convert_audio, read_audio
from ..errors import DemixError


class Track(abc.ABC):
    """A recording split into named sources, read in segments.

    Reads past the end return fewer frames; ``frames=-1`` reads to the end.
    """

    name: str
    sources: tp.List[str]
    frames: int
    samplerate: int
    channels: int

    @abc.abstractmethod
    def read_sources(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Return the sources as a float32 array (sources, channels, time), in `self.sources` order."""

    @abc.abstractmethod
    def read_mixture(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Return the mixture as a float32 array (channels, time)."""

    def read_source(self, source: int, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Return source number `source` alone as a float32 array (channels, time)."""
        return self.read_sources(offset, frames)[source]

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.samplerate

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {self.frames} frames, "
                f"{self.samplerate} Hz, {self.channels} ch)")


def stack_sources(track: Track, offset: int = 0, frames: int = -1) -> np.ndarray:
    """`track.read_source` of every source, stacked (sources, channels, time) as each is read:
    a full-length track never sits in memory twice (as a list of parts and their stack)."""
    first = track.read_source(0, offset, frames)
    stacked = np.empty((len(track.sources), *first.shape), dtype=np.float32)
    stacked[0] = first
    del first
    for index in range(1, len(track.sources)):
        part = track.read_source(index, offset, frames)
        if part.shape != stacked.shape[1:]:
            raise DemixError(f"track {track.name}: source {track.sources[index]} has shape {part.shape}, "
                             f"expected {stacked.shape[1:]} like {track.sources[0]}")
        stacked[index] = part
    return stacked


class StemsTrack(Track):
    """A track stored as one audio file per source, plus an optional mixture file.

    Without a mixture file, the mixture is the sum of the sources. The files are assumed to
    have been checked (same rate, channel count and length) by the scanner. `sources` (default:
    the keys of `stems`) may name sources without a file: they read as silence.
    """

    def __init__(self, name: str, stems: tp.Dict[str, Path], mixture: tp.Optional[Path],
                 samplerate: int, channels: int, frames: int, sources: tp.Optional[tp.Sequence[str]] = None):
        self.name = name
        self.sources = list(stems) if sources is None else list(sources)
        self.stems = dict(stems)
        self.mixture = mixture
        self.samplerate = samplerate
        self.channels = channels
        self.frames = frames

    def read_sources(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Read every stem file (see :meth:`Track.read_sources`)."""
        return stack_sources(self, offset, frames)

    def read_source(self, source: int, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Read one stem file (silence for a source without one)."""
        path = self.stems.get(self.sources[source])
        if path is None:
            return np.zeros((self.channels, _span(self.frames, offset, frames)), dtype=np.float32)
        return read_audio(path, offset, frames)

    def read_mixture(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Read the mixture file, or sum the stems when there is none."""
        if self.mixture is not None:
            return read_audio(self.mixture, offset, frames)
        return self.read_sources(offset, frames).sum(axis=0)


class ConvertedTrack(Track):
    """A view of another track at a different sample rate and/or channel count.

    Segments are resampled from an aligned window of the original audio with some margin,
    so a segment matches the same frames of the whole converted track (up to edge effects
    of the resampling filter, which the margin keeps out of the returned frames).
    """

    def __init__(self, track: Track, samplerate: int, channels: int):
        self.track = track
        self.name = track.name
        self.sources = list(track.sources)
        self.samplerate = samplerate
        self.channels = channels
        self.frames = track.frames * samplerate // track.samplerate
        gcd = math.gcd(track.samplerate, samplerate)
        # `_old` original frames span exactly `_new` converted frames: windows start on multiples.
        self._old = track.samplerate // gcd
        self._new = samplerate // gcd
        # julius' sinc kernel spans about 26 * max(1, old/new) original frames on each side.
        self._margin = 64 * max(1, math.ceil(track.samplerate / samplerate))

    def read_sources(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Read and convert the sources (see :meth:`Track.read_sources`)."""
        return self._read(True, offset, frames)

    def read_mixture(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Read and convert the mixture (see :meth:`Track.read_mixture`)."""
        return self._read(False, offset, frames)

    def read_source(self, source: int, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Read and convert one source."""
        return self._read(False, offset, frames, lambda start, length: self.track.read_source(source, start, length))

    def _read(self, sources: bool, offset: int, frames: int,
              read: tp.Optional[tp.Callable[[int, int], np.ndarray]] = None) -> np.ndarray:
        read = read or (self.track.read_sources if sources else self.track.read_mixture)
        end = self.frames if frames < 0 else min(self.frames, offset + frames)
        if offset >= end:
            shape = (len(self.sources),) if sources else ()
            return np.zeros(shape + (self.channels, 0), dtype=np.float32)
        if self.track.samplerate == self.samplerate:
            old_start, old_end, first = offset, end, 0
        else:
            # First original frame: a multiple of `_old`, at least `_margin` frames early.
            block = max(0, offset * self._old // self._new - self._margin) // self._old
            old_start = block * self._old
            old_end = min(self.track.frames, -(-end * self._old // self._new) + self._margin)
            first = offset - block * self._new
        wav = torch.from_numpy(read(old_start, old_end - old_start))
        wav = convert_audio(wav, self.track.samplerate, self.samplerate, self.channels)
        return np.ascontiguousarray(wav[..., first:first + end - offset].numpy(), dtype=np.float32)


def _span(total: int, offset: int, frames: int) -> int:
    """How many frames a read of `frames` (-1: to the end) at `offset` returns from `total`."""
    end = total if frames < 0 else min(total, offset + frames)
    return max(0, end - offset)


def conform(track: Track, samplerate: int, channels: int) -> Track:
    """Return `track` itself if it already has this rate and channel count, else a converting view."""
    if track.samplerate == samplerate and track.channels == channels:
        return track
    return ConvertedTrack(track, samplerate, channels)
