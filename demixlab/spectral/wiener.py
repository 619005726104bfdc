"""Multichannel Wiener filtering with EM refinement (norbert / Open-Unmix style).

Works on any complex time-frequency representation laid out as (B, C, F, N): STFTs, or one
block of a sliced constant-Q transform.

Stereo EM has one real-arithmetic implementation (:func:`_stereo_em`: the covariance statistics,
the mixture covariance's closed-form inverse and the filter), with the same results as the
complex path within float rounding: the complex numbers are held as real components, so that
the sums over frames and over sources are small batched matrix products, and an autograd graph
has no complex kernels. Two thin drivers call it. Inference (no autograd,
:func:`_stereo_tile`): everything but the rescaling (which looks at a whole window) is
independent per frequency bin, so on CPU each window is filtered in tiles of a few dozen bins,
whose dozen elementwise passes per EM step run on data that stays in the core's cache (tiles run
side by side on torch's threads, one intra-op thread each: :mod:`demixlab.threads`), written
straight into the output. Differentiable calls (sliCQ-CDAE's training step,
:func:`_wiener_stereo`) filter whole windows. Other channel counts, and soft masks or a residual
source under autograd, filter whole windows in complex arithmetic (:func:`_em_step`).
"""
import functools
import math
import typing as tp

import torch

from ..threads import map_in_threads

# Frequency bins per tile of the stereo path on CPU: (B=1, 4 sources, 2 channels, 128 bins, 300
# frames) float32 components are 2.4 MB, about a core's L2 cache (measured on 30 s, 1 and 2 threads:
# 128 bins 0.28-0.45 s, 64 bins 0.32-0.48 s, 32 bins 0.42-0.50 s). Other devices take whole windows.
CPU_TILE_BINS = 128


