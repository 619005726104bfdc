"""Separation metrics and their aggregation.

Two definitions, always reported side by side and never mixed (SPEC section 5):

- the MDX global SDR ("nSDR"): per track and source,
  10 log10((sum ref^2 + eps) / (sum (ref - est)^2 + eps)), averaged over tracks;
- museval's BSS Eval v4 SDR: per source per 1 s frame, median over frames (NaN frames dropped)
  for a track, then median over tracks.
"""
import math
import typing as tp

import numpy as np
import torch

GLOBAL_SDR_EPS = 1e-7

TrackScores = tp.Dict[str, tp.Dict[str, float]]  # metric -> source -> value


def global_sdr(references: torch.Tensor, estimates: torch.Tensor, eps: float = GLOBAL_SDR_EPS) -> torch.Tensor:
    """MDX global SDR in dB of (..., S, C, T) estimates against references; returns (..., S)."""
    references = references.double()
    estimates = estimates.double()
    signal = references.pow(2).sum(dim=(-2, -1))
    error = (references - estimates).pow(2).sum(dim=(-2, -1))
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
