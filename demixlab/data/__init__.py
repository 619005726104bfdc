"""The data pipeline: from a ``dset`` config to training, validation and test datasets.

Dataset kinds (``dset.kind``):

- ``stems``: ``ROOT/{train,valid,test}/TRACK/SOURCE.<ext>`` (any format soundfile reads) with an
  optional ``mixture.<ext>``; without ``valid/``, ``dset.valid_tracks`` names the tracks held out
  of ``train/`` (``musdb``: the 14 official MUSDB18 validation tracks).
- ``musdb``: MUSDB18 ``.stem.mp4`` files in ``ROOT/{train,test}``, read through the musdb package.
- ``toy``: a synthetic dataset generated once under the cache directory, then read as ``stems``.

Every file is checked once (headers, lengths, NaN/Inf); results are cached under
``<cache_dir>/metadata``, never inside the dataset.
"""
import logging
import os
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import DemixError
from .datasets import SegmentDataset, TrackDataset
from .musdb_tracks import load_musdb_folder
from .scan import scan_stems_folder
from .splits import hold_out, valid_track_names
from .tracks import Track, conform

logger = logging.getLogger(__name__)

KINDS = ("toy", "stems", "musdb")

__all__ = ["DataSplits", "SegmentDataset", "Track", "TrackDataset", "build_datasets", "resolve_cache_dir"]


@dataclass
class DataSplits:
    """The datasets of one experiment; `test` is None when not requested or when there is no test split."""

    train: SegmentDataset
    valid: TrackDataset
    test: tp.Optional[TrackDataset]
    sources: tp.List[str]
    samplerate: int
    channels: int


def resolve_cache_dir(misc_cache_dir: tp.Optional[str]) -> Path:
    """The cache directory: `misc_cache_dir` if set, else ``$DEMIXLAB_CACHE``, else ``~/.cache/demixlab``."""
    if misc_cache_dir:
        return Path(str(misc_cache_dir)).expanduser()
    if os.environ.get("DEMIXLAB_CACHE"):
        return Path(os.environ["DEMIXLAB_CACHE"]).expanduser()
    return Path.home() / ".cache" / "demixlab"


def build_datasets(dset: DictConfig, *, segment: float, samples_per_track: int, seed: int,
                   cache_dir: Path, base_dir: Path, extra_frames: int = 0, with_test: bool = True,
                   progress: bool = True) -> DataSplits:
    """Check the dataset described by `dset` and build its datasets.

    Args:
        dset: the ``dset`` config group (kind, root, sources, samplerate, channels, valid_tracks, toy).
        segment: seconds per training example; `extra_frames` are added (cropped by augmentation).
        samples_per_track: training examples per track and epoch.
        seed: seed of the training segment offsets.
        cache_dir: where metadata (and the toy dataset) are cached.
        base_dir: the directory `dora` ran from; a relative ``dset.root`` resolves against it.
        with_test: also scan the test split (None in the result if the dataset has none).
        progress: show a progress bar while checking files.
    """
    kind = dset.get("kind")
    if kind not in KINDS:
        raise DemixError(f"dset.kind={kind!r}: expected one of {', '.join(KINDS)}")
    sources = dataset_sources(dset)
    samplerate, channels = int(dset.samplerate), int(dset.channels)
    cache_dir = Path(cache_dir)
    valid_tracks = _valid_tracks(dset)
    if kind == "musdb":
        train, valid, test = _musdb_splits(dataset_root(dset, base_dir), sources, valid_tracks, with_test)
    else:
        root = toy_root(dset, cache_dir, progress) if kind == "toy" else dataset_root(dset, base_dir)
        train, valid, test = _stems_splits(root, sources, valid_tracks, cache_dir, with_test, progress)

    splits = {"train": train, "valid": valid, **({"test": test} if test is not None else {})}
    _warn_conversions(splits, samplerate, channels)
    for name, tracks in splits.items():
        hours = sum(track.duration for track in tracks) / 3600
        logger.info("%s: %d tracks, %.3f hours", name, len(tracks), hours)
    train, valid = [conform(t, samplerate, channels) for t in train], [conform(t, samplerate, channels) for t in valid]
    segment_frames = int(round(segment * samplerate)) + int(extra_frames)
    return DataSplits(
        train=SegmentDataset(train, segment_frames, samples_per_track, seed),
        valid=TrackDataset(valid),
        test=TrackDataset([conform(t, samplerate, channels) for t in test]) if test is not None else None,
        sources=sources, samplerate=samplerate, channels=channels)


def dataset_root(dset: DictConfig, base_dir: Path) -> Path:
    """``dset.root`` as an existing absolute folder; relative paths resolve against `base_dir`."""
    if OmegaConf.is_missing(dset, "root") or dset.get("root") in (None, ""):
        raise DemixError(f"dset.root is not set: pass dset.root=/path/to/dataset (dset.kind={dset.kind})")
    root = Path(str(dset.root)).expanduser()
    if not root.is_absolute():
        root = Path(base_dir) / root
    if not root.is_dir():
        raise DemixError(f"dset.root={dset.root}: no such directory ({root})")
    return root


