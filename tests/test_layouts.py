"""MoisesDB and Slakh2100 layouts on tiny datasets the tests write in each layout."""
import json
import os
import shutil
import sys
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from demixlab.data import DatasetConfig, build_datasets, build_test_split, build_valid_split
from demixlab.data import scan as scan_module
from demixlab.data.config import MoisesSpec, SlakhSpec
from demixlab.data.layouts import MappedTrack
from demixlab.errors import DemixError
from tests.cli import TINY_SOLVER
from tests.test_data import expect_error, snapshot

SR = 8000
FRAMES = 1600
FOUR = ["drums", "bass", "other", "vocals"]
SIX = ["drums", "bass", "other", "vocals", "guitar", "piano"]


def tone(seed: int, channels: int) -> np.ndarray:
    """A distinct random signal (channels, FRAMES)."""
    return (0.05 * np.random.default_rng(seed).standard_normal((channels, FRAMES))).astype(np.float32)


# A MoisesDB track: {category: [(file id, track type), ...]}.
MOISES_TRACKS = {
    "0a-song": {"vocals": [("v1", "lead female singer"), ("v2", "background vocals")], "drums": [("d1", "kick drum")],
                "bass": [("b1", "bass guitar")], "guitar": [("g1", "acoustic guitar")],
                "percussion": [("p1", "a-tonal percussion (claps, shakers, congas, cowbell etc)")]},
    "1b-song": {"vocals": [("v1", "lead male singer")], "drums": [("d1", "full acoustic drumkit")],
                "piano": [("k1", "grand piano")], "other_keys": [("k2", "synth pad")]},
    "2c-song": {"bass": [("b1", "bass synthesizer (moog etc)")], "wind": [("w1", "brass (trumpet etc)")],
                "drums": [("d1", "drum machine")]},
    "3d-song": {"vocals": [("v1", "lead female singer")], "bowed_strings": [("s1", "violin section")]},
    "4e-song": {"drums": [("d1", "snare drum"), ("d2", "toms")], "guitar": [("g1", "clean electric guitar")]},
}


def write_moisesdb(root: Path, tracks: tp.Mapping[str, tp.Mapping[str, tp.Sequence[tp.Tuple[str, str]]]] = MOISES_TRACKS,
                   provider: tp.Optional[str] = "provider") -> tp.Dict[str, tp.Dict[str, np.ndarray]]:
    """Write tracks in MoisesDB layout; return {track: {file id: audio}}."""
    written: tp.Dict[str, tp.Dict[str, np.ndarray]] = {}
    for number, (name, categories) in enumerate(tracks.items()):
        folder = root / provider / name if provider else root / name
        stems = []
        written[name] = {}
        for category, files in categories.items():
            (folder / category).mkdir(parents=True, exist_ok=True)
            for index, (file_id, track_type) in enumerate(files):
                audio = tone(100 * number + 10 * len(written[name]) + index, 2)
                sf.write(folder / category / f"{file_id}.wav", audio.T, SR, subtype="FLOAT")
                written[name][file_id] = audio
            stems.append({"stemName": category, "id": f"{category}-id",
                          "tracks": [{"id": file_id, "trackType": track_type, "extension": "wav", "has_bleed": False}
                                     for file_id, track_type in files]})
        (folder / "data.json").write_text(json.dumps({"song": name, "artist": "A", "genre": "pop", "stems": stems}))
    return written


def moises_config(root: Path, **overrides: tp.Any) -> DatasetConfig:
    spec = {"valid": ["1b-song"], "test": ["2c-song"], **overrides.pop("moisesdb", {})}
    values = {"kind": "moisesdb", "root": str(root), "sources": FOUR, "samplerate": SR, "channels": 2,
              "valid_tracks": [], "moisesdb": MoisesSpec(**spec)}
    values.update(overrides)
    return DatasetConfig(**values)


def build(dset: DatasetConfig, tmp_path: Path, **kwargs: tp.Any):
    options: tp.Dict[str, tp.Any] = {"segment": 0.05, "samples_per_track": 2, "seed": 1,
                                     "cache_dir": tmp_path / "cache", "base_dir": tmp_path, "progress": False}
    options.update(kwargs)
    return build_datasets(dset, **options)


def sources_of(track: MappedTrack) -> tp.Dict[str, np.ndarray]:
    return dict(zip(track.sources, track.read_sources()))


# MoisesDB


