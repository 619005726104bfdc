"""The per-block networks of sliCQ-CDAE (xumx-sliCQ-V2): convolutional denoising autoencoders
that turn the magnitude of one block of a sliced constant-Q transform into one sigmoid mask per
source; the sources' autoencoders of a block run together as grouped convolutions.

Layouts: a block is (B, C, F_b, S, T_b) (S slices of T_b coefficients, slices overlapping 50% in
time); the networks see it "flattened" to (B, C, F_b, S * T_b), the slices side by side, and the
first convolution (kernel T_b, stride T_b / 2) steps over them half a slice at a time. Masks come
out as (B, S_src, C, F_b, S, T_b).

That first convolution and the last (transposed) one run as the equivalent (f, 2) convolutions of
stride 1 over half slices, whose T_b / 2 coefficients become channels, on channels-last tensors:
oneDNN's strided kernels for these shapes were 5-15x slower on CPU. The parameters keep the
layout of the layers as declared (and the reference's).
"""
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DemixError


def frequency_kernel(bins: int) -> int:
    """Frequency extent of the convolutions of a block with `bins` bins: 1 below 10 bins, 3 below 20, else 5."""
    if bins < 10:
        return 1
    if bins < 20:
        return 3
    return 5


def _half_slices(x: torch.Tensor, batch: int, channels: int, bins: int, halves: int, hop: int) -> torch.Tensor:
    """(B, C, F, ...) with `halves` * `hop` coefficients per bin -> (B, C * hop, F, halves), stored
    channels last: the coefficients of each half slice become channels."""
    x = x.reshape(batch, channels, bins, halves, hop).permute(0, 2, 3, 1, 4)
    return x.reshape(batch, bins, halves, channels * hop).permute(0, 3, 1, 2)


def _half_slice_kernel(weight: torch.Tensor, hop: int) -> torch.Tensor:
    """A (O, I, f, 2 * hop) kernel of stride (1, hop) as the equivalent (O, I * hop, f, 2) kernel of
    stride 1 over half slices (:func:`_half_slices`)."""
    out, inputs, rows, _ = weight.shape
    return weight.reshape(out, inputs, rows, 2, hop).permute(0, 1, 4, 2, 3).reshape(out, inputs * hop, rows, 2)


class CausalConv2d(nn.Conv2d):
    """A Conv2d whose input is left-padded along time by `kernel_size[1] - 1` (no other padding),
    so that output frame k sees the input up to its own stride position k * stride only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, F, L) -> (B, C_out, F', L')."""
        return super().forward(F.pad(x, (self.kernel_size[1] - 1, 0)))


_LAYERS = ("encode1", "norm1", "encode2", "norm2", "decode2", "norm3", "decode1")


