"""Planning and rendering remixes: which track, offset, tempo change and pitch shift each stem
of each remix takes, and the audio that comes out.

A remix starts from a reference track (the usable tracks in a seeded order, round after round),
which sets the common tempo and key, and gives one randomly chosen source. Every other source
comes from a different track, tried in a seeded random order: a candidate is rejected when no
tempo change within `max_tempo_change` (also after halving or doubling its tempo) reaches the
common tempo, when its key is more than `max_semitones` away (not asked of the beat source, which
is never pitch-shifted), when it is too short for the stretched excerpt, or when its stem is mostly
silent there. Every stem is cut so that one of its grid beats falls on the remix's first sample,
then time-stretched (and pitch-shifted) with Rubber Band through pedalboard: all beats of a remix
fall on one grid of the common tempo that starts at 0 s.
"""
import math
import typing as tp
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ...errors import DemixError
from ..tracks import Track
from .analysis import (ACTIVITY_STEP, KEY_TOO_FAR, SILENT, TEMPO_TOO_FAR, TOO_SHORT, TRACK_REASONS, Key, TrackAnalysis,
                       semitones_between)

OCTAVES = (1.0, 0.5, 2.0)  # a beat tracker may count half or double time: try those too
ACTIVE_RMS = 10 ** (-50 / 20)  # a stem is playing where its RMS is above -50 dBFS ...
ACTIVE_FRACTION = 0.5  # ... and an excerpt must be playing for at least this fraction of its steps
OFFSET_TRIES = 4  # random excerpts of a candidate tried before it is rejected as silent
ATTEMPTS_PER_REMIX = 20  # reference tracks tried per requested remix before giving up
PAD_SECONDS = 0.5  # audio read around an excerpt so that the stretcher's edges fall outside it
HEADROOM = 0.99  # remixes whose mixture peaks above this are scaled down (stems alike)


@dataclass
class AutomixOptions:
    """What remixes to make (see `demixlab automix --help`)."""

    sources: tp.List[str]
    beat_source: str = "drums"
    seconds: float = 30.0
    count: tp.Optional[int] = None  # None: one remix per usable track
    seed: int = 0
    max_semitones: int = 2
    max_tempo_change: float = 0.15
    min_beat_confidence: float = 0.3
    samplerate: int = 44100
    channels: int = 2

    def __post_init__(self) -> None:
        if len(self.sources) < 2 or len(set(self.sources)) != len(self.sources):
            raise DemixError(f"--sources {','.join(self.sources)}: expected at least two different source names")
        if self.beat_source not in self.sources:
            raise DemixError(f"--beat-source {self.beat_source}: not one of --sources {','.join(self.sources)}")
        if not self.seconds > 0:
            raise DemixError(f"--seconds {self.seconds:g}: expected a positive number of seconds")
        if self.count is not None and self.count < 1:
            raise DemixError(f"--count {self.count}: expected at least 1 remix")
        if not 0 <= self.max_semitones <= 6:
            raise DemixError(f"--max-semitones {self.max_semitones}: expected 0 to 6 semitones")
        if not 0 <= self.max_tempo_change < 0.5:
            raise DemixError(f"--max-tempo-change {self.max_tempo_change:g}: expected a fraction in [0, 0.5), "
                             "e.g. 0.15 for +-15 %")
        if not 0 <= self.min_beat_confidence < 1:
            raise DemixError(f"--min-beat-confidence {self.min_beat_confidence:g}: expected a value in [0, 1)")
        if self.samplerate < 8000 or self.channels < 1:
            raise DemixError(f"--samplerate {self.samplerate} / --channels {self.channels}: expected at least "
                             "8000 Hz and 1 channel")

    @property
    def min_track_seconds(self) -> float:
        """The shortest track that can give an excerpt (at the fastest allowed tempo change)."""
        return self.seconds * (1 - self.max_tempo_change)


