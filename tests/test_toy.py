"""Tests of the built-in synthetic dataset (demixlab.data.toy)."""
import logging
import os
import threading
import time
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demixlab.errors import DemixError
from demixlab.data import toy
from demixlab.data.toy import GENERATOR_VERSION, TOY_SOURCES, ToySpec, ensure_toy_dataset, synthesize_track

SR = 44100
SPEC = ToySpec(seed=3, train_tracks=2, valid_tracks=1, test_tracks=1, train_duration=2.0, eval_duration=1.5)
FILES = ("mixture",) + TOY_SOURCES


def _tracks(root: Path) -> tp.List[Path]:
    return sorted(folder for split in toy.SPLITS for folder in (root / split).iterdir())


def _snapshot(root: Path) -> tp.Dict[str, tp.Tuple[int, bytes]]:
    """Relative path -> (mtime_ns, content) of every file under root."""
    return {str(path.relative_to(root)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_toy_dataset(SPEC, tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def stems() -> tp.List[tp.Dict[str, np.ndarray]]:
    return [synthesize_track(seed, 4.0) for seed in (11, 12, 13)]


def _frame_rms(wav: np.ndarray, seconds: float = 0.05) -> np.ndarray:
    mono = wav.mean(axis=0)
    size = int(seconds * SR)
    count = len(mono) // size
    return np.sqrt(np.square(mono[:count * size].reshape(count, size)).mean(axis=1))


def _energy_share(wav: np.ndarray, low: float, high: float) -> float:
    power = np.abs(np.fft.rfft(wav, axis=-1)) ** 2
    freqs = np.fft.rfftfreq(wav.shape[-1], 1 / SR)
    return float(power[:, (freqs >= low) & (freqs < high)].sum() / power.sum())


def test_layout_and_format(dataset: Path) -> None:
    assert dataset.name.startswith(f"toy-v{GENERATOR_VERSION}-")
    assert dataset.parent.name.startswith("cache")
    expected = {"train": ["toy_train_000", "toy_train_001"], "valid": ["toy_valid_000"], "test": ["toy_test_000"]}
    for split, names in expected.items():
        assert sorted(p.name for p in (dataset / split).iterdir()) == names
        for name in names:
            assert sorted(p.name for p in (dataset / split / name).iterdir()) == sorted(f"{f}.wav" for f in FILES)
            for stem in FILES:
                info = sf.info(str(dataset / split / name / f"{stem}.wav"))
                seconds = SPEC.train_duration if split == "train" else SPEC.eval_duration
                assert (info.channels, info.samplerate, info.subtype, info.format) == (2, SR, "FLOAT", "WAV")
                assert info.frames == round(seconds * SR)


def test_mixture_is_exact_sum_of_stems(dataset: Path) -> None:
    for track in _tracks(dataset):
        wavs = {name: sf.read(str(track / f"{name}.wav"), dtype="float32")[0] for name in FILES}
        total = np.zeros_like(wavs["mixture"])
        for name in TOY_SOURCES:
            total = total + wavs[name]
        np.testing.assert_array_equal(wavs["mixture"], total)
        assert np.abs(wavs["mixture"]).max() <= toy.PEAK + 1e-6
        assert all(np.isfinite(wav).all() for wav in wavs.values())


def test_generation_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    again = ensure_toy_dataset(SPEC, tmp_path, progress=False)
    assert again.name == dataset.name
    first, second = _snapshot(dataset), _snapshot(again)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name][1] == second[name][1], name


def test_tracks_differ(dataset: Path) -> None:
    mixtures = [sf.read(str(track / "mixture.wav"), dtype="float32")[0] for track in _tracks(dataset)]
    length = min(len(m) for m in mixtures)
    for i in range(len(mixtures)):
        for j in range(i + 1, len(mixtures)):
            assert np.abs(mixtures[i][:length] - mixtures[j][:length]).mean() > 1e-3
    a, b = synthesize_track(1, 1.0), synthesize_track(2, 1.0)
    assert not np.allclose(a["drums"], b["drums"])


def test_other_seed_gives_other_dataset(dataset: Path, tmp_path: Path) -> None:
    other = ensure_toy_dataset(ToySpec(seed=4, train_tracks=1, valid_tracks=0, test_tracks=0, train_duration=2.0),
                               tmp_path, progress=False)
    assert other.name != dataset.name
    ours = sf.read(str(dataset / "train" / "toy_train_000" / "mixture.wav"))[0]
    theirs = sf.read(str(other / "train" / "toy_train_000" / "mixture.wav"))[0]
    assert ours.shape == theirs.shape and not np.allclose(ours, theirs)
    assert list((other / "valid").iterdir()) == []


def test_ensure_is_idempotent(dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = _snapshot(dataset)
    with caplog.at_level(logging.INFO, logger="demixlab.data.toy"):
        assert ensure_toy_dataset(SPEC, dataset.parent, progress=False) == dataset
    assert _snapshot(dataset) == before  # same mtimes and contents: nothing regenerated
    assert not caplog.records
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]


def test_leftover_temp_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = ToySpec(seed=5, train_tracks=1, valid_tracks=0, test_tracks=1, train_duration=1.0, eval_duration=1.0)
    name = toy.toy_dataset_name(spec)
    # A crashed generator left a partial folder; a live one is still filling another.
    stale = tmp_path / f".{name}.crashed.tmp"
    (stale / "train" / "toy_train_000").mkdir(parents=True)
    (stale / "train" / "toy_train_000" / "mixture.wav").write_bytes(b"partial")
    live = tmp_path / f".{name}.live.tmp"
    (live / "train").mkdir(parents=True)
    old = time.time() - 2 * 3600
    for path in [stale, *stale.rglob("*")]:
        os.utime(path, (old, old))
    with caplog.at_level(logging.INFO, logger="demixlab.data.toy"):
        root = ensure_toy_dataset(spec, tmp_path, progress=False)
    assert root == tmp_path / name
    assert any("Generating" in record.getMessage() and str(root) in record.getMessage() for record in caplog.records)
    assert sf.info(str(root / "train" / "toy_train_000" / "mixture.wav")).frames == SR
    assert not stale.exists()
    assert live.exists()  # recent: may belong to a running generator, left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, live.name])


def test_concurrent_callers_share_one_dataset(tmp_path: Path) -> None:
    spec = ToySpec(seed=6, train_tracks=1, valid_tracks=1, test_tracks=0, train_duration=1.0, eval_duration=1.0)
    results: tp.List[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_toy_dataset(spec, tmp_path, progress=False)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temp folder left behind
    assert len(_snapshot(results[0])) == 2 * len(FILES)


def test_spec_name_and_validation() -> None:
    assert toy.toy_dataset_name(ToySpec(train_duration=12)) == toy.toy_dataset_name(ToySpec())
    assert toy.toy_dataset_name(ToySpec(seed=1)) != toy.toy_dataset_name(ToySpec())
    assert toy.toy_dataset_name(ToySpec(samplerate=22050)) != toy.toy_dataset_name(ToySpec())
    for bad in ({"seed": -1}, {"train_tracks": -1}, {"eval_duration": 0.0}, {"samplerate": 100}):
        with pytest.raises(DemixError, match="dset.toy|sample rate"):
            ToySpec(**bad)
    seeds = {toy.track_seed(0, split, index) for split in toy.SPLITS for index in range(5)}
    assert len(seeds) == 15


def test_synthesize_track_shapes_and_levels(stems: tp.List[tp.Dict[str, np.ndarray]]) -> None:
    for track in stems:
        assert tuple(track) == TOY_SOURCES
        mixture = toy.mix_stems(track)
        for name, wav in track.items():
            assert wav.dtype == np.float32 and wav.shape == (2, 4 * SR)
            assert np.abs(wav).max() <= toy.PEAK + 1e-6, name
            assert np.sqrt(np.square(wav).mean()) > 0.01, f"{name} is (nearly) silent"
        for name in ("drums", "other"):  # stereo images, not dual mono
            assert np.abs(track[name][0] - track[name][1]).mean() > 0.05 * np.abs(track[name]).mean()
        assert np.abs(mixture).max() <= toy.PEAK + 1e-6
    np.testing.assert_array_equal(synthesize_track(12, 4.0)["vocals"], stems[1]["vocals"])


def test_vocals_rest_but_drums_do_not(stems: tp.List[tp.Dict[str, np.ndarray]]) -> None:
    def silent_share(name: str) -> float:
        frames = np.concatenate([_frame_rms(track[name]) / np.sqrt(np.square(track[name]).mean())
                                 for track in stems])
        return float((frames < 1e-3).mean())

    assert silent_share("vocals") > 0.15
    assert silent_share("drums") < 0.05


def test_spectral_balance(stems: tp.List[tp.Dict[str, np.ndarray]]) -> None:
    for track in stems:
        assert _energy_share(track["bass"], 0, 300) > 0.8
        assert _energy_share(track["bass"], 4000, SR / 2) < 1e-3
        assert _energy_share(track["drums"], 4000, SR / 2) > 0.005  # hi-hats and cymbals
        assert _energy_share(track["vocals"], 600, SR / 2) > 0.01  # harmonics and formants, not a hum


def test_stems_are_not_trivially_correlated(stems: tp.List[tp.Dict[str, np.ndarray]]) -> None:
    for track in stems:
        for i, first in enumerate(TOY_SOURCES):
            for second in TOY_SOURCES[i + 1:]:
                correlation = np.corrcoef(track[first].ravel(), track[second].ravel())[0, 1]
                assert abs(correlation) < 0.3, (first, second, correlation)
