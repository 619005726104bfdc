"""Signal helpers of the toy synthesizer: band-limited wavetable oscillators, envelopes, STFT-domain
filters, panning and mixing, all vectorised numpy."""
from __future__ import annotations

import functools
import typing as tp

import numpy as np

from .plan import Adsr, Note, Plan

_TABLE_SIZE = 4096
_NFFT = 2048
_HOP = _NFFT // 2
# Periodic sqrt-Hann for analysis and synthesis: their product sums to 1 at 50% overlap.
_WINDOW = np.sqrt(np.hanning(_NFFT + 1)[:-1])


def seconds_grid(seconds: float, sr: int) -> np.ndarray:
    """Sample times of a `seconds` long signal."""
    return np.arange(int(seconds * sr)) / sr


def saw(count: int) -> np.ndarray:
    """Harmonic amplitudes of a sawtooth."""
    return 1.0 / np.arange(1, count + 1)


def square(count: int) -> np.ndarray:
    """Harmonic amplitudes of a square wave (odd harmonics only)."""
    k = np.arange(1, count + 1)
    return np.where(k % 2 == 1, 1.0 / k, 0.0)


def wavetable(coefficients: np.ndarray) -> np.ndarray:
    """One cycle of a waveform from its harmonics (complex, or real sine amplitudes), peak 1."""
    coefficients = np.asarray(coefficients)
    if not np.iscomplexobj(coefficients):
        coefficients = -1j * coefficients  # sine amplitudes
    count = min(len(coefficients), _TABLE_SIZE // 2 - 1)
    spectrum = np.zeros(_TABLE_SIZE // 2 + 1, dtype=complex)
    spectrum[1:count + 1] = coefficients[:count]
    table = np.fft.irfft(spectrum, _TABLE_SIZE)
    return table / np.abs(table).max()


def oscillator(table: np.ndarray, freq: np.ndarray, sr: int, phase: float = 0.0) -> np.ndarray:
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


def render_voice(out: np.ndarray, gains: np.ndarray, notes: tp.List[Note], plan: Plan,
                  rng: np.random.Generator, harmonics: tp.Callable[[int], np.ndarray], env: Adsr,
                  detune: float = 0.0) -> None:
    """Add one oscillator playing `notes` (in time order) into `out` (channels, n), times `gains`.

    The pitch jumps at each onset; release tails overlap the next note, which sounds legato.
    The wavetable keeps the highest note below Nyquist.
    """
    notes = [note for note in notes if note.start < plan.n]
    if not notes:
        return
    freqs = 440.0 * 2 ** ((np.array([note.pitch for note in notes]) - 69) / 12) * 2 ** (detune / 1200)
    table = wavetable(harmonics(max(1, int(0.45 * plan.sr / freqs.max()))))
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
            add_at(amp, note.start - begin, note.velocity * shapes[note.length])
        wav = oscillator(table, freq, plan.sr, rng.uniform()) * amp
        out[:, begin:end] += gains[:, None] * wav
        first = last + 1


@functools.lru_cache(maxsize=64)
def _envelope(gate: int, sr: int, env: Adsr) -> np.ndarray:
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


def envelope_cutoff(onsets: np.ndarray, base: float, amount: float,
                     decay: float) -> tp.Callable[[np.ndarray], np.ndarray]:
    """Cutoff (Hz) at given times for a filter envelope retriggered at each onset (seconds)."""

    def cutoff(times: np.ndarray) -> np.ndarray:
        index = np.searchsorted(onsets, times, side="right") - 1
        since = np.where(index >= 0, times - onsets[np.maximum(index, 0)], 10.0)
        return base * (1 + amount * np.exp(-since / decay))

    return cutoff


def lowpass(freqs: np.ndarray, cutoff: tp.Union[float, np.ndarray], order: int) -> np.ndarray:
    """Butterworth-like low-pass magnitude response."""
    ratio = np.square(freqs / np.asarray(cutoff, dtype=freqs.dtype))
    return 1 / np.sqrt(1 + ratio ** order)


def highpass(freqs: np.ndarray, cutoff: tp.Union[float, np.ndarray], order: int) -> np.ndarray:
    """Butterworth-like high-pass magnitude response (zero at DC)."""
    ratio = np.square(np.asarray(cutoff, dtype=freqs.dtype) / np.maximum(freqs, 1e-3))
    return 1 / np.sqrt(1 + ratio ** order)


def fft_filter(x: np.ndarray, sr: int, response: tp.Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Zero-phase filter of a short signal by `response(freqs)` (for noise, before its envelope)."""
    size = 1 << (x.shape[-1] - 1).bit_length()  # a power of two is the fastest FFT size
    spectrum = np.fft.rfft(x, size) * response(np.fft.rfftfreq(size, 1 / sr))
    return np.fft.irfft(spectrum, size)[..., :x.shape[-1]]


def stft_filter(x: np.ndarray, sr: int, gain: tp.Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
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


def smooth_rows(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average of `width` rows along axis 0 (edges repeated)."""
    padded = np.pad(x, ((width // 2, width - 1 - width // 2), (0, 0)), mode="edge")
    sums = np.cumsum(np.concatenate([np.zeros((1, x.shape[1])), padded]), axis=0)
    return (sums[width:] - sums[:-width]) / width


def smoothstep(x: np.ndarray) -> np.ndarray:
    """Smooth 0-to-1 transition on [0, 1]."""
    return x * x * (3 - 2 * x)


def fade_out(x: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """`x`, faded linearly to zero over its last `fraction`: a decaying one-shot ends without a click."""
    count = int(len(x) * fraction)
    x[len(x) - count:] *= np.linspace(1.0, 0.0, count)
    return x


def pan_gains(pan: float) -> np.ndarray:
    """Constant-power (left, right) gains for `pan` in [-1, 1]."""
    angle = (pan + 1) * np.pi / 4
    return np.array([np.cos(angle), np.sin(angle)])


def pan_stereo(x: np.ndarray, pan: float) -> np.ndarray:
    """Mono (T,) to stereo (2, T), panned."""
    return pan_gains(pan)[:, None] * x


def add_at(out: np.ndarray, start: int, x: np.ndarray) -> None:
    """Add `x` (..., L) into `out` (..., T) from sample `start`, dropping what falls outside."""
    if start < 0:
        x, start = x[..., -start:], 0
    end = min(out.shape[-1], start + x.shape[-1])
    if end > start:
        out[..., start:end] += x[..., :end - start]


def put_at(out: np.ndarray, start: int, x: np.ndarray) -> None:
    """Write `x` (L,) into `out` (T,) from sample `start`, dropping what falls outside."""
    if start < 0:
        x, start = x[-start:], 0
    end = min(out.shape[-1], start + x.shape[-1])
    if end > start:
        out[start:end] = x[:end - start]


def active_rms(x: np.ndarray) -> float:
    """RMS per channel over the 2048-sample blocks where `x` plays (within 40 dB of the loudest)."""
    power = np.square(x.reshape(-1, x.shape[-1])[:, ::4]).mean(axis=0)  # every 4th sample is plenty
    usable = len(power) // 512 * 512
    blocks = power[:usable].reshape(-1, 512).mean(axis=1) if usable else power.mean(keepdims=True)
    if blocks.max() <= 0:
        return 0.0
    return float(np.sqrt(blocks[blocks > 1e-4 * blocks.max()].mean()))
