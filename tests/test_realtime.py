"""Live streams through causal models: the declared lookahead, block-wise STFT/ISTFT, and
`Separator.stream()` giving the offline stems delayed by its latency."""

import pytest
import torch

from demixlab.errors import DemixError
from demixlab.models import get_family
from demixlab.release.model_file import package_model, save_package
from demixlab.separation import Separator
from demixlab.spectral import STFT, StreamingISTFT, StreamingSTFT
from tests.test_streaming import _blocks

SOURCES = ["drums", "bass", "other", "vocals"]
CAUSAL = dict(n_fft=512, hop_length=128, hidden_size=16, nb_layers=2, bandwidth=8000.0, wiener_iterations=0,
              unidirectional=True)


def _repo(tmp_path, family: str, options: dict, name: str = "live"):
    torch.manual_seed(0)
    model = get_family(family).build_model(SOURCES, 44100, 2, options)
    with torch.no_grad():  # masks that vary over time and bins
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    save_package(package_model(family, options, model.state_dict(), sources=SOURCES, samplerate=44100,
                               audio_channels=2), tmp_path / f"{name}.th")
    return tmp_path


@pytest.mark.parametrize("length", [257, 1000, 23456])
@pytest.mark.parametrize("n_fft,hop", [(512, 128), (256, 64), (400, 100)])
def test_block_wise_stft_and_istft_are_the_whole_signal_transforms(length, n_fft, hop):
    stft = STFT(n_fft, hop)
    signal = torch.randn(2, 3, length, generator=torch.Generator().manual_seed(length))
    analysis = StreamingSTFT(stft)
    frames = [analysis.push(block) for block in _blocks(signal, (1, 100, 37, 900))] + [analysis.finish()]
    whole = stft(signal)
    torch.testing.assert_close(torch.cat(frames, dim=-1), whole, rtol=0, atol=1e-5)
    synthesis = StreamingISTFT(stft)
    samples = [synthesis.push(whole[..., first:first + 3]) for first in range(0, whole.shape[-1], 3)]
    samples.append(synthesis.finish(length))
    torch.testing.assert_close(torch.cat(samples, dim=-1), stft.inverse(whole, length), rtol=0, atol=1e-6)


def _assert_streamed_is_offline_delayed(live, wav: torch.Tensor, sizes: tuple, offline: dict) -> None:
    """Push `wav` in blocks of `sizes`, flush, and compare with the offline stems: as many samples out as
    in (the input's channels), silence for the latency, then the offline separation."""
    channels = wav.shape[0]
    pieces = {source: [] for source in SOURCES}
    for block in _blocks(wav, sizes):
        stems = live.push(block)
        for source in SOURCES:
            assert stems[source].shape == block.shape
            pieces[source].append(stems[source])
    for source, stem in live.flush().items():
        assert stem.shape == (channels, live.latency)
        pieces[source].append(stem)
    peak = max(float(stem.abs().max()) for stem in offline.values())
    assert peak > 1e-2
    for source in SOURCES:
        streamed = torch.cat(pieces[source], dim=-1)
        assert not streamed[..., :live.latency].any()  # silence while the first samples are due
        torch.testing.assert_close(streamed[..., live.latency:], offline[source], rtol=0, atol=1e-5 * peak)


@pytest.mark.parametrize("family,options,sizes,channels", [
    ("umx", CAUSAL, (1, 300, 64, 2000), 2),
    ("umx", dict(CAUSAL, residual=True, softmask=True), (4096,), 2),
    ("xumx", CAUSAL, (128,), 2),
    ("umx", CAUSAL, (777, 5), 1),
])
def test_the_stream_is_the_offline_separation_delayed_by_the_latency(tmp_path, family, options, sizes, channels):
    separator = Separator(_repo(tmp_path, family, options), "live")
    wav = 0.3 * torch.randn(channels, 20000, generator=torch.Generator().manual_seed(1))
    offline = separator.separate_tensor(wav, 44100)  # split=False would be the same: UMX's default chunk is 30 s
    live = separator.stream()
    assert live.latency == options["n_fft"] - 1
    _assert_streamed_is_offline_delayed(live, wav, sizes, offline)
    with pytest.raises(DemixError, match="flushed"):
        live.push(wav[:, :10])


