"""Hybrid Transformer Demucs (Rouard, Massa, Défossez 2023), v4.

Hybrid Demucs' two U-Net branches (see :mod:`demixlab.models.demucs.hdemucs`), kept separate down to
their deepest layer, where a cross-domain transformer (:class:`CrossTransformerEncoder`)
alternates self-attention within each branch and cross-attention between them.

The training segment is part of the model: in eval mode (with `use_train_segment`, the
default) a shorter input is zero-padded to `segment` seconds, separated, and cropped back, so
that the transformer always sees the sequence length it was trained on; a longer input is an
error (separate it in chunks, e.g. `valid.segment`). In training mode the input is used as is.

Constructor options, parameter names and eval-mode numerics are those of PyPI demucs 4.1.0
(`demucs.htdemucs.HTDemucs`), so that published weights load with `strict=True`.
"""
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DemixError
from ..contract import require
from .blocks import rescale_module
from .inference import convolve
from .hdemucs import HybridUNet, Segment, _check_layers, plan_layers
from .transformer import CrossTransformerEncoder


class HTDemucs(HybridUNet):
    """Hybrid Transformer Demucs v4: (B, C, T) mixture -> (B, S, C, T) sources.

    The U-Net options are :class:`~demixlab.models.demucs.hdemucs.HDemucs`' (no `hybrid`,
    `hybrid_old`, `dconv_attn`, `dconv_lstm`; other defaults: depth 4, dconv_comp 8,
    dconv_init 1e-3, multi_freqs_depth 3). Then, with the reference's names and defaults:

    Args:
        bottom_channels: if > 0, 1x1 convolutions to and from this many channels around the
            transformer.
        t_layers: transformer layers per branch (0: no transformer).
        t_emb, t_hidden_scale, t_heads, t_dropout, t_max_positions, t_norm_in, t_norm_in_group,
        t_group_norm, t_norm_first, t_norm_out, t_max_period, t_weight_decay, t_lr,
        t_layer_scale, t_gelu, t_weight_pos_embed, t_sin_random_shift, t_cape_mean_normalize,
        t_cape_augment, t_cape_glob_loc_scale, t_sparse_self_attn, t_sparse_cross_attn,
        t_mask_type, t_mask_random_seed, t_sparse_attn_window, t_global_window, t_sparsity,
        t_auto_sparsity, t_cross_first: the :class:`CrossTransformerEncoder` options without
            their `t_` prefix (`t_heads` is `num_heads`, `t_layers` is `num_layers`).
            `t_weight_decay` and `t_lr` define the `transformer` optimizer group
            (:meth:`parameter_groups`; `optim.groups.transformer.*` overrides them).
        rescale: weight-rescaling initialisation reference (0 disables; not applied to the
            transformer and the bottom convolutions).
        segment: training segment in seconds.
        use_train_segment: in eval mode, pad inputs to `segment` (see the module docstring).
    """

    def __init__(self, sources: tp.Sequence[str], samplerate: int = 44100, audio_channels: int = 2, *,
                 channels: int = 48, channels_time: tp.Optional[int] = None, growth: float = 2,
                 nfft: int = 4096, wiener_iters: int = 0, end_iters: int = 0, wiener_residual: bool = False,
                 cac: bool = True, depth: int = 4, rewrite: bool = True,
                 multi_freqs: tp.Optional[tp.Sequence[float]] = None, multi_freqs_depth: int = 3,
                 freq_emb: float = 0.2, emb_scale: float = 10, emb_smooth: bool = True,
                 kernel_size: int = 8, time_stride: int = 2, stride: int = 4, context: int = 1, context_enc: int = 0,
                 norm_starts: int = 4, norm_groups: int = 4, dconv_mode: int = 1, dconv_depth: int = 2,
                 dconv_comp: float = 8, dconv_init: float = 1e-3, bottom_channels: int = 0,
                 t_layers: int = 5, t_emb: str = "sin", t_hidden_scale: float = 4.0, t_heads: int = 8,
                 t_dropout: float = 0.0, t_max_positions: int = 10000, t_norm_in: bool = True,
                 t_norm_in_group: bool = False, t_group_norm: bool = False, t_norm_first: bool = True,
                 t_norm_out: bool = True, t_max_period: float = 10000.0, t_weight_decay: float = 0.0,
                 t_lr: tp.Optional[float] = None, t_layer_scale: bool = True, t_gelu: bool = True,
                 t_weight_pos_embed: float = 1.0, t_sin_random_shift: int = 0, t_cape_mean_normalize: bool = True,
                 t_cape_augment: bool = True, t_cape_glob_loc_scale: tp.Sequence[float] = (5000.0, 1.0, 1.4),
                 t_sparse_self_attn: bool = False, t_sparse_cross_attn: bool = False, t_mask_type: str = "diag",
                 t_mask_random_seed: int = 42, t_sparse_attn_window: int = 500, t_global_window: int = 100,
                 t_sparsity: float = 0.95, t_auto_sparsity: bool = False, t_cross_first: bool = False,
                 rescale: float = 0.1, segment: Segment = 10, use_train_segment: bool = True):
        super().__init__(sources, samplerate, audio_channels)
        require(channels >= 1 and depth >= 1,
               f"model.channels and model.depth must be positive, got {channels} and {depth}")
        require(wiener_iters == end_iters,
               f"HTDemucs needs model.wiener_iters == model.end_iters, got {wiener_iters} and {end_iters}")
        self._setup(segment, nfft=nfft, cac=cac, wiener_iters=wiener_iters, end_iters=end_iters,
                    wiener_residual=wiener_residual)
        self.use_train_segment = use_train_segment
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.context = context
        self.bottom_channels = bottom_channels
        plans, embedding_bins = plan_layers(
            audio_channels=audio_channels, num_sources=len(self.sources), channels=channels,
            channels_time=channels_time, growth=growth, nfft=nfft, cac=cac, depth=depth, kernel_size=kernel_size,
            stride=stride, time_stride=time_stride, norm_starts=norm_starts, dconv_lstm=None, dconv_attn=None,
            multi_freqs=multi_freqs, multi_freqs_depth=multi_freqs_depth)
        _check_layers(plans, hybrid=True, nfft=nfft, stride=stride, kernel_size=kernel_size,
                      multi_freqs=multi_freqs, need_merge=False)
        self._build(plans, embedding_bins, hybrid=True, kernel_size=kernel_size, stride=stride, rewrite=rewrite,
                    norm_groups=norm_groups, context=context, context_enc=context_enc, dconv_mode=dconv_mode,
                    dconv_depth=dconv_depth, dconv_comp=dconv_comp, dconv_init=dconv_init, multi_freqs=multi_freqs,
                    freq_emb=freq_emb, emb_scale=emb_scale, emb_smooth=emb_smooth)
        if rescale:
            rescale_module(self, reference=rescale)

        dim = int(channels * growth ** (depth - 1))  # the reference's count, whatever the merge did
        if bottom_channels:
            self.channel_upsampler = nn.Conv1d(dim, bottom_channels, 1)
            self.channel_downsampler = nn.Conv1d(bottom_channels, dim, 1)
            self.channel_upsampler_t = nn.Conv1d(dim, bottom_channels, 1)
            self.channel_downsampler_t = nn.Conv1d(bottom_channels, dim, 1)
            dim = bottom_channels
        self.crosstransformer: tp.Optional[CrossTransformerEncoder] = None
        if t_layers > 0:
            self.crosstransformer = CrossTransformerEncoder(
                dim=dim, emb=t_emb, hidden_scale=t_hidden_scale, num_heads=t_heads, num_layers=t_layers,
                cross_first=t_cross_first, dropout=t_dropout, max_positions=t_max_positions, norm_in=t_norm_in,
                norm_in_group=t_norm_in_group, group_norm=t_group_norm, norm_first=t_norm_first,
                norm_out=t_norm_out, max_period=t_max_period, weight_decay=t_weight_decay, lr=t_lr,
                layer_scale=t_layer_scale, gelu=t_gelu, sin_random_shift=t_sin_random_shift,
                weight_pos_embed=t_weight_pos_embed, cape_mean_normalize=t_cape_mean_normalize,
                cape_augment=t_cape_augment, cape_glob_loc_scale=list(t_cape_glob_loc_scale),
                sparse_self_attn=t_sparse_self_attn, sparse_cross_attn=t_sparse_cross_attn, mask_type=t_mask_type,
                mask_random_seed=t_mask_random_seed, sparse_attn_window=t_sparse_attn_window,
                global_window=t_global_window, sparsity=t_sparsity, auto_sparsity=t_auto_sparsity)

    def parameter_groups(self) -> tp.Dict[str, tp.Dict[str, tp.Any]]:
        """Optimizer groups (see :func:`demixlab.training.optim.build_optimizer`): the transformer's own
        parameters, learning rate (`t_lr`) and weight decay (`t_weight_decay`)."""
        if self.crosstransformer is None:  # keep the group name valid for optim.groups.transformer
            return {"transformer": {"params": []}}
        return {"transformer": self.crosstransformer.parameter_group()}

    def valid_length(self, length: int) -> int:
        """The input length the model works on in eval mode: the training segment (an error if
        `length` exceeds it), or `length` itself without `use_train_segment`."""
        if not self.use_train_segment:
            return length
        training_length = int(self.segment * self.samplerate)
        if length > training_length:
            raise DemixError(f"HTDemucs separates at most its training segment ({float(self.segment):g} s, "
                             f"{training_length} samples) at once in eval mode, got {length} samples: separate in "
                             f"chunks (valid.segment) or set model.use_train_segment=false")
        return training_length

    def _bottom(self, x: torch.Tensor, xt: tp.Optional[torch.Tensor]
                ) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """The cross-domain transformer between the deepest activations of both branches."""
        if self.crosstransformer is None:
            return x, xt
        assert xt is not None
        batch, _, bins, frames = x.shape
        if self.bottom_channels:
            x = convolve(self.channel_upsampler, x.reshape(batch, -1, bins * frames)).view(batch, -1, bins, frames)
            xt = convolve(self.channel_upsampler_t, xt)
        x, xt = self.crosstransformer(x, xt)
        if self.bottom_channels:
            x = convolve(self.channel_downsampler, x.reshape(batch, -1, bins * frames)).view(batch, -1, bins, frames)
            xt = convolve(self.channel_downsampler_t, xt)
        return x, xt

    def network_inputs(self, mixture: torch.Tensor) -> tp.Tuple[tp.Dict[str, torch.Tensor], tp.Any]:
        """The hybrid network's inputs of the mixture padded to the training segment (in eval mode
        with `use_train_segment`); the STFT and the padded length as context."""
        if not self.training and self.use_train_segment:
            mixture = F.pad(mixture, (0, self.valid_length(mixture.shape[-1]) - mixture.shape[-1]))
        inputs, z = self._inputs(mixture)
        return inputs, (z, mixture.shape[-1])

    def network_outputs(self, outputs: tp.Sequence[torch.Tensor], context: tp.Any,
                        mixture: torch.Tensor) -> torch.Tensor:
        """As HDemucs', cropped back to the mixture's length."""
        z, padded = context
        return self._outputs(outputs, z, padded)[..., :mixture.shape[-1]]

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separate (B, C, T) -> (B, S, C, T)."""
        length = mix.shape[-1]
        if self.training or not self.use_train_segment:
            return self._run(mix, self._bottom)
        padded = self.valid_length(length)
        out = self._run(F.pad(mix, (0, padded - length)), self._bottom)
        return out[..., :length]