class BlockCDAE(nn.Module):
    """The autoencoders of all sources for one block (B, C, F_b, N, T_b), run as one network of
    grouped convolutions (groups = sources), on the input normalised per bin as
    (x + input_mean) * input_scale (input_mean holds the negated mean, input_scale the reciprocal
    std, both trainable, as in Open-Unmix).

    Each source's autoencoder is Conv2d(C -> hidden_1, (f, T_b), stride (1, T_b // 2), no bias)
    -> BN -> ReLU -> Conv2d(hidden_1 -> hidden_2, (f, 4), no bias) -> BN -> ReLU ->
    ConvTranspose2d(hidden_2 -> hidden_1, (f, 4), no bias) -> BN -> ReLU ->
    ConvTranspose2d(hidden_1 -> C, (f, T_b), stride (1, T_b // 2)) -> sigmoid, with
    f = :func:`frequency_kernel` (F_b); the first convolution is causal with `realtime`. Source s
    owns group s of every layer (its channels [s * width, (s + 1) * width)); a state dict of
    separate per-source autoencoders (`cdaes.<s>.<layer>.*`, the layout of earlier demixlab
    versions) loads too.

    With `realtime`, a mask coefficient depends on the flattened input up to `lookahead`
    coefficients after it (the three frames of the (f, 4) convolutions, 3 * T_b // 2), never further.

    `forward` computes the same function with the strided layers rewritten over half slices (see
    the module docstring): the first convolution on the unrepeated input (every source's group
    sees the same block), T_b even.
    """

    def __init__(self, bins: int, frames: int, sources: int, channels: int = 2, hidden_1: int = 50,
                 hidden_2: int = 51, realtime: bool = False):
        super().__init__()
        if bins < 1 or frames < 2 or frames % 2:
            raise ValueError(f"a block needs at least 1 bin and an even number of coefficients per slice, got "
                             f"({bins}, {frames})")
        self.bins, self.frames, self.sources, self.channels = bins, frames, sources, channels
        self.realtime = realtime
        self.input_mean = nn.Parameter(torch.zeros(bins))
        self.input_scale = nn.Parameter(torch.ones(bins))
        kernel = frequency_kernel(bins)
        hop = frames // 2
        first = CausalConv2d if realtime else nn.Conv2d
        self.encode1 = first(sources * channels, sources * hidden_1, (kernel, frames), stride=(1, hop),
                             groups=sources, bias=False)
        self.norm1 = nn.BatchNorm2d(sources * hidden_1)
        self.encode2 = nn.Conv2d(sources * hidden_1, sources * hidden_2, (kernel, 4), groups=sources, bias=False)
        self.norm2 = nn.BatchNorm2d(sources * hidden_2)
        self.decode2 = nn.ConvTranspose2d(sources * hidden_2, sources * hidden_1, (kernel, 4), groups=sources,
                                          bias=False)
        self.norm3 = nn.BatchNorm2d(sources * hidden_1)
        self.decode1 = nn.ConvTranspose2d(sources * hidden_1, sources * channels, (kernel, frames), stride=(1, hop),
                                          groups=sources, bias=True)
        # Output coefficient u depends on inputs up to (u // hop + 3) * hop.
        self.lookahead = 3 * hop
        self._register_load_state_dict_pre_hook(self._group_per_source_state)

    def min_slices(self) -> int:
        """Fewest slices the autoencoders accept (the (f, 4) convolutions need 4 frames)."""
        return 2 if self.realtime else 3

    def forward(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Block magnitude (B, C, F_b, N, T_b) -> masks in [0, 1] (B, sources, C, F_b, N, T_b)."""
        batch, channels, bins, slices, frames = magnitude.shape
        if (bins, frames, channels) != (self.bins, self.frames, self.channels):
            raise ValueError(f"expected a block of {self.channels} channels, {self.bins} bins and {self.frames} "
                             f"coefficients per slice, got shape {tuple(magnitude.shape)}")
        hop = self.frames // 2  # the module's constant (a traced export keeps static kernel shapes)
        x = (magnitude + self.input_mean[:, None, None]) * self.input_scale[:, None, None]
        halves = 2 * slices
        if self.realtime:
            # The causal padding of T_b - 1 coefficients, plus one behind: whole half slices again;
            # the first convolution's last frame then only sees that extra coefficient and is dropped.
            x = F.pad(x.reshape(batch, channels, bins, slices * frames), (frames - 1, 1))
            halves += 2
        y = F.conv2d(_half_slices(x, batch, channels, bins, halves, hop), _half_slice_kernel(self.encode1.weight, hop))
        if self.realtime:
            y = y[..., :-1]
        y = F.relu(self.norm1(y))
        y = F.relu(self.norm2(self.encode2(y)))
        y = F.relu(self.norm3(self.decode2(y)))
        # The sources' outputs: (B, sources * C * hop, F_b, 2N + ...), half slices again.
        y = F.conv_transpose2d(y, _half_slice_kernel(self.decode1.weight, hop),
                               self.decode1.bias.repeat_interleave(hop), groups=self.sources)
        masks = torch.sigmoid(y).unflatten(1, (self.sources, channels, hop))[..., :2 * slices]
        return masks.permute(0, 1, 2, 4, 5, 3).reshape(batch, self.sources, channels, bins, slices, frames)

    def _group_per_source_state(self, state: tp.Dict[str, torch.Tensor], prefix: str, *args: tp.Any) -> None:
        """Turn `cdaes.<s>.<layer>.<name>` entries (one autoencoder per source) into the grouped layers'."""
        if f"{prefix}cdaes.0.encode1.weight" not in state:
            return
        for layer in _LAYERS:
            names = {key[len(f"{prefix}cdaes.0.{layer}."):] for key in state
                     if key.startswith(f"{prefix}cdaes.0.{layer}.")}
            for name in names:
                parts = [state.pop(f"{prefix}cdaes.{source}.{layer}.{name}") for source in range(self.sources)]
                state[f"{prefix}{layer}.{name}"] = parts[0] if name == "num_batches_tracked" else torch.cat(parts)


class SliCQMaskNetwork(nn.Module):
    """One :class:`BlockCDAE` per block of the transform: block magnitudes in, masks out.

    Args:
        block_shapes: (F_b, T_b) of every block, in transform order.
        sources: number of sources (one autoencoder each per block).
        channels: audio channels C.
        hidden_1, hidden_2: channels of the outer and inner convolution layers (50 and 51 published).
        realtime: causal first convolutions (see :class:`BlockCDAE`).
    """

    def __init__(self, block_shapes: tp.Sequence[tp.Tuple[int, int]], sources: int, channels: int = 2,
                 hidden_1: int = 50, hidden_2: int = 51, realtime: bool = False):
        super().__init__()
        self.block_shapes = [tuple(shape) for shape in block_shapes]
        self.blocks = nn.ModuleList([BlockCDAE(bins, frames, sources, channels, hidden_1, hidden_2, realtime)
                                     for bins, frames in self.block_shapes])

    def min_slices(self) -> int:
        """Fewest slices every block accepts."""
        return max(block.min_slices() for block in self.blocks)

    def set_input_statistics(self, means: tp.Sequence[torch.Tensor], stds: tp.Sequence[torch.Tensor]) -> None:
        """Normalise each block's input with per-bin magnitude statistics (one (F_b,) tensor per block)."""
        if len(means) != len(self.blocks) or len(stds) != len(self.blocks):
            raise ValueError(f"expected statistics for {len(self.blocks)} blocks, got {len(means)} and {len(stds)}")
        with torch.no_grad():
            for block, mean, std in zip(self.blocks, means, stds):
                block.input_mean.copy_(-mean)
                block.input_scale.copy_(1.0 / std)

    def forward(self, magnitudes: tp.Sequence[torch.Tensor]) -> tp.List[torch.Tensor]:
        """Block magnitudes [(B, C, F_b, S, T_b)] -> masks [(B, sources, C, F_b, S, T_b)]."""
        if len(magnitudes) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} blocks, got {len(magnitudes)}")
        slices = magnitudes[0].shape[-2]
        if slices < self.min_slices():
            raise DemixError(f"audio too short for the sliCQ-CDAE: {slices} slice(s) of the transform, "
                             f"need at least {self.min_slices()}")
        return [block(magnitude) for block, magnitude in zip(self.blocks, magnitudes)]
