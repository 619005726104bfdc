"""The built-in synthetic multitrack dataset ("toy"), generated on first use in MUSDB18-HQ layout.

Every track is a short synthesized song: drums, a bass line, a sung-like vocal melody and a chord
accompaniment ("other"), all following one random key, mode, tempo and chord progression. The
audio is a pure function of the seed, so the dataset is regenerated where it is needed instead
of being shipped. Only numpy is used for the signal processing: oscillators are band-limited
wavetables and every filter is a zero-phase magnitude response applied in the STFT domain, which
keeps the whole synthesis vectorised.

Layout: ``ROOT/{train,valid,test}/<track>/{mixture,drums,bass,other,vocals}.wav``, stereo,
32-bit float WAV, with ``mixture`` the exact float32 sum of the stems in :data:`TOY_SOURCES` order.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

logger = logging.getLogger(__name__)

TOY_SOURCES = ("drums", "bass", "other", "vocals")
GENERATOR_VERSION = 1  # bump when the audio changes; part of the cache folder name
SPLITS = ("train", "valid", "test")
PEAK = 0.9  # no stem and no mixture sample exceeds this

_REF_RMS = 0.06  # loudness of a stem (while it plays) before its random +-6 dB level
_STALE_SECONDS = 3600.0  # a temp folder untouched this long belongs to a dead generator
_TEMP_GLOB = ".toy-v*.tmp"


@dataclass(frozen=True)
class ToySpec:
    """What to generate: tracks per split, their durations, the seed and the sample rate."""

    seed: int = 0
    train_tracks: int = 12
    valid_tracks: int = 2
    test_tracks: int = 3
    train_duration: float = 12.0  # seconds per training track
    eval_duration: float = 10.0  # seconds per valid/test track
    samplerate: int = 44100

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("train_tracks", "valid_tracks", "test_tracks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.train_duration > 0 and self.eval_duration > 0):
            raise ValueError("train_duration and eval_duration must be > 0")
        if self.samplerate < 8000:
            raise ValueError(f"samplerate must be >= 8000, got {self.samplerate}")

    def split(self, split: str) -> tp.Tuple[int, float]:
        """Number of tracks and seconds per track of `split` (train, valid or test)."""
        if split == "train":
            return self.train_tracks, self.train_duration
        if split == "valid":
            return self.valid_tracks, self.eval_duration
        if split == "test":
            return self.test_tracks, self.eval_duration
        raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")


def ensure_toy_dataset(spec: ToySpec, cache_root: Path, progress: bool = True) -> Path:
    """Return the dataset root for `spec` under cache_root, generating it first if needed.

    Generation happens in a temporary sibling folder that is renamed into place at the end, so
    the root exists only when complete; concurrent callers each generate and the first rename
    wins. Temp folders left by crashed generators are removed once they are an hour old.
    """
    cache_root = Path(cache_root)
    root = cache_root / toy_dataset_name(spec)
    # The root only ever appears through the atomic rename below: existing means complete.
    if root.is_dir():
        return root
    cache_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache_root)
    total = spec.train_tracks + spec.valid_tracks + spec.test_tracks
    logger.info("Generating the toy dataset (%d tracks) in %s", total, root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=cache_root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset should not be
        _generate(spec, tmp, progress)
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.is_dir():
                raise
            logger.info("Another process generated %s first, using it", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def toy_dataset_name(spec: ToySpec) -> str:
    """Folder name of `spec`'s dataset: generator version plus a short hash of the spec."""
    fields = dataclasses.asdict(spec)
    # 12 and 12.0 must name the same folder, as they give the same audio.
    fields["train_duration"] = float(spec.train_duration)
    fields["eval_duration"] = float(spec.eval_duration)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return f"toy-v{GENERATOR_VERSION}-{digest}"


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
    plan = _make_plan(streams[0], duration, samplerate)
    raw = {
        "drums": _drums(plan, streams[1]),
        "bass": _bass(plan, streams[2]),
        "other": _other(plan, streams[3]),
        "vocals": _vocals(plan, streams[4]),
    }
    stems = {}
    for name in TOY_SOURCES:
        rms = _active_rms(raw[name])
        gain = _REF_RMS * 10 ** (streams[5].uniform(-6.0, 6.0) / 20) / rms if rms > 0 else 0.0
        stems[name] = (raw[name] * gain).astype(np.float32)
    peak = max(np.abs(mix_stems(stems)).max(), max(np.abs(stem).max() for stem in stems.values()))
    if peak > PEAK:
        # A hair under PEAK so that float32 rounding of the sum cannot cross it.
        scale = np.float32(PEAK * (1 - 1e-6) / peak)
        stems = {name: stem * scale for name, stem in stems.items()}
    return stems


# --------------------------------------------------------------------------- dataset files

def _generate(spec: ToySpec, out: Path, progress: bool) -> None:
    """Write every track of `spec` under `out`."""
    jobs = []
    for split in SPLITS:
        (out / split).mkdir()
        count, duration = spec.split(split)
        jobs += [(split, index, duration) for index in range(count)]

    def write(job: tp.Tuple[str, int, float]) -> None:
        split, index, duration = job
        stems = synthesize_track(track_seed(spec.seed, split, index), duration, spec.samplerate)
        folder = out / split / f"toy_{split}_{index:03d}"
        folder.mkdir()
        for name, wav in [("mixture", mix_stems(stems)), *stems.items()]:
            _write_wav(folder / f"{name}.wav", wav, spec.samplerate)

    # numpy releases the GIL in its heavy loops, so threads give most of a second core.
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for _ in tqdm(pool.map(write, jobs), total=len(jobs), desc="toy dataset", unit="track",
                      disable=not progress):
            pass


def _write_wav(path: Path, wav: np.ndarray, samplerate: int) -> None:
    """Write (channels, time) float32 audio as a 32-bit float WAV, byte-identical for equal input."""
    with sf.SoundFile(str(path), "w", samplerate, wav.shape[0], subtype="FLOAT", format="WAV") as handle:
        # libsndfile adds a PEAK chunk holding the time of writing to float WAVs; turn it off
        # (SFC_SET_ADD_PEAK_CHUNK, 0x1050 in sndfile.h) so files do not depend on the clock.
        snd = getattr(sf, "_snd", None)
        if snd is not None:
            snd.sf_command(handle._file, 0x1050, sf._ffi.NULL, 0)
        handle.write(wav.T)


