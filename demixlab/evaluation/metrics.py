"""Separation metrics and their aggregation.

Two definitions, always reported side by side and never mixed:

- the MDX global SDR ("nSDR"): per track and source,
  10 log10((sum ref^2 + eps) / (sum (ref - est)^2 + eps)), averaged over tracks;
- museval's BSS Eval v4 SDR: per source per 1 s frame, median over frames (NaN frames dropped)
  for a track, then median over tracks.

The BSS Eval v4 metrics of a track come from one of three backends (:func:`track_scores`):
``torch`` (:mod:`demixlab.evaluation.bsseval`, far faster: SDR equal to museval's to rounding, ISR/SIR/SAR
too unless the references are band-limited enough to make museval's own values rounding noise),
``museval`` (the reference package itself) or ``check`` (torch, and museval as well to compare).
"""
import logging
import math
import typing as tp

import numpy as np
import torch

from ..errors import DemixError
from . import bsseval

logger = logging.getLogger(__name__)

GLOBAL_SDR_EPS = 1e-7
_SDR_BLOCK = 2 ** 20  # samples per block of the global SDR's sums
SDR_BACKENDS = ("torch", "museval", "check")
CHECK_TOLERANCE_DB = 0.01  # largest torch-vs-museval difference `check` accepts silently

TrackScores = tp.Dict[str, tp.Dict[str, float]]  # metric -> source -> value


def global_sdr(references: torch.Tensor, estimates: torch.Tensor, eps: float = GLOBAL_SDR_EPS) -> torch.Tensor:
    """MDX global SDR in dB of (..., S, C, T) estimates against references; returns (..., S).

    The energies are summed in float64, a block of samples at a time, so the memory used does
    not grow with the track's length.
    """
    blocks = (estimates[..., start:start + _SDR_BLOCK] for start in range(0, estimates.shape[-1], _SDR_BLOCK))
    return streamed_global_sdr(references, blocks, eps)


def streamed_global_sdr(references: torch.Tensor, estimates: tp.Iterable[torch.Tensor],
                        eps: float = GLOBAL_SDR_EPS) -> torch.Tensor:
    """:func:`global_sdr` of (..., S, C, T) references against estimates that arrive as consecutive
    (..., S, C, n) blocks (a streamed separation: the whole estimate never exists at once)."""
    signal = references.new_zeros(references.shape[:-2], dtype=torch.float64)
    error = torch.zeros_like(signal)
    position = 0
    for block in estimates:
        for start in range(0, block.shape[-1], _SDR_BLOCK):
            estimate = block[..., start:start + _SDR_BLOCK]
            reference = references[..., position:position + estimate.shape[-1]].double()
            estimate = estimate.to(reference.device).double()
            signal += reference.pow(2).sum(dim=(-2, -1))
            error += (reference - estimate).pow(2).sum(dim=(-2, -1))
            position += estimate.shape[-1]
    if position != references.shape[-1]:
        raise ValueError(f"the estimate has {position} samples, the references {references.shape[-1]}")
    return 10 * torch.log10((signal + eps) / (error + eps))


def museval_track(references: torch.Tensor, estimates: torch.Tensor, samplerate: int,
                  sources: tp.Sequence[str]) -> TrackScores:
    """BSS Eval v4 (museval) for one track: (S, C, T) tensors; 1 s windows and hops.

    Returns the median over frames of SDR, SIR, ISR and SAR per source, as museval reports a
    track. All sources are evaluated together, as museval does.
    """
    import museval  # lazily: importing it needs ffmpeg on PATH

    refs = references.transpose(1, 2).double().cpu().numpy()  # (S, T, C)
    ests = estimates.transpose(1, 2).double().cpu().numpy()
    sdr, isr, sir, sar = museval.evaluate(refs, ests, win=samplerate, hop=samplerate)
    scores: TrackScores = {}
    for metric, values in (("sdr", sdr), ("sir", sir), ("isr", isr), ("sar", sar)):
        scores[metric] = {source: _nanmedian(row) for source, row in zip(sources, values)}
    return scores


def check_sdr_backend(backend: tp.Any, key: str = "test.sdr_backend") -> str:
    """Return `backend` if it names a BSS Eval backend, else raise a DemixError naming `key`."""
    if backend not in SDR_BACKENDS:
        raise DemixError(f"{key} must be one of {', '.join(SDR_BACKENDS)}, got {backend!r}")
    return backend


