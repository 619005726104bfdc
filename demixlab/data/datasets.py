"""PyTorch datasets over tracks: random segments for training, whole tracks for evaluation."""
import typing as tp

import numpy as np
import torch
from torch.utils.data import Dataset

from .tracks import Track


class SegmentDataset(Dataset):
    """Training examples: `samples_per_track` random segments of every track per epoch.

    Item ``i`` is the sources of track ``i // samples_per_track`` as a float32 tensor
    (sources, channels, segment_frames), cropped at an offset drawn from
    ``np.random.default_rng([seed, epoch, i])`` only. The same (seed, epoch, index) always gives
    the same segment, whatever the worker, process or resume point. Tracks shorter than a
    segment are zero-padded at the end.

    An item is an index, drawn for the epoch of :meth:`set_epoch`, or an (epoch, index) pair:
    DataLoader workers keep their own copy of the dataset, so a sampler that hands them pairs
    (:class:`demixlab.training.solver.EpochSampler`) lets them persist across epochs.
    """

    def __init__(self, tracks: tp.Sequence[Track], segment_frames: int, samples_per_track: int, seed: int):
        if segment_frames <= 0:
            raise ValueError(f"segment_frames must be positive, got {segment_frames}")
        if samples_per_track <= 0:
            raise ValueError(f"samples_per_track must be positive, got {samples_per_track}")
        self.tracks = list(tracks)
        self.segment_frames = segment_frames
        self.samples_per_track = samples_per_track
        self.seed = seed
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
        track = self.tracks[index // self.samples_per_track]
        rng = np.random.default_rng([self.seed, epoch, index])
        offset = int(rng.integers(0, max(0, track.frames - self.segment_frames) + 1))
        wav = track.read_sources(offset, self.segment_frames)
        if wav.shape[-1] < self.segment_frames:
            wav = np.pad(wav, [(0, 0), (0, 0), (0, self.segment_frames - wav.shape[-1])])
        return torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))


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
