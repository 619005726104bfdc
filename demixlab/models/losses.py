"""Loss functions and objectives shared by model families.

An objective is called as `objective(model, mixture, sources)` with a possibly DDP-wrapped model,
and returns a dict of scalar tensors whose "loss" entry is minimised (see :mod:`.registry`).
"""
import functools
import itertools
import math
import typing as tp

import torch

from ..errors import DemixError

Objective = tp.Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tp.Dict[str, torch.Tensor]]


def non_negative(value: tp.Any, key: str) -> float:
    """`value` as a finite float >= 0, or a :class:`DemixError` naming `key`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise DemixError(f"{key} must be a non-negative number, got {value!r}")
    return number


def parse_source_weights(sources: tp.Sequence[str], weights: tp.Optional[tp.Mapping[str, float]],
                   key: str = "loss.source_weights") -> tp.List[float]:
    """Per-source loss weights in `sources` order from a {name: weight} mapping (missing: 1).

    Raises :class:`DemixError` naming `key` for unknown sources, negative or non-finite weights,
    or weights that are all zero.
    """
    weights = dict(weights or {})
    for name, value in weights.items():
        if name not in sources:
            raise DemixError(f"{key}: unknown source {name!r} (sources: {', '.join(sources)})")
        non_negative(value, f"{key}.{name}")
    values = [float(weights.get(name, 1.0)) for name in sources]
    if sum(values) <= 0:
        raise DemixError(f"{key}: at least one source must have a positive weight")
    return values


WAVEFORM_LOSSES = ("l1", "mse")


def build_waveform_objective(model: torch.nn.Module, *, loss: str = "l1",
                             source_weights: tp.Optional[tp.Mapping[str, float]] = None) -> Objective:
    """Objective on separated waveforms: L1 or MSE per source, weighted mean over sources.

    Reports `loss_<source>` (detached) for every source.
    """
    if loss not in WAVEFORM_LOSSES:
        raise DemixError(f"loss.loss={loss!r}: choose one of {', '.join(WAVEFORM_LOSSES)}")
    sources = list(model.sources)
    weights = parse_source_weights(sources, source_weights)

    def objective(model: torch.nn.Module, mixture: torch.Tensor, references: torch.Tensor
                  ) -> tp.Dict[str, torch.Tensor]:
        estimates = model(mixture)
        difference = estimates - references
        errors = difference.abs() if loss == "l1" else difference ** 2
        per_source = errors.mean(dim=(0, 2, 3))  # (S,)
        weight = torch.tensor(weights, dtype=per_source.dtype, device=per_source.device)
        metrics = {"loss": (per_source * weight).sum() / weight.sum()}
        for index, name in enumerate(sources):
            metrics[f"loss_{name}"] = per_source[index].detach()
        return metrics

    return objective


# ---------------------------------------------------------------------------- combination loss
# Estimates and references of a combination loss: one (B, S, ...) tensor, or a sequence of such
# tensors with the same S (e.g. the blocks of a ragged time-frequency transform).
Stack = tp.Union[torch.Tensor, tp.Sequence[torch.Tensor]]
# subset_loss(estimate, reference) -> scalar, on one subset's sums (same type as the Stack, no S dim).
SubsetLoss = tp.Callable[[tp.Any, tp.Any], torch.Tensor]
COMBINATIONS = ("all", "singles")


def source_subsets(count: int, combinations: str = "all") -> tp.List[tp.Tuple[int, ...]]:
    """The source subsets a combination loss compares, as sorted index tuples.

    "all": every non-empty proper subset of the `count` sources (2^count - 2; 14 for four),
    by size then in lexicographic order, so the singles come first; "singles": each source alone.
    """
    if combinations not in COMBINATIONS:
        raise DemixError(f"loss.combinations={combinations!r}: choose one of {', '.join(COMBINATIONS)}")
    sizes = range(1, count) if combinations == "all" else [1]
    subsets = [subset for size in sizes for subset in itertools.combinations(range(count), size)]
    if not subsets:
        raise DemixError(f"loss.combinations={combinations!r} needs at least two sources, got {count} source(s)")
    return subsets


def subset_matrix(subsets: tp.Sequence[tp.Sequence[int]], count: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The (K, count) 0/1 matrix whose row k marks the sources of subset k (built once per
    subsets, dtype and device, then reused)."""
    return _subset_matrix(tuple(tuple(subset) for subset in subsets), count, dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _subset_matrix(subsets: tp.Tuple[tp.Tuple[int, ...], ...], count: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    membership = torch.zeros(len(subsets), count, dtype=dtype)
    for row, subset in enumerate(subsets):
        membership[row, list(subset)] = 1
    return membership.to(device)


def subset_sums(stack: torch.Tensor, subsets: tp.Sequence[tp.Sequence[int]]) -> torch.Tensor:
    """(B, S, ...) -> (K, B, ...): for each of the K subsets, the sum of its sources."""
    membership = subset_matrix(subsets, stack.shape[1], stack.dtype, stack.device)
    # One contraction for all subsets: much cheaper, forward and backward, than indexing per subset.
    return torch.einsum("ks,bs...->kb...", membership, stack)


def subset_weights(subsets: tp.Sequence[tp.Sequence[int]], source_weights: tp.Optional[tp.Sequence[float]]
                   ) -> tp.Optional[tp.List[float]]:
    """Each subset's weight in a combination loss: the mean weight of its sources (None: all equal)."""
    if source_weights is None:
        return None
    return [sum(source_weights[index] for index in subset) / len(subset) for subset in subsets]


def _sums_per_subset(stack: Stack, subsets: tp.Sequence[tp.Sequence[int]]) -> tp.List[tp.Any]:
    """One entry per subset: a (B, ...) tensor, or for a sequence the list of its blocks' sums."""
    if isinstance(stack, torch.Tensor):
        return list(subset_sums(stack, subsets).unbind(0))
    blocks = [subset_sums(block, subsets).unbind(0) for block in stack]
    return [list(sums) for sums in zip(*blocks)]


def combination_loss(estimates: Stack, references: Stack, subset_loss: SubsetLoss,
                     combinations: tp.Union[str, tp.Sequence[tp.Sequence[int]]] = "all",
                     source_weights: tp.Optional[tp.Sequence[float]] = None) -> torch.Tensor:
    """Combination loss (Sawata et al., "All for one and one for all", ICASSP 2021).

    `subset_loss` compares the summed estimates with the summed references of every source subset
    (`combinations`: "all", "singles" or an explicit list of index tuples, see
    :func:`source_subsets`); the result is the mean over subsets. With `source_weights` (one per
    source) a subset weighs the mean weight of its sources and the mean is weighted.
    """
    first = estimates if isinstance(estimates, torch.Tensor) else estimates[0]
    count = first.shape[1]
    subsets = source_subsets(count, combinations) if isinstance(combinations, str) else \
        [tuple(subset) for subset in combinations]
    if not subsets:
        raise DemixError(f"a combination loss needs at least one source subset ({count} source(s), "
                         f"combinations={combinations!r})")
    losses = torch.stack([subset_loss(estimate, reference) for estimate, reference
                          in zip(_sums_per_subset(estimates, subsets), _sums_per_subset(references, subsets))])
    if source_weights is None:
        return losses.mean()
    if len(source_weights) != count:
        raise ValueError(f"expected {count} source weights, got {len(source_weights)}")
    weights = losses.new_tensor(subset_weights(subsets, source_weights))
    return (losses * weights).sum() / weights.sum()


def weighted_sdr_loss(estimate: torch.Tensor, reference: torch.Tensor, mixture: torch.Tensor,
                      eps: float = 1e-10) -> torch.Tensor:
    """Weighted SDR loss of Choi et al. ("Phase-aware speech enhancement with deep complex U-Net",
    ICLR 2019), in [-1, 1], -1 for a perfect estimate.

    Every (..., T) signal is a row: with y the reference, y' the estimate, n = x - y and
    n' = x - y' the rest of the mixture x, a row scores -a cos(y, y') - (1 - a) cos(n, n') with
    a = |y|^2 / (|y|^2 + |n|^2); the result is the mean over rows. `eps` guards silent rows, as in
    the X-UMX reference implementations.
    """
    def energy(x: torch.Tensor) -> torch.Tensor:
        return (x * x).sum(dim=-1)

    def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum(dim=-1) / ((eps + energy(x)).sqrt() * (eps + energy(y)).sqrt() + eps)

    noise, noise_estimate = mixture - reference, mixture - estimate
    alpha = energy(reference) / (energy(reference) + energy(noise) + eps)
    scores = -alpha * cosine(estimate, reference) - (1 - alpha) * cosine(noise_estimate, noise)
    return scores.mean()
