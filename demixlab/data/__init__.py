"""Data: from a dataset's options to training, validation and test datasets.

Owns the `dset` schema (:mod:`.config`), reading and checking audio tracks (:mod:`.tracks`,
:mod:`.scan`, :mod:`.musdb_tracks`, :mod:`.musdb_cache`), choosing validation tracks
(:mod:`.splits`), the PyTorch datasets (:mod:`.datasets`) and the built-in synthetic dataset
(:mod:`.toy`). Imports only the base modules (errors, files, audio).

Dataset kinds (``dset.kind``):

- ``stems``: ``ROOT/{train,valid,test}/TRACK/SOURCE.<ext>`` (any format soundfile reads) with an
  optional ``mixture.<ext>``; without ``valid/``, ``dset.valid_tracks`` names the tracks held out
  of ``train/`` (``musdb``: the 14 official MUSDB18 validation tracks).
- ``musdb``: MUSDB18 ``.stem.mp4`` files in ``ROOT/{train,test}``, decoded once into WAV files
  under ``<cache_dir>/musdb`` (:mod:`.musdb_cache`) and read from there.
- ``toy``: a synthetic dataset generated once under the cache directory, then read as ``stems``.
- ``moisesdb``, ``slakh``: MoisesDB and Slakh2100 in their own layouts, stem categories grouped
  into ``dset.sources`` (:mod:`.layouts`).

``dset.extra`` adds other datasets' training tracks, drawn by weight
(:class:`.datasets.WeightedSegments`); ``dset.unaligned`` mixes sources of different tracks.

Every file is checked once (headers, lengths, NaN/Inf); results are cached under
``<cache_dir>/metadata``, never inside the dataset.
"""
import dataclasses
import logging
import os
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import DemixError
from .config import DatasetConfig
from .datasets import ExampleTransform, SegmentDataset, TrackDataset, WeightedSegments
from .layouts import SLAKH_SPLITS, scan_moisesdb, scan_slakh, split_moisesdb, stable_subset
from .musdb_cache import load_decoded_musdb
from .scan import scan_stems_folder
from .splits import hold_out, valid_track_names
from .tracks import Track, conform

logger = logging.getLogger(__name__)

__all__ = ["DataSplits", "DatasetConfig", "ExampleTransform", "SegmentDataset", "TestSplit", "Track",
           "TrackDataset", "WeightedSegments", "build_datasets", "build_test_split", "build_valid_split",
           "resolve_cache_dir", "training_tracks"]

EXTRA_STREAM = 3000  # seeds of the extra datasets' segments: [seed, EXTRA_STREAM, k]


@dataclass
class DataSplits:
    """The datasets of one experiment; `test` is None when not requested or when there is no test split."""

    train: tp.Union[SegmentDataset, WeightedSegments]
    valid: TrackDataset
    test: tp.Optional[TrackDataset]
    sources: tp.List[str]
    samplerate: int
    channels: int


@dataclass
class TestSplit:
    """The test (or validation) tracks of a dataset, converted to a model's sample rate and channels;
    `root` names where they come from."""

    dataset: TrackDataset
    sources: tp.List[str]
    root: str


def resolve_cache_dir(cache_dir: tp.Optional[str]) -> Path:
    """The cache directory: `cache_dir` if set, else ``$DEMIXLAB_CACHE``, else ``~/.cache/demixlab``."""
    if cache_dir:
        return Path(str(cache_dir)).expanduser()
    if os.environ.get("DEMIXLAB_CACHE"):
        return Path(os.environ["DEMIXLAB_CACHE"]).expanduser()
    return Path.home() / ".cache" / "demixlab"


