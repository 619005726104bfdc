"""Training-time augmentations on batches of stems, and the schema of the `augment` section.

Every transform is a small `nn.Module` whose `forward` takes sources of shape (B, S, C, T) and an
explicit `torch.Generator` on the device of the batch (they run on the training device, after the
transfer), so that an epoch's randomness depends only on its seed (exact resume, identical
multi-process runs). The mixture is built afterwards as the sum of the augmented stems (plus the
codec residual of the example's mixture with ``augment.codec.target: mixture``, which is why that
option refuses the per-source transforms here).
"""
import typing as tp
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DemixError
from .effects import CodecConfig, DistortionConfig, EqConfig, ExampleEffects, PitchTempoConfig, ReverbConfig, build_effects


@dataclass
class AugmentConfig:
    """`augment`: which transforms run. Where examples are read (DataLoader workers): pitch/tempo,
    then per source EQ, distortion, reverb, codec (:mod:`.effects`, all off by default). On the
    training device, in this order: shift, channel swap, sign flip, gain, remix."""

    shift: float = 0.0  # seconds of random time shift, drawn per source
    flip_channels: bool = True  # swap left/right at random, per source
    flip_sign: bool = False  # multiply by -1 at random, per source
    scale: tp.Optional[tp.List[float]] = field(default_factory=lambda: [0.25, 1.25])  # [low, high]; null: off
    remix: int = 4  # remix sources within groups of N examples; 0 disables
    pitch_tempo: PitchTempoConfig = field(default_factory=PitchTempoConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    eq: EqConfig = field(default_factory=EqConfig)
    reverb: ReverbConfig = field(default_factory=ReverbConfig)
    distortion: DistortionConfig = field(default_factory=DistortionConfig)

    def __post_init__(self) -> None:
        if self.shift < 0:
            raise DemixError(f"augment.shift must be >= 0 seconds, got {self.shift}")
        if self.scale is not None:
            if len(self.scale) != 2 or not 0 <= self.scale[0] <= self.scale[1]:
                raise DemixError(f"augment.scale must be [low, high] with 0 <= low <= high, or null, "
                                 f"got {list(self.scale)}")
        if self.remix < 0:
            raise DemixError(f"augment.remix must be a group size in examples (0 disables), got {self.remix}")
        if self.codec.on_mixture:
            per_source = {"augment.shift=0": self.shift > 0, "augment.flip_channels=false": self.flip_channels,
                          "augment.flip_sign=false": self.flip_sign, "augment.scale=null": self.scale is not None,
                          "augment.remix=0": self.remix > 0}
            offending = [override for override, on in per_source.items() if on]
            if offending:
                names = ", ".join(override.split("=")[0] for override in offending)
                raise DemixError(f"augment.codec.target=mixture cannot be combined with {names}: they change each "
                                 "source on the training device, after the loader computed the codec residual of "
                                 f"the example's mixture; set {' '.join(offending)}, or use augment.codec.target=stems")


def _draw(shape: tp.Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device=generator.device)


class Shift(nn.Module):
    """Crop `shift` samples off each stem at a random offset drawn per example and source.

    The dataset reads `shift` extra samples for this, so the output has the training length.
    Shifting sources independently also decorrelates them, like remixing.
    """

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def forward(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources, channels, length = sources.shape
        out_length = length - self.shift
        offsets = torch.randint(self.shift + 1, (batch, num_sources, 1, 1), generator=generator,
                                device=generator.device)
        index = offsets + torch.arange(out_length, device=generator.device).view(1, 1, 1, -1)
        return sources.gather(3, index.expand(batch, num_sources, channels, out_length))


class FlipChannels(nn.Module):
    """Swap left and right of each stereo stem with probability 1/2."""

    def forward(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources, channels, _ = sources.shape
        if channels != 2:
            return sources
        swap = _draw((batch, num_sources, 1, 1), generator) < 0.5
        return torch.where(swap, sources.flip(2), sources)


class FlipSign(nn.Module):
    """Multiply each stem by -1 with probability 1/2."""

    def forward(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources = sources.shape[:2]
        signs = torch.where(_draw((batch, num_sources, 1, 1), generator) < 0.5, -1.0, 1.0)
        return sources * signs.to(sources.dtype)


class Scale(nn.Module):
    """Multiply each stem by a gain drawn uniformly in [low, high]."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low = low
        self.high = high

    def forward(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources = sources.shape[:2]
        gains = self.low + (self.high - self.low) * _draw((batch, num_sources, 1, 1), generator)
        return sources * gains.to(sources.dtype)


class Remix(nn.Module):
    """Draw each source from a random example of its group, creating new mixtures.

    The batch is cut into consecutive groups of `group_size` examples (0: one group; a last,
    smaller group is remixed within itself); each source gets its own permutation of every
    group, so stems from different tracks meet (open-unmix's random track mixing, demucs'
    remix). Groups keep the statistics the same whatever the number of processes.
    """

    def __init__(self, group_size: int = 0):
        super().__init__()
        self.group_size = group_size

    def forward(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, num_sources = sources.shape[:2]
        size = self.group_size or batch
        index = torch.empty(batch, num_sources, dtype=torch.long, device=generator.device)
        for start in range(0, batch, size):
            count = min(size, batch - start)
            for source in range(num_sources):
                index[start:start + count, source] = start + torch.randperm(count, generator=generator,
                                                                            device=generator.device)
        return sources[index, torch.arange(num_sources, device=generator.device).view(1, -1)]


class Augmentation(nn.Module):
    """A sequence of transforms applied in order; `extra_frames` is what the dataset must add
    to each training example for the time shift to crop. With `codec_residual`, training batches
    carry the codec residual of each example's mixture as a last row after the sources
    (``augment.codec.target: mixture``)."""

    def __init__(self, transforms: tp.Sequence[nn.Module], extra_frames: int = 0, codec_residual: bool = False):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        self.extra_frames = extra_frames
        self.codec_residual = codec_residual

    def forward(self, sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for transform in self.transforms:
            sources = transform(sources, generator)
        return sources

    def split(self, batch: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """(sources (B, S, C, T), codec residual (B, C, T) or None) of a training batch."""
        if not self.codec_residual:
            return batch, None
        return batch[:, :-1], batch[:, -1]

    def model_input(self, batch: torch.Tensor,
                    generator: tp.Optional[torch.Generator]) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """(mixture, sources) of a training batch: the sources augmented (not when `generator` is
        None), and their sum plus the codec residual when the batch carries one."""
        sources, residual = self.split(batch)
        if generator is not None:
            sources = self(sources, generator)
        mixture = sources.sum(dim=1)
        return (mixture if residual is None else mixture + residual), sources

    def __repr__(self) -> str:
        names = ", ".join(type(transform).__name__ for transform in self.transforms)
        return f"Augmentation([{names}])"


def build_example_effects(augment: AugmentConfig, samplerate: int) -> tp.Optional[ExampleEffects]:
    """The dataset-side effects of the `augment:` section, or None when they are all off."""
    return build_effects(samplerate, {"pitch_tempo": augment.pitch_tempo, "codec": augment.codec, "eq": augment.eq,
                                      "reverb": augment.reverb, "distortion": augment.distortion})


def build_augmentation(augment: AugmentConfig, samplerate: int) -> Augmentation:
    """Build the training augmentation from the `augment:` config section."""
    transforms: tp.List[nn.Module] = []
    extra_frames = int(round(augment.shift * samplerate))
    if extra_frames:
        transforms.append(Shift(extra_frames))
    if augment.flip_channels:
        transforms.append(FlipChannels())
    if augment.flip_sign:
        transforms.append(FlipSign())
    if augment.scale is not None:
        transforms.append(Scale(float(augment.scale[0]), float(augment.scale[1])))
    if augment.remix:
        transforms.append(Remix(augment.remix))
    return Augmentation(transforms, extra_frames, codec_residual=augment.codec.on_mixture)
