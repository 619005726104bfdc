"""The Open-Unmix family, checked against the reference `openunmix` package."""
import numpy as np
import pytest
import torch
from torch import nn

from demixlab.errors import DemixError
from demixlab.models import get_family
from demixlab.models.openunmix.umx import (UMX, OpenUnmixTarget, build_umx_objective, calibrate_umx,
                                 clean_reference_state)
from tests.references import import_reference

openunmix = import_reference("openunmix")
from openunmix.model import OpenUnmix, Separator  # noqa: E402

SOURCES = ["drums", "bass", "other", "vocals"]
PARAMS_PER_TARGET = 8_893_348


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Give the normalisation vectors and batch-norm statistics non-trivial values."""
    generator = torch.Generator().manual_seed(seed)

    def fill(tensor, low, high):
        tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))

    with torch.no_grad():
        fill(module.input_mean, -1.0, 0.0)
        fill(module.input_scale, 0.5, 2.0)
        fill(module.output_scale, 0.5, 1.5)
        fill(module.output_mean, 0.5, 1.5)
        for bn in (module.bn1, module.bn2, module.bn3):
            fill(bn.running_mean, -0.5, 0.5)
            fill(bn.running_var, 0.5, 2.0)
            fill(bn.weight, 0.5, 1.5)
            fill(bn.bias, -0.2, 0.2)
    return module


@pytest.fixture(scope="module")
def references():
    """Four random reference targets (full size, stereo, 44.1 kHz settings), in eval mode."""
    torch.manual_seed(0)
    return {name: _randomise(OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=512, max_bin=1487), seed).eval()
            for seed, name in enumerate(SOURCES)}


@pytest.fixture(scope="module")
def mixture():
    generator = torch.Generator().manual_seed(1)
    return 0.3 * torch.randn(2, 2, int(2.5 * 44100), generator=generator)


def _small_umx(**kwargs) -> UMX:
    options = dict(n_fft=512, hop_length=128, hidden_size=16, nb_layers=2, bandwidth=4000.0)
    options.update(kwargs)
    return UMX(["a", "b", "c"], 16000, 2, **options)


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_parameter_count():
    assert _count(OpenUnmixTarget(nb_bins=2049, nb_channels=2, hidden_size=512, max_bin=1487)) == PARAMS_PER_TARGET
    model = UMX(SOURCES, 44100, 2)
    assert model.max_bin == 1487 and model.nb_bins == 2049
    assert _count(model) == 4 * PARAMS_PER_TARGET


def test_state_dict_keys_match_reference():
    model = UMX(SOURCES, 44100, 2)
    reference_keys = list(OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=512, max_bin=1487).state_dict())
    expected = [f"targets.{name}.{key}" for name in SOURCES for key in reference_keys]
    assert list(model.state_dict()) == expected


def test_clean_reference_state():
    state = OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=512, max_bin=1487).state_dict()
    old = dict(state, **{"stft.window": torch.ones(4096), "transform.0.window": torch.ones(4096),
                         "sample_rate": torch.tensor(44100.0)})
    target = OpenUnmixTarget(nb_bins=2049, nb_channels=2, hidden_size=512, max_bin=1487)
    with pytest.raises(RuntimeError):
        target.load_state_dict(old, strict=True)
    target.load_state_dict(clean_reference_state(old), strict=True)


def test_target_matches_openunmix(references, mixture):
    reference = references["vocals"]
    target = OpenUnmixTarget(nb_bins=2049, nb_channels=2, hidden_size=512, nb_layers=3, max_bin=1487)
    target.load_state_dict(reference.state_dict(), strict=True)
    target.eval()
    spec = torch.stft(mixture.reshape(-1, mixture.shape[-1]), 4096, 1024, window=torch.hann_window(4096),
                      return_complex=True).abs().reshape(2, 2, 2049, -1)
    with torch.no_grad():
        expected = reference(spec.clone())
        out = target(spec)
    assert out.shape == spec.shape
    assert float((out - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def _umx_from(references, **kwargs) -> UMX:
    model = UMX(SOURCES, 44100, 2, **kwargs)
    for name, target in model.targets.items():
        target.load_state_dict(references[name].state_dict(), strict=True)
    return model.eval()


@pytest.mark.parametrize("window, residual", [(300, False), (40, False), (300, True)])
def test_separation_matches_openunmix(references, mixture, window, residual):
    # With `residual`, Open-Unmix gets three targets plus its residual; we get four sources,
    # the last without a network.
    names = SOURCES[:-1] if residual else SOURCES
    separator = Separator({name: references[name] for name in names}, niter=1, residual=residual,
                          wiener_win_len=window, n_fft=4096, n_hop=1024, nb_channels=2).eval()
    model = _umx_from(references, wiener_iterations=1, wiener_window=window, residual=residual)
    assert list(model.targets) == names
    with torch.no_grad():
        expected = separator(mixture)
        out = model(mixture)
    assert out.shape == expected.shape == (2, 4, 2, mixture.shape[-1])
    # Measured: about 1.2e-7 (float32) for waveforms peaking near 0.5.
    assert float((out - expected).abs().max()) < 1e-6


def test_for_loss_outputs_magnitudes(references, mixture):
    model = _umx_from(references)
    with torch.no_grad():
        estimates = model(mixture, for_loss=True)
        spec = model.stft(mixture).abs()
        expected = torch.stack([references[name](spec.clone()) for name in SOURCES], dim=1)
    assert estimates.shape == (2, 4, 2, 2049, mixture.shape[-1] // 1024 + 1)
    assert float((estimates - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_residual_magnitude_in_loss_output():
    model = _small_umx(residual=True).eval()
    assert model.network_sources == ["a", "b"] and list(model.targets) == ["a", "b"]
    mixture = torch.randn(2, 2, 4001)
    with torch.no_grad():
        estimates = model(mixture, for_loss=True)
        spec = model.stft(mixture).abs()
    assert estimates.shape == (2, 3, 2, 257, 4001 // 128 + 1)
    assert torch.allclose(estimates[:, 2], (spec - estimates[:, :2].sum(dim=1)).abs())
    assert model(mixture).shape == (2, 3, 2, 4001)


def test_output_length_and_mono():
    model = UMX(["x", "y"], 16000, 1, n_fft=256, hop_length=64, hidden_size=8, nb_layers=1, bandwidth=8000.0,
                wiener_window=5).eval()
    mixture = torch.randn(3, 1, 3333)
    with torch.no_grad():
        assert model(mixture).shape == (3, 2, 1, 3333)
        assert model(mixture, for_loss=True).shape == (3, 2, 1, 129, 3333 // 64 + 1)


def test_unidirectional_parameters_match_reference():
    model = UMX(["x"], 44100, 2, hidden_size=64, nb_layers=2, unidirectional=True)
    reference = OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=64, nb_layers=2, unidirectional=True, max_bin=1487)
    model.targets["x"].load_state_dict(reference.state_dict(), strict=True)
    assert _count(model) == _count(reference)


@pytest.mark.parametrize("kwargs, key", [
    (dict(bandwidth=30000.0), "model.bandwidth"),
    (dict(hop_length=0), "model.hop_length"),
    (dict(hidden_size=15), "model.hidden_size"),
    (dict(nb_layers=0), "model.nb_layers"),
    (dict(wiener_iterations=-1), "model.wiener_iterations"),
    (dict(wiener_window=0), "model.wiener_window"),
])
def test_invalid_options(kwargs, key):
    with pytest.raises(DemixError, match=key):
        UMX(SOURCES, 44100, 2, **kwargs)


def test_residual_needs_two_sources():
    with pytest.raises(DemixError, match="model.residual"):
        UMX(["vocals"], 44100, 2, residual=True)


def test_family_registered():
    family = get_family("umx")
    assert family.model_class is UMX
    assert family.build_objective is build_umx_objective
    assert family.calibrate is calibrate_umx


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: only forwards calls."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _batch(seed=0, batch=2, sources=3, length=4001):
    generator = torch.Generator().manual_seed(seed)
    references = torch.randn(batch, sources, 2, length, generator=generator) * 0.2
    return references.sum(dim=1), references


def _direct_errors(model: UMX, mixture: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        estimates = model(mixture, for_loss=True)
        spec = torch.stft(references.reshape(-1, references.shape[-1]), model.stft.n_fft, model.stft.hop_length,
                          window=torch.hann_window(model.stft.n_fft), return_complex=True).abs()
        spec = spec.reshape(*references.shape[:-1], *spec.shape[-2:])
    return torch.stack([nn.functional.mse_loss(estimates[:, k], spec[:, k]) for k in range(references.shape[1])])


def test_objective_is_the_magnitude_mse():
    model = _small_umx().eval()
    objective = build_umx_objective(model)
    mixture, references = _batch()
    metrics = objective(_Wrapper(model), mixture, references)
    errors = _direct_errors(model, mixture, references)
    assert set(metrics) == {"loss", "loss_a", "loss_b", "loss_c"}
    assert torch.allclose(metrics["loss"], errors.mean(), rtol=1e-5)
    for k, name in enumerate("abc"):
        assert torch.allclose(metrics[f"loss_{name}"], errors[k], rtol=1e-5)
        assert not metrics[f"loss_{name}"].requires_grad


def test_objective_source_weights():
    model = _small_umx().eval()
    mixture, references = _batch()
    errors = _direct_errors(model, mixture, references)
    objective = build_umx_objective(model, source_weights={"a": 2.0, "c": 0.0})
    expected = (2 * errors[0] + errors[1]) / 3
    assert torch.allclose(objective(model, mixture, references)["loss"], expected, rtol=1e-5)


def test_objective_with_residual_trains_networked_sources_only():
    model = _small_umx(residual=True).eval()
    mixture, references = _batch()
    errors = _direct_errors(model, mixture, references)
    metrics = build_umx_objective(model)(model, mixture, references)
    assert torch.allclose(metrics["loss"], errors[:2].mean(), rtol=1e-5)
    assert torch.allclose(metrics["loss_c"], errors[2], rtol=1e-5)
    with pytest.raises(DemixError, match="residual"):
        build_umx_objective(model, source_weights={"c": 1.0})


def test_objective_is_differentiable():
    model = _small_umx().train()
    objective = build_umx_objective(model)
    mixture, references = _batch()
    objective(_Wrapper(model), mixture, references)["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("options, match", [
    (dict(foo=1), "loss.foo"),
    (dict(source_weights={"vocals": 1.0}), "vocals"),
    (dict(source_weights={"a": -1.0}), "loss.source_weights.a"),
    (dict(source_weights={"a": 0.0, "b": 0.0, "c": 0.0}), "positive"),
])
def test_objective_rejects_bad_options(options, match):
    with pytest.raises(DemixError, match=match):
        get_family("umx").objective(_small_umx(), options)


def _numpy_magnitudes(wav: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT| of (..., T) signals: Hann (periodic), centred with reflect padding -> (..., F, N)."""
    padded = np.pad(wav, [(0, 0)] * (wav.ndim - 1) + [(n_fft // 2, n_fft // 2)], mode="reflect")
    frames = 1 + (padded.shape[-1] - n_fft) // hop
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    return np.abs(np.fft.rfft(padded[..., index] * window, axis=-1)).swapaxes(-1, -2)


def test_calibration_matches_numpy():
    model = _small_umx()
    generator = torch.Generator().manual_seed(3)
    batches = []
    for batch, length in [(2, 4001), (3, 2600), (1, 5000)]:
        references = torch.randn(batch, 3, 2, length, generator=generator) * 0.1
        references[:, 0] += 3.0  # a large DC offset: mean >> std in the first bins
        batches.append((references.sum(dim=1), references))

    calibrate_umx(model, iter(batches))

    frames = np.concatenate([
        _numpy_magnitudes(mixture.double().numpy(), 512, 128).mean(axis=1).transpose(0, 2, 1).reshape(-1, 257)
        for mixture, _ in batches
    ])
    mean = frames.mean(axis=0)
    std = frames.std(axis=0)
    std = np.maximum(std, 1e-4 * std.max())
    max_bin = model.max_bin
    assert max_bin == 129
    for target in model.targets.values():
        np.testing.assert_allclose(target.input_mean.detach().numpy(), -mean[:max_bin], rtol=1e-5)
        np.testing.assert_allclose(target.input_scale.detach().numpy(), 1 / std[:max_bin], rtol=1e-5)
        assert target.input_mean.requires_grad and target.input_scale.requires_grad


def test_calibration_floors_the_std():
    # A slowly modulated sine at a bin centre: far bins barely vary from frame to frame.
    model = _small_umx(bandwidth=8000.0)
    time = torch.arange(8000, dtype=torch.float64)
    wav = 50 * (1 + torch.sin(2 * np.pi * time / 8000)) * torch.sin(2 * np.pi * 125 * time / 16000)
    mixture = wav.expand(1, 2, -1)
    calibrate_umx(model, [(mixture, mixture[:, None])])
    std = 1 / model.targets["a"].input_scale.detach().double()
    floor = 1e-4 * float(std.max())
    assert float(std.min()) == pytest.approx(floor, rel=1e-5)
    assert int((std < floor * (1 + 1e-5)).sum()) > 10


def test_calibration_rejects_silence():
    with pytest.raises(DemixError, match="silent"):
        calibrate_umx(_small_umx(), [(torch.zeros(1, 2, 4000), torch.zeros(1, 3, 2, 4000))])


def test_calibration_without_batches():
    with pytest.raises(DemixError, match="no training batches"):
        calibrate_umx(_small_umx(), [])


def test_targets_side_by_side_on_threads_give_the_same_estimates():
    # CPU inference with torch threads to spare runs the target networks in threads.
    model = _small_umx().eval()
    for seed, target in enumerate(model.targets.values()):
        _randomise(target, seed)
    magnitude = model.stft(torch.randn(1, 2, 16000)).abs()
    caller_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            side_by_side = model.target_magnitudes(magnitude)
    finally:
        torch.set_num_threads(caller_threads)
    with torch.no_grad():
        in_turn = torch.stack([target(magnitude) for target in model.targets.values()], dim=1)
    assert side_by_side.shape == (1, 3, 2, model.nb_bins, magnitude.shape[-1])
    assert torch.equal(side_by_side, in_turn)


def test_inference_folds_the_affine_layers_into_the_same_function():
    # Eval mode without autograd folds the input normalisation into fc1 and bn3 with the output
    # scaling into fc3; the estimates are those of the layers (up to rounding), also after the
    # parameters change in place.
    model = _small_umx().eval()
    target = _randomise(model.targets["a"], seed=5)
    magnitude = model.stft(torch.randn(2, 2, 16000)).abs()
    for step in range(2):
        with torch.enable_grad():
            plain = target(magnitude).detach()
        with torch.inference_mode():
            folded = target(magnitude)
            assert target._folded(True) is not None and target._folded(False) is None  # the folded path ran
        assert float((folded - plain).abs().max()) < 1e-5 * float(plain.abs().max())
        with torch.no_grad():
            target.output_mean.add_(0.5)
            target.bn3.running_var.mul_(2.0)
            target.input_scale.mul_(0.5)
