"""The X-UMX family: bridged Open-Unmix networks and the multi-domain combination loss."""
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from demixlab.errors import DemixError
from demixlab.models.losses import combination_loss, source_subsets, weighted_sdr_loss
from demixlab.models import get_family
from demixlab.models.openunmix.umx import UMX, calibrate_umx
from demixlab.models.openunmix.xumx import XUMX, build_xumx_objective
from tests.references import import_reference
from tests.cli import TINY, dora, signature
from tests.test_umx import PARAMS_PER_TARGET, SOURCES, _randomise

openunmix = import_reference("openunmix")
from openunmix.model import OpenUnmix, Separator  # noqa: E402

# A small but complete configuration: 3 BiLSTM layers, a band limit, stereo, 44.1 kHz.
SMALL = dict(n_fft=1024, hop_length=256, hidden_size=64, nb_layers=3, bandwidth=16000.0)
MAX_BIN = 372  # 16 kHz with n_fft=1024 at 44.1 kHz


@pytest.fixture(scope="module")
def references():
    """Four random Open-Unmix reference targets (SMALL settings), in eval mode."""
    torch.manual_seed(0)
    return {name: _randomise(OpenUnmix(nb_bins=513, nb_channels=2, hidden_size=64, nb_layers=3, max_bin=MAX_BIN),
                             seed).eval()
            for seed, name in enumerate(SOURCES)}


@pytest.fixture(scope="module")
def mixture():
    generator = torch.Generator().manual_seed(1)
    return 0.3 * torch.randn(2, 2, 44100, generator=generator)


def _load(model: UMX, references) -> UMX:
    for name, target in model.targets.items():
        target.load_state_dict(references[name].state_dict(), strict=True)
    return model.eval()


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


def test_parameters_and_state_dict_are_four_umx_targets():
    model = XUMX(SOURCES, 44100, 2)
    assert model.bridge and model.max_bin == 1487
    assert _count(model) == 4 * PARAMS_PER_TARGET
    assert list(model.state_dict()) == list(UMX(SOURCES, 44100, 2).state_dict())