def _remove_stale_temps(cache_root: Path) -> None:
    """Delete temp folders of generators that died (nothing in them changed for an hour)."""
    now = time.time()
    for folder in cache_root.glob(_TEMP_GLOB):
        try:
            newest = max([folder.stat().st_mtime] + [
                os.stat(os.path.join(parent, name)).st_mtime
                for parent, dirs, files in os.walk(folder) for name in dirs + files])
        except OSError:  # vanished meanwhile: its generator just finished
            continue
        if now - newest > _STALE_SECONDS:
            logger.info("Removing the stale temporary folder %s", folder)
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- musical plan

_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)


@dataclass(frozen=True)
class _Plan:
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


def _make_plan(rng: np.random.Generator, duration: float, sr: int) -> _Plan:
    """Random tempo, key, mode and a 4-chord progression repeated over the track."""
    step = 60.0 / rng.uniform(80.0, 150.0) / 4
    swing = rng.uniform(0.1, 0.3) if rng.random() < 0.3 else 0.0
    minor = rng.random() < 0.5
    # Diatonic triads without the diminished one (vii in major, ii in minor).
    pool = (2, 3, 4, 5, 6) if minor else (1, 2, 3, 4, 5)
    progression = [0]
    while len(progression) < 4:
        degree = int(_pick(rng, pool))
        if degree != progression[-1]:
            progression.append(degree)
    if rng.random() < 0.3:  # some progressions start away from the tonic (vi-IV-I-V...)
        shift = int(rng.integers(1, 4))
        progression = progression[shift:] + progression[:shift]
    n = int(round(duration * sr))
    bars = max(1, int(np.ceil(n / (16 * step * sr))))
    return _Plan(sr=sr, n=n, step=step, swing=swing, bars=bars, tonic=int(rng.integers(12)),
                 scale=_MINOR if minor else _MAJOR, degrees=tuple(progression[b % 4] for b in range(bars)),
                 sevenths=bool(rng.random() < 0.3))


# --------------------------------------------------------------------------- drums

# kick steps, optional kick steps, snare steps, hi-hat pattern
_GROOVES = {
    "rock": ((0, 8), (6, 10, 14), (4, 12), "eighths"),
    "four": ((0, 4, 8, 12), (7, 14), (4, 12), "offbeat"),
    "halftime": ((0, 10), (3, 6, 14), (8,), "sixteenths"),
    "break": ((0, 10), (3, 7, 13), (4, 12), "eighths"),
}
_FILL_PIECES = ("snare", "tom_high", "tom_mid", "tom_low")


def _drums(plan: _Plan, rng: np.random.Generator) -> np.ndarray:
    """Drum kit stem (2, n): one-shot samples placed on a varied 16-step pattern."""
    kit = _drum_kit(plan.sr, rng)
    out = np.zeros((2, plan.n))
    for step, piece, velocity in _drum_hits(plan, rng):
        sounds, pan = kit[piece]
        sound = sounds[int(rng.integers(len(sounds)))]
        start = max(0, plan.sample(step) + int(rng.normal(0.0, 0.0015) * plan.sr))
        _add(out, start, (velocity * _pan_gains(pan))[:, None] * sound)
    return out


