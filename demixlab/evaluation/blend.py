"""Fitting a bag's per-source weights on validation tracks (`demixlab blend`).

A bag's stem is `sum_m v[m] * est_m` with `v` the model weights normalised to sum to 1 (see
:mod:`demixlab.release.repository`). Its MDX global SDR on a track,
`10 log10((|r|^2 + eps) / (|r - sum_m v[m] est_m|^2 + eps))`, depends on the estimates only through
the Gram matrix of `[r, est_1, ..., est_M]`:

    |r - sum_m v[m] est_m|^2 = |r|^2 - 2 sum_m v[m] <r, est_m> + sum_mn v[m] v[n] <est_m, est_n>

So every validation track is separated once per model, reduced to one small Gram matrix per
source (float64, a block of samples at a time, like :func:`.metrics.global_sdr`), and each
candidate weight vector then costs a few multiply-adds per track: the search is exact (the same
number :func:`.metrics.global_sdr` gives the blended estimate, up to rounding) and needs no
estimate kept in memory. Sources are independent: each gets its own weights, searched on a grid
of the simplex with step `1/divisions` (every model alone, i.e. each one-hot vector, is a grid
point, so the bag never scores below its best member on the tracks it was fitted on).
"""
import itertools
import logging
import math
import typing as tp
from dataclasses import dataclass, field

import torch

from ..data import TrackDataset
from ..errors import DemixError
from .metrics import GLOBAL_SDR_EPS

logger = logging.getLogger(__name__)

Separate = tp.Callable[[torch.Tensor], torch.Tensor]  # (C, T) mixture -> (S_m, C, T) estimates
MAX_CANDIDATES = 500_000
_BLOCK = 2 ** 20  # samples per block of the Gram sums


@dataclass
class BlendStatistics:
    """Per source, the Gram matrices of the validation tracks: `gram[source]` is (tracks, K+1, K+1)
    over [reference, estimates of `models[source]` (the models that separate it, K of them)]."""

    sources: tp.List[str]
    models: tp.Dict[str, tp.List[str]]
    gram: tp.Dict[str, torch.Tensor] = field(default_factory=dict)
    tracks: tp.List[str] = field(default_factory=list)

    def scores(self, source: str, weights: torch.Tensor) -> torch.Tensor:
        """Mean over tracks of the global SDR (dB) of the blends `weights` (N, K) of `source`
        (each row normalised to sum to 1 by the blend); returns (N,)."""
        gram = self.gram[source]
        weights = weights.to(torch.float64)
        weights = weights / weights.sum(dim=1, keepdim=True)
        energy = gram[:, 0, 0]  # (T,)
        cross = gram[:, 0, 1:]  # (T, K)
        products = gram[:, 1:, 1:]  # (T, K, K)
        error = (energy[None] - 2 * weights @ cross.T
                 + torch.einsum("nk,tkl,nl->nt", weights, products, weights)).clamp_min(0)
        return (10 * torch.log10((energy[None] + GLOBAL_SDR_EPS) / (error + GLOBAL_SDR_EPS))).mean(dim=1)


def blend_statistics(separators: tp.Mapping[str, Separate], model_sources: tp.Mapping[str, tp.Sequence[str]],
                     dataset: TrackDataset, dataset_sources: tp.Sequence[str], sources: tp.Sequence[str],
                     log_name: str = "Blend") -> BlendStatistics:
    """Separate every track of `dataset` once with every model and reduce it to Gram matrices.

    Args:
        separators: model name -> (C, T) mixture -> (S_m, C, T) estimates in `model_sources[name]` order.
        dataset: items (name, mixture (C, T), references in `dataset_sources` order).
        sources: the sources to fit (each in the dataset and separated by at least one model).
    """
    models = {source: [name for name in separators if source in model_sources[name]] for source in sources}
    for source, names in models.items():
        if not names:
            raise DemixError(f"no model separates {source!r}")
    stats = BlendStatistics(sources=list(sources), models=models)
    grams: tp.Dict[str, tp.List[torch.Tensor]] = {source: [] for source in sources}
    for index in range(len(dataset)):
        name, mixture, references = dataset[index]
        estimates: tp.Dict[str, torch.Tensor] = {}
        for model_name, separate in separators.items():
            with torch.no_grad():
                estimate = separate(mixture)
            expected = (len(model_sources[model_name]), *mixture.shape)
            if tuple(estimate.shape) != expected:
                raise DemixError(f"model {model_name!r} returned estimates of shape {tuple(estimate.shape)} for a "
                                 f"mixture of shape {tuple(mixture.shape)} (expected {expected})")
            estimates[model_name] = estimate.float().cpu()
        for source in sources:
            signals = [references[list(dataset_sources).index(source)]]
            signals += [estimates[model][list(model_sources[model]).index(source)] for model in models[source]]
            grams[source].append(_gram(torch.stack(signals)))
        stats.tracks.append(name)
        logger.info("%s | track %d/%d %s separated by %d model(s)", log_name, index + 1, len(dataset), name,
                    len(separators))
    if not stats.tracks:
        raise DemixError("no validation tracks to fit the weights on")
    stats.gram = {source: torch.stack(values) for source, values in grams.items()}
    return stats