def build_datasets(dset: DatasetConfig, *, segment: float, samples_per_track: int, seed: int,
                   cache_dir: Path, base_dir: Path, extra_frames: int = 0, with_test: bool = True,
                   progress: bool = True, transform: tp.Optional[ExampleTransform] = None) -> DataSplits:
    """Check the dataset described by `dset` and build its datasets.

    Args:
        dset: the dataset's options.
        segment: seconds per training example; `extra_frames` are added (cropped by augmentation).
        samples_per_track: training examples per track and epoch.
        seed: seed of the training segment offsets.
        cache_dir: where metadata (and the toy dataset) are cached.
        base_dir: the directory `dora` ran from; a relative ``dset.root`` resolves against it.
        with_test: also scan the test split (None in the result if the dataset has none).
        progress: show a progress bar while checking files.
        transform: run on every training example where it is read (e.g. pitch/tempo changes).
    """
    dset = as_dataset_config(dset)
    sources, samplerate, channels = list(dset.sources or []), dset.samplerate, dset.channels
    cache_dir = Path(cache_dir)
    root = dataset_root(dset, base_dir, cache_dir, progress)
    train, valid, test = _read_splits(dset, root, cache_dir, progress, with_test)
    splits = {"train": train, "valid": valid, **({"test": test} if test is not None else {})}
    extras = []
    for number, entry in enumerate(dset.extra):
        extra = dset.for_extra(entry)
        extra_root = dataset_root(extra, base_dir, cache_dir, progress)
        extras.append(_read_splits(extra, extra_root, cache_dir, progress, with_test=False, train_only=True)[0])
        splits[f"extra {number} ({extra.kind} {extra_root})"] = extras[-1]
    _warn_conversions(splits, samplerate, channels)
    for name, tracks in splits.items():
        hours = sum(track.duration for track in tracks) / 3600
        logger.info("%s: %d tracks, %.3f hours", name, len(tracks), hours)
    train, valid = [conform(t, samplerate, channels) for t in train], [conform(t, samplerate, channels) for t in valid]
    segment_frames = int(round(segment * samplerate)) + int(extra_frames)
    train_set: tp.Union[SegmentDataset, WeightedSegments] = SegmentDataset(
        train, segment_frames, samples_per_track, seed, unaligned=dset.unaligned, transform=transform)
    if extras:
        extra_sets = [SegmentDataset([conform(t, samplerate, channels) for t in tracks], segment_frames,
                                     samples_per_track, _extra_seed(seed, number), unaligned=entry.unaligned,
                                     transform=transform)
                      for number, (tracks, entry) in enumerate(zip(extras, dset.extra))]
        train_set = WeightedSegments(train_set, extra_sets, [entry.weight for entry in dset.extra])
    return DataSplits(
        train=train_set,
        valid=TrackDataset(valid),
        test=TrackDataset([conform(t, samplerate, channels) for t in test]) if test is not None else None,
        sources=sources, samplerate=samplerate, channels=channels)


def as_dataset_config(dset: tp.Any) -> DatasetConfig:
    """`dset` as a :class:`DatasetConfig`: a mapping (e.g. a DictConfig) is checked against the
    schema, absent keys taking their defaults."""
    if isinstance(dset, DatasetConfig):
        return dset
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DatasetConfig), dset))
    except OmegaConfBaseException as error:
        raise DemixError(f"dset: {str(error).splitlines()[0]}") from None
    assert isinstance(config, DatasetConfig)
    return config


def _extra_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, EXTRA_STREAM, number]).generate_state(1)[0])


