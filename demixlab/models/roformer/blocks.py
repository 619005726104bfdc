"""The building blocks of the band-split RoFormers: norms, rotary attention, transformers, the band
split and the mask estimators.

Module names and nesting follow the implementation the community checkpoints were trained with
(MSST's copy of lucidrains' BS-RoFormer, as vendored by audio-separator), so that a checkpoint's
state dict loads with `strict=True`; the computations are written here from the paper's
description. Tensors are (batch, sequence, features) unless said otherwise.
"""
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(dim) * gamma over the last dimension (a learned per-feature gain)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the whole head dimension, pairs of adjacent features rotated.

    Position p rotates feature pair (2i, 2i + 1) by p * theta^(-2i / dim). The frequencies are a
    buffer named `freqs` (part of the state dict, as in the community checkpoints). Angles are
    computed in float32 whatever the autocast state.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
        self.register_buffer("freqs", freqs)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (..., sequence, dim) queries or keys by their position along the sequence."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            positions = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
            angles = torch.repeat_interleave(positions[:, None] * self.freqs.float()[None, :], 2, dim=-1)
            pairs = x.float().reshape(*x.shape[:-1], int(x.shape[-1]) // 2, 2)  # see MaskEstimator
            rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=x.dim()).reshape(x.shape)
            out = x.float() * angles.cos() + rotated_half * angles.sin()
        return out.to(x.dtype)


def _split_heads(x: torch.Tensor, *groups: int) -> torch.Tensor:
    """(..., prod(groups) * D) -> (..., *groups, D), with D a constant (static shapes trace to ONNX)."""
    size = int(x.shape[-1])
    for group in groups:
        size //= group
    return x.reshape(*x.shape[:-1], *groups, size)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) -> (B, N, H * D), with H * D a constant (see :func:`_split_heads`)."""
    return x.reshape(x.shape[0], x.shape[1], int(x.shape[2]) * int(x.shape[3]))


class FeedForward(nn.Module):
    """Pre-norm MLP: RMSNorm, Linear(dim -> mult * dim), GELU, dropout, Linear back, dropout."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(RMSNorm(dim), nn.Linear(dim, inner), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with rotary positions, through
    `scaled_dot_product_attention` (flash or memory-efficient kernels where available).

    Args:
        dim: features of the tokens.
        heads, dim_head: attention heads and their width.
        dropout: on the attention weights and the output.
        rotary: the rotary embedding of this axis (shared by every layer of the axis), or None.
        gates: scale each head's output by a sigmoid gate computed from the token (`to_gates`,
            present in most community checkpoints, absent from the paper).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 rotary: tp.Optional[RotaryEmbedding] = None, gates: bool = True):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.rotary_embed = rotary
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_gates = nn.Linear(dim, heads) if gates else None
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        # (B, N, 3 * H * D) -> 3 x (B, H, N, D)
        query, key, value = _split_heads(self.to_qkv(x), 3, self.heads).permute(2, 0, 3, 1, 4)
        if self.rotary_embed is not None:
            query, key = self.rotary_embed.rotate(query), self.rotary_embed.rotate(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=self.dropout if self.training else 0.0)
        if self.to_gates is not None:
            out = out * self.to_gates(x).transpose(1, 2).unsqueeze(-1).sigmoid()
        return self.to_out(_merge_heads(out.transpose(1, 2)))


