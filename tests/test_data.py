"""Tests of the data pipeline on tiny generated datasets of stems."""
import json
import logging
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

import demixlab.audio
from demixlab.data import DataSplits, DatasetConfig, build_datasets, resolve_cache_dir
from demixlab.data import toy as toy_package
from demixlab.data.toy import ToySpec
from demixlab.data import scan as scan_module
from demixlab.data.datasets import SegmentDataset, TrackDataset
from demixlab.data.splits import musdb_validation_tracks
from demixlab.data.tracks import ConvertedTrack, StemsTrack
from demixlab.errors import DemixError

SR = 8000
FRAMES = 2000
MUSDB_SOURCES = ["drums", "bass", "other", "vocals"]


def write_track(folder: Path, sources: tp.Sequence[str] = MUSDB_SOURCES, frames: int = FRAMES, samplerate: int = SR,
                channels: int = 2, ext: str = "wav", mixture: bool = True, seed: int = 0) -> np.ndarray:
    """Write one track folder of random stems; return the stems (S, C, T)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stems = (0.1 * rng.standard_normal((len(sources), channels, frames))).astype(np.float32)
    subtype = "FLOAT" if ext == "wav" else None
    for source, wav in zip(sources, stems):
        sf.write(folder / f"{source}.{ext}", wav.T, samplerate, subtype=subtype)
    if mixture:
        sf.write(folder / f"mixture.{ext}", stems.sum(0).T, samplerate, subtype=subtype)
    return stems


def make_dataset(root: Path, train: tp.Sequence[str] = ("a", "b", "c"), valid: tp.Sequence[str] = (),
                 test: tp.Sequence[str] = ("t",), **kwargs) -> Path:
    """A MUSDB18-HQ-like folder: root/{train,valid,test}/TRACK/SOURCE.wav."""
    seed = 0
    for split, names in (("train", train), ("valid", valid), ("test", test)):
        for name in names:
            write_track(root / split / name, seed=seed, **kwargs)
            seed += 1
    return root


def dset_config(root: tp.Any, **overrides: tp.Any) -> DatasetConfig:
    """The `dset` options of a folder of stems."""
    values = {"kind": "stems", "root": str(root) if isinstance(root, Path) else root, "sources": MUSDB_SOURCES,
              "samplerate": SR, "channels": 2, "valid_tracks": []}
    values.update(overrides)
    if isinstance(values.get("toy"), dict):
        values["toy"] = ToySpec(**values["toy"])
    return DatasetConfig(**values)


def build(dset: tp.Any, tmp_path: Path, **kwargs: tp.Any) -> DataSplits:
    options: tp.Dict[str, tp.Any] = {"segment": 0.1, "samples_per_track": 3, "seed": 1,
                                     "cache_dir": tmp_path / "cache", "base_dir": tmp_path, "progress": False}
    options.update(kwargs)
    return build_datasets(dset, **options)


def expect_error(func: tp.Callable[[], tp.Any], *fragments: str) -> str:
    """Run `func`, expect one single-line DemixError mentioning every fragment."""
    with pytest.raises(DemixError) as info:
        func()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def snapshot(root: Path) -> tp.Dict[str, tp.Tuple[int, int]]:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*"))}


# Layouts


def test_valid_tracks_held_out_of_train(tmp_path):
    root = make_dataset(tmp_path / "data", train=("a", "b", "c"))
    data = build(dset_config(root, valid_tracks=["b"]), tmp_path)
    assert [track.name for track in data.train.tracks] == ["a", "c"]
    assert [track.name for track in data.valid.tracks] == ["b"]
    assert [track.name for track in data.test.tracks] == ["t"]
    assert (data.sources, data.samplerate, data.channels) == (MUSDB_SOURCES, SR, 2)
    assert len(data.train) == 2 * 3
    assert data.train[0].shape == (4, 2, int(0.1 * SR))
    name, mixture, sources = data.valid[0]
    expected = write_track(tmp_path / "again", seed=1)  # "b" was written with seed 1
    assert name == "b"
    assert sources.dtype == torch.float32 and sources.shape == (4, 2, FRAMES)
    np.testing.assert_array_equal(sources.numpy(), expected)
    np.testing.assert_allclose(mixture.numpy(), expected.sum(0), atol=1e-6)


def test_valid_folder(tmp_path):
    root = make_dataset(tmp_path / "data", train=("a", "b"), valid=("v1", "v2"), test=())
    data = build(dset_config(root, valid_tracks=["ignored"]), tmp_path)
    assert [track.name for track in data.train.tracks] == ["a", "b"]
    assert [track.name for track in data.valid.tracks] == ["v1", "v2"]
    assert data.test is None  # no test/ folder: only an error when testing


def test_without_test(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    assert build(dset_config(root), tmp_path, with_test=False).test is None


def test_any_source_names_flac_without_mixture(tmp_path):
    sources = ["speech", "noise"]
    root = make_dataset(tmp_path / "data", train=("x",), valid=("y",), test=(), sources=sources, ext="flac",
                        mixture=False, channels=1)
    data = build(dset_config(root, sources=sources, channels=1), tmp_path)
    track = data.valid.tracks[0]
    assert isinstance(track, StemsTrack) and track.mixture is None
    assert track.sources == sources
    _, mixture, stems = data.valid[0]
    assert stems.shape == (2, 1, FRAMES)
    torch.testing.assert_close(mixture, stems.sum(0))


def test_source_order_follows_config(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",), test=())
    data = build(dset_config(root, sources=["vocals", "drums"]), tmp_path)
    stems = write_track(tmp_path / "again", seed=3)  # "v" was written with seed 3
    np.testing.assert_array_equal(data.valid[0][2].numpy(), stems[[3, 0]])


def test_relative_root_resolves_against_base_dir(tmp_path):
    make_dataset(tmp_path / "data", valid=("v",))
    data = build(dset_config("data"), tmp_path, base_dir=tmp_path)
    assert len(data.train.tracks) == 3


def test_segment_frames_include_extra_frames(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    data = build(dset_config(root), tmp_path, segment=0.05, extra_frames=7)
    assert data.train.segment_frames == 400 + 7
    assert data.train[5].shape == (4, 2, 407)


def test_musdb_validation_names_without_importing_musdb():
    code = ("import sys; from demixlab.data.splits import musdb_validation_tracks as f; n = f(); "
            "assert 'musdb' not in sys.modules and 'stempeg' not in sys.modules; print(len(n))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "14"
    assert "Actions - One Minute Smile" in musdb_validation_tracks()


def test_valid_tracks_musdb_uses_official_names(tmp_path):
    names = musdb_validation_tracks()
    root = tmp_path / "data"
    for index, name in enumerate([*names, "Some - Training Song"]):
        write_track(root / "train" / name, frames=100, seed=index)
    data = build(dset_config(root, valid_tracks="musdb"), tmp_path, with_test=False)
    assert [track.name for track in data.train.tracks] == ["Some - Training Song"]
    assert [track.name for track in data.valid.tracks] == names


def test_toy_kind_uses_generated_root(tmp_path, monkeypatch):
    calls = []

    def ensure_toy_dataset(spec, cache_root, progress=True):
        calls.append((spec, cache_root))
        return make_dataset(cache_root / "generated", train=("a", "b"), valid=("v",), test=("t",))

    monkeypatch.setattr(toy_package, "ensure_toy_dataset", ensure_toy_dataset)
    toy = {"seed": 3, "train_tracks": 2, "valid_tracks": 1, "test_tracks": 1, "train_duration": 0.25,
           "eval_duration": 0.25}
    data = build(dset_config(None, kind="toy", toy=toy), tmp_path)
    assert calls == [(ToySpec(**toy, samplerate=SR), tmp_path / "cache" / "toy")]
    assert [len(data.train.tracks), len(data.valid.tracks), len(data.test.tracks)] == [2, 1, 1]


def test_resolve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DEMIXLAB_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir("/explicit") == Path("/explicit")
    assert resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("DEMIXLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir(None) == tmp_path / "home" / ".cache" / "demixlab"


# Errors: each bad input gives one DemixError naming what to fix


def test_error_root_missing(tmp_path):
    expect_error(lambda: build(dset_config(tmp_path / "nowhere"), tmp_path), "dset.root", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("root", ["???", None])
def test_error_root_unset(tmp_path, root):
    expect_error(lambda: build(dset_config(root), tmp_path), "dset.root")


@pytest.mark.parametrize("sources", [None, [], "vocals"])
def test_error_sources_unset(tmp_path, sources):
    root = make_dataset(tmp_path / "data", valid=("v",))
    expect_error(lambda: build(dset_config(root, sources=sources), tmp_path), "dset.sources")


def test_error_unknown_kind(tmp_path):
    expect_error(lambda: build(dset_config(tmp_path, kind="mp3s"), tmp_path), "dset.kind", "mp3s")


def test_error_no_train_folder(tmp_path):
    (tmp_path / "data").mkdir()
    expect_error(lambda: build(dset_config(tmp_path / "data"), tmp_path), str(tmp_path / "data" / "train"))


def test_error_missing_stem(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    (root / "train" / "b" / "bass.wav").unlink()
    expect_error(lambda: build(dset_config(root), tmp_path), str(root / "train" / "b"), "missing stem 'bass'",
                 "bass.wav/bass.flac")


def test_error_two_files_for_one_stem(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    sf.write(root / "train" / "a" / "bass.flac", np.zeros(FRAMES), SR)
    expect_error(lambda: build(dset_config(root), tmp_path), str(root / "train" / "a"), "bass.flac, bass.wav")


def test_error_stems_of_different_lengths(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    sf.write(root / "train" / "c" / "other.wav", np.zeros((FRAMES - 10, 2)), SR)
    expect_error(lambda: build(dset_config(root), tmp_path), str(root / "train" / "c" / "other.wav"),
                 str(FRAMES - 10), str(FRAMES))


def test_error_sample_rates_within_a_track(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    sf.write(root / "train" / "a" / "vocals.wav", np.zeros((FRAMES, 2)), 16000)
    expect_error(lambda: build(dset_config(root), tmp_path), str(root / "train" / "a" / "vocals.wav"),
                 "16000 Hz", f"{SR} Hz")


def test_error_channels_within_a_track(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    sf.write(root / "valid" / "v" / "drums.wav", np.zeros(FRAMES), SR)
    expect_error(lambda: build(dset_config(root), tmp_path), str(root / "valid" / "v" / "drums.wav"), "1 channel")


def test_error_garbage_wav(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    path = root / "train" / "b" / "drums.wav"
    path.write_bytes(os.urandom(3000))
    expect_error(lambda: build(dset_config(root), tmp_path), str(path))


def test_error_truncated_wav_header(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    path = root / "train" / "a" / "mixture.wav"
    path.write_bytes(path.read_bytes()[:30])
    expect_error(lambda: build(dset_config(root), tmp_path), str(path))


def test_error_corrupt_flac_beyond_header(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",), ext="flac", frames=20000)
    path = root / "train" / "b" / "drums.flac"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 400] = bytes(400)
    path.write_bytes(bytes(data))
    expect_error(lambda: build(dset_config(root), tmp_path), str(path), "cannot read audio")


def test_error_nan_in_float_wav(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    path = root / "test" / "t" / "other.wav"
    wav = np.zeros((FRAMES, 2), dtype=np.float32)
    wav[FRAMES // 2, 1] = np.nan
    sf.write(path, wav, SR, subtype="FLOAT")
    expect_error(lambda: build(dset_config(root), tmp_path), str(path), "NaN")


def test_error_unknown_valid_track(tmp_path):
    root = make_dataset(tmp_path / "data")
    expect_error(lambda: build(dset_config(root, valid_tracks=["a", "zzz"]), tmp_path), "dset.valid_tracks",
                 "'zzz'", str(root / "train"))


def test_error_no_validation_tracks(tmp_path):
    root = make_dataset(tmp_path / "data")
    expect_error(lambda: build(dset_config(root), tmp_path), "valid", "dset.valid_tracks")


def test_error_valid_tracks_not_a_list(tmp_path):
    root = make_dataset(tmp_path / "data")
    expect_error(lambda: build(dset_config(root, valid_tracks="a"), tmp_path), "dset.valid_tracks")


# Metadata cache


def test_cache_second_scan_reads_no_audio(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", valid=("v",))
    before = snapshot(root)
    first = build(dset_config(root), tmp_path)
    assert snapshot(root) == before  # nothing written into the dataset
    cache_files = list((tmp_path / "cache" / "metadata").glob("*.json"))
    assert len(cache_files) == 3  # train, valid, test
    assert all(root not in path.parents for path in cache_files)

    def forbidden(*args, **kwargs):
        raise AssertionError("audio was read")

    monkeypatch.setattr(scan_module, "read_audio", forbidden)
    monkeypatch.setattr(scan_module, "audio_info", forbidden)
    monkeypatch.setattr(demixlab.audio.sf, "info", forbidden)
    second = build(dset_config(root), tmp_path)
    assert [t.name for t in second.train.tracks] == [t.name for t in first.train.tracks]
    assert [t.frames for t in second.valid.tracks] == [t.frames for t in first.valid.tracks]


def test_cache_rechecks_modified_files(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", valid=("v",))
    build(dset_config(root), tmp_path)
    checked: tp.List[Path] = []
    original = scan_module.check_audio_file
    monkeypatch.setattr(scan_module, "check_audio_file", lambda path: checked.append(path) or original(path))

    touched = root / "train" / "a" / "bass.wav"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    build(dset_config(root), tmp_path)
    assert checked == [touched]

    # Same size and a damaged sample: the new mtime alone triggers the check that catches it.
    wav, _ = sf.read(touched, dtype="float32")
    wav[5, 0] = np.inf
    sf.write(touched, wav, SR, subtype="FLOAT")
    assert touched.stat().st_size == stat.st_size
    expect_error(lambda: build(dset_config(root), tmp_path), str(touched), "NaN or infinite")


def test_cache_survives_a_failed_scan(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", valid=("v",))
    bad = root / "train" / "c" / "vocals.wav"
    wav = np.zeros((FRAMES, 2), dtype=np.float32)
    wav[0, 0] = np.nan
    sf.write(bad, wav, SR, subtype="FLOAT")
    expect_error(lambda: build(dset_config(root), tmp_path), str(bad))
    sf.write(bad, np.zeros((FRAMES, 2), dtype=np.float32), SR, subtype="FLOAT")
    checked: tp.List[Path] = []
    original = scan_module.check_audio_file
    monkeypatch.setattr(scan_module, "check_audio_file", lambda path: checked.append(path) or original(path))
    build(dset_config(root), tmp_path)
    assert bad in checked and not any(path.parent.name in ("a", "b") for path in checked)


def test_cache_ignores_a_corrupt_cache_file(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    build(dset_config(root), tmp_path)
    for path in (tmp_path / "cache" / "metadata").glob("*.json"):
        path.write_text("{not json")
    build(dset_config(root), tmp_path)
    for path in (tmp_path / "cache" / "metadata").glob("*.json"):
        assert json.loads(path.read_text())["version"] == 1


# Datasets


def test_segment_dataset_is_deterministic(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    data = build(dset_config(root), tmp_path, samples_per_track=4)
    dataset = data.train
    dataset.set_epoch(3)
    first = [dataset[index] for index in range(len(dataset))]
    again = SegmentDataset(dataset.tracks, dataset.segment_frames, dataset.samples_per_track, seed=1)
    again.set_epoch(3)
    for index in (0, 5, 11):
        torch.testing.assert_close(again[index], first[index], rtol=0, atol=0)
    dataset.set_epoch(4)
    assert not torch.equal(dataset[0], first[0])
    other_seed = SegmentDataset(dataset.tracks, dataset.segment_frames, dataset.samples_per_track, seed=2)
    other_seed.set_epoch(3)
    assert not torch.equal(other_seed[0], first[0])


def test_segment_dataset_with_workers_matches_main_process(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    dataset = build(dset_config(root), tmp_path, samples_per_track=4).train
    dataset.set_epoch(2)

    def batches(workers: int) -> tp.List[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        loader = DataLoader(dataset, batch_size=4, shuffle=True, generator=generator, num_workers=workers)
        return list(loader)

    main, workers = batches(0), batches(2)
    assert len(main) == 3
    for left, right in zip(main, workers):
        torch.testing.assert_close(left, right, rtol=0, atol=0)


def test_segment_dataset_pads_short_tracks(tmp_path):
    write_track(tmp_path / "short", frames=50)
    track = StemsTrack("short", {s: tmp_path / "short" / f"{s}.wav" for s in MUSDB_SOURCES}, None, SR, 2, 50)
    example = SegmentDataset([track], 80, 2, seed=0)[1]
    assert example.shape == (4, 2, 80)
    assert torch.equal(example[..., 50:], torch.zeros(4, 2, 30))
    assert example[..., :50].abs().sum() > 0


def test_track_dataset_items(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",))
    dataset = TrackDataset(build(dset_config(root), tmp_path).valid.tracks)
    name, mixture, sources = dataset[0]
    assert name == "v" and mixture.shape == (2, FRAMES) and sources.shape == (4, 2, FRAMES)


def test_conversion_of_a_mono_22050_track(tmp_path, caplog):
    root = tmp_path / "data"
    write_track(root / "train" / "a", frames=44100, channels=2, samplerate=44100)
    stems = write_track(root / "valid" / "low", frames=11025, channels=1, samplerate=22050, seed=5)
    with caplog.at_level(logging.WARNING, logger="demixlab.data"):
        data = build(dset_config(root, samplerate=44100, channels=2), tmp_path, segment=0.05)
    warnings = [record for record in caplog.records if "converted on read" in record.getMessage()]
    assert len(warnings) == 1 and "22050 Hz/1 ch" in warnings[0].getMessage()

    track = data.valid.tracks[0]
    assert isinstance(track, ConvertedTrack) and (track.samplerate, track.channels, track.frames) == (44100, 2, 22050)
    _, mixture, sources = data.valid[0]
    expected = demixlab.audio.convert_audio(torch.from_numpy(stems), 22050, 44100, 2)
    assert sources.shape == (4, 2, 22050) and mixture.shape == (2, 22050)
    torch.testing.assert_close(sources, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(sources[:, 0], sources[:, 1])
    # A segment matches the same frames of the whole converted track.
    for offset, frames in ((0, 1000), (777, 2205), (21000, 5000)):
        segment = track.read_sources(offset, frames)
        np.testing.assert_allclose(segment, sources[..., offset:offset + frames].numpy(), atol=1e-5)
    assert data.train[0].shape == (4, 2, 2205)