@dataclass
class StemChoice:
    """Where one stem of a remix comes from and how it is changed.

    `offset` is the time of the source track (seconds) that lands on the remix's first sample:
    one of its grid beats; `stretch` the speed factor (> 1: faster), `semitones` the pitch shift.
    """

    track: int
    name: str
    offset: float
    stretch: float
    semitones: int
    source_tempo: float

    def summary(self) -> tp.Dict[str, tp.Any]:
        """A JSON-ready description (for the manifest)."""
        return {"track": self.name, "offset": round(self.offset, 4), "stretch": round(self.stretch, 5),
                "semitones": self.semitones, "source_tempo": round(self.source_tempo, 3)}


@dataclass
class RemixPlan:
    """One remix: its name, the common tempo and key, and a :class:`StemChoice` per source."""

    name: str
    tempo: float
    key: tp.Optional[Key]
    reference: str
    stems: tp.Dict[str, StemChoice] = field(default_factory=dict)

    def summary(self) -> tp.Dict[str, tp.Any]:
        """A JSON-ready description (for the manifest)."""
        return {"name": self.name, "tempo": round(self.tempo, 3), "key": None if self.key is None else self.key.name,
                "reference": self.reference,
                "stems": {source: choice.summary() for source, choice in self.stems.items()}}


@dataclass
class Plans:
    """The planned remixes, the candidate stems rejected per reason, and the remix attempts that
    found no candidate for some source."""

    remixes: tp.List[RemixPlan]
    rejected: tp.Counter[str]
    abandoned: int


def tempo_change(tempo: float, target: float, max_change: float) -> tp.Optional[float]:
    """The speed factor that brings `tempo` (or its double or half) to `target`, or None when all
    of them need more than `max_change` (a fraction)."""
    factors = [target / (tempo * octave) for octave in OCTAVES]
    best = min(factors, key=lambda factor: abs(math.log(factor)))
    return best if abs(best - 1) <= max_change + 1e-9 else None


def _active(analysis: TrackAnalysis, source: str, start: float, seconds: float) -> bool:
    curve = analysis.activity[source]
    first, last = int(start / ACTIVITY_STEP), int(math.ceil((start + seconds) / ACTIVITY_STEP))
    window = curve[first:max(first + 1, last)]
    return window.size > 0 and float(np.mean(window > ACTIVE_RMS)) >= ACTIVE_FRACTION


def _excerpt(analysis: TrackAnalysis, source: str, stretch: float, options: AutomixOptions,
             rng: np.random.Generator) -> tp.Tuple[tp.Optional[float], tp.Optional[str]]:
    """(offset, None) of an excerpt of `source` that plays, or (None, reason)."""
    needed = options.seconds * stretch  # seconds of the source that make `seconds` of the remix
    beats = int(math.floor((analysis.duration - needed - analysis.first_beat) / analysis.period)) + 1
    if beats < 1:
        return None, TOO_SHORT
    for number in rng.choice(beats, size=min(beats, OFFSET_TRIES), replace=False):
        offset = analysis.beat_time(int(number))
        if _active(analysis, source, offset, needed):
            return offset, None
    return None, SILENT


def plan_remixes(analyses: tp.Sequence[TrackAnalysis], options: AutomixOptions) -> Plans:
    """Plan the remixes from the analysed tracks (the rejected ones are left out), seeded by
    `options.seed`."""
    usable = [analysis for analysis in analyses if analysis.rejected is None]
    if len(usable) < len(options.sources):
        refused = Counter(analysis.rejected for analysis in analyses if analysis.rejected)
        raise DemixError(f"too few usable tracks: {len(usable)} of {len(analyses)} track(s) have a confident beat and "
                         f"{options.min_track_seconds:.1f} s or more (rejected: "
                         + ", ".join(f"{reason} {refused.get(reason, 0)}" for reason in TRACK_REASONS)
                         + f"), and a remix takes each of its {len(options.sources)} sources from a different track")
    rng = np.random.default_rng(options.seed)
    count = options.count or len(usable)
    rejected: tp.Counter[str] = Counter()
    remixes: tp.List[RemixPlan] = []
    abandoned = 0
    order: tp.List[int] = []
    for _ in range(count * ATTEMPTS_PER_REMIX):
        if len(remixes) == count:
            break
        if not order:
            order = list(rng.permutation(len(usable)))
        plan = _plan_one(usable[order.pop(0)], usable, options, rng, rejected)
        if plan is None:
            abandoned += 1
            continue
        plan.name = f"REMIX_{len(remixes):04d}"
        remixes.append(plan)
    return Plans(remixes, rejected, abandoned)