def _read_splits(dset: DatasetConfig, root: Path, cache_dir: Path, progress: bool, with_test: bool,
                 train_only: bool = False) -> tp.Tuple[tp.List[Track], tp.List[Track], tp.Optional[tp.List[Track]]]:
    """(train, valid, test) tracks of a dataset (test None when absent or not asked for; with
    `train_only`, valid is empty: an extra dataset's validation tracks are not used at all)."""
    if dset.kind == "moisesdb":
        assert dset.moisesdb is not None  # DatasetConfig sets the defaults
        _no_valid_tracks(dset)
        tracks = scan_moisesdb(root, dset.moisesdb, dset.sources or [], cache_dir, dset.missing, progress)
        train, valid, test = split_moisesdb(tracks, dset.moisesdb, root)
        if train_only:
            return train, [], None
        if not valid:
            raise DemixError("dset.moisesdb.valid is empty: give a fraction or a list of track folder names")
        return train, valid, (test or None) if with_test else None
    if dset.kind == "slakh":
        _no_valid_tracks(dset)
        train = _read_split(dset, root, "train", cache_dir, progress)
        if train_only:
            return train, [], None
        valid = _read_split(dset, root, "valid", cache_dir, progress)
        assert dset.slakh is not None  # DatasetConfig sets the defaults
        if dset.slakh.valid_tracks is not None and dset.slakh.valid_tracks < len(valid):
            logger.info("validating on %d of the %d tracks of %s (dset.slakh.valid_tracks)", dset.slakh.valid_tracks,
                        len(valid), root / SLAKH_SPLITS["valid"])
            valid = stable_subset(valid, dset.slakh.valid_tracks)
        test = _read_split(dset, root, "test", cache_dir, progress) if with_test and (root / "test").is_dir() else None
        return train, valid, test
    train_folder = _split_folder(root, "train")
    train = _read_split(dset, root, "train", cache_dir, progress)
    if train_only:
        return train, [], None
    if dset.kind != "musdb" and (root / "valid").is_dir():
        valid = _read_split(dset, root, "valid", cache_dir, progress)
        if dset.valid_tracks:
            logger.info("using %s for validation; dset.valid_tracks is ignored", root / "valid")
    else:
        names = valid_track_names(dset.valid_tracks)
        if not names:
            if dset.kind == "musdb":
                raise DemixError("dset.valid_tracks is empty: MUSDB18 has no valid/ folder; list names of tracks "
                                 f"in {train_folder} to hold out, or use dset.valid_tracks=musdb (the official split)")
            raise DemixError(f"dset.root={root}: no validation tracks. Either create {root / 'valid'} "
                             f"(same layout as train/), or list names of tracks in {train_folder} to hold out "
                             "with dset.valid_tracks (dset.valid_tracks=musdb: the official MUSDB18 split)")
        train, valid = hold_out(train, names, train_folder)
    test = None
    if with_test:
        if (root / "test").is_dir():
            test = _read_split(dset, root, "test", cache_dir, progress)
        else:
            logger.warning("no test split: %s does not exist", root / "test")
    return train, valid, test


def _no_valid_tracks(dset: DatasetConfig) -> None:
    if dset.valid_tracks:
        where = "dset.moisesdb.valid" if dset.kind == "moisesdb" else "its validation/ folder"
        raise DemixError(f"dset.valid_tracks is not used with dset.kind={dset.kind} (validation comes from {where}); "
                         "leave it empty")


def build_test_split(dset: DatasetConfig, *, samplerate: int, channels: int, base_dir: Path,
                     cache_dir: Path, progress: bool = False) -> TestSplit:
    """The test tracks that `dset` describes (``ROOT/test``; for the toy kind, its generated test
    split), read at `samplerate` with `channels` channels.

    Only the test split is needed: a folder with nothing but ``test/`` works.
    """
    dset = as_dataset_config(dset)
    root = dataset_root(dset, base_dir, Path(cache_dir), progress)
    if dset.kind == "moisesdb":
        tracks: tp.List[Track] = list(_read_splits(dset, root, Path(cache_dir), progress, with_test=True)[2] or [])
        if not tracks:
            raise DemixError("dset.moisesdb.test is empty: no test tracks")
    else:
        _split_folder(root, "test")
        tracks = _read_split(dset, root, "test", Path(cache_dir), progress)
    if not tracks:
        raise DemixError(f"{root / 'test'}: no test tracks")
    converted = [conform(track, samplerate, channels) for track in tracks]
    if any(track.samplerate != samplerate or track.channels != channels for track in tracks):
        logger.info("test tracks are converted to the model's %d Hz, %d channel(s)", samplerate, channels)
    return TestSplit(dataset=TrackDataset(converted), sources=list(dset.sources or []), root=str(root))


