"""STFT and Wiener filtering, checked against Open-Unmix's implementations."""
import importlib
import warnings

import pytest
import torch

from demixlab.errors import DemixError
from demixlab.spectral import STFT, bandwidth_to_max_bin, bins_contiguous, magnitude, wiener
from tests.references import import_reference

openunmix = import_reference("openunmix")
from openunmix.filtering import wiener as reference_wiener  # noqa: E402
from openunmix.transforms import TorchISTFT, TorchSTFT  # noqa: E402
from openunmix.utils import bandwidth_to_max_bin as reference_max_bin  # noqa: E402


def _reference_wiener(targets: torch.Tensor, mix: torch.Tensor, iterations: int, **kwargs) -> torch.Tensor:
    """Open-Unmix's wiener, one example at a time, in our layout:
    targets (B, S, C, F, N), mix (B, C, F, N) complex -> (B, S', C, F, N) complex."""
    outputs = []
    for example_targets, example_mix in zip(targets, mix):
        # Reference layout: targets (N, F, C, S), mix (N, F, C, 2) -> (N, F, C, 2, S).
        out = reference_wiener(example_targets.permute(3, 2, 1, 0), torch.view_as_real(example_mix).permute(2, 1, 0, 3),
                               iterations, **kwargs)
        outputs.append(torch.view_as_complex(out.permute(4, 2, 1, 0, 3).contiguous()))
    return torch.stack(outputs)


def _random_problem(batch=2, sources=3, channels=2, bins=33, frames=40, target_channels=None, dtype=torch.float64,
                    seed=0):
    generator = torch.Generator().manual_seed(seed)
    real = torch.randn(2, batch, channels, bins, frames, generator=generator, dtype=dtype) * 30
    mix = torch.complex(real[0], real[1])
    targets = torch.rand(batch, sources, target_channels or channels, bins, frames, generator=generator,
                         dtype=dtype) * 20
    return targets, mix


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("rate, n_fft, bandwidth", [(44100, 4096, 16000.0), (44100, 2048, 8000.0), (16000, 512, 8000.0),
                                                    (22050, 1024, 11025.0), (48000, 4096, 100.0)])
def test_bandwidth_to_max_bin(rate, n_fft, bandwidth):
    assert bandwidth_to_max_bin(rate, n_fft, bandwidth) == int(reference_max_bin(rate, n_fft, bandwidth))


def test_bandwidth_to_max_bin_umx_default():
    assert bandwidth_to_max_bin(44100, 4096, 16000) == 1487


def test_stft_window_not_in_state_dict():
    stft = STFT(512, 128)
    assert len(stft.state_dict()) == 0
    assert "window" in dict(stft.named_buffers())