def _plan_one(reference: TrackAnalysis, usable: tp.Sequence[TrackAnalysis], options: AutomixOptions,
              rng: np.random.Generator, rejected: tp.Counter[str]) -> tp.Optional[RemixPlan]:
    """One remix around `reference`, or None when some source has no fitting candidate."""
    assert reference.tempo is not None
    plan = RemixPlan(name="", tempo=reference.tempo, key=reference.key, reference=reference.name)
    order = [options.sources[index] for index in rng.permutation(len(options.sources))]
    used = {reference.index}
    for position, source in enumerate(order):
        candidates = [reference] if position == 0 else [usable[index] for index in rng.permutation(len(usable))
                                                         if usable[index].index not in used]
        for candidate in candidates:
            choice, reason = _try_candidate(candidate, source, plan, options, rng)
            if choice is None:
                rejected[tp.cast(str, reason)] += 1
                continue
            plan.stems[source] = choice
            used.add(candidate.index)
            if plan.key is None and source != options.beat_source:
                plan.key = candidate.key  # a reference without harmony: the first keyed stem sets the key
            break
        else:
            return None
    plan.stems = {source: plan.stems[source] for source in options.sources}
    return plan


def _try_candidate(candidate: TrackAnalysis, source: str, plan: RemixPlan, options: AutomixOptions,
                   rng: np.random.Generator) -> tp.Tuple[tp.Optional[StemChoice], tp.Optional[str]]:
    assert candidate.tempo is not None
    stretch = tempo_change(candidate.tempo, plan.tempo, options.max_tempo_change)
    if stretch is None:
        return None, TEMPO_TOO_FAR
    semitones = 0
    if source != options.beat_source and candidate.key is not None and plan.key is not None:
        semitones = semitones_between(candidate.key, plan.key)
        if abs(semitones) > options.max_semitones:
            return None, KEY_TOO_FAR
    offset, reason = _excerpt(candidate, source, stretch, options, rng)
    if offset is None:
        return None, reason
    return StemChoice(candidate.index, candidate.name, offset, stretch, semitones, candidate.tempo), None


def render_stem(track: Track, source: int, choice: StemChoice, seconds: float) -> np.ndarray:
    """The (channels, frames) audio of one planned stem: the excerpt of `track` that starts at
    `choice.offset`, stretched and pitch-shifted, exactly `seconds` long (zero-padded past the
    track's end)."""
    samplerate = track.samplerate
    frames = int(round(seconds * samplerate))
    start = int(round(choice.offset * samplerate))
    pad = min(start, int(round(PAD_SECONDS * samplerate)))
    length = int(math.ceil(seconds * choice.stretch * samplerate)) + pad + int(round(PAD_SECONDS * samplerate))
    audio = np.ascontiguousarray(track.read_source(source, start - pad, length), dtype=np.float32)
    if choice.stretch != 1 or choice.semitones:
        import pedalboard  # noqa: PLC0415 - imported where stems are changed

        audio = pedalboard.time_stretch(audio, float(samplerate), stretch_factor=float(choice.stretch),
                                        pitch_shift_in_semitones=float(choice.semitones), high_quality=True)
    first = int(round(pad / choice.stretch))
    out = np.zeros((track.channels, frames), dtype=np.float32)
    piece = audio[:, first:first + frames]
    out[:, :piece.shape[-1]] = piece
    return out


def render_remix(tracks: tp.Sequence[Track], plan: RemixPlan, seconds: float) -> tp.Dict[str, np.ndarray]:
    """Every stem of a planned remix, scaled together so that their sum peaks at most at HEADROOM."""
    stems = {}
    for source, choice in plan.stems.items():
        track = tracks[choice.track]
        stems[source] = render_stem(track, track.sources.index(source), choice, seconds)
    peak = float(np.max(np.abs(np.sum(list(stems.values()), axis=0))))
    if peak > HEADROOM:
        stems = {source: stem * np.float32(HEADROOM / peak) for source, stem in stems.items()}
    return stems
