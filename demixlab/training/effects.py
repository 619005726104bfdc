"""Audio-effect augmentations of training examples, run where examples are read (DataLoader
workers): pitch shift and time stretch of whole examples, per-source EQ, distortion, reverb
and MP3 compression of the stems or of the example's mixture.

They use pedalboard (Rubber Band for pitch/tempo, JUCE effects, LAME), imported only when an
effect is on. Every draw comes from the generator the dataset passes for (seed, epoch, example)
(:class:`demixlab.data.SegmentDataset`), and the effects themselves are deterministic, so exact
resume and runs with any number of workers see the same examples. All are off by default
(probability 0), which leaves the examples, and the digests of existing signatures, unchanged.
"""
import math
import typing as tp
from dataclasses import dataclass, field

import numpy as np

from ..errors import DemixError


MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


def build_effects(samplerate: int, options: tp.Mapping[str, tp.Any]) -> tp.Optional["ExampleEffects"]:
    """The effects of the `augment` options (pitch_tempo, codec, eq, reverb, distortion), or
    None when they are all off."""
    effects = ExampleEffects(samplerate, **options)
    return effects if effects.active else None


def _check_probability(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise DemixError(f"augment.{key}.probability={value}: expected a probability in [0, 1]")


def _check_range(key: str, value: tp.Sequence[float], low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise DemixError(f"augment.{key}={list(value)}: expected [low, high] with {low:g} <= low <= high <= {high:g}")


@dataclass
class PitchTempoConfig:
    """`augment.pitch_tempo`: with `probability`, shift a whole example by a whole number of
    semitones in [-semitones, semitones] and change its tempo by a factor in [1 - tempo, 1 + tempo]
    (all sources alike, demucs' repitch). `high_quality: false` uses Rubber Band's faster mode
    (about half the time)."""

    probability: float = 0.0
    semitones: int = 2
    tempo: float = 0.12
    high_quality: bool = True

    def __post_init__(self) -> None:
        _check_probability("pitch_tempo", self.probability)
        if not 0 <= self.semitones <= 12:
            raise DemixError(f"augment.pitch_tempo.semitones={self.semitones}: expected 0 to 12")
        if not 0 <= self.tempo < 0.5:
            raise DemixError(f"augment.pitch_tempo.tempo={self.tempo}: expected a relative change in [0, 0.5)")


CODEC_TARGETS = ("stems", "mixture")


@dataclass
class CodecConfig:
    """`augment.codec`: MP3-encode and decode at a LAME VBR quality drawn in `quality` (0: best,
    9.99: lowest bit rate), with `probability` per source (`target: stems`) or per example on its
    mixture (`target: mixture`: the model hears the compressed mixture, the targets stay clean)."""

    probability: float = 0.0
    quality: tp.List[float] = field(default_factory=lambda: [2.0, 9.0])
    target: str = "stems"

    def __post_init__(self) -> None:
        _check_probability("codec", self.probability)
        _check_range("codec.quality", self.quality, 0.0, 9.99)
        if self.target not in CODEC_TARGETS:
            raise DemixError(f"augment.codec.target={self.target!r}: expected one of {', '.join(CODEC_TARGETS)}")

    @property
    def on_mixture(self) -> bool:
        """Whether examples carry a codec residual of their mixture (on, with target mixture)."""
        return self.probability > 0 and self.target == "mixture"


@dataclass
class EqConfig:
    """`augment.eq`: with `probability` per source, a peak filter at a log-uniform frequency in
    `frequency` Hz, gain uniform in [-gain_db, gain_db] and Q in `q`."""

    probability: float = 0.0
    gain_db: float = 6.0
    frequency: tp.List[float] = field(default_factory=lambda: [100.0, 8000.0])
    q: tp.List[float] = field(default_factory=lambda: [0.5, 2.0])

    def __post_init__(self) -> None:
        _check_probability("eq", self.probability)
        _check_range("eq.frequency", self.frequency, 1.0, 1e5)
        _check_range("eq.q", self.q, 0.05, 20.0)
        if not 0 <= self.gain_db <= 24:
            raise DemixError(f"augment.eq.gain_db={self.gain_db}: expected 0 to 24 dB")


@dataclass
class ReverbConfig:
    """`augment.reverb`: with `probability` per source, a room reverb of size in `room_size`
    and wet level in `wet` (the dry level is 1 - wet)."""

    probability: float = 0.0
    room_size: tp.List[float] = field(default_factory=lambda: [0.1, 0.7])
    wet: tp.List[float] = field(default_factory=lambda: [0.05, 0.3])

    def __post_init__(self) -> None:
        _check_probability("reverb", self.probability)
        _check_range("reverb.room_size", self.room_size, 0.0, 1.0)
        _check_range("reverb.wet", self.wet, 0.0, 1.0)


@dataclass
class DistortionConfig:
    """`augment.distortion`: with `probability` per source, tanh saturation with a drive drawn
    in `drive_db`."""

    probability: float = 0.0
    drive_db: tp.List[float] = field(default_factory=lambda: [2.0, 12.0])

    def __post_init__(self) -> None:
        _check_probability("distortion", self.probability)
        _check_range("distortion.drive_db", self.drive_db, 0.0, 60.0)


def import_pedalboard(what: str) -> tp.Any:
    """Import pedalboard, or explain in one line which option needs it."""
    try:
        import pedalboard  # noqa: PLC0415 - only needed when an effect is on
    except ImportError:
        raise DemixError(f"{what} needs pedalboard: pip install pedalboard==0.9.26 (or set its probability "
                         "to 0)") from None
    return pedalboard


class ExampleEffects:
    """The effect augmentations of one configuration, as a dataset-side transform
    (:class:`demixlab.data.ExampleTransform`): picklable, so each DataLoader worker holds a copy.

    Order: pitch/tempo on the whole example (read longer, then cropped to the example length so
    sources stay aligned), then per source EQ, distortion, reverb and MP3 compression. Random
    draws happen in a fixed order whatever is applied, so an option does not reshuffle another's.

    With ``codec.target: mixture`` the sources are not compressed; the example gets one more row
    after them, the residual ``mp3(mixture) - mixture`` of its mixture (zeros when not drawn),
    which the training step adds to the sum of the sources
    (:meth:`demixlab.training.augment.Augmentation.model_input`).
    """

    def __init__(self, samplerate: int, pitch_tempo: PitchTempoConfig, codec: CodecConfig, eq: EqConfig,
                 reverb: ReverbConfig, distortion: DistortionConfig):
        self.samplerate = samplerate
        self.pitch_tempo, self.codec, self.eq, self.reverb, self.distortion = pitch_tempo, codec, eq, reverb, distortion
        active = [name for name, option in self.options().items() if option.probability > 0]
        if active:
            import_pedalboard(", ".join(f"augment.{name}" for name in active))
        if codec.probability > 0 and samplerate not in MP3_RATES:
            raise DemixError(f"augment.codec: MP3 cannot encode {samplerate} Hz (dset.samplerate); it takes "
                             f"{', '.join(map(str, MP3_RATES))}")

    def options(self) -> tp.Dict[str, tp.Any]:
        """The effect options by name."""
        return {"pitch_tempo": self.pitch_tempo, "codec": self.codec, "eq": self.eq, "reverb": self.reverb,
                "distortion": self.distortion}

    @property
    def active(self) -> bool:
        """Whether any effect has a non-zero probability."""
        return any(option.probability > 0 for option in self.options().values())

    def input_frames(self, frames: int) -> int:
        """Frames to read: enough for the fastest tempo to still fill `frames`."""
        if self.pitch_tempo.probability <= 0:
            return frames
        return int(math.ceil(frames * (1 + self.pitch_tempo.tempo))) + 1024

    def __call__(self, sources: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
        """Apply the effects to (sources, channels, input_frames) audio; return `frames` frames
        (and the mixture's codec residual as a last row with ``codec.target: mixture``)."""
        sources = self._pitch_tempo(sources, frames, rng)
        out = np.stack([self._per_source(source, rng) for source in sources]).astype(np.float32, copy=False)
        if self.codec.on_mixture:
            out = np.concatenate([out, self._mixture_residual(out.sum(axis=0), rng)[None]])
        return out

    def _mixture_residual(self, mixture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``mp3(mixture) - mixture`` with probability ``codec.probability``, else zeros."""
        apply = rng.random() < self.codec.probability
        quality = float(rng.uniform(*self.codec.quality))
        if not apply or not np.any(mixture):
            return np.zeros_like(mixture, dtype=np.float32)
        pedalboard = import_pedalboard("augment.codec")
        mixture = np.ascontiguousarray(mixture, dtype=np.float32)
        encoded = pedalboard.MP3Compressor(vbr_quality=quality)(mixture, float(self.samplerate))
        encoded = _fit(np.nan_to_num(encoded, nan=0.0, posinf=0.0, neginf=0.0), mixture.shape[-1])
        return (encoded - mixture).astype(np.float32)

    def _pitch_tempo(self, sources: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
        option = self.pitch_tempo
        if option.probability <= 0:
            return sources[..., :frames]
        apply = rng.random() < option.probability
        semitones = int(rng.integers(-option.semitones, option.semitones + 1))
        speed = 1 + float(rng.uniform(-option.tempo, option.tempo))
        if not apply or (semitones == 0 and speed == 1):
            return sources[..., :frames]
        pedalboard = import_pedalboard("augment.pitch_tempo")
        out = np.zeros(sources.shape[:2] + (frames,), dtype=np.float32)
        for index, source in enumerate(sources):
            if not np.any(source):
                continue  # silence stays silence (and costs nothing)
            stretched = pedalboard.time_stretch(np.ascontiguousarray(source, dtype=np.float32), float(self.samplerate),
                                                stretch_factor=speed, pitch_shift_in_semitones=float(semitones),
                                                high_quality=option.high_quality)
            out[index, :, :min(frames, stretched.shape[-1])] = stretched[:, :frames]
        return out

    def _per_source(self, source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        draws = {name: rng.random() for name in ("eq", "distortion", "reverb", "codec")}
        params = {
            "eq": (math.exp(rng.uniform(math.log(self.eq.frequency[0]), math.log(self.eq.frequency[1]))),
                   rng.uniform(-self.eq.gain_db, self.eq.gain_db), rng.uniform(*self.eq.q)),
            "distortion": (rng.uniform(*self.distortion.drive_db),),
            "reverb": (rng.uniform(*self.reverb.room_size), rng.uniform(*self.reverb.wet)),
            "codec": (rng.uniform(*self.codec.quality),),
        }
        chosen = [name for name, draw in draws.items() if draw < self.options()[name].probability
                  and not (name == "codec" and self.codec.target == "mixture")]
        if not chosen or not np.any(source):
            return source
        pedalboard = import_pedalboard(", ".join(f"augment.{name}" for name in chosen))
        plugins = []
        for name in chosen:
            values = [float(value) for value in params[name]]
            if name == "eq":
                frequency = min(values[0], 0.45 * self.samplerate)
                plugins.append(pedalboard.PeakFilter(cutoff_frequency_hz=frequency, gain_db=values[1], q=values[2]))
            elif name == "distortion":
                plugins.append(pedalboard.Distortion(drive_db=values[0]))
            elif name == "reverb":
                plugins.append(pedalboard.Reverb(room_size=values[0], wet_level=values[1], dry_level=1 - values[1]))
            else:
                plugins.append(pedalboard.MP3Compressor(vbr_quality=values[0]))
        out = pedalboard.Pedalboard(plugins)(np.ascontiguousarray(source, dtype=np.float32), float(self.samplerate))
        return np.nan_to_num(out[:, :source.shape[-1]], nan=0.0, posinf=0.0, neginf=0.0)


def _fit(wav: np.ndarray, frames: int) -> np.ndarray:
    """`wav` cut or zero-padded to `frames` frames."""
    if wav.shape[-1] >= frames:
        return wav[..., :frames]
    return np.pad(wav, [(0, 0)] * (wav.ndim - 1) + [(0, frames - wav.shape[-1])])
