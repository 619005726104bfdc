"""The cross-domain transformer of Hybrid Transformer Demucs (v4, Rouard et al. 2023).

It sits at the bottom of HTDemucs, between the spectrogram (frequency) branch and the waveform
(time) branch. Each branch has its own stack of layers; the stacks alternate self-attention
layers (a branch attends to itself) with cross-attention layers (a branch attends to the other
branch, both reading the other's input to that layer).

Layouts: the frequency branch is (B, C, Fr, T1), flattened to a sequence of T1 * Fr tokens in
time-major order (token t1 * Fr + fr); the time branch is (B, C, T2), a sequence of T2 tokens.

:class:`CrossTransformerEncoder` takes the constructor arguments of
`demucs.transformer.CrossTransformerEncoder` (demucs 4.1.0), has the same state-dict keys and
shapes (published weights load with `strict=True`) and computes the same outputs in eval mode.
Two deliberate differences in training-time randomness: it draws from torch's global RNG
(the reference uses Python's `random` and NumPy's global RNG), and it shifts the sinusoidal
embedding (`sin_random_shift`) only in training mode (the reference shifts in eval mode too).
"""
import math
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DemixError
from .inference import attention, fast_inference, token_group_norm

__all__ = [
    "CrossTransformerEncoder",
    "sin_embedding",
    "sin_embedding_2d",
    "cape_embedding",
]

EMBEDDINGS = ("sin", "cape", "scaled")


# ----------------------------------------------------------------------------- embeddings