def wiener(targets: torch.Tensor, mix: torch.Tensor, iterations: int = 1, *, softmask: bool = False,
           residual: bool = False, window: tp.Optional[int] = 300, scale_factor: float = 10.0,
           eps: float = 1e-10, out: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multichannel Wiener filtering with EM refinement (as in norbert / Open-Unmix).

    Args:
        targets: non-negative source estimates (B, S, C', F, N), C' = C or 1 (shared by
            channels): magnitudes, or any non-negative weights with `softmask=True`.
        mix: complex mixture STFT (B, C, F, N).
        iterations: EM iterations; 0 returns the initial estimates.
        softmask: initial estimates are the mixture times the ratio masks `targets / sum(targets)`;
            otherwise the target magnitudes with the mixture phase.
        residual: append one source, the mixture minus the initial estimates (before EM).
        window: frames per independent filtering window (bounds memory); None: all frames.
            The EM spatial model is fitted per window, so with `iterations > 0` the result
            depends on it (0 iterations are frame-local and do not).
        scale_factor, eps: numerical constants of the reference implementation.
        out: where to write the result (any strides; see :func:`bins_contiguous`), else a new tensor.

    Returns:
        complex source STFTs (B, S + residual, C, F, N), in the dtype of `mix` (`out` if given).
    """
    batch, channels, bins, frames = mix.shape
    step = window if window else frames
    if channels == 2 and not (torch.is_grad_enabled() and (targets.requires_grad or mix.requires_grad)):
        if out is None:
            out = mix.new_empty(batch, targets.shape[1] + residual, channels, bins, frames)
        by_bin = out.permute(0, 3, 1, 2, 4)  # (B, F, S, C, N), the layout of the stereo path
        tile = CPU_TILE_BINS if mix.device.type == "cpu" else bins
        tiles = []
        for start in range(0, frames, step):
            window_mix = mix[..., start:start + step]
            scale = _em_scale(window_mix, scale_factor) if iterations > 0 else None
            tiles += [(targets[..., low:low + tile, start:start + step], window_mix[..., low:low + tile, :], scale,
                       by_bin[:, low:low + tile, ..., start:start + step]) for low in range(0, bins, tile)]

        def filter_tile(tile: tp.Tuple[torch.Tensor, torch.Tensor, tp.Optional[torch.Tensor], torch.Tensor]) -> None:
            tile_targets, tile_mix, scale, tile_out = tile
            _stereo_tile(tile_targets, tile_mix, iterations, softmask, residual, scale, eps, out=tile_out)

        # Tiles are small: on CPU they run side by side on torch's threads, one intra-op thread each.
        if mix.device.type == "cpu":
            map_in_threads(filter_tile, tiles)
        else:
            for item in tiles:
                filter_tile(item)
        return out
    outputs = [_wiener_window(targets[..., start:start + step], mix[..., start:start + step], iterations,
                              softmask, residual, scale_factor, eps)
               for start in range(0, frames, step)]
    result = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
    return result if out is None else out.copy_(result)


def bins_contiguous(shape: tp.Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An empty (..., F, N) tensor (dtype and device of `like`) whose bins are contiguous in memory:
    :meth:`torch.istft` reads such a spectrogram without first transposing it into that order."""
    return like.new_empty(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)


def _wiener_window(targets: torch.Tensor, mix: torch.Tensor, iterations: int, softmask: bool, residual: bool,
                   scale_factor: float, eps: float) -> torch.Tensor:
    """:func:`wiener` on one window over whole windows (the path of autograd and of other channel
    counts): stereo magnitudes with EM in real arithmetic (:func:`_wiener_stereo`), the rest in
    complex arithmetic (:func:`_wiener_complex`)."""
    targets = targets.to(mix.real.dtype)
    if mix.shape[1] == 2 and iterations > 0 and not softmask and not residual:
        return _wiener_stereo(targets, mix, iterations, scale_factor, eps)
    return _wiener_complex(targets, mix, iterations, softmask, residual, scale_factor, eps)


def _wiener_complex(targets: torch.Tensor, mix: torch.Tensor, iterations: int, softmask: bool, residual: bool,
                    scale_factor: float, eps: float) -> torch.Tensor:
    """:func:`wiener` on one window in complex arithmetic, any number of channels: targets
    (B, S, C', F, N) real, mix (B, C, F, N) complex -> sources (B, S + residual, C, F, N)."""
    mix = mix.unsqueeze(1)  # (B, 1, C, F, N), broadcasts against sources
    if softmask:
        sources = mix * (targets / (eps + targets.sum(dim=1, keepdim=True)))
    else:
        magnitudes, phases = torch.broadcast_tensors(targets, mix.angle())
        sources = torch.polar(magnitudes, phases)
    if residual:
        sources = torch.cat([sources, mix - sources.sum(dim=1, keepdim=True)], dim=1)
    if iterations == 0:
        return sources
    scale = _em_scale(mix[:, 0], scale_factor).view(-1, 1, 1, 1, 1)
    # EM works with channels last: (B, S, F, N, C) and (B, F, N, C).
    sources = (sources / scale).permute(0, 1, 3, 4, 2)
    mix = (mix / scale)[:, 0].permute(0, 2, 3, 1)
    for _ in range(iterations):
        sources = _em_step(sources, mix, eps)
    return sources.permute(0, 1, 4, 2, 3) * scale


def _wiener_stereo(targets: torch.Tensor, mix: torch.Tensor, iterations: int, scale_factor: float,
                   eps: float) -> torch.Tensor:
    """The EM path of :func:`_wiener_window` for two channels under autograd: magnitudes `targets`
    (B, S, C', F, N) with the phase of `mix` (B, 2, F, N), the same rescaling, then `iterations`
    EM steps of :func:`_stereo_em` over the whole window, in real arithmetic (the autograd graph
    of the complex version promoted every real factor and ran complex kernels: sliCQ-CDAE's 70
    blocks, forward and backward, took 2.4x the time of a real path on one CPU thread).
    """
    batch, count, _, bins, frames = targets.shape
    scale = _em_scale(mix, scale_factor).view(batch, 1, 1, 1)
    mixture = _stereo_components(mix) / scale  # (B, F, 4, N)
    magnitude = (targets / scale.unsqueeze(1)).permute(0, 3, 1, 2, 4)  # (B, F, S, C', N)
    filtered, psd = _stereo_em(*_magnitude_statistics(magnitude, mixture), mixture, iterations, eps)
    sources = filtered * (psd * scale).unsqueeze(3)
    # (B, F, S, 4, N) -> (B, S, 2, F, N, 2): channels, then real and imaginary parts last.
    sources = sources.view(batch, bins, count, 2, 2, frames).permute(0, 2, 3, 1, 5, 4).contiguous()
    return torch.view_as_complex(sources)


def _em_step(sources: torch.Tensor, mix: torch.Tensor, eps: float) -> torch.Tensor:
    """One EM update: fit a local Gaussian model (PSD `v` and spatial covariance `R` per source
    and bin) to the current estimates, then filter the mixture with it.

    sources: (B, S, F, N, C) complex, mix: (B, F, N, C) complex; returns the new sources.
    """
    channels = mix.shape[-1]
    psd = (sources.real ** 2 + sources.imag ** 2).mean(dim=-1)  # (B, S, F, N)
    # Weighted empirical covariance over the frames of the window: (B, S, F, C, C).
    weight = eps + psd.sum(dim=-1)
    spatial = torch.einsum("bsfnc,bsfnd->bsfcd", sources, sources.conj()) / weight[..., None, None]
    identity = torch.eye(channels, dtype=mix.dtype, device=mix.device)
    mix_cov = torch.einsum("bsfn,bsfcd->bfncd", psd.to(mix.dtype), spatial) + math.sqrt(eps) * identity
    # Wiener filter of source j: v_j R_j Cxx^-1, applied to the mixture.
    whitened = (_invert(mix_cov) * mix.unsqueeze(-2)).sum(dim=-1)  # (B, F, N, C)
    return psd.unsqueeze(-1) * torch.einsum("bsfcd,bfnd->bsfnc", spatial, whitened)


def _invert(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of (..., C, C) matrices; closed form for C <= 2, which is the common case."""
    channels = matrix.shape[-1]
    if channels == 1:
        return 1 / matrix
    if channels == 2:
        a, b = matrix[..., 0, 0], matrix[..., 0, 1]
        c, d = matrix[..., 1, 0], matrix[..., 1, 1]
        inv_det = 1 / (a * d - b * c)
        return torch.stack([torch.stack([d, -b], dim=-1), torch.stack([-c, a], dim=-1)], dim=-2) \
            * inv_det[..., None, None]
    return torch.linalg.inv(matrix)


def _em_scale(mix: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """What EM divides each example of a (B, ...) complex mixture by, (B,): its peak magnitude over
    `scale_factor`, at least 1. EM runs on a rescaled problem because `eps` regularises the
    mixture covariance, which only makes sense at a known scale."""
    return torch.clamp(_peak_magnitude(mix) / scale_factor, min=1.0)


def _peak_magnitude(mix: torch.Tensor) -> torch.Tensor:
    """Largest magnitude of each example of a (B, ...) complex tensor, (B,): located by the squared
    magnitudes (cheaper than `abs` everywhere), then the magnitude of that element."""
    flat = mix.reshape(mix.shape[0], -1)
    index = (flat.real ** 2 + flat.imag ** 2).argmax(dim=1, keepdim=True)
    return flat.gather(1, index).abs()[:, 0]


@functools.lru_cache(maxsize=8)
def _stereo_maps(dtype: torch.dtype, device: torch.device) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Two linear maps of the stereo path: (16, 4) from the flattened 4 x 4 Gram matrix of a
    source's components (re0, im0, re1, im1) over frames to the entries (R00, R11, Re R01, Im R01)
    of its spatial covariance R (before the division by the weight), and (4, 16) from these
    entries to R as a flattened 4 x 4 real matrix acting on components. Normal tensors even when
    first asked for in inference mode: differentiable calls use the same cached maps."""
    with torch.inference_mode(False):
        return _build_stereo_maps(dtype, device)


def _build_stereo_maps(dtype: torch.dtype, device: torch.device) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """The maps of :func:`_stereo_maps`, built anew."""
    # R00 = G00 + G11, R11 = G22 + G33, Re R01 = G02 + G13, Im R01 = G12 - G03 (G flattened).
    to_entries = torch.zeros(16, 4, dtype=dtype, device=device)
    for entry, terms in enumerate([[(0, 1.0), (5, 1.0)], [(10, 1.0), (15, 1.0)], [(2, 1.0), (7, 1.0)],
                                   [(6, 1.0), (3, -1.0)]]):
        for gram_index, value in terms:
            to_entries[gram_index, entry] = value
    # The complex product y = R x on components, rows (y0re, y0im, y1re, y1im): (entry, sign) per column.
    layout = [[(0, 1), None, (2, 1), (3, -1)],
              [None, (0, 1), (3, 1), (2, 1)],
              [(2, 1), (3, 1), (1, 1), None],
              [(3, -1), (2, 1), None, (1, 1)]]
    to_map = torch.zeros(4, 16, dtype=dtype, device=device)
    for row, columns in enumerate(layout):
        for col, term in enumerate(columns):
            if term is not None:
                to_map[term[0], row * 4 + col] = term[1]
    return to_entries, to_map


def _stereo_components(mix: torch.Tensor) -> torch.Tensor:
    """A complex stereo (B, 2, F, N) tensor as real components (B, F, 4, N): (re0, im0, re1, im1)."""
    batch, _, bins, frames = mix.shape
    return torch.view_as_real(mix).permute(0, 2, 1, 4, 3).reshape(batch, bins, 4, frames)


def _stereo_tile(targets: torch.Tensor, mix: torch.Tensor, iterations: int, softmask: bool, residual: bool,
                 scale: tp.Optional[torch.Tensor], eps: float, out: torch.Tensor) -> None:
    """:func:`_wiener_window` for stereo without autograd on the bins and frames of one tile:
    (B, S, C', f, n) targets and a (B, 2, f, n) complex mixture -> complex sources written into
    `out`, (B, f, S + residual, 2, n). The EM steps are :func:`_stereo_em`'s (from the magnitudes'
    statistics as in differentiable calls, or from initial estimates written in place), and the
    last step's gain is applied on the way into `out`.
    """
    batch, _, bins, frames = mix.shape
    count = targets.shape[1] + residual
    mixture = _stereo_components(mix)
    weights = targets.to(mixture.dtype).permute(0, 3, 1, 2, 4)  # (B, f, S, C', n)
    tile_scale = scale.reshape(batch, 1, 1, 1) if iterations > 0 and scale is not None else None
    gain = None
    if tile_scale is not None and not softmask and not residual:
        mixture = mixture / tile_scale
        sources, gain = _stereo_em(*_magnitude_statistics(weights / tile_scale.unsqueeze(-1), mixture), mixture,
                                   iterations, eps)
    else:
        sources = _stereo_estimates(weights, mixture, softmask, residual, eps)
        if tile_scale is not None:
            sources, gain = _stereo_em(*_stereo_statistics(sources.div_(tile_scale.unsqueeze(-1))),
                                       mixture / tile_scale, iterations, eps)
    if gain is not None:
        gain = gain.mul_(tile_scale).unsqueeze(3)  # (B, f, S, 1, n): v_j times the rescaling
    # Into the complex output, real and imaginary parts each a strided pass along the frames.
    parts = sources.view(batch, bins, count, 2, 2, frames)
    halves = torch.view_as_real(out)
    for part in range(2):
        if gain is None:
            halves[..., part].copy_(parts[..., part, :])
        else:
            torch.mul(parts[..., part, :], gain, out=halves[..., part])


def _stereo_estimates(weights: torch.Tensor, mixture: torch.Tensor, softmask: bool, residual: bool,
                      eps: float) -> torch.Tensor:
    """Initial estimates of stereo sources (B, f, S + residual, 4, n) in components, written in
    place (no autograd): targets `weights` (B, f, S, C', n) with the phase of `mixture`
    (B, f, 4, n), or the mixture times their ratio masks; `residual`: and the mixture minus them."""
    batch, bins, count, _, frames = weights.shape
    sources = mixture.new_empty(batch, bins, count + residual, 4, frames)
    head = sources[:, :, :count].view(batch, bins, count, 2, 2, frames)  # (B, f, S, C, re/im, n)
    if softmask:
        mask = weights / (eps + weights.sum(dim=2, keepdim=True))
        torch.mul(mixture.view(batch, bins, 1, 2, 2, frames), mask.unsqueeze(-2), out=head)
    else:
        phase = torch.atan2(mixture[:, :, 1::2], mixture[:, :, 0::2]).unsqueeze(2)  # (B, f, 1, C, n)
        torch.mul(weights, torch.cos(phase), out=head[..., 0, :])
        torch.mul(weights, torch.sin(phase), out=head[..., 1, :])
    if residual:
        torch.sub(mixture, sources[:, :, :count].sum(dim=2), out=sources[:, :, count])
    return sources


def _stereo_em(psd: torch.Tensor, moments: torch.Tensor, mixture: torch.Tensor, iterations: int,
               eps: float) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """`iterations` (>= 1) EM steps of :func:`_em_step` for stereo in real arithmetic, the one
    implementation of the inference tiles and of differentiable calls, from the first step's
    statistics (:func:`_stereo_statistics` or :func:`_magnitude_statistics`) and the mixture
    (B, f, 4, n), components (re0, im0, re1, im1) on an axis before the frames, so that the sums
    over frames and over sources are small batched matrix products.

    Returns the last step's filtered mixture R_j Cxx^-1 x (B, f, S, 4, n) and the PSD v_j
    (B, f, S, n) that multiplies it, for the caller to apply (with its rescaling) on the way out.
    Autograd-safe: in-place operations only on intermediates that no backward formula keeps.
    """
    filtered, psd = _stereo_filter(psd, moments, mixture, eps)
    for _ in range(iterations - 1):
        filtered, psd = _stereo_filter(*_stereo_statistics(filtered.mul_(psd.unsqueeze(3))), mixture, eps)
    return filtered, psd


def _magnitude_statistics(magnitude: torch.Tensor, mixture: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_stereo_statistics` of sources with magnitudes `magnitude` (B, f, S, C', n) (C' = 1:
    shared by the channels) and the phase of `mixture` (B, f, 4, n), without forming them: a
    source's power per channel is y^2 and its cross term y_0 y_1 times the mixture's unit phasors
    u_0 conj(u_1), which all sources share."""
    phase = torch.atan2(mixture[:, :, 1::2], mixture[:, :, 0::2])  # (B, f, 2, n)
    cos, sin = torch.cos(phase), torch.sin(phase)
    phasors = torch.stack([cos[:, :, 0] * cos[:, :, 1] + sin[:, :, 0] * sin[:, :, 1],
                           sin[:, :, 0] * cos[:, :, 1] - cos[:, :, 0] * sin[:, :, 1]], dim=-1)  # (B, f, n, 2)
    left, right = magnitude[:, :, :, 0], magnitude[:, :, :, -1]  # (B, f, S, n)
    power_left, power_right = left * left, right * right
    psd = (power_left + power_right).mul_(0.5)
    moments = torch.cat([power_left.sum(dim=-1, keepdim=True), power_right.sum(dim=-1, keepdim=True),
                         (left * right) @ phasors], dim=-1)
    return psd, moments


def _stereo_statistics(sources: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """The statistics of the local Gaussian model of stereo sources (B, f, S, 4, n): the PSD
    (mean over channels of the squared magnitudes, (B, f, S, n)) and the sums over frames of the
    spatial covariance's entries (|s_0|^2, |s_1|^2, Re and Im of s_0 conj(s_1); (B, f, S, 4)),
    the latter from the Gram matrix of the components over frames."""
    batch, bins, count, _, frames = sources.shape
    re0, im0, re1, im1 = sources.unbind(dim=3)
    psd = torch.mul(re0, re0).addcmul_(im0, im0).add_(torch.mul(re1, re1).addcmul_(im1, im1)).mul_(0.5)
    gram = (sources @ sources.transpose(-1, -2)).view(batch, bins, count, 16)
    return psd, gram @ _stereo_maps(sources.dtype, sources.device)[0]


def _stereo_filter(psd: torch.Tensor, moments: torch.Tensor, mixture: torch.Tensor,
                   eps: float) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """One EM filter for stereo from :func:`_stereo_statistics`' PSD and moments: the spatial
    covariances R_j (Hermitian 2 x 2: R00, R11 real), the mixture covariance
    Cxx = sum_j v_j R_j + sqrt(eps) I and the filtered mixture R_j Cxx^-1 x, (B, f, S, 4, n),
    returned with the PSD v_j that completes the Wiener filter v_j R_j Cxx^-1 (see :func:`_stereo_em`)."""
    batch, bins, count, frames = psd.shape
    spatial = moments / (eps + psd.sum(dim=-1, keepdim=True))  # (B, f, S, 4): R00, R11, Re R01, Im R01
    whitened = _stereo_whiten(spatial.transpose(-1, -2) @ psd, mixture, eps)
    # v_j R_j (Cxx^-1 x), all sources in one product: R_j as a 4 x 4 map on components.
    filters = (spatial @ _stereo_maps(psd.dtype, psd.device)[1]).view(batch, bins, count * 4, 4)
    return (filters @ whitened).view(batch, bins, count, 4, frames), psd


def _stereo_whiten(covariance: torch.Tensor, mixture: torch.Tensor, eps: float) -> torch.Tensor:
    """The mixture whitened by its covariance, Cxx^-1 x = [d x0 - b x1, a x1 - conj(b) x0] / det
    for Cxx = [[a, b], [conj(b), d]] + sqrt(eps) I, given as its entries (a, d, Re b, Im b)
    (B, f, 4, n) (Hermitian: a real determinant); mixture and result (B, f, 4, n) components."""
    a, d = covariance[:, :, 0] + math.sqrt(eps), covariance[:, :, 1] + math.sqrt(eps)
    b_re, b_im = covariance[:, :, 2], covariance[:, :, 3]
    inv_det = 1 / (a * d - (b_re * b_re + b_im * b_im))
    a, d, b_re, b_im = a * inv_det, d * inv_det, b_re * inv_det, b_im * inv_det
    x0_re, x0_im, x1_re, x1_im = mixture.unbind(dim=2)
    return torch.stack([(d * x0_re).addcmul_(b_re, x1_re, value=-1).addcmul_(b_im, x1_im),
                        (d * x0_im).addcmul_(b_re, x1_im, value=-1).addcmul_(b_im, x1_re, value=-1),
                        (a * x1_re).addcmul_(b_re, x0_re, value=-1).addcmul_(b_im, x0_im, value=-1),
                        (a * x1_im).addcmul_(b_re, x0_im, value=-1).addcmul_(b_im, x0_re)], dim=2)
