"""Loss functions and objectives shared by model families.

An objective is called as `objective(model, mixture, sources)` with a possibly DDP-wrapped model,
and returns a dict of scalar tensors whose "loss" entry is minimised (see models/registry.py).
"""
import math
import typing as tp

import torch

from .errors import DemixError

Objective = tp.Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tp.Dict[str, torch.Tensor]]


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
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number >= 0):
            raise DemixError(f"{key}.{name} must be a non-negative number, got {value!r}")
    values = [float(weights.get(name, 1.0)) for name in sources]
    if sum(values) <= 0:
        raise DemixError(f"{key}: at least one source must have a positive weight")
    return values


def check_options(options: tp.Mapping[str, tp.Any], allowed: tp.Sequence[str], family: str) -> None:
    """Reject `loss.*` options an objective does not take, naming the first unknown one."""
    unknown = [name for name in options if name not in allowed]
    if unknown:
        raise DemixError(f"unknown loss option loss.{unknown[0]} for model family {family} "
                         f"(valid: {', '.join(allowed) or 'none'})")


WAVEFORM_LOSSES = ("l1", "mse")


def build_waveform_objective(model: torch.nn.Module, family: str, loss: str = "l1",
                             source_weights: tp.Optional[tp.Mapping[str, float]] = None) -> Objective:
    """Objective on separated waveforms: L1 or MSE per source, weighted mean over sources.

    Reports `loss_<source>` (detached) for every source.
    """
    if loss not in WAVEFORM_LOSSES:
        raise DemixError(f"loss.loss={loss!r} for model family {family}: choose one of {', '.join(WAVEFORM_LOSSES)}")
    sources = list(getattr(model, "sources"))
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
