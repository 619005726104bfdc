"""Multichannel Wiener filtering with EM refinement (norbert / Open-Unmix style).

Works on any complex time-frequency representation laid out as (B, C, F, N): STFTs, or one
block of a sliced constant-Q transform.

Stereo inference (no autograd) takes a faster path with the same results within float rounding:
everything but the rescaling (which looks at a whole window) is independent per frequency bin,
so on CPU each window is filtered in tiles of a few dozen bins, whose dozen elementwise passes
per EM step run on data that stays in the core's cache (tiles run side by side on torch's
threads, one intra-op thread each: :mod:`demixlab.threads`); and the complex numbers are held as real
components, so that the sums over frames and over sources are small batched matrix products.
Differentiable stereo calls (sliCQ-CDAE's training step) filter whole windows in real arithmetic
too (:func:`_wiener_stereo`, whose autograd graph has no complex kernels); other channel counts,
and soft masks or a residual source under autograd, filter whole windows in complex arithmetic.
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
            scale = torch.clamp(_peak_magnitude(window_mix) / scale_factor, min=1.0) if iterations > 0 else None
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
    mix = mix.unsqueeze(1)  # (B, 1, C, F, N), broadcasts against sources
    targets = targets.to(mix.real.dtype)
    if mix.shape[2] == 2 and iterations > 0 and not softmask and not residual:
        return _wiener_stereo(targets, mix[:, 0], iterations, scale_factor, eps)
    if softmask:
        sources = mix * (targets / (eps + targets.sum(dim=1, keepdim=True)))
    else:
        magnitudes, phases = torch.broadcast_tensors(targets, mix.angle())
        sources = torch.polar(magnitudes, phases)
    if residual:
        sources = torch.cat([sources, mix - sources.sum(dim=1, keepdim=True)], dim=1)
    if iterations == 0:
        return sources
    # EM is run on a rescaled problem (peak magnitude at most `scale_factor`, per example):
    # `eps` regularises the mixture covariance, so it only makes sense at a known scale.
    peak = mix.abs().amax(dim=(2, 3, 4), keepdim=True)
    scale = torch.clamp(peak / scale_factor, min=1.0)
    # EM works with channels last: (B, S, F, N, C) and (B, F, N, C).
    sources = (sources / scale).permute(0, 1, 3, 4, 2)
    mix = (mix / scale)[:, 0].permute(0, 2, 3, 1)
    for _ in range(iterations):
        sources = _em_step(sources, mix, eps)
    return sources.permute(0, 1, 4, 2, 3) * scale


def _wiener_stereo(targets: torch.Tensor, mix: torch.Tensor, iterations: int, scale_factor: float,
                   eps: float) -> torch.Tensor:
    """The EM path of :func:`_wiener_window` for two channels, in real arithmetic: magnitudes
    `targets` (B, S, C', F, N) with the phase of `mix` (B, 2, F, N), the same rescaling, then
    `iterations` EM steps (:func:`_em_filter_stereo`). Complex tensors only at the end: the
    autograd graph of the complex version promoted every real factor and ran complex kernels
    (sliCQ-CDAE's 70 blocks, forward and backward: 2.4x the time of this path on one CPU thread).

    The first step's statistics come from the magnitudes y: a source's power per channel is y^2
    and its cross term y_l y_r times the mixture's unit phasors u_l conj(u_r) (shared by sources).
    """
    peak = mix.abs().amax(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    scale = torch.clamp(peak / scale_factor, min=1.0)
    phase = mix.angle()  # (B, 2, F, N)
    cos, sin = torch.cos(phase), torch.sin(phase)
    magnitude = targets / scale.unsqueeze(1)
    left, right = magnitude[:, :, 0], magnitude[:, :, -1]  # (B, S, F, N); C' = 1: the same
    cross = left * right
    phasors = (cos[:, 0] * cos[:, 1] + sin[:, 0] * sin[:, 1], sin[:, 0] * cos[:, 1] - cos[:, 0] * sin[:, 1])
    mix = mix / scale
    mixture = (mix.real[:, 0], mix.imag[:, 0], mix.real[:, 1], mix.imag[:, 1])
    gain = scale.view(-1, 1, 1)  # the last step scales its (B, F, N) filter back instead of the sources
    sources = _em_filter_stereo(left.square(), right.square(), cross * phasors[0].unsqueeze(1),
                                cross * phasors[1].unsqueeze(1), mixture, eps, gain if iterations == 1 else None)
    for iteration in range(1, iterations):
        sources = _em_step_stereo(sources, mixture, eps, gain if iteration == iterations - 1 else None)
    # (B, S, F, 4, N) -> (B, S, 2, F, N, 2): channels, then real and imaginary parts last.
    sources = sources.unflatten(3, (2, 2)).permute(0, 1, 3, 2, 5, 4).contiguous()
    return torch.view_as_complex(sources)


def _em_step_stereo(sources: torch.Tensor, mix: tp.Sequence[torch.Tensor], eps: float,
                    gain: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`_em_step` for two channels on real and imaginary parts: sources (B, S, F, 4, N)
    (left real, left imaginary, right real, right imaginary) and the mixture's parts, each
    (B, F, N) (`gain`: see :func:`_em_filter_stereo`)."""
    left_real, left_imag, right_real, right_imag = sources.unbind(3)
    return _em_filter_stereo(left_real.square() + left_imag.square(), right_real.square() + right_imag.square(),
                             left_real * right_real + left_imag * right_imag,
                             left_imag * right_real - left_real * right_imag, mix, eps, gain)


def _em_filter_stereo(power_left: torch.Tensor, power_right: torch.Tensor, cross_real: torch.Tensor,
                      cross_imag: torch.Tensor, mix: tp.Sequence[torch.Tensor], eps: float,
                      gain: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
    """One EM update for two channels from the sources' powers |s_l|^2, |s_r|^2 and cross terms
    s_l conj(s_r) (real and imaginary parts), each (B, S, F, N); the mixture as in
    :func:`_em_step_stereo`. Returns the new sources (B, S, F, 4, N) (left real, left imaginary,
    right real, right imaginary), times `gain` (B, 1, 1) when given (applied to the filter).

    The model and filter of :func:`_em_step` with the 2 x 2 covariances kept as their entries:
    a source's spatial covariance [[r_ll, r_lr], [conj(r_lr), r_rr]] (real diagonal), the
    mixture's [[a, b], [conj(b), d]] (Hermitian: a real determinant). The sums over sources and
    the filters applied to the whitened mixture are batched products over (B, F).
    """
    x_left_real, x_left_imag, x_right_real, x_right_imag = mix
    psd = (power_left + power_right) / 2
    weight = eps + psd.sum(dim=-1)  # (B, S, F)
    # r_ll, r_rr, Re r_lr, Im r_lr: (B, S, F, 4)
    spatial = torch.stack([power_left.sum(dim=-1), power_right.sum(dim=-1), cross_real.sum(dim=-1),
                           cross_imag.sum(dim=-1)], dim=-1) / weight.unsqueeze(-1)
    a, d, b_real, b_imag = torch.einsum("bsfk,bsfn->kbfn", spatial, psd).unbind(0)  # (B, F, N) each
    a, d = a + math.sqrt(eps), d + math.sqrt(eps)
    inv_det = 1 / (a * d - (b_real.square() + b_imag.square()))
    if gain is not None:
        inv_det = inv_det * gain
    # The mixture whitened by its covariance: (d x_l - b x_r, a x_r - conj(b) x_l) / det, (B, F, 4, N).
    white = torch.stack([d * x_left_real - (b_real * x_right_real - b_imag * x_right_imag),
                         d * x_left_imag - (b_real * x_right_imag + b_imag * x_right_real),
                         a * x_right_real - (b_real * x_left_real + b_imag * x_left_imag),
                         a * x_right_imag - (b_real * x_left_imag - b_imag * x_left_real)], dim=2)
    white = white * inv_det.unsqueeze(2)
    # R_j as a real 4 x 4 map on (left real, left imaginary, right real, right imaginary).
    r_ll, r_rr, r_real, r_imag = spatial.unbind(-1)
    zero = torch.zeros_like(r_ll)
    spatial_map = torch.stack([torch.stack([r_ll, zero, r_real, -r_imag], dim=-1),
                               torch.stack([zero, r_ll, r_imag, r_real], dim=-1),
                               torch.stack([r_real, r_imag, r_rr, zero], dim=-1),
                               torch.stack([-r_imag, r_real, zero, r_rr], dim=-1)], dim=-2)  # (B, S, F, 4, 4)
    return torch.einsum("bsfck,bfkn->bsfcn", spatial_map, white) * psd.unsqueeze(3)


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


def _peak_magnitude(mix: torch.Tensor) -> torch.Tensor:
    """Largest magnitude of each example of a (B, ...) complex tensor, (B,): located by the squared
    magnitudes (cheaper than `abs` everywhere), then the magnitude of that element."""
    flat = mix.reshape(mix.shape[0], -1)
    index = (flat.real ** 2 + flat.imag ** 2).argmax(dim=1, keepdim=True)
    return flat.gather(1, index).abs()[:, 0]


@functools.lru_cache(maxsize=8)
def _stereo_maps(dtype: torch.dtype, device: torch.device) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Linear maps from the flattened 4x4 Gram matrix of a source's components (re0, im0, re1, im1)
    over frames to (1) its spatial covariance R as a 4x4 real matrix acting on components, and
    (2) the entries (R00, R11, Re R01, Im R01); both before the division by the weight."""
    to_matrix = torch.zeros(16, 16, dtype=dtype, device=device)
    # R00 = G00 + G11, R11 = G22 + G33, Re R01 = G02 + G13, Im R01 = G12 - G03.
    terms = {"r00": [(0, 1.0), (5, 1.0)], "r11": [(10, 1.0), (15, 1.0)], "re": [(2, 1.0), (7, 1.0)],
             "im": [(6, 1.0), (3, -1.0)]}
    # The complex product y = R x on components: rows (y0re, y0im, y1re, y1im).
    layout = [[("r00", 1), None, ("re", 1), ("im", -1)],
              [None, ("r00", 1), ("im", 1), ("re", 1)],
              [("re", 1), ("im", 1), ("r11", 1), None],
              [("im", -1), ("re", 1), None, ("r11", 1)]]
    for row in range(4):
        for col in range(4):
            if layout[row][col] is not None:
                name, sign = layout[row][col]
                for gram_index, value in terms[name]:
                    to_matrix[gram_index, row * 4 + col] += sign * value
    to_entries = to_matrix[:, [0, 10, 2, 6]].clone()
    return to_matrix, to_entries


def _stereo_tile(targets: torch.Tensor, mix: torch.Tensor, iterations: int, softmask: bool, residual: bool,
                 scale: tp.Optional[torch.Tensor], eps: float, out: torch.Tensor) -> None:
    """:func:`_wiener_window` for stereo on the bins and frames of one tile, in real arithmetic:
    (B, S, C', f, n) targets and a (B, 2, f, n) complex mixture -> complex sources written into
    `out`, (B, f, S + residual, 2, n).

    Complex stereo vectors are held as 4 real components (re0, im0, re1, im1) on an axis before
    the frames: sources (B, f, S, 4, n), mixture (B, f, 4, n), so that the sums over frames and
    over sources are small batched matrix products.
    """
    batch, _, bins, frames = mix.shape
    count = targets.shape[1]
    real = mix.real.dtype
    mixture = torch.view_as_real(mix).permute(0, 2, 1, 4, 3).reshape(batch, bins, 4, frames)
    weights = targets.to(real).permute(0, 3, 1, 2, 4)  # (B, f, S, C', n)
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
    if iterations > 0 and scale is not None:
        tile_scale = scale.reshape(batch, 1, 1, 1, 1)
        sources.div_(tile_scale)
        mixture = mixture / tile_scale[..., 0]
        maps = _stereo_maps(real, mix.device)
        for _ in range(iterations - 1):
            sources = _stereo_em_step(sources, mixture, eps, maps)
        sources, gain = _stereo_em_step(sources, mixture, eps, maps, final=True)
        gain = (gain * tile_scale[..., 0]).unsqueeze(3)  # (B, f, S, 1, n)
    else:
        gain = None
    # Into the complex output, real and imaginary parts each a strided pass along the frames.
    parts = sources.view(batch, bins, count + residual, 2, 2, frames)
    halves = torch.view_as_real(out)
    for part in range(2):
        if gain is None:
            halves[..., part].copy_(parts[..., part, :])
        else:
            torch.mul(parts[..., part, :], gain, out=halves[..., part])


def _stereo_em_step(sources: torch.Tensor, mixture: torch.Tensor, eps: float,
                    maps: tp.Tuple[torch.Tensor, torch.Tensor], final: bool = False) -> tp.Any:
    """:func:`_em_step` for stereo in real components: sources (B, f, S, 4, n) and mixture
    (B, f, 4, n), components (re0, im0, re1, im1); returns the new sources in the same layout,
    or with `final` the filtered mixture R_j Cxx^-1 x and the PSD v_j (B, f, S, n) that
    multiplies it, for the caller to apply on the way out."""
    batch, bins, count, _, frames = sources.shape
    to_matrix, to_entries = maps
    # PSD: the mean over channels of the squared magnitudes, (B, f, S, n).
    re0, im0, re1, im1 = sources.unbind(dim=3)
    psd = torch.mul(re0, re0).addcmul_(im0, im0).add_(torch.mul(re1, re1).addcmul_(im1, im1)).mul_(0.5)
    weight = (eps + psd.sum(dim=-1)).unsqueeze(-1)  # (B, f, S, 1)
    # Spatial covariance R (Hermitian) from the Gram matrix of the components over frames.
    gram = (sources @ sources.transpose(-1, -2)).view(batch, bins, count, 16)
    filters = (gram @ to_matrix).div_(weight)  # R as (B, f, S, 16): a 4x4 map on components
    spatial = (gram @ to_entries).div_(weight)  # (B, f, S, 4): R00, R11, Re R01, Im R01
    # Mixture covariance sum_j v_j R_j + sqrt(eps) I per bin and frame: a, d real, b = C01.
    cov = spatial.transpose(-1, -2) @ psd  # (B, f, 4, n)
    a, d = cov[:, :, 0] + math.sqrt(eps), cov[:, :, 1] + math.sqrt(eps)
    b_re, b_im = cov[:, :, 2], cov[:, :, 3]
    inv_det = 1 / (a * d - (b_re * b_re + b_im * b_im))
    a, d, b_re, b_im = a * inv_det, d * inv_det, b_re * inv_det, b_im * inv_det
    # Whitened mixture Cxx^-1 x = [d x0 - b x1, a x1 - conj(b) x0] / det.
    x0_re, x0_im, x1_re, x1_im = mixture.unbind(dim=2)
    whitened = torch.empty_like(mixture)
    w0_re, w0_im, w1_re, w1_im = whitened.unbind(dim=2)
    torch.mul(d, x0_re, out=w0_re).addcmul_(b_re, x1_re, value=-1).addcmul_(b_im, x1_im)
    torch.mul(d, x0_im, out=w0_im).addcmul_(b_re, x1_im, value=-1).addcmul_(b_im, x1_re, value=-1)
    torch.mul(a, x1_re, out=w1_re).addcmul_(b_re, x0_re, value=-1).addcmul_(b_im, x0_im, value=-1)
    torch.mul(a, x1_im, out=w1_im).addcmul_(b_re, x0_im, value=-1).addcmul_(b_im, x0_re)
    # v_j R_j (Cxx^-1 x), all sources in one product.
    filtered = (filters.view(batch, bins, count * 4, 4) @ whitened).view(batch, bins, count, 4, frames)
    if final:
        return filtered, psd
    return filtered.mul_(psd.unsqueeze(3))