def dataset_sources(dset: DictConfig) -> tp.List[str]:
    """The validated `dset.sources` list (unique, non-empty file names)."""
    if OmegaConf.is_missing(dset, "sources") or not dset.get("sources"):
        raise DemixError("dset.sources is not set: pass e.g. 'dset.sources=[vocals,accompaniment]'")
    if isinstance(dset.sources, str):
        raise DemixError(f"dset.sources={dset.sources!r}: expected a list of source names")
    sources = [str(source) for source in dset.sources]
    if len(set(sources)) != len(sources) or any(not source or "/" in source for source in sources):
        raise DemixError(f"dset.sources={sources}: source names must be unique, non-empty file names")
    return sources


def _valid_tracks(dset: DictConfig) -> tp.Any:
    value = dset.get("valid_tracks")
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _split_folder(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DemixError(f"dset.root={root}: no {split}/ folder ({folder} does not exist)")
    return folder


def _stems_splits(root: Path, sources: tp.List[str], valid_tracks: tp.Any, cache_dir: Path, with_test: bool,
                  progress: bool) -> tp.Tuple[tp.List[Track], tp.List[Track], tp.Optional[tp.List[Track]]]:
    """(train, valid, test) tracks of a folder of stems."""
    def scan(folder: Path) -> tp.List[Track]:
        return list(scan_stems_folder(folder, sources, cache_dir, progress))

    train_folder = _split_folder(root, "train")
    train = scan(train_folder)
    if (root / "valid").is_dir():
        valid = scan(root / "valid")
        if valid_tracks:
            logger.info("using %s for validation; dset.valid_tracks is ignored", root / "valid")
    else:
        names = valid_track_names(valid_tracks)
        if not names:
            raise DemixError(f"dset.root={root}: no validation tracks. Either create {root / 'valid'} "
                             f"(same layout as train/), or list names of tracks in {train_folder} to hold out "
                             "with dset.valid_tracks (dset.valid_tracks=musdb: the official MUSDB18 split)")
        train, valid = hold_out(train, names, train_folder)
    return train, valid, _optional_test(root, with_test, scan)


def _musdb_splits(root: Path, sources: tp.List[str], valid_tracks: tp.Any, with_test: bool
                  ) -> tp.Tuple[tp.List[Track], tp.List[Track], tp.Optional[tp.List[Track]]]:
    """(train, valid, test) tracks of MUSDB18 (.stem.mp4); validation is held out of train/."""
    names = valid_track_names(valid_tracks)
    if not names:
        raise DemixError("dset.valid_tracks is empty: MUSDB18 has no valid/ folder; list names of tracks "
                         f"in {root / 'train'} to hold out, or use dset.valid_tracks=musdb (the official split)")
    train_folder = _split_folder(root, "train")
    train, valid = hold_out(list(load_musdb_folder(root, "train", sources)), names, train_folder)
    return train, valid, _optional_test(root, with_test, lambda folder: list(load_musdb_folder(root, "test", sources)))


def _optional_test(root: Path, with_test: bool, scan: tp.Callable[[Path], tp.List[Track]]) -> tp.Optional[tp.List[Track]]:
    if not with_test:
        return None
    folder = root / "test"
    if not folder.is_dir():
        logger.warning("no test split: %s does not exist", folder)
        return None
    return scan(folder)


def toy_root(dset: DictConfig, cache_dir: Path, progress: bool) -> Path:
    """Generate (once) the toy dataset described by ``dset.toy`` and return its root."""
    from .toy import ToySpec, ensure_toy_dataset  # noqa: PLC0415 - only the toy kind needs it

    toy = dset.get("toy")
    if toy is None:
        raise DemixError("dset.kind=toy needs a dset.toy section (seed, train_tracks, valid_tracks, ...)")
    try:
        spec = ToySpec(seed=int(toy.seed), train_tracks=int(toy.train_tracks), valid_tracks=int(toy.valid_tracks),
                       test_tracks=int(toy.test_tracks), train_duration=float(toy.train_duration),
                       eval_duration=float(toy.eval_duration), samplerate=int(dset.samplerate))
    except Exception as error:  # a missing key or a non-number
        raise DemixError(f"dset.toy: invalid toy dataset options ({error})") from None
    return Path(ensure_toy_dataset(spec, cache_dir / "toy", progress=progress))


def _warn_conversions(splits: tp.Dict[str, tp.List[Track]], samplerate: int, channels: int) -> None:
    """One warning per dataset when some tracks will be resampled or remixed on read."""
    odd = [track for tracks in splits.values() for track in tracks
           if track.samplerate != samplerate or track.channels != channels]
    if odd:
        found = sorted({f"{track.samplerate} Hz/{track.channels} ch" for track in odd})
        logger.warning("%d track(s) (e.g. %r) are converted on read to dset.samplerate=%d, dset.channels=%d "
                       "(found %s)", len(odd), odd[0].name, samplerate, channels, ", ".join(found))
