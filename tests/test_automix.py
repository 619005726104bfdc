"""`demixlab automix`: tempo and key estimates on generated songs whose tempo and key are known,
remixes from different tracks on one beat grid, determinism, rejections, the folder dataset it
writes, and the one-line errors."""
import json
import os
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demixlab.commands import main as demixlab_main
from demixlab.data import DatasetConfig, build_datasets, training_tracks
from demixlab.data.automix import MANIFEST, PLOT, AutomixOptions, make_automix
from demixlab.data.automix import analysis as analysis_module
from demixlab.data.automix.analysis import (KEY_TOO_FAR, MAJOR_PROFILE, MINOR_PROFILE, NO_BEAT, TOO_SHORT, Key,
                                            key_of_chroma, semitones_between)
from demixlab.data.automix.remix import plan_remixes, render_remix, tempo_change
from demixlab.data.scan import scan_stems_folder
from demixlab.errors import DemixError

SR = 22050
SOURCES = ["drums", "bass", "other", "vocals"]
FIRST_BEAT = 0.25  # seconds of every generated song's first beat
MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
# name: (tempo, tonic pitch class, minor, seconds, drums are noise)
SONGS = {
    "c100": (100.0, 0, False, 8.0, False),
    "d100": (100.0, 2, False, 8.0, False),
    "am105": (105.0, 9, True, 8.0, False),
    "bb110": (110.0, 10, False, 8.0, False),
    "c120": (120.0, 0, False, 8.0, False),
    "fs100": (100.0, 6, False, 8.0, False),  # its notes are 6 semitones from the others': key too far
    "noise": (100.0, 0, False, 8.0, True),  # no beat
    "short": (100.0, 0, False, 1.5, False),  # shorter than any excerpt
}
SECONDS = 5.0


def _tone(frequency: float, frames: int, decay: float, harmonics: int = 3) -> np.ndarray:
    time = np.arange(frames) / SR
    wave = sum(np.sin(2 * np.pi * frequency * k * time) / k for k in range(1, harmonics + 1))
    return wave * np.exp(-time / decay)


