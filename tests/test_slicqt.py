"""The sliced constant-Q transform, checked against nsgt 0.19 (numpy, float64) and xumx-slicq-v2 1.0.0a2."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from demixlab.errors import DemixError
from demixlab.spectral import (SCALES, SliCQT, StreamingInverseSliCQT, StreamingSliCQT, flatten_slices, make_scale,
                               overlap_add, unflatten_slices)
from demixlab.spectral.plot import plot_slicqt
from tests.references import import_reference
from tests.test_streaming import _blocks

nsgt_fscale = import_reference("nsgt.fscale")
nsgt_nsgfwin = import_reference("nsgt.nsgfwin_sl")
nsgt_slicq = import_reference("nsgt.slicq")
xumx_transforms = import_reference("xumx_slicq_v2.transforms")

RATE = 44100
# (scale, bins, fmin): the published configurations of xumx-sliCQ (V2 is bark-262) and small ones.
CONFIGS = {"bark": ("bark", 262, 32.9), "mel": ("mel", 116, 37.7), "cqlog": ("cqlog", 142, 129.7),
           "linear": ("linear", 100, 40.0)}
_TRANSFORMS = {}


def transform(name: str, dtype=torch.float32) -> SliCQT:
    """Transforms are built once per test session (their tables take a moment)."""
    key = (name, dtype)
    if key not in _TRANSFORMS:
        _TRANSFORMS[key] = SliCQT(*CONFIGS[name], samplerate=RATE, dtype=dtype)
    return _TRANSFORMS[key]


def tiny(dtype=torch.float64) -> SliCQT:
    """A small transform for gradient checks: 4 kHz audio, slices of a few hundred samples."""
    return SliCQT("cqlog", 6, 300.0, 1600.0, samplerate=4000, dtype=dtype)


def noise(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).abs().max() / reference.abs().max())


# -- block-wise (streaming) transform ------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", [("tiny", torch.float64), ("tiny", torch.float32), ("mel", torch.float32)])
@pytest.mark.parametrize("sizes", [(1, 37, 200, 3), (512,), (5000, 1)])
def test_block_wise_slicqt_is_the_whole_signal_transform(name, dtype, sizes):
    slicqt = tiny(dtype) if name == "tiny" else transform(name, dtype)
    hop = slicqt.slice_length // 2
    assert hop < slicqt.slice_support < slicqt.slice_length  # a slice's window ends before the slice
    assert not slicqt.slice_window[slicqt.slice_support:].any() and slicqt.slice_window[slicqt.slice_support - 1] > 0
    lengths = (1, hop - 1, 3001) if name == "tiny" else (1, 2 * slicqt.slice_length + 17)
    for length in lengths:
        signal = noise(2, 3, length, dtype=dtype, seed=length)
        whole = slicqt(signal)
        analysis, pushed, parts = StreamingSliCQT(slicqt), 0, []
        for block in _blocks(signal, sizes):
            parts.append(analysis.push(block))
            pushed += block.shape[-1]
            # slice s covers samples from (s - 1) * hop; it is returned as soon as its window's support arrived
            assert analysis.slices == max(0, (pushed + hop - slicqt.slice_support) // hop + 1)
        parts.append(analysis.finish())
        for index, block in enumerate(whole):
            streamed = torch.cat([part[index] for part in parts], dim=-2)
            assert streamed.dtype == block.dtype
            torch.testing.assert_close(streamed, block, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
        for group in (1, 2, 5):  # the inverse of slices pushed `group` at a time
            synthesis = StreamingInverseSliCQT(slicqt)
            samples = [synthesis.push([block[..., first:first + group, :] for block in whole])
                       for first in range(0, whole[0].shape[-2], group)]
            total = max(length, synthesis.emitted)
            assert synthesis.emitted == (whole[0].shape[-2] - 1) * hop  # all but the last slice's second half
            samples.append(synthesis.finish(total))
            torch.testing.assert_close(torch.cat(samples, dim=-1), slicqt.inverse(whole, total), rtol=0,
                                       atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_block_wise_slicqt_checks_its_input():
    slicqt = tiny()
    with pytest.raises(DemixError, match="empty"):
        StreamingSliCQT(slicqt).finish()
    analysis = StreamingSliCQT(slicqt)
    analysis.push(torch.zeros(2, 10))
    with pytest.raises(DemixError, match="leading shape"):
        analysis.push(torch.zeros(3, 10))
    with pytest.raises(DemixError, match="real floating-point"):
        analysis.push(torch.zeros(2, 10, dtype=torch.long))
    synthesis = StreamingInverseSliCQT(slicqt)
    with pytest.raises(DemixError, match="no sliCQT slices"):
        synthesis.finish(10)
    synthesis.push(slicqt(noise(1, 2000, dtype=torch.float64)))
    with pytest.raises(DemixError, match="shorter than"):
        synthesis.finish(10)


# -- structure ------------------------------------------------------------------------------------

def test_default_bark_262_layout():
    slicqt = transform("bark")
    assert (slicqt.slice_length, slicqt.transition_length) == (18060, 4516)
    assert slicqt.num_channels == 263 and len(slicqt.block_shapes) == 70
    assert [bins for bins, _ in slicqt.block_shapes][:5] == [1, 86, 14, 11, 9]
    widths = [width for _, width in slicqt.block_shapes]
    assert (min(widths), max(widths)) == (16, 292) and all(width % 4 == 0 for width in widths)
    assert slicqt.frequencies[0] == 0.0 and slicqt.frequencies[-1] == RATE / 2 and len(slicqt.frequencies) == 263
    blocks = slicqt(noise(2, RATE // 2))
    assert [tuple(block.shape) for block in blocks] == [(2, bins, slicqt.num_slices(RATE // 2), width)
                                                        for bins, width in slicqt.block_shapes]
    assert all(block.dtype == torch.complex64 for block in blocks)


def test_slice_lengths_follow_the_formula():
    """slice = ceil(max(q * 8 * rate / f)) rounded up to a multiple of 4; transition = slice / 4 rounded up to even."""
    for name in CONFIGS:
        freqs, q = make_scale(*CONFIGS[name]).frequencies()
        expected = math.ceil(np.max(q * 8 * RATE / freqs))
        expected += -expected % 4
        slicqt = transform(name)
        assert slicqt.slice_length == expected
        assert slicqt.transition_length == expected // 4 + (expected // 4) % 2


@pytest.mark.parametrize("length", [1, 100, 4515, 4516, 9030, 9031, 44100, 123457])
def test_slice_count_formula(length):
    slicqt = transform("bark")
    expected = (math.ceil(length / (18060 / 4)) + 1) // 2 + 1
    assert slicqt.num_slices(length) == expected
    small = tiny(torch.float32)
    scaled = max(1, length // 40)
    assert small(noise(1, scaled))[0].shape[-2] == small.num_slices(scaled)


def test_state_dict_is_empty_and_tables_follow_the_module():
    slicqt = tiny()
    assert slicqt.state_dict() == {}
    buffers = dict(slicqt.named_buffers())
    assert {"slice_window", "forward_index", "forward_weight", "inverse_weight"} <= set(buffers)
    assert slicqt.float().forward_weight.dtype == torch.float32


@pytest.mark.parametrize("scale", SCALES)
def test_every_scale_builds_and_reconstructs(scale):
    bins = 12 if scale == "oct" else 40
    slicqt = SliCQT(scale, bins, 100.0, 8000.0, samplerate=16000, dtype=torch.float64)
    freqs = [f for f in slicqt.frequencies[1:-1]]
    assert freqs == sorted(freqs) and len(freqs) >= 2
    wav = noise(2, 9000, dtype=torch.float64)
    assert relative_error(slicqt.inverse(slicqt(wav), 9000), wav) < 1e-12


# -- reconstruction -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, seconds", [("bark", 6.0), ("mel", 1.0), ("cqlog", 2.3), ("linear", 1.7)])
def test_reconstruction_float32(name, seconds):
    slicqt = transform(name)
    wav = noise(2, int(seconds * RATE))
    estimate = slicqt.inverse(slicqt(wav), wav.shape[-1])
    assert estimate.dtype == torch.float32 and estimate.shape == wav.shape
    assert float((estimate - wav).abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["bark", "linear"])
def test_reconstruction_float64(name):
    slicqt = transform(name, torch.float64)
    wav = noise(2, int(1.3 * RATE), dtype=torch.float64)
    blocks = slicqt(wav)
    assert blocks[0].dtype == torch.complex128
    assert float((slicqt.inverse(blocks, wav.shape[-1]) - wav).abs().max()) < 1e-12


def test_inverse_to_any_length():
    slicqt = tiny()
    wav = noise(2, 1000, dtype=torch.float64)
    blocks = slicqt(wav)
    assert torch.allclose(slicqt.inverse(blocks, 700), wav[:, :700], atol=1e-12)
    longer = slicqt.inverse(blocks, 5000)
    assert torch.allclose(longer[:, :1000], wav, atol=1e-12)
    assert longer[:, 1000:].abs().max() < 1e-12


def test_leading_dimensions_are_batched():
    slicqt = tiny()
    wav = noise(3, 2, 2, 777, dtype=torch.float64)
    blocks = slicqt(wav)
    assert blocks[0].shape[:3] == (3, 2, 2)
    single = slicqt(wav[1, 0])
    for batched, alone in zip(blocks, single):
        assert torch.allclose(batched[1, 0], alone, atol=1e-12)
    assert torch.allclose(slicqt.inverse(blocks, 777), wav, atol=1e-12)


def test_linearity():
    slicqt = transform("mel")
    x, y = noise(2, 20000, seed=1), noise(2, 20000, seed=2)
    combined = slicqt(2.5 * x - 0.5 * y)
    for block, bx, by in zip(combined, slicqt(x), slicqt(y)):
        assert relative_error(block, 2.5 * bx - 0.5 * by) < 1e-5
    bx, by = slicqt(x), slicqt(y)
    mixed = [0.3 * a + 1.5j * b for a, b in zip(bx, by)]
    expected = 0.3 * slicqt.inverse(bx, 20000) + slicqt.inverse([1.5j * b for b in by], 20000)
    assert relative_error(slicqt.inverse(mixed, 20000), expected) < 1e-5


def test_inputs_are_not_mutated():
    slicqt = transform("bark")
    wav = noise(1, 2, 30000)
    copy = wav.clone()
    blocks = slicqt(wav)
    copies = [block.clone() for block in blocks]
    slicqt.inverse(blocks, 30000)
    assert torch.equal(wav, copy)
    assert all(torch.equal(block, saved) for block, saved in zip(blocks, copies))


# -- gradients ------------------------------------------------------------------------------------

def test_gradcheck_forward_and_inverse():
    slicqt = tiny()
    wav = noise(1, 2, 500, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: tuple(slicqt(x)), (wav,), fast_mode=True)
    blocks = [block.detach().requires_grad_(True) for block in slicqt(wav.detach())]
    assert torch.autograd.gradcheck(lambda *b: slicqt.inverse(list(b), 500), tuple(blocks), fast_mode=True)


def test_gradients_flow_through_forward_and_inverse():
    """The round trip is the identity, so d/dx sum(w * inverse(forward(x))) = w."""
    slicqt = transform("mel")
    wav = noise(2, 2, 30000).requires_grad_(True)
    weights = noise(2, 2, 30000, seed=5)
    (slicqt.inverse(slicqt(wav), 30000) * weights).sum().backward()
    assert wav.grad is not None and float((wav.grad - weights).abs().max()) < 1e-5
    blocks = [block.detach().requires_grad_(True) for block in slicqt(wav.detach())]
    slicqt.inverse(blocks, 30000).square().sum().backward()
    assert all(block.grad is not None and block.grad.abs().sum() > 0 for block in blocks)


# -- flattened views ------------------------------------------------------------------------------

def test_flatten_unflatten_and_overlap_add():
    block = torch.randn(2, 2, 5, 7, 8, dtype=torch.complex64)
    flat = flatten_slices(block)
    assert flat.shape == (2, 2, 5, 56) and torch.equal(flat[..., 8:16], block[..., 1, :])
    padded = torch.cat([flat, torch.zeros(2, 2, 5, 3, dtype=flat.dtype)], dim=-1)  # what a conv stack may add
    assert torch.equal(unflatten_slices(padded, 7, 8), block)
    added = overlap_add(block)
    assert added.shape == (2, 2, 5, 32)
    assert torch.allclose(added[..., 4:8], block[..., 0, 4:] + block[..., 1, :4])
    with pytest.raises(DemixError):
        unflatten_slices(flat[..., :-1], 7, 8)


# -- errors ---------------------------------------------------------------------------------------

def test_bad_configuration_and_inputs_raise_demix_errors():
    with pytest.raises(DemixError, match="unknown sliCQT scale"):
        SliCQT("log", 10)
    with pytest.raises(DemixError, match="fmin"):
        SliCQT("bark", 10, 500.0, 100.0)
    slicqt = tiny()
    with pytest.raises(DemixError, match="real floating-point"):
        slicqt(torch.zeros(100, dtype=torch.int16).view(1, -1))
    blocks = slicqt(noise(1, 300, dtype=torch.float64))
    with pytest.raises(DemixError, match="blocks"):
        slicqt.inverse(blocks[:-1], 300)
    with pytest.raises(DemixError, match="block 1"):
        slicqt.inverse([blocks[0], blocks[1][..., :-1], *blocks[2:]], 300)


# -- references -----------------------------------------------------------------------------------

class _NumpyClipShim:
    """nsgt 0.19 calls np.clip(int_array, ..., np.inf, out=int_array), refused by numpy >= 1.26."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def clip(array, low, high, out=None, **kwargs):
        return np.clip(array, low, high, out=out, casting="unsafe", **kwargs)


