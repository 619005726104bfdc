"""Hybrid Demucs (Défossez 2021, "Hybrid Spectrogram and Waveform Source Separation"), v3.

Two U-Nets side by side: a frequency branch on the mixture STFT (complex-as-channels, or
magnitude with Wiener filtering at the output) and a time branch on the waveform. Frequency
layers convolve over frequency (kernel (k, 1)) until one bin is left; there the time branch,
whose stride has caught up with the STFT hop, is added in, and the deepest layers are shared
time convolutions. The decoder mirrors this; the two outputs are summed as waveforms.

Constructor options, parameter names and eval-mode numerics are those of PyPI demucs 4.1.0
(`demucs.hdemucs.HDemucs`), so that published weights load with `strict=True`. The loss is on
waveforms (through the iSTFT), see :func:`build_demucs_objective`.

The shared machinery (layer plan, STFT conventions, both passes of the U-Net, spectral output)
lives in :class:`HybridUNet`, which :class:`demixlab.models.demucs.htdemucs.HTDemucs` reuses.
"""
import functools
import math
import typing as tp
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ...spectral import wiener
from ..contract import NetworkAxes, SeparationModel, require
from ..losses import Objective, build_waveform_objective
from .blocks import BandSplit, DecoderLayer, EncoderLayer, ScaledEmbedding, pad1d, rescale_module

Segment = tp.Union[int, float, Fraction]
WIENER_WINDOW = 300  # frames per independent Wiener filtering window, as the reference


