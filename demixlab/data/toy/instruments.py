"""The four instruments of a toy track: a drum kit, a bass line on the chord roots, a sung-like voice
through moving formants, and a chord accompaniment ("other"). Each returns a stereo stem (2, n)."""
from __future__ import annotations

import typing as tp

import numpy as np

from .dsp import (active_rms, add_at, envelope_cutoff, fade_out, fft_filter, highpass, lowpass, oscillator, pan_gains,
                  pan_stereo, put_at, render_voice, saw, seconds_grid, smooth_rows, smoothstep, square, stft_filter,
                  wavetable)
from .plan import Adsr, Note, Plan, pick

# kick steps, optional kick steps, snare steps, hi-hat pattern
_GROOVES = {
    "rock": ((0, 8), (6, 10, 14), (4, 12), "eighths"),
    "four": ((0, 4, 8, 12), (7, 14), (4, 12), "offbeat"),
    "halftime": ((0, 10), (3, 6, 14), (8,), "sixteenths"),
    "break": ((0, 10), (3, 7, 13), (4, 12), "eighths"),
}
_FILL_PIECES = ("snare", "tom_high", "tom_mid", "tom_low")


def drums_stem(plan: Plan, rng: np.random.Generator) -> np.ndarray:
    """Drum kit stem (2, n): one-shot samples placed on a varied 16-step pattern."""
    kit = _drum_kit(plan.sr, rng)
    out = np.zeros((2, plan.n))
    for step, piece, velocity in _drum_hits(plan, rng):
        sounds, pan = kit[piece]
        sound = sounds[int(rng.integers(len(sounds)))]
        start = max(0, plan.sample(step) + int(rng.normal(0.0, 0.0015) * plan.sr))
        add_at(out, start, (velocity * pan_gains(pan))[:, None] * sound)
    return out


def _drum_hits(plan: Plan, rng: np.random.Generator) -> tp.List[tp.Tuple[int, str, float]]:
    """(step, piece, velocity) of every hit: a groove with per-bar variation, ghosts and fills."""
    kicks, extra_kicks, snares, hats = _GROOVES[pick(rng, sorted(_GROOVES))]
    kicks = set(kicks) | {int(s) for s in rng.choice(extra_kicks, size=int(rng.integers(0, 2)), replace=False)}
    ghost_rate = rng.uniform(0.0, 0.12)
    open_rate = rng.uniform(0.0, 0.4)
    hits = []
    for bar in range(plan.bars):
        base = 16 * bar
        bar_kicks = set(kicks)
        if rng.random() < 0.2:
            bar_kicks.add(int(pick(rng, extra_kicks)))
        section_start = bar % plan.section_bars == 0
        fill_from = 16
        if bar % plan.section_bars == plan.section_bars - 1 and rng.random() < 0.7:
            fill_from = int(pick(rng, (8, 12)))
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
            rate = int(pick(rng, (1, 2)))
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
    t = seconds_grid(1.5, sr)
    cycles = metal[:, None] * t + rng.uniform(0.0, 1.0, (len(metal), 1))
    squares = np.where(cycles % 1.0 < 0.5, 1.0, -1.0).mean(axis=0)  # like the 808: six detuned squares
    cymbal = rng.normal(size=t.size)
    hats = fft_filter((1 - hat_metal) * cymbal + hat_metal * squares, sr, lambda f: highpass(f, hat_cut, 3))
    crash = fft_filter(0.7 * cymbal + 0.3 * squares, sr, lambda f: highpass(f, 0.6 * hat_cut, 3))
    snares = fft_filter(rng.normal(size=int(1.1 * sr)), sr,
                         lambda f: highpass(f, snare_low, 2) * lowpass(f, snare_high, 2))
    snares /= np.abs(snares).max()

    def cut(bank: np.ndarray, start: float, seconds: float, decay: float) -> np.ndarray:
        begin = int(start * sr)
        return fade_out(bank[begin:begin + int(seconds * sr)] * np.exp(-t[:int(seconds * sr)] / decay))

    def kick() -> np.ndarray:
        k = t[:int(0.8 * sr)]
        freq = kick_end + (kick_start - kick_end) * np.exp(-k / kick_sweep)
        body = np.tanh(drive * np.sin(2 * np.pi * np.cumsum(freq) / sr)) / np.tanh(drive)
        click = 0.3 * snares[:k.size] * np.exp(-k / 0.003)
        return fade_out(body * np.exp(-k / kick_decay) + click)

    def snare(start: float) -> np.ndarray:
        k = t[:int(0.35 * sr)]
        body = (np.sin(2 * np.pi * snare_tone * k) + 0.5 * np.sin(2 * np.pi * 1.6 * snare_tone * k)) / 1.5
        return (1 - snappy) * fade_out(body * np.exp(-k / 0.045)) + snappy * cut(snares, start, 0.35, snare_decay)

    def tom(pitch: float) -> np.ndarray:
        k = t[:int(0.6 * sr)]
        freq = pitch * (1 + 0.4 * np.exp(-k / 0.03))
        x = np.sin(2 * np.pi * np.cumsum(freq) / sr) + 0.1 * snares[:k.size] * np.exp(-k / 0.01)
        return fade_out(x * np.exp(-k / tom_decay))

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

