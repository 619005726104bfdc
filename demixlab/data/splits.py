"""Choosing validation tracks: a valid/ folder, or names held out of train/."""
import importlib.util
import typing as tp
from pathlib import Path

import yaml

from ..errors import DemixError
from .tracks import Track

T = tp.TypeVar("T", bound=Track)

MUSDB = "musdb"


def musdb_validation_tracks() -> tp.List[str]:
    """The 14 official MUSDB18 validation track names, from the installed musdb package's
    ``configs/mus.yaml``. musdb is not imported (importing it needs ffmpeg on PATH)."""
    spec = importlib.util.find_spec("musdb")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DemixError("dset.valid_tracks=musdb needs the musdb package (pip install musdb) for the "
                         "official validation track names")
    path = Path(locations[0]) / "configs" / "mus.yaml"
    try:
        names = yaml.safe_load(path.read_text())["validation_tracks"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as error:
        raise DemixError(f"{path}: cannot read musdb's validation_tracks ({error})") from None
    return [str(name) for name in names]


def valid_track_names(valid_tracks: tp.Any) -> tp.List[str]:
    """Turn ``dset.valid_tracks`` (None, a list of names, or ``musdb``) into a list of names."""
    if valid_tracks is None:
        return []
    if isinstance(valid_tracks, str):
        if valid_tracks == MUSDB:
            return musdb_validation_tracks()
        raise DemixError(f"dset.valid_tracks={valid_tracks!r}: expected a list of track names or 'musdb'")
    names = [str(name) for name in valid_tracks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DemixError(f"dset.valid_tracks lists {', '.join(map(repr, duplicates))} more than once")
    return names


def hold_out(tracks: tp.Sequence[T], names: tp.Sequence[str], folder: Path) -> tp.Tuple[tp.List[T], tp.List[T]]:
    """Split `tracks` (read from `folder`) into (train, valid) where valid are the named tracks,
    in the order of `names`."""
    by_name = {track.name: track for track in tracks}
    missing = [name for name in names if name not in by_name]
    if missing:
        listed = ", ".join(map(repr, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DemixError(f"dset.valid_tracks: {len(missing)} track(s) not found in {folder}: {listed}")
    held = set(names)
    train = [track for track in tracks if track.name not in held]
    if not train:
        raise DemixError(f"dset.valid_tracks holds out every track of {folder}: nothing is left to train on")
    return train, [by_name[name] for name in names]
