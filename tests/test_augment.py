"""Training augmentations: shapes, statistics, reproducibility and config errors."""
import pytest
import torch

from demixlab.training.augment import AugmentConfig, FlipChannels, FlipSign, Remix, Scale, Shift, build_augmentation
from demixlab.errors import DemixError
from tests.schema import parse_with


def batch(b=8, s=4, c=2, t=64):
    return torch.randn(b, s, c, t, generator=torch.Generator().manual_seed(0))


def test_shift_crops_extra_frames_to_a_window_of_the_input():
    sources = batch(t=100)
    out = Shift(20)(sources, torch.Generator().manual_seed(0))
    assert out.shape == (8, 4, 2, 80)
    offsets = set()
    for b in range(8):
        for s in range(4):
            windows = [k for k in range(21) if torch.equal(out[b, s], sources[b, s, :, k:k + 80])]
            assert len(windows) == 1
            offsets.add(windows[0])
    assert len(offsets) > 1  # offsets are drawn per example and source


def test_flips_and_scale_act_per_example_and_source():
    sources = batch()
    generator = torch.Generator().manual_seed(3)
    swapped = FlipChannels()(sources, generator)
    same = (swapped == sources).flatten(2).all(-1)
    flipped = (swapped == sources.flip(2)).flatten(2).all(-1)
    assert torch.all(same | flipped) and same.any() and flipped.any()
    signs = FlipSign()(sources, generator) / sources
    assert set(signs.round().unique().tolist()) == {-1.0, 1.0}
    gains = (Scale(0.25, 1.25)(sources, generator) / sources).flatten(2)
    assert torch.allclose(gains, gains[..., :1].expand_as(gains), rtol=1e-5)
    assert gains.min() >= 0.25 - 1e-6 and gains.max() <= 1.25 + 1e-6


@pytest.mark.parametrize("group_size, groups", [(0, [range(8)]), (4, [range(4), range(4, 8)]),
                                                (3, [range(3), range(3, 6), range(6, 8)])])
def test_remix_permutes_each_source_within_its_group(group_size, groups):
    sources = batch()
    out = Remix(group_size)(sources, torch.Generator().manual_seed(5))
    for s in range(4):
        origins = [next(b for b in range(8) if torch.equal(out[i, s], sources[b, s])) for i in range(8)]
        for group in groups:  # a permutation inside each group: every stem used once
            assert sorted(origins[i] for i in group) == list(group)
    assert not torch.equal(out, sources)


def test_pipeline_is_reproducible_from_its_generator_and_reports_extra_frames():
    cfg = AugmentConfig(**{"shift": 0.5, "flip_channels": True, "flip_sign": True, "scale": [0.25, 1.25],
                            "remix": 4})
    augmentation = build_augmentation(cfg, samplerate=100)
    assert augmentation.extra_frames == 50
    sources = batch(t=114)
    first = augmentation(sources, torch.Generator().manual_seed(7))
    second = augmentation(sources, torch.Generator().manual_seed(7))
    assert first.shape == (8, 4, 2, 64)
    assert torch.equal(first, second)
    assert not torch.equal(first, augmentation(sources, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("override, message", [
    ({"scale": [1.5, 0.5]}, "augment.scale must be [low, high] with 0 <= low <= high"),
    ({"scale": "loud"}, "augment.scale"),
    ({"shift": -1}, "augment.shift must be >= 0"),
    ({"reverb": True}, "augment.reverb"),
    ({"remix": True}, "augment.remix"),
    ({"remix": -2}, "augment.remix must be a group size"),
])
def test_bad_augmentation_options_name_the_key(override, message):
    with pytest.raises(DemixError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_with({f"augment.{key}": value for key, value in override.items()})