class _ReferenceBark(nsgt_fscale.Scale):
    """nsgt 0.19 has no Bark scale: bands equally spaced in 6 asinh(f / 600)."""

    def __init__(self, fmin, fmax, bands):
        super().__init__(bands)
        self.low = 6 * math.asinh(fmin / 600)
        self.per_band = (6 * math.asinh(fmax / 600) - self.low) / (bands - 1)

    def F(self, bnd=None):  # noqa: N802
        bnd = np.arange(self.bnds) if bnd is None else bnd
        return 600 * np.sinh((bnd * self.per_band + self.low) / 6)


def _nsgt_reference(name: str, slicqt: SliCQT, monkeypatch):
    scale, bins, fmin = CONFIGS[name]
    monkeypatch.setattr(nsgt_nsgfwin, "np", _NumpyClipShim())
    reference_scale = {"bark": lambda: _ReferenceBark(fmin, RATE / 2, bins),
                       "mel": lambda: nsgt_fscale.MelScale(fmin, RATE / 2, bins),
                       "linear": lambda: nsgt_fscale.LinScale(fmin, RATE / 2, bins)}[name]()
    return nsgt_slicq.NSGT_sliced(reference_scale, slicqt.slice_length, slicqt.transition_length, RATE,
                                  real=True, multichannel=True)


