"""Tests of ``dset.kind=musdb`` on a tiny MUSDB18-like folder of ``.stem.mp4`` files.

Training reads the files' WAV cache (decoded once, :mod:`demixlab.data.musdb_cache`); musdb's own
decode (:class:`MusdbTrack`) is the reference it must equal.

The files are written with stempeg's StreamsWriter (AAC; MP4Box is not needed). musdb's own
``split="valid"`` only knows the real MUSDB18 track names, so demixlab loads ``subsets="train"``
without a split and holds out ``dset.valid_tracks`` by name: the tiny dataset lists its own
track name there.
"""
import json
import os
import pickle
import shutil
import subprocess
import typing as tp
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from demixlab.data import DataSplits, build_datasets
from demixlab.data import musdb_cache
from demixlab.data.musdb_cache import DecodedStemFile
from demixlab.data.musdb_tracks import load_musdb_folder
from demixlab.data.tracks import ConvertedTrack, StemsTrack
from demixlab.errors import DemixError
from tests.cli import TINY_SOLVER

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                reason="musdb needs ffmpeg and ffprobe on PATH")

SR = 44100
FRAMES = SR // 2
SOURCES = ["drums", "bass", "other", "vocals"]
TRACKS = {"train": ["Artist A - Song", "Artist B - Song"], "test": ["Artist C - Song"]}


def stems_of(index: int) -> np.ndarray:
    """Four stereo tones (sources, channels, time); AAC keeps tones well (about 35 dB SNR)."""
    time = np.arange(FRAMES) / SR
    tones = [0.2 * np.sin(2 * np.pi * (110 * (k + 2) + 30 * index) * time + k) for k in range(4)]
    return np.stack([np.stack([tone, 0.5 * tone]) for tone in tones]).astype(np.float32)


@pytest.fixture(scope="module")
def musdb_root(tmp_path_factory) -> Path:
    import stempeg

    root = tmp_path_factory.mktemp("musdb18")
    index = 0
    for subset, names in TRACKS.items():
        for name in names:
            stems = stems_of(index)
            data = np.concatenate([stems.sum(0, keepdims=True), stems]).transpose(0, 2, 1)  # (5, time, ch)
            stempeg.write_stems(str(root / subset / f"{name}.stem.mp4"), data, sample_rate=SR,
                                writer=stempeg.StreamsWriter(codec="aac", stem_names=["mixture", *SOURCES]))
            index += 1
    return root


def build(root: Path, tmp_path: Path, **overrides: tp.Any) -> DataSplits:
    dset = {"kind": "musdb", "root": str(root), "sources": SOURCES, "samplerate": SR, "channels": 2,
            "valid_tracks": ["Artist B - Song"]}
    dset.update(overrides)
    return build_datasets(OmegaConf.create(dset), segment=0.1, samples_per_track=2, seed=0,
                          cache_dir=tmp_path / "cache", base_dir=tmp_path, progress=False)


def snr(reference: np.ndarray, estimate: np.ndarray) -> float:
    return float(10 * np.log10((reference ** 2).sum() / ((reference - estimate) ** 2).sum()))


def test_reads_stem_mp4_tracks(musdb_root, tmp_path):
    data = build(musdb_root, tmp_path)
    assert [track.name for track in data.train.tracks] == ["Artist A - Song"]
    assert [track.name for track in data.valid.tracks] == ["Artist B - Song"]
    assert [track.name for track in data.test.tracks] == ["Artist C - Song"]
    track = data.valid.tracks[0]
    assert isinstance(track, StemsTrack)
    assert (track.frames, track.samplerate, track.channels) == (FRAMES, SR, 2)

    name, mixture, sources = data.valid[0]
    assert name == "Artist B - Song" and sources.shape == (4, 2, FRAMES) and mixture.shape == (2, FRAMES)
    expected = stems_of(1)
    for index in range(4):
        assert snr(expected[index], sources[index].numpy()) > 20
    assert snr(expected.sum(0), mixture.numpy()) > 20

    segment = track.read_sources(10000, 4410)
    np.testing.assert_allclose(segment, sources[..., 10000:14410].numpy(), atol=1e-4)
    assert track.read_mixture(FRAMES - 100, 1000).shape == (2, 100)
    assert data.train[1].shape == (4, 2, 4410)
    pickle.loads(pickle.dumps(data.train))  # DataLoader workers get a copy


def test_subset_and_order_of_sources(musdb_root, tmp_path):
    data = build(musdb_root, tmp_path, sources=["vocals", "drums"])
    full = build(musdb_root, tmp_path).test.tracks[0].read_sources(0, 2000)
    np.testing.assert_array_equal(data.test.tracks[0].read_sources(0, 2000), full[[3, 0]])


def test_conversion_on_read(musdb_root, tmp_path):
    data = build(musdb_root, tmp_path, samplerate=22050, channels=1, valid_tracks=["Artist A - Song"])
    track = data.valid.tracks[0]
    assert isinstance(track, ConvertedTrack) and track.frames == FRAMES // 2
    assert track.read_sources(0, 1000).shape == (4, 1, 1000)


