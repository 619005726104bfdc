"""What automix needs to know about a track: its tempo and beat grid, and its key.

The beat comes from one source (the drums by default): librosa's onset strength and beat
tracker give beat times, a straight line through them gives the tempo and the grid's phase
(the first beat at or after 0 s), and the normalised autocorrelation of the onset strength at
the beat period says how clear that pulse is (a click track scores about 0.8, noise about 0).
The key comes from the other ("harmonic") sources: their summed chroma (constant-Q) against the
24 rotated Krumhansl-Schmuckler key profiles. librosa is imported only here, and only when a
track is analysed: a missing librosa is a one-line error saying what to install.
"""
import math
import typing as tp
import warnings
from dataclasses import dataclass, field

import numpy as np

from ...errors import DemixError
from ..tracks import Track, conform

ANALYSIS_RATE = 22050  # Hz, mono: what the analysis reads every track at
HOP = 512  # frames between onset strength and chroma values
ACTIVITY_STEP = 0.25  # seconds per value of a source's loudness curve
MIN_BEATS = 8  # fewer detected beats than this is no confident beat
SILENCE_RMS = 1e-4  # a beat source or harmonic sum quieter than this has no beat / no key
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Krumhansl and Kessler's probe-tone ratings of the 12 scale degrees, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])

# Why a track or a candidate stem is not used (the keys of the summary's counts).
NO_BEAT = "no confident beat"
TOO_SHORT = "too short"
TEMPO_TOO_FAR = "tempo too far"
KEY_TOO_FAR = "key too far"
SILENT = "silent stem"
TRACK_REASONS = (NO_BEAT, TOO_SHORT)  # found by the analysis: the track is not used at all
CANDIDATE_REASONS = (TEMPO_TOO_FAR, KEY_TOO_FAR, TOO_SHORT, SILENT)  # found while planning, per candidate stem


@dataclass(frozen=True)
class Key:
    """A musical key: tonic pitch class (0 = C) and mode, with how well the chroma fits it."""

    tonic: int
    minor: bool
    strength: float  # correlation of the chroma with the key's profile, in [-1, 1]

    @property
    def pitch_set(self) -> int:
        """The tonic of the major key with the same notes (A minor -> C): what pitch shifts align."""
        return (self.tonic + 3) % 12 if self.minor else self.tonic

    @property
    def name(self) -> str:
        """E.g. "A minor"."""
        return f"{NOTE_NAMES[self.tonic]} {'minor' if self.minor else 'major'}"


@dataclass
class TrackAnalysis:
    """Tempo, beat grid, key and loudness of one track; `rejected` names why it cannot be used.

    Attributes:
        index, name: the track's position in the dataset and its name.
        duration: seconds.
        tempo: beats per minute of the fitted grid (None without a confident beat).
        first_beat: seconds of the first grid beat at or after 0.
        beat_confidence: the pulse clarity of the beat source (0: none, 1: perfectly periodic).
        key: the key of the harmonic sources (None when they are silent).
        activity: per source, its RMS every ACTIVITY_STEP seconds (at the analysis rate, mono).
    """

    index: int
    name: str
    duration: float
    tempo: tp.Optional[float] = None
    first_beat: float = 0.0
    beat_confidence: float = 0.0
    key: tp.Optional[Key] = None
    activity: tp.Dict[str, np.ndarray] = field(default_factory=dict)
    rejected: tp.Optional[str] = None

    @property
    def period(self) -> float:
        """Seconds per beat."""
        assert self.tempo is not None
        return 60.0 / self.tempo

    def beat_time(self, beat: int) -> float:
        """Seconds of grid beat number `beat` (0: the first at or after 0 s)."""
        return self.first_beat + beat * self.period

    def summary(self) -> tp.Dict[str, tp.Any]:
        """A JSON-ready description (for the manifest)."""
        return {"name": self.name, "duration": round(self.duration, 3),
                "tempo": None if self.tempo is None else round(self.tempo, 3),
                "first_beat": round(self.first_beat, 4), "beat_confidence": round(self.beat_confidence, 3),
                "key": None if self.key is None else self.key.name,
                "key_strength": None if self.key is None else round(self.key.strength, 3),
                "rejected": self.rejected}


def import_librosa() -> tp.Any:
    """librosa, or a one-line error saying how to install it."""
    try:
        import librosa  # noqa: PLC0415 - an optional dependency (pip install demixlab[automix])
    except ImportError:
        raise DemixError("demixlab automix needs librosa: pip install 'demixlab[automix]' "
                         "(or pip install librosa)") from None
    return librosa