@pytest.mark.parametrize("name", ["bark", "mel", "linear"])
def test_parity_with_nsgt(name, monkeypatch):
    """Coefficients and reconstruction equal nsgt 0.19's (numpy, float64); mel and linear have
    channels whose mirrored (negative-frequency) windows reach the positive half of the spectrum."""
    slicqt = transform(name, torch.float64)
    reference = _nsgt_reference(name, slicqt, monkeypatch)
    wav = noise(2, RATE // 2, dtype=torch.float64, seed=3)
    slices = list(reference.forward([wav.numpy()]))
    # reference: per slice, per audio channel, per frequency channel -> (S, C, channels, T)
    expected = np.array([[np.concatenate(channel) for channel in one] for one in slices])
    blocks = slicqt(wav)
    ours = torch.cat([block.permute(2, 0, 1, 3).flatten(-2) for block in blocks], dim=-1).numpy()
    # ours is (S, C, sum F_b*T_b) with channels in the same order
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-10
    reconstructed = np.concatenate(list(reference.backward(slices)), axis=-1)[:, :wav.shape[-1]]
    assert np.abs(slicqt.inverse(blocks, wav.shape[-1]).numpy() - reconstructed).max() < 1e-12


@pytest.mark.parametrize("name", ["bark", "mel", "linear"])
def test_parity_with_xumx_slicq_v2(name, capsys):
    scale, bins, fmin = CONFIGS[name]
    base = xumx_transforms.NSGTBase(scale, bins, fmin, device="cpu")
    encoder, decoder = xumx_transforms.make_filterbanks(base)
    slicqt = transform(name)
    assert (slicqt.slice_length, slicqt.transition_length) == (base.sllen, base.trlen)
    wav = noise(1, 2, RATE, seed=4)
    expected = [torch.view_as_complex(block) for block in encoder(wav)]
    blocks = slicqt(wav)
    assert [block.shape for block in blocks] == [block.shape for block in expected]
    assert max(relative_error(ours, theirs) for ours, theirs in zip(blocks, expected)) < 1e-5
    if name == "bark":  # elsewhere the reference's inverse mishandles the mirrored (negative-frequency) windows
        reconstructed = decoder([torch.view_as_real(block).clone() for block in expected], wav.shape[-1])
        assert relative_error(slicqt.inverse(expected, wav.shape[-1]), reconstructed) < 1e-5


# -- devices, plots -------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    slicqt = transform("bark")
    wav = noise(2, 50000)
    cuda = slicqt.to("cuda")
    try:
        blocks = cuda(wav.cuda())
        assert blocks[0].device.type == "cuda"
        assert float((cuda.inverse(blocks, 50000).cpu() - wav).abs().max()) < 1e-5
        for on_gpu, on_cpu in zip(blocks, SliCQT(*CONFIGS["bark"])(wav)):
            assert relative_error(on_gpu.cpu(), on_cpu) < 1e-5
    finally:
        slicqt.to("cpu")


def test_plot_writes_a_png(tmp_path):
    slicqt = SliCQT("mel", 40, 50.0, 8000.0, samplerate=16000)
    wav = noise(2, 16000)
    path = plot_slicqt(wav, slicqt, tmp_path / "plot.png", title="noise")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [path]


def test_plot_command(tmp_path, capsys):
    import soundfile

    from tools.plot_slicqt import main

    audio = tmp_path / "tone.wav"
    t = np.arange(16000) / 16000
    soundfile.write(audio, np.sin(2 * np.pi * 440 * t)[:, None] * 0.5, 16000)
    output = tmp_path / "out.png"
    main([str(audio), "-o", str(output), "--scale", "mel", "--bins", "40", "--fmin", "50", "--duration", "0.5"])
    assert output.read_bytes()[:4] == b"\x89PNG" and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.wav"), "-o", str(output)])
    assert exit_info.value.code == 2 and "missing.wav" in capsys.readouterr().err


def test_plot_command_runs_as_a_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.plot_slicqt", str(tmp_path / "missing.wav"), "-o",
                             str(tmp_path / "out.png")], capture_output=True, text=True)
    assert result.returncode == 2 and "missing.wav" in result.stderr and "Traceback" not in result.stderr
