"""Effect augmentations run where examples are read: pitch/tempo, EQ, distortion, reverb, MP3."""
import builtins
import json
import typing as tp

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from demixlab.data import SegmentDataset
from demixlab.errors import DemixError
from demixlab.experiment import config_digest
from demixlab.train import main
from demixlab.training.augment import AugmentConfig, build_augmentation, build_example_effects
from demixlab.training.effects import (CodecConfig, DistortionConfig, EqConfig, ExampleEffects, PitchTempoConfig,
                                       ReverbConfig)
from tests.cli import TINY
from tests.schema import parse_with
from tests.test_data import build, dset_config, make_dataset
from tests.test_solver import RUN, _resume_matches_an_uninterrupted_run, run_in  # noqa: F401

pytest.importorskip("pedalboard")

SR = 16000


def effects(**options: tp.Any) -> ExampleEffects:
    configs = {"pitch_tempo": PitchTempoConfig, "codec": CodecConfig, "eq": EqConfig, "reverb": ReverbConfig,
               "distortion": DistortionConfig}
    return ExampleEffects(SR, **{name: cls(**options.get(name, {})) for name, cls in configs.items()})


def sine(frequency: float, frames: int, channels: int = 2) -> np.ndarray:
    return np.tile(0.3 * np.sin(2 * np.pi * frequency * np.arange(frames) / SR), (channels, 1)).astype(np.float32)


def peak_frequency(wav: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wav[0] * np.hanning(wav.shape[-1])))
    return float(np.argmax(spectrum) * SR / wav.shape[-1])


def test_off_by_default_and_left_out_of_the_digest():
    assert build_example_effects(AugmentConfig(), SR) is None
    assert build_example_effects(parse_with({}).augment, SR) is None
    default = main.get_xp([])
    explicit = main.get_xp(["augment.reverb.probability=0.0", "augment.reverb.wet=[0.1,0.2]", "dset.unaligned=0.0"])
    assert config_digest(explicit.cfg) == config_digest(default.cfg)
    assert config_digest(main.get_xp(["augment.reverb.probability=0.5"]).cfg) != config_digest(default.cfg)
    codec = main.get_xp(["augment.codec.probability=0.5"])  # digests of codec XPs made before `target`
    assert config_digest(main.get_xp(["augment.codec.probability=0.5", "augment.codec.target=stems"]).cfg) == \
        config_digest(codec.cfg)


def test_pitch_shift_moves_every_source_by_the_same_whole_number_of_semitones():
    transform = effects(pitch_tempo={"probability": 1.0, "semitones": 4, "tempo": 0.0})
    frames = SR
    assert transform.input_frames(frames) > frames
    sources = np.stack([sine(440, transform.input_frames(frames)), sine(440, transform.input_frames(frames)),
                        np.zeros((2, transform.input_frames(frames)), np.float32)])
    shifts = set()
    for seed in range(6):
        out = transform(sources, frames, np.random.default_rng(seed))
        assert out.shape == (3, 2, frames) and out.dtype == np.float32
        np.testing.assert_array_equal(out[0], out[1])  # sources alike: still aligned
        assert not out[2].any()  # silence stays silence
        semitones = 12 * np.log2(peak_frequency(out[0, :, 2000:]) / 440)
        assert abs(semitones - round(semitones)) < 0.3 and abs(semitones) <= 4.3
        shifts.add(round(semitones))
        np.testing.assert_array_equal(transform(sources, frames, np.random.default_rng(seed)), out)
    assert len(shifts) > 1


