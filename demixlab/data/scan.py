"""Scanning folders of stems: layout and audio checks, with a metadata cache.

Every audio file is read once in full (to catch NaN/Inf samples and damage beyond the header);
the result is cached outside the dataset, keyed by path, size and modification time, so later
scans only list folders and stat files.
"""
import hashlib
import json
import logging
import os
import typing as tp
from collections import Counter
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from ..audio import AudioInfo, audio_info, read_audio
from ..errors import DemixError
from ..files import atomic_path
from .tracks import StemsTrack

logger = logging.getLogger(__name__)

MIXTURE = "mixture"
# Shown first in error messages; any other extension soundfile knows is accepted too.
COMMON_EXTENSIONS = ("wav", "flac", "ogg", "mp3", "aiff")
# RAW files have no header: soundfile cannot open them without being told their format.
AUDIO_EXTENSIONS = (frozenset(COMMON_EXTENSIONS) | {fmt.lower() for fmt in sf.available_formats()}
                    | {"aif", "oga", "opus"}) - {"raw"}
READ_BLOCK = 1 << 20  # frames per read when checking a whole file


class MetadataCache:
    """Headers of audio files that passed :func:`check_audio_file`, stored as JSON.

    An entry is valid only while the file keeps the same size and modification time (ns).
    """

    VERSION = 1

    def __init__(self, path: Path):
        self.path = path
        self.entries: tp.Dict[str, tp.Dict[str, int]] = {}
        self.seen: tp.Set[str] = set()
        self.dirty = False
        try:
            data = json.loads(path.read_text())
            if data.get("version") == self.VERSION:
                self.entries = dict(data["files"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("ignoring unreadable metadata cache %s (%s)", path, error)

    @classmethod
    def for_folder(cls, cache_dir: Path, folder: Path) -> "MetadataCache":
        """The cache of one dataset folder: ``<cache_dir>/metadata/<sha1 of its absolute path>.json``."""
        key = hashlib.sha1(str(folder.absolute()).encode()).hexdigest()
        return cls(Path(cache_dir) / "metadata" / f"{key}.json")

    def lookup(self, path: Path) -> tp.Optional[AudioInfo]:
        """The cached header of `path`, or None if unknown or changed since it was checked."""
        key = str(path)
        self.seen.add(key)
        entry = self.entries.get(key)
        stat = path.stat()
        if entry is None or entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
            return None
        return AudioInfo(samplerate=entry["samplerate"], channels=entry["channels"], frames=entry["frames"])

    def store(self, path: Path, info: AudioInfo) -> None:
        """Record that `path` (in its current state) was checked and has this header."""
        stat = path.stat()
        self.entries[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                   "samplerate": info.samplerate, "channels": info.channels,
                                   "frames": info.frames}
        self.seen.add(str(path))
        self.dirty = True

    def save(self, prune: bool = False) -> None:
        """Write the cache atomically if it changed; `prune` drops files not looked up this time."""
        if prune and set(self.entries) - self.seen:
            self.entries = {key: value for key, value in self.entries.items() if key in self.seen}
            self.dirty = True
        if not self.dirty:
            return
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps({"version": self.VERSION, "files": self.entries}, indent=0))
        except OSError as error:  # a read-only cache only costs time
            logger.warning("could not write metadata cache %s (%s)", self.path, error)
        self.dirty = False


def check_audio_file(path: Path) -> AudioInfo:
    """Read the header and then every sample of `path`.

    Raises :class:`DemixError` naming the file if it is unreadable, truncated or holds
    NaN/Inf samples.
    """
    info = audio_info(path)
    read = 0
    while read < info.frames:
        block = read_audio(path, read, min(READ_BLOCK, info.frames - read))
        if block.shape[-1] == 0:
            break
        read += block.shape[-1]
    if read != info.frames:
        raise DemixError(f"{path}: header announces {info.frames} frames but {read} could be read "
                         "(truncated file?)")
    return info


def find_source_file(track_dir: Path, files: tp.Sequence[Path], source: str) -> tp.Optional[Path]:
    """The audio file named `source`.<ext> among `files`; raises if there are several."""
    matches = [path for path in files if path.stem == source]
    if len(matches) > 1:
        names = ", ".join(sorted(path.name for path in matches))
        raise DemixError(f"{track_dir}: several files for stem '{source}' ({names}); keep only one")
    return matches[0] if matches else None


def locate_track_files(track_dir: Path, sources: tp.Sequence[str],
                       allow_missing: bool = False) -> tp.Tuple[tp.Dict[str, Path], tp.Optional[Path]]:
    """Find each source's file and the optional mixture file of one track folder (with
    `allow_missing`, sources without a file are left out, but not all of them)."""
    files = [path for path in sorted(track_dir.iterdir())
             if path.is_file() and not path.name.startswith(".")
             and path.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS]
    stems: tp.Dict[str, Path] = {}
    for source in sources:
        found = find_source_file(track_dir, files, source)
        if found is None and allow_missing:
            continue
        if found is None:
            expected = "/".join(f"{source}.{ext}" for ext in COMMON_EXTENSIONS)
            present = ", ".join(path.name for path in files) or "no audio files"
            raise DemixError(f"{track_dir}: missing stem '{source}' (expected one of {expected}...; "
                             f"found: {present})")
        stems[source] = found
    if not stems:
        present = ", ".join(path.name for path in files) or "no audio files"
        raise DemixError(f"{track_dir}: none of the stems {', '.join(sources)} (found: {present})")
    mixture = None if MIXTURE in sources else find_source_file(track_dir, files, MIXTURE)
    return stems, mixture


CONSISTENCY_CHECKS: tp.Tuple[tp.Tuple[tp.Callable[[AudioInfo], int], str], ...] = (
    (lambda info: info.samplerate,
     "{path}: sample rate {value} Hz differs from the {ref} Hz of {ref_name} in the same track"),
    (lambda info: info.channels, "{path}: {value} channel(s), but {ref_name} in the same track has {ref}"),
    (lambda info: info.frames, "{path}: {value} frames, but {ref_name} in the same track has {ref}; "
                               "all stems of a track must have the same length"),
)


def check_track_consistency(infos: tp.Dict[Path, AudioInfo], length_tolerance: float = 0.0,
                            tolerance_key: str = "") -> AudioInfo:
    """Check that all files of a track share rate, channel count and length; return that shape.

    Each value is compared with the most common one, so that the odd file out is the one named.
    With a `length_tolerance` (seconds; `tolerance_key` names its option in errors), lengths may
    differ by up to that much and the shape has the shortest one.
    """
    top = Path(os.path.commonpath([str(path.parent) for path in infos]))
    for key, message in CONSISTENCY_CHECKS[:2] if length_tolerance else CONSISTENCY_CHECKS:
        ref = Counter(key(info) for info in infos.values()).most_common(1)[0][0]
        ref_path = next(path for path, info in infos.items() if key(info) == ref)
        for path, info in infos.items():
            if key(info) != ref:
                raise DemixError(message.format(path=path, value=key(info), ref=ref,
                                                ref_name=ref_path.relative_to(top).as_posix()))
    shortest = min(infos, key=lambda path: infos[path].frames)
    if not length_tolerance:
        return infos[shortest]
    longest = max(infos, key=lambda path: infos[path].frames)
    difference = (infos[longest].frames - infos[shortest].frames) / infos[shortest].samplerate
    if difference > length_tolerance:
        raise DemixError(f"{shortest}: {infos[shortest].frames} frames, {difference:.2f} s fewer than "
                         f"{longest.relative_to(top).as_posix()} in the same track, more than "
                         f"{tolerance_key}={length_tolerance:g} s")
    return infos[shortest]


def track_files(stems: tp.Dict[str, Path], mixture: tp.Optional[Path]) -> tp.List[Path]:
    """All audio files of a track: its stems, then its mixture if any."""
    return [*stems.values(), *([mixture] if mixture is not None else [])]


def check_track_files(groups: tp.Mapping[tp.Any, tp.Sequence[Path]], cache: "MetadataCache", label: str,
                      progress: bool = True, length_tolerance: float = 0.0,
                      tolerance_key: str = "") -> tp.Dict[tp.Any, AudioInfo]:
    """Check the audio files of several tracks (`groups`: track key -> its files) and return each
    track's shape (rate, channels, length shared by its files).

    Headers first (cached ones are not reopened), then consistency within each track, then the
    full read of the files the cache does not know; the cache is saved even when a check fails.
    With a `length_tolerance` (seconds, see :func:`check_track_consistency`), a track whose files
    differ in length by up to that much gets the shortest length, with a warning naming it.
    """
    try:
        headers: tp.Dict[Path, AudioInfo] = {}
        unchecked: tp.List[Path] = []
        for files in groups.values():
            for path in files:
                cached = cache.lookup(path)
                if cached is None:
                    unchecked.append(path)
                headers[path] = cached or audio_info(path)
        shapes = {}
        for key, files in groups.items():
            if not files:
                continue
            shapes[key] = check_track_consistency({path: headers[path] for path in files}, length_tolerance,
                                                  tolerance_key)
            longest = max(headers[path].frames for path in files)
            if longest != shapes[key].frames:
                logger.warning("%s: its files differ in length by up to %.3f s (within %s=%g s); read as %d "
                               "frames, the shortest", key, (longest - shapes[key].frames) / shapes[key].samplerate,
                               tolerance_key, length_tolerance, shapes[key].frames)
        bar = tqdm(unchecked, desc=f"checking {label}", unit="file", disable=not progress or not unchecked,
                   leave=False, dynamic_ncols=True)
        for path in bar:
            info = check_audio_file(path)
            if info != headers[path]:  # changed between the two reads
                raise DemixError(f"{path}: file changed while being scanned; run again")
            cache.store(path, info)
        cache.save(prune=True)
    finally:
        cache.save()
    return shapes


def scan_stems_folder(folder: Path, sources: tp.Sequence[str], cache_dir: Path,
                      progress: bool = True, allow_missing: bool = False) -> tp.List[StemsTrack]:
    """Check and list the tracks of one split folder (``folder/TRACK/SOURCE.ext``).

    Layout errors come first (cheap), then header consistency, then the full read of files
    that are not in the metadata cache. With `allow_missing`, a track may lack some of the
    stems (they read as silence), not all of them.
    """
    folder = folder.absolute()
    track_dirs = sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not track_dirs:
        raise DemixError(f"{folder}: no track folders (expected {folder}/TRACK/{sources[0]}.wav...)")
    layouts = {track_dir: locate_track_files(track_dir, sources, allow_missing) for track_dir in track_dirs}
    cache = MetadataCache.for_folder(cache_dir, folder)
    shapes = check_track_files({track_dir: track_files(stems, mixture) for track_dir, (stems, mixture)
                                in layouts.items()}, cache, folder.name, progress)
    return [StemsTrack(track_dir.name, stems, mixture, shapes[track_dir].samplerate, shapes[track_dir].channels,
                       shapes[track_dir].frames, sources=list(sources))
            for track_dir, (stems, mixture) in layouts.items()]
