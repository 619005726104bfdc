"""Building blocks of Hybrid Demucs (v3) and Hybrid Transformer Demucs (v4).

The parameter and buffer names, shapes and numerics follow PyPI demucs 4.1.0 (`demucs.demucs`,
`demucs.hdemucs`), so that a reference state dict loads into the models built from these blocks
with `strict=True`. Module attribute names (and the order of the layers inside `nn.Sequential`
containers) are therefore part of the format: do not rename them.

Layouts: time-branch activations (B, C, T); frequency-branch activations (B, C, F, T), where T
counts STFT frames.
"""
import math
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from .inference import convolve, fast_inference, per_row_in_tiles, run_sequential

_CONV_TYPES = (nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d, nn.ConvTranspose2d)


def pad1d(x: torch.Tensor, left: int, right: int, mode: str = "constant") -> torch.Tensor:
    """`F.pad` on the last axis; reflect padding also works on signals shorter than the padding
    (zeros are added first, as much as needed, so that the reflection is defined)."""
    if mode == "reflect":
        length = x.shape[-1]
        widest = max(left, right)
        if length <= widest:
            extra = widest - length + 1
            extra_right = min(right, extra)
            extra_left = extra - extra_right
            x = F.pad(x, (extra_left, extra_right))
            left, right = left - extra_left, right - extra_right
    return F.pad(x, (left, right), mode)


def rescale_module(module: nn.Module, reference: float) -> None:
    """Demucs' weight-rescaling initialisation: divide each convolution's weight and bias by
    sqrt(std(weight) / reference)."""
    for sub in module.modules():
        if isinstance(sub, _CONV_TYPES):
            std = sub.weight.std().detach()
            scale = (std / reference) ** 0.5
            sub.weight.data /= scale
            if sub.bias is not None:
                sub.bias.data /= scale


def _norm(norm: bool, groups: int, channels: int) -> nn.Module:
    return nn.GroupNorm(groups, channels) if norm else nn.Identity()


