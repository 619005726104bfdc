"""MUSDB18 (``.stem.mp4``) tracks, read through the musdb package.

Training reads MUSDB18 from WAV files decoded once (:mod:`.musdb_cache`); :class:`MusdbTrack`
decodes every read with musdb/stempeg (one ffmpeg process per stream and read), which is kept as
the reference the cache is tested against and for the loader benchmark.

musdb is imported lazily: importing it (through stempeg) fails unless ffmpeg is on PATH.
Splits are loaded with ``musdb.DB(subsets=..., split=None)``; validation tracks are then held
out by name (see :mod:`demixlab.data.splits`) instead of with musdb's ``split="valid"``, which
only knows the real MUSDB18 track names. With ``dset.valid_tracks=musdb`` the result is the
same as musdb's own split, since both read ``validation_tracks`` from musdb's ``mus.yaml``.
"""
import typing as tp
from pathlib import Path

import numpy as np

from ..errors import DemixError
from .tracks import Track

# Stream order inside a MUSDB18 .stem.mp4 (musdb's configs/mus.yaml `stem_ids`).
STEM_IDS = {"mixture": 0, "drums": 1, "bass": 2, "other": 3, "vocals": 4}
MUSDB_SOURCES = ("drums", "bass", "other", "vocals")


def import_musdb() -> tp.Any:
    """Import the musdb package, turning a missing package or ffmpeg into a :class:`DemixError`."""
    try:
        import musdb  # noqa: PLC0415 - lazy on purpose: it needs ffmpeg
    except Exception as error:  # stempeg raises RuntimeError at import time without ffmpeg
        raise DemixError(f"dset.kind=musdb needs the musdb package and ffmpeg on PATH ({short_error(error)})") from None
    return musdb


class MusdbTrack(Track):
    """One ``.stem.mp4`` track of MUSDB18, read in chunks through a musdb ``MultiTrack``.

    ``frames`` is the length announced by the container; AAC decoding returns a few hundred
    extra frames of padding, which are cropped. Sources MUSDB18 does not have read as silence
    (``dset.missing=silent``).
    """

    def __init__(self, track: tp.Any, sources: tp.Sequence[str]):
        self.track = track
        self.path = Path(track.path)
        self.name = str(track.name)
        self.sources = list(sources)
        self.samplerate = int(track.rate)
        self.channels = int(track.info.channels(STEM_IDS["mixture"]))
        self.frames = int(track.samples)

    def read_sources(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Decode the sources (see :meth:`Track.read_sources`); one ffmpeg call per source."""
        known = [source for source in self.sources if source in MUSDB_SOURCES]
        decoded = dict(zip(known, self._decode([self.track.sources[source] for source in known], offset, frames)))
        length = max(0, (self.frames if frames < 0 else min(self.frames, offset + frames)) - offset)
        silence = np.zeros((self.channels, length), dtype=np.float32)
        return np.stack([decoded.get(source, silence) for source in self.sources])

    def read_mixture(self, offset: int = 0, frames: int = -1) -> np.ndarray:
        """Decode the mixture stream of the file."""
        return self._decode([self.track], offset, frames)[0]

    def _decode(self, streams: tp.Sequence[tp.Any], offset: int, frames: int) -> np.ndarray:
        """Decode a chunk of musdb `streams` (objects whose `.audio` is (time, channels)) as
        a (streams, channels, time) array."""
        end = self.frames if frames < 0 else min(self.frames, offset + frames)
        length = max(0, end - offset)
        self.track.chunk_start = offset / self.samplerate
        self.track.chunk_duration = length / self.samplerate
        try:
            arrays = [stream.audio for stream in streams] if length else []
        except Exception as error:
            raise DemixError(f"{self.path}: cannot decode ({short_error(error)})") from None
        finally:
            self.track.chunk_start, self.track.chunk_duration = 0, None
        out = np.zeros((len(streams), self.channels, length), dtype=np.float32)
        for index, array in enumerate(arrays):
            # AAC padding makes the decoded stream longer; a seek can also end a frame early.
            array = np.asarray(array, dtype=np.float32).T[:, :length]
            out[index, :, :array.shape[-1]] = array
        if not np.isfinite(out).all():
            raise DemixError(f"{self.path}: audio contains NaN or infinite samples")
        return out


def check_sources(sources: tp.Sequence[str]) -> None:
    """MUSDB18 only has drums, bass, other and vocals: reject other names in ``dset.sources``."""
    unknown = [source for source in sources if source not in MUSDB_SOURCES]
    if unknown:
        raise DemixError(f"dset.sources={list(sources)}: MUSDB18 has no source(s) {unknown}; "
                         f"its sources are {list(MUSDB_SOURCES)}")


def load_musdb_folder(root: Path, subset: str, sources: tp.Sequence[str],
                      allow_missing: bool = False) -> tp.List[MusdbTrack]:
    """Load the tracks of ``root/<subset>`` (train or test) and check their stream layout; with
    `allow_missing`, sources MUSDB18 lacks are silence instead of an error."""
    if not allow_missing:
        check_sources(sources)
    musdb = import_musdb()
    folder = root / subset
    try:
        database = musdb.DB(root=str(root), subsets=subset, split=None, is_wav=False)
    except Exception as error:  # ffprobe errors do not say which file failed: find it
        _raise_for_bad_file(folder)
        raise DemixError(f"{folder}: musdb cannot load this folder ({short_error(error)})") from None
    if not database.tracks:
        raise DemixError(f"{folder}: no .stem.mp4 files (expected {folder}/ARTIST - TITLE.stem.mp4)")
    tracks = []
    for track in database.tracks:
        check_streams(Path(track.path), track.info)
        tracks.append(MusdbTrack(track, sources))
    return tracks


def check_streams(path: Path, info: tp.Any) -> None:
    """All five streams of a stempeg ``Info`` present, with one sample rate and channel count."""
    if info.nb_audio_streams < len(STEM_IDS):
        raise DemixError(f"{path}: {info.nb_audio_streams} audio stream(s), a MUSDB18 stem file has "
                         f"{len(STEM_IDS)} (mixture, drums, bass, other, vocals)")
    for name, stem_id in STEM_IDS.items():
        for what, get in (("sample rate", info.rate), ("channel count", info.channels)):
            if get(stem_id) != get(0):
                raise DemixError(f"{path}: stream {stem_id} ({name}) has {what} {get(stem_id)}, "
                                 f"the mixture stream {get(0)}")


def _raise_for_bad_file(folder: Path) -> None:
    """Probe each ``.stem.mp4`` of `folder` and raise naming the first unreadable one."""
    import stempeg  # noqa: PLC0415 - importable: musdb imported it already

    for path in sorted(folder.glob("*.stem.mp4")):
        try:
            stempeg.Info(str(path))
        except Exception as error:
            raise DemixError(f"{path}: not a readable .stem.mp4 ({short_error(error)})") from None


def short_error(error: Exception) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