_BASS_PATTERNS = {
    "eighths": (0, 2, 4, 6, 8, 10, 12, 14),
    "quarters": (0, 4, 8, 12),
    "synco": (0, 3, 6, 8, 11, 14),
    "pushed": (0, 6, 10, 12),
    "long": (0, 8),
}


def bass_stem(plan: Plan, rng: np.random.Generator) -> np.ndarray:
    """Bass stem (2, n): root/fifth/octave lines on the chord roots, a filtered saw or square."""
    low = 28 + (plan.tonic - 4) % 12  # the tonic between E1 and D#2 (41-78 Hz)
    steps = _BASS_PATTERNS[pick(rng, sorted(_BASS_PATTERNS))]
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
            notes.append(Note(start, max(1, int(gate * (plan.sample(16 * bar + end) - start))), pitch,
                               rng.uniform(0.85, 1.0)))
    shape = square if rng.random() < 0.4 else saw
    sub = rng.uniform(0.0, 1.0)

    def harmonics(count: int) -> np.ndarray:
        amps = shape(count)
        amps[0] *= 1 + sub  # a stronger fundamental, like a sub oscillator
        return amps

    env = Adsr(rng.uniform(0.003, 0.012), rng.uniform(0.1, 0.4), rng.uniform(0.5, 0.9), rng.uniform(0.03, 0.08))
    wav = np.zeros((1, plan.n))
    render_voice(wav, np.ones(1), notes, plan, rng, harmonics, env)
    onsets = np.array([note.start for note in notes]) / plan.sr
    cutoff = envelope_cutoff(onsets, rng.uniform(150.0, 300.0), rng.uniform(1.0, 4.0), rng.uniform(0.04, 0.2))
    wav = stft_filter(wav, plan.sr, lambda times, freqs: lowpass(freqs, cutoff(times)[:, None], 2))
    return pan_stereo(wav[0], rng.uniform(-0.1, 0.1))


def _approach(plan: Plan, target: int, rng: np.random.Generator) -> int:
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