@pytest.mark.parametrize("length", [3001, 4097, 10000])
def test_stft_roundtrip_exact_length(length):
    stft = STFT(512, 128)
    wav = torch.randn(2, 2, length)
    spec = stft(wav)
    assert spec.shape == (2, 2, 257, length // 128 + 1) == (2, 2, stft.nb_bins, stft.nb_frames(length))
    assert spec.is_complex()
    out = stft.inverse(spec, length=length)
    assert out.shape == wav.shape
    assert torch.allclose(out, wav, atol=1e-5)


def test_stft_arbitrary_leading_dims_and_float64():
    stft = STFT(256, 64)
    wav = torch.randn(3, 2, 2, 1000, dtype=torch.float64)
    spec = stft(wav)
    assert spec.dtype == torch.complex128 and spec.shape == (3, 2, 2, 129, 1000 // 64 + 1)
    assert torch.allclose(stft.inverse(spec, 1000), wav, atol=1e-10)


def test_stft_matches_openunmix():
    wav = torch.randn(2, 2, 44100)
    stft = STFT(4096, 1024)
    ref_stft = TorchSTFT(n_fft=4096, n_hop=1024, center=True)
    ref_istft = TorchISTFT(n_fft=4096, n_hop=1024, center=True)
    spec = stft(wav)
    reference = torch.view_as_complex(ref_stft(wav))
    assert spec.shape == reference.shape
    assert torch.allclose(spec, reference, atol=1e-5, rtol=0)
    assert torch.allclose(magnitude(spec), reference.abs(), atol=1e-5, rtol=0)
    assert torch.allclose(stft.inverse(spec, 44100), ref_istft(torch.view_as_real(reference), length=44100),
                          atol=1e-6)


def test_stft_too_short():
    with pytest.raises(DemixError, match="too short"):
        STFT(512, 128)(torch.randn(2, 256))


# Open-Unmix's phase uses a float32 pi even in float64, hence ~1e-7 differences without softmask.
TOLERANCES = {torch.float64: 1e-6, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iterations", [0, 1, 2])
@pytest.mark.parametrize("softmask", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_wiener_matches_openunmix(dtype, iterations, softmask, residual):
    targets, mix = _random_problem(dtype=dtype)
    out = wiener(targets, mix, iterations, softmask=softmask, residual=residual, window=None)
    reference = _reference_wiener(targets, mix, iterations, softmask=softmask, residual=residual)
    assert out.shape == reference.shape == (2, 3 + residual, 2, 33, 40)
    assert out.dtype == mix.dtype
    assert _relative_error(out, reference) < TOLERANCES[dtype]


@pytest.mark.parametrize("target_channels", [1, 2])
def test_stereo_wiener_gradients_match_openunmix(target_channels):
    """Two channels take a real-arithmetic EM path: its gradients are the reference's."""
    targets, mix = _random_problem(target_channels=target_channels)
    mix[1] *= 1e2  # one example rescaled before EM
    weights = torch.randn(2, 3, 2, 33, 40, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gradients = []
    for separate in (lambda t: wiener(t, mix, 2, window=None), lambda t: _reference_wiener(t, mix, 2)):
        leaf = targets.clone().requires_grad_()
        (torch.view_as_real(separate(leaf)) * weights).sum().backward()
        gradients.append(leaf.grad)
    assert _relative_error(gradients[0], gradients[1]) < 1e-6


@pytest.mark.parametrize("channels, target_channels", [(1, 1), (2, 1), (2, 2)])
def test_wiener_mono_and_shared_targets(channels, target_channels):
    targets, mix = _random_problem(channels=channels, target_channels=target_channels)
    out = wiener(targets, mix, 1, window=None)
    reference = _reference_wiener(targets, mix, 1)
    assert out.shape == (2, 3, channels, 33, 40)
    assert _relative_error(out, reference) < 1e-6


def test_wiener_large_mixture_scaling():
    # A loud mixture exercises the rescaling before EM (done per example).
    targets, mix = _random_problem()
    mix[1] *= 1e3
    targets[1] *= 1e3
    out = wiener(targets, mix, 2, window=None)
    assert _relative_error(out[1], _reference_wiener(targets, mix, 2)[1]) < 1e-6
    assert _relative_error(out[0], _reference_wiener(targets, mix, 2)[0]) < 1e-6


@pytest.mark.parametrize("softmask", [False, True])
def test_wiener_window_without_em_is_exact(softmask):
    targets, mix = _random_problem(frames=50)
    whole = wiener(targets, mix, 0, softmask=softmask, residual=True, window=None)
    for window in (7, 50, 300):
        chunked = wiener(targets, mix, 0, softmask=softmask, residual=True, window=window)
        assert torch.allclose(chunked, whole, rtol=0, atol=1e-12)


def test_wiener_window_fits_em_per_window():
    targets, mix = _random_problem(frames=50)
    chunked = wiener(targets, mix, 1, window=20)
    parts = [wiener(targets[..., start:start + 20], mix[..., start:start + 20], 1, window=None)
             for start in (0, 20, 40)]
    assert torch.allclose(chunked, torch.cat(parts, dim=-1), rtol=0, atol=1e-12)
    assert torch.allclose(wiener(targets, mix, 1, window=50), wiener(targets, mix, 1, window=None), rtol=0, atol=0)
    # And it is what Open-Unmix's Separator does with `wiener_win_len`.
    reference = torch.cat([_reference_wiener(targets[..., s:s + 20], mix[..., s:s + 20], 1) for s in (0, 20, 40)], -1)
    assert _relative_error(chunked, reference) < 1e-6


def test_wiener_is_differentiable():
    targets, mix = _random_problem(batch=1, sources=2, bins=3, frames=4)
    targets = (targets + 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: wiener(t, mix, 1, residual=True), (targets,))
    assert torch.autograd.gradcheck(lambda t: wiener(t, mix, 2, softmask=True), (targets,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iterations", [0, 1, 2])
@pytest.mark.parametrize("softmask, residual", [(False, False), (True, False), (False, True)])
def test_wiener_stereo_tiles_match_complex_path(monkeypatch, dtype, iterations, softmask, residual):
    # Stereo inference filters tiles of bins in real arithmetic; a differentiable call takes whole
    # windows (soft masks and a residual source: the complex path). Tiles of 8 bins over 33 (the
    # last one short), windows of 20 frames over 50, and a loud example (rescaled before EM) must
    # give the same sources.
    module = importlib.import_module("demixlab.spectral.wiener")
    monkeypatch.setattr(module, "CPU_TILE_BINS", 8)
    tiles = []
    stereo_tile = module._stereo_tile
    monkeypatch.setattr(module, "_stereo_tile", lambda *args, **kwargs: tiles.append(1) or stereo_tile(*args, **kwargs))
    targets, mix = _random_problem(frames=50, dtype=dtype)
    mix[1] *= 1e3
    targets[1] *= 1e3
    with torch.no_grad():
        fast = wiener(targets, mix, iterations, softmask=softmask, residual=residual, window=20)
    assert len(tiles) == 5 * 3  # 5 tiles of bins in each of 3 windows
    with torch.enable_grad():
        complex_path = wiener(targets.clone().requires_grad_(), mix, iterations, softmask=softmask,
                              residual=residual, window=20).detach()
    assert len(tiles) == 15
    assert fast.shape == complex_path.shape == (2, 3 + residual, 2, 33, 50) and fast.dtype == mix.dtype
    for example in range(2):
        assert _relative_error(fast[example], complex_path[example]) < TOLERANCES[dtype] / 10


def _complex_path(targets: torch.Tensor, mix: torch.Tensor, iterations: int, window: int) -> torch.Tensor:
    """Our generic complex-arithmetic EM (what other channel counts take), window by window."""
    module = importlib.import_module("demixlab.spectral.wiener")
    return torch.cat([module._wiener_complex(targets[..., start:start + window], mix[..., start:start + window],
                                             iterations, False, False, 10.0, 1e-10)
                      for start in range(0, mix.shape[-1], window)], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("target_channels", [1, 2])
def test_wiener_stereo_inference_and_differentiable_drivers_agree(monkeypatch, dtype, iterations, target_channels):
    # The two drivers of the one stereo EM: tiles of bins written into the output (no autograd;
    # tiles of 8 over 33 bins, the last one short) and whole windows under autograd. Windows of
    # 20 frames over 50 and a loud example (rescaled before EM); both give the complex path's sources.
    module = importlib.import_module("demixlab.spectral.wiener")
    monkeypatch.setattr(module, "CPU_TILE_BINS", 8)
    calls = []
    for name in ("_stereo_tile", "_wiener_stereo"):
        driver = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _name=name, _driver=driver, **kwargs:
                            calls.append(_name) or _driver(*args, **kwargs))
    module._stereo_maps.cache_clear()  # first asked for in inference mode, then used under autograd
    targets, mix = _random_problem(frames=50, dtype=dtype, target_channels=target_channels)
    mix[1] *= 1e3
    targets[1] *= 1e3
    with torch.inference_mode():
        tiled = wiener(targets, mix, iterations, window=20)
    leaf = targets.clone().requires_grad_()
    whole = wiener(leaf, mix, iterations, window=20)
    assert calls == ["_stereo_tile"] * 15 + ["_wiener_stereo"] * 3 and whole.requires_grad
    reference = _complex_path(targets, mix, iterations, 20)
    assert tiled.shape == whole.shape == reference.shape == (2, 3, 2, 33, 50)
    for example in range(2):
        assert _relative_error(tiled[example], whole[example].detach()) < TOLERANCES[dtype] / 10
        assert _relative_error(whole[example].detach(), reference[example]) < TOLERANCES[dtype] / 10


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("target_channels", [1, 2])
def test_stereo_wiener_gradients_match_complex_path(iterations, target_channels):
    """The real-arithmetic stereo EM and our complex path have the same gradients, through both the
    targets and the mixture (float64: rounding only)."""
    targets, mix = _random_problem(target_channels=target_channels, frames=50)
    mix[1] *= 1e2  # one example rescaled before EM
    weights = torch.randn(2, 3, 2, 33, 50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gradients = []
    for separate in (lambda t, m: wiener(t, m, iterations, window=20), lambda t, m: _complex_path(t, m, iterations, 20)):
        leaves = targets.clone().requires_grad_(), mix.clone().requires_grad_()
        (torch.view_as_real(separate(*leaves)) * weights).sum().backward()
        gradients.append([leaf.grad for leaf in leaves])
    for stereo, complex_path in zip(*gradients):
        assert _relative_error(stereo, complex_path) < 1e-9


@pytest.mark.parametrize("channels", [1, 2])
def test_wiener_writes_into_bins_contiguous_output(channels):
    targets, mix = _random_problem(channels=channels, frames=50)
    expected = wiener(targets, mix, 1, residual=True, window=20)
    out = bins_contiguous(expected.shape, mix)
    assert out.shape == expected.shape and out.stride()[-2:] == (1, 33)
    result = wiener(targets, mix, 1, residual=True, window=20, out=out)
    assert result is out
    assert torch.equal(out, expected)


def test_wiener_stereo_tiles_on_threads_are_the_same():
    # With torch threads to spare the tiles run side by side, one intra-op thread each.
    module = importlib.import_module("demixlab.spectral.wiener")
    targets, mix = _random_problem(frames=50, bins=200, dtype=torch.float32)
    caller_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            alone = wiener(targets, mix, 1, residual=True, window=20)
        torch.set_num_threads(2)
        with torch.inference_mode():
            side_by_side = wiener(targets, mix, 1, residual=True, window=20)
    finally:
        torch.set_num_threads(caller_threads)
    assert module.CPU_TILE_BINS < 200
    assert torch.equal(alone, side_by_side)


@pytest.mark.parametrize("n_fft, hop", [(4096, 1024), (512, 128), (512, 256), (256, 64)])
@pytest.mark.parametrize("extra", [0, -300, 700])
def test_inverse_stft_overlap_add_matches_torch_istft(n_fft, hop, extra):
    # Without autograd on CPU, hops that divide n_fft take our overlap-add; the waveform is
    # torch.istft's (also cropped or zero-padded to any length), from any layout of the bins.
    stft = STFT(n_fft, hop)
    wav = torch.randn(3, 2, 20000, generator=torch.Generator().manual_seed(0))
    spec = stft(wav)
    length = 20000 + extra
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns when it pads the end with zeros
        expected = torch.istft(spec.reshape(6, *spec.shape[-2:]), n_fft, hop, window=torch.hann_window(n_fft),
                               center=True, length=length).reshape(3, 2, length)
        bins_first = spec.transpose(-1, -2).contiguous().transpose(-1, -2)
        for layout in (spec, bins_first):
            with torch.inference_mode():
                out = stft.inverse(layout, length)
            assert out.shape == (3, 2, length)
            assert float((out - expected).abs().max()) < 1e-6 * float(expected.abs().max())
        with torch.enable_grad():  # the differentiable path is torch.istft itself
            assert torch.equal(stft.inverse(spec.clone().requires_grad_(), length).detach(), expected)