class LayerScale(nn.Module):
    """Per-channel learnt scale of a residual branch of (B, C, T) activations, started small."""

    def __init__(self, channels: int, init: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale (B, C, T) activations per channel."""
        return self.scale[:, None] * x


class BLSTM(nn.Module):
    """Bidirectional LSTM over (B, C, T) with a linear projection back to C channels.

    Sequences longer than `max_steps` are cut into windows of `max_steps` overlapping by half;
    each window keeps only its central part (its first half-stride at the start of the signal,
    its last one at the end), so every output step has context on both sides.
    """

    def __init__(self, dim: int, layers: int = 1, max_steps: tp.Optional[int] = None, skip: bool = False):
        super().__init__()
        if max_steps is not None and max_steps % 4:
            raise ValueError(f"max_steps must be a multiple of 4, got {max_steps}")
        self.max_steps = max_steps
        self.skip = skip
        self.lstm = nn.LSTM(input_size=dim, hidden_size=dim, num_layers=layers, bidirectional=True)
        self.linear = nn.Linear(2 * dim, dim)

    def _recur(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T) -> (N, C, T) through the LSTM (time-major) and the projection."""
        y = self.lstm(x.permute(2, 0, 1))[0]
        return self.linear(y).permute(1, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T)."""
        batch, channels, length = x.shape
        width = self.max_steps
        if width is None or length <= width:
            y = self._recur(x)
        else:
            stride = width // 2
            windows = math.ceil(length / stride)
            padded = F.pad(x, (0, (windows - 1) * stride + width - length))
            frames = padded.unfold(-1, width, stride)  # (B, C, windows, width)
            frames = frames.permute(0, 2, 1, 3).reshape(-1, channels, width)
            frames = self._recur(frames).reshape(batch, windows, channels, width)
            margin = stride // 2
            parts = [frames[:, 0, :, :-margin]]
            parts += [frames[:, k, :, margin:-margin] for k in range(1, windows - 1)]
            parts.append(frames[:, -1, :, margin:])
            y = torch.cat(parts, dim=-1)[..., :length]
        return x + y if self.skip else y


class LocalState(nn.Module):
    """Content-based local attention over time, without positional embedding.

    Each head adds to its attention logits learnt penalties `-k * |t - s| / sqrt(ndecay)`
    (k = 1..ndecay) weighted per query, which keeps attention local; a step never attends to
    itself.
    """

    def __init__(self, channels: int, heads: int = 4, ndecay: int = 4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"LocalState: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.ndecay = ndecay
        self.content = nn.Conv1d(channels, channels, 1)
        self.query = nn.Conv1d(channels, channels, 1)
        self.key = nn.Conv1d(channels, channels, 1)
        if ndecay:
            self.query_decay = nn.Conv1d(channels, heads * ndecay, 1)
            # A sigmoid follows: start with decays near zero, i.e. the widest window.
            self.query_decay.weight.data *= 0.01
            self.query_decay.bias.data[:] = -2
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T), with a residual connection."""
        batch, channels, length = x.shape
        heads = self.heads
        queries = self.query(x).view(batch, heads, -1, length)
        keys = self.key(x).view(batch, heads, -1, length)
        # Logits indexed (b, h, key t, query s).
        logits = torch.einsum("bhct,bhcs->bhts", keys, queries) / keys.shape[2] ** 0.5
        if self.ndecay:
            steps = torch.arange(length, device=x.device, dtype=x.dtype)
            distance = (steps[:, None] - steps[None, :]).abs()
            rates = torch.arange(1, self.ndecay + 1, device=x.device, dtype=x.dtype)
            penalties = -rates.view(-1, 1, 1) * distance / self.ndecay ** 0.5  # (ndecay, t, s)
            decay = torch.sigmoid(self.query_decay(x).view(batch, heads, -1, length)) / 2
            logits = logits + torch.einsum("fts,bhfs->bhts", penalties, decay)
        steps = torch.arange(length, device=x.device)  # the diagonal, written so that ONNX runtimes have
        logits = logits.masked_fill(steps[:, None] == steps[None, :], -100)  # the op (no bool EyeLike)
        weights = torch.softmax(logits, dim=2)
        content = self.content(x).view(batch, heads, -1, length)
        attended = torch.einsum("bhts,bhct->bhcs", weights, content).reshape(batch, -1, length)
        return x + self.proj(attended)


class DConv(nn.Module):
    """Compressed residual branches: `depth` residual blocks on (B, C, T), each a dilated
    convolution down to C / compress channels, optional BiLSTM and local attention, a 1x1
    convolution with GLU back to C channels and a LayerScale.

    Args:
        channels: input/output channels.
        compress: channel compression inside each block.
        depth: number of blocks; dilation doubles with each block (no dilation if negative).
        init: initial LayerScale value.
        norm: GroupNorm(1, .) after both convolutions.
        attn: add a :class:`LocalState` attention.
        heads, ndecay: attention heads and decay rates.
        lstm: add a :class:`BLSTM` (2 layers, windows of 200 steps, residual).
        gelu: GELU activation, otherwise ReLU.
        kernel: odd kernel size of the dilated convolution.
    """

    def __init__(self, channels: int, compress: float = 4, depth: int = 2, init: float = 1e-4, norm: bool = True,
                 attn: bool = False, heads: int = 4, ndecay: int = 4, lstm: bool = False, gelu: bool = True,
                 kernel: int = 3):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"DConv kernel must be odd, got {kernel}")
        hidden = int(channels / compress)
        dilate = depth > 0
        self.layers = nn.ModuleList()
        for index in range(abs(depth)):
            dilation = 2 ** index if dilate else 1
            # Sequential indices are state-dict keys: the optional modules sit after the
            # activation, the LSTM before the attention.
            block: tp.List[nn.Module] = [
                nn.Conv1d(channels, hidden, kernel, dilation=dilation, padding=dilation * (kernel // 2)),
                _norm(norm, 1, hidden),
                nn.GELU() if gelu else nn.ReLU(),
            ]
            if lstm:
                block.append(BLSTM(hidden, layers=2, max_steps=200, skip=True))
            if attn:
                block.append(LocalState(hidden, heads=heads, ndecay=ndecay))
            block += [nn.Conv1d(hidden, 2 * channels, 1), _norm(norm, 1, 2 * channels), nn.GLU(1),
                      LayerScale(channels, init)]
            self.layers.append(nn.Sequential(*block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T)."""
        for layer in self.layers:
            x = x + run_sequential(layer, x)
        return x


def _per_frequency(dconv: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Apply a (B, C, T) module to every frequency row of (B, C, F, T) activations."""
    if fast_inference(y):
        return per_row_in_tiles(dconv, y)
    batch, channels, bins, frames = y.shape
    y = y.permute(0, 2, 1, 3).reshape(batch * bins, channels, frames)
    return dconv(y).view(batch, bins, channels, frames).permute(0, 2, 1, 3)


class ScaledEmbedding(nn.Module):
    """An embedding stored divided by `scale` and multiplied back on use (equivalent to a
    `scale` times larger learning rate); `smooth` starts from a cumulative sum of Gaussians,
    i.e. an embedding that varies smoothly with the index."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float = 10.0, smooth: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        if smooth:
            weight = torch.cumsum(self.embedding.weight.data, dim=0)
            # A sum of n Gaussians has std sqrt(n): normalise it back.
            weight = weight / torch.arange(1, num_embeddings + 1).to(weight).sqrt()[:, None]
            self.embedding.weight.data[:] = weight
        self.embedding.weight.data /= scale
        self.scale = scale

    @property
    def weight(self) -> torch.Tensor:
        """The effective embedding table."""
        return self.embedding.weight * self.scale

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Embeddings of the integer indices `index`."""
        return self.embedding(index) * self.scale


class EncoderLayer(nn.Module):
    """One encoder layer of either branch: strided convolution, norm, GELU, optional DConv,
    optional 1x1 (or `1 + 2 * context` wide) convolution with GLU.

    Args:
        chin, chout: input and output channels.
        kernel_size, stride: of the strided convolution, along frequency when `freq`, else time.
        freq: a frequency layer: 2D convolutions with (k, 1) kernels on (B, C, F, T).
        pad: padding of the strided convolution along its axis (frequency layers pad it in
            the convolution; time layers also pad the end to a multiple of the stride).
        norm, norm_groups: GroupNorm(norm_groups, .) after the convolutions, else identity.
        empty: keep only the strided convolution (a time layer whose output is injected into
            the frequency branch at the merge).
        dconv: add a :class:`DConv` with `dconv_kw`.
        rewrite: add the GLU convolution.
        context: half width of the GLU convolution.
    """

    def __init__(self, chin: int, chout: int, *, kernel_size: int = 8, stride: int = 4, freq: bool = True,
                 pad: int = 0, norm: bool = True, norm_groups: int = 1, empty: bool = False, dconv: bool = True,
                 dconv_kw: tp.Optional[tp.Dict[str, tp.Any]] = None, rewrite: bool = True, context: int = 0):
        super().__init__()
        self.freq = freq
        self.kernel_size = kernel_size
        self.stride = stride
        self.empty = empty
        if freq:
            self.conv: nn.Module = nn.Conv2d(chin, chout, (kernel_size, 1), (stride, 1), (pad, 0))
        else:
            self.conv = nn.Conv1d(chin, chout, kernel_size, stride, pad)
        if empty:
            return
        conv_class = nn.Conv2d if freq else nn.Conv1d
        self.norm1 = _norm(norm, norm_groups, chout)
        self.rewrite: tp.Optional[nn.Module] = None
        if rewrite:
            self.rewrite = conv_class(chout, 2 * chout, 1 + 2 * context, 1, context)
            self.norm2 = _norm(norm, norm_groups, 2 * chout)
        self.dconv: tp.Optional[DConv] = DConv(chout, **(dconv_kw or {})) if dconv else None

    def forward(self, x: torch.Tensor, inject: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode `x`; `inject` (time-branch output of the same length) is added after the
        strided convolution, where the two branches merge."""
        if not self.freq:
            if x.dim() == 4:  # coming from the last frequency layer: (B, C, 1, T)
                x = x.reshape(x.shape[0], -1, x.shape[-1])
            remainder = x.shape[-1] % self.stride
            if remainder:
                x = F.pad(x, (0, self.stride - remainder))
        y = convolve(self.conv, x)
        if self.empty:
            return y
        if inject is not None:
            if inject.shape[-1] != y.shape[-1]:
                raise RuntimeError(f"cannot merge branches of {inject.shape[-1]} and {y.shape[-1]} frames")
            if inject.dim() == 3 and y.dim() == 4:
                inject = inject[:, :, None]
            y = y + inject
        y = F.gelu(self.norm1(y))
        if self.dconv is not None:
            y = _per_frequency(self.dconv, y) if self.freq else self.dconv(y)
        if self.rewrite is not None:
            y = F.glu(self.norm2(convolve(self.rewrite, y)), dim=1)
        return y


class DecoderLayer(nn.Module):
    """One decoder layer of either branch: add the skip, optional GLU convolution, optional
    DConv, then a transposed strided convolution, norm, and GELU unless `last`.

    Arguments as :class:`EncoderLayer`, plus:
        last: the output layer (no activation).
        context_freq: the GLU convolution of a frequency layer spans `1 + 2 * context` bins and
            frames; otherwise only frames.
        pad: how much to crop on each side of the transposed convolution's output along its axis
            (time layers crop to the `length` given to `forward` instead).
    Returns `(output, pre)` where `pre` is the input of the transposed convolution (used where
    the two branches split again).
    """

    def __init__(self, chin: int, chout: int, *, last: bool = False, kernel_size: int = 8, stride: int = 4,
                 freq: bool = True, pad: int = 0, norm: bool = True, norm_groups: int = 1, empty: bool = False,
                 dconv: bool = True, dconv_kw: tp.Optional[tp.Dict[str, tp.Any]] = None, rewrite: bool = True,
                 context: int = 1, context_freq: bool = True):
        super().__init__()
        self.chin = chin
        self.last = last
        self.freq = freq
        self.pad = pad
        self.stride = stride
        self.empty = empty
        if freq:
            self.conv_tr: nn.Module = nn.ConvTranspose2d(chin, chout, (kernel_size, 1), (stride, 1))
        else:
            self.conv_tr = nn.ConvTranspose1d(chin, chout, kernel_size, stride)
        self.norm2 = _norm(norm, norm_groups, chout)
        if empty:
            return
        self.rewrite: tp.Optional[nn.Module] = None
        if rewrite:
            if not freq:
                self.rewrite = nn.Conv1d(chin, 2 * chin, 1 + 2 * context, 1, context)
            elif context_freq:
                self.rewrite = nn.Conv2d(chin, 2 * chin, 1 + 2 * context, 1, context)
            else:
                self.rewrite = nn.Conv2d(chin, 2 * chin, (1, 1 + 2 * context), 1, (0, context))
            self.norm1 = _norm(norm, norm_groups, 2 * chin)
        self.dconv: tp.Optional[DConv] = DConv(chin, **(dconv_kw or {})) if dconv else None

    def forward(self, x: torch.Tensor, skip: tp.Optional[torch.Tensor], length: tp.Optional[int]
                ) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Decode `x` with the encoder's `skip`; time layers crop their output to `length`."""
        if self.freq and x.dim() == 3:  # coming from a time layer: restore the frequency axis
            x = x.view(x.shape[0], self.chin, -1, x.shape[-1])
        if self.empty:
            y = x
        else:
            y = x + skip
            if self.rewrite is not None:
                y = F.glu(self.norm1(convolve(self.rewrite, y)), dim=1)
            if self.dconv is not None:
                y = _per_frequency(self.dconv, y) if self.freq else self.dconv(y)
        z = self.norm2(convolve(self.conv_tr, y))
        if self.freq:
            if self.pad:
                z = z[..., self.pad:-self.pad, :]
        else:
            assert length is not None
            z = z[..., self.pad:self.pad + length]
            if z.shape[-1] != length:
                raise RuntimeError(f"decoder produced {z.shape[-1]} samples, expected {length}")
        if not self.last:
            z = F.gelu(z)
        return z, y


class BandSplit(nn.Module):
    """A frequency layer replicated over bands of the frequency axis (`multi_freqs`), each band
    with its own weights.

    `split_ratios` are the band edges as fractions of the bins. Bands are cut so that, were all
    replicas equal, the result would be exactly the full-band layer: encoder bands overlap by
    `kernel - stride` bins, decoder bands are overlap-added (counting the bias once).

    Args:
        make_layer: builds one replica, called as `make_layer(pad=0, last=True)` for decoders
            and `make_layer(pad=0)` for encoders: band edges are padded here, not by the layer.
        split_ratios: increasing fractions in (0, 1).
        decoder: whether the replicas are :class:`DecoderLayer`.
        kernel_size, stride: of the replicas' strided convolutions.
        last: (decoders) whether this is the output layer, i.e. no GELU after the bands.
    """

    def __init__(self, make_layer: tp.Callable[..., nn.Module], split_ratios: tp.Sequence[float], *,
                 decoder: bool, kernel_size: int, stride: int, last: bool = False):
        super().__init__()
        self.split_ratios = list(split_ratios)
        self.decoder = decoder
        self.kernel_size = kernel_size
        self.stride = stride
        self.last = last
        self.layers = nn.ModuleList(
            [make_layer(pad=0, last=True) if decoder else make_layer(pad=0) for _ in range(len(self.split_ratios) + 1)])

    def forward(self, x: torch.Tensor, skip: tp.Optional[torch.Tensor] = None, length: tp.Optional[int] = None
                ) -> tp.Any:
        """Encoder: `forward(x)` -> output. Decoder: `forward(x, skip)` -> (output, None)."""
        if self.decoder:
            assert skip is not None
            return self._decode(x, skip), None
        return self._encode(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        bins = x.shape[2]
        kernel, stride = self.kernel_size, self.stride
        pad = kernel // 4
        start = 0
        outputs = []
        for ratio, layer in zip(self.split_ratios + [1], self.layers):
            if ratio == 1:
                limit = bins
            else:
                # Snap the band's end so that its frames tile exactly with the next band's.
                span = int(round(bins * ratio)) - start + (pad if start == 0 else 0)
                frames = round((span - kernel) / stride + 1)
                limit = start + (frames - 1) * stride + kernel - (pad if start == 0 else 0)
            if not start < limit <= bins:
                raise RuntimeError(f"bad frequency band [{start}, {limit}) of {bins} bins (multi_freqs)")
            band = x[:, :, start:limit]
            band = F.pad(band, (0, 0, pad if start == 0 else 0, pad if ratio == 1 else 0))
            outputs.append(layer(band))
            start = limit - kernel + stride
        return torch.cat(outputs, dim=2)

    def _decode(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        bins = x.shape[2]
        stride = self.stride
        start = 0
        outputs: tp.List[torch.Tensor] = []
        for ratio, layer in zip(self.split_ratios + [1], self.layers):
            limit = bins if ratio == 1 else int(round(bins * ratio))
            out, _ = layer(x[:, :, start:limit], skip[:, :, start:limit], None)
            if outputs:
                # Overlap-add with the previous band; its bias is already in there.
                outputs[-1][:, :, -stride:] += out[:, :, :stride] - layer.conv_tr.bias.view(1, -1, 1, 1)
                out = out[:, :, stride:]
            if ratio == 1:
                out = out[:, :, :-stride // 2, :]
            if start == 0:
                out = out[:, :, stride // 2:, :]
            outputs.append(out)
            start = limit
        out = torch.cat(outputs, dim=2)
        return out if self.last else F.gelu(out)