def _gram(signals: torch.Tensor) -> torch.Tensor:
    """(K, C, T) signals -> (K, K) inner products, summed in float64 a block of samples at a time."""
    flat = signals.reshape(signals.shape[0], -1)
    gram = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64)
    for start in range(0, flat.shape[1], _BLOCK):
        block = flat[:, start:start + _BLOCK].double()
        gram += block @ block.T
    return gram


def simplex_grid(models: int, divisions: int) -> torch.Tensor:
    """Every weight vector of `models` non-negative multiples of 1/`divisions` summing to 1
    (each one-hot vector included), as a (N, models) float64 tensor."""
    count = math.comb(divisions + models - 1, models - 1)
    if count > MAX_CANDIDATES:
        raise DemixError(f"--step 1/{divisions} with {models} models gives {count} weight vectors per source "
                         f"(more than {MAX_CANDIDATES}): use a larger step")
    rows = []
    for bars in itertools.combinations(range(divisions + models - 1), models - 1):  # stars and bars
        edges = (-1, *bars, divisions + models - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(models)])
    return torch.tensor(rows, dtype=torch.float64) / divisions


@dataclass
class BlendFit:
    """The fitted weights and the validation scores behind them.

    Attributes:
        weights: source -> {model: weight} (weights of a source sum to 1; models lacking it absent).
        model_scores: model -> {source: mean global SDR} for the sources it separates.
        bag_scores: source -> mean global SDR of the blend with the fitted weights.
        tracks: the validation tracks' names.
    """

    weights: tp.Dict[str, tp.Dict[str, float]]
    model_scores: tp.Dict[str, tp.Dict[str, float]]
    bag_scores: tp.Dict[str, float]
    tracks: tp.List[str]


def fit_weights(stats: BlendStatistics, divisions: int = 10) -> BlendFit:
    """The best weights per source on the grid of step 1/`divisions` (see the module docstring)."""
    if divisions < 1:
        raise DemixError(f"the weight step must divide 1 into at least one part, got 1/{divisions}")
    weights: tp.Dict[str, tp.Dict[str, float]] = {}
    model_scores: tp.Dict[str, tp.Dict[str, float]] = {}
    bag_scores: tp.Dict[str, float] = {}
    for source in stats.sources:
        names = stats.models[source]
        alone = stats.scores(source, torch.eye(len(names), dtype=torch.float64))
        for name, score in zip(names, alone.tolist()):
            model_scores.setdefault(name, {})[source] = score
        grid = simplex_grid(len(names), divisions)
        scores = stats.scores(source, grid)
        best = int(torch.argmax(scores))
        weights[source] = {name: round(float(value), 12) for name, value in zip(names, grid[best].tolist())}
        bag_scores[source] = float(scores[best])
        logger.info("%s: %d weight vectors tried, best %s (%.3f dB; best model alone %.3f dB)", source, len(grid),
                    ", ".join(f"{name} {value:g}" for name, value in weights[source].items()), bag_scores[source],
                    float(alone.max()))
    return BlendFit(weights=weights, model_scores=model_scores, bag_scores=bag_scores, tracks=list(stats.tracks))


def format_blend_table(fit: BlendFit, models: tp.Sequence[str], bag_name: str) -> str:
    """Validation global SDR per source (and their mean) of each model and of the bag, then the
    weights; `-` where a model lacks a source."""
    sources = list(fit.bag_scores)
    width = max(12, *(len(name) + 2 for name in models), len(bag_name) + 8)
    header = f"{'':<{width}}" + "".join(f"{source:>10}" for source in sources) + f"{'mean':>10}"

    def row(label: str, values: tp.Mapping[str, float], mean: bool = True) -> str:
        cells = "".join(f"{values[source]:>10.3f}" if source in values else f"{'-':>10}" for source in sources)
        average = (f"{sum(values[s] for s in sources) / len(sources):>10.3f}" if mean and set(sources) <= set(values)
                   else f"{'-':>10}" if mean else "")
        return f"{label:<{width}}{cells}{average}"

    lines = ["validation global SDR (dB, mean over tracks)", header]
    lines += [row(name, fit.model_scores.get(name, {})) for name in models]
    lines.append(row(f"bag {bag_name}", fit.bag_scores))
    lines += ["weights", header.rstrip()[: width + 10 * len(sources)]]
    lines += [row(name, {source: fit.weights[source][name] for source in sources if name in fit.weights[source]},
                  mean=False) for name in models]
    return "\n".join(lines)
