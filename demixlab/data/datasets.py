"""PyTorch datasets over tracks: random segments for training, whole tracks for evaluation."""
import typing as tp

import numpy as np
import torch
from torch.utils.data import Dataset

from .tracks import Track


# Extra random streams of an example, next to the segment offset's ``[seed, epoch, index]``.
UNALIGNED_STREAM, TRANSFORM_STREAM = 1 << 20, 2 << 20


class ExampleTransform(tp.Protocol):
    """A transform of whole training examples run where they are read (DataLoader workers):
    it reads `input_frames(frames)` and returns (sources, channels, frames)."""

    def input_frames(self, frames: int) -> int:
        """Frames to read for an example of `frames` frames."""

    def __call__(self, sources: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
        """Transform (sources, channels, input_frames) audio into (sources, channels, frames)."""


class SegmentDataset(Dataset):
    """Training examples: `samples_per_track` random segments of every track per epoch.

    Item ``i`` is the sources of track ``i // samples_per_track`` as a float32 tensor
    (sources, channels, segment_frames), cropped at an offset drawn from
    ``np.random.default_rng([seed, epoch, i])`` only. The same (seed, epoch, index) always gives
    the same segment, whatever the worker, process or resume point. Tracks shorter than a
    segment are zero-padded at the end.

    With probability `unaligned` (drawn from its own stream of (seed, epoch, i)), each source of
    the example comes from a random track at its own random offset instead (unaligned stem
    mixing). A `transform` (e.g. pitch and tempo changes) runs on each example with its own
    stream too. With neither, examples are exactly those of the plain dataset.

    An item is an index, drawn for the epoch of :meth:`set_epoch`, or an (epoch, index) pair:
    DataLoader workers keep their own copy of the dataset, so a sampler that hands them pairs
    (:class:`demixlab.training.solver.EpochSampler`) lets them persist across epochs.
    """

    def __init__(self, tracks: tp.Sequence[Track], segment_frames: int, samples_per_track: int, seed: int,
                 unaligned: float = 0.0, transform: tp.Optional[ExampleTransform] = None):
        if segment_frames <= 0:
            raise ValueError(f"segment_frames must be positive, got {segment_frames}")
        if samples_per_track <= 0:
            raise ValueError(f"samples_per_track must be positive, got {samples_per_track}")
        self.tracks = list(tracks)
        self.segment_frames = segment_frames
        self.samples_per_track = samples_per_track
        self.seed = seed
        self.unaligned = unaligned
        self.transform = transform
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose segments are drawn."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.tracks) * self.samples_per_track

    def __getitem__(self, item: tp.Union[int, tp.Tuple[int, int]]) -> torch.Tensor:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self.example(epoch, index, index // self.samples_per_track)

    def example(self, epoch: int, index: int, track_index: int) -> torch.Tensor:
        """Example `index` of `epoch`, cut from track `track_index` (see the class docstring)."""
        frames = self.segment_frames if self.transform is None else self.transform.input_frames(self.segment_frames)
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.unaligned and np.random.default_rng([self.seed, epoch, index, UNALIGNED_STREAM]).random() < self.unaligned:
            wav = self._unaligned(np.random.default_rng([self.seed, epoch, index, UNALIGNED_STREAM, 1]), frames)
        else:
            track = self.tracks[track_index]
            offset = int(rng.integers(0, max(0, track.frames - frames) + 1))
            wav = _pad(track.read_sources(offset, frames), frames)
        if self.transform is not None:
            wav = self.transform(wav, self.segment_frames,
                                 np.random.default_rng([self.seed, epoch, index, TRANSFORM_STREAM]))
        return torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))

    def _unaligned(self, rng: np.random.Generator, frames: int) -> np.ndarray:
        """Each source from its own random track and offset."""
        parts = []
        for source in range(len(self.tracks[0].sources)):
            track = self.tracks[int(rng.integers(len(self.tracks)))]
            offset = int(rng.integers(0, max(0, track.frames - frames) + 1))
            parts.append(_pad(track.read_source(source, offset, frames), frames))
        return np.stack(parts)


def _pad(wav: np.ndarray, frames: int) -> np.ndarray:
    if wav.shape[-1] < frames:
        wav = np.pad(wav, [(0, 0)] * (wav.ndim - 1) + [(0, frames - wav.shape[-1])])
    return wav


class WeightedSegments(Dataset):
    """The training examples of a main dataset followed by those of extra datasets.

    Extra dataset ``k`` adds ``max(1, round(weight_k * len(main)))`` examples per epoch: its
    local example ``j`` comes from track ``(j + epoch * count_k) % tracks_k`` (so every track is
    visited over the epochs, however few examples it gets), at an offset drawn from its own
    seed. Items are indices or (epoch, index) pairs, as for :class:`SegmentDataset`, whose main
    examples are unchanged.
    """

    def __init__(self, main: SegmentDataset, extras: tp.Sequence[SegmentDataset], weights: tp.Sequence[float]):
        self.main = main
        self.extras = list(extras)
        self.counts = [max(1, int(round(weight * len(main)))) for weight in weights]
        self.samples_per_track = main.samples_per_track
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose segments are drawn."""
        self.epoch = epoch
        self.main.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.main) + sum(self.counts)

    def __getitem__(self, item: tp.Union[int, tp.Tuple[int, int]]) -> torch.Tensor:
        epoch, index = item if isinstance(item, tuple) else (self.epoch, item)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        if index < len(self.main):
            return self.main[(epoch, index)]
        local = index - len(self.main)
        for extra, count in zip(self.extras, self.counts):
            if local < count:
                return extra.example(epoch, local, (local + epoch * count) % len(extra.tracks))
            local -= count
        raise AssertionError("unreachable")


class TrackDataset(Dataset):
    """Evaluation examples: item ``i`` is ``(name, mixture, sources)`` for the whole track ``i``,
    with mixture (channels, time) and sources (sources, channels, time) float32 tensors.

    Tracks differ in length: iterate directly or use a DataLoader with ``batch_size=None``.
    """

    def __init__(self, tracks: tp.Sequence[Track]):
        self.tracks = list(tracks)

    def __len__(self) -> int:
        return len(self.tracks)

    def __getitem__(self, index: int) -> tp.Tuple[str, torch.Tensor, torch.Tensor]:
        track = self.tracks[index]
        sources = torch.from_numpy(track.read_sources())
        mixture = torch.from_numpy(track.read_mixture())
        return track.name, mixture, sources