def _cos_sin(pos: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """[cos | sin] of `pos` over `dim // 2` geometric periods from 1 to `max_period`."""
    half = dim // 2
    # Integer arange divided by an int gives float32 periods; a float64 `pos` keeps a float64
    # phase. Both as in the reference, whose weights were trained with exactly these values.
    periods = max_period ** (torch.arange(half) / (half - 1))
    phase = pos / periods
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def sin_embedding(length: int, dim: int, shift: int = 0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of positions `shift ... shift + length - 1`, shape (length, 1, dim)."""
    pos = (shift + torch.arange(length)).view(-1, 1, 1)
    return _cos_sin(pos, dim, max_period)


def sin_embedding_2d(dim: int, height: int, width: int, max_period: float = 10000.0) -> torch.Tensor:
    """2D sinusoidal embedding, shape (1, dim, height, width).

    The first `dim // 2` channels encode the width position, the others the height position,
    each as interleaved (sin, cos) pairs. `dim` must be a multiple of 4.
    """
    if dim % 4:
        raise DemixError(f"the 2D positional embedding needs a dimension divisible by 4, got {dim}")
    half = dim // 2
    freqs = torch.exp(torch.arange(0.0, half, 2) * -(math.log(max_period) / half))

    def interleaved(size: int) -> torch.Tensor:
        angles = torch.arange(0.0, size)[:, None] * freqs
        return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(size, half).t()

    along_width = interleaved(width)[:, None, :].expand(half, height, width)
    along_height = interleaved(height)[:, :, None].expand(half, height, width)
    return torch.cat([along_width, along_height])[None]


def cape_embedding(length: int, dim: int, batch_size: int, mean_normalize: bool, augment: bool,
                   max_global_shift: float = 0.0, max_local_shift: float = 0.0, max_scale: float = 1.0,
                   max_period: float = 10000.0) -> torch.Tensor:
    """Continuous augmented positional embedding (CAPE, Likhomanenko et al. 2021).

    Returns (length, batch_size, dim) float32 when `augment`, else (length, 1, dim). With
    `augment`, each batch item gets its positions shifted globally by U(-max_global_shift,
    max_global_shift), locally by U(-max_local_shift, max_local_shift) per position, then scaled
    by exp(U(-log max_scale, log max_scale)); these draws use torch's global RNG, in float64.
    """
    pos = torch.arange(length, dtype=torch.float32).view(-1, 1, 1)
    if mean_normalize:
        pos = pos - pos.mean(dim=0, keepdim=True)
    if augment:
        def uniform(size: tp.Tuple[int, ...], bound: float) -> torch.Tensor:
            return torch.empty(size, dtype=torch.float64).uniform_(-bound, bound)

        shift = uniform((1, batch_size, 1), max_global_shift)
        local_shift = uniform((length, batch_size, 1), max_local_shift)
        log_scale = uniform((1, batch_size, 1), math.log(max_scale))
        pos = (pos.double() + shift + local_shift) * log_scale.exp()
    return _cos_sin(pos, dim, max_period).float()


class _ScaledEmbedding(nn.Module):
    """A learnt embedding stored divided by `boost`, so that its effective learning rate is
    `boost` times larger; initialised to N(0, scale^2)."""

    def __init__(self, num_embeddings: int, dim: int, scale: float = 0.2, boost: float = 3.0):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        with torch.no_grad():
            self.embedding.weight.mul_(scale / boost)
        self.boost = boost

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Embeddings of the integer positions `index`."""
        return self.embedding(index) * self.boost


# ----------------------------------------------------------------------------- layers


class _GroupNormBTC(nn.GroupNorm):
    """GroupNorm of (B, T, C) sequences: one group normalises its channels over all of T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise x (B, T, C)."""
        if self.num_groups == 1 and fast_inference(x):
            return token_group_norm(self, x)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class _LayerScale(nn.Module):
    """Learnt per-channel scale of a residual branch (Touvron et al. 2021), starting near 0."""

    def __init__(self, channels: int, init: float = 1e-4):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale the channels of x (..., C)."""
        return self.scale * x


class _LayerOptions(tp.NamedTuple):
    """Settings shared by every layer of both branches."""

    dim: int
    num_heads: int
    hidden_dim: int
    dropout: float
    gelu: bool
    group_norm: int
    norm_first: bool
    norm_out: int
    layer_scale: bool


class _Layer(nn.Module):
    """What both kinds of layer share: attention, feed-forward network, norms, layer scales.

    Post-norm (`norm_first=False`): x = norm(x + attention(x)); x = norm(x + ffn(x)).
    Pre-norm: x = x + attention(norm(x)); x = x + ffn(norm(x)); then the optional `norm_out`
    (a GroupNorm over the whole sequence).
    """

    def __init__(self, attention_name: str, num_norms: int, options: _LayerOptions):
        super().__init__()
        dim = options.dim
        # Creation order matters: it fixes the state-dict order and the random draws of the
        # initialisation, both as in the reference.
        self.add_module(attention_name,
                        nn.MultiheadAttention(dim, options.num_heads, dropout=options.dropout, batch_first=True))
        self.linear1 = nn.Linear(dim, options.hidden_dim)
        self.dropout = nn.Dropout(options.dropout)
        self.linear2 = nn.Linear(options.hidden_dim, dim)
        for index in range(1, num_norms + 1):
            norm = (_GroupNormBTC(options.group_norm, dim) if options.group_norm else nn.LayerNorm(dim))
            self.add_module(f"norm{index}", norm)
        self.norm_out = (_GroupNormBTC(options.norm_out, dim)
                         if options.norm_first and options.norm_out else None)
        self.gamma_1 = _LayerScale(dim) if options.layer_scale else nn.Identity()
        self.gamma_2 = _LayerScale(dim) if options.layer_scale else nn.Identity()
        self.dropout1 = nn.Dropout(options.dropout)
        self.dropout2 = nn.Dropout(options.dropout)
        self.activation = F.gelu if options.gelu else F.relu
        self.norm_first = options.norm_first

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm_out is None else self.norm_out(x)


class _SelfAttentionLayer(_Layer):
    """A standard transformer encoder layer on (B, T, C) sequences."""

    self_attn: nn.MultiheadAttention
    norm1: nn.Module
    norm2: nn.Module

    def __init__(self, options: _LayerOptions):
        super().__init__("self_attn", 2, options)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout1(attention(self.self_attn, x, x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Transform x (B, T, C)."""
        if self.norm_first:
            x = x + self.gamma_1(self._attend(self.norm1(x)))
            x = x + self.gamma_2(self._feed_forward(self.norm2(x)))
            return self._out(x)
        x = self.norm1(x + self.gamma_1(self._attend(x)))
        return self.norm2(x + self.gamma_2(self._feed_forward(x)))


class _CrossAttentionLayer(_Layer):
    """A transformer layer whose queries come from one sequence and keys/values from another.

    Pre-norm uses norm1 on the queries, norm2 on the keys and norm3 before the feed-forward
    network; post-norm uses norm1 and norm2 only (norm3 exists for weight compatibility).
    """

    cross_attn: nn.MultiheadAttention
    norm1: nn.Module
    norm2: nn.Module
    norm3: nn.Module

    def __init__(self, options: _LayerOptions):
        super().__init__("cross_attn", 3, options)

    def _attend(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return self.dropout1(attention(self.cross_attn, query, key))

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Transform x (B, T, C) attending to `other` (B, S, C)."""
        if self.norm_first:
            x = x + self.gamma_1(self._attend(self.norm1(x), self.norm2(other)))
            x = x + self.gamma_2(self._feed_forward(self.norm3(x)))
            return self._out(x)
        x = self.norm1(x + self.gamma_1(self._attend(x, other)))
        return self.norm2(x + self.gamma_2(self._feed_forward(x)))


# ----------------------------------------------------------------------------- encoder


class CrossTransformerEncoder(nn.Module):
    """Cross-domain transformer between the frequency and time branches of HTDemucs.

    `forward(x, xt)` maps the frequency branch x (B, C, Fr, T1) and the time branch xt (B, C, T2),
    with C = `dim`, to transformed tensors of the same shapes.

    Args:
        dim: channels C of both branches; a multiple of 4 and of `num_heads`.
        emb: positional embedding of the time branch: "sin", "cape" or "scaled" (learnt, up to
            `max_positions` positions). The frequency branch always gets a 2D sinusoidal one.
        hidden_scale: feed-forward width as a multiple of `dim`.
        num_heads: attention heads.
        num_layers: layers per branch; self-attention and cross-attention layers alternate.
        cross_first: whether the first layer is a cross-attention layer.
        dropout: dropout in attention and feed-forward networks.
        max_positions: size of the "scaled" embedding table.
        norm_in: LayerNorm of each branch before the positional embedding is added.
        norm_in_group: if `norm_in` is False and this is non-zero, a GroupNorm with that many
            groups (over the whole sequence) instead.
        group_norm: if non-zero, the layers' norms are GroupNorms with that many groups over the
            whole sequence instead of LayerNorms.
        norm_first: pre-norm layers (else post-norm).
        norm_out: with `norm_first`, a GroupNorm with `int(norm_out)` groups ends each layer.
        max_period: longest period of the sinusoidal embeddings.
        weight_decay, lr: this module's optimizer settings, see :meth:`parameter_group`.
        layer_scale: learnt per-channel scales of the residual branches, initialised to 1e-4.
        gelu: GELU activations, else ReLU.
        sin_random_shift: with emb="sin", in training, positions are shifted by a random integer
            in [0, sin_random_shift].
        weight_pos_embed: factor applied to the positional embeddings.
        cape_mean_normalize, cape_augment, cape_glob_loc_scale: with emb="cape", whether positions
            are centred, whether they are augmented in training, and the augmentation's
            (max global shift, max local shift, max scale).
        sparse_self_attn, sparse_cross_attn: sparse attention (xformers in the reference); not
            supported, True raises :class:`DemixError`.
        mask_type, mask_random_seed, sparse_attn_window, global_window, auto_sparsity, sparsity:
            settings of sparse attention, accepted for compatibility and unused.
    """

    def __init__(
        self,
        dim: int,
        emb: str = "sin",
        hidden_scale: float = 4.0,
        num_heads: int = 8,
        num_layers: int = 6,
        cross_first: bool = False,
        dropout: float = 0.0,
        max_positions: int = 1000,
        norm_in: bool = True,
        norm_in_group: tp.Union[bool, int] = False,
        group_norm: tp.Union[bool, int] = False,
        norm_first: bool = False,
        norm_out: tp.Union[bool, int] = False,
        max_period: float = 10000.0,
        weight_decay: float = 0.0,
        lr: tp.Optional[float] = None,
        layer_scale: bool = False,
        gelu: bool = True,
        sin_random_shift: int = 0,
        weight_pos_embed: float = 1.0,
        cape_mean_normalize: bool = True,
        cape_augment: bool = True,
        # A list, like the reference's default (never mutated here).
        cape_glob_loc_scale: tp.Sequence[float] = [5000.0, 1.0, 1.4],  # noqa: B006
        sparse_self_attn: bool = False,
        sparse_cross_attn: bool = False,
        mask_type: str = "diag",
        mask_random_seed: int = 42,
        sparse_attn_window: int = 500,
        global_window: int = 50,
        auto_sparsity: bool = False,
        sparsity: float = 0.95,
    ):
        super().__init__()
        for name, value in (("sparse_self_attn", sparse_self_attn), ("sparse_cross_attn", sparse_cross_attn)):
            if value:
                raise DemixError(f"CrossTransformerEncoder: {name}=True needs xformers' sparse attention, "
                                 f"which demixlab does not support; set {name}=False")
        if emb not in EMBEDDINGS:
            raise DemixError(f"CrossTransformerEncoder: emb={emb!r}, choose one of {', '.join(EMBEDDINGS)}")
        if dim % num_heads:
            raise DemixError(f"CrossTransformerEncoder: dim={dim} is not divisible by num_heads={num_heads}")
        if dim % 4:
            raise DemixError(f"CrossTransformerEncoder: dim={dim} must be divisible by 4 (2D positional embedding)")
        if len(cape_glob_loc_scale) != 3:
            raise DemixError("CrossTransformerEncoder: cape_glob_loc_scale must be "
                             f"[max global shift, max local shift, max scale], got {list(cape_glob_loc_scale)}")

        self.num_layers = num_layers
        self.cross_first = cross_first
        self.emb = emb
        self.max_positions = max_positions
        self.max_period = max_period
        self.weight_decay = weight_decay
        self.lr = lr
        self.weight_pos_embed = weight_pos_embed
        self.sin_random_shift = sin_random_shift
        self.cape_mean_normalize = cape_mean_normalize
        self.cape_augment = cape_augment
        self.cape_glob_loc_scale = tuple(float(value) for value in cape_glob_loc_scale)

        if emb == "scaled":
            self.position_embeddings = _ScaledEmbedding(max_positions, dim, scale=0.2)

        self.norm_in: nn.Module
        self.norm_in_t: nn.Module
        if norm_in:
            self.norm_in, self.norm_in_t = nn.LayerNorm(dim), nn.LayerNorm(dim)
        elif norm_in_group:
            self.norm_in = _GroupNormBTC(int(norm_in_group), dim)
            self.norm_in_t = _GroupNormBTC(int(norm_in_group), dim)
        else:
            self.norm_in, self.norm_in_t = nn.Identity(), nn.Identity()

        options = _LayerOptions(
            dim=dim, num_heads=num_heads, hidden_dim=int(dim * hidden_scale), dropout=dropout, gelu=gelu,
            group_norm=int(group_norm), norm_first=norm_first, norm_out=int(norm_out), layer_scale=layer_scale)
        self.layers = nn.ModuleList()  # frequency branch
        self.layers_t = nn.ModuleList()  # time branch
        for index in range(num_layers):
            kind = _CrossAttentionLayer if (index % 2 == 0) == cross_first else _SelfAttentionLayer
            self.layers.append(kind(options))
            self.layers_t.append(kind(options))

    def forward(self, x: torch.Tensor, xt: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Transform the frequency branch x (B, C, Fr, T1) and the time branch xt (B, C, T2)."""
        batch, channels, freqs, frames = x.shape
        spec_pos = sin_embedding_2d(channels, freqs, frames, self.max_period).to(x.device)
        spec = self.norm_in(_to_tokens(x)) + self.weight_pos_embed * _to_tokens(spec_pos)

        wave_pos = self._time_embedding(xt.shape[-1], batch, channels, xt.device)
        wave = self.norm_in_t(xt.transpose(1, 2)) + self.weight_pos_embed * wave_pos.transpose(0, 1)

        for spec_layer, wave_layer in zip(self.layers, self.layers_t):
            if isinstance(spec_layer, _CrossAttentionLayer):
                # Each branch attends to the other's input to this layer.
                spec, wave = spec_layer(spec, wave), wave_layer(wave, spec)
            else:
                spec, wave = spec_layer(spec), wave_layer(wave)

        spec = spec.reshape(batch, frames, freqs, channels).permute(0, 3, 2, 1)
        return spec, wave.transpose(1, 2)

    def _time_embedding(self, length: int, batch: int, dim: int, device: torch.device) -> torch.Tensor:
        """Positional embedding of the time branch, (length, 1 or batch, dim)."""
        if self.emb == "scaled":
            if length > self.max_positions:
                raise DemixError(f"CrossTransformerEncoder: the time branch has {length} positions, more than "
                                 f"max_positions={self.max_positions} of the 'scaled' embedding")
            return self.position_embeddings(torch.arange(length, device=device))[:, None]
        if self.emb == "cape":
            max_global_shift, max_local_shift, max_scale = self.cape_glob_loc_scale
            embedding = cape_embedding(
                length, dim, batch, mean_normalize=self.cape_mean_normalize,
                augment=self.training and self.cape_augment, max_global_shift=max_global_shift,
                max_local_shift=max_local_shift, max_scale=max_scale, max_period=self.max_period)
            return embedding.to(device)
        shift = 0
        if self.training and self.sin_random_shift > 0:
            shift = int(torch.randint(self.sin_random_shift + 1, ()).item())
        return sin_embedding(length, dim, shift=shift, max_period=self.max_period).to(device)

    def parameter_group(self) -> tp.Dict[str, tp.Any]:
        """This module's optimizer group: its parameters with its own `lr` (None: the optimizer's)
        and `weight_decay`."""
        return {"params": list(self.parameters()), "lr": self.lr, "weight_decay": self.weight_decay}


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, Fr, T1) -> (B, T1 * Fr, C), time-major: token t1 * Fr + fr."""
    batch, channels, freqs, frames = x.shape
    return x.permute(0, 3, 2, 1).reshape(batch, frames * freqs, channels)
