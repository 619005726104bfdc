"""The `dset` configuration: the declared schema of a dataset's options.

Hydra composes `dset` from `conf/dset/*.yaml`; the training schema
(:mod:`demixlab.training.config`) turns it into a :class:`DatasetConfig`, which is what the data
pipeline takes. Types are checked by the schema (OmegaConf), values by `__post_init__`; every
error is a one-line :class:`DemixError` naming the key.
"""
import typing as tp
from dataclasses import dataclass, field

from ..errors import DemixError
from .toy import ToySpec

KINDS = ("toy", "stems", "musdb", "moisesdb", "slakh")
MISSING_POLICIES = ("refuse", "silent")


def _check_mapping(key: str, mapping: tp.Any) -> tp.Dict[str, tp.Optional[str]]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise DemixError(f"{key}={mapping!r}: expected a mapping {{name: source, ...}}")
    return {str(name): (None if value is None else str(value)) for name, value in mapping.items()}


@dataclass
class MoisesSpec:
    """`dset.moisesdb`: how MoisesDB categories become sources, and its splits (it has none).

    Attributes:
        mapping: {category or track type: source, or null to leave it out}, on top of the
            defaults (a category named like a source goes to it, percussion to drums).
        rest: the source of every category the mapping and defaults leave unassigned (null:
            left out of the examples and the mixture).
        valid, test: a fraction of the tracks, or a list of track folder names.
        seed: the seed of the ratio split.
        length_tolerance: seconds by which the stem files of a track may differ in length (some
            MoisesDB tracks do, by up to about 1.3 s); such tracks are read at the shortest length.
    """

    mapping: tp.Optional[tp.Dict[str, tp.Optional[str]]] = None  # null: no entries
    rest: tp.Optional[str] = "other"
    valid: tp.Any = 0.1
    test: tp.Any = 0.1
    seed: int = 0
    length_tolerance: float = 2.0

    def __post_init__(self) -> None:
        self.mapping = _check_mapping("dset.moisesdb.mapping", self.mapping)
        if not self.length_tolerance >= 0:
            raise DemixError(f"dset.moisesdb.length_tolerance={self.length_tolerance}: expected seconds >= 0")
        for key in ("valid", "test"):
            value = getattr(self, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not 0 <= value < 1:
                    raise DemixError(f"dset.moisesdb.{key}={value}: expected a fraction in [0, 1) or a list of "
                                     "track folder names")
            elif isinstance(value, (list, tuple)):
                setattr(self, key, [str(name) for name in value])
            else:
                raise DemixError(f"dset.moisesdb.{key}={value!r}: expected a fraction in [0, 1) or a list of "
                                 "track folder names")


@dataclass
class SlakhSpec:
    """`dset.slakh`: how Slakh2100 stems (by `inst_class`, drums by `is_drum`) become sources.

    Attributes:
        mapping: {inst_class: source, or null to leave it out}, on top of the defaults (drums,
            Bass, Guitar and Piano go to the source of that name when there is one).
        rest: the source of every stem the mapping and defaults leave unassigned (null: left
            out).
        valid_tracks: validate on this many of the validation tracks (null: all; the full set has 375), the same
            ones in every epoch, run and resume (:func:`demixlab.data.layouts.stable_subset`).
    """

    mapping: tp.Optional[tp.Dict[str, tp.Optional[str]]] = None  # null: no entries
    rest: tp.Optional[str] = "other"
    valid_tracks: tp.Optional[int] = None

    def __post_init__(self) -> None:
        self.mapping = _check_mapping("dset.slakh.mapping", self.mapping)
        if self.valid_tracks is not None and (isinstance(self.valid_tracks, bool) or not isinstance(
                self.valid_tracks, int) or self.valid_tracks < 1):
            raise DemixError(f"dset.slakh.valid_tracks={self.valid_tracks!r}: expected a number of tracks >= 1, "
                             "or null for all")


def _check_missing(key: str, value: str) -> None:
    if value not in MISSING_POLICIES:
        raise DemixError(f"{key}={value!r}: expected one of {', '.join(MISSING_POLICIES)}")


def _check_unaligned(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise DemixError(f"{key}={value}: expected a probability in [0, 1]")


@dataclass
class ExtraDataset:
    """One entry of `dset.extra`: another training dataset, drawn from with a relative weight.

    Its sources, sample rate and channels are the main dataset's; only its training split is
    used. `weight` is the number of its examples per epoch relative to the main dataset's
    (0.5: one for every two of the main dataset).
    """

    kind: str = "stems"
    root: tp.Optional[str] = None
    weight: float = 1.0
    missing: str = "refuse"
    unaligned: float = 0.0
    toy: tp.Optional[ToySpec] = None
    moisesdb: tp.Optional[MoisesSpec] = None
    slakh: tp.Optional[SlakhSpec] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DemixError(f"dset.extra: kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if not self.weight > 0:
            raise DemixError(f"dset.extra ({self.kind} {self.root}): weight={self.weight}: expected a positive "
                             "number (examples per example of the main dataset)")
        _check_missing("dset.extra: missing", self.missing)
        _check_unaligned("dset.extra: unaligned", self.unaligned)
        for name, spec in (("toy", ToySpec), ("moisesdb", MoisesSpec), ("slakh", SlakhSpec)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, spec(**getattr(self, name)))


@dataclass
class DatasetConfig:
    """`dset`: where the audio comes from and how it is read.

    Attributes:
        kind: `toy` (generated, :mod:`demixlab.data.toy`), `stems` (a folder of stems in
            MUSDB18-HQ layout), `musdb` (MUSDB18 `.stem.mp4`), `moisesdb` or `slakh`
            (:mod:`demixlab.data.layouts`).
        root: the dataset folder (not for `toy`); a relative path resolves against the directory
            `dora` ran from.
        sources: the stem names, in the order models output them.
        samplerate, channels: what every track is converted to on read.
        valid_tracks: names of `train/` tracks held out for validation when there is no `valid/`
            folder, or `musdb` for the official MUSDB18 validation tracks.
        toy: the synthetic dataset's options (`kind: toy` only; its sample rate is `samplerate`).
        moisesdb, slakh: those layouts' options (their kind only).
        extra: other training datasets mixed in by weight (validation stays on this one).
        unaligned: probability that a training example takes each source from a random track.
        missing: `refuse` a dataset that lacks one of the sources, or read it as `silent`.
    """

    kind: str = "stems"
    root: tp.Optional[str] = None
    sources: tp.Optional[tp.List[str]] = None
    samplerate: int = 44100
    channels: int = 2
    valid_tracks: tp.Any = None
    toy: tp.Optional[ToySpec] = None
    moisesdb: tp.Optional[MoisesSpec] = None
    slakh: tp.Optional[SlakhSpec] = None
    extra: tp.List[ExtraDataset] = field(default_factory=list)
    unaligned: float = 0.0
    missing: str = "refuse"

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
        if self.kind == "moisesdb" and self.moisesdb is None:
            self.moisesdb = MoisesSpec()
        if self.kind == "slakh" and self.slakh is None:
            self.slakh = SlakhSpec()
        _check_unaligned("dset.unaligned", self.unaligned)
        _check_missing("dset.missing", self.missing)
        self.extra = [entry if isinstance(entry, ExtraDataset) else ExtraDataset(**dict(entry))
                      for entry in (self.extra or [])]

    def for_extra(self, entry: ExtraDataset) -> "DatasetConfig":
        """The options of an extra dataset: its own kind, root and layout options, with this
        dataset's sources, sample rate and channels."""
        return DatasetConfig(kind=entry.kind, root=entry.root, sources=list(self.sources or []),
                             samplerate=self.samplerate, channels=self.channels, valid_tracks=None,
                             toy=entry.toy, moisesdb=entry.moisesdb, slakh=entry.slakh, extra=[],
                             unaligned=entry.unaligned, missing=entry.missing)