def test_tempo_change_moves_an_onset_within_the_range():
    transform = effects(pitch_tempo={"probability": 1.0, "semitones": 0, "tempo": 0.3})
    frames = SR
    length = transform.input_frames(frames)
    wav = np.zeros((1, 2, length), np.float32)
    onset = SR // 2
    wav[0, :, onset:onset + 2000] = sine(1000, 2000)
    positions = set()
    for seed in range(5):
        out = transform(wav, frames, np.random.default_rng(seed))[0, 0]
        start = int(np.argmax(np.abs(out) > 0.1))
        assert onset / 1.3 - 400 <= start <= onset / 0.7 + 400
        positions.add(start // 200)
    assert len(positions) > 1


@pytest.mark.parametrize("name, options", [
    ("eq", {"gain_db": 12.0, "frequency": [800.0, 1200.0]}),
    ("distortion", {"drive_db": [20.0, 30.0]}),
    ("reverb", {"room_size": [0.8, 0.9], "wet": [0.5, 0.6]}),
    ("codec", {"quality": [9.0, 9.5]}),
])
def test_each_per_source_effect_changes_the_stems_it_draws_deterministically(name, options):
    transform = effects(**{name: {"probability": 0.5, **options}})
    sources = np.stack([sine(1000 + 100 * k, 8000) * (1 + 0.5 * np.sin(np.arange(8000) / 500)) for k in range(8)])
    sources = sources.astype(np.float32)
    out = transform(sources, 8000, np.random.default_rng(3))
    assert out.shape == sources.shape and np.isfinite(out).all()
    changed = [not np.allclose(a, b, atol=1e-3) for a, b in zip(out, sources)]
    assert 0 < sum(changed) < 8  # drawn per source
    np.testing.assert_array_equal(transform(sources, 8000, np.random.default_rng(3)), out)


def test_effects_run_in_the_dataset_and_workers_see_the_same_examples(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",), frames=8000, samplerate=SR)
    transform = effects(pitch_tempo={"probability": 0.5}, eq={"probability": 0.5}, codec={"probability": 0.3})
    plain = build(dset_config(root, samplerate=SR), tmp_path, segment=0.1, samples_per_track=2).train
    dataset = SegmentDataset(plain.tracks, plain.segment_frames, 2, plain.seed, transform=transform)
    items = [(4, index) for index in range(len(dataset))]
    alone = [dataset[item] for item in items]
    assert alone[0].shape == (4, 2, 1600)
    assert any(not torch.equal(example, plain[item]) for example, item in zip(alone, items))
    workers = torch.cat(list(DataLoader(dataset, batch_size=2, sampler=items, num_workers=2)))
    assert torch.equal(workers, torch.stack(alone))


DEVICE_OFF = {"augment.flip_channels": False, "augment.scale": None, "augment.remix": 0}


def test_codec_on_the_mixture_adds_its_residual_and_leaves_the_targets_clean():
    import pedalboard

    transform = effects(codec={"probability": 1.0, "quality": [6.0, 6.0], "target": "mixture"})
    sources = np.stack([sine(300 + 200 * k, 8000) * (1 + 0.5 * np.sin(np.arange(8000) / (300 + k)))
                        for k in range(3)]).astype(np.float32)
    out = transform(sources, 8000, np.random.default_rng(3))
    assert out.shape == (4, 2, 8000) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:3], sources)  # the targets are not compressed
    mixture = sources.sum(0)
    expected = pedalboard.MP3Compressor(vbr_quality=6.0)(mixture, float(SR))[:, :8000] - mixture
    np.testing.assert_array_equal(out[3], expected)  # mp3(mixture) - mixture
    assert np.abs(out[3]).max() > 1e-3 and np.abs(out[3]).max() < np.abs(mixture).max()
    # Per example: drawn or not (then zeros), the same draws every time.
    half = effects(codec={"probability": 0.5, "target": "mixture"})
    residuals = [half(sources, 8000, np.random.default_rng(seed))[3] for seed in range(8)]
    assert 0 < sum(bool(residual.any()) for residual in residuals) < 8
    np.testing.assert_array_equal(half(sources, 8000, np.random.default_rng(5))[3], residuals[5])


def test_codec_residual_batches_are_the_same_in_workers_and_feed_the_model_input(tmp_path):
    root = make_dataset(tmp_path / "data", valid=("v",), frames=8000, samplerate=SR)
    plain = build(dset_config(root, samplerate=SR), tmp_path, segment=0.1, samples_per_track=4).train
    on_mixture = effects(eq={"probability": 0.5}, codec={"probability": 0.5, "target": "mixture"})
    dataset = SegmentDataset(plain.tracks, plain.segment_frames, 4, plain.seed, transform=on_mixture)
    clean = SegmentDataset(plain.tracks, plain.segment_frames, 4, plain.seed, transform=effects(eq={"probability": 0.5}))
    items = [(2, index) for index in range(len(dataset))]
    alone = torch.stack([dataset[item] for item in items])
    assert alone.shape == (len(items), 5, 2, 1600)
    for workers in (1, 2):
        loaded = torch.cat(list(DataLoader(dataset, batch_size=3, sampler=items, num_workers=workers)))
        assert torch.equal(loaded, alone)
    # The sources are those of the same examples without the mixture codec (its draws come last).
    assert torch.equal(alone[:, :4], torch.stack([clean[item] for item in items]))
    assert 0 < sum(bool(residual.any()) for residual in alone[:, 4]) < len(items)
    config = parse_with({"augment.codec.probability": 0.5, "augment.codec.target": "mixture", **DEVICE_OFF}).augment
    augmentation = build_augmentation(config, SR)
    assert augmentation.codec_residual and len(augmentation.transforms) == 0
    generator = torch.Generator().manual_seed(0)
    mixture, sources = augmentation.model_input(alone, generator)
    assert torch.equal(sources, alone[:, :4])  # the targets: untouched
    assert torch.equal(mixture, alone[:, :4].sum(dim=1) + alone[:, 4])  # the input: their sum plus the residual
    assert build_augmentation(AugmentConfig(), SR).model_input(alone[:, :4], None)[0].equal(alone[:, :4].sum(dim=1))


