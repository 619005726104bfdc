"""BSS Eval v4 (museval's "v4" images mode) on torch, vectorised over frames and sources.

What museval computes with ``museval.evaluate(refs, ests, win, hop)`` (mode v4), and so this
module, for references ``s_j`` and estimates ``e_j`` of shape (S, C, T):

- distortion filters of ``filters_len`` (512) taps are fitted ONCE on the whole track (v4; v3
  refits them per frame): the least-squares projection of every estimate channel onto all
  delayed reference channels (all sources: ``P_all``) and onto the delayed channels of its own
  reference only (``P_j``), from the Gram (block-Toeplitz) system ``(G + eps I) W = D``;
- per frame (``window`` samples every ``hop``; a trailing partial frame is dropped), the frame's
  references are filtered with those filters (a full convolution of the frame alone, restarted
  at the frame's start) and the estimate is split into
  ``s_true`` (the reference image), ``e_spat = P_j - s``, ``e_interf = P_all - P_j`` and
  ``e_artif = e - P_all``; then
  ``SDR = 10 log10(|s|^2 / |e - s|^2)``, ``ISR = 10 log10(|s|^2 / |P_j - s|^2)``,
  ``SIR = 10 log10(|P_j|^2 / |P_all - P_j|^2)``, ``SAR = 10 log10(|P_all|^2 / |e - P_all|^2)``
  (a zero denominator gives inf);
- a frame where any reference or any estimate is silent (its channel sum is zero at every
  sample) is NaN for every source and metric.

Note that the v4 SDR does not depend on the filters (the three error terms sum to ``e - s``), so
``sdr_only=True`` skips the filters and costs next to nothing, and SDR always agrees with museval
to rounding. ISR, SIR and SAR do depend on the filters, which are the solution of a Gram system
that is numerically singular when the references are band-limited (synthesizers, the toy
dataset, bass stems...): museval's own values then change by several dB when its input is
scaled by 1 + 1e-12, and no implementation can reproduce them; a warning is logged (once) then.

Here all cross-correlations come from blocked FFTs (every signal transformed once per block: the
reference blocks' zero-padded middles against the windows around them), the big Gram system is
solved once for all estimates (museval refactorises it per source), and the per-frame
projections of all frames and sources are batched products in the frequency domain, their
energies by Parseval; single-threaded, the correlation sums and the projections run over
cache-sized frequency tiles and small chunks of blocks and frames (buffers below glibc's mmap
threshold are reused; fresh ones cost a page fault per 4 KB: 0.1-0.7 s per 20 s track).
Per-bin matrix products (torch.bmm or einsum over frequencies, complex or as real blocks) were
tried for both: with a few rows per bin they cost more than the broadcast multiply-adds.
On the CPU the big system (4096 x 4096 for four stereo sources) is never formed: it is block
Toeplitz (the references delayed by 0..511 samples), and the block Schur algorithm factorises it
from its first block row in O(p^3 n^2) instead of Cholesky's O(p^3 n^3) (p = 8 signals, n = 512
delays: 0.07 s against 0.4-0.9 s for LAPACK's potrf on one thread), followed by one step of
iterative refinement against the exact system (products by FFT), after which its residual is
Cholesky's (1e-17 relative). A block Levinson solve was tried before it: on music-like
references, whose systems have condition numbers of 1e7-1e9, its residual is 1e-10 against
1e-15 for Cholesky. The own-source systems (the big one's diagonal blocks, 1024 x 1024) are
dense Cholesky solves, factorised in place by LAPACK's potrf/potrs (scipy, one BLAS thread):
``torch.linalg.cholesky_ex`` copies the matrix to column-major order and zeroes a triangle
afterwards (on a 4096 x 4096 system, one thread: 0.7-1.7 s against 0.4-0.8 s in place). So is
the big system on other devices, or when the Schur algorithm breaks down even after loading.
Where one thread's time goes on a 20 s four-source stereo track (bench/sdr.py --profile --threads 1,
wall seconds, quiet machine): correlations 0.24, systems' assembly 0.02, block Schur factor 0.07,
solve and refinement 0.05, own-source systems 0.04-0.07, projections 0.22 (about half of it the
frames' FFTs), framing and SDR 0.05.
Everything runs in float64 on the inputs' device; the evaluation loop passes CPU tensors.
"""
import logging
import math
import typing as tp

import numpy as np
import threadpoolctl
import torch
from scipy.linalg import lapack

from ..errors import DemixError

logger = logging.getLogger(__name__)