class LinearAttention(nn.Module):
    """Cross-covariance attention (El-Nouby et al. 2021, "XCiT"): heads attend across their feature
    channels rather than across positions, so the cost is linear in the sequence length.

    Queries and keys are L2-normalised along the sequence, queries scaled by a learned per-head
    temperature, and the softmax over channels uses a fixed scale of 8.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, scale: float = 8.0):
        super().__init__()
        self.heads = heads
        self.scale = scale
        self.dropout = dropout
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Sequential(nn.Linear(dim, 3 * heads * dim_head, bias=False))
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.to_out = nn.Sequential(nn.Identity(), nn.Linear(heads * dim_head, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        # (B, N, 3 * H * D) -> 3 x (B, H, D, N): channels are the "sequence", positions the features
        query, key, value = _split_heads(self.to_qkv(x), 3, self.heads).permute(2, 0, 3, 4, 1)
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        query = query * self.temperature.exp()
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale)
        return self.to_out(_merge_heads(out.permute(0, 3, 1, 2)))


class Transformer(nn.Module):
    """`depth` residual layers of (attention, feed-forward), optionally followed by an RMSNorm.

    Args:
        dim, heads, dim_head: token features, attention heads and their width.
        depth: layers.
        attn_dropout, ff_dropout: dropout of the attention and the feed-forward blocks.
        rotary: the axis' rotary embedding (softmax attention only).
        linear: cross-covariance (linear) attention instead of softmax attention.
        gates: per-head attention gates (softmax attention only).
        norm_output: end with an RMSNorm (Mel-RoFormer's transformers) or not (BS-RoFormer's).
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, dim_head: int = 64, attn_dropout: float = 0.0,
                 ff_dropout: float = 0.0, rotary: tp.Optional[RotaryEmbedding] = None, linear: bool = False,
                 gates: bool = True, norm_output: bool = False):
        super().__init__()
        layers = []
        for _ in range(depth):
            if linear:
                attention: nn.Module = LinearAttention(dim, heads, dim_head, attn_dropout)
            else:
                attention = Attention(dim, heads, dim_head, attn_dropout, rotary, gates)
            layers.append(nn.ModuleList([attention, FeedForward(dim, dropout=ff_dropout)]))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, feed_forward in self.layers:
            x = attention(x) + x
            x = feed_forward(x) + x
        return self.norm(x)


def run_block(block: nn.Module, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """`block(x)`, recomputing its activations in the backward pass when `checkpointing` (training)."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class BandSplit(nn.Module):
    """Per band, RMSNorm then Linear to `dim`: (B, T, sum of widths) -> (B, T, bands, dim).

    Args:
        dim: features per band token.
        widths: input features of each band (its bins x channels x 2 for real and imaginary parts).
    """

    def __init__(self, dim: int, widths: tp.Sequence[int]):
        super().__init__()
        self.widths = [int(width) for width in widths]
        self.to_features = nn.ModuleList([nn.Sequential(RMSNorm(width), nn.Linear(width, dim))
                                          for width in self.widths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = x.split(self.widths, dim=-1)
        return torch.stack([project(band) for band, project in zip(bands, self.to_features)], dim=-2)


def mlp(dim_in: int, dim_out: int, hidden: int, hidden_layers: int) -> nn.Sequential:
    """Linear layers with Tanh between them: `hidden_layers` hidden layers of `hidden` features."""
    sizes = [dim_in] + [hidden] * hidden_layers + [dim_out]
    layers: tp.List[nn.Module] = []
    for index, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if index:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(size_in, size_out))
    return nn.Sequential(*layers)


class LastAxisGLU(nn.Module):
    """`nn.GLU(dim=-1)` with the axis given as a positive number (see :class:`MaskEstimator`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.glu(x, dim=x.dim() - 1)


class MaskEstimator(nn.Module):
    """Per band, an MLP then a GLU: (B, T, bands, dim) -> (B, T, sum of widths), one source's mask.

    Args:
        dim: features per band token.
        widths: output features of each band (its bins x channels x 2: a complex ratio mask).
        hidden_layers: hidden layers of each band's MLP (Tanh between layers).
        expansion: hidden features as a multiple of `dim`.
    """

    def __init__(self, dim: int, widths: tp.Sequence[int], hidden_layers: int = 1, expansion: int = 4):
        super().__init__()
        self.to_freqs = nn.ModuleList([nn.Sequential(mlp(dim, 2 * width, dim * expansion, hidden_layers),
                                                     LastAxisGLU()) for width in widths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Positive axes here, explicit shapes instead of unflatten/flatten elsewhere: torch's ONNX
        # tracer resolves some axes against the wrong rank (it concatenates or reshapes wrongly).
        return torch.cat([estimate(band) for band, estimate in zip(x.unbind(dim=2), self.to_freqs)], dim=2)
