"""Inference-only kernels for the (H)(T)Demucs layers on the CPU: the same weights and outputs
(within float rounding) as the declared `nn` layers, in fewer and larger matrix products.

With one intra-op thread, torch's CPU convolutions are slow for the shapes these models have:
1x1 convolutions over a batch of 512 frequency rows (the frequency branch's DConv), the 3-tap
convolutions down to a handful of channels, and the strided convolutions with a (k, 1) kernel
and their transposes (oneDNN or torch's unfolding fallback: 3-20 GFLOP/s where a matrix product
reaches 50). Here each is a matrix product over a view of the input (a strided convolution whose
kernel is a multiple of its stride reads `kernel // stride` consecutive blocks of `stride`
samples), and the transposed one adds the shifted blocks of one product. The native self-attention
of `nn.MultiheadAttention` materialises the attention matrix; :func:`attention` goes through
`scaled_dot_product_attention` instead.

:func:`fast_inference` says when these run: no autograd (training and its gradients keep the
declared layers), the CPU, no autocast, no tracing, export or compilation.
"""
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn


def fast_inference(x: torch.Tensor) -> bool:
    """Whether the kernels of this module may replace the declared layers on `x`."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling())


def _plain(conv: nn.Module) -> bool:
    """One group, zero padding mode, explicit (not "same"/"valid") padding."""
    return conv.groups == 1 and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


def _ones(values: tp.Sequence[int]) -> bool:
    return all(value == 1 for value in values)


def _product(weight: torch.Tensor, x: torch.Tensor, bias: tp.Optional[torch.Tensor]) -> torch.Tensor:
    """weight (O, I) @ x (B, I, N) + bias[:, None] -> (B, O, N)."""
    if x.shape[0] == 1:
        flat = x[0]
        out = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)
        return out[None]
    if bias is None:
        return torch.matmul(weight, x)
    return torch.baddbmm(bias[None, :, None], weight.expand(x.shape[0], -1, -1), x)


def pointwise_conv(conv: tp.Union[nn.Conv1d, nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    """A 1x1 Conv1d or Conv2d (stride 1, no padding) as one matrix product."""
    batch = x.shape[0]
    weight = conv.weight.reshape(conv.out_channels, conv.in_channels)
    out = _product(weight, x.reshape(batch, conv.in_channels, -1), conv.bias)
    return out.view(batch, conv.out_channels, *x.shape[2:])


def same_conv1d(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A stride-1 Conv1d of odd kernel k, dilation d and padding d * (k // 2) (the length kept):
    one product of the k taps' weights stacked, then the taps' outputs shifted and added."""
    batch, _, length = x.shape
    kernel, dilation = conv.kernel_size[0], conv.dilation[0]
    out_channels = conv.out_channels
    stacked = conv.weight.permute(2, 0, 1).reshape(kernel * out_channels, conv.in_channels)
    taps = _product(stacked, x, None).view(batch, kernel, out_channels, length)
    centre = kernel // 2
    out = taps[:, centre] + conv.bias[:, None] if conv.bias is not None else taps[:, centre].clone()
    for tap in range(kernel):
        shift = (tap - centre) * dilation
        if tap == centre or abs(shift) >= length:
            continue
        if shift > 0:
            out[..., :length - shift] += taps[:, tap, :, shift:]
        else:
            out[..., -shift:] += taps[:, tap, :, :length + shift]
    return out