def vocals_stem(plan: Plan, rng: np.random.Generator) -> np.ndarray:
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
            put_at(inhale, onset - length - int(0.08 * sr), rng.uniform(0.3, 1.0) * np.hanning(length))
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
            put_at(amp, a, phrase_gain * shape)
            # Later notes overwrite the control points they share with this one.
            span = slice(a // 32, (b + release) // 32 + 2)
            since = (control[span] - a) / sr
            glide = smoothstep(np.clip(since / glide_time, 0.0, 1.0))
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
    source = oscillator(table, freq, sr, rng.uniform()) * amp
    noisy = np.flatnonzero(amp + inhale)
    source[noisy] += rng.standard_normal(noisy.size) * (breath * amp[noisy] + 0.03 * inhale[noisy])

    # Formants per 10 ms: the vowel of the sounding note, smoothed so vowels glide (70 ms).
    formant_times = np.arange(0.0, n / sr + 0.02, 0.01)
    note = np.clip(np.searchsorted(np.array(starts), formant_times * sr, side="right") - 1, 0, None)
    vowel = np.array(vowels, dtype=int)[note] if vowels else np.zeros(formant_times.size, dtype=int)
    formant_track = smooth_rows(_VOWEL_FORMANTS[vowel] * tract, 7)
    amp_track = smooth_rows(_VOWEL_AMPS[vowel], 7)
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
        return gain * (highpass(freqs, 90.0, 2) * (1 + np.square(freqs / 2500.0)) ** (-tilt / 2))

    wav = stft_filter(source[None], sr, formant_gain)[0]
    return pan_stereo(wav, rng.uniform(-0.15, 0.15))


def _melody(plan: Plan, rng: np.random.Generator,
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
        end = min(pos + int(pick(rng, (8, 12, 16, 24, 32))), max(total, pos + 2))
        phrase = []
        vowel = int(rng.integers(len(_VOWEL_FORMANTS)))
        while pos < end:
            length = min(int(pick(rng, (2, 2, 3, 4, 4, 6, 8))), end - pos)
            chord = plan.chord(pos // 16)
            tones = [i for i, p in enumerate(pitches) if p % 12 in chord]
            move = rng.random()
            if move < 0.25 or (pos % 8 == 0 and rng.random() < 0.6):
                index = min(tones, key=lambda i: (abs(i - index), i))
            else:
                index += int(pick(rng, (-1, 1) if move < 0.8 else (-2, 2)))
                index = abs(index) if index < 0 else 2 * (len(pitches) - 1) - index if index >= len(pitches) else index
            if rng.random() > 0.3:
                vowel = int(rng.integers(len(_VOWEL_FORMANTS)))
            phrase.append((pos, pos + length, pitches[index], vowel))
            pos += length
        phrases.append(phrase)
        pos = end + int(pick(rng, (4, 6, 8, 12, 16)))
    return phrases


def _glottal_table(harmonics: int, open_phase: float, close_phase: float) -> np.ndarray:
    """Band-limited wavetable of the Rosenberg glottal flow derivative (its first `harmonics`)."""
    grid = np.arange(8192) / 8192
    closing = (grid >= open_phase) & (grid < open_phase + close_phase)
    pulse = np.where(grid < open_phase, np.pi / (2 * open_phase) * np.sin(np.pi * grid / open_phase), 0.0)
    pulse[closing] = -np.pi / (2 * close_phase) * np.sin(np.pi * (grid[closing] - open_phase) / (2 * close_phase))
    return wavetable(np.fft.rfft(pulse)[1:harmonics + 1])


# --------------------------------------------------------------------------- other

def other_stem(plan: Plan, rng: np.random.Generator) -> np.ndarray:
    """Accompaniment stem (2, n): the chords, with two textures alternating by section."""
    names = sorted(_TEXTURES)
    first, second = rng.choice(len(names), size=2, replace=False)
    center = int(rng.integers(55, 63))
    out = np.zeros((2, plan.n))
    for i, name in enumerate((names[first], names[second])):
        bars = [bar for bar in range(plan.bars) if (bar // plan.section_bars) % 2 == i]
        if bars:
            part = _TEXTURES[name](plan, rng, bars, center)
            rms = active_rms(part)
            out += part / rms if rms > 0 else part  # textures at similar loudness
    return out


def _pad(plan: Plan, rng: np.random.Generator, bars: tp.List[int], center: int) -> np.ndarray:
    """Sustained chords of detuned saws under a slowly sweeping low-pass filter."""
    env = Adsr(rng.uniform(0.08, 0.4), 1.0, 1.0, rng.uniform(0.2, 0.5))
    detune, spread = rng.uniform(4.0, 12.0), rng.uniform(0.3, 0.7)
    voices = _chord_notes(plan, bars, center, (0,), 1.0, len(plan.chord(0)))  # no doubling: 2 oscillators each
    out = np.zeros((2, plan.n))
    for j, notes in enumerate(voices):
        pan = spread * (2 * j / (len(voices) - 1) - 1)
        for side in (-1.0, 1.0):  # two detuned oscillators per voice, panned apart
            gains = pan_gains(float(np.clip(pan + 0.3 * side, -1, 1)))
            render_voice(out, gains, notes, plan, rng, saw, env, detune=side * detune)
    cutoff, depth = rng.uniform(700.0, 2000.0), rng.uniform(0.4, 1.2)
    rate, phase = rng.uniform(0.08, 0.25), rng.uniform(0, 2 * np.pi)

    def sweep(times: np.ndarray, freqs: np.ndarray) -> np.ndarray:
        moving = cutoff * 2 ** (depth * np.sin(2 * np.pi * rate * times + phase))
        return lowpass(freqs, moving[:, None], 2)

    return stft_filter(out, plan.sr, sweep)


def _organ(plan: Plan, rng: np.random.Generator, bars: tp.List[int], center: int) -> np.ndarray:
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
    env = Adsr(0.008, 1.0, 1.0, 0.05)
    spread = rng.uniform(0.2, 0.5)
    out = np.zeros((2, plan.n))
    for j, notes in enumerate(voices):
        render_voice(out, pan_gains(spread * (2 * j / (len(voices) - 1) - 1)), notes, plan, rng, harmonics, env)
    t = np.arange(plan.n) / plan.sr
    return out * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(5.0, 7.0) * t))


_STAB_RHYTHMS = ((0, 3, 6, 10, 12), (2, 6, 10, 14), (0, 6, 12), (0, 4, 8, 12), (0, 3, 8, 11))


def _pluck(plan: Plan, rng: np.random.Generator, bars: tp.List[int], center: int) -> np.ndarray:
    """Rhythmic plucked chords: fast decay and a filter that closes after each stab."""
    steps = _STAB_RHYTHMS[int(rng.integers(len(_STAB_RHYTHMS)))]
    voices = _chord_notes(plan, bars, center, steps, 0.9, 4 if rng.random() < 0.5 else 3)
    shape = square if rng.random() < 0.4 else saw
    env = Adsr(0.003, rng.uniform(0.08, 0.35), 0.0, 0.05)
    spread = rng.uniform(0.2, 0.6)
    out = np.zeros((2, plan.n))
    for j, notes in enumerate(voices):
        render_voice(out, pan_gains(spread * (2 * j / (len(voices) - 1) - 1)), notes, plan, rng, shape, env)
    onsets = np.array([note.start for note in voices[0]]) / plan.sr
    cutoff = envelope_cutoff(onsets, rng.uniform(500.0, 1000.0), rng.uniform(2.0, 8.0), rng.uniform(0.03, 0.12))
    return stft_filter(out, plan.sr, lambda times, freqs: lowpass(freqs, cutoff(times)[:, None], 2))


def _arpeggio(plan: Plan, rng: np.random.Generator, bars: tp.List[int], center: int) -> np.ndarray:
    """Chord tones one at a time over two octaves (up, down, up-down or random), ping-ponged."""
    rate = 1 if plan.step > 0.1 and rng.random() < 0.5 else 2
    order = pick(rng, ("up", "down", "updown", "random"))
    env = Adsr(0.003, rng.uniform(0.12, 0.4), 0.0, 0.06)
    shape = square if rng.random() < 0.5 else saw
    voices: tp.List[tp.List[Note]] = [[], []]
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
            voices[k % 2].append(Note(start, int(0.9 * (plan.sample(16 * bar + s + rate) - start)), pitch,
                                       rng.uniform(0.7, 1.0)))
            k += 1
    width = rng.uniform(0.3, 0.6)
    out = np.zeros((2, plan.n))
    for voice, pan in zip(voices, (-width, width)):
        render_voice(out, pan_gains(pan), voice, plan, rng, shape, env)
    onsets = np.sort([note.start for voice in voices for note in voice]) / plan.sr
    cutoff = envelope_cutoff(onsets, rng.uniform(600.0, 1200.0), rng.uniform(1.0, 5.0), rng.uniform(0.05, 0.2))
    return stft_filter(out, plan.sr, lambda times, freqs: lowpass(freqs, cutoff(times)[:, None], 2))


_TEXTURES: tp.Dict[str, tp.Callable[[Plan, np.random.Generator, tp.List[int], int], np.ndarray]] = {
    "pad": _pad, "organ": _organ, "pluck": _pluck, "arpeggio": _arpeggio,
}


def _voicing(pitch_classes: tp.List[int], center: int) -> tp.List[int]:
    """The chord in close position within the octave around `center` (smooth voice leading)."""
    low = center - 6
    return sorted(low + (pc - low) % 12 for pc in pitch_classes)


def _chord_notes(plan: Plan, bars: tp.List[int], center: int, steps: tp.Sequence[int], gate: float,
                 voices: int) -> tp.List[tp.List[Note]]:
    """Notes of each chord voice: every bar's chord struck at `steps` (the top may double the root)."""
    parts: tp.List[tp.List[Note]] = [[] for _ in range(voices)]
    for bar in bars:
        pitches = _voicing(plan.chord(bar), center)
        pitches = (pitches + [pitches[0] + 12])[:voices]
        for i, s in enumerate(steps):
            end = steps[i + 1] if i + 1 < len(steps) else 16
            start = plan.sample(16 * bar + s)
            length = max(1, int(gate * (plan.sample(16 * bar + end) - start)))
            for part, pitch in zip(parts, pitches):
                part.append(Note(start, length, pitch))
    return parts


