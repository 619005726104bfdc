"""Band-split RoFormers: BS-RoFormer (Lu et al. 2023, "Music Source Separation with Band-Split
RoPE Transformer") and Mel-Band RoFormer (Wang et al. 2023), and their training objective.

The complex STFT of the mixture (real and imaginary parts of every channel) is split along
frequency into bands; each band becomes one token per frame (RMSNorm + Linear to `dim`). `depth`
blocks alternate a transformer over frames (within each band) and a transformer over bands
(within each frame), both with rotary positions; optionally a cross-covariance transformer over
all tokens comes first in each block. Per source, a mask estimator maps every band token to a
complex ratio mask of the band's bins; the masked mixture STFT is inverted at the input length.

BS-RoFormer's bands are contiguous bin ranges (`freqs_per_bands`, the paper's 62 by default).
Mel-Band RoFormer's are the supports of a mel filter bank (`num_bands` triangles, binarised, the
first and last bins forced into the first and last bands), so they overlap; the masks of
overlapping bands are averaged per bin.

Layouts: waveforms (B, C, T) and (B, S, C, T); spectra (B, C, F, N) for F bins and N frames.
The STFT and its inverse run in float32 even under autocast.
"""
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DemixError
from ...spectral.mel import mel_filter_bank
from ..contract import NetworkAxes, SeparationModel, require
from ..losses import Objective, parse_source_weights
from .blocks import BandSplit, MaskEstimator, RMSNorm, RotaryEmbedding, Transformer, run_block

# The paper's 62 bands of the 1025 bins of a 2048-point STFT at 44.1 kHz.
PAPER_FREQS_PER_BANDS = [2] * 24 + [4] * 12 + [12] * 8 + [24] * 8 + [48] * 8 + [128, 129]


