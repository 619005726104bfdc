"""Training-time augmentations on batches of stems.

Every transform takes sources of shape (B, S, C, T) and an explicit `torch.Generator`, so that
an epoch's randomness depends only on its seed (exact resume, identical multi-process runs).
The mixture is built afterwards as the sum of the augmented stems.
"""
import typing as tp

import torch
from omegaconf import DictConfig

from .errors import DemixError

Transform = tp.Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _draw(shape: tp.Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(*shape, generator=generator)


class Shift:
    """Crop `shift` samples off each stem at a random offset drawn per example and source.

    The dataset reads `shift` extra samples for this, so the output has the training length.
    Shifting sources independently also decorrelates them, like remixing.
    """

    def __init__(self, shift: int):
        self.shift = shift

    def __call__(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources, channels, length = sources.shape
        out_length = length - self.shift
        offsets = torch.randint(self.shift + 1, (batch, num_sources, 1, 1), generator=generator)
        index = offsets + torch.arange(out_length).view(1, 1, 1, -1)
        return sources.gather(3, index.expand(batch, num_sources, channels, out_length))


class FlipChannels:
    """Swap left and right of each stereo stem with probability 1/2."""

    def __call__(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources, channels, _ = sources.shape
        if channels != 2:
            return sources
        swap = _draw((batch, num_sources, 1, 1), generator) < 0.5
        return torch.where(swap, sources.flip(2), sources)


class FlipSign:
    """Multiply each stem by -1 with probability 1/2."""

    def __call__(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources = sources.shape[:2]
        signs = torch.where(_draw((batch, num_sources, 1, 1), generator) < 0.5, -1.0, 1.0)
        return sources * signs.to(sources.dtype)


class Scale:
    """Multiply each stem by a gain drawn uniformly in [low, high]."""

    def __init__(self, low: float, high: float):
        self.low = low
        self.high = high

    def __call__(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources = sources.shape[:2]
        gains = self.low + (self.high - self.low) * _draw((batch, num_sources, 1, 1), generator)
        return sources * gains.to(sources.dtype)


class Remix:
    """Draw each source from a random example of its group, creating new mixtures.

    The batch is cut into consecutive groups of `group_size` examples (0: one group; a last,
    smaller group is remixed within itself); each source gets its own permutation of every
    group, so stems from different tracks meet (open-unmix's random track mixing, demucs'
    remix). Groups keep the statistics the same whatever the number of processes.
    """

    def __init__(self, group_size: int = 0):
        self.group_size = group_size

    def __call__(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources = sources.shape[:2]
        size = self.group_size or batch
        index = torch.empty(batch, num_sources, dtype=torch.long)
        for start in range(0, batch, size):
            count = min(size, batch - start)
            for source in range(num_sources):
                index[start:start + count, source] = start + torch.randperm(count, generator=generator)
        return sources[index, torch.arange(num_sources).view(1, -1)]


class Augmentation:
    """A sequence of transforms applied in order; `extra_frames` is what the dataset must add
    to each training example for the time shift to crop."""

    def __init__(self, transforms: tp.Sequence[Transform], extra_frames: int = 0):
        self.transforms = list(transforms)
        self.extra_frames = extra_frames

    def __call__(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for transform in self.transforms:
            sources = transform(sources, generator)
        return sources

    def __repr__(self) -> str:
        names = ", ".join(type(transform).__name__ for transform in self.transforms)
        return f"Augmentation([{names}])"


def build_augmentation(augment: DictConfig, samplerate: int) -> Augmentation:
    """Build the training augmentation from the `augment:` config section."""
    known = {"shift", "flip_channels", "flip_sign", "scale", "remix"}
    unknown = set(augment.keys()) - known
    if unknown:
        raise DemixError(f"unknown augmentation option(s) {sorted(unknown)}: expected {sorted(known)}")
    transforms: tp.List[Transform] = []
    shift = float(augment.shift or 0.0)
    if shift < 0:
        raise DemixError(f"augment.shift must be >= 0 seconds, got {shift}")
    extra_frames = int(round(shift * samplerate))
    if extra_frames:
        transforms.append(Shift(extra_frames))
    if augment.flip_channels:
        transforms.append(FlipChannels())
    if augment.flip_sign:
        transforms.append(FlipSign())
    if augment.scale is not None:
        try:
            low, high = (float(value) for value in augment.scale)
        except (TypeError, ValueError):
            raise DemixError(f"augment.scale must be [low, high] or null, got {augment.scale}") from None
        if not 0 <= low <= high:
            raise DemixError(f"augment.scale must satisfy 0 <= low <= high, got {[low, high]}")
        transforms.append(Scale(low, high))
    remix = augment.remix
    if isinstance(remix, bool) or not isinstance(remix, int) or remix < 0:
        raise DemixError(f"augment.remix must be a group size in examples (0 disables), got {remix!r}")
    if remix:
        transforms.append(Remix(remix))
    return Augmentation(transforms, extra_frames)