def build_valid_split(dset: DatasetConfig, *, samplerate: int, channels: int, base_dir: Path,
                      cache_dir: Path, progress: bool = False) -> TestSplit:
    """The validation tracks that `dset` describes, as training validates on them (``ROOT/valid``,
    or the tracks of ``dset.valid_tracks`` held out of ``ROOT/train``...), read at `samplerate`
    with `channels` channels."""
    dset = as_dataset_config(dset)
    root = dataset_root(dset, base_dir, Path(cache_dir), progress)
    _, tracks, _ = _read_splits(dset, root, Path(cache_dir), progress, with_test=False)
    if not tracks:
        raise DemixError(f"dset.root={root}: no validation tracks")
    converted = [conform(track, samplerate, channels) for track in tracks]
    if any(track.samplerate != samplerate or track.channels != channels for track in tracks):
        logger.info("validation tracks are converted to the model's %d Hz, %d channel(s)", samplerate, channels)
    where = root / "valid" if (root / "valid").is_dir() else root
    return TestSplit(dataset=TrackDataset(converted), sources=list(dset.sources or []), root=str(where))


def training_tracks(dset: DatasetConfig, *, base_dir: Path, cache_dir: Path, progress: bool = False) -> tp.List[Track]:
    """The tracks training draws its examples from, as read (no conversion): ``ROOT/train``
    less the tracks of ``dset.valid_tracks``, or what the layout's split leaves to training."""
    dset = as_dataset_config(dset)
    root = dataset_root(dset, base_dir, Path(cache_dir), progress)
    return _read_splits(dset, root, Path(cache_dir), progress, with_test=False, train_only=not dset.valid_tracks)[0]


def dataset_root(dset: DatasetConfig, base_dir: Path, cache_dir: Path, progress: bool = False) -> Path:
    """The dataset's folder: ``dset.root`` as an existing absolute folder (a relative path resolves
    against `base_dir`), or for the toy kind the generated dataset under `cache_dir`."""
    if dset.kind == "toy":
        assert dset.toy is not None  # DatasetConfig checks it
        from .toy import ensure_toy_dataset  # noqa: PLC0415 - only the toy kind needs the synthesizer

        spec = dataclasses.replace(dset.toy, samplerate=dset.samplerate)
        return Path(ensure_toy_dataset(spec, Path(cache_dir) / "toy", progress=progress))
    if dset.root in (None, ""):
        raise DemixError(f"dset.root is not set: pass dset.root=/path/to/dataset (dset.kind={dset.kind})")
    root = Path(str(dset.root)).expanduser()
    if not root.is_absolute():
        root = Path(base_dir) / root
    if not root.is_dir():
        raise DemixError(f"dset.root={dset.root}: no such directory ({root})")
    return root


def _split_folder(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DemixError(f"dset.root={root}: no {split}/ folder ({folder} does not exist)")
    return folder


def _read_split(dset: DatasetConfig, root: Path, split: str, cache_dir: Path, progress: bool) -> tp.List[Track]:
    """The tracks of one split folder: scanned stems, MUSDB18 stem files or Slakh2100 tracks."""
    sources = list(dset.sources or [])
    silent = dset.missing == "silent"
    if dset.kind == "musdb":
        return list(load_decoded_musdb(root, split, sources, cache_dir, allow_missing=silent, progress=progress))
    if dset.kind == "slakh":
        assert dset.slakh is not None  # DatasetConfig sets the defaults
        folder = _split_folder(root, SLAKH_SPLITS[split])
        return list(scan_slakh(folder, dset.slakh, sources, cache_dir, dset.missing, progress))
    return list(scan_stems_folder(root / split, sources, cache_dir, progress, allow_missing=silent))


def _warn_conversions(splits: tp.Dict[str, tp.List[Track]], samplerate: int, channels: int) -> None:
    """One warning per dataset when some tracks will be resampled or remixed on read."""
    odd = [track for tracks in splits.values() for track in tracks
           if track.samplerate != samplerate or track.channels != channels]
    if odd:
        found = sorted({f"{track.samplerate} Hz/{track.channels} ch" for track in odd})
        logger.warning("%d track(s) (e.g. %r) are converted on read to dset.samplerate=%d, dset.channels=%d "
                       "(found %s)", len(odd), odd[0].name, samplerate, channels, ", ".join(found))