# ------------------------------------------------------------------------------ STFT conventions
def demucs_stft(x: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """(..., T) -> (..., n_fft // 2 + 1, frames) complex: Hann window, centred with reflect
    padding, normalised by 1/sqrt(n_fft) (demucs' convention, unlike :mod:`demixlab.spectral`)."""
    *others, length = x.shape
    z = torch.stft(x.reshape(-1, length), n_fft, hop_length, window=torch.hann_window(n_fft).to(x),
                   win_length=n_fft, normalized=True, center=True, return_complex=True, pad_mode="reflect")
    return z.view(*others, *z.shape[-2:])


def demucs_istft(z: torch.Tensor, hop_length: int, length: int) -> torch.Tensor:
    """Inverse of :func:`demucs_stft` for (..., bins, frames), cropped/padded to `length`."""
    *others, bins, frames = z.shape
    n_fft = 2 * bins - 2
    x = torch.istft(z.reshape(-1, bins, frames), n_fft, hop_length, window=torch.hann_window(n_fft).to(z.real),
                    win_length=n_fft, normalized=True, length=length, center=True)
    return x.view(*others, x.shape[-1])


# ----------------------------------------------------------------------------------- layer plan
@dataclass(frozen=True)
class LayerPlan:
    """Shapes and options of encoder layer `index` and of its mirror decoder layer.

    `merge` marks the last frequency layer (its kernel spans all remaining bins): the time
    branch is injected there. Layers after it (`freq` False) are time convolutions on the
    merged branch. Channels: `chin`/`chout` for the time branch, `chin_z`/`chout_z` for the
    frequency branch; `dec_out`/`dec_out_z` are what the mirror decoders produce.
    """

    index: int
    freq: bool
    merge: bool
    kernel_size: int
    stride: int
    norm: bool
    lstm: bool
    attn: bool
    multi: bool
    chin: int
    chout: int
    chin_z: int
    chout_z: int
    dec_out: int
    dec_out_z: int

    @property
    def pad(self) -> int:
        """Padding of the frequency branch's strided convolution (none at the merge)."""
        return 0 if self.merge else self.kernel_size // 4


def plan_layers(*, audio_channels: int, num_sources: int, channels: int, channels_time: tp.Optional[int],
                growth: float, nfft: int, cac: bool, depth: int, kernel_size: int, stride: int, time_stride: int,
                norm_starts: int, dconv_lstm: tp.Optional[int], dconv_attn: tp.Optional[int],
                multi_freqs: tp.Optional[tp.Sequence[float]], multi_freqs_depth: int
                ) -> tp.Tuple[tp.List[LayerPlan], int]:
    """The layer plan of the hybrid U-Net, and the number of frequency bins after the first
    layer (the size of the frequency embedding)."""
    complex_factor = 2 if cac else 1
    chin, chout = audio_channels, channels_time or channels
    chin_z, chout_z = audio_channels * complex_factor, channels
    bins = nfft // 2
    embedding_bins = bins
    plans = []
    for index in range(depth):
        freq = bins > 1
        merge = freq and bins <= kernel_size
        if not freq:
            kernel, layer_stride = 2 * time_stride, time_stride
        else:
            kernel, layer_stride = (bins if merge else kernel_size), stride
        if merge:  # both branches must have the same width where they merge
            chout_z = max(chout, chout_z)
            chout = chout_z
        dec_out = audio_channels * num_sources if index == 0 else chin
        dec_out_z = dec_out * complex_factor if index == 0 else chin_z
        plans.append(LayerPlan(
            index=index, freq=freq, merge=merge, kernel_size=kernel, stride=layer_stride,
            norm=index >= norm_starts,
            lstm=dconv_lstm is not None and index >= dconv_lstm,
            attn=dconv_attn is not None and index >= dconv_attn,
            multi=bool(multi_freqs) and index < multi_freqs_depth,
            chin=chin, chout=chout, chin_z=chin_z, chout_z=chout_z, dec_out=dec_out, dec_out_z=dec_out_z))
        chin, chin_z = chout, chout_z
        chout, chout_z = int(growth * chout), int(growth * chout_z)
        if freq:
            bins = 1 if bins <= kernel_size else bins // stride
        if index == 0:
            embedding_bins = bins
    return plans, embedding_bins


@dataclass
class _Skips:
    """What the encoder keeps for the decoder: skip activations and input lengths per layer."""

    freq: tp.List[torch.Tensor] = field(default_factory=list)
    time: tp.List[torch.Tensor] = field(default_factory=list)
    lengths: tp.List[int] = field(default_factory=list)
    lengths_t: tp.List[int] = field(default_factory=list)


def _normalize(x: torch.Tensor, dims: tp.Tuple[int, ...]) -> tp.Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardise per example over `dims`; returns (normalised, mean, std)."""
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (1e-5 + std), mean, std


# ------------------------------------------------------------------------------ shared U-Net
class HybridUNet(SeparationModel):
    """The machinery shared by HDemucs and HTDemucs: building the two branches, the spectral
    input and output, and the encoder and decoder passes. Subclasses write `forward`.

    Attributes set by :meth:`_build`, with the reference's names: `encoder`, `decoder`
    (frequency branch, merged layers included), `tencoder`, `tdecoder` (time branch, only
    for frequency layers), `freq_emb`.
    """

    hybrid: bool = True
    hybrid_old: bool = False

    def _setup(self, segment: Segment, *, nfft: int, cac: bool, wiener_iters: int, end_iters: int,
               wiener_residual: bool) -> None:
        require(nfft >= 8 and nfft % 4 == 0, f"model.nfft must be a multiple of 4 (at least 8), got {nfft}")
        require(segment > 0, f"model.segment must be a positive number of seconds, got {segment}")
        self.segment = segment
        self.nfft = nfft
        self.hop_length = nfft // 4
        self.cac = cac
        self.wiener_iters = wiener_iters
        self.end_iters = end_iters
        self.wiener_residual = wiener_residual

    @property
    def chunk_seconds(self) -> tp.Optional[float]:
        """The segment option: seconds per chunk when separating long signals."""
        return float(self.segment)

    def _build(self, plans: tp.Sequence[LayerPlan], embedding_bins: int, *, hybrid: bool, kernel_size: int,
               stride: int, rewrite: bool, norm_groups: int, context: int, context_enc: int, dconv_mode: int,
               dconv_depth: int, dconv_comp: float, dconv_init: float, multi_freqs: tp.Optional[tp.Sequence[float]],
               freq_emb: float, emb_scale: float, emb_smooth: bool) -> None:
        require(dconv_mode in (0, 1, 2, 3), f"model.dconv_mode must be 0, 1, 2 or 3, got {dconv_mode}")
        self.depth = len(plans)
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        if hybrid:
            self.tencoder = nn.ModuleList()
            self.tdecoder = nn.ModuleList()
        enc_dconv, dec_dconv = bool(dconv_mode & 1), bool(dconv_mode & 2)
        for plan in plans:
            common = dict(norm=plan.norm, norm_groups=norm_groups, rewrite=rewrite,
                          dconv_kw=dict(lstm=plan.lstm, attn=plan.attn, depth=dconv_depth, compress=dconv_comp,
                                        init=dconv_init, gelu=True))
            is_last = plan.index == 0  # the decoder's output layer
            # Frequency-branch layers (also the time convolutions after the merge).
            make_encoder = functools.partial(
                EncoderLayer, plan.chin_z, plan.chout_z, kernel_size=plan.kernel_size, stride=plan.stride,
                freq=plan.freq, pad=plan.pad, dconv=enc_dconv, context=context_enc, **common)
            make_decoder = functools.partial(
                DecoderLayer, plan.chout_z, plan.dec_out_z, last=is_last, kernel_size=plan.kernel_size,
                stride=plan.stride, freq=plan.freq, pad=plan.pad, dconv=dec_dconv, context=context,
                context_freq=not plan.multi, **common)
            if plan.multi:
                assert multi_freqs
                bands = dict(split_ratios=multi_freqs, kernel_size=plan.kernel_size, stride=plan.stride)
                self.encoder.append(BandSplit(make_encoder, decoder=False, **bands))
                self.decoder.insert(0, BandSplit(make_decoder, decoder=True, last=is_last, **bands))
            else:
                self.encoder.append(make_encoder())
                self.decoder.insert(0, make_decoder())
            if hybrid and plan.freq:
                time_kw = dict(kernel_size=kernel_size, stride=stride, freq=False, pad=kernel_size // 4,
                               empty=plan.merge, **common)
                self.tencoder.append(EncoderLayer(plan.chin, plan.chout, dconv=enc_dconv, context=context_enc,
                                                  **time_kw))
                self.tdecoder.insert(0, DecoderLayer(plan.chout, plan.dec_out, last=is_last, dconv=dec_dconv,
                                                     context=context, **time_kw))
        self.freq_emb: tp.Optional[ScaledEmbedding] = None
        if freq_emb:
            self.freq_emb = ScaledEmbedding(embedding_bins, plans[0].chout_z, smooth=emb_smooth, scale=emb_scale)
            self.freq_emb_scale = freq_emb

    # ------------------------------------------------------------------------ spectral side
    def _spec(self, x: torch.Tensor) -> torch.Tensor:
        """Waveform (B, C, T) -> STFT (B, C, nfft // 2, frames) without the Nyquist bin.

        Hybrid models pad the signal so that there are exactly ceil(T / hop) frames, the
        first one centred on sample hop / 2 (convolution-like framing, aligned with the time
        branch). `hybrid_old` reproduces the zero padding of early MDX models.
        """
        hop = self.hop_length
        if not self.hybrid:
            return demucs_stft(x, self.nfft, hop)[..., :-1, :]
        frames = int(math.ceil(x.shape[-1] / hop))
        pad = hop // 2 * 3
        mode = "constant" if self.hybrid_old else "reflect"
        x = pad1d(x, pad, pad + frames * hop - x.shape[-1], mode=mode)
        z = demucs_stft(x, self.nfft, hop)[..., :-1, :]
        assert z.shape[-1] == frames + 4, (z.shape, frames)
        return z[..., 2:2 + frames]

    def _ispec(self, z: torch.Tensor, length: int) -> torch.Tensor:
        """Inverse of :meth:`_spec`: (..., nfft // 2, frames) -> (..., length)."""
        hop = self.hop_length
        z = F.pad(z, (0, 0, 0, 1))  # zero Nyquist bin
        if not self.hybrid:
            return demucs_istft(z, hop, length)
        z = F.pad(z, (2, 2))
        pad = hop // 2 * 3
        padded = hop * int(math.ceil(length / hop))
        if self.hybrid_old:
            return demucs_istft(z, hop, padded)[..., :length]
        return demucs_istft(z, hop, padded + 2 * pad)[..., pad:pad + length]

    def _magnitude(self, z: torch.Tensor) -> torch.Tensor:
        """Network input from the STFT: real and imaginary parts as channels (CaC), or magnitudes."""
        if not self.cac:
            return z.abs()
        batch, channels, bins, frames = z.shape
        return torch.view_as_real(z).permute(0, 1, 4, 2, 3).reshape(batch, channels * 2, bins, frames)

    def _mask(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Source STFTs (B, S, C, F, frames) from the network output `m` (B, S, C', F, frames).

        CaC: `m` holds the complex spectrograms. Otherwise `m` holds magnitudes: with a negative
        number of Wiener iterations they take the mixture phase, else they go through the
        multichannel Wiener filter (`end_iters` iterations in training, `wiener_iters` in eval).
        """
        if self.cac:
            batch, num_sources, _, bins, frames = m.shape
            out = m.view(batch, num_sources, -1, 2, bins, frames).permute(0, 1, 2, 4, 5, 3)
            return torch.view_as_complex(out.contiguous())
        iterations = self.end_iters if self.training else self.wiener_iters
        if iterations < 0:
            z = z[:, None]
            return z / (1e-8 + z.abs()) * m
        out = wiener(m, z, iterations, residual=self.wiener_residual, window=WIENER_WINDOW)
        if self.wiener_residual:
            out = out[:, :-1]
        return out.to(z.dtype)

    # ------------------------------------------------------------------------------ passes
    def _encode(self, x: torch.Tensor, xt: tp.Optional[torch.Tensor]
                ) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor], _Skips]:
        """Run both encoders; returns the deepest activations and the skips."""
        skips = _Skips()
        time_layers = len(self.tencoder) if self.hybrid else 0
        for index, encode in enumerate(self.encoder):
            skips.lengths.append(x.shape[-1])
            inject = None
            if index < time_layers:
                assert xt is not None
                skips.lengths_t.append(xt.shape[-1])
                tenc = self.tencoder[index]
                xt = tenc(xt)
                if tenc.empty:  # the merge: the time branch joins the frequency branch
                    inject = xt
                else:
                    skips.time.append(xt)
            x = encode(x, inject)
            if index == 0 and self.freq_emb is not None:
                # Frequency embedding: lets the frequency convolutions depend on the bin.
                bins = torch.arange(x.shape[-2], device=x.device)
                embedding = self.freq_emb(bins).t()[None, :, :, None].expand_as(x)
                x = x + self.freq_emb_scale * embedding
            skips.freq.append(x)
        return x, xt, skips

    def _decode(self, x: torch.Tensor, xt: tp.Optional[torch.Tensor], skips: _Skips
                ) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """Run both decoders from the deepest activations; consumes `skips`."""
        offset = self.depth - (len(self.tdecoder) if self.hybrid else 0)
        for index, decode in enumerate(self.decoder):
            x, pre = decode(x, skips.freq.pop(), skips.lengths.pop())
            if self.hybrid and index >= offset:
                tdec = self.tdecoder[index - offset]
                length_t = skips.lengths_t.pop()
                if tdec.empty:  # the split: the time branch starts from the merged activations
                    assert pre.shape[2] == 1, pre.shape
                    xt, _ = tdec(pre[:, :, 0], None, length_t)
                else:
                    xt, _ = tdec(xt, skips.time.pop(), length_t)
        assert not (skips.freq or skips.time or skips.lengths_t)
        return x, xt

    def _run(self, mix: torch.Tensor, bottom: tp.Callable[[torch.Tensor, tp.Optional[torch.Tensor]],
                                                                tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]],
                  out_length: tp.Optional[int] = None) -> torch.Tensor:
        """The whole hybrid pass on (B, C, T) -> (B, S, C, out_length or T); `bottom` maps the
        deepest encoder activations (x, xt) to the decoders' starting point."""
        inputs, z = self._inputs(mix)
        outputs = self._network(*inputs.values(), bottom=bottom, length=out_length)
        return self._outputs(outputs, z, mix.shape[-1] if out_length is None else out_length)

    def network_inputs(self, mixture: torch.Tensor) -> tp.Tuple[tp.Dict[str, torch.Tensor], torch.Tensor]:
        """The spectral branch's input (CaC channels or magnitudes) and, hybrid, the waveform;
        the complex STFT as context."""
        return self._inputs(mixture)

    def _inputs(self, mixture: torch.Tensor) -> tp.Tuple[tp.Dict[str, torch.Tensor], torch.Tensor]:
        z = self._spec(mixture)
        inputs = {"spectrum": self._magnitude(z).to(mixture.device)}
        if self.hybrid:
            inputs["mixture"] = mixture
        return inputs, z

    def run_network(self, *inputs: torch.Tensor) -> tp.Tuple[torch.Tensor, ...]:
        """Both U-Net branches: (spectral output (B, S, C', F, frames), and hybrid the time
        branch's waveforms (B, S, C, T))."""
        return self._network(*inputs, bottom=self._bottom)

    def network_outputs(self, outputs: tp.Sequence[torch.Tensor], context: torch.Tensor,
                        mixture: torch.Tensor) -> torch.Tensor:
        """Masking or Wiener filtering of the STFT (`context`), the inverse STFT, plus the time branch."""
        return self._outputs(outputs, context, mixture.shape[-1])

    def network_axes(self) -> NetworkAxes:
        """Batch, frames and time of the branches' inputs and outputs."""
        inputs = {"spectrum": {0: "batch", 3: "frames"}}
        outputs = {"spectral": {0: "batch", 4: "frames"}}
        if self.hybrid:
            inputs["mixture"] = {0: "batch", 2: "time"}
            outputs["waveform"] = {0: "batch", 3: "time"}
        return NetworkAxes(inputs=inputs, outputs=outputs)

    def _bottom(self, x: torch.Tensor, xt: tp.Optional[torch.Tensor]
                ) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """Where the decoders start: zeros (the signal goes through the U-Net skips)."""
        return torch.zeros_like(x), torch.zeros_like(x) if self.hybrid else None

    def _network(self, x: torch.Tensor, mix: tp.Optional[torch.Tensor] = None, *,
                 bottom: tp.Callable[[torch.Tensor, tp.Optional[torch.Tensor]],
                                     tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]],
                 length: tp.Optional[int] = None) -> tp.Tuple[torch.Tensor, ...]:
        x, mean, std = _normalize(x, (1, 2, 3))
        xt, meant, stdt = _normalize(mix, (1, 2)) if self.hybrid and mix is not None else (None, None, None)
        batch, _, bins, frames = x.shape
        x, xt, skips = self._encode(x, xt)
        x, xt = bottom(x, xt)
        x, xt = self._decode(x, xt, skips)
        num_sources = len(self.sources)
        x = x.view(batch, num_sources, -1, bins, frames) * std[:, None] + mean[:, None]
        if not self.hybrid:
            return (x,)
        assert xt is not None and stdt is not None and meant is not None and mix is not None
        xt = xt.view(batch, num_sources, -1, mix.shape[-1] if length is None else length)
        return x, xt * stdt[:, None] + meant[:, None]

    def _outputs(self, outputs: tp.Sequence[torch.Tensor], z: torch.Tensor, length: int) -> torch.Tensor:
        out = self._ispec(self._mask(z, outputs[0]), length)
        if self.hybrid:
            out = outputs[1] + out
        return out


def _check_layers(plans: tp.Sequence[LayerPlan], *, hybrid: bool, nfft: int, stride: int, kernel_size: int,
                  multi_freqs: tp.Optional[tp.Sequence[float]], need_merge: bool) -> None:
    """Reject settings whose branches could not be aligned (friendlier than a shape error)."""
    if multi_freqs:
        ratios = list(multi_freqs)
        require(all(a < b for a, b in zip([0.0] + ratios, ratios + [1.0])),
               f"model.multi_freqs must be increasing ratios in (0, 1), got {ratios}")
        require(not any(plan.multi and (plan.norm or not plan.freq or plan.merge) for plan in plans),
               "model.multi_freqs: band-split layers (the first model.multi_freqs_depth) must be frequency "
               "layers without group norm (raise model.norm_starts or lower model.multi_freqs_depth)")
    if not hybrid:
        return
    merges = [plan.index for plan in plans if plan.merge]
    if need_merge:
        require(bool(merges), f"model.depth={len(plans)} is too shallow for a hybrid model with nfft={nfft}: the "
                             f"time branch must merge into the frequency branch (deepen the model or set hybrid=false)")
    if merges:
        require(stride ** (merges[0] + 1) == nfft // 4,
               f"hybrid branches cannot merge: the time branch's stride {stride}^{merges[0] + 1} at layer "
               f"{merges[0]} differs from the STFT hop {nfft // 4} (model.nfft, model.stride, model.kernel_size="
               f"{kernel_size})")


class HDemucs(HybridUNet):
    """Hybrid Demucs v3: (B, C, T) mixture -> (B, S, C, T) sources.

    Options and defaults are the reference's (`demucs.hdemucs.HDemucs`, demucs 4.1.0):

    Args:
        sources: source names (output order).
        samplerate: sample rate (metadata).
        audio_channels: input/output audio channels.
        channels: hidden channels of the first layer; `channels_time`: of the time branch if
            different. `growth`: channel multiplier per layer.
        nfft: STFT size (hop nfft / 4). `cac`: complex as channels; otherwise magnitudes
            filtered by `wiener_iters` (eval) / `end_iters` (train) Wiener iterations (< 0:
            mixture phase), with an extra residual source if `wiener_residual`.
        depth: layers per encoder/decoder. `rewrite`: GLU 1x1 convolutions.
        hybrid: add the time branch. `hybrid_old`: the zero-padding STFT of early MDX models.
        multi_freqs, multi_freqs_depth: split the first layers into frequency bands with
            their own weights.
        freq_emb, emb_scale, emb_smooth: frequency embedding after the first layer, its weight,
            learning-rate boost and smooth initialisation.
        kernel_size, stride: of the frequency and time layers. `time_stride`: of the layers
            after the merge. `context`, `context_enc`: half width of the GLU convolutions of
            the decoder / encoder.
        norm_starts, norm_groups: group norm from that layer on.
        dconv_mode: DConv branches in encoder (1), decoder (2) or both (3). dconv_depth,
            dconv_comp, dconv_init: blocks, compression, LayerScale init. dconv_attn,
            dconv_lstm: local attention / BiLSTM from that layer on.
        rescale: weight-rescaling initialisation reference (0 disables).
        segment: training segment in seconds (metadata, e.g. for chunked inference).
    """

    def __init__(self, sources: tp.Sequence[str], samplerate: int = 44100, audio_channels: int = 2, *,
                 channels: int = 48, channels_time: tp.Optional[int] = None, growth: float = 2,
                 nfft: int = 4096, wiener_iters: int = 0, end_iters: int = 0, wiener_residual: bool = False,
                 cac: bool = True, depth: int = 6, rewrite: bool = True, hybrid: bool = True,
                 hybrid_old: bool = False, multi_freqs: tp.Optional[tp.Sequence[float]] = None,
                 multi_freqs_depth: int = 2, freq_emb: float = 0.2, emb_scale: float = 10, emb_smooth: bool = True,
                 kernel_size: int = 8, time_stride: int = 2, stride: int = 4, context: int = 1, context_enc: int = 0,
                 norm_starts: int = 4, norm_groups: int = 4, dconv_mode: int = 1, dconv_depth: int = 2,
                 dconv_comp: float = 4, dconv_attn: int = 4, dconv_lstm: int = 4, dconv_init: float = 1e-4,
                 rescale: float = 0.1, segment: Segment = 4 * 10):
        super().__init__(sources, samplerate, audio_channels)
        require(channels >= 1 and depth >= 1,
               f"model.channels and model.depth must be positive, got {channels} and {depth}")
        require(not hybrid_old or hybrid, "model.hybrid_old requires model.hybrid=true")
        require(not hybrid or wiener_iters == end_iters,
               f"a hybrid model needs model.wiener_iters == model.end_iters, got {wiener_iters} and {end_iters}")
        self._setup(segment, nfft=nfft, cac=cac, wiener_iters=wiener_iters, end_iters=end_iters,
                    wiener_residual=wiener_residual)
        self.hybrid = hybrid
        self.hybrid_old = hybrid_old
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.context = context
        plans, embedding_bins = plan_layers(
            audio_channels=audio_channels, num_sources=len(self.sources), channels=channels,
            channels_time=channels_time, growth=growth, nfft=nfft, cac=cac, depth=depth, kernel_size=kernel_size,
            stride=stride, time_stride=time_stride, norm_starts=norm_starts, dconv_lstm=dconv_lstm,
            dconv_attn=dconv_attn, multi_freqs=multi_freqs, multi_freqs_depth=multi_freqs_depth)
        _check_layers(plans, hybrid=hybrid, nfft=nfft, stride=stride, kernel_size=kernel_size,
                      multi_freqs=multi_freqs, need_merge=True)
        self._build(plans, embedding_bins, hybrid=hybrid, kernel_size=kernel_size, stride=stride, rewrite=rewrite,
                    norm_groups=norm_groups, context=context, context_enc=context_enc, dconv_mode=dconv_mode,
                    dconv_depth=dconv_depth, dconv_comp=dconv_comp, dconv_init=dconv_init, multi_freqs=multi_freqs,
                    freq_emb=freq_emb, emb_scale=emb_scale, emb_smooth=emb_smooth)
        if rescale:
            rescale_module(self, reference=rescale)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separate (B, C, T) -> (B, S, C, T)."""
        # The branches start decoding from zeros: the signal goes through the U-Net skips.
        return self._run(mix, self._bottom)


# ---------------------------------------------------------------------------------- family
def build_demucs_objective(model: SeparationModel, *, loss: str = "l1",
                           source_weights: tp.Optional[tp.Dict[str, float]] = None) -> Objective:
    """Demucs' objective: waveform L1 (`loss.loss=l1`, default) or MSE (`mse`) per source,
    averaged with `loss.source_weights` ({name: weight}, missing names weigh 1)."""
    return build_waveform_objective(model, loss=loss, source_weights=source_weights)
