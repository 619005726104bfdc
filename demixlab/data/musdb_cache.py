"""MUSDB18 ``.stem.mp4`` tracks decoded once into a cache of WAV files.

Reading a training segment straight from a ``.stem.mp4`` (musdb/stempeg) starts one ffmpeg
process per stem per example, and ffmpeg decodes from the start of the file up to the segment.
Instead, each file's five streams (mixture, drums, bass, other, vocals) are decoded by a single
ffmpeg call into 16-bit WAV files under ``<cache_dir>/musdb/<sha1 of the file's path>/``, the
same samples musdb returns (it decodes to 16-bit PCM too), cropped or padded to the length the
container announces. Segments are then read with soundfile through :class:`StemsTrack`.

An entry counts only when its ``entry.json`` (written last, atomically) records the ``.stem.mp4``
file's current size and modification time: a changed file is decoded again, an interrupted
decode leaves no entry. Once every file is cached, loading needs neither ffmpeg nor musdb.
"""
import hashlib
import json
import logging
import shutil
import subprocess
import typing as tp
from pathlib import Path

from tqdm import tqdm

from ..audio import AudioInfo
from ..errors import DemixError
from ..files import atomic_path, atomic_paths
from .musdb_tracks import MUSDB_SOURCES, STEM_IDS, check_sources, check_streams, short_error
from .tracks import StemsTrack

logger = logging.getLogger(__name__)

ENTRY_VERSION = 1
STREAM_NAMES = sorted(STEM_IDS, key=STEM_IDS.__getitem__)  # mixture, drums, bass, other, vocals


class DecodedStemFile:
    """The cache entry of one ``.stem.mp4`` file: a folder of one WAV file per stream.

    Args:
        cache_dir: the cache directory; entries live under ``<cache_dir>/musdb``.
        path: the ``.stem.mp4`` file (its absolute path names the entry).
    """

    def __init__(self, cache_dir: Path, path: Path):
        self.path = Path(path).absolute()
        key = hashlib.sha1(str(self.path).encode()).hexdigest()
        self.folder = Path(cache_dir) / "musdb" / key
        self.entry = self.folder / "entry.json"

    def wav(self, stream: str) -> Path:
        """The WAV file of one stream (``mixture``, ``drums``...)."""
        return self.folder / f"{stream}.wav"

    def lookup(self) -> tp.Optional[AudioInfo]:
        """The shape of the decoded streams, or None when the entry is missing, incomplete or was
        made from another version of the file (size or modification time differ)."""
        try:
            data = json.loads(self.entry.read_text())
            stat = self.path.stat()
            if (data.get("version") != ENTRY_VERSION or data.get("size") != stat.st_size
                    or data.get("mtime_ns") != stat.st_mtime_ns):
                return None
            info = AudioInfo(samplerate=int(data["samplerate"]), channels=int(data["channels"]),
                             frames=int(data["frames"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not all(self.wav(stream).is_file() for stream in STREAM_NAMES):
            return None
        return info

    def decode(self) -> AudioInfo:
        """Probe the file, decode its five streams with one ffmpeg call and record the entry."""
        stat = self.path.stat()
        info = probe_stem_file(self.path)
        self.entry.unlink(missing_ok=True)  # the entry stops counting before its WAV files change
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None:
            raise DemixError(f"{self.path}: decoding a .stem.mp4 file needs ffmpeg on PATH")
        targets = [self.wav(stream) for stream in STREAM_NAMES]
        with atomic_paths(targets) as temporary:
            command = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(self.path)]
            for stream, tmp in zip(STREAM_NAMES, temporary):
                command += ["-map", f"0:a:{STEM_IDS[stream]}",
                            "-af", f"apad=whole_len={info.frames},atrim=end_sample={info.frames}",
                            "-c:a", "pcm_s16le", "-rf64", "auto", "-f", "wav", str(tmp)]
            result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    check=False)
            if result.returncode != 0:
                raise DemixError(f"{self.path}: ffmpeg cannot decode it ({_last_line(result.stderr)})")
        if self.path.stat().st_mtime_ns != stat.st_mtime_ns:
            raise DemixError(f"{self.path}: file changed while being decoded; run again")
        with atomic_path(self.entry) as tmp:
            tmp.write_text(json.dumps({"version": ENTRY_VERSION, "path": str(self.path), "size": stat.st_size,
                                       "mtime_ns": stat.st_mtime_ns, "samplerate": info.samplerate,
                                       "channels": info.channels, "frames": info.frames}))
        return info

    def track(self, sources: tp.Sequence[str], info: AudioInfo) -> StemsTrack:
        """The decoded file as a track of `sources` (those MUSDB18 lacks read as silence)."""
        name = self.path.name[:-len(".stem.mp4")]
        stems = {source: self.wav(source) for source in sources if source in MUSDB_SOURCES}
        return StemsTrack(name, stems, self.wav("mixture"), info.samplerate, info.channels, info.frames,
                          sources=list(sources))


def probe_stem_file(path: Path) -> AudioInfo:
    """Rate, channels and announced length of a ``.stem.mp4`` file's streams (stempeg's ffprobe),
    after checking that it has MUSDB18's five streams alike."""
    try:
        import stempeg  # noqa: PLC0415 - lazy on purpose: importing it needs ffmpeg
    except Exception as error:  # stempeg raises RuntimeError at import time without ffmpeg
        raise DemixError(f"{path}: decoding .stem.mp4 files needs stempeg and ffmpeg on PATH "
                         f"({short_error(error)})") from None
    try:
        info = stempeg.Info(str(path))
    except Exception as error:
        raise DemixError(f"{path}: not a readable .stem.mp4 ({short_error(error)})") from None
    check_streams(path, info)
    return AudioInfo(samplerate=int(info.rate(0)), channels=int(info.channels(0)), frames=int(info.samples(0)))


def load_decoded_musdb(root: Path, subset: str, sources: tp.Sequence[str], cache_dir: Path,
                       allow_missing: bool = False, progress: bool = True) -> tp.List[StemsTrack]:
    """The tracks of ``root/<subset>/*.stem.mp4`` (sorted by name, as musdb lists them), read from
    their WAV cache entries; files without a valid entry are decoded first (one ffmpeg call
    each, with a progress bar). With `allow_missing`, sources MUSDB18 lacks are silence."""
    if not allow_missing:
        check_sources(sources)
    folder = Path(root) / subset
    files = sorted(path for path in folder.glob("*.stem.mp4") if path.is_file()) if folder.is_dir() else []
    if not files:
        raise DemixError(f"{folder}: no .stem.mp4 files (expected {folder}/ARTIST - TITLE.stem.mp4)")
    entries = [DecodedStemFile(cache_dir, path) for path in files]
    infos = {entry.path: entry.lookup() for entry in entries}
    stale = [entry for entry in entries if infos[entry.path] is None]
    if stale:
        logger.info("decoding %d .stem.mp4 file(s) of %s into %s (once; later runs read the WAV files)",
                    len(stale), folder, Path(cache_dir) / "musdb")
        for entry in tqdm(stale, desc=f"decoding musdb {subset}", unit="track", disable=not progress,
                          leave=False, dynamic_ncols=True):
            infos[entry.path] = entry.decode()
    return [entry.track(sources, tp.cast(AudioInfo, infos[entry.path])) for entry in entries]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
