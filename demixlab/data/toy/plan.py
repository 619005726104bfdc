"""The musical skeleton of a toy track: tempo, key, mode, chord progression, and note types."""
from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import numpy as np

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)


@dataclass(frozen=True)
class Plan:
    """The musical skeleton shared by all instruments of a track."""

    sr: int
    n: int  # samples in the track
    step: float  # seconds per 16th note
    swing: float  # fraction of a 16th by which odd 16ths are late
    bars: int
    tonic: int  # pitch class, 0 = C
    scale: tp.Tuple[int, ...]
    degrees: tp.Tuple[int, ...]  # scale degree of the chord root of each bar
    sevenths: bool

    @property
    def steps(self) -> int:
        """Number of 16th steps that start inside the track."""
        return int(np.ceil(self.n / (self.step * self.sr)))

    @property
    def section_bars(self) -> int:
        """Bars per section (the arrangement changes between sections)."""
        return 2 if self.bars <= 6 else 4

    def sample(self, step: int) -> int:
        """Sample index where 16th step `step` (counted from the start) falls, swing included."""
        return int(round((step + self.swing * (step % 2)) * self.step * self.sr))

    def offset(self, degree: int) -> int:
        """Semitones from the tonic to scale degree `degree` (any integer)."""
        return 12 * (degree // 7) + self.scale[degree % 7]

    def chord(self, bar: int) -> tp.List[int]:
        """Pitch classes of the chord of `bar`, root first."""
        degree = self.degrees[min(bar, self.bars - 1)]
        count = 4 if self.sevenths else 3
        return [(self.tonic + self.offset(degree + 2 * j)) % 12 for j in range(count)]

    def scale_pitches(self, low: int, high: int) -> tp.List[int]:
        """MIDI pitches of the scale between `low` and `high` inclusive."""
        return [p for p in range(low, high + 1) if (p - self.tonic) % 12 in self.scale]


def make_plan(rng: np.random.Generator, duration: float, sr: int) -> Plan:
    """Random tempo, key, mode and a 4-chord progression repeated over the track."""
    step = 60.0 / rng.uniform(80.0, 150.0) / 4
    swing = rng.uniform(0.1, 0.3) if rng.random() < 0.3 else 0.0
    minor = rng.random() < 0.5
    # Diatonic triads without the diminished one (vii in major, ii in minor).
    pool = (2, 3, 4, 5, 6) if minor else (1, 2, 3, 4, 5)
    progression = [0]
    while len(progression) < 4:
        degree = int(pick(rng, pool))
        if degree != progression[-1]:
            progression.append(degree)
    if rng.random() < 0.3:  # some progressions start away from the tonic (vi-IV-I-V...)
        shift = int(rng.integers(1, 4))
        progression = progression[shift:] + progression[:shift]
    n = int(round(duration * sr))
    bars = max(1, int(np.ceil(n / (16 * step * sr))))
    return Plan(sr=sr, n=n, step=step, swing=swing, bars=bars, tonic=int(rng.integers(12)),
                 scale=MINOR if minor else MAJOR, degrees=tuple(progression[b % 4] for b in range(bars)),
                 sevenths=bool(rng.random() < 0.3))


@dataclass(frozen=True)
class Note:
    """A note: onset and held length in samples, MIDI pitch, velocity."""

    start: int
    length: int
    pitch: float
    velocity: float = 1.0


@dataclass(frozen=True)
class Adsr:
    """Amplitude envelope: linear attack, exponential decay to sustain, linear release (seconds)."""

    attack: float
    decay: float
    sustain: float
    release: float


def pick(rng: np.random.Generator, options: tp.Sequence[tp.Any]) -> tp.Any:
    """A uniformly random element of `options` (as the original Python object)."""
    return options[int(rng.integers(len(options)))]
