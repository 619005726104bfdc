"""Weighted mixtures of datasets (`dset.extra`) and unaligned stem mixing (`dset.unaligned`)."""
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from demixlab.data import SegmentDataset, WeightedSegments
from tests.test_data import MUSDB_SOURCES, build, dset_config, expect_error, make_dataset, write_track
from tests.test_layouts import write_slakh
from tests.test_solver import RUN, _history, _resume_matches_an_uninterrupted_run, run_in  # noqa: F401

SEGMENT = 400  # frames of a 0.05 s example at 8 kHz


def window_origin(example: np.ndarray, tracks: tp.Mapping[str, np.ndarray]) -> tp.Set[tp.Tuple[str, int]]:
    """(track, offset) of every window of `tracks` ({name: (C, T)}) that equals `example` (C, SEGMENT)."""
    found = set()
    for name, audio in tracks.items():
        for offset in range(audio.shape[-1] - example.shape[-1] + 1):
            if np.array_equal(audio[:, offset:offset + example.shape[-1]], example):
                found.add((name, offset))
    return found


@pytest.fixture
def two_datasets(tmp_path: Path) -> tp.Tuple[Path, Path]:
    main = make_dataset(tmp_path / "main", train=("a", "b", "c"), valid=("v",), test=("t",))
    extra = tmp_path / "extra" / "train"
    for number, name in enumerate(("x", "y")):
        write_track(extra / name, seed=50 + number)
    return main, tmp_path / "extra"


def test_extra_datasets_add_weighted_examples_and_leave_the_main_ones_unchanged(tmp_path, two_datasets):
    main, extra = two_datasets
    plain = build(dset_config(main), tmp_path, segment=0.05, samples_per_track=2)
    data = build(dset_config(main, extra=[{"kind": "stems", "root": str(extra), "weight": 0.5}]), tmp_path,
                 segment=0.05, samples_per_track=2)
    assert isinstance(data.train, WeightedSegments)
    assert len(data.train) == 6 + 3
    assert [t.name for t in data.valid.tracks] == ["v"] and [t.name for t in data.test.tracks] == ["t"]
    for epoch in (0, 3):
        for index in range(6):  # the main dataset's examples are exactly those without extras
            assert torch.equal(data.train[(epoch, index)], plain.train[(epoch, index)])
    extra_tracks = {name: write_track(tmp_path / "again" / name, seed=50 + number) for number, name in
                    enumerate(("x", "y"))}
    visited = set()
    for epoch in range(3):
        for index in range(6, 9):
            example = data.train[(epoch, index)].numpy()
            assert example.shape == (4, 2, SEGMENT)
            origins = window_origin(example[0], {name: audio[0] for name, audio in extra_tracks.items()})
            assert len(origins) == 1
            (name, offset), = origins
            np.testing.assert_array_equal(example, extra_tracks[name][..., offset:offset + SEGMENT])
            visited.add(name)
    assert visited == {"x", "y"}
    again = build(dset_config(main, extra=[{"kind": "stems", "root": str(extra), "weight": 0.5}]), tmp_path,
                  segment=0.05, samples_per_track=2)
    for index in range(9):
        assert torch.equal(again.train[(2, index)], data.train[(2, index)])


def test_weighted_examples_are_the_same_in_workers(tmp_path, two_datasets):
    main, extra = two_datasets
    dataset = build(dset_config(main, extra=[{"kind": "stems", "root": str(extra), "weight": 1.0}], unaligned=0.5),
                    tmp_path, segment=0.05, samples_per_track=2).train
    items = [(1, index) for index in range(len(dataset))]
    alone = list(DataLoader(items, batch_size=4, collate_fn=lambda batch: torch.stack([dataset[i] for i in batch])))
    loader = DataLoader(dataset, batch_size=4, sampler=items, num_workers=2)
    for left, right in zip(alone, loader):
        assert torch.equal(left, right)