def track_scores(references: torch.Tensor, estimates: torch.Tensor, samplerate: int,
                 sources: tp.Sequence[str], backend: str = "torch") -> TrackScores:
    """BSS Eval v4 of one track, (S, C, T) tensors: median over 1 s frames of SDR/SIR/ISR/SAR.

    backend: ``torch`` (:mod:`.bsseval`, on the inputs' device), ``museval`` (the reference
    package, CPU) or ``check`` (the torch numbers, also computed with museval: the largest
    difference per metric is logged, as a warning when SDR differs by more than
    CHECK_TOLERANCE_DB; ISR/SIR/SAR can legitimately differ on band-limited audio, see
    :mod:`.bsseval`).
    """
    check_sdr_backend(backend, "backend")
    if references.shape != estimates.shape:
        raise DemixError(f"references and estimates must have the same shape, got references "
                         f"{tuple(references.shape)} and estimates {tuple(estimates.shape)}")
    if backend == "museval":
        return museval_track(references, estimates, samplerate, sources)
    scores = bsseval.track_metrics(references, estimates, samplerate, sources)
    if backend == "check":
        expected = museval_track(references, estimates, samplerate, sources)
        differences = {metric: max_difference({metric: scores[metric]}, {metric: expected[metric]})
                       for metric in expected}
        text = ", ".join(f"{metric.upper()} {value:.2e}" for metric, value in differences.items())
        if not differences["sdr"] <= CHECK_TOLERANCE_DB:
            logger.warning("BSS Eval check: torch and museval SDR differ by more than %g dB: %s",
                           CHECK_TOLERANCE_DB, text)
        else:
            logger.info("BSS Eval check: largest |torch - museval| per metric in dB: %s", text)
    return scores


def max_difference(first: TrackScores, second: TrackScores) -> float:
    """Largest |difference| in dB between two tracks' scores.

    Equal infinities and two NaNs count as 0; a value missing on one side, or a NaN or infinity
    against anything else, as inf.
    """
    largest = 0.0
    keys = {(metric, source) for scores in (first, second) for metric in scores for source in scores[metric]}
    for metric, source in keys:
        a = first.get(metric, {}).get(source)
        b = second.get(metric, {}).get(source)
        if a is None or b is None:
            return math.inf
        if a == b or (math.isnan(a) and math.isnan(b)):
            continue
        if not (math.isfinite(a) and math.isfinite(b)):
            return math.inf
        largest = max(largest, abs(a - b))
    return largest


def _nanmedian(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else math.nan


def aggregate(tracks: tp.Sequence[TrackScores], sources: tp.Sequence[str]) -> tp.Dict[str, float]:
    """Dataset scores from per-track scores.

    `nsdr` (global SDR) is the mean over tracks; museval metrics (`sdr`, `sir`, `isr`, `sar`) the
    median over tracks. Keys: `<metric>_<source>` per source and `<metric>` for the mean over sources.
    """
    out: tp.Dict[str, float] = {}
    metrics = sorted({metric for track in tracks for metric in track})
    for metric in metrics:
        per_source = []
        for source in sources:
            values = np.array([track[metric][source] for track in tracks if metric in track], dtype=np.float64)
            if metric == "nsdr":
                value = float(values.mean())
            else:
                value = _nanmedian(values)
            out[f"{metric}_{source}"] = value
            per_source.append(value)
        out[metric] = float(np.mean(per_source))
    return out


def format_table(scores: tp.Dict[str, float], sources: tp.Sequence[str],
                 metrics: tp.Sequence[tp.Tuple[str, str]] = (("sdr", "SDR museval"), ("nsdr", "SDR global"))) -> str:
    """A plain-text table: one row per source plus the mean, one column per available metric."""
    columns = [(key, title) for key, title in metrics if key in scores]
    width = max(len("source"), max(len(source) for source in sources), len("mean"))
    header = "  ".join([f"{'source':<{width}}"] + [f"{title:>12}" for _, title in columns])
    lines = [header, "-" * len(header)]
    for name, suffix in [(source, f"_{source}") for source in sources] + [("mean", "")]:
        cells = [f"{scores[key + suffix]:>12.3f}" for key, _ in columns]
        lines.append("  ".join([f"{name:<{width}}"] + cells))
    return "\n".join(lines)