def strided_conv(conv: tp.Union[nn.Conv1d, nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    """A Conv1d of kernel k and stride s, or a Conv2d of kernel (k, 1) and stride (s, 1) along
    the frequency axis, with s dividing k: the input regrouped once into blocks of s samples
    ((B, C * s, blocks * T), one copy), then k // s products over consecutive blocks."""
    two_d = x.dim() == 4
    kernel, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    x4 = x if two_d else x[..., None]  # (B, C, L, T)
    if pad:
        x4 = F.pad(x4, (0, 0, pad, pad))
    batch, channels, length, frames = x4.shape
    taps = kernel // stride
    outputs = (length - kernel) // stride + 1
    blocks = outputs + taps - 1
    regrouped = (x4[:, :, :blocks * stride].reshape(batch, channels, blocks, stride, frames)
                 .transpose(2, 3).reshape(batch, channels * stride, blocks * frames))
    weight = conv.weight.reshape(conv.out_channels, channels, taps, stride)
    out: tp.Optional[torch.Tensor] = None
    for tap in range(taps):
        part = regrouped[:, :, tap * frames:(tap + outputs) * frames]
        tap_weight = weight[:, :, tap].reshape(conv.out_channels, channels * stride)
        if out is None:
            out = _product(tap_weight, part, conv.bias)
        else:
            out.baddbmm_(tap_weight.expand(batch, -1, -1), part)
    assert out is not None
    out = out.view(batch, conv.out_channels, outputs, frames)
    return out if two_d else out[..., 0]


def strided_conv_transpose(conv: tp.Union[nn.ConvTranspose1d, nn.ConvTranspose2d], x: torch.Tensor) -> torch.Tensor:
    """A ConvTranspose1d of kernel k and stride s, or a ConvTranspose2d of kernel (k, 1) and
    stride (s, 1), with s dividing k and no padding: one product gives every tap of every input
    sample, then the k // s blocks of s output samples each tap group feeds are added in place."""
    two_d = x.dim() == 4
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    x4 = x if two_d else x[..., None]
    batch, channels, length, frames = x4.shape
    out_channels = conv.out_channels
    taps = kernel // stride
    weight = conv.weight.reshape(channels, out_channels * kernel).t()  # rows (out channel, tap)
    products = _product(weight, x4.reshape(batch, channels, length * frames), None)
    products = products.view(batch, out_channels, taps, stride, length, frames).transpose(3, 4)
    out = x4.new_empty(batch, out_channels, length + taps - 1, stride, frames)
    if conv.bias is not None:
        torch.add(products[:, :, 0], conv.bias.view(1, -1, 1, 1, 1), out=out[:, :, :length])
        out[:, :, length:] = conv.bias.view(1, -1, 1, 1, 1)
    else:
        out[:, :, :length] = products[:, :, 0]
        out[:, :, length:] = 0
    for tap in range(1, taps):
        out[:, :, tap:tap + length] += products[:, :, tap]
    out = out.view(batch, out_channels, (length + taps - 1) * stride, frames)
    return out if two_d else out[..., 0]


def _kernel_for(conv: nn.Module) -> tp.Optional[tp.Callable[[tp.Any, torch.Tensor], torch.Tensor]]:
    """The kernel above that computes `conv`, or None (then `conv` itself runs)."""
    if not _plain(conv):
        return None
    kind = type(conv)
    if kind in (nn.Conv1d, nn.Conv2d):
        if _ones(conv.kernel_size) and _ones(conv.stride) and not any(conv.padding):
            return pointwise_conv
        if kind is nn.Conv1d and conv.stride[0] == 1 and conv.kernel_size[0] % 2 \
                and conv.padding[0] == conv.dilation[0] * (conv.kernel_size[0] // 2):
            return same_conv1d
        if not _ones(conv.dilation):
            return None
        along_first = kind is nn.Conv1d or (conv.kernel_size[1] == 1 and conv.stride[1] == 1 and conv.padding[1] == 0)
        if along_first and conv.stride[0] > 1 and conv.kernel_size[0] % conv.stride[0] == 0:
            return strided_conv
        return None
    if kind in (nn.ConvTranspose1d, nn.ConvTranspose2d):
        along_first = kind is nn.ConvTranspose1d or (conv.kernel_size[1] == 1 and conv.stride[1] == 1)
        if (along_first and _ones(conv.dilation) and not any(conv.padding) and not any(conv.output_padding)
                and conv.kernel_size[0] % conv.stride[0] == 0):
            return strided_conv_transpose
    return None


def convolve(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`, through the matching kernel of this module when :func:`fast_inference` allows."""
    if fast_inference(x):
        kernel = _kernel_for(conv)
        if kernel is not None:
            return kernel(conv, x)
    return conv(x)


def run_sequential(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`layers(x)` with its convolutions through :func:`convolve`."""
    for layer in layers:
        x = convolve(layer, x) if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else layer(x)
    return x


def per_row_in_tiles(module: nn.Module, y: torch.Tensor, tile_bytes: int = 1 << 20) -> torch.Tensor:
    """`module` (a map of (N, C, T) that treats each of its N rows alone, like DConv) applied to
    every frequency row of (B, C, F, T) activations, a few rows at a time: each tile's
    intermediate activations (about `tile_bytes` for the widest, twice the input's channels) stay
    in a core's cache instead of going through memory at every elementwise operation. With
    several intra-op threads all rows go at once: every small operation would be a barrier of
    the OpenMP team, which costs more than the cache saves on a loaded machine."""
    batch, channels, bins, frames = y.shape
    rows = max(1, tile_bytes // (2 * channels * frames * y.element_size()))
    if torch.get_num_threads() > 1:
        rows = bins
    out = torch.empty_like(y)
    for first in range(0, bins, rows):
        last = min(bins, first + rows)
        tile = y[:, :, first:last].transpose(1, 2).reshape(batch * (last - first), channels, frames)
        out[:, :, first:last] = module(tile).view(batch, last - first, channels, frames).transpose(1, 2)
    return out


def token_group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """A GroupNorm of one group over (B, T, C) tokens (statistics over all of T and C, a scale and
    shift per channel C) as a layer norm over (T, C) and one multiply-add, in the tokens' own
    layout: transposing to (B, C, T) and back leaves the next residual additions and linear
    layers a strided operand."""
    out = F.layer_norm(x, x.shape[1:], eps=norm.eps)
    return torch.addcmul(norm.bias, out, norm.weight) if norm.affine else out


def attention(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """`mha(query, key, key, need_weights=False)[0]` of a batch-first attention without extra
    key/value biases, through `scaled_dot_product_attention` when :func:`fast_inference` allows
    (the native self-attention path of `nn.MultiheadAttention` materialises the weights)."""
    usable = (fast_inference(query) and mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None
              and not mha.add_zero_attn and mha.in_proj_bias is not None)
    if not usable:
        return mha(query, key, key, need_weights=False)[0]
    batch, length, dim = query.shape
    heads = mha.num_heads
    weight, bias = mha.in_proj_weight, mha.in_proj_bias
    if query is key:
        q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
    else:
        q = F.linear(query, weight[:dim], bias[:dim])
        k, v = F.linear(key, weight[dim:], bias[dim:]).chunk(2, dim=-1)

    def split(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unflatten(-1, (heads, dim // heads)).transpose(1, 2)

    attended = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return F.linear(attended.transpose(1, 2).reshape(batch, length, dim), mha.out_proj.weight, mha.out_proj.bias)
