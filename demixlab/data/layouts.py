"""Datasets whose stems must be grouped into sources: MoisesDB and Slakh2100.

Both are read in place (nothing is written into the dataset); every audio file is checked once
and its header cached under ``<cache_dir>/metadata`` like the folders of stems
(:mod:`demixlab.data.scan`).

- MoisesDB: ``ROOT/[PROVIDER/]TRACK_ID/data.json`` with one folder per stem category holding
  ``<file id>.<ext>`` files (several per category: summed). ``data.json`` lists them:
  ``stems: [{stemName, tracks: [{id, trackType, extension, ...}]}]``. The dataset has no split:
  :func:`split_moisesdb` draws one from a list of names or a seeded ratio.
- Slakh2100: ``ROOT/{train,validation,test}/TrackNNNNN/{mix.flac, metadata.yaml, stems/SNN.flac}``;
  ``metadata.yaml`` gives each stem's ``inst_class``, ``is_drum`` and ``audio_rendered`` (stems
  not rendered have no file and are skipped). ``dset.slakh.valid_tracks`` validates on a fixed
  subset of its validation tracks (:func:`stable_subset`).

Which stems make which source is a :class:`SourceMap`: explicit entries of the mapping first,
then a category named like a source, then the `rest` source (or nothing).
"""
import hashlib
import json
import logging
import typing as tp
from pathlib import Path

import numpy as np
import yaml

from ..audio import read_audio
from ..errors import DemixError
from .config import MoisesSpec, SlakhSpec
from .scan import AUDIO_EXTENSIONS, MetadataCache, check_track_files
from .tracks import Track, stack_sources

logger = logging.getLogger(__name__)

MOISES_CATEGORIES = ("vocals", "drums", "bass", "guitar", "piano", "other_keys", "percussion", "bowed_strings",
                     "wind", "other_plucked", "other")
# General MIDI instrument families, as Slakh's metadata names them ("Strings (continued)" is
# the GM "Ensemble" family), plus "Drums" for the stems with is_drum.
SLAKH_CLASSES = ("Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Strings (continued)",
                 "Ensemble", "Brass", "Reed", "Pipe", "Synth Lead", "Synth Pad", "Synth Effects", "Ethnic",
                 "Percussive", "Sound Effects", "Drums")
SLAKH_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def normalise(name: str) -> str:
    """A category or class name compared loosely: lower case, spaces and dashes as underscores."""
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


class SourceMap:
    """Where each stem category goes: a source name, or None (left out).

    Args:
        what: the dataset's name for a category (`category`, `inst_class`), for messages.
        key: the config key of the mapping, for messages.
        known: the categories the dataset defines; mapping keys must be one of them, or one of
            `extra_keys` (finer labels such as MoisesDB track types, checked after scanning).
        sources, mapping, rest: `dset.sources`, the user's mapping and the rest source.
        defaults: built-in entries {category: source} used when that source exists.
    """

    def __init__(self, what: str, key: str, known: tp.Sequence[str], sources: tp.Sequence[str],
                 mapping: tp.Mapping[str, tp.Optional[str]], rest: tp.Optional[str],
                 defaults: tp.Mapping[str, str] = ()):
        self.what, self.key, self.sources = what, key, list(sources)
        self.known = {normalise(name): name for name in known}
        for target in [*mapping.values(), rest]:
            if target is not None and target not in self.sources:
                raise DemixError(f"{key}: {target!r} is not one of dset.sources ({', '.join(self.sources)}); "
                                 "map to a source or to null (left out)")
        self.mapping = {normalise(name): target for name, target in mapping.items()}
        self.rest = rest
        self.defaults = {normalise(name): target for name, target in dict(defaults).items() if target in self.sources}

    def finer_keys(self) -> tp.Set[str]:
        """Mapping keys that are not known categories (finer labels, checked by the caller)."""
        return {name for name in self.mapping if name not in self.known}

    def check_keys(self, finer: tp.Iterable[str] = ()) -> None:
        """Refuse mapping keys that are neither a known category nor one of the `finer` labels
        found in the data."""
        allowed = set(self.known) | {normalise(name) for name in finer}
        unknown = sorted(name for name in self.mapping if name not in allowed)
        if unknown:
            raise DemixError(f"{self.key}: unknown {self.what} {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(self.known.values())}")

    def target(self, category: str, finer: tp.Optional[str] = None) -> tp.Optional[str]:
        """The source of a stem of this category (and finer label), or None when left out."""
        for name in (finer, category):
            if name is not None and normalise(name) in self.mapping:
                return self.mapping[normalise(name)]
        category = normalise(category)
        if category in self.sources:
            return category
        if category in self.defaults:
            return self.defaults[category]
        return self.rest

    def check_covered(self, categories: tp.Iterable[str], missing: str, dataset: str) -> None:
        """With ``missing=refuse``, refuse sources that no category of the dataset can fill."""
        filled = {self.target(category) for category in categories} | set(self.mapping.values())
        empty = [source for source in self.sources if source not in filled]
        if empty and missing == "refuse":
            raise DemixError(f"{dataset}: no {self.what} maps to source(s) {', '.join(empty)}; map one with "
                             f"{self.key}, or set missing=silent to train on silence for them")