def test_error_unknown_source(musdb_root, tmp_path):
    with pytest.raises(DemixError, match=r"dset.sources=.*'piano'"):
        build(musdb_root, tmp_path, sources=["vocals", "piano"])


def test_error_official_validation_tracks_missing(musdb_root, tmp_path):
    with pytest.raises(DemixError, match=r"dset.valid_tracks: 14 track\(s\) not found in .*train.*Actions"):
        build(musdb_root, tmp_path, valid_tracks="musdb")


def test_error_no_validation_tracks(musdb_root, tmp_path):
    with pytest.raises(DemixError, match="dset.valid_tracks is empty"):
        build(musdb_root, tmp_path, valid_tracks=[])


def test_error_corrupt_stem_file(musdb_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(musdb_root, root)
    bad = root / "train" / "Artist Z - Broken.stem.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(DemixError, match="Artist Z - Broken.stem.mp4: not a readable"):
        build(root, tmp_path)


@pytest.fixture
def decode_calls(monkeypatch) -> tp.List[tp.List[str]]:
    """The ffmpeg command lines the WAV cache runs (they still run)."""
    calls: tp.List[tp.List[str]] = []
    run = subprocess.run

    def counting_run(command, *args, **kwargs):
        calls.append(list(command))
        return run(command, *args, **kwargs)

    monkeypatch.setattr(musdb_cache.subprocess, "run", counting_run)
    return calls


@pytest.mark.slow
def test_wav_cache_equals_musdb_decode(musdb_root, tmp_path, decode_calls):
    data = build(musdb_root, tmp_path, valid_tracks=["Artist A - Song"])
    assert len(decode_calls) == 3  # one ffmpeg call per file, all five streams at once
    references = {track.name: track for subset in ("train", "test")
                  for track in load_musdb_folder(musdb_root, subset, SOURCES)}
    for track in [*data.train.tracks, *data.valid.tracks, *data.test.tracks]:
        reference = references[track.name]
        assert track.frames == reference.frames == FRAMES
        # Same decoder and the same 16-bit PCM as musdb: equal samples, whole or in segments.
        np.testing.assert_array_equal(track.read_sources(), reference.read_sources())
        np.testing.assert_array_equal(track.read_mixture(), reference.read_mixture())
        np.testing.assert_array_equal(track.read_sources(13230, 4410), reference.read_sources(13230, 4410))


def test_second_load_reads_the_cache_without_ffmpeg(musdb_root, tmp_path, decode_calls, monkeypatch):
    first = build(musdb_root, tmp_path)
    assert len(decode_calls) == 3
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no ffmpeg, no ffprobe
    monkeypatch.setattr(musdb_cache, "probe_stem_file", lambda path: pytest.fail(f"probed {path}"))
    second = build(musdb_root, tmp_path)
    assert len(decode_calls) == 3
    np.testing.assert_array_equal(second.valid.tracks[0].read_sources(), first.valid.tracks[0].read_sources())
    assert second.train[0].shape == (4, 2, 4410)


def test_changed_file_is_decoded_again(musdb_root, tmp_path, decode_calls):
    root = tmp_path / "copy"
    shutil.copytree(musdb_root, root)
    build(root, tmp_path)
    changed = root / "train" / "Artist A - Song.stem.mp4"
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    build(root, tmp_path)
    assert len(decode_calls) == 4 and str(changed.absolute()) in decode_calls[-1]
    assert DecodedStemFile(tmp_path / "cache", changed).lookup() is not None


def test_failed_decode_leaves_no_entry(musdb_root, tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "Error while decoding stream #0:1")
    monkeypatch.setattr(musdb_cache.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(DemixError, match=r"Artist A - Song.stem.mp4: ffmpeg cannot decode it \(Error while"):
        build(musdb_root, tmp_path)
    entry = DecodedStemFile(tmp_path / "cache", musdb_root / "train" / "Artist A - Song.stem.mp4")
    assert entry.lookup() is None
    assert not entry.folder.exists() or not any(entry.folder.iterdir())  # no WAV file, complete or partial


@pytest.mark.slow
def test_a_tiny_training_run_reads_the_wav_cache(musdb_root, tmp_path, in_process, cache_dir):
    assert in_process("dset=musdb18", f"dset.root={musdb_root}", "dset.valid_tracks=[Artist B - Song]",
                      *TINY_SOLVER, "epochs=1", "segment=0.2", "valid.segment=0.5") == 0
    history, = json.loads(next((tmp_path / "outputs" / "xps").iterdir()).joinpath("history.json").read_text())
    assert np.isfinite(history["train"]["loss"]) and "nsdr" in history["valid"]
    for path in sorted((musdb_root / "train").glob("*.stem.mp4")):
        assert DecodedStemFile(cache_dir, path).lookup() is not None