def test_moisesdb_four_stems_sum_categories(tmp_path):
    written = write_moisesdb(tmp_path / "moisesdb")
    data = build(moises_config(tmp_path / "moisesdb"), tmp_path)
    assert [t.name for t in data.train.tracks] == ["0a-song", "3d-song", "4e-song"]
    assert [t.name for t in data.valid.tracks] == ["1b-song"]
    assert [t.name for t in data.test.tracks] == ["2c-song"]
    song = written["0a-song"]
    got = sources_of(data.train.tracks[0])
    np.testing.assert_allclose(got["vocals"], song["v1"] + song["v2"], atol=1e-6)
    np.testing.assert_allclose(got["drums"], song["d1"] + song["p1"], atol=1e-6)  # percussion goes to drums
    np.testing.assert_allclose(got["bass"], song["b1"], atol=1e-6)
    np.testing.assert_allclose(got["other"], song["g1"], atol=1e-6)  # guitar: the rest
    name, mixture, stems = data.valid[0]
    assert name == "1b-song" and stems.shape == (4, 2, FRAMES)
    song = written["1b-song"]
    np.testing.assert_allclose(stems[FOUR.index("other")].numpy(), song["k1"] + song["k2"], atol=1e-6)
    np.testing.assert_allclose(stems[FOUR.index("bass")].numpy(), 0)  # no bass in this song: silence
    np.testing.assert_allclose(mixture.numpy(), stems.sum(0).numpy(), atol=1e-6)
    assert data.train[3].shape == (4, 2, 400)


def test_moisesdb_six_stems_and_mapping_by_category_and_track_type(tmp_path):
    written = write_moisesdb(tmp_path / "moisesdb", provider=None)  # track folders directly under the root
    mapping = {"other_keys": "piano", "background_vocals": None, "wind": None}
    data = build(moises_config(tmp_path / "moisesdb", sources=SIX, moisesdb={"mapping": mapping}), tmp_path)
    train = {t.name: sources_of(t) for t in data.train.tracks}
    song = written["0a-song"]
    np.testing.assert_allclose(train["0a-song"]["vocals"], song["v1"], atol=1e-6)  # background vocals dropped
    np.testing.assert_allclose(train["0a-song"]["guitar"], song["g1"], atol=1e-6)
    np.testing.assert_allclose(train["0a-song"]["other"], 0)
    valid = sources_of(data.valid.tracks[0])
    np.testing.assert_allclose(valid["piano"], written["1b-song"]["k1"] + written["1b-song"]["k2"], atol=1e-6)
    test = sources_of(data.test.tracks[0])  # wind left out: not in any source nor the mixture
    np.testing.assert_allclose(test["other"], 0)
    _, mixture, stems = data.test[0]
    np.testing.assert_allclose(mixture.numpy(), written["2c-song"]["b1"] + written["2c-song"]["d1"], atol=1e-6)