def _hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def song(tempo: float, tonic: int, minor: bool, seconds: float, noise: bool, seed: int) -> tp.Dict[str, np.ndarray]:
    """Four mono stems: a kick on every beat (or noise), a plucked bass on every beat (tonic and
    fifth of the bar's chord), sustained chords changing every bar (I IV V I) and a melody of
    scale notes on half beats."""
    rng = np.random.default_rng(seed)
    frames, period = int(seconds * SR), 60.0 / tempo
    scale = MINOR if minor else MAJOR
    stems = {source: np.zeros(frames) for source in SOURCES}
    beats = np.arange(FIRST_BEAT, seconds, period)
    for number, beat in enumerate(beats):
        start = int(beat * SR)
        length = min(int(0.25 * SR), frames - start)
        degree = (0, 3, 4, 0)[(number // 4) % 4]
        root = tonic + scale[degree]
        kick = _tone(55.0, length, 0.05, 1) + 0.3 * rng.standard_normal(length) * np.exp(-np.arange(length) / 200)
        stems["drums"][start:start + length] += 0.6 * kick
        bass_note = 36 + root + (7 if number % 2 else 0)
        stems["bass"][start:start + int(period * SR)][:min(frames - start, int(period * SR))] += \
            0.3 * _tone(_hz(bass_note), min(frames - start, int(period * SR)), 0.3)
        if number % 4 == 0:
            bar = min(frames - start, int(4 * period * SR))
            for step in (0, 2, 4):
                degree_note = scale[(degree + step) % 7] + 12 * ((degree + step) // 7)
                stems["other"][start:start + bar] += 0.08 * _tone(_hz(60 + tonic + degree_note), bar, 2.0)
        for half in (0, 1):
            note_start = int((beat + half * period / 2) * SR)
            if note_start >= frames:
                continue
            note = min(frames - note_start, int(period / 2 * SR))
            pitch = 72 + tonic + scale[int(rng.integers(7))]
            stems["vocals"][note_start:note_start + note] += 0.1 * _tone(_hz(pitch), note, 0.4, 2)
    if noise:
        stems["drums"] = 0.2 * rng.standard_normal(frames)
    return {source: stem.astype(np.float32)[None] for source, stem in stems.items()}


def write_dataset(root: Path, songs: tp.Mapping[str, tp.Tuple[float, int, bool, float, bool]]) -> Path:
    """A folder dataset of generated songs in train/ (and one in valid/)."""
    for number, (name, spec) in enumerate(songs.items()):
        for split in ("train", "valid") if number == 0 else ("train",):
            folder = root / split / name
            folder.mkdir(parents=True)
            for source, audio in song(*spec, seed=number).items():
                sf.write(folder / f"{source}.wav", audio.T, SR, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("songs"), SONGS)


@pytest.fixture(scope="module")
def tracks(dataset: Path, cache_dir: Path) -> tp.List:
    dset = DatasetConfig(kind="stems", root=str(dataset), sources=SOURCES, samplerate=SR, channels=1)
    return training_tracks(dset, base_dir=dataset, cache_dir=cache_dir)


def options(**changes: tp.Any) -> AutomixOptions:
    values = dict(sources=SOURCES, seconds=SECONDS, count=4, seed=0, samplerate=SR, channels=1)
    values.update(changes)
    return AutomixOptions(**values)


@pytest.fixture(scope="module")
def automix(tracks: tp.List, tmp_path_factory) -> tp.Tuple[Path, tp.Any]:
    destination = tmp_path_factory.mktemp("automix") / "dst"
    return destination, make_automix(tracks, options(), destination, progress=False)


def test_tempo_first_beat_and_key_of_generated_songs(automix):
    _, result = automix
    by_name = {analysis.name: analysis for analysis in result.analyses}
    for name, (tempo, tonic, minor, _, noise) in SONGS.items():
        analysis = by_name[name]
        if name in ("noise", "short"):
            assert analysis.rejected == (NO_BEAT if noise else TOO_SHORT), name
            continue
        assert analysis.rejected is None, name
        assert analysis.tempo == pytest.approx(tempo, rel=0.01), name
        # the grid's first beat is the first kick (the onset strength peaks a few ms after it)
        assert abs(analysis.first_beat - FIRST_BEAT) < 0.04, (name, analysis.first_beat)
        assert analysis.beat_confidence > 0.5, name
        assert analysis.key is not None and analysis.key.pitch_set == Key(tonic, minor, 0).pitch_set, \
            (name, analysis.key.name)
    assert by_name["noise"].beat_confidence < 0.3
    assert by_name["c100"].key.name == "C major" and by_name["am105"].key.name == "A minor"


def test_key_profiles_shifts_and_tempo_changes():
    assert key_of_chroma(np.roll(MAJOR_PROFILE, 2)).name == "D major"
    assert key_of_chroma(np.roll(MINOR_PROFILE, 9)).name == "A minor"
    assert key_of_chroma(np.ones(12)) is None
    c_major, a_minor, d_major, f_sharp = Key(0, False, 1), Key(9, True, 1), Key(2, False, 1), Key(6, False, 1)
    assert semitones_between(a_minor, c_major) == 0  # same notes
    assert semitones_between(d_major, c_major) == -2 and semitones_between(c_major, d_major) == 2
    assert abs(semitones_between(f_sharp, c_major)) == 6
    assert tempo_change(100, 110, 0.15) == pytest.approx(1.1)
    assert tempo_change(60, 118, 0.15) == pytest.approx(118 / 120)  # counted in half time
    assert tempo_change(100, 120, 0.15) is None


def _onsets(audio: np.ndarray) -> np.ndarray:
    import librosa

    return librosa.onset.onset_detect(y=audio[0], sr=SR, units="time", backtrack=False)


def test_remixes_take_stems_of_different_tracks_on_one_grid(automix):
    destination, result = automix
    manifest = json.loads((destination / MANIFEST).read_text())
    usable = {analysis.name for analysis in result.analyses if analysis.rejected is None}
    assert len(manifest["remixes"]) == 4
    for remix in manifest["remixes"]:
        stems = remix["stems"]
        assert list(stems) == SOURCES
        assert len({stem["track"] for stem in stems.values()}) == len(SOURCES)  # all different tracks
        assert {stem["track"] for stem in stems.values()} <= usable
        assert remix["reference"] in {stem["track"] for stem in stems.values()}
        assert stems["drums"]["semitones"] == 0
        for stem in stems.values():
            assert abs(stem["stretch"] - 1) <= 0.15 + 1e-6 and abs(stem["semitones"]) <= 2
            # the stretch brings the stem's tempo (or its double or half) to the remix's
            octave = stem["source_tempo"] * stem["stretch"] / remix["tempo"]
            assert min(abs(octave - value) for value in (0.5, 1, 2)) < 1e-3
        period = 60 / remix["tempo"]
        for source in SOURCES:
            audio, samplerate = sf.read(destination / "train" / remix["name"] / f"{source}.wav", always_2d=True)
            assert samplerate == SR and audio.shape == (int(SECONDS * SR), 1)
            assert np.abs(audio).max() > 0.01  # not silent
        # drums (a kick per beat) and bass (a note per beat) of different songs, stretched from
        # different tempi: their onsets fall on the remix's grid, which starts at 0 s
        for source in ("drums", "bass"):
            audio, _ = sf.read(destination / "train" / remix["name"] / f"{source}.wav", always_2d=True)
            onsets = _onsets(audio.T.astype(np.float32))
            assert len(onsets) >= SECONDS / period - 2, (remix["name"], source, onsets)
            distance = np.abs(onsets / period - np.round(onsets / period)) * period
            assert np.median(distance) < 0.03 and np.max(distance) < 0.06, (remix["name"], source, onsets)


def test_rejections_are_counted_and_reported(automix):
    destination, result = automix
    manifest = json.loads((destination / MANIFEST).read_text())
    assert manifest["rejected"]["tracks"] == {NO_BEAT: 1, TOO_SHORT: 1}
    assert set(manifest["rejected"]["candidates"]) == {"tempo too far", KEY_TOO_FAR, TOO_SHORT, "silent stem"}
    assert all(remix["key"] != "F# major" for remix in manifest["remixes"])
    # the F# song is far from every other key: it can only be a reference whose attempts fail, or a
    # candidate rejected as key too far, or give its drums (never pitch-shifted)
    for remix in manifest["remixes"]:
        assert all(stem["track"] != "fs100" or source == "drums" for source, stem in remix["stems"].items())
    text = "\n".join(result.summary)
    assert "tracks: 8 analysed, 6 usable; rejected: no confident beat 1, too short 1" in text
    assert "remixes: 4 of 4 requested" in text
    assert (destination / PLOT).stat().st_size > 10_000


def test_the_same_seed_gives_the_same_remixes(automix, tracks):
    _, result = automix
    again = plan_remixes(result.analyses, options())
    assert [plan.summary() for plan in again.remixes] == [plan.summary() for plan in result.plans.remixes]
    other = plan_remixes(result.analyses, options(seed=1))
    assert [plan.summary() for plan in other.remixes] != [plan.summary() for plan in result.plans.remixes]
    first = render_remix(tracks, again.remixes[0], SECONDS)
    destination, _ = automix
    for source, audio in first.items():
        written, _ = sf.read(destination / "train" / "REMIX_0000" / f"{source}.wav", always_2d=True, dtype="float32")
        np.testing.assert_array_equal(written.T, audio)


def test_the_remixes_load_as_a_folder_dataset_and_as_an_extra(automix, dataset, cache_dir):
    destination, _ = automix
    remixes = scan_stems_folder(destination / "train", SOURCES, cache_dir, progress=False)
    assert [track.name for track in remixes] == [f"REMIX_{number:04d}" for number in range(4)]
    assert all(track.frames == int(SECONDS * SR) and track.samplerate == SR for track in remixes)
    dset = DatasetConfig(kind="stems", root=str(dataset), sources=SOURCES, samplerate=SR, channels=1,
                         extra=[{"kind": "stems", "root": str(destination), "weight": 0.5}])
    splits = build_datasets(dset, segment=1.0, samples_per_track=2, seed=0, cache_dir=cache_dir, base_dir=dataset,
                            with_test=False, progress=False)
    assert len(splits.train) == 8 * 2 + round(0.5 * 8 * 2)
    assert splits.train[len(splits.train) - 1].shape == (4, 1, SR)


def _cli(capsys, *argv: str) -> str:
    """Run `demixlab ARGV`, expect the one-line user error (exit 2); return it."""
    with pytest.raises(SystemExit) as info:
        demixlab_main(["automix", *argv, "--samplerate", str(SR), "--channels", "1", "--no-progress"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("demixlab: error: ") and "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, dataset, capsys, monkeypatch, cache_dir):
    monkeypatch.setenv("DEMIXLAB_CACHE", str(cache_dir))
    out = tmp_path / "out" / "dst"
    assert "no such folder" in _cli(capsys, str(tmp_path / "missing"), "-o", str(out))
    (tmp_path / "plain").mkdir()
    assert "not a folder dataset (no train/ folder" in _cli(capsys, str(tmp_path / "plain"), "-o", str(out))
    assert "missing stem 'piano'" in _cli(capsys, str(dataset), "-o", str(out), "--sources", "drums,bass,piano")
    assert "--beat-source kick" in _cli(capsys, str(dataset), "-o", str(out), "--beat-source", "kick")
    (tmp_path / "file").write_text("x")
    assert "cannot write in the folder" in _cli(capsys, str(dataset), "-o", str(tmp_path / "file" / "dst"))
    few = write_dataset(tmp_path / "few", {name: SONGS[name] for name in ("c100", "d100", "noise", "short")})
    message = _cli(capsys, str(few), "-o", str(out), "--seconds", str(SECONDS))
    assert "too few usable tracks: 2 of 4" in message
    assert "no remix could be made" in _cli(capsys, str(dataset), "-o", str(out), "--seconds", str(SECONDS),
                                            "--max-tempo-change", "0", "--max-semitones", "0", "--count", "1")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "not an earlier automix output" in _cli(capsys, str(dataset), "-o", str(tmp_path / "taken"))
    assert not out.exists() and sorted(os.listdir(out.parent)) == []  # no DST, no temporary folder
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_an_earlier_output_is_replaced_only_with_force(tmp_path, tracks, automix):
    destination = tmp_path / "dst"
    shutil.copytree(automix[0], destination)
    few = options(count=2, seconds=2.0)
    with pytest.raises(DemixError, match="pass --force"):
        make_automix(tracks[:4], few, destination, progress=False)
    make_automix(tracks[:4], few, destination, force=True, progress=False)
    assert sorted(path.name for path in (destination / "train").iterdir()) == ["REMIX_0000", "REMIX_0001"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dst"]


def test_a_missing_librosa_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "librosa", None)
    with pytest.raises(DemixError, match=r"pip install 'demixlab\[automix\]'"):
        analysis_module.import_librosa()


@pytest.mark.slow
def test_the_command_on_the_toy_dataset(tmp_path, cache_dir):
    """`demixlab automix` end to end in a subprocess with 2 worker processes, on a small generated
    toy dataset: the same remixes as in this process with one."""
    from demixlab.data.toy import ToySpec, ensure_toy_dataset

    root = ensure_toy_dataset(ToySpec(seed=0, train_tracks=8, valid_tracks=0, test_tracks=0, train_duration=8.0,
                                      samplerate=SR), cache_dir / "toy", progress=False)
    env = {**os.environ, "DEMIXLAB_CACHE": str(cache_dir)}
    command = [sys.executable, "-m", "demixlab", "automix", str(root), "-o", str(tmp_path / "dst"), "--seconds", "3",
               "--count", "3", "--samplerate", str(SR), "--workers", "2", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remixes: 3 of 3 requested" in result.stdout and "candidate stems rejected:" in result.stdout
    remixes = scan_stems_folder(tmp_path / "dst" / "train", SOURCES, cache_dir, progress=False)
    assert len(remixes) == 3 and all(track.frames == 3 * SR and track.channels == 2 for track in remixes)
    toy = training_tracks(DatasetConfig(kind="stems", root=str(root), sources=SOURCES, samplerate=SR),
                          base_dir=root, cache_dir=cache_dir)
    make_automix(toy, options(seconds=3.0, count=3, channels=2), tmp_path / "alone", progress=False)
    assert (json.loads((tmp_path / "alone" / MANIFEST).read_text())["remixes"]
            == json.loads((tmp_path / "dst" / MANIFEST).read_text())["remixes"])
    for track in remixes:
        np.testing.assert_array_equal(track.read_sources(), scan_stems_folder(
            tmp_path / "alone" / "train", SOURCES, cache_dir, progress=False)[remixes.index(track)].read_sources())
