"""The built-in synthetic multitrack dataset ("toy"), generated on first use in MUSDB18-HQ layout.

Every track is a short synthesized song: drums, a bass line, a sung-like vocal melody and a chord
accompaniment ("other"), all following one random key, mode, tempo and chord progression. The
audio is a pure function of the seed, so the dataset is regenerated where it is needed instead
of being shipped. Only numpy is used for the signal processing: oscillators are band-limited
wavetables and every filter is a zero-phase magnitude response applied in the STFT domain, which
keeps the whole synthesis vectorised.

Modules: :mod:`.synthesis` (the spec, seeds and the stems of one track), :mod:`.plan` (the
musical skeleton), :mod:`.instruments` (drums, bass, vocals, other), :mod:`.dsp` (oscillators,
envelopes, filters) and :mod:`.cache` (generating the dataset once into the cache, atomically).
"""
from .cache import GENERATOR_VERSION, ensure_toy_dataset, toy_dataset_name
from .synthesis import PEAK, SPLITS, TOY_SOURCES, ToySpec, mix_stems, synthesize_track, track_seed

__all__ = ["GENERATOR_VERSION", "PEAK", "SPLITS", "TOY_SOURCES", "ToySpec", "ensure_toy_dataset", "mix_stems",
           "synthesize_track", "toy_dataset_name", "track_seed"]