def test_moisesdb_ratio_split_is_seeded(tmp_path):
    write_moisesdb(tmp_path / "moisesdb")

    def names(seed: int) -> tp.Tuple[tp.List[str], ...]:
        data = build(moises_config(tmp_path / "moisesdb", moisesdb={"valid": 0.2, "test": 0.2, "seed": seed}),
                     tmp_path)
        return tuple([t.name for t in split.tracks] for split in (data.train, data.valid, data.test))

    first = names(0)
    assert [len(split) for split in first] == [3, 1, 1]
    assert sorted(sum(first, [])) == sorted(MOISES_TRACKS)
    assert names(0) == first
    assert any(names(seed) != first for seed in range(1, 6))
    test = build_test_split(moises_config(tmp_path / "moisesdb", moisesdb={"valid": 0.2, "test": 0.2}),
                            samplerate=SR, channels=1, base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert [t.name for t in test.dataset.tracks] == first[2] and test.dataset[0][1].shape == (1, FRAMES)


def test_moisesdb_metadata_cache_reads_no_audio_the_second_time(tmp_path, monkeypatch):
    root = tmp_path / "moisesdb"
    write_moisesdb(root)
    before = snapshot(root)
    build(moises_config(root), tmp_path)
    assert snapshot(root) == before  # nothing written into the dataset

    def forbidden(*args, **kwargs):
        raise AssertionError("audio was read")

    monkeypatch.setattr(scan_module, "check_audio_file", forbidden)
    monkeypatch.setattr(scan_module, "audio_info", forbidden)
    assert len(build(moises_config(root), tmp_path).train.tracks) == 3


def test_moisesdb_errors(tmp_path):
    root = tmp_path / "moisesdb"
    write_moisesdb(root)
    expect_error(lambda: build(moises_config(root, moisesdb={"mapping": {"keyboards": "other"}}), tmp_path),
                 "dset.moisesdb.mapping", "unknown category 'keyboards'", "other_keys", "bowed_strings")
    expect_error(lambda: build(moises_config(root, moisesdb={"mapping": {"piano": "keys"}}), tmp_path),
                 "dset.moisesdb.mapping", "'keys' is not one of dset.sources")
    expect_error(lambda: build(moises_config(root, sources=[*FOUR, "organ"]), tmp_path),
                 "no category maps to source(s) organ", "missing=silent")
    assert build(moises_config(root, sources=[*FOUR, "organ"], missing="silent"), tmp_path).train[0].shape[0] == 5
    expect_error(lambda: build(moises_config(root, moisesdb={"valid": ["nope"]}), tmp_path),
                 "dset.moisesdb.valid", "'nope'")
    expect_error(lambda: build(moises_config(root, valid_tracks=["0a-song"]), tmp_path), "dset.valid_tracks",
                 "dset.moisesdb.valid")
    sf.write(root / "provider" / "4e-song" / "drums" / "d2.wav", np.zeros((FRAMES - 8, 2)), SR)
    expect_error(lambda: build(moises_config(root, moisesdb={"length_tolerance": 0}), tmp_path),
                 str(root / "provider" / "4e-song" / "drums" / "d2.wav"), str(FRAMES - 8), "same length", "drums/d1.wav")
    (root / "provider" / "3d-song" / "data.json").unlink()
    expect_error(lambda: build(moises_config(root), tmp_path), str(root / "provider" / "3d-song"), "no data.json")


def test_moisesdb_stems_of_slightly_different_lengths_are_trimmed(tmp_path, caplog):
    root = tmp_path / "moisesdb"
    written = write_moisesdb(root)
    short = written["4e-song"]["g1"][:, :FRAMES - 400]  # 0.05 s shorter
    sf.write(root / "provider" / "4e-song" / "guitar" / "g1.wav", short.T, SR, subtype="FLOAT")
    with caplog.at_level("WARNING"):
        data = build(moises_config(root, moisesdb={"length_tolerance": 0.1}), tmp_path)
    warnings = [record.getMessage() for record in caplog.records if "4e-song" in record.getMessage()]
    assert len(warnings) == 1 and "0.050 s" in warnings[0] and "dset.moisesdb.length_tolerance=0.1" in warnings[0]
    track = next(track for track in data.train.tracks if track.name == "4e-song")
    assert track.frames == FRAMES - 400
    sources = sources_of(track)
    assert sources["other"].shape == (2, FRAMES - 400)  # the longer files are cut to the shortest
    np.testing.assert_allclose(sources["drums"], (written["4e-song"]["d1"] + written["4e-song"]["d2"])[:, :FRAMES - 400],
                               atol=1e-6)
    np.testing.assert_allclose(sources["other"], short, atol=1e-6)
    assert data.train[len(data.train) - 1].shape == (4, 2, 400)
    # Beyond the tolerance: the one-line error names the short file, the long one and the option.
    expect_error(lambda: build(moises_config(root, moisesdb={"length_tolerance": 0.04}), tmp_path),
                 str(root / "provider" / "4e-song" / "guitar" / "g1.wav"), "0.05 s fewer than", "drums/d1.wav",
                 "dset.moisesdb.length_tolerance=0.04 s")
    expect_error(lambda: MoisesSpec(length_tolerance=-1), "dset.moisesdb.length_tolerance=-1")


def test_moisesdb_broken_json_and_missing_file(tmp_path):
    root = tmp_path / "moisesdb"
    write_moisesdb(root)
    json_path = root / "provider" / "4e-song" / "data.json"
    json_path.write_text('{"stems": [{"stemName": "drums"}]}')
    expect_error(lambda: build(moises_config(root), tmp_path), str(json_path), "tracks")
    json_path.write_text("{not json")
    expect_error(lambda: build(moises_config(root), tmp_path), str(json_path), "not readable JSON")
    write_moisesdb(root)
    (root / "provider" / "4e-song" / "drums" / "d2.wav").unlink()
    expect_error(lambda: build(moises_config(root), tmp_path), "d2.wav", "listed in", "missing")


# Slakh2100

SLAKH_TRACKS = {
    "train": {"Track00001": {"S00": ("Piano", False, True), "S01": ("Bass", False, True), "S02": ("Drums", True, True),
                             "S03": ("Guitar", False, False), "S04": ("Synth Pad", False, True)},
              "Track00002": {"S00": ("Guitar", False, True), "S01": ("Bass", False, True),
                             "S02": ("Strings (continued)", False, True)}},
    "validation": {"Track01501": {"S00": ("Organ", False, True), "S01": ("Drums", True, True)}},
    "test": {"Track01876": {"S00": ("Bass", False, True), "S01": ("Reed", False, True)}},
}


def write_slakh(root: Path) -> tp.Dict[str, tp.Dict[str, np.ndarray]]:
    """Write a tiny Slakh2100 (mono FLAC stems, mix.flac, metadata.yaml); {track: {stem: audio}}."""
    written: tp.Dict[str, tp.Dict[str, np.ndarray]] = {}
    seed = 0
    for split, tracks in SLAKH_TRACKS.items():
        for name, stems in tracks.items():
            folder = root / split / name
            (folder / "stems").mkdir(parents=True)
            (folder / "MIDI").mkdir()
            written[name] = {}
            metadata = {"UUID": name, "normalized": True, "stems": {}}
            for stem, (inst_class, is_drum, rendered) in stems.items():
                metadata["stems"][stem] = {"inst_class": inst_class, "is_drum": is_drum, "audio_rendered": rendered,
                                           "program_num": 0, "midi_program_name": "x", "plugin_name": "y.nkm"}
                if rendered:
                    audio = tone(seed, 1)
                    seed += 1
                    sf.write(folder / "stems" / f"{stem}.flac", audio.T, SR, subtype="PCM_24")
                    written[name][stem], _ = sf.read(folder / "stems" / f"{stem}.flac", dtype="float32", always_2d=True)
                    written[name][stem] = written[name][stem].T
            mix = sum(written[name].values())
            sf.write(folder / "mix.flac", mix.T, SR, subtype="PCM_24")
            (folder / "metadata.yaml").write_text(yaml.safe_dump(metadata))
    return written


def slakh_config(root: Path, **overrides: tp.Any) -> DatasetConfig:
    values = {"kind": "slakh", "root": str(root), "sources": ["drums", "bass", "guitar", "piano", "other"],
              "samplerate": SR, "channels": 1, "valid_tracks": [], "slakh": SlakhSpec(**overrides.pop("slakh", {}))}
    values.update(overrides)
    return DatasetConfig(**values)


def test_slakh_splits_classes_and_unrendered_stems(tmp_path):
    written = write_slakh(tmp_path / "slakh")
    data = build(slakh_config(tmp_path / "slakh"), tmp_path)
    assert [t.name for t in data.train.tracks] == ["Track00001", "Track00002"]
    assert [t.name for t in data.valid.tracks] == ["Track01501"]
    assert [t.name for t in data.test.tracks] == ["Track01876"]
    one = written["Track00001"]
    got = sources_of(data.train.tracks[0])
    np.testing.assert_allclose(got["piano"], one["S00"], atol=1e-6)
    np.testing.assert_allclose(got["drums"], one["S02"], atol=1e-6)
    np.testing.assert_allclose(got["guitar"], 0)  # S03 was not rendered
    np.testing.assert_allclose(got["other"], one["S04"], atol=1e-6)
    two = sources_of(data.train.tracks[1])
    np.testing.assert_allclose(two["other"], written["Track00002"]["S02"], atol=1e-6)
    assert data.train.tracks[0].mixture is not None  # nothing left out: mix.flac is the mixture
    _, mixture, stems = data.test[0]
    np.testing.assert_allclose(mixture.numpy(), stems.sum(0).numpy(), atol=1e-4)


def test_slakh_mapping_left_out_classes_and_stereo_conversion(tmp_path):
    written = write_slakh(tmp_path / "slakh")
    dset = slakh_config(tmp_path / "slakh", sources=["drums", "bass", "keys"], channels=2,
                        slakh={"mapping": {"organ": "keys", "piano": "keys"}, "rest": None})
    data = build(dset, tmp_path)
    valid = data.valid.tracks[0]
    _, mixture, stems = data.valid[0]
    assert stems.shape == (3, 2, FRAMES)
    np.testing.assert_allclose(stems[2, 0].numpy(), written["Track01501"]["S00"][0], atol=1e-6)
    _, mixture, stems = data.test[0]  # the reed is left out: the mixture is the sum of the sources, not mix.flac
    np.testing.assert_allclose(mixture.numpy(), stems.sum(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(stems[1, 0].numpy(), written["Track01876"]["S00"][0], atol=1e-6)
    assert valid.channels == 2


def test_slakh_valid_tracks_is_a_stable_subset(tmp_path):
    root = tmp_path / "slakh"
    write_slakh(root)
    names = [f"Track{number:05d}" for number in range(1501, 1511)]
    for name in names[1:]:
        shutil.copytree(root / "validation" / "Track01501", root / "validation" / name)
    assert [t.name for t in build(slakh_config(root), tmp_path).valid.tracks] == names  # null: all
    chosen = [t.name for t in build(slakh_config(root, slakh={"valid_tracks": 3}), tmp_path).valid.tracks]
    assert len(chosen) == 3 and chosen == sorted(chosen) and chosen != names[:3]  # not simply the first ones
    # The same tracks in every build (each epoch and resume builds the datasets again), in the
    # split blend and evaluation use, and after removing a track that was not chosen.
    assert [t.name for t in build(slakh_config(root, slakh={"valid_tracks": 3}), tmp_path).valid.tracks] == chosen
    split = build_valid_split(slakh_config(root, slakh={"valid_tracks": 3}), samplerate=SR, channels=1,
                              base_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert [t.name for t in split.dataset.tracks] == chosen
    shutil.rmtree(root / "validation" / next(name for name in names if name not in chosen))
    data = build(slakh_config(root, slakh={"valid_tracks": 3}), tmp_path)
    assert [t.name for t in data.valid.tracks] == chosen
    assert [t.name for t in data.test.tracks] == ["Track01876"]  # the test split stays whole
    assert len(build(slakh_config(root, slakh={"valid_tracks": 50}), tmp_path).valid.tracks) == 9
    expect_error(lambda: SlakhSpec(valid_tracks=0), "dset.slakh.valid_tracks=0", "null for all")


def test_slakh_errors(tmp_path):
    root = tmp_path / "slakh"
    write_slakh(root)
    (root / "validation").rename(root / "valid")
    expect_error(lambda: build(slakh_config(root), tmp_path), str(root / "validation"), "no validation/ folder")
    (root / "valid").rename(root / "validation")
    expect_error(lambda: build(slakh_config(root, slakh={"mapping": {"Keys": "piano"}}), tmp_path),
                 "dset.slakh.mapping", "unknown inst_class 'keys'", "Chromatic Percussion", "Synth Lead")
    expect_error(lambda: build(slakh_config(root, sources=["vocals", "drums", "bass", "other"]), tmp_path),
                 "Slakh2100", "vocals", "missing=silent")
    data = build(slakh_config(root, sources=["vocals", "drums", "bass", "other"], missing="silent"), tmp_path)
    assert float(data.valid[0][2][0].abs().max()) == 0
    track = root / "train" / "Track00002"
    sf.write(track / "stems" / "S01.flac", np.zeros(FRAMES - 5), SR)
    expect_error(lambda: build(slakh_config(root), tmp_path), str(track / "stems" / "S01.flac"), str(FRAMES - 5),
                 "same length")
    (track / "stems" / "S01.flac").unlink()
    expect_error(lambda: build(slakh_config(root), tmp_path), "no audio file for stem S01", "rendered")
    (track / "metadata.yaml").unlink()
    expect_error(lambda: build(slakh_config(root), tmp_path), str(track), "no metadata.yaml")


def test_slakh_short_mix_is_named(tmp_path):
    root = tmp_path / "slakh"
    write_slakh(root)
    mix = root / "test" / "Track01876" / "mix.flac"
    sf.write(mix, np.zeros(FRAMES // 2), SR)
    expect_error(lambda: build(slakh_config(root), tmp_path), "Track01876", "same length")
    assert os.path.exists(mix)


# A tiny `dora run` per layout (in this process), longer tracks so that 1 s segments fit.


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["moisesdb", "slakh"])
def test_a_tiny_training_run_per_layout(layout, tmp_path, in_process, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "FRAMES", 2 * SR)
    root = tmp_path / layout
    if layout == "moisesdb":
        write_moisesdb(root)
        args = ["dset=moisesdb", "dset.moisesdb.valid=[1b-song]", "dset.moisesdb.test=[2c-song]"]
    else:
        write_slakh(root)
        args = ["dset=slakh", "dset.slakh.valid_tracks=1"]
    assert in_process(*args, f"dset.root={root}", f"dset.samplerate={SR}", *TINY_SOLVER, "epochs=1",
                      "valid.segment=1.0", "model.bandwidth=3000") == 0
    history, = json.loads(next((tmp_path / "outputs" / "xps").iterdir()).joinpath("history.json").read_text())
    assert np.isfinite(history["train"]["loss"]) and "nsdr" in history["valid"]