class BandSplitRoformer(SeparationModel):
    """The trunk both families share; subclasses choose the bands (:meth:`_band_bins`) and where
    the normalisations go.

    Args:
        sources, samplerate, audio_channels: as every family.
        dim: features of every band token.
        depth: blocks of (time transformer, band transformer).
        time_transformer_depth, freq_transformer_depth: layers of each transformer of a block.
        linear_transformer_depth: layers of an extra cross-covariance (linear attention)
            transformer over all tokens at the start of each block (0: none).
        heads, dim_head: attention heads and their width.
        attn_dropout, ff_dropout: dropout in attention and feed-forward blocks.
        attention_gates: per-head sigmoid gates on the attention outputs.
        mask_hidden_layers: hidden (Tanh) layers of each band's mask MLP.
        mlp_expansion_factor: hidden features of the mask MLPs, as a multiple of `dim`.
        stft_n_fft, stft_hop_length, stft_win_length: the STFT (Hann window of `stft_win_length`).
        stft_normalized: orthonormal STFT scaling.
        zero_dc: zero the DC bin of the estimates before the inverse STFT.
        skip_connection: add the outputs of all previous blocks to each block's input.
        residual: the last source has no mask: it is the mixture minus the other estimates (e.g.
            "instrumental" next to a single-target vocals model).
        checkpointing: recompute each transformer's activations in the backward pass (less
            memory for long training segments, about a third more compute).
        segment: seconds per chunk when separating long signals (the training segment).
    """

    norm_each_transformer = False  # Mel-RoFormer ends every transformer with an RMSNorm
    final_norm_after_blocks = True  # BS-RoFormer normalises once, after the last block

    def __init__(self, sources: tp.Sequence[str], samplerate: int, audio_channels: int, *, dim: int = 384,
                 depth: int = 6, time_transformer_depth: int = 1, freq_transformer_depth: int = 1,
                 linear_transformer_depth: int = 0, heads: int = 8, dim_head: int = 64, attn_dropout: float = 0.1,
                 ff_dropout: float = 0.1, attention_gates: bool = False, mask_hidden_layers: int = 1,
                 mlp_expansion_factor: int = 4, stft_n_fft: int = 2048, stft_hop_length: int = 441,
                 stft_win_length: int = 2048, stft_normalized: bool = False, zero_dc: bool = False,
                 skip_connection: bool = False, residual: bool = False, checkpointing: bool = False,
                 segment: float = 8.0):
        super().__init__(sources, samplerate, audio_channels)
        require(dim >= 1 and depth >= 1 and heads >= 1 and dim_head >= 2 and dim_head % 2 == 0,
                f"model.dim, model.depth and model.heads must be positive and model.dim_head even, got {dim}, "
                f"{depth}, {heads} and {dim_head}")
        require(time_transformer_depth >= 1 and freq_transformer_depth >= 1 and linear_transformer_depth >= 0,
                "model.time_transformer_depth and model.freq_transformer_depth must be at least 1 and "
                "model.linear_transformer_depth at least 0")
        require(mask_hidden_layers >= 0 and mlp_expansion_factor >= 1,
                f"model.mask_hidden_layers must be >= 0 and model.mlp_expansion_factor >= 1, got "
                f"{mask_hidden_layers} and {mlp_expansion_factor}")
        require(0 < stft_win_length <= stft_n_fft and 0 < stft_hop_length <= stft_win_length,
                f"the STFT needs 0 < model.stft_hop_length <= model.stft_win_length <= model.stft_n_fft, got "
                f"{stft_hop_length}, {stft_win_length}, {stft_n_fft}")
        require(segment > 0, f"model.segment must be a positive number of seconds, got {segment}")
        require(not residual or len(self.sources) >= 2,
                f"model.residual needs at least two sources (the last one is the residual), got {self.sources}")
        self.n_fft, self.hop_length, self.win_length = stft_n_fft, stft_hop_length, stft_win_length
        self.normalized = stft_normalized
        self.zero_dc = zero_dc
        self.skip_connection = skip_connection
        self.residual = residual
        self.checkpointing = checkpointing
        self.segment = float(segment)
        self.register_buffer("window", torch.hann_window(stft_win_length), persistent=False)

        bins = stft_n_fft // 2 + 1
        band_bins = self._band_bins(bins)
        covered = torch.zeros(bins, dtype=torch.long)
        for indices in band_bins:
            covered[indices] += 1
        require(bool((covered > 0).all()), "every STFT bin must belong to a band")
        # Features are ordered bin-major, then channel, then real/imaginary (the reference's layout):
        # feature index of (bin f, channel c) in the (F * C) axis is f * C + c.
        channel_index = torch.arange(audio_channels)
        indices = torch.cat([(band[:, None] * audio_channels + channel_index).flatten() for band in band_bins])
        self.contiguous = bool(torch.equal(indices, torch.arange(bins * audio_channels)))
        self.register_buffer("freq_indices", indices, persistent=False)
        self.register_buffer("bands_per_bin", covered.repeat_interleave(audio_channels).float(), persistent=False)
        widths = [2 * len(band) * audio_channels for band in band_bins]

        time_rotary, freq_rotary = RotaryEmbedding(dim_head), RotaryEmbedding(dim_head)
        common = dict(dim=dim, heads=heads, dim_head=dim_head, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
                      gates=attention_gates, norm_output=self.norm_each_transformer)
        blocks = []
        for _ in range(depth):
            block = []
            if linear_transformer_depth:
                block.append(Transformer(depth=linear_transformer_depth, linear=True, **common))
            block.append(Transformer(depth=time_transformer_depth, rotary=time_rotary, **common))
            block.append(Transformer(depth=freq_transformer_depth, rotary=freq_rotary, **common))
            blocks.append(nn.ModuleList(block))
        self.layers = nn.ModuleList(blocks)
        if self.final_norm_after_blocks:
            self.final_norm = RMSNorm(dim)
        self.band_split = BandSplit(dim, widths)
        masked = len(self.sources) - 1 if residual else len(self.sources)
        self.mask_estimators = nn.ModuleList([MaskEstimator(dim, widths, mask_hidden_layers, mlp_expansion_factor)
                                              for _ in range(masked)])

    def _band_bins(self, bins: int) -> tp.List[torch.Tensor]:  # pragma: no cover - each family defines it
        """The STFT bins (indices in [0, bins)) of every band, in order."""
        raise NotImplementedError

    @property
    def chunk_seconds(self) -> tp.Optional[float]:
        """The segment option: seconds per chunk when separating long signals."""
        return self.segment

    # ------------------------------------------------------------------------------- spectra
    def stft(self, waveform: torch.Tensor) -> torch.Tensor:
        """(..., T) float waveforms -> (..., F, N) complex spectra (float32, autocast off)."""
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            shape = waveform.shape
            spectra = torch.stft(waveform.reshape(-1, shape[-1]).float(), self.n_fft, self.hop_length,
                                 self.win_length, window=self.window, normalized=self.normalized, return_complex=True)
            return spectra.reshape(*shape[:-1], *spectra.shape[-2:])

    def istft(self, spectra: torch.Tensor, length: int) -> torch.Tensor:
        """(..., F, N) complex spectra -> (..., length) float32 waveforms (autocast off)."""
        with torch.autocast(device_type=spectra.device.type, enabled=False):
            shape = spectra.shape
            waveform = torch.istft(spectra.reshape(-1, *shape[-2:]), self.n_fft, self.hop_length, self.win_length,
                                   window=self.window, normalized=self.normalized, length=length)
            return waveform.reshape(*shape[:-2], length)

    # ------------------------------------------------------------------------------- network
    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        """Separate (B, C, T) -> (B, S, C, T)."""
        inputs, context = self.network_inputs(mixture)
        return self.network_outputs(self.run_network(*inputs.values()), context, mixture)

    def network_inputs(self, mixture: torch.Tensor) -> tp.Tuple[tp.Dict[str, torch.Tensor], torch.Tensor]:
        """The band-split input (B, N, features): real and imaginary parts of the STFT bins the
        bands read, per frame; the complex spectra (B, F * C, N) as context."""
        if mixture.dim() != 3 or mixture.shape[1] != self.audio_channels:
            raise DemixError(f"expected a mixture of shape (batch, {self.audio_channels}, time), "
                             f"got {tuple(mixture.shape)}")
        length = mixture.shape[-1]
        shortest = self.n_fft // 2 + 1  # the STFT's reflection padding needs more samples than half a window
        if length < shortest:
            mixture = F.pad(mixture, (0, shortest - length))
        batch = mixture.shape[0]
        spectra = self.stft(mixture)  # (B, C, F, N)
        frames = spectra.shape[-1]
        # (B, C, F, N) -> (B, F * C, N): bins major, channels interleaved
        spectra = spectra.transpose(1, 2).reshape(batch, -1, frames)
        features = spectra if self.contiguous else spectra[:, self.freq_indices]
        x = torch.view_as_real(features).permute(0, 2, 1, 3).reshape(batch, frames, -1)  # (B, N, features)
        return {"features": x}, spectra

    def run_network(self, *inputs: torch.Tensor) -> tp.Tuple[torch.Tensor, ...]:
        """Band split, the transformer blocks and the mask estimators: (B, S, N, features) masks
        (real and imaginary parts interleaved)."""
        x = self.band_split(inputs[0].to(self.band_split.to_features[0][1].weight.dtype))
        x = self._blocks(x)
        return (torch.stack([estimate(x) for estimate in self.mask_estimators], dim=1),)

    def network_outputs(self, outputs: tp.Sequence[torch.Tensor], context: torch.Tensor,
                        mixture: torch.Tensor) -> torch.Tensor:
        """Complex masks (averaged over overlapping bands) times the spectra (`context`), the
        inverse STFT, and the residual source."""
        spectra = context
        batch, channels, length = mixture.shape
        frames = spectra.shape[-1]
        masks = torch.view_as_complex(outputs[0].float().unflatten(-1, (-1, 2)).contiguous()).transpose(2, 3)
        if not self.contiguous:  # average the masks of overlapping bands per bin
            summed = masks.new_zeros(*masks.shape[:2], spectra.shape[1], frames)
            masks = summed.index_add_(2, self.freq_indices, masks) / self.bands_per_bin[:, None]
        estimates = spectra.unsqueeze(1) * masks  # (B, S, F * C, N)
        estimates = estimates.reshape(batch, len(self.mask_estimators), -1, channels, frames).transpose(2, 3)
        if self.zero_dc:
            estimates = torch.cat([torch.zeros_like(estimates[..., :1, :]), estimates[..., 1:, :]], dim=-2)
        padded = max(length, self.n_fft // 2 + 1)
        waveforms = self.istft(estimates, padded)[..., :length].to(mixture.dtype)
        if self.residual:
            rest = mixture - waveforms.sum(dim=1)
            waveforms = torch.cat([waveforms, rest.unsqueeze(1)], dim=1)
        return waveforms

    def network_axes(self) -> NetworkAxes:
        """Batch and frames of the features and masks."""
        return NetworkAxes(inputs={"features": {0: "batch", 1: "frames"}}, outputs={"masks": {0: "batch", 2: "frames"}})

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, bands, dim) through every block (time then band attention), then the final norm."""
        batch, frames, bands, dim = x.shape
        previous: tp.List[torch.Tensor] = []
        for block in self.layers:
            if self.skip_connection:
                for earlier in previous:
                    x = x + earlier
            if len(block) == 3:
                x = run_block(block[0], x.reshape(batch, frames * bands, dim), self.checkpointing)
                x = x.reshape(batch, frames, bands, dim)
            time_transformer, band_transformer = block[-2], block[-1]
            x = x.transpose(1, 2).reshape(batch * bands, frames, dim)
            x = run_block(time_transformer, x, self.checkpointing)
            x = x.reshape(batch, bands, frames, dim).transpose(1, 2).reshape(batch * frames, bands, dim)
            x = run_block(band_transformer, x, self.checkpointing)
            x = x.reshape(batch, frames, bands, dim)
            if self.skip_connection:
                previous.append(x)
        if self.final_norm_after_blocks:
            x = self.final_norm(x)
        return x


class BSRoformer(BandSplitRoformer):
    """BS-RoFormer: contiguous bands of `freqs_per_bands` bins (the paper's 62 by default).

    Args:
        freqs_per_bands: bins of each band, from DC up; they must add up to `stft_n_fft // 2 + 1`.
        Other options: :class:`BandSplitRoformer`'s.
    """

    def __init__(self, sources: tp.Sequence[str], samplerate: int, audio_channels: int, *,
                 freqs_per_bands: tp.Sequence[int] = tuple(PAPER_FREQS_PER_BANDS), **options: tp.Any):
        self.freqs_per_bands = [int(count) for count in freqs_per_bands]
        super().__init__(sources, samplerate, audio_channels, **options)

    def _band_bins(self, bins: int) -> tp.List[torch.Tensor]:
        counts = self.freqs_per_bands
        require(len(counts) > 1 and all(count > 0 for count in counts) and sum(counts) == bins,
                f"model.freqs_per_bands must be positive bin counts adding up to the STFT's {bins} bins "
                f"(model.stft_n_fft // 2 + 1), got {len(counts)} bands of {sum(counts)} bins")
        edges = torch.tensor([0] + counts).cumsum(0)
        return [torch.arange(int(start), int(stop)) for start, stop in zip(edges[:-1], edges[1:])]


class MelBandRoformer(BandSplitRoformer):
    """Mel-Band RoFormer: `num_bands` overlapping bands, the supports of a mel filter bank.

    Each band gathers the bins its (Slaney) mel triangle touches; the first bin joins the first
    band and the last bin the last band. Every transformer ends with an RMSNorm (no final norm).

    Args:
        num_bands: mel bands.
        Other options: :class:`BandSplitRoformer`'s.
    """

    norm_each_transformer = True
    final_norm_after_blocks = False

    def __init__(self, sources: tp.Sequence[str], samplerate: int, audio_channels: int, *, num_bands: int = 60,
                 **options: tp.Any):
        self.num_bands = int(num_bands)
        super().__init__(sources, samplerate, audio_channels, **options)

    def _band_bins(self, bins: int) -> tp.List[torch.Tensor]:
        require(self.num_bands > 1, f"model.num_bands must be at least 2, got {self.num_bands}")
        filters = mel_filter_bank(self.samplerate, self.n_fft, self.num_bands)
        filters[0, 0] = 1.0
        filters[-1, -1] = 1.0
        supports = [torch.from_numpy(row.nonzero()[0]) for row in filters > 0]
        require(all(len(support) for support in supports),
                f"model.num_bands={self.num_bands} is too many for a {self.n_fft}-point STFT: some mel bands "
                "hold no bin")
        return supports


# ---------------------------------------------------------------------------------- objective
def build_roformer_objective(model: BandSplitRoformer, *, stft_weight: float = 1.0,
                             stft_windows: tp.Sequence[int] = (4096, 2048, 1024, 512, 256), stft_hop: int = 147,
                             source_weights: tp.Optional[tp.Dict[str, float]] = None) -> Objective:
    """The paper's objective: L1 of the waveforms plus `stft_weight` times the sum, over the STFT
    windows `stft_windows` (hop `stft_hop`, FFT size at least the model's), of the L1 distance of
    the complex STFTs. Each source's terms are averaged with `source_weights` ({name: weight},
    missing names weigh 1), so with equal weights this is the reference's loss exactly.

    Reported, detached: `loss_time`, `loss_stft` and `loss_<source>` (each source's total).
    """
    if stft_weight < 0:
        raise DemixError(f"loss.stft_weight must be >= 0, got {stft_weight}")
    windows = [int(window) for window in stft_windows]
    if any(window < 2 for window in windows) or stft_hop < 1:
        raise DemixError(f"loss.stft_windows must be window lengths >= 2 and loss.stft_hop positive, got "
                         f"{windows} and {stft_hop}")
    sources = list(model.sources)
    weights = parse_source_weights(sources, source_weights)
    n_fft = model.n_fft

    def per_source_stft_l1(estimates: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        total = estimates.new_zeros(len(sources))
        for window in windows:
            hann = torch.hann_window(window, device=estimates.device)
            spectra = [torch.stft(signal.flatten(0, 2), max(window, n_fft), stft_hop, window, window=hann,
                                  return_complex=True) for signal in (estimates, references)]
            difference = (spectra[0] - spectra[1]).abs().unflatten(0, estimates.shape[:3])
            total = total + difference.mean(dim=(0, 2, 3, 4))
        return total

    def objective(model: nn.Module, mixture: torch.Tensor, references: torch.Tensor) -> tp.Dict[str, torch.Tensor]:
        estimates = model(mixture)
        with torch.autocast(device_type=estimates.device.type, enabled=False):
            estimates, references = estimates.float(), references.float()
            time = (estimates - references).abs().mean(dim=(0, 2, 3))  # (S,)
            stft = per_source_stft_l1(estimates, references) if stft_weight > 0 else torch.zeros_like(time)
            per_source = time + stft_weight * stft
            weight = per_source.new_tensor(weights)
            metrics = {"loss": (per_source * weight).sum() / weight.sum(),
                       "loss_time": ((time * weight).sum() / weight.sum()).detach(),
                       "loss_stft": ((stft * weight).sum() / weight.sum()).detach()}
        for index, name in enumerate(sources):
            metrics[f"loss_{name}"] = per_source[index].detach()
        return metrics

    return objective