@pytest.mark.parametrize("options", [dict(CAUSAL, unidirectional=False), dict(CAUSAL, wiener_iterations=1)])
def test_a_model_that_cannot_stream_is_a_one_line_error_naming_its_family(tmp_path, options):
    separator = Separator(_repo(tmp_path, "umx", options), "live")
    assert separator.bag.members[0].model.lookahead is None
    with pytest.raises(DemixError, match=r"model 'live' of family umx cannot separate a stream") as error:
        separator.stream()
    assert "\n" not in str(error.value)


def test_a_stream_needs_blocks_of_one_shape_and_is_flushed_once(tmp_path):
    live = Separator(_repo(tmp_path, "umx", CAUSAL), "live").stream()
    with pytest.raises(DemixError, match="empty"):
        live.flush()
    live.push(torch.zeros(2, 1000))
    with pytest.raises(DemixError, match="blocks of one shape"):
        live.push(torch.zeros(1, 100))
    live.flush()
    with pytest.raises(DemixError, match="already flushed"):
        live.flush()


# sliCQ-CDAE realtime: 9 blocks, slices of 764 samples (hop 382), narrow autoencoders.
SLICQ_REALTIME = dict(fbins=12, hidden_1=6, hidden_2=7, realtime=True)


def _slicq_model(seed: int = 3):
    """A realtime sliCQ-CDAE with random weights and BatchNorm statistics, in eval mode."""
    model = get_family("slicq_cdae").build_model(SOURCES, 44100, 2, SLICQ_REALTIME)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith(("running_var", "input_scale")):
                value.copy_(0.5 + torch.rand(value.shape, generator=generator))
            elif value.dtype.is_floating_point:
                value.copy_(0.1 * torch.randn(value.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("sizes,channels", [((1, 300, 64, 2000), 2), ((4096,), 2), ((128,), 1), ((777, 5), 2)])
def test_the_slicq_cdae_stream_is_the_offline_separation_delayed_by_the_latency(tmp_path, sizes, channels):
    model = _slicq_model()
    save_package(package_model("slicq_cdae", SLICQ_REALTIME, model.state_dict(), sources=SOURCES, samplerate=44100,
                               audio_channels=2), tmp_path / "live.th")
    separator = Separator(tmp_path, "live", split=False)
    wav = 0.3 * torch.randn(channels, 20000, generator=torch.Generator().manual_seed(1))
    offline = separator.separate_tensor(wav, 44100)
    live = separator.stream()
    transform = model.transform
    assert live.latency == model.lookahead == transform.slice_length + transform.slice_support - 1 == 1432
    _assert_streamed_is_offline_delayed(live, wav, sizes, offline)


@pytest.mark.parametrize("length", [1, 700, 5000])
def test_the_slicq_cdae_streamer_delays_exactly_its_lookahead(length):
    model = _slicq_model()
    mixture = 0.3 * torch.randn(2, 2, length, generator=torch.Generator().manual_seed(length))  # a batch of 2
    with torch.no_grad():
        offline = model(mixture)
    streamer, pieces, least = model.streamer(), [], None
    for pushed in range(1, length + 1):  # one sample at a time: the delay is visible to the sample
        pieces.append(streamer.push(mixture[..., pushed - 1:pushed]))
        slack = sum(piece.shape[-1] for piece in pieces) - (pushed - model.lookahead)
        least = slack if least is None else min(least, slack)
    pieces.append(streamer.finish())
    assert least >= 0 and (least == 0 or length <= model.lookahead)  # never later than stated, and not earlier
    torch.testing.assert_close(torch.cat(pieces, dim=-1), offline, rtol=0, atol=1e-6)


def test_the_offline_slicq_cdae_cannot_stream(tmp_path):
    options = dict(SLICQ_REALTIME, realtime=False)
    model = get_family("slicq_cdae").build_model(SOURCES, 44100, 2, options)
    assert model.lookahead is None
    save_package(package_model("slicq_cdae", options, model.state_dict(), sources=SOURCES, samplerate=44100,
                               audio_channels=2), tmp_path / "offline.th")
    with pytest.raises(DemixError, match=r"model 'offline' of family slicq_cdae cannot separate a stream") as error:
        Separator(tmp_path, "offline").stream()
    assert "\n" not in str(error.value)
    with pytest.raises(DemixError, match="too short"):
        _slicq_model().streamer().finish()
    with pytest.raises(DemixError, match="eval mode"):
        _slicq_model().train().streamer()
