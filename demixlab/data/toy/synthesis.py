"""What a toy track is: the dataset spec, the per-track seeds, and the synthesis of its four stems."""
from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import numpy as np

from ...errors import DemixError
from .dsp import active_rms
from .instruments import bass_stem, drums_stem, other_stem, vocals_stem
from .plan import make_plan

TOY_SOURCES = ("drums", "bass", "other", "vocals")
SPLITS = ("train", "valid", "test")
PEAK = 0.9  # no stem and no mixture sample exceeds this

_REF_RMS = 0.06  # loudness of a stem (while it plays) before its random +-6 dB level


@dataclass
class ToySpec:
    """What to generate: tracks per split, their durations, the seed and the sample rate.

    Also the schema of the `dset.toy` options, whose sample rate is `dset.samplerate`.
    """

    seed: int = 0
    train_tracks: int = 12
    valid_tracks: int = 2
    test_tracks: int = 3
    train_duration: float = 12.0  # seconds per training track
    eval_duration: float = 10.0  # seconds per valid/test track
    samplerate: int = 44100

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise DemixError(f"dset.toy.seed must be >= 0, got {self.seed}")
        for name in ("train_tracks", "valid_tracks", "test_tracks"):
            if getattr(self, name) < 0:
                raise DemixError(f"dset.toy.{name} must be >= 0, got {getattr(self, name)}")
        if not (self.train_duration > 0 and self.eval_duration > 0):
            raise DemixError("dset.toy.train_duration and dset.toy.eval_duration must be > 0 seconds")
        if self.samplerate < 8000:
            raise DemixError(f"the toy dataset needs a sample rate of at least 8000 Hz, got {self.samplerate}")

    def split(self, split: str) -> tp.Tuple[int, float]:
        """Number of tracks and seconds per track of `split` (train, valid or test)."""
        if split == "train":
            return self.train_tracks, self.train_duration
        if split == "valid":
            return self.valid_tracks, self.eval_duration
        if split == "test":
            return self.test_tracks, self.eval_duration
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")


def track_seed(seed: int, split: str, index: int) -> int:
    """Seed of track `index` of `split`, derived from the spec seed (distinct for every track)."""
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(SPLITS.index(split), index))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def mix_stems(stems: tp.Mapping[str, np.ndarray]) -> np.ndarray:
    """The mixture: float32 sum of the stems, added in :data:`TOY_SOURCES` order."""
    mixture = np.zeros_like(stems[TOY_SOURCES[0]])
    for name in TOY_SOURCES:
        mixture = mixture + stems[name]
    return mixture


def synthesize_track(seed: int, duration: float, samplerate: int = 44100) -> tp.Dict[str, np.ndarray]:
    """The four stems of one track, each float32 (2, T).

    T = round(duration * samplerate). Stems are scaled together so that neither they nor their
    sum exceed :data:`PEAK`.
    """
    streams = [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(6)]
    plan = make_plan(streams[0], duration, samplerate)
    raw = {
        "drums": drums_stem(plan, streams[1]),
        "bass": bass_stem(plan, streams[2]),
        "other": other_stem(plan, streams[3]),
        "vocals": vocals_stem(plan, streams[4]),
    }
    stems = {}
    for name in TOY_SOURCES:
        rms = active_rms(raw[name])
        gain = _REF_RMS * 10 ** (streams[5].uniform(-6.0, 6.0) / 20) / rms if rms > 0 else 0.0
        stems[name] = (raw[name] * gain).astype(np.float32)
    peak = max(np.abs(mix_stems(stems)).max(), max(np.abs(stem).max() for stem in stems.values()))
    if peak > PEAK:
        # A hair under PEAK so that float32 rounding of the sum cannot cross it.
        scale = np.float32(PEAK * (1 - 1e-6) / peak)
        stems = {name: stem * scale for name, stem in stems.items()}
    return stems
