"""Fine-tuning options (`finetune:`): frozen parameters and low-rank adapters (LoRA).

- `finetune.freeze`: glob patterns of parameter names (as in the family's state dict, e.g.
  `encoder.*`) kept fixed: `requires_grad` is turned off, so the optimizer never sees them.
- `finetune.lora`: low-rank adapters on the `nn.Linear`, `nn.Conv1d` and `nn.Conv2d` layers whose
  module names match `targets`. Each adapted weight becomes `W + (alpha / rank) * B @ A` (reshaped
  to W's shape for convolutions), with `A` (rank x fan-in, random) and `B` (out x rank, zeros: the
  adapted model starts as the base model) the only trained parameters: every base parameter is
  frozen. The update is a `torch.nn.utils.parametrize` parametrization, so it applies wherever
  the model reads the weight (including `nn.MultiheadAttention`'s projections).

While training, the model's state dict holds `X.parametrizations.weight.original` and the
adapter (`...weight.0.lora_A`, `lora_B`, `scale`) instead of `X.weight`; checkpoints and EMAs
keep that state, so resume is exact. :func:`merge_adapters` folds adapters into plain weights,
giving back exactly the family's keys (export, `continue_from` a LoRA XP).
"""
import fnmatch
import math
import typing as tp
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import DemixError

ADAPTABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_ORIGINAL = ".parametrizations.weight.original"
_ADAPTER = ".parametrizations.weight.0."


@dataclass
class LoraConfig:
    """`finetune.lora`: low-rank adapters (off unless `enabled`)."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank
    targets: tp.List[str] = field(default_factory=lambda: ["*"])  # module-name globs of the layers to adapt

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or self.rank <= 0:
            raise DemixError(f"finetune.lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise DemixError(f"finetune.lora.alpha must be > 0, got {self.alpha!r}")
        if self.enabled and not self.targets:
            raise DemixError("finetune.lora.targets is empty: give module-name patterns, e.g. ['*']")


@dataclass
class FinetuneConfig:
    """`finetune`: parameters kept fixed and low-rank adapters (both off by default)."""

    freeze: tp.List[str] = field(default_factory=list)  # parameter-name globs
    lora: LoraConfig = field(default_factory=LoraConfig)


class LowRankUpdate(nn.Module):
    """The parametrization `weight -> weight + scale * (B @ A).view_as(weight)` of one layer.

    Args:
        weight: the layer's weight (its shape, dtype and device are used).
        rank: the rank of the update.
        alpha: `scale = alpha / rank`.
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        fan_in = int(math.prod(weight.shape[1:]))
        self.lora_A = nn.Parameter(weight.new_empty(rank, fan_in))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(weight.new_zeros(weight.shape[0], rank))
        self.register_buffer("scale", weight.new_tensor(alpha / rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The adapted weight."""
        return weight + self.scale * (self.lora_B @ self.lora_A).view_as(weight)


def apply_finetune(model: nn.Module, config: FinetuneConfig) -> None:
    """Freeze the parameters `config.freeze` matches and add the LoRA adapters (in place).

    Raises a one-line :class:`DemixError` naming the option and the pattern when a pattern
    matches nothing.
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in config.freeze:
        matched = [name for name, parameter in model.named_parameters() if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise DemixError(f"finetune.freeze: pattern {pattern!r} matches no parameter of the model "
                             f"(parameters are named like {', '.join(names[:3])})")
        for name, parameter in model.named_parameters():
            if fnmatch.fnmatchcase(name, pattern):
                parameter.requires_grad_(False)
    lora = config.lora
    if not lora.enabled:
        return
    layers = {name: module for name, module in model.named_modules() if isinstance(module, ADAPTABLE_LAYERS)}
    chosen: tp.Dict[str, nn.Module] = {}
    for pattern in lora.targets:
        matched = [name for name in layers if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise DemixError(f"finetune.lora.targets: pattern {pattern!r} matches no Linear/Conv1d/Conv2d layer of "
                             f"the model (such layers are named like {', '.join(list(layers)[:3]) or 'nothing'})")
        chosen.update((name, layers[name]) for name in matched)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in chosen.values():
        parametrize.register_parametrization(module, "weight", LowRankUpdate(module.weight, lora.rank, lora.alpha))


def trainable_summary(model: nn.Module) -> str:
    """`trainable parameters: N of M (x %)`."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return f"trainable parameters: {trainable} of {total} ({100 * trainable / max(total, 1):.2f} %)"


def is_adapted(state: tp.Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds LoRA adapters (the state of a model with `finetune.lora` on)."""
    return any(key.endswith(_ORIGINAL) for key in state)


def merge_adapters(state: tp.Mapping[str, torch.Tensor]) -> tp.Dict[str, torch.Tensor]:
    """A state dict with every adapter folded into its weight (`X.weight = W + scale * B @ A`),
    keyed like the family's own model; a state without adapters is returned as is (a copy)."""
    merged: tp.Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(_ORIGINAL):
            prefix = key[: -len(_ORIGINAL)]
            adapter = f"{prefix}{_ADAPTER}"
            delta = (state[f"{adapter}lora_B"] @ state[f"{adapter}lora_A"]).view(value.shape)
            merged[f"{prefix}.weight"] = value + state[f"{adapter}scale"] * delta  # as LowRankUpdate computes it
        elif _ADAPTER not in key:
            merged[key] = value
    return merged


def adapted_state(model: nn.Module, plain: tp.Mapping[str, torch.Tensor]) -> tp.Dict[str, torch.Tensor]:
    """`plain` (a family-standard state dict, e.g. a parent's weights) keyed for `model` with
    adapters: adapted weights go to their `original`, the adapters keep `model`'s current values."""
    current = model.state_dict()
    state: tp.Dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        if key.endswith(".weight") and f"{key[: -len('.weight')]}{_ORIGINAL}" in current:
            key = f"{key[: -len('.weight')]}{_ORIGINAL}"
        state[key] = value
    state.update({key: value for key, value in current.items() if _ADAPTER in key})
    return state
