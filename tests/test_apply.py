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


class BatchedGainModel(GainModel):
    """GainModel that also records the batch size of every forward pass."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, mixture):
        self.batches.append(mixture.shape[0])
        return super().forward(mixture) * torch.linspace(0.5, 1.5, mixture.shape[-1])  # position-dependent


@pytest.mark.parametrize("batch_chunks,jobs", [(2, 1), (3, 1), (4, 2), (100, 1)])
def test_batched_chunks_are_bit_identical_to_one_chunk_at_a_time(batch_chunks, jobs):
    mixture = torch.randn(2, 2, 5000, generator=torch.Generator().manual_seed(2))
    single, batched = BatchedGainModel(), BatchedGainModel()
    expected = apply_model(single, mixture, segment=300, overlap=0.25, shifts=2,
                           generator=torch.Generator().manual_seed(5))
    out = apply_model(batched, mixture, segment=300, overlap=0.25, shifts=2, jobs=jobs, batch_chunks=batch_chunks,
                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, expected)
    chunks = len(single.batches)  # per shift pass: ceil(chunks / batch_chunks) passes of up to N chunks
    assert set(single.batches) == {2} and sum(batched.batches) == 2 * chunks
    assert max(batched.batches) == 2 * min(batch_chunks, chunks // 2) and len(batched.batches) < chunks
    with pytest.raises(DemixError, match="batch_chunks must be a positive number of chunks, got 0"):
        apply_model(GainModel(), mixture, segment=300, batch_chunks=0)


def test_batched_chunks_of_a_trained_family_match_within_float_rounding():
    from demixlab.models import get_family

    torch.manual_seed(0)
    model = get_family("umx").build_model(["a", "b"], 8000, 2, dict(n_fft=256, hop_length=64, hidden_size=16,
                                                                    nb_layers=2, bandwidth=3000.0)).eval()
    mixture = torch.randn(1, 2, 8000, generator=torch.Generator().manual_seed(0))
    expected = apply_model(model, mixture, segment=1000, overlap=0.25)
    out = apply_model(model, mixture, segment=1000, overlap=0.25, batch_chunks=4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert not out.is_inference() and not apply_model(model, mixture).is_inference()  # callers may scale in place