class MappedTrack(Track):
    """A track whose sources are sums of stem files (none: silence), with an optional mixture
    file. The files are assumed checked (same rate, channels and length)."""

    def __init__(self, name: str, parts: tp.Mapping[str, tp.Sequence[Path]], mixture: tp.Optional[Path],
                 samplerate: int, channels: int, frames: int):
        self.name = name
        self.sources = list(parts)
        self.parts = {source: list(paths) for source, paths in parts.items()}
        self.mixture = mixture
        self.samplerate, self.channels, self.frames = samplerate, channels, frames

    def read_source(self, source: int, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Sum the files of one source (silence when it has none)."""
        end = self.frames if frames < 0 else min(self.frames, offset + frames)
        out = np.zeros((self.channels, max(0, end - offset)), dtype=np.float32)
        for path in self.parts[self.sources[source]]:
            wav = read_audio(path, offset, out.shape[-1])
            out[:, :wav.shape[-1]] += wav
        return out

    def read_sources(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Sum the files of every source (see :meth:`Track.read_sources`)."""
        return stack_sources(self, offset, frames)

    def read_mixture(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Read the mixture file, or sum the sources when there is none."""
        if self.mixture is not None:
            return read_audio(self.mixture, offset, frames)
        return self.read_sources(offset, frames).sum(axis=0)


# ------------------------------------------------------------------------------------ MoisesDB
def moises_map(spec: MoisesSpec, sources: tp.Sequence[str]) -> SourceMap:
    """The category map of `dset.moisesdb` (defaults: same name, percussion to drums, the rest)."""
    return SourceMap("category", "dset.moisesdb.mapping", MOISES_CATEGORIES, sources, spec.mapping, spec.rest,
                     defaults={"percussion": "drums"})


def find_moises_tracks(root: Path) -> tp.List[Path]:
    """The track folders of a MoisesDB root: ``ROOT/TRACK/data.json`` or ``ROOT/PROVIDER/TRACK/data.json``."""
    folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if any((folder / "data.json").is_file() for folder in folders):
        candidates = folders
    else:
        candidates = sorted(track for folder in folders for track in folder.iterdir()
                            if track.is_dir() and not track.name.startswith("."))
    if not candidates:
        raise DemixError(f"{root}: no MoisesDB track folders (expected {root}/[PROVIDER/]TRACK_ID/data.json)")
    for folder in candidates:
        if not (folder / "data.json").is_file():
            raise DemixError(f"{folder}: no data.json (every MoisesDB track folder has one listing its stems)")
    return candidates


def _read_moises_json(track_dir: Path) -> tp.List[tp.Tuple[str, str, Path]]:
    """The (category, track type, file) triples that a track's data.json lists."""
    path = track_dir / "data.json"
    try:
        data = json.loads(path.read_text())
        stems = data["stems"]
        files = []
        for stem in stems:
            category = str(stem["stemName"])
            for part in stem["tracks"]:
                file = track_dir / category / f"{part['id']}.{str(part['extension']).lstrip('.')}"
                files.append((category, str(part.get("trackType") or ""), file))
    except (OSError, ValueError) as error:
        raise DemixError(f"{path}: not readable JSON ({str(error).splitlines()[0]})") from None
    except (KeyError, TypeError) as error:
        raise DemixError(f"{path}: expected {{stems: [{{stemName, tracks: [{{id, trackType, extension}}]}}]}} "
                         f"(missing or wrong {error})") from None
    for _, _, file in files:
        if not file.is_file():
            raise DemixError(f"{file}: listed in {path} but missing")
    return files


def scan_moisesdb(root: Path, spec: MoisesSpec, sources: tp.Sequence[str], cache_dir: Path,
                  missing: str = "refuse", progress: bool = True) -> tp.List[MappedTrack]:
    """Check and list every track of a MoisesDB folder, its stems grouped into `sources`; a
    track whose files differ in length by up to ``spec.length_tolerance`` seconds is read at the
    shortest length (as the moisesdb package trims them), with a warning."""
    root = root.absolute()
    mapping = moises_map(spec, sources)
    track_dirs = find_moises_tracks(root)
    listed = {track_dir: _read_moises_json(track_dir) for track_dir in track_dirs}
    mapping.check_keys({finer for files in listed.values() for _, finer, _ in files})
    mapping.check_covered(MOISES_CATEGORIES, missing, f"MoisesDB {root}")
    parts: tp.Dict[Path, tp.Dict[str, tp.List[Path]]] = {}
    for track_dir, files in listed.items():
        parts[track_dir] = {source: [] for source in sources}
        for category, finer, file in files:
            target = mapping.target(category, finer)
            if target is not None:
                parts[track_dir][target].append(file)
        if not any(parts[track_dir].values()):
            raise DemixError(f"{track_dir}: none of its stems maps to {', '.join(sources)}")
    shapes = check_track_files({track_dir: [file for _, _, file in files] for track_dir, files in listed.items()},
                               MetadataCache.for_folder(cache_dir, root), root.name, progress,
                               length_tolerance=spec.length_tolerance, tolerance_key="dset.moisesdb.length_tolerance")
    return [MappedTrack(track_dir.name, parts[track_dir], None, shapes[track_dir].samplerate,
                        shapes[track_dir].channels, shapes[track_dir].frames) for track_dir in track_dirs]


def split_moisesdb(tracks: tp.Sequence[MappedTrack], spec: MoisesSpec,
                   root: Path) -> tp.Tuple[tp.List[MappedTrack], tp.List[MappedTrack], tp.List[MappedTrack]]:
    """(train, valid, test) by `dset.moisesdb.valid`/`test`: lists of track folder names, or
    fractions of a seeded permutation of the tracks sorted by name (test drawn first)."""
    by_name = {track.name: track for track in tracks}
    order = sorted(by_name)
    permutation = [order[index] for index in np.random.default_rng(spec.seed).permutation(len(order))]
    chosen: tp.Dict[str, tp.List[str]] = {}
    for key in ("test", "valid"):
        value = getattr(spec, key)
        if isinstance(value, list):
            unknown = [name for name in value if name not in by_name]
            if unknown:
                raise DemixError(f"dset.moisesdb.{key}: {len(unknown)} track(s) not in {root}: "
                                 f"{', '.join(map(repr, unknown[:5]))}")
            chosen[key] = list(value)
        else:
            taken = set(chosen.get("test", []))
            pool = [name for name in permutation if name not in taken]
            count = int(round(value * len(order))) if value else 0
            chosen[key] = pool[:max(1, count) if value else 0]
    overlap = sorted(set(chosen["test"]) & set(chosen["valid"]))
    if overlap:
        raise DemixError(f"dset.moisesdb: track(s) {', '.join(map(repr, overlap[:5]))} are both in valid and test")
    held = set(chosen["test"]) | set(chosen["valid"])
    train = [by_name[name] for name in order if name not in held]
    if not train:
        raise DemixError(f"dset.moisesdb: valid and test take every track of {root}: nothing is left to train on")
    return train, [by_name[name] for name in chosen["valid"]], [by_name[name] for name in chosen["test"]]


# ------------------------------------------------------------------------------------- Slakh
def slakh_map(spec: SlakhSpec, sources: tp.Sequence[str]) -> SourceMap:
    """The class map of `dset.slakh` (defaults: a class named like a source goes to it)."""
    return SourceMap("inst_class", "dset.slakh.mapping", SLAKH_CLASSES, sources, spec.mapping, spec.rest)


def _read_slakh_metadata(track_dir: Path) -> tp.List[tp.Tuple[str, Path]]:
    """(class, file) of every rendered stem of a Slakh track; drums have the class "Drums"."""
    path = track_dir / "metadata.yaml"
    if not path.is_file():
        raise DemixError(f"{track_dir}: no metadata.yaml (every Slakh2100 track folder has one)")
    try:
        stems = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["stems"]
        entries = [(str(name), bool(stem.get("audio_rendered", True)), bool(stem.get("is_drum", False)),
                    str(stem.get("inst_class", ""))) for name, stem in stems.items()]
    except (OSError, yaml.YAMLError) as error:
        raise DemixError(f"{path}: not readable YAML ({str(error).splitlines()[0]})") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise DemixError(f"{path}: expected stems: {{SNN: {{inst_class, is_drum, audio_rendered}}}} "
                         f"(missing or wrong {error})") from None
    stem_files = {file.stem: file for file in (track_dir / "stems").glob("*")
                  if file.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS} if (track_dir / "stems").is_dir() else {}
    found = []
    for name, rendered, is_drum, inst_class in entries:
        if not rendered:
            continue
        if name not in stem_files:
            raise DemixError(f"{track_dir / 'stems'}: no audio file for stem {name}, which {path.name} says "
                             "was rendered")
        found.append(("Drums" if is_drum else inst_class, stem_files[name]))
    return found


def _mix_file(track_dir: Path) -> tp.Optional[Path]:
    matches = [path for path in sorted(track_dir.glob("mix.*")) if path.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS]
    return matches[0] if matches else None


def scan_slakh(folder: Path, spec: SlakhSpec, sources: tp.Sequence[str], cache_dir: Path, missing: str = "refuse",
               progress: bool = True) -> tp.List[MappedTrack]:
    """Check and list the tracks of one Slakh2100 split folder, stems grouped into `sources`.

    The mixture is ``mix.flac`` when every rendered stem belongs to a source; when some are
    left out, it is the sum of the sources.
    """
    folder = folder.absolute()
    mapping = slakh_map(spec, sources)
    mapping.check_keys()
    mapping.check_covered(SLAKH_CLASSES, missing, f"Slakh2100 {folder.parent}")
    track_dirs = sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not track_dirs:
        raise DemixError(f"{folder}: no track folders (expected {folder}/TrackNNNNN/metadata.yaml)")
    layouts, files = {}, {}
    for track_dir in track_dirs:
        stems = _read_slakh_metadata(track_dir)
        parts: tp.Dict[str, tp.List[Path]] = {source: [] for source in sources}
        dropped = 0
        for inst_class, file in stems:
            target = mapping.target(inst_class)
            if target is None:
                dropped += 1
            else:
                parts[target].append(file)
        mix = _mix_file(track_dir)
        layouts[track_dir] = (parts, mix if not dropped else None)
        files[track_dir] = [file for _, file in stems] + ([mix] if mix is not None else [])
        if not files[track_dir]:
            raise DemixError(f"{track_dir}: no rendered stem and no mix file")
    shapes = check_track_files(files, MetadataCache.for_folder(cache_dir, folder), folder.name, progress)
    return [MappedTrack(track_dir.name, parts, mix, shapes[track_dir].samplerate, shapes[track_dir].channels,
                        shapes[track_dir].frames) for track_dir, (parts, mix) in layouts.items()]


def stable_subset(tracks: tp.Sequence[Track], count: tp.Optional[int]) -> tp.List[Track]:
    """`count` of `tracks` (all when None or more than there are), in their order: those whose
    names rank first by SHA-1, so the choice depends only on the names (the same in every epoch,
    run, resume and machine, and unchanged for a track when others are added or removed)."""
    if count is None or count >= len(tracks):
        return list(tracks)
    ranked = sorted(tracks, key=lambda track: hashlib.sha1(track.name.encode()).hexdigest())
    chosen = {id(track) for track in ranked[:count]}
    return [track for track in tracks if id(track) in chosen]