def _drum_hits(plan: _Plan, rng: np.random.Generator) -> tp.List[tp.Tuple[int, str, float]]:
    """(step, piece, velocity) of every hit: a groove with per-bar variation, ghosts and fills."""
    kicks, extra_kicks, snares, hats = _GROOVES[_pick(rng, sorted(_GROOVES))]
    kicks = set(kicks) | {int(s) for s in rng.choice(extra_kicks, size=int(rng.integers(0, 2)), replace=False)}
    ghost_rate = rng.uniform(0.0, 0.12)
    open_rate = rng.uniform(0.0, 0.4)
    hits = []
    for bar in range(plan.bars):
        base = 16 * bar
        bar_kicks = set(kicks)
        if rng.random() < 0.2:
            bar_kicks.add(int(_pick(rng, extra_kicks)))
        section_start = bar % plan.section_bars == 0
        fill_from = 16
        if bar % plan.section_bars == plan.section_bars - 1 and rng.random() < 0.7:
            fill_from = int(_pick(rng, (8, 12)))
        crash = section_start and rng.random() < (0.7 if bar > 0 else 0.3)
        for s in range(fill_from):
            if s in bar_kicks and (s == 0 or rng.random() > 0.03):
                hits.append((base + s, "kick", 1.0))
            if s in snares and rng.random() > 0.03:
                hits.append((base + s, "snare", 0.9))
            elif s not in bar_kicks and rng.random() < ghost_rate:
                hits.append((base + s, "snare", rng.uniform(0.12, 0.3)))
            if s == 0 and crash:
                hits.append((base, "crash", 0.6))
                continue
            accent = 1.0 if s % 4 == 0 else 0.75 if s % 2 == 0 else 0.55
            if hats == "offbeat":
                if s % 4 == 2:
                    hits.append((base + s, "hat_open", 0.45))
                elif s % 4 == 0:
                    hits.append((base + s, "hat", 0.35))
            elif (hats == "sixteenths" or s % 2 == 0) and rng.random() > 0.05:
                is_open = s == 14 and rng.random() < open_rate
                hits.append((base + s, "hat_open" if is_open else "hat", (0.4 if is_open else 0.5) * accent))
        if fill_from < 16:
            rate = int(_pick(rng, (1, 2)))
            steps = list(range(fill_from, 16, rate))
            roll = rng.random() < 0.4
            hits.append((base + fill_from, "kick", 1.0))
            for i, s in enumerate(steps):
                piece = "snare" if roll else _FILL_PIECES[i * len(_FILL_PIECES) // len(steps)]
                hits.append((base + s, piece, 0.5 + 0.45 * i / len(steps)))
    return [(step, piece, velocity * float(np.exp(rng.normal(0.0, 0.08)))) for step, piece, velocity in hits]


def _drum_kit(sr: int, rng: np.random.Generator) -> tp.Dict[str, tp.Tuple[tp.List[np.ndarray], float]]:
    """One-shot samples (a few variants of the noisy ones) and the stereo pan of each piece."""
    kick_end, kick_start = rng.uniform(42.0, 62.0), rng.uniform(110.0, 220.0)
    kick_sweep, kick_decay, drive = rng.uniform(0.015, 0.05), rng.uniform(0.12, 0.3), rng.uniform(1.0, 3.0)
    snare_tone, snare_low = rng.uniform(160.0, 250.0), rng.uniform(700.0, 1500.0)
    snare_high = min(rng.uniform(5000.0, 9000.0), 0.45 * sr)
    snare_decay, snappy = rng.uniform(0.08, 0.16), rng.uniform(0.5, 0.8)
    metal = rng.uniform(300.0, 500.0) * np.array([1.0, 1.4471, 1.617, 1.9265, 2.5028, 2.6637])
    hat_cut = min(rng.uniform(6000.0, 9000.0), 0.4 * sr)
    hat_metal = rng.uniform(0.1, 0.5)
    hat_decay, open_decay = rng.uniform(0.015, 0.04), rng.uniform(0.12, 0.3)
    toms = rng.uniform(80.0, 110.0) * np.array([1.0, 1.35, 1.8])
    tom_decay = rng.uniform(0.15, 0.3)
    hat_pan = rng.uniform(0.2, 0.5) * (1 if rng.random() < 0.5 else -1)

    # Variants of the noisy pieces are cut at different offsets from one filtered noise "bank".
    t = _time(1.5, sr)
    cycles = metal[:, None] * t + rng.uniform(0.0, 1.0, (len(metal), 1))
    squares = np.where(cycles % 1.0 < 0.5, 1.0, -1.0).mean(axis=0)  # like the 808: six detuned squares
    cymbal = rng.normal(size=t.size)
    hats = _fft_filter((1 - hat_metal) * cymbal + hat_metal * squares, sr, lambda f: _highpass(f, hat_cut, 3))
    crash = _fft_filter(0.7 * cymbal + 0.3 * squares, sr, lambda f: _highpass(f, 0.6 * hat_cut, 3))
    snares = _fft_filter(rng.normal(size=int(1.1 * sr)), sr,
                         lambda f: _highpass(f, snare_low, 2) * _lowpass(f, snare_high, 2))
    snares /= np.abs(snares).max()

    def cut(bank: np.ndarray, start: float, seconds: float, decay: float) -> np.ndarray:
        begin = int(start * sr)
        return _fade_out(bank[begin:begin + int(seconds * sr)] * np.exp(-t[:int(seconds * sr)] / decay))

    def kick() -> np.ndarray:
        k = t[:int(0.8 * sr)]
        freq = kick_end + (kick_start - kick_end) * np.exp(-k / kick_sweep)
        body = np.tanh(drive * np.sin(2 * np.pi * np.cumsum(freq) / sr)) / np.tanh(drive)
        click = 0.3 * snares[:k.size] * np.exp(-k / 0.003)
        return _fade_out(body * np.exp(-k / kick_decay) + click)

    def snare(start: float) -> np.ndarray:
        k = t[:int(0.35 * sr)]
        body = (np.sin(2 * np.pi * snare_tone * k) + 0.5 * np.sin(2 * np.pi * 1.6 * snare_tone * k)) / 1.5
        return (1 - snappy) * _fade_out(body * np.exp(-k / 0.045)) + snappy * cut(snares, start, 0.35, snare_decay)

    def tom(pitch: float) -> np.ndarray:
        k = t[:int(0.6 * sr)]
        freq = pitch * (1 + 0.4 * np.exp(-k / 0.03))
        x = np.sin(2 * np.pi * np.cumsum(freq) / sr) + 0.1 * snares[:k.size] * np.exp(-k / 0.01)
        return _fade_out(x * np.exp(-k / tom_decay))

    return {
        "kick": ([kick()], 0.0),
        "snare": ([snare(start) for start in (0.0, 0.37, 0.74)], rng.uniform(-0.15, 0.15)),
        "hat": ([cut(hats, start, 0.15, hat_decay) for start in (0.0, 0.2, 0.4, 0.6)], hat_pan),
        "hat_open": ([cut(hats, start, 0.6, open_decay) for start in (0.8, 0.85)], hat_pan),
        "crash": ([cut(crash, 0.0, 1.5, rng.uniform(0.6, 1.2))], -hat_pan),
        "tom_high": ([tom(toms[2])], 0.4),
        "tom_mid": ([tom(toms[1])], 0.0),
        "tom_low": ([tom(toms[0])], -0.4),
    }


# --------------------------------------------------------------------------- bass

@dataclass(frozen=True)
class _Note:
    """A note: onset and held length in samples, MIDI pitch, velocity."""

    start: int
    length: int
    pitch: float
    velocity: float = 1.0


@dataclass(frozen=True)
class _Adsr:
    """Amplitude envelope: linear attack, exponential decay to sustain, linear release (seconds)."""

    attack: float
    decay: float
    sustain: float
    release: float


_BASS_PATTERNS = {
    "eighths": (0, 2, 4, 6, 8, 10, 12, 14),
    "quarters": (0, 4, 8, 12),
    "synco": (0, 3, 6, 8, 11, 14),
    "pushed": (0, 6, 10, 12),
    "long": (0, 8),
}


def _bass(plan: _Plan, rng: np.random.Generator) -> np.ndarray:
    """Bass stem (2, n): root/fifth/octave lines on the chord roots, a filtered saw or square."""
    low = 28 + (plan.tonic - 4) % 12  # the tonic between E1 and D#2 (41-78 Hz)
    steps = _BASS_PATTERNS[_pick(rng, sorted(_BASS_PATTERNS))]
    gate = rng.uniform(0.55, 0.95)
    notes = []
    for bar in range(plan.bars):
        root = low + plan.offset(plan.degrees[bar])
        octave = root + 12 if root + 12 <= 55 else root - 12 if root >= 40 else root + 7
        choices, weights = (root, root + 7, octave), (0.6, 0.2, 0.2)
        for i, s in enumerate(steps):
            pitch = root if i == 0 else int(rng.choice(choices, p=weights))
            end = steps[i + 1] if i + 1 < len(steps) else 16
            if i == len(steps) - 1 and bar + 1 < plan.bars and rng.random() < 0.35:
                pitch = _approach(plan, low + plan.offset(plan.degrees[bar + 1]), rng)
            start = plan.sample(16 * bar + s)
            notes.append(_Note(start, max(1, int(gate * (plan.sample(16 * bar + end) - start))), pitch,
                               rng.uniform(0.85, 1.0)))
    shape = _square if rng.random() < 0.4 else _saw
    sub = rng.uniform(0.0, 1.0)

    def harmonics(count: int) -> np.ndarray:
        amps = shape(count)
        amps[0] *= 1 + sub  # a stronger fundamental, like a sub oscillator
        return amps

    env = _Adsr(rng.uniform(0.003, 0.012), rng.uniform(0.1, 0.4), rng.uniform(0.5, 0.9), rng.uniform(0.03, 0.08))
    wav = np.zeros((1, plan.n))
    _render_voice(wav, np.ones(1), notes, plan, rng, harmonics, env)
    onsets = np.array([note.start for note in notes]) / plan.sr
    cutoff = _envelope_cutoff(onsets, rng.uniform(150.0, 300.0), rng.uniform(1.0, 4.0), rng.uniform(0.04, 0.2))
    wav = _stft_filter(wav, plan.sr, lambda times, freqs: _lowpass(freqs, cutoff(times)[:, None], 2))
    return _pan(wav[0], rng.uniform(-0.1, 0.1))


def _approach(plan: _Plan, target: int, rng: np.random.Generator) -> int:
    """A scale tone next to `target` (a passing note leading into the next chord)."""
    below = plan.scale_pitches(target - 3, target - 1)
    above = plan.scale_pitches(target + 1, target + 3)
    return below[-1] if rng.random() < 0.5 or not above else above[0]


# --------------------------------------------------------------------------- vocals

# Formant frequencies (Hz) and relative amplitudes of /a/ /e/ /i/ /o/ /u/ (adult averages).
_VOWEL_FORMANTS = np.array([
    [730.0, 1090.0, 2440.0, 3400.0],
    [530.0, 1840.0, 2480.0, 3500.0],
    [300.0, 2290.0, 3010.0, 3700.0],
    [570.0, 840.0, 2410.0, 3300.0],
    [320.0, 870.0, 2240.0, 3300.0],
])
_VOWEL_AMPS = np.array([  # brighter than speech averages: sung voices are mixed with presence
    [1.0, 0.7, 0.45, 0.3],
    [1.0, 0.55, 0.45, 0.3],
    [1.0, 0.45, 0.5, 0.3],
    [1.0, 0.7, 0.3, 0.2],
    [1.0, 0.45, 0.2, 0.15],
])
_FORMANT_BANDWIDTHS = np.array([80.0, 100.0, 130.0, 170.0])


def _vocals(plan: _Plan, rng: np.random.Generator) -> np.ndarray:
    """Vocal stem (2, n): a glottal pulse train following a melody through moving vowel formants.

    Phrases are separated by rests of exact silence.
    """
    sr, n = plan.sr, plan.n
    center = int(rng.integers(57, 65))
    pitches = plan.scale_pitches(max(center - 8, 52), min(center + 9, 74))
    phrases = _melody(plan, rng, pitches)
    glide_time, vib_depth, vib_rate = rng.uniform(0.03, 0.09), rng.uniform(0.15, 0.45), rng.uniform(5.0, 7.0)
    vib_delay, breath = rng.uniform(0.15, 0.3), rng.uniform(0.01, 0.04)
    tract = rng.uniform(1.0, 1.1) + 0.01 * (center - 57)  # higher voices have higher formants

    # Pitch (MIDI) and vibrato depth at a control rate of sr / 32, plenty for glides and vibrato.
    control = np.arange(n // 32 + 2) * 32
    pitch = np.full(control.size, float(pitches[len(pitches) // 2]))
    vib_env = np.zeros(control.size)
    amp, inhale = np.zeros(n), np.zeros(n)
    starts, vowels = [], []
    previous_end = 0
    for phrase in phrases:
        onset = plan.sample(phrase[0][0])
        gap = (onset - previous_end) / sr
        if gap > 0.5 and rng.random() < 0.5:
            length = int(rng.uniform(0.2, 0.35) * sr)
            _put(inhale, onset - length - int(0.08 * sr), rng.uniform(0.3, 1.0) * np.hanning(length))
        level, previous = 0.0, phrase[0][2] - rng.uniform(0.3, 1.0)  # the first note is scooped into
        phrase_gain = rng.uniform(0.75, 1.0)
        for k, (s0, s1, midi, vowel) in enumerate(phrase):
            a, b = plan.sample(s0), plan.sample(s1)
            last = k == len(phrase) - 1
            legato_next = not last and phrase[k + 1][3] == vowel
            after = 0.0 if last else rng.uniform(0.85, 1.0) if legato_next else rng.uniform(0.3, 0.6)
            release = int(rng.uniform(0.08, 0.16) * sr) if last else 0
            held = (b - a) / sr
            t = np.arange(b - a + release) / sr
            attack = min(rng.uniform(0.025, 0.06), held / 3)
            fall = held if last else held - min(0.03, held / 3)
            shape = np.interp(t, [0.0, attack, fall, t[-1] + 1 / sr], [level, 1.0, rng.uniform(0.75, 0.95), after])
            _put(amp, a, phrase_gain * shape)
            # Later notes overwrite the control points they share with this one.
            span = slice(a // 32, (b + release) // 32 + 2)
            since = (control[span] - a) / sr
            glide = _smoothstep(np.clip(since / glide_time, 0.0, 1.0))
            pitch[span] = previous + (midi - previous) * glide
            vib_env[span] = np.clip((since - vib_delay) / 0.25, 0.0, 1.0) if held > vib_delay + 0.1 else 0.0
            starts.append(a)
            vowels.append(vowel)
            level, previous = after, midi
        previous_end = plan.sample(phrase[-1][1])

    seconds = control / sr
    knots = np.arange(0.0, seconds[-1] + 0.3, 0.15)
    drift = np.interp(seconds, knots, rng.normal(0.0, 0.07, knots.size))  # slow pitch wander
    vibrato = vib_depth * vib_env * np.sin(2 * np.pi * vib_rate * seconds + rng.uniform(0, 2 * np.pi))
    freq = np.interp(np.arange(n), control, 440.0 * 2 ** ((pitch + drift + vibrato - 69) / 12))
    harmonics = max(1, int(0.45 * sr / (440.0 * 2 ** ((max(pitches) + 1.5 - 69) / 12))))
    table = _glottal_table(harmonics, rng.uniform(0.35, 0.45), rng.uniform(0.1, 0.2))
    source = _oscillator(table, freq, sr, rng.uniform()) * amp
    noisy = np.flatnonzero(amp + inhale)
    source[noisy] += rng.standard_normal(noisy.size) * (breath * amp[noisy] + 0.03 * inhale[noisy])

    # Formants per 10 ms: the vowel of the sounding note, smoothed so vowels glide (70 ms).
    formant_times = np.arange(0.0, n / sr + 0.02, 0.01)
    note = np.clip(np.searchsorted(np.array(starts), formant_times * sr, side="right") - 1, 0, None)
    vowel = np.array(vowels, dtype=int)[note] if vowels else np.zeros(formant_times.size, dtype=int)
    formant_track = _smooth_rows(_VOWEL_FORMANTS[vowel] * tract, 7)
    amp_track = _smooth_rows(_VOWEL_AMPS[vowel], 7)
    tilt = rng.uniform(0.0, 0.4)

    def formant_gain(times: np.ndarray, freqs: np.ndarray) -> np.ndarray:
        def at(track: np.ndarray) -> np.ndarray:
            columns = [np.interp(times, formant_times, track[:, i]) for i in range(track.shape[1])]
            return np.stack(columns, axis=1).astype(np.float32)[:, :, None]

        formants, amps = at(formant_track), at(amp_track)
        # Resonances are only evaluated up to 6 kHz, then extended with a -12 dB/octave slope.
        limit = int(np.searchsorted(freqs, 6000.0))
        low = freqs[:limit]
        q = formants / (_FORMANT_BANDWIDTHS[:, None] * tract).astype(np.float32)
        x = np.square(low / formants)
        gain = np.empty((len(times), len(freqs)), dtype=np.float32)
        gain[:, :limit] = (amps / np.sqrt(np.square(q * (1 - x)) + x)).sum(axis=1)
        # A broad low "body" so the fundamental is not lost below the first formant.
        gain[:, :limit] += 0.15 / (1 + np.square(low / formants[:, 0]))
        gain[:, limit:] = gain[:, limit - 1:limit] * np.square(low[-1] / freqs[limit:])
        return gain * (_highpass(freqs, 90.0, 2) * (1 + np.square(freqs / 2500.0)) ** (-tilt / 2))

    wav = _stft_filter(source[None], sr, formant_gain)[0]
    return _pan(wav, rng.uniform(-0.15, 0.15))


def _melody(plan: _Plan, rng: np.random.Generator,
            pitches: tp.List[int]) -> tp.List[tp.List[tp.Tuple[int, int, int, int]]]:
    """Phrases of (start step, end step, MIDI pitch, vowel) notes, separated by rests.

    The pitch walks the scale by steps and small leaps, and lands on chord tones on strong beats.
    A repeated vowel marks a melisma (one syllable over several notes).
    """
    total = plan.steps
    pos = min(int(rng.integers(2, 9)), total // 4)
    index = len(pitches) // 2
    phrases = []
    while pos < total or not phrases:
        end = min(pos + int(_pick(rng, (8, 12, 16, 24, 32))), max(total, pos + 2))
        phrase = []
        vowel = int(rng.integers(len(_VOWEL_FORMANTS)))
        while pos < end:
            length = min(int(_pick(rng, (2, 2, 3, 4, 4, 6, 8))), end - pos)
            chord = plan.chord(pos // 16)
            tones = [i for i, p in enumerate(pitches) if p % 12 in chord]
            move = rng.random()
            if move < 0.25 or (pos % 8 == 0 and rng.random() < 0.6):
                index = min(tones, key=lambda i: (abs(i - index), i))
            else:
                index += int(_pick(rng, (-1, 1) if move < 0.8 else (-2, 2)))
                index = abs(index) if index < 0 else 2 * (len(pitches) - 1) - index if index >= len(pitches) else index
            if rng.random() > 0.3:
                vowel = int(rng.integers(len(_VOWEL_FORMANTS)))
            phrase.append((pos, pos + length, pitches[index], vowel))
            pos += length
        phrases.append(phrase)
        pos = end + int(_pick(rng, (4, 6, 8, 12, 16)))
    return phrases


def _glottal_table(harmonics: int, open_phase: float, close_phase: float) -> np.ndarray:
    """Band-limited wavetable of the Rosenberg glottal flow derivative (its first `harmonics`)."""
    grid = np.arange(8192) / 8192
    closing = (grid >= open_phase) & (grid < open_phase + close_phase)
    pulse = np.where(grid < open_phase, np.pi / (2 * open_phase) * np.sin(np.pi * grid / open_phase), 0.0)
    pulse[closing] = -np.pi / (2 * close_phase) * np.sin(np.pi * (grid[closing] - open_phase) / (2 * close_phase))
    return _wavetable(np.fft.rfft(pulse)[1:harmonics + 1])


# --------------------------------------------------------------------------- other

def _other(plan: _Plan, rng: np.random.Generator) -> np.ndarray:
    """Accompaniment stem (2, n): the chords, with two textures alternating by section."""
    names = sorted(_TEXTURES)
    first, second = rng.choice(len(names), size=2, replace=False)
    center = int(rng.integers(55, 63))
    out = np.zeros((2, plan.n))
    for i, name in enumerate((names[first], names[second])):
        bars = [bar for bar in range(plan.bars) if (bar // plan.section_bars) % 2 == i]
        if bars:
            part = _TEXTURES[name](plan, rng, bars, center)
            rms = _active_rms(part)
            out += part / rms if rms > 0 else part  # textures at similar loudness
    return out


def _pad(plan: _Plan, rng: np.random.Generator, bars: tp.List[int], center: int) -> np.ndarray:
    """Sustained chords of detuned saws under a slowly sweeping low-pass filter."""
    env = _Adsr(rng.uniform(0.08, 0.4), 1.0, 1.0, rng.uniform(0.2, 0.5))
    detune, spread = rng.uniform(4.0, 12.0), rng.uniform(0.3, 0.7)
    voices = _chord_notes(plan, bars, center, (0,), 1.0, len(plan.chord(0)))  # no doubling: 2 oscillators each
    out = np.zeros((2, plan.n))
    for j, notes in enumerate(voices):
        pan = spread * (2 * j / (len(voices) - 1) - 1)
        for side in (-1.0, 1.0):  # two detuned oscillators per voice, panned apart
            gains = _pan_gains(float(np.clip(pan + 0.3 * side, -1, 1)))
            _render_voice(out, gains, notes, plan, rng, _saw, env, detune=side * detune)
    cutoff, depth = rng.uniform(700.0, 2000.0), rng.uniform(0.4, 1.2)
    rate, phase = rng.uniform(0.08, 0.25), rng.uniform(0, 2 * np.pi)

    def sweep(times: np.ndarray, freqs: np.ndarray) -> np.ndarray:
        moving = cutoff * 2 ** (depth * np.sin(2 * np.pi * rate * times + phase))
        return _lowpass(freqs, moving[:, None], 2)

    return _stft_filter(out, plan.sr, sweep)


def _organ(plan: _Plan, rng: np.random.Generator, bars: tp.List[int], center: int) -> np.ndarray:
    """Drawbar-organ chords (a few fixed harmonics), held or stabbed, with a gentle tremolo."""
    drawbars = {1: 1.0, **{h: rng.uniform(0.0, 0.8) for h in (2, 3, 4, 6, 8)}}

    def harmonics(count: int) -> np.ndarray:
        amps = np.zeros(count)
        for h, level in drawbars.items():
            if h <= count:
                amps[h - 1] = level
        return amps

    steps, gate = ((0,), 0.97) if rng.random() < 0.5 else ((0, 4, 8, 12), rng.uniform(0.5, 0.8))
    voices = _chord_notes(plan, bars, center, steps, gate, 4 if rng.random() < 0.5 else 3)
    env = _Adsr(0.008, 1.0, 1.0, 0.05)
    spread = rng.uniform(0.2, 0.5)
    out = np.zeros((2, plan.n))
    for j, notes in enumerate(voices):
        _render_voice(out, _pan_gains(spread * (2 * j / (len(voices) - 1) - 1)), notes, plan, rng, harmonics, env)
    t = np.arange(plan.n) / plan.sr
    return out * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(5.0, 7.0) * t))


_STAB_RHYTHMS = ((0, 3, 6, 10, 12), (2, 6, 10, 14), (0, 6, 12), (0, 4, 8, 12), (0, 3, 8, 11))


def _pluck(plan: _Plan, rng: np.random.Generator, bars: tp.List[int], center: int) -> np.ndarray:
    """Rhythmic plucked chords: fast decay and a filter that closes after each stab."""
    steps = _STAB_RHYTHMS[int(rng.integers(len(_STAB_RHYTHMS)))]
    voices = _chord_notes(plan, bars, center, steps, 0.9, 4 if rng.random() < 0.5 else 3)
    shape = _square if rng.random() < 0.4 else _saw
    env = _Adsr(0.003, rng.uniform(0.08, 0.35), 0.0, 0.05)
    spread = rng.uniform(0.2, 0.6)
    out = np.zeros((2, plan.n))
    for j, notes in enumerate(voices):
        _render_voice(out, _pan_gains(spread * (2 * j / (len(voices) - 1) - 1)), notes, plan, rng, shape, env)
    onsets = np.array([note.start for note in voices[0]]) / plan.sr
    cutoff = _envelope_cutoff(onsets, rng.uniform(500.0, 1000.0), rng.uniform(2.0, 8.0), rng.uniform(0.03, 0.12))
    return _stft_filter(out, plan.sr, lambda times, freqs: _lowpass(freqs, cutoff(times)[:, None], 2))


def _arpeggio(plan: _Plan, rng: np.random.Generator, bars: tp.List[int], center: int) -> np.ndarray:
    """Chord tones one at a time over two octaves (up, down, up-down or random), ping-ponged."""
    rate = 1 if plan.step > 0.1 and rng.random() < 0.5 else 2
    order = _pick(rng, ("up", "down", "updown", "random"))
    env = _Adsr(0.003, rng.uniform(0.12, 0.4), 0.0, 0.06)
    shape = _square if rng.random() < 0.5 else _saw
    voices: tp.List[tp.List[_Note]] = [[], []]
    k = 0
    for bar in bars:
        tones = _voicing(plan.chord(bar), center)
        tones = tones + [p + 12 for p in tones]
        if order == "down":
            tones = tones[::-1]
        elif order == "updown":
            tones = tones + tones[-2:0:-1]
        for s in range(0, 16, rate):
            pitch = tones[int(rng.integers(len(tones)))] if order == "random" else tones[(s // rate) % len(tones)]
            start = plan.sample(16 * bar + s)
            voices[k % 2].append(_Note(start, int(0.9 * (plan.sample(16 * bar + s + rate) - start)), pitch,
                                       rng.uniform(0.7, 1.0)))
            k += 1
    width = rng.uniform(0.3, 0.6)
    out = np.zeros((2, plan.n))
    for voice, pan in zip(voices, (-width, width)):
        _render_voice(out, _pan_gains(pan), voice, plan, rng, shape, env)
    onsets = np.sort([note.start for voice in voices for note in voice]) / plan.sr
    cutoff = _envelope_cutoff(onsets, rng.uniform(600.0, 1200.0), rng.uniform(1.0, 5.0), rng.uniform(0.05, 0.2))
    return _stft_filter(out, plan.sr, lambda times, freqs: _lowpass(freqs, cutoff(times)[:, None], 2))


_TEXTURES: tp.Dict[str, tp.Callable[[_Plan, np.random.Generator, tp.List[int], int], np.ndarray]] = {
    "pad": _pad, "organ": _organ, "pluck": _pluck, "arpeggio": _arpeggio,
}


def _voicing(pitch_classes: tp.List[int], center: int) -> tp.List[int]:
    """The chord in close position within the octave around `center` (smooth voice leading)."""
    low = center - 6
    return sorted(low + (pc - low) % 12 for pc in pitch_classes)


def _chord_notes(plan: _Plan, bars: tp.List[int], center: int, steps: tp.Sequence[int], gate: float,
                 voices: int) -> tp.List[tp.List[_Note]]:
    """Notes of each chord voice: every bar's chord struck at `steps` (the top may double the root)."""
    parts: tp.List[tp.List[_Note]] = [[] for _ in range(voices)]
    for bar in bars:
        pitches = _voicing(plan.chord(bar), center)
        pitches = (pitches + [pitches[0] + 12])[:voices]
        for i, s in enumerate(steps):
            end = steps[i + 1] if i + 1 < len(steps) else 16
            start = plan.sample(16 * bar + s)
            length = max(1, int(gate * (plan.sample(16 * bar + end) - start)))
            for part, pitch in zip(parts, pitches):
                part.append(_Note(start, length, pitch))
    return parts


# --------------------------------------------------------------------------- signal helpers

_TABLE_SIZE = 4096
_NFFT = 2048
_HOP = _NFFT // 2
# Periodic sqrt-Hann for analysis and synthesis: their product sums to 1 at 50% overlap.
_WINDOW = np.sqrt(np.hanning(_NFFT + 1)[:-1])


def _pick(rng: np.random.Generator, options: tp.Sequence[tp.Any]) -> tp.Any:
    """A uniformly random element of `options` (as the original Python object)."""
    return options[int(rng.integers(len(options)))]


def _time(seconds: float, sr: int) -> np.ndarray:
    """Sample times of a `seconds` long signal."""
    return np.arange(int(seconds * sr)) / sr


def _saw(count: int) -> np.ndarray:
    """Harmonic amplitudes of a sawtooth."""
    return 1.0 / np.arange(1, count + 1)


def _square(count: int) -> np.ndarray:
    """Harmonic amplitudes of a square wave (odd harmonics only)."""
    k = np.arange(1, count + 1)
    return np.where(k % 2 == 1, 1.0 / k, 0.0)


def _wavetable(coefficients: np.ndarray) -> np.ndarray:
    """One cycle of a waveform from its harmonics (complex, or real sine amplitudes), peak 1."""
    coefficients = np.asarray(coefficients)
    if not np.iscomplexobj(coefficients):
        coefficients = -1j * coefficients  # sine amplitudes
    count = min(len(coefficients), _TABLE_SIZE // 2 - 1)
    spectrum = np.zeros(_TABLE_SIZE // 2 + 1, dtype=complex)
    spectrum[1:count + 1] = coefficients[:count]
    table = np.fft.irfft(spectrum, _TABLE_SIZE)
    return table / np.abs(table).max()


def _oscillator(table: np.ndarray, freq: np.ndarray, sr: int, phase: float = 0.0) -> np.ndarray:
    """Wavetable oscillator with linear interpolation, following the frequency curve `freq` (Hz).

    `table` holds one cycle; its length must be a power of two.
    """
    size = len(table)
    position = np.cumsum(freq * (size / sr))  # in table samples; float64 keeps the fraction exact enough
    position += phase * size
    index = position.astype(np.int64)
    frac = position - index
    np.bitwise_and(index, size - 1, out=index)
    out = (np.roll(table, -1) - table).take(index)
    out *= frac
    out += table.take(index)
    return out


def _render_voice(out: np.ndarray, gains: np.ndarray, notes: tp.List[_Note], plan: _Plan,
                  rng: np.random.Generator, harmonics: tp.Callable[[int], np.ndarray], env: _Adsr,
                  detune: float = 0.0) -> None:
    """Add one oscillator playing `notes` (in time order) into `out` (channels, n), times `gains`.

    The pitch jumps at each onset; release tails overlap the next note, which sounds legato.
    The wavetable keeps the highest note below Nyquist.
    """
    notes = [note for note in notes if note.start < plan.n]
    if not notes:
        return
    freqs = 440.0 * 2 ** ((np.array([note.pitch for note in notes]) - 69) / 12) * 2 ** (detune / 1200)
    table = _wavetable(harmonics(max(1, int(0.45 * plan.sr / freqs.max()))))
    release = max(1, int(env.release * plan.sr))
    ends = np.array([note.start + note.length + release for note in notes])
    shapes: tp.Dict[int, np.ndarray] = {}  # notes on the grid share their envelope
    first = 0
    for last in range(len(notes)):
        # Render each run of overlapping notes on its own: silence between runs costs nothing.
        if last + 1 < len(notes) and notes[last + 1].start < ends[first:last + 1].max():
            continue
        run = notes[first:last + 1]
        begin, end = run[0].start, min(plan.n, int(ends[first:last + 1].max()))
        bounds = np.array([note.start for note in run[1:]] + [end]).clip(max=end)
        freq = np.repeat(freqs[first:last + 1], np.diff(bounds, prepend=begin))
        amp = np.zeros(end - begin)
        for note in run:
            if note.length not in shapes:
                shapes[note.length] = _envelope(note.length, plan.sr, env)
            _add(amp, note.start - begin, note.velocity * shapes[note.length])
        wav = _oscillator(table, freq, plan.sr, rng.uniform()) * amp
        out[:, begin:end] += gains[:, None] * wav
        first = last + 1


@functools.lru_cache(maxsize=64)
def _envelope(gate: int, sr: int, env: _Adsr) -> np.ndarray:
    """ADSR curve for a note held `gate` samples, ending at exactly zero after the release.

    Cached (notes on the beat grid share lengths): callers must not modify the result.
    """
    release = max(1, int(env.release * sr))
    t = np.arange(gate + release) / sr
    attack = max(env.attack, 1e-3)
    if env.sustain < 1:
        curve = env.sustain + (1 - env.sustain) * np.exp(-np.maximum(t - attack, 0.0) / env.decay)
    else:
        curve = np.ones(t.size)
    rising = t < attack
    curve[rising] = t[rising] / attack
    curve[gate:] = curve[gate] * np.linspace(1.0, 0.0, release + 1)[1:]
    curve.flags.writeable = False
    return curve


def _envelope_cutoff(onsets: np.ndarray, base: float, amount: float,
                     decay: float) -> tp.Callable[[np.ndarray], np.ndarray]:
    """Cutoff (Hz) at given times for a filter envelope retriggered at each onset (seconds)."""

    def cutoff(times: np.ndarray) -> np.ndarray:
        index = np.searchsorted(onsets, times, side="right") - 1
        since = np.where(index >= 0, times - onsets[np.maximum(index, 0)], 10.0)
        return base * (1 + amount * np.exp(-since / decay))

    return cutoff


def _lowpass(freqs: np.ndarray, cutoff: tp.Union[float, np.ndarray], order: int) -> np.ndarray:
    """Butterworth-like low-pass magnitude response."""
    ratio = np.square(freqs / np.asarray(cutoff, dtype=freqs.dtype))
    return 1 / np.sqrt(1 + ratio ** order)


def _highpass(freqs: np.ndarray, cutoff: tp.Union[float, np.ndarray], order: int) -> np.ndarray:
    """Butterworth-like high-pass magnitude response (zero at DC)."""
    ratio = np.square(np.asarray(cutoff, dtype=freqs.dtype) / np.maximum(freqs, 1e-3))
    return 1 / np.sqrt(1 + ratio ** order)


def _fft_filter(x: np.ndarray, sr: int, response: tp.Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Zero-phase filter of a short signal by `response(freqs)` (for noise, before its envelope)."""
    size = 1 << (x.shape[-1] - 1).bit_length()  # a power of two is the fastest FFT size
    spectrum = np.fft.rfft(x, size) * response(np.fft.rfftfreq(size, 1 / sr))
    return np.fft.irfft(spectrum, size)[..., :x.shape[-1]]


def _stft_filter(x: np.ndarray, sr: int, gain: tp.Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Filter (channels, time) `x` with a time-varying zero-phase magnitude response.

    `gain(times, freqs)` returns the response, shape (frames, bins), at the given frame centre
    times (seconds) and bin frequencies (Hz); it is only asked about frames that hold signal.
    Weighted overlap-add of sqrt-Hann windowed frames at 50% overlap.
    """
    channels, length = x.shape
    blocks = np.pad(x, ((0, 0), (_HOP, _HOP + (-length) % _HOP))).reshape(channels, -1, _HOP)
    # Frame f is blocks f and f + 1; frames of silence are skipped (their output is silence).
    loud = (blocks.max(axis=(0, 2)) > 0) | (blocks.min(axis=(0, 2)) < 0)
    out = np.zeros(blocks.shape)
    freqs = np.fft.rfftfreq(_NFFT, 1 / sr).astype(np.float32)
    for start, stop in _runs(loud[:-1] | loud[1:]):
        frames = np.empty((channels, stop - start, _NFFT))
        np.multiply(blocks[:, start:stop], _WINDOW[:_HOP], out=frames[..., :_HOP])
        np.multiply(blocks[:, start + 1:stop + 1], _WINDOW[_HOP:], out=frames[..., _HOP:])
        response = gain(np.arange(start, stop) * _HOP / sr, freqs)  # frame centres, unpadded
        # numpy's rfft is fastest in float64 but its irfft in float32: switch after the product.
        spectra = np.multiply(np.fft.rfft(frames, axis=-1), response, dtype=np.complex64)
        frames = np.fft.irfft(spectra, _NFFT, axis=-1)
        frames *= _WINDOW.astype(np.float32)
        out[:, start:stop] += frames[..., :_HOP]
        out[:, start + 1:stop + 1] += frames[..., _HOP:]
    return out.reshape(channels, -1)[:, _HOP:_HOP + length]


def _runs(mask: np.ndarray) -> tp.List[tp.Tuple[int, int]]:
    """(start, stop) of every run of True in a 1-d boolean mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(start), int(stop)) for start, stop in zip(edges[::2], edges[1::2])]


def _smooth_rows(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average of `width` rows along axis 0 (edges repeated)."""
    padded = np.pad(x, ((width // 2, width - 1 - width // 2), (0, 0)), mode="edge")
    sums = np.cumsum(np.concatenate([np.zeros((1, x.shape[1])), padded]), axis=0)
    return (sums[width:] - sums[:-width]) / width


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """Smooth 0-to-1 transition on [0, 1]."""
    return x * x * (3 - 2 * x)


def _fade_out(x: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """`x`, faded linearly to zero over its last `fraction`: a decaying one-shot ends without a click."""
    count = int(len(x) * fraction)
    x[len(x) - count:] *= np.linspace(1.0, 0.0, count)
    return x


def _pan_gains(pan: float) -> np.ndarray:
    """Constant-power (left, right) gains for `pan` in [-1, 1]."""
    angle = (pan + 1) * np.pi / 4
    return np.array([np.cos(angle), np.sin(angle)])


def _pan(x: np.ndarray, pan: float) -> np.ndarray:
    """Mono (T,) to stereo (2, T), panned."""
    return _pan_gains(pan)[:, None] * x


def _add(out: np.ndarray, start: int, x: np.ndarray) -> None:
    """Add `x` (..., L) into `out` (..., T) from sample `start`, dropping what falls outside."""
    if start < 0:
        x, start = x[..., -start:], 0
    end = min(out.shape[-1], start + x.shape[-1])
    if end > start:
        out[..., start:end] += x[..., :end - start]


def _put(out: np.ndarray, start: int, x: np.ndarray) -> None:
    """Write `x` (L,) into `out` (T,) from sample `start`, dropping what falls outside."""
    if start < 0:
        x, start = x[-start:], 0
    end = min(out.shape[-1], start + x.shape[-1])
    if end > start:
        out[start:end] = x[:end - start]


def _active_rms(x: np.ndarray) -> float:
    """RMS per channel over the 2048-sample blocks where `x` plays (within 40 dB of the loudest)."""
    power = np.square(x.reshape(-1, x.shape[-1])[:, ::4]).mean(axis=0)  # every 4th sample is plenty
    usable = len(power) // 512 * 512
    blocks = power[:usable].reshape(-1, 512).mean(axis=1) if usable else power.mean(keepdims=True)
    if blocks.max() <= 0:
        return 0.0
    return float(np.sqrt(blocks[blocks > 1e-4 * blocks.max()].mean()))