def test_codec_on_the_mixture_refuses_per_source_device_augmentations():
    with pytest.raises(DemixError) as error:
        parse_with({"augment.codec.probability": 0.5, "augment.codec.target": "mixture"})
    message = str(error.value)
    assert "\n" not in message
    for fragment in ("augment.codec.target=mixture cannot be combined with augment.flip_channels, augment.scale, "
                     "augment.remix", "set augment.flip_channels=false augment.scale=null augment.remix=0",
                     "augment.codec.target=stems"):
        assert fragment in message
    with pytest.raises(DemixError, match="augment.shift"):
        parse_with({"augment.codec.probability": 0.5, "augment.codec.target": "mixture", "augment.shift": 0.5,
                    **DEVICE_OFF})
    with pytest.raises(DemixError, match=r"augment.codec.target='mix': expected one of stems, mixture"):
        parse_with({"augment.codec.target": "mix"})
    assert parse_with({"augment.codec.target": "mixture"}).augment.codec.target == "mixture"  # off: nothing to refuse


def test_errors_name_the_option(monkeypatch):
    with pytest.raises(DemixError, match=r"augment.pitch_tempo.probability=2"):
        parse_with({"augment.pitch_tempo.probability": 2})
    with pytest.raises(DemixError, match=r"augment.codec.quality=\[9.0, 2.0\]"):
        parse_with({"augment.codec.quality": [9.0, 2.0]})
    with pytest.raises(DemixError, match=r"augment.eq: expected a section"):
        parse_with({"augment.eq": 0.5})
    with pytest.raises(DemixError, match="augment.codec: MP3 cannot encode 96000 Hz"):
        ExampleEffects(96000, PitchTempoConfig(), CodecConfig(probability=0.5), EqConfig(), ReverbConfig(),
                       DistortionConfig())
    real_import = builtins.__import__

    def no_pedalboard(name, *args, **kwargs):
        if name == "pedalboard":
            raise ImportError("no pedalboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pedalboard)
    with pytest.raises(DemixError, match="augment.reverb needs pedalboard"):
        effects(reverb={"probability": 0.1})
    assert build_example_effects(AugmentConfig(), SR) is None  # off: pedalboard is not needed


@pytest.mark.slow
def test_training_with_every_effect_and_a_time_shift(in_process, tmp_path):
    effects_on = [f"augment.{name}.probability=0.5" for name in ("pitch_tempo", "codec", "eq", "reverb", "distortion")]
    assert in_process(*TINY, "epochs=1", "augment.shift=0.5", *effects_on) == 0
    history, = json.loads(next((tmp_path / "outputs" / "xps").iterdir()).joinpath("history.json").read_text())
    assert np.isfinite(history["train"]["loss"])


@pytest.mark.slow
def test_training_with_the_codec_on_the_mixture_resumes_exactly(tmp_path, run_in, monkeypatch):
    codec = ["augment.codec.probability=0.5", "augment.codec.target=mixture", "augment.flip_channels=false",
             "augment.scale=null", "augment.remix=0"]
    checkpoint = _resume_matches_an_uninterrupted_run(
        tmp_path, run_in, monkeypatch, [*[arg for arg in RUN if not arg.startswith("epochs=")], *codec, "epochs=2"])
    assert len(checkpoint["history"]) == 2 and np.isfinite(checkpoint["history"][-1]["train"]["loss"])