FILTERS_LEN = 512
SINGULAR_RCOND = 1e-10  # smallest / largest squared Cholesky pivot below which the system counts as singular
METRICS = ("sdr", "isr", "sir", "sar")
_EPS = float(np.finfo(np.float64).eps)  # museval's regularisation of the Gram matrix
_BLAS_THREADS = 1  # for the Gram solves (see _solve_lapack)
_DIAGONAL_LOADING = 16  # x N eps max(diagonal): what a rounding-singular Gram system is loaded with (see _solve_lapack)
_CORRELATION_FFT = 65536  # block FFT size for the track-long cross-correlations (see _lagged_correlations)
_CORRELATION_FFT_ONE_THREAD = 16384  # the same on one CPU thread
_CORRELATION_CHUNK = 1 << 17  # samples of FFT input per row transformed at once (see _FRAMES_PER_CHUNK)
# Frames projected at once (bounds memory on long tracks). On one CPU thread, small chunks keep
# every buffer below glibc's mmap threshold (32 MB), so that the allocator reuses them: a fresh
# mmap-ed buffer costs a page fault per 4 KB, and the faults were 0.1-0.7 s of system time per
# 20 s track with 16 frames and 1M-sample correlation chunks (155 000 faults; 47 000 now, of which
# 33 000 are the Gram matrix's own). On several threads the 4x as many ops (each a fork/join)
# cost more than the faults (2 threads, busy machine: 4.9 s against 4.0 s per 20 s track).
_FRAMES_PER_CHUNK = 16
_FRAMES_PER_CHUNK_ONE_THREAD = 4
_BINS_PER_TILE = 1024  # frequency bins per cache-sized tile (single-threaded only, see _tile_bins)
_warned_singular = False


def bss_eval_v4(references: torch.Tensor, estimates: torch.Tensor, window: int, hop: int,
                filters_len: int = FILTERS_LEN, sdr_only: bool = False) -> tp.Dict[str, torch.Tensor]:
    """Framewise BSS Eval v4 metrics of (S, C, T) estimates against (S, C, T) references.

    Returns ``{"sdr", "isr", "sir", "sar"}`` (only ``"sdr"`` with ``sdr_only``), each a float64
    (S, frames) tensor on the inputs' device, NaN for frames with a silent reference or estimate.
    """
    _check_inputs(references, estimates, window, hop, filters_len)
    window, hop, filters_len = int(window), int(hop), int(filters_len)
    device = estimates.device
    refs = references.to(device=device, dtype=torch.float64)
    ests = estimates.to(dtype=torch.float64)
    length = refs.shape[-1]
    if window < length:
        frames = (length - window + hop) // hop
        frame_len = window
    else:
        frames, frame_len = 1, length
    ref_frames = refs.unfold(-1, frame_len, hop)[..., :frames, :]  # (S, C, F, W)
    est_frames = ests.unfold(-1, frame_len, hop)[..., :frames, :]
    # Per chunk of frames, one work buffer for the error, the squares and the channel sums (no
    # track-sized temporaries; the same sums as (x ** 2).sum(), so the same rounding as before).
    error, signal, silent = [], [], []
    frames_per_chunk = _frames_per_chunk(device)
    for start in range(0, frames, frames_per_chunk):
        chunk = slice(start, start + frames_per_chunk)
        work = torch.sub(est_frames[:, :, chunk], ref_frames[:, :, chunk])  # (S, C, F, W)
        error.append(work.square_().sum(dim=(1, 3)))  # (S, F)
        signal.append(torch.mul(ref_frames[:, :, chunk], ref_frames[:, :, chunk], out=work).sum(dim=(1, 3)))
        silent.append(_silent(ref_frames[:, :, chunk], work) | _silent(est_frames[:, :, chunk], work))  # (F,)
    error, signal, silent = torch.cat(error, 1), torch.cat(signal, 1), torch.cat(silent)
    out = {"sdr": _safe_db(signal, error)}
    if not sdr_only:
        if bool(silent.all()):
            nan = torch.full_like(signal, math.nan)
            out.update(isr=nan, sir=nan.clone(), sar=nan.clone())
        else:
            out.update(_filtered_metrics(refs, ests, ref_frames, est_frames, signal, filters_len))
    for value in out.values():
        value[:, silent] = math.nan
    return out