def estimate_beat(signal: np.ndarray, samplerate: int) -> tp.Tuple[tp.Optional[float], float, float]:
    """(tempo in BPM or None, first grid beat in seconds, pulse clarity) of a mono signal."""
    librosa = import_librosa()
    if signal.size == 0 or float(np.sqrt(np.mean(signal ** 2))) < SILENCE_RMS:
        return None, 0.0, 0.0
    envelope = librosa.onset.onset_strength(y=signal, sr=samplerate, hop_length=HOP)
    _, beats = librosa.beat.beat_track(onset_envelope=envelope, sr=samplerate, hop_length=HOP, units="time")
    beats = np.asarray(beats, dtype=np.float64)
    if len(beats) < MIN_BEATS:
        return None, 0.0, 0.0
    # Number the beats (a skipped beat keeps its number) and fit a straight line: period, phase.
    numbers = np.round((beats - beats[0]) / np.median(np.diff(beats)))
    period, anchor = np.polyfit(numbers, beats, 1)
    if not period > 0:
        return None, 0.0, 0.0
    first = anchor - math.floor(anchor / period) * period
    return 60.0 / period, float(first), pulse_clarity(envelope, period * samplerate / HOP)


def pulse_clarity(envelope: np.ndarray, lag: float) -> float:
    """The normalised autocorrelation of an onset strength curve at `lag` frames (the best of the
    frames around it): near 1 for a steady pulse of that period, near 0 for noise."""
    centred = np.asarray(envelope, dtype=np.float64) - np.mean(envelope)
    energy = float(np.dot(centred, centred))
    if energy <= 0 or lag >= len(centred) - 1:
        return 0.0
    best = 0.0
    for shift in range(max(1, int(math.floor(lag)) - 1), int(math.ceil(lag)) + 2):
        if shift < len(centred):
            best = max(best, float(np.dot(centred[:-shift], centred[shift:])) / energy)
    return best


def estimate_key(signal: np.ndarray, samplerate: int) -> tp.Optional[Key]:
    """The key of a mono signal (chroma against the Krumhansl-Schmuckler profiles), None if silent."""
    librosa = import_librosa()
    if signal.size == 0 or float(np.sqrt(np.mean(signal ** 2))) < SILENCE_RMS:
        return None
    with warnings.catch_warnings():  # a short signal makes librosa warn about its lowest octaves
        warnings.simplefilter("ignore", UserWarning)
        chroma = librosa.feature.chroma_cqt(y=signal, sr=samplerate, hop_length=HOP).mean(axis=1)
    return key_of_chroma(chroma)


def key_of_chroma(chroma: np.ndarray) -> tp.Optional[Key]:
    """The best of the 24 major and minor keys for a 12-bin chroma profile (C first)."""
    chroma = np.asarray(chroma, dtype=np.float64)
    if not np.ptp(chroma) > 0:
        return None
    best: tp.Optional[Key] = None
    for minor, profile in ((False, MAJOR_PROFILE), (True, MINOR_PROFILE)):
        for tonic in range(12):
            score = float(np.corrcoef(chroma, np.roll(profile, tonic))[0, 1])
            if best is None or score > best.strength:
                best = Key(tonic, minor, score)
    return best


def semitones_between(key: Key, target: Key) -> int:
    """The pitch shift in [-6, 5] semitones that moves `key`'s notes onto `target`'s."""
    return (target.pitch_set - key.pitch_set + 6) % 12 - 6


def loudness_curve(signal: np.ndarray, samplerate: int) -> np.ndarray:
    """RMS of a mono signal every ACTIVITY_STEP seconds."""
    step = max(1, int(round(ACTIVITY_STEP * samplerate)))
    count = max(1, -(-len(signal) // step))
    padded = np.zeros(count * step, dtype=np.float64)
    padded[:len(signal)] = signal
    return np.sqrt(np.mean(padded.reshape(count, step) ** 2, axis=1))


def analyse_track(track: Track, index: int, beat_source: str, min_confidence: float,
                  min_seconds: float) -> TrackAnalysis:
    """Analyse one track: the beat of `beat_source`, the key of the other sources, every source's
    loudness; rejected as NO_BEAT when the pulse clarity is below `min_confidence`, TOO_SHORT when
    the track is shorter than `min_seconds`."""
    mono = conform(track, ANALYSIS_RATE, 1)
    stems = {source: mono.read_source(number)[0] for number, source in enumerate(mono.sources)}
    analysis = TrackAnalysis(index=index, name=track.name, duration=track.duration,
                             activity={source: loudness_curve(stem, ANALYSIS_RATE) for source, stem in stems.items()})
    harmonic = [stem for source, stem in stems.items() if source != beat_source]
    if harmonic:
        analysis.key = estimate_key(np.sum(harmonic, axis=0), ANALYSIS_RATE)
    tempo, first, confidence = estimate_beat(stems[beat_source], ANALYSIS_RATE)
    analysis.tempo, analysis.first_beat, analysis.beat_confidence = tempo, first, confidence
    if track.duration < min_seconds:
        analysis.rejected = TOO_SHORT
    elif tempo is None or confidence < min_confidence:
        analysis.rejected = NO_BEAT
    return analysis