def test_missing_sources_of_an_extra_dataset_are_refused_or_silent(tmp_path, two_datasets):
    main, _ = two_datasets
    partial = tmp_path / "partial"
    write_track(partial / "train" / "p", sources=["drums", "bass"], mixture=False, seed=70)
    entry = {"kind": "stems", "root": str(partial), "weight": 1.0}
    expect_error(lambda: build(dset_config(main, extra=[entry]), tmp_path), str(partial / "train" / "p"),
                 "missing stem 'other'")
    data = build(dset_config(main, extra=[{**entry, "missing": "silent"}]), tmp_path, segment=0.05)
    example = data.train[len(data.train) - 1]
    assert example[:2].abs().sum() > 0 and torch.equal(example[2:], torch.zeros_like(example[2:]))


def test_a_slakh_extra_with_silent_vocals(tmp_path, two_datasets):
    main, _ = two_datasets
    write_slakh(tmp_path / "slakh")
    entry = {"kind": "slakh", "root": str(tmp_path / "slakh"), "weight": 0.5}
    expect_error(lambda: build(dset_config(main, channels=2, extra=[entry]), tmp_path), "vocals", "missing=silent")
    data = build(dset_config(main, extra=[{**entry, "missing": "silent"}]), tmp_path, segment=0.05)
    example = data.train[len(data.train) - 1]  # mono Slakh converted to stereo, no vocals
    assert example.shape == (4, 2, SEGMENT)
    assert torch.equal(example[MUSDB_SOURCES.index("vocals")], torch.zeros(2, SEGMENT))
    assert example.abs().sum() > 0


def test_unaligned_examples_take_each_source_from_some_track(tmp_path):
    root = make_dataset(tmp_path / "data", train=("a", "b", "c"), valid=("v",))
    tracks = {name: write_track(tmp_path / "again" / name, seed=seed) for seed, name in enumerate(("a", "b", "c"))}
    plain = build(dset_config(root), tmp_path, segment=0.05, samples_per_track=4).train
    never = SegmentDataset(plain.tracks, plain.segment_frames, 4, plain.seed, unaligned=0.0)
    always = SegmentDataset(plain.tracks, plain.segment_frames, 4, plain.seed, unaligned=1.0)
    mixed_tracks = 0
    for index in range(len(plain)):
        assert torch.equal(never[(2, index)], plain[(2, index)])
        example = always[(2, index)].numpy()
        names = set()
        for source in range(4):
            origins = window_origin(example[source], {name: audio[source] for name, audio in tracks.items()})
            assert origins, (index, source)
            names |= {name for name, _ in origins}
        mixed_tracks += len(names) > 1
        assert torch.equal(always[(2, index)], torch.from_numpy(example))  # deterministic
    assert mixed_tracks >= len(plain) // 2
    half = SegmentDataset(plain.tracks, plain.segment_frames, 4, plain.seed, unaligned=0.5)
    same = sum(torch.equal(half[(2, index)], plain[(2, index)]) for index in range(len(plain)))
    assert 0 < same < len(plain)


def test_bad_extra_entries_name_the_key(tmp_path, two_datasets):
    main, extra = two_datasets
    expect_error(lambda: dset_config(main, extra=[{"kind": "wav", "root": str(extra)}]), "dset.extra", "kind='wav'")
    expect_error(lambda: dset_config(main, extra=[{"root": str(extra), "weight": 0}]), "dset.extra", "weight=0")
    expect_error(lambda: dset_config(main, extra=[{"root": str(extra), "missing": "zero"}]), "missing='zero'",
                 "refuse, silent")
    expect_error(lambda: dset_config(main, unaligned=1.5), "dset.unaligned=1.5")
    expect_error(lambda: build(dset_config(main, extra=[{"root": str(extra / "nowhere")}]), tmp_path), "dset.root",
                 "nowhere")


@pytest.mark.slow
def test_training_with_an_extra_dataset_and_unaligned_mixing_resumes_exactly(tmp_path, run_in, monkeypatch):
    extra = ("dset.extra=[{kind: toy, weight: 0.5, toy: {seed: 7, train_tracks: 2, valid_tracks: 0, test_tracks: 0,"
             " train_duration: 4.0, eval_duration: 3.0}}]")
    checkpoint = _resume_matches_an_uninterrupted_run(tmp_path, run_in, monkeypatch,
                                                      [*[arg for arg in RUN if not arg.startswith("epochs=")], extra, "dset.unaligned=0.5", "epochs=2"])
    assert len(checkpoint["history"]) == 2
