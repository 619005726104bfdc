"""Chunked overlap-add separation: exactness, shifts and memory-bounded chunking."""
import pytest
import torch

from demixlab.separation import apply_model
from demixlab.errors import DemixError
from demixlab.models import SeparationModel


class GainModel(SeparationModel):
    """A linear, time-invariant 'separator': two sources, x * 2 and -x; records chunk lengths."""

    def __init__(self):
        super().__init__(["double", "negated"], samplerate=100, audio_channels=2)
        self.seen = []

    def forward(self, mixture):
        self.seen.append(mixture.shape[-1])
        return torch.stack([2 * mixture, -mixture], dim=1)


@pytest.mark.parametrize("segment", [None, 50, 100, 1037, 5000])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_overlap_add_is_exact_for_a_linear_model(segment, overlap):
    mixture = torch.randn(2, 2, 1037, generator=torch.Generator().manual_seed(0))
    model = GainModel()
    out = apply_model(model, mixture, segment=segment, overlap=overlap)
    assert out.shape == (2, 2, 2, 1037)
    torch.testing.assert_close(out[:, 0], 2 * mixture, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1], -mixture, rtol=1e-5, atol=1e-5)


def test_chunks_have_the_segment_length_so_memory_is_bounded():
    model = GainModel()
    apply_model(model, torch.randn(1, 2, 10_000), segment=300, overlap=0.25)
    assert set(model.seen) == {300}  # the last chunk is zero-padded to the segment
    assert len(model.seen) == -(-(10_000 - 300) // 225) + 1


def test_shifts_are_reproducible_and_exact_for_a_linear_model():
    mixture = torch.randn(1, 2, 700, generator=torch.Generator().manual_seed(1))
    first = apply_model(GainModel(), mixture, segment=200, shifts=3, generator=torch.Generator().manual_seed(4))
    second = apply_model(GainModel(), mixture, segment=200, shifts=3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    torch.testing.assert_close(first[:, 0], 2 * mixture, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_user_errors():
    with pytest.raises(DemixError, match="overlap"):
        apply_model(GainModel(), torch.randn(1, 2, 10), overlap=1.0)
    with pytest.raises(DemixError, match="batch, channels, time"):
        apply_model(GainModel(), torch.randn(2, 10))


def test_parallel_chunk_jobs_give_the_same_result_with_the_same_chunks():
    mixture = torch.randn(1, 2, 5000, generator=torch.Generator().manual_seed(1))
    sequential, parallel = GainModel(), GainModel()
    expected = apply_model(sequential, mixture, segment=300, overlap=0.25)
    out = apply_model(parallel, mixture, segment=300, overlap=0.25, jobs=3)
    torch.testing.assert_close(out, expected)
    assert sorted(parallel.seen) == sorted(sequential.seen)
    with pytest.raises(DemixError, match="jobs must be at least 1"):
        apply_model(GainModel(), mixture, segment=300, jobs=0)