def test_without_bridges_it_is_four_umx_networks(references, mixture):
    xumx = _load(XUMX(SOURCES, 44100, 2, bridge=False, **SMALL), references)
    umx = _load(UMX(SOURCES, 44100, 2, **SMALL), references)
    separator = Separator(references, niter=1, wiener_win_len=300, n_fft=1024, n_hop=256, nb_channels=2).eval()
    with torch.no_grad():
        magnitudes, expected_magnitudes = xumx(mixture, for_loss=True), umx(mixture, for_loss=True)
        waveforms, expected_waveforms = xumx(mixture), umx(mixture)
        reference_waveforms = separator(mixture)
    assert magnitudes.shape == (2, 4, 2, 513, mixture.shape[-1] // 256 + 1)
    assert waveforms.shape == reference_waveforms.shape == (2, 4, 2, mixture.shape[-1])
    assert float((magnitudes - expected_magnitudes).abs().max()) < 1e-6  # measured: 0
    assert float((waveforms - expected_waveforms).abs().max()) < 1e-6  # measured: 0
    assert float((waveforms - reference_waveforms).abs().max()) < 1e-6  # measured: 1.2e-7

    bridged = _load(XUMX(SOURCES, 44100, 2, **SMALL), references)
    with torch.no_grad():
        assert float((bridged(mixture, for_loss=True) - expected_magnitudes).abs().max()) > 1e-2
        assert float((bridged(mixture) - expected_waveforms).abs().max()) > 1e-3


def _published_bridges(references, spec: torch.Tensor) -> torch.Tensor:
    """The X-UMX equations written out on the layers of openunmix's targets: (B, C, F, N) -> (B, S, C, F, N)."""
    batch, channels, bins, frames = spec.shape
    x = spec.permute(3, 0, 1, 2)[..., :MAX_BIN]  # openunmix layout (N, B, C, F)
    nets = [references[name] for name in SOURCES]
    encoded = [torch.tanh(net.bn1(net.fc1(((x + net.input_mean) * net.input_scale).reshape(-1, channels * MAX_BIN))))
               .reshape(frames, batch, -1) for net in nets]
    cross_1 = sum(encoded) / len(nets)
    cross_2 = sum(torch.cat([h, net.lstm(cross_1)[0]], dim=-1) for h, net in zip(encoded, nets)) / len(nets)
    outputs = []
    for net in nets:
        y = nn.functional.relu(net.bn2(net.fc2(cross_2.reshape(frames * batch, -1))))
        y = net.bn3(net.fc3(y)).reshape(frames, batch, channels, bins)
        mask = nn.functional.relu(y * net.output_scale + net.output_mean)
        outputs.append((mask * spec.permute(3, 0, 1, 2)).permute(1, 2, 3, 0))
    return torch.stack(outputs, dim=1)


def test_bridges_match_the_published_equations(references, mixture):
    model = _load(XUMX(SOURCES, 44100, 2, **SMALL), references)
    with torch.no_grad():
        out = model(mixture, for_loss=True)
        expected = _published_bridges(references, model.stft(mixture).abs())
    # Measured: 0 here, and 0 against asteroid 0.7.0's BrokenXUMX.forward_masker (full size).
    assert float((out - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_residual_is_rejected_and_family_registered():
    with pytest.raises(DemixError, match="model.residual"):
        XUMX(SOURCES, 44100, 2, residual=True)
    family = get_family("xumx")
    assert family.model_class is XUMX and family.build_objective is build_xumx_objective
    assert family.calibrate is calibrate_umx
    model = family.build_model(SOURCES, 44100, 2, dict(SMALL, bridge=False))
    assert not model.bridge


# ------------------------------------------------------------------------------------- the loss
def test_source_subsets():
    subsets = source_subsets(4)
    assert len(subsets) == 14 == len(set(subsets))
    assert subsets[:4] == [(0,), (1,), (2,), (3,)]
    assert all(0 < len(subset) < 4 for subset in subsets)
    assert source_subsets(4, "singles") == [(0,), (1,), (2,), (3,)]
    assert [len(source_subsets(count)) for count in (2, 3, 5)] == [2, 6, 30]


def test_combination_loss_sees_every_subset_sum():
    # Source k holds 2^k: a subset's sum is its bit mask; references hold 10x that.
    estimates = (2.0 ** torch.arange(4)).reshape(1, 4, 1).expand(3, 4, 5)
    seen = []

    def record(estimate, reference):
        mask = int(estimate[0, 0])
        assert torch.all(estimate == mask) and torch.all(reference == 10 * mask)
        seen.append(mask)
        return estimate.new_tensor(float(mask))

    loss = combination_loss(estimates, 10 * estimates, record)
    assert sorted(seen) == list(range(1, 15))  # every non-empty proper subset once
    assert float(loss) == pytest.approx(7.5)  # the mean over subsets
    seen.clear()
    weights = [1.0, 0.0, 2.0, 1.0]
    loss = combination_loss(estimates, 10 * estimates, record, "singles", source_weights=weights)
    assert seen == [1, 2, 4, 8] and float(loss) == pytest.approx((1 + 8 + 8) / 4)
    seen.clear()
    subset_weights = [np.mean([weights[k] for k in range(4) if mask >> k & 1]) for mask in range(1, 15)]
    loss = combination_loss(estimates, 10 * estimates, lambda e, r: e.new_tensor(float(e[0, 0])),
                            source_weights=weights)
    expected = sum(w * mask for w, mask in zip(subset_weights, range(1, 15))) / sum(subset_weights)
    assert float(loss) == pytest.approx(expected)


def test_combination_loss_on_ragged_complex_blocks():
    # As the sliCQ family uses it: per-block complex spectrograms (B, S, C, F_b, T_b).
    blocks = [torch.randn(2, 4, 2, 3, 7, dtype=torch.complex64), torch.randn(2, 4, 2, 5, 11, dtype=torch.complex64)]
    seen = []

    def record(estimate, reference):
        assert [tuple(block.shape) for block in estimate] == [(2, 2, 3, 7), (2, 2, 5, 11)]
        seen.append(estimate)
        return sum(((e - r).abs() ** 2).mean() for e, r in zip(estimate, reference)) / 2

    loss = combination_loss(blocks, [2 * block for block in blocks], record)
    assert len(seen) == 14
    torch.testing.assert_close(seen[4][1], blocks[1][:, 0] + blocks[1][:, 1])  # subset (0, 1)
    expected = np.mean([sum(float((block[:, list(subset)].sum(1).abs() ** 2).mean()) for block in blocks) / 2
                        for subset in source_subsets(4)])
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def _numpy_wsdr(estimate: np.ndarray, reference: np.ndarray, mixture: np.ndarray) -> float:
    """Choi et al.'s weighted SDR loss, one row per (..., T) signal, averaged."""
    rows = []
    for y_hat, y, x in zip(estimate.reshape(-1, estimate.shape[-1]), reference.reshape(-1, reference.shape[-1]),
                           mixture.reshape(-1, mixture.shape[-1])):
        n, n_hat = x - y, x - y_hat
        alpha = y @ y / (y @ y + n @ n)
        cosine = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
        rows.append(-alpha * cosine(y, y_hat) - (1 - alpha) * cosine(n, n_hat))
    return float(np.mean(rows))


def test_weighted_sdr_matches_numpy():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(3, 2, 500, generator=generator, dtype=torch.float64)
    mixture = reference + torch.randn(3, 2, 500, generator=generator, dtype=torch.float64)
    estimate = reference + 0.5 * torch.randn(3, 2, 500, generator=generator, dtype=torch.float64)
    loss = weighted_sdr_loss(estimate, reference, mixture)
    assert float(loss) == pytest.approx(_numpy_wsdr(estimate.numpy(), reference.numpy(), mixture.numpy()), rel=1e-6)
    assert float(weighted_sdr_loss(reference, reference, mixture)) == pytest.approx(-1.0, abs=1e-9)


class _Fixed(nn.Module):
    """A model whose `for_loss` output is given magnitudes (the objective only calls it)."""

    def __init__(self, magnitudes: torch.Tensor):
        super().__init__()
        self.register_buffer("magnitudes", magnitudes.clone())

    def forward(self, mixture, for_loss=False):
        assert for_loss
        return self.magnitudes


def _tiny_xumx(**kwargs) -> XUMX:
    return XUMX(SOURCES, 16000, 2, **dict(dict(n_fft=256, hop_length=64, hidden_size=8, nb_layers=1,
                                               bandwidth=4000.0), **kwargs))


def test_objective_is_the_published_multi_domain_loss():
    model = _tiny_xumx()
    generator = torch.Generator().manual_seed(2)
    references = 0.2 * torch.randn(2, 4, 2, 1600, generator=generator, dtype=torch.float64)
    mixture = references.sum(dim=1)
    window = torch.hann_window(256, dtype=torch.float64)
    stft = lambda x: torch.stft(x.reshape(-1, x.shape[-1]), 256, 64, window=window,  # noqa: E731
                                return_complex=True).reshape(*x.shape[:-1], 129, -1)
    magnitudes = stft(references).abs() * (0.5 + torch.rand(2, 4, 2, 129, 26, generator=generator,
                                                            dtype=torch.float64))
    phase = torch.exp(1j * stft(mixture).angle())[:, None]
    waveforms = torch.istft((magnitudes * phase).reshape(-1, 129, 26), 256, 64, window=window, length=1600)
    waveforms = waveforms.reshape(2, 4, 2, 1600).numpy()
    target = stft(references).abs().numpy()
    freq, time = [], []
    for size in (1, 2, 3):
        for subset in itertools.combinations(range(4), size):
            index = list(subset)
            freq.append(np.mean((magnitudes.numpy()[:, index].sum(1) - target[:, index].sum(1)) ** 2))
            time.append(_numpy_wsdr(waveforms[:, index].sum(1), references.numpy()[:, index].sum(1),
                                    mixture.numpy()))
    metrics = build_xumx_objective(model)(_Fixed(magnitudes), mixture, references)
    assert len(freq) == 14
    assert float(metrics["loss_freq"]) == pytest.approx(np.mean(freq), rel=1e-6)
    assert float(metrics["loss_time"]) == pytest.approx(1 + np.mean(time), rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(np.mean(freq) + 10 * (1 + np.mean(time)), rel=1e-6)
    for k, name in enumerate(SOURCES):
        assert float(metrics[f"loss_{name}"]) == pytest.approx(freq[k], rel=1e-6)
    singles = build_xumx_objective(model, combinations="singles", mix_coef=2.5)(_Fixed(magnitudes), mixture,
                                                                                 references)
    assert float(singles["loss"]) == pytest.approx(np.mean(freq[:4]) + 2.5 * (1 + np.mean(time[:4])), rel=1e-6)
    freq_only = build_xumx_objective(model, mix_coef=0)(_Fixed(magnitudes), mixture, references)
    assert "loss_time" not in freq_only and float(freq_only["loss"]) == pytest.approx(np.mean(freq), rel=1e-6)


def test_objective_is_zero_for_a_perfect_estimate():
    # Sources that are positive multiples of one signal share the mixture's phase, so their exact
    # magnitudes with the mixture phase reconstruct them: both terms reach their minimum.
    generator = torch.Generator().manual_seed(3)
    signal = torch.randn(2, 1, 2, 1600, generator=generator, dtype=torch.float64)
    references = signal * torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64).reshape(1, 4, 1, 1)
    window = torch.hann_window(256, dtype=torch.float64)
    magnitudes = torch.stft(references.reshape(-1, 1600), 256, 64, window=window,
                            return_complex=True).abs().reshape(2, 4, 2, 129, -1)
    metrics = build_xumx_objective(_tiny_xumx())(_Fixed(magnitudes), references.sum(dim=1), references)
    assert abs(float(metrics["loss_freq"])) < 1e-10
    assert abs(float(metrics["loss_time"])) < 1e-9
    assert abs(float(metrics["loss"])) < 1e-8


def test_time_domain_term_reaches_every_parameter():
    generator = torch.Generator().manual_seed(4)
    references = 0.2 * torch.randn(2, 4, 2, 1600, generator=generator)
    model = _tiny_xumx().train()

    def gradients(mix_coef: float):
        model.zero_grad()
        build_xumx_objective(model, mix_coef=mix_coef)(model, references.sum(dim=1), references)["loss"].backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    with_time, without_time = gradients(1.0), gradients(0.0)
    for name, gradient in with_time.items():
        time_gradient = gradient - without_time[name]
        assert torch.isfinite(time_gradient).all(), name
        assert time_gradient.abs().sum() > 0, name


@pytest.mark.parametrize("options, match", [
    (dict(foo=1), "loss.foo"),
    (dict(combinations="pairs"), "loss.combinations"),
    (dict(mix_coef=-1.0), "loss.mix_coef"),
    (dict(mix_coef="ten"), "loss.mix_coef"),
    (dict(source_weights={"piano": 1.0}), "loss.source_weights"),
    (dict(source_weights={"bass": -1.0}), "loss.source_weights.bass"),
])
def test_objective_rejects_bad_options(options, match):
    with pytest.raises(DemixError, match=match):
        get_family("xumx").objective(_tiny_xumx(), options)


def test_objective_needs_two_sources():
    model = XUMX(["vocals"], 16000, 2, n_fft=256, hop_length=64, hidden_size=8, nb_layers=1, bandwidth=4000.0)
    with pytest.raises(DemixError, match="loss.combinations"):
        build_xumx_objective(model)
    build_xumx_objective(model, combinations="singles")


@pytest.mark.slow
# ---------------------------------------------------------------------------------- end to end
def test_dora_run_trains_xumx(tmp_path, cache_dir):
    args = ["model=xumx", *TINY]
    dora(tmp_path, cache_dir, *args)
    folder = tmp_path / "outputs" / "xps" / signature(tmp_path, cache_dir, *args)
    history = json.loads((folder / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]
    for section in ("train", "valid"):
        assert {"loss", "loss_freq", "loss_time", "loss_vocals"} <= set(history[0][section])
        assert 0 <= history[0][section]["loss_time"] <= 2
    assert "nsdr" in history[-1]["valid"] and "nsdr_bass" in history[-1]["test"]
    assert torch.load(folder / "checkpoint.th", weights_only=True)["family"] == "xumx"
