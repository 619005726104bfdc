"""The `dset` configuration: the declared schema of a dataset's options.

Hydra composes `dset` from `conf/dset/*.yaml`; the training schema
(:mod:`demixlab.training.config`) turns it into a :class:`DatasetConfig`, which is what the data
pipeline takes. Types are checked by the schema (OmegaConf), values by `__post_init__`; every
error is a one-line :class:`DemixError` naming the key.
"""
import typing as tp
from dataclasses import dataclass

from ..errors import DemixError
from .toy import ToySpec

KINDS = ("toy", "stems", "musdb")


@dataclass
class DatasetConfig:
    """`dset`: where the audio comes from and how it is read.

    Attributes:
        kind: `toy` (generated, :mod:`demixlab.data.toy`), `stems` (a folder of stems in
            MUSDB18-HQ layout) or `musdb` (MUSDB18 `.stem.mp4`).
        root: the dataset folder (not for `toy`); a relative path resolves against the directory
            `dora` ran from.
        sources: the stem names, in the order models output them.
        samplerate, channels: what every track is converted to on read.
        valid_tracks: names of `train/` tracks held out for validation when there is no `valid/`
            folder, or `musdb` for the official MUSDB18 validation tracks.
        toy: the synthetic dataset's options (`kind: toy` only; its sample rate is `samplerate`).
    """

    kind: str = "stems"
    root: tp.Optional[str] = None
    sources: tp.Optional[tp.List[str]] = None
    samplerate: int = 44100
    channels: int = 2
    valid_tracks: tp.Any = None
    toy: tp.Optional[ToySpec] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DemixError(f"dset.kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if not self.sources:
            raise DemixError("dset.sources is not set: pass e.g. 'dset.sources=[vocals,accompaniment]'")
        if isinstance(self.sources, str):
            raise DemixError(f"dset.sources={self.sources!r}: expected a list of source names")
        sources = [str(source) for source in self.sources]
        if len(set(sources)) != len(sources) or any(not source or "/" in source for source in sources):
            raise DemixError(f"dset.sources={sources}: source names must be unique, non-empty file names")
        self.sources = sources
        if self.samplerate <= 0:
            raise DemixError(f"dset.samplerate must be positive, got {self.samplerate}")
        if self.channels < 1:
            raise DemixError(f"dset.channels must be at least 1, got {self.channels}")
        if self.kind == "toy" and self.toy is None:
            raise DemixError("dset.kind=toy needs a dset.toy section (seed, train_tracks, valid_tracks, ...)")