def track_metrics(references: torch.Tensor, estimates: torch.Tensor, samplerate: int,
                  sources: tp.Sequence[str], sdr_only: bool = False) -> tp.Dict[str, tp.Dict[str, float]]:
    """One track's museval scores: median over 1 s frames (NaN frames dropped) per source.

    Same structure as :func:`demixlab.evaluation.metrics.museval_track`: metric -> source -> value.
    """
    if references.dim() != 3 or references.shape[0] != len(sources):
        raise DemixError(f"references must be (sources={len(sources)}, channels, time), "
                         f"got shape {tuple(references.shape)}")
    frames = bss_eval_v4(references, estimates, samplerate, samplerate, sdr_only=sdr_only)
    scores: tp.Dict[str, tp.Dict[str, float]] = {}
    for metric in METRICS:
        if metric in frames:
            values = frames[metric].cpu().numpy()
            scores[metric] = {source: _nanmedian(row) for source, row in zip(sources, values)}
    return scores


def _check_inputs(references: torch.Tensor, estimates: torch.Tensor, window: int, hop: int,
                  filters_len: int) -> None:
    if references.shape != estimates.shape or references.dim() != 3:
        raise DemixError(f"references and estimates must both be (sources, channels, time) of the same shape, "
                         f"got references {tuple(references.shape)} and estimates {tuple(estimates.shape)}")
    if references.shape[-1] == 0 or references.shape[0] == 0:
        raise DemixError(f"cannot evaluate empty signals of shape {tuple(references.shape)}")
    for name, value in (("window", window), ("hop", hop), ("filters_len", filters_len)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
            raise DemixError(f"{name} must be a positive number of samples, got {value!r}")


def _silent(frames: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """(S, C, F, W) -> (F,): whether any source is silent in the frame (museval's test: the
    channel sum is zero at every sample). ``work``: an (S, C, F, W) buffer to overwrite."""
    channel_sums = torch.sum(frames, dim=1, out=work[:, 0])
    return ~channel_sums.any(-1).all(0)


def _safe_db(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den == 0, torch.full_like(num, math.inf), 10 * torch.log10(num / den))


def _nanmedian(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else math.nan


def _filtered_metrics(refs: torch.Tensor, ests: torch.Tensor, ref_frames: torch.Tensor,
                      est_frames: torch.Tensor, signal: torch.Tensor,
                      filters_len: int) -> tp.Dict[str, torch.Tensor]:
    """ISR, SIR and SAR per source and frame (see the module docstring)."""
    sources, channels = refs.shape[:2]
    filters_all, filters_own = _distortion_filters(refs, ests, filters_len)
    frame_len = ref_frames.shape[-1]
    n_fft = _fast_size(frame_len + filters_len - 1)
    bins = n_fft // 2 + 1
    tile_bins = _tile_bins(bins, refs.device)
    # Spectra of the filters, (S_est, C_ref * S_ref, C_out, K) (pairs in the order of the
    # frames' (C, S) spectra below) and (S, C_ref, C_out, K).
    spec_all = _padded_rfft(filters_all.permute(0, 2, 1, 4, 3), n_fft)
    spec_all = spec_all.reshape(sources, channels * sources, channels, bins)
    spec_own = _padded_rfft(filters_own.permute(0, 1, 3, 2), n_fft)

    def energy(spectrum: torch.Tensor, low: int) -> torch.Tensor:  # (..., C, bins low:) -> (...)
        """n_fft x the energy that bins [low, low + tile) of real signals' rfft carry (Parseval:
        every bin counts twice but DC and, for an even n_fft, Nyquist). One fused norm: 15x
        faster than square-then-sum."""
        total = 2 * torch.linalg.vector_norm(torch.view_as_real(spectrum), dim=(-3, -2, -1)).square()
        if low == 0:
            total -= spectrum[..., 0].abs().square().sum(-1)
        if n_fft % 2 == 0 and low + spectrum.shape[-1] == bins:
            total -= spectrum[..., -1].abs().square().sum(-1)
        return total

    isr, sir, sar = [], [], []
    frames_per_chunk = _frames_per_chunk(refs.device)
    for start in range(0, ref_frames.shape[2], frames_per_chunk):
        chunk = slice(start, start + frames_per_chunk)
        ref_spec = _padded_rfft(ref_frames[:, :, chunk].permute(2, 1, 0, 3), n_fft)  # (F, C, S, K)
        est_spec = _padded_rfft(est_frames[:, :, chunk].permute(2, 0, 1, 3), n_fft)  # (F, S, C, K)
        flat = ref_spec.reshape(ref_spec.shape[0], channels * sources, 1, 1, bins)
        # Energies of P_j, P_all, e - P_all, P_all - P_j and P_j - s per (F, S), summed over
        # cache-sized frequency tiles (the projections never exist for the whole spectrum).
        energies = torch.zeros(5, ref_spec.shape[0], sources, dtype=torch.float64, device=refs.device)
        for low in range(0, bins, tile_bins):
            tile = slice(low, low + tile_bins)
            # Broadcast multiply-adds rather than einsum: see _lagged_correlations.
            proj_all = flat[:, 0, ..., tile] * spec_all[:, 0, ..., tile]  # (F, S_est, C_out, tile)
            for pair in range(1, channels * sources):
                proj_all.addcmul_(flat[:, pair, ..., tile], spec_all[:, pair, ..., tile])
            proj_own = ref_spec[:, 0, :, None, tile] * spec_own[:, 0, :, tile]  # (F, S, C_out, tile)
            for channel in range(1, channels):
                proj_own.addcmul_(ref_spec[:, channel, :, None, tile], spec_own[:, channel, :, tile])
            energies[0] += energy(proj_own, low)
            energies[1] += energy(proj_all, low)
            # The error terms in place, each operand's last use first: no temporaries.
            energies[2] += energy(est_spec[..., tile].sub_(proj_all), low)
            energies[3] += energy(proj_all.sub_(proj_own), low)
            energies[4] += energy(proj_own.sub_(ref_spec[..., tile].transpose(1, 2)), low)
        own, total, artif, interf, spatial = energies / n_fft
        sar.append(_safe_db(total, artif))
        sir.append(_safe_db(own, interf))
        isr.append(_safe_db(signal[:, chunk].T, spatial))
    return {"isr": torch.cat(isr).T.contiguous(), "sir": torch.cat(sir).T.contiguous(),
            "sar": torch.cat(sar).T.contiguous()}


def _distortion_filters(refs: torch.Tensor, ests: torch.Tensor,
                        filters_len: int) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Least-squares filters on the whole track.

    Returns (S_est, S_ref, C_ref, L, C_out) filters onto all references and (S, C_ref, L, C_out)
    filters of each estimate onto its own reference.
    """
    sources, channels, _ = refs.shape
    pairs = sources * channels
    lag = filters_len - 1
    correlations = _lagged_correlations([refs.reshape(pairs, -1), ests.reshape(pairs, -1)], lag)
    ref_correlations = correlations[:, :pairs]
    # rhs[(p, a), (s, c)] = <ref_p delayed by a, est_{s, c}> = corr[p, P + s*C + c, a]
    rhs = correlations[:, pairs:, lag:].permute(0, 2, 1).reshape(pairs * filters_len, pairs)
    # Each estimate onto its own reference only: the big system's diagonal blocks.
    own_gram = torch.stack([_dense_gram(ref_correlations[j * channels:(j + 1) * channels,
                                                         j * channels:(j + 1) * channels], filters_len)
                            for j in range(sources)])
    block = channels * filters_len
    own_rhs = torch.stack([rhs[j * block:(j + 1) * block, j * channels:(j + 1) * channels] for j in range(sources)])
    filters_own = _solve(own_gram, own_rhs, overwrite=True).reshape(sources, channels, filters_len, channels)
    if sources == 1:  # the same system: the same filters (e_interf exactly zero, SIR inf, as in museval)
        return filters_own[:, None], filters_own
    filters_all = _solve_block_toeplitz(ref_correlations, rhs) if refs.device.type == "cpu" else None
    if filters_all is None:  # not on the CPU, or the block Schur algorithm broke down twice
        filters_all = _solve(_dense_gram(ref_correlations, filters_len), rhs, overwrite=True)
    filters_all = filters_all.reshape(sources, channels, filters_len, sources, channels).permute(3, 0, 1, 2, 4)
    return filters_all.contiguous(), filters_own


def _dense_gram(correlations: torch.Tensor, filters_len: int) -> torch.Tensor:
    """The (P L, P L) Gram matrix of P signals delayed by 0..L-1 samples, regularised like
    museval's (+ eps on the diagonal), from their (P, P, 2 L - 1) lagged correlations
    (:func:`_lagged_correlations`)."""
    pairs, lag = correlations.shape[0], filters_len - 1
    # gram[(p, a), (q, b)] = <ref_p delayed by a, ref_q delayed by b> = corr[p, q, a - b]
    # = flipped[p, q, lag - a + b]: row a of every block is one contiguous slice of `flipped`
    # (filters_len slice copies beat one gather with computed indices 2x).
    flipped = correlations.flip(-1)
    gram = correlations.new_empty(pairs, filters_len, pairs, filters_len)
    for delay in range(filters_len):
        gram[:, delay].copy_(flipped[:, :, lag - delay:lag - delay + filters_len])
    gram = gram.reshape(pairs * filters_len, pairs * filters_len)
    gram.diagonal().add_(_EPS)
    return gram


def _solve_block_toeplitz(correlations: torch.Tensor, rhs: torch.Tensor) -> tp.Optional[torch.Tensor]:
    """CPU solve of the Gram system of :func:`_dense_gram` without forming it: the Cholesky factor
    of the block-Toeplitz matrix by the block Schur algorithm (:func:`_block_toeplitz_cholesky`),
    then one step of iterative refinement against the exact system (its product by FFTs).

    ``correlations`` (P, P, 2 L - 1), ``rhs`` (P L, M) in the (signal, delay) order of
    :func:`_dense_gram`. On four stereo references (a 4096 x 4096 system, one thread) this takes
    0.12 s against 0.4-0.5 s for potrf/potrs of the dense system, and its residual after
    refinement is the same (1e-17 relative). Warns like :func:`_solve` when the system is
    numerically singular: its squared pivots span more than 1 / SINGULAR_RCOND, or the Schur
    algorithm breaks down (on toy tracks with ever lower noise floors it still factorised at a
    pivot ratio of 1e-12 and broke down where potrf's was 1e-14). The system is then loaded like
    in :func:`_solve_lapack` and factorised again: the Tikhonov solution. Returns None when that
    breaks down too (the caller then solves the dense system).
    """
    pairs, _, span = correlations.shape
    filters_len = (span + 1) // 2
    size = pairs * filters_len
    first_row = _first_block_row(correlations)
    factor = torch.empty(size, size, dtype=torch.float64).numpy()  # torch's allocator: no huge-page compaction stalls
    diagonal_load = _EPS
    with threadpoolctl.threadpool_limits(_BLAS_THREADS, user_api="blas"):
        singular = not _block_toeplitz_cholesky(first_row, factor)
        if singular:
            loading = _DIAGONAL_LOADING * size * _EPS * float(np.diagonal(first_row[:, :pairs]).max())
            np.fill_diagonal(first_row[:, :pairs], np.diagonal(first_row[:, :pairs]) + loading)
            diagonal_load += loading
            if not _block_toeplitz_cholesky(first_row, factor):
                return None
        else:
            singular = _singular(torch.from_numpy(np.diagonal(factor).copy()))

        def solve(right: torch.Tensor) -> torch.Tensor:  # (P L, M) in (signal, delay) order
            permuted = right.reshape(pairs, filters_len, -1).transpose(0, 1).reshape(size, -1).numpy()
            solution = lapack.dpotrs(factor.T, permuted, lower=1)[0]  # factor.T: column-major, lower
            return torch.from_numpy(solution).reshape(filters_len, pairs, -1).transpose(0, 1).reshape(size, -1)

        solution = solve(rhs)
        solution += solve(rhs - _gram_product(correlations, solution, diagonal_load))
    if singular:
        _warn_singular()
    return solution


def _first_block_row(correlations: torch.Tensor) -> np.ndarray:
    """Block row 0 of :func:`_dense_gram`'s matrix in (delay, signal) order, where it is block
    Toeplitz: [B_0, ..., B_{L-1}] (P, L P) with B_k[p, q] = gram[(p, 0), (q, k)] = corr[p, q, -k]
    (+ eps on B_0's diagonal), from the (P, P, 2 L - 1) correlations (a fresh CPU array)."""
    pairs, _, span = correlations.shape
    filters_len = (span + 1) // 2
    first_row = correlations[..., :filters_len].flip(-1).permute(0, 2, 1).contiguous()  # (P, L, P)
    first_row[:, 0].diagonal().add_(_EPS)
    return first_row.reshape(pairs, pairs * filters_len).numpy()


def _gram_product(correlations: torch.Tensor, vectors: torch.Tensor, diagonal: float) -> torch.Tensor:
    """``(_dense_gram(correlations) - eps I + diagonal I) @ vectors`` by FFT convolutions:
    (P, P, 2 L - 1), (P L, M) -> (P L, M)."""
    pairs, _, span = correlations.shape
    filters_len = (span + 1) // 2
    n_fft = _fast_size(span)  # (gram @ x)[p, a] = sum_q,b corr[p, q, a - b] x[q, b]: lags a - b within +-(L - 1)
    columns = vectors.reshape(pairs, filters_len, -1).transpose(1, 2)  # (P, M, L)
    spectrum = torch.einsum("pqf,qmf->pmf", torch.fft.rfft(correlations, n=n_fft), torch.fft.rfft(columns, n=n_fft))
    product = torch.fft.irfft(spectrum, n=n_fft)[..., filters_len - 1:span]  # (P, M, L)
    return (product.transpose(1, 2).reshape(vectors.shape) + diagonal * vectors)


def _block_toeplitz_cholesky(first_row: np.ndarray, factor: np.ndarray) -> bool:
    """Upper Cholesky factor R (T = R^T R) of the symmetric block-Toeplitz matrix T with first
    block row ``first_row`` = [B_0, B_1, ..., B_{n-1}] (p, n p) (block (i, j) of T is B_{j-i},
    B_{-k} = B_k^T), by the block Schur algorithm: O(p^3 n^2) work instead of Cholesky's O(p^3 n^3).

    T - Z T Z^T (Z: the block shift) is G+^T G+ - G-^T G- with the 2p generator rows
    G+ = U^-T [B_0 .. B_{n-1}], G- = U^-T [0, B_1 .. B_{n-1}] (B_0 = U^T U). At step k a
    J-unitary transformation of the generator (J = diag(I, -I)) zeroes block k of G-; G+ is then
    block row k of R, and shifts one block right. The transformation, from the blocks P of G+
    and Q of G- (K = Q P^-1): G+ <- M^-T (P^T G+ - Q^T G-) with M^T M = P^T P - Q^T Q, and
    G- <- C^-T (G- - K G+) with C^T C = I - K K^T. Writes R's blocks on and above the block
    diagonal into ``factor`` (n p, n p) (the rest is left untouched; the diagonal blocks' lower
    triangles hold rounding-level values, which LAPACK's triangular solves do not read). Returns
    False when T is not numerically positive definite (a pivot's Cholesky fails).
    """
    p, size = first_row.shape
    cholesky, inverse = np.linalg.cholesky, np.linalg.inv
    try:
        np.matmul(inverse(cholesky(first_row[:, :p])), first_row, out=factor[:p])
        generator = np.empty((2 * p, size - p))  # G+ (shifted) over G-, blocks k .. n-1
        spare = np.empty_like(generator)
        generator[:p] = factor[:p, :size - p]
        generator[p:] = factor[:p, p:]
        identity = np.eye(p)
        top, bottom = np.empty((p, 2 * p)), np.empty((p, 2 * p))
        for k in range(1, size // p):
            width = size - k * p
            current = generator[:, :width]
            positive, negative = current[:p, :p], current[p:, :p]
            coefficients = negative @ inverse(positive)
            top[:, :p], top[:, p:] = positive.T, -negative.T
            bottom[:, :p], bottom[:, p:] = -coefficients, identity
            row = factor[k * p:(k + 1) * p, k * p:]
            np.matmul(inverse(cholesky(positive.T @ positive - negative.T @ negative)) @ top, current, out=row)
            if width > p:
                np.matmul(inverse(cholesky(identity - coefficients @ coefficients.T)) @ bottom, current[:, p:],
                          out=spare[p:, :width - p])
                spare[:p, :width - p] = row[:, :width - p]
                generator, spare = spare, generator
    except np.linalg.LinAlgError:
        return False
    return bool(np.isfinite(np.diagonal(factor)).all())


def _solve(matrix: torch.Tensor, rhs: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """Solve the symmetric positive (semi-)definite Gram system(s) by Cholesky; when that fails
    (singular to rounding), on the CPU by Cholesky of the diagonally loaded system (LU when even
    that fails), on other devices by LU.

    ``matrix`` (..., N, N), ``rhs`` (..., N, M). With ``overwrite``, a CPU ``matrix`` is used as
    the factorisation's workspace (LAPACK in place: no copies of the big system) and holds
    garbage afterwards. Warns (once per process) when the system is numerically singular: then
    ISR, SIR and SAR depend on rounding, in museval as here (SDR does not).
    """
    if matrix.device.type == "cpu":
        solution, singular = _solve_lapack(matrix if overwrite else matrix.clone(), rhs)
    else:
        solution, singular = _solve_torch(matrix, rhs)
    if singular:
        _warn_singular()
    return solution


def _warn_singular() -> None:
    """Log that a Gram system is numerically singular (a warning once per process)."""
    global _warned_singular
    logger.debug("BSS Eval v4: the distortion filters' Gram system is numerically singular")
    if not _warned_singular:
        _warned_singular = True
        logger.warning("BSS Eval v4: the references are band-limited enough that the distortion filters' "
                       "Gram system is numerically singular: ISR, SIR and SAR then depend on rounding (in "
                       "museval too; SDR does not). Compare SDR; read ISR/SIR/SAR with care.")


def _solve_torch(matrix: torch.Tensor, rhs: torch.Tensor) -> tp.Tuple[torch.Tensor, bool]:
    """The solve of :func:`_solve` by torch's kernels (CUDA and other devices), with the same
    fallbacks as :func:`_solve_lapack`: a system whose Cholesky factorisation fails is loaded
    with :data:`_DIAGONAL_LOADING` x N eps max(diagonal) and factorised again, and all are solved
    by LU only if that fails too. Returns the solution and whether any system was singular."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, factor), _singular(factor.diagonal(dim1=-2, dim2=-1))
    diagonal = matrix.diagonal(dim1=-2, dim2=-1)
    loading = _DIAGONAL_LOADING * matrix.shape[-1] * _EPS * diagonal.abs().amax(-1)
    loading = torch.where(info != 0, loading, torch.zeros_like(loading))  # only the systems that failed
    factor, info = torch.linalg.cholesky_ex(matrix + torch.diag_embed(loading.unsqueeze(-1).expand_as(diagonal)))
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, factor), True
    return torch.linalg.solve(matrix, rhs), True


def _singular(cholesky_diagonal: torch.Tensor) -> bool:
    """Whether a Cholesky factor's squared pivots span more than 1 / SINGULAR_RCOND."""
    pivots = cholesky_diagonal.pow(2)
    return bool((pivots.min(-1).values < SINGULAR_RCOND * pivots.max(-1).values).any())


def _solve_lapack(matrix: torch.Tensor, rhs: torch.Tensor) -> tp.Tuple[torch.Tensor, bool]:
    """CPU solve of (..., N, N) symmetric systems by LAPACK's potrf/potrs (on the diagonally loaded
    system when Cholesky fails, gesv when that fails too), factorising in place.

    ``torch.linalg.cholesky_ex`` copies the matrix to column-major order and zeroes its upper
    triangle afterwards: two extra passes over a 134 MB system. A C-contiguous symmetric matrix
    is its own column-major transpose, so potrf works on it where it lies. Returns the solution
    and whether any system was numerically singular.
    """
    matrix = matrix.contiguous()
    rhs = rhs.to(torch.float64)
    solutions, singular = [], False
    # One BLAS thread: two make the big system's potrf 2x faster on an idle machine, but next to
    # torch's OpenMP threads on a loaded one the whole evaluation went 2-3x slower (the pools
    # collide), and choosing by load would make the metrics depend on it (different rounding).
    with threadpoolctl.threadpool_limits(_BLAS_THREADS, user_api="blas"):
        for system, right in zip(matrix.reshape(-1, *matrix.shape[-2:]), rhs.reshape(-1, *rhs.shape[-2:])):
            diagonal = system.diagonal().clone()
            array = system.numpy().T  # column-major view, same values (symmetric)
            factor, info = lapack.dpotrf(array, lower=1, clean=0, overwrite_a=1)
            if info == 0:
                singular |= _singular(torch.from_numpy(factor.diagonal().copy()))
                solution, info = lapack.dpotrs(factor, right.numpy(), lower=1)
                solutions.append(torch.from_numpy(solution))
                continue
            # Not positive definite: singular to rounding (band-limited references), or truly
            # indefinite. potrf wrote only the view's lower triangle, i.e. this tensor's upper one:
            # mirror the intact lower triangle over it. A positive semi-definite system fails only
            # by rounding, of the order of N eps max(diagonal) (Cholesky's backward error): loaded
            # with a few times that, it factorises, and the loaded solution is the minimum-norm
            # one up to that (a Tikhonov solution). That costs one potrf more; LU (gesv) cost two.
            system.tril_(-1).add_(system.mT.triu(1))
            loading = _DIAGONAL_LOADING * system.shape[-1] * _EPS * float(diagonal.abs().max())
            system.diagonal().copy_(diagonal + loading)
            factor, info = lapack.dpotrf(array, lower=1, clean=0, overwrite_a=1)
            if info == 0:
                solution, info = lapack.dpotrs(factor, right.numpy(), lower=1)
            else:  # truly indefinite: restore it and solve by LU (sysv's LDL^T took about 3x longer)
                system.tril_(-1).add_(system.mT.triu(1)).diagonal().copy_(diagonal)
                solution = lapack.dgesv(array, right.numpy(), overwrite_a=1)[2]
            solutions.append(torch.from_numpy(solution))
            singular = True
    return torch.stack(solutions).reshape(rhs.shape), singular


def _lagged_correlations(signals: tp.Sequence[torch.Tensor], max_lag: int) -> torch.Tensor:
    """corr[p, q, max_lag + k] = sum_n signals[p, n] signals[q, n + k] for the rows p of the first
    tensor, the rows q of all (stacked) and |k| <= max_lag: (P, T), ... -> (P, Q, 2 max_lag + 1).

    By FFTs of short blocks summed in the frequency domain (the full-length FFT of a long track
    would need a (P, Q, T) product): block u of the first rows (``block`` samples, zero-padded)
    against samples [u*block - max_lag, (u+1)*block + max_lag) of every row (zero outside the
    track), one FFT of the latter per row and block; the former are its middle.
    """
    first_rows, length = signals[0].shape
    rows = sum(part.shape[0] for part in signals)
    device, dtype = signals[0].device, signals[0].dtype
    # Smaller blocks are cheaper on one thread (less to inverse-transform, cache-sized FFTs: 0.32
    # against 0.36 s for 32768 and 0.44 s for 65536, 20 s track); on several threads every op is
    # a fork/join and the 4x as many per-block ops of 16384 cost up to 2x on a busy machine.
    fft_size = _CORRELATION_FFT_ONE_THREAD if _single_cpu_thread(device) else _CORRELATION_FFT
    n_fft = max(fft_size, _fast_size(4 * max_lag + 2))
    block = n_fft - 2 * max_lag
    blocks = -(-length // block)
    bins = n_fft // 2 + 1
    tile_bins = _tile_bins(bins, device)
    per_chunk = max(1, _CORRELATION_CHUNK // n_fft)
    cross = torch.empty(first_rows, rows, bins, dtype=torch.complex128, device=device)
    for start in range(0, blocks, per_chunk):
        count = min(per_chunk, blocks - start)
        windows = torch.empty(rows, count, n_fft, dtype=dtype, device=device)
        for index in range(count):  # window of block start + index, zero outside the track
            begin = (start + index) * block - max_lag
            low, high = max(begin, 0), min(begin + n_fft, length)
            windows[:, index, :low - begin].zero_()
            row = 0
            for part in signals:
                windows[row:row + part.shape[0], index, low - begin:high - begin].copy_(part[:, low:high])
                row += part.shape[0]
            windows[:, index, high - begin:].zero_()
        long_spec = torch.fft.rfft(windows)
        short_spec = _padded_rfft(windows[:first_rows, :, max_lag:max_lag + block], n_fft).conj()  # lazy conj
        del windows
        # One broadcast multiply-add per block: a batched matmul over frequencies (einsum, or
        # torch.bmm on real or complex operands) costs more than the products (per-bin GEMMs
        # of a few rows are all overhead). Frequency tiles outermost keep the (P, Q, tile)
        # accumulator in cache over the blocks.
        for low in range(0, bins, tile_bins):
            tile = slice(low, low + tile_bins)
            accumulator = cross[:, :, tile]
            for index in range(count):
                first_tile = short_spec[:, index, None, tile]
                second_tile = long_spec[None, :, index, tile]
                if start == 0 and index == 0:
                    torch.mul(first_tile, second_tile, out=accumulator)
                else:
                    accumulator.addcmul_(first_tile, second_tile)
    return torch.fft.irfft(cross, n=n_fft)[..., :2 * max_lag + 1]


def _padded_rfft(signal: torch.Tensor, n_fft: int) -> torch.Tensor:
    """``torch.fft.rfft(signal, n=n_fft)`` of a (..., W <= n_fft) tensor (any strides), through a
    buffer of which only the padding is zeroed: torch's own padding zero-fills the whole buffer
    before copying the signal in (320 frames of 1 s at 45000 points: 0.175 s against 0.11 s)."""
    buffer = signal.new_empty(*signal.shape[:-1], n_fft)
    buffer[..., signal.shape[-1]:].zero_()
    buffer[..., :signal.shape[-1]].copy_(signal)
    return torch.fft.rfft(buffer)


def _tile_bins(bins: int, device: torch.device) -> int:
    """Frequency bins per tile: cache-sized on one CPU thread; the whole spectrum on several
    threads, where every op is an OpenMP fork/join and thousands of small ones cost more than the
    cache saves (2 threads on a busy 2-core machine: up to 2x slower than untiled), and on GPUs."""
    return min(_BINS_PER_TILE, bins) if _single_cpu_thread(device) else bins


def _frames_per_chunk(device: torch.device) -> int:
    """Frames processed at once: see _FRAMES_PER_CHUNK."""
    return _FRAMES_PER_CHUNK_ONE_THREAD if _single_cpu_thread(device) else _FRAMES_PER_CHUNK


def _single_cpu_thread(device: torch.device) -> bool:
    """Whether torch computes on one CPU thread (tiled, small-block code paths)."""
    return device.type == "cpu" and torch.get_num_threads() == 1


def _fast_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes the FFT handles fast)."""
    best = 1 << max(n - 1, 0).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            size = power35
            while size < n:
                size *= 2
            best = min(best, size)
            power35 *= 3
        power5 *= 5
    return best
