"""DiffQ: quantisation-aware training with learned bit depths (`quant:`), our own implementation.

The method of Défossez, Adi and Synnaeve, "Differentiable Model Compression via Pseudo
Quantization Noise" (TMLR 2022), which demucs trained with (`quant.diffq`). Every weight tensor
of at least `min_size` MB is cut into groups of `group_size` consecutive values; each group has a
learned bit depth `b = min_bits + (max_bits - min_bits) * sigmoid(logit)`. In training the model
runs on `w + U(-delta/2, delta/2)` with `delta = (max(w) - min(w)) / (2^b - 1)` (the tensor's
range, the group's bits): the noise stands for the rounding error of uniform quantisation, and its
scale is differentiable in `b`. The loss adds `diffq * model_size_mb`, the size of the weights at
their learned bits (`sum(b * values) / 8 / 2^20`, plus the float32 weights left out), so that
training trades accuracy for size. Export rounds every group to its integer bits and stores
integer levels (:mod:`demixlab.release.quantized`).

The weights themselves never change place or name: the noisy copies are passed to the model
through :func:`torch.func.functional_call` (:class:`NoisyModel`), so the model's state dict, its
EMAs, checkpoints and exports hold the plain weights; the bit logits are the quantizer's own
parameters (their own optimizer group, saved in the checkpoint). The noise is drawn from torch's
global generator, which the solver seeds per epoch: resume stays exact.
"""
import math
import typing as tp
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DemixError
from ..release.quantized import MAX_BITS, encode_weight, group_deltas, per_value

MEGABYTE = 2 ** 20


@dataclass
class QuantConfig:
    """`quant`: DiffQ quantisation-aware training (off while `diffq` is null)."""

    diffq: tp.Optional[float] = None  # the penalty per MB of model size; null: off (0: bits learned without pressure)
    group_size: int = 8  # consecutive weights sharing one bit depth
    min_size: float = 0.01  # MB (float32) a weight tensor needs to be quantised
    min_bits: int = 2
    max_bits: int = 15
    init_bits: float = 8.0  # the bit depth every group starts from
    lr: tp.Optional[float] = None  # learning rate of the bit logits; null: optim.lr

    def __post_init__(self) -> None:
        if self.diffq is not None and not self.diffq >= 0:
            raise DemixError(f"quant.diffq must be a penalty >= 0 or null (off), got {self.diffq!r}")
        if isinstance(self.group_size, bool) or self.group_size < 1:
            raise DemixError(f"quant.group_size must be a positive integer, got {self.group_size!r}")
        if not self.min_size >= 0:
            raise DemixError(f"quant.min_size must be >= 0 (MB), got {self.min_size!r}")
        if not 1 <= self.min_bits < self.max_bits <= MAX_BITS:
            raise DemixError(f"quant.min_bits and quant.max_bits must satisfy 1 <= min_bits < max_bits <= "
                             f"{MAX_BITS}, got {self.min_bits} and {self.max_bits}")
        if not self.min_bits <= self.init_bits <= self.max_bits:
            raise DemixError(f"quant.init_bits must be in [quant.min_bits, quant.max_bits] = "
                             f"[{self.min_bits}, {self.max_bits}], got {self.init_bits!r}")
        if self.lr is not None and not self.lr > 0:
            raise DemixError(f"quant.lr must be > 0 or null (optim.lr), got {self.lr!r}")


class DiffQuantizer(nn.Module):
    """The learned bit depths of a model's large weights, the pseudo-quantisation noise and the
    model size they imply (see the module docstring).

    Args:
        model: the model whose trainable floating-point parameters of at least `config.min_size`
            MB are quantised (the others stay float32).
        config: the `quant` section.
    """

    def __init__(self, model: nn.Module, config: QuantConfig):
        super().__init__()
        self.model = [model]  # a list: not a submodule (its parameters are not the quantizer's)
        self.group_size = int(config.group_size)
        self.min_bits, self.max_bits = float(config.min_bits), float(config.max_bits)
        self.names: tp.List[str] = []
        self.sizes: tp.List[int] = []  # values of each quantised weight
        self.float_values = 0  # values of the parameters left in float32
        start = (config.init_bits - self.min_bits) / (self.max_bits - self.min_bits)
        start = min(max(start, 1e-3), 1 - 1e-3)
        logits = []
        for name, param in model.named_parameters():
            if param.requires_grad and param.is_floating_point() and param.numel() * 4 / MEGABYTE >= config.min_size:
                self.names.append(name)
                self.sizes.append(param.numel())
                groups = -(-param.numel() // self.group_size)
                logits.append(nn.Parameter(torch.full((groups,), math.log(start / (1 - start)), device=param.device)))
            else:
                self.float_values += param.numel()
        if not self.names:
            raise DemixError(f"quant.min_size={config.min_size}: no weight tensor of this model is that large "
                             "(nothing to quantise); lower quant.min_size")
        self.logits = nn.ParameterList(logits)

    def _params(self) -> tp.Dict[str, nn.Parameter]:
        params = dict(self.model[0].named_parameters())
        return {name: params[name] for name in self.names}

    def bits(self) -> tp.List[torch.Tensor]:
        """The (fractional, differentiable) bit depth of every group, one tensor per quantised weight."""
        return [self.min_bits + (self.max_bits - self.min_bits) * torch.sigmoid(logit) for logit in self.logits]

    def group_counts(self, index: int) -> torch.Tensor:
        """How many values each group of the `index`-th quantised weight holds (the last may hold fewer)."""
        groups = self.logits[index].numel()
        counts = torch.full((groups,), float(self.group_size), device=self.logits[index].device)
        counts[-1] = self.sizes[index] - (groups - 1) * self.group_size
        return counts

    def noisy_weights(self) -> tp.Dict[str, torch.Tensor]:
        """Each quantised weight plus uniform noise of its groups' quantisation step (a new draw)."""
        noisy = {}
        for (name, param), bits in zip(self._params().items(), self.bits()):
            flat = param.flatten()
            low, high = flat.detach().min(), flat.detach().max()
            step = per_value(group_deltas(low, high, bits), self.group_size, flat.numel())
            noise = (torch.rand_like(flat) - 0.5) * step
            noisy[name] = (flat + noise).view_as(param)
        return noisy

    def model_size_mb(self) -> torch.Tensor:
        """The weights' size in MB at the learned bits, differentiable in the bits (float32 weights
        that are not quantised count 32 bits each)."""
        total = sum((bits * self.group_counts(index)).sum() for index, bits in enumerate(self.bits()))
        return (total + 32.0 * self.float_values) / 8 / MEGABYTE

    def rounded_bits(self) -> tp.Dict[str, torch.Tensor]:
        """The integer bit depth of every group (uint8, on the CPU), by parameter name: what export stores."""
        return {name: bits.detach().round().to(torch.uint8).cpu() for name, bits in zip(self.names, self.bits())}

    def stored_size_mb(self) -> float:
        """The size in MB of the exported weights: one or two bytes per quantised value (uint8 in
        groups of up to 8 bits, int16 above), a byte of bit depth per group and the range per
        tensor, 4 bytes per float32 value."""
        total = 4.0 * self.float_values
        for index, bits in enumerate(self.rounded_bits().values()):
            value_bytes = torch.where(bits > 8, 2.0, 1.0) * self.group_counts(index).cpu()
            total += float(value_bytes.sum()) + bits.numel() + 8
        return total / MEGABYTE

    def mean_bits(self) -> float:
        """The mean rounded bit depth over the quantised values."""
        counts = [self.group_counts(index) for index in range(len(self.names))]
        total = sum(float((bits.float() * count.cpu()).sum())
                    for bits, count in zip(self.rounded_bits().values(), counts))
        return total / sum(float(count.sum()) for count in counts)

    def metrics(self) -> tp.Dict[str, float]:
        """The scalars an epoch logs: `model_size_mb` (at the learned bits), `quantized_mb` (stored), `mean_bits`."""
        return {"model_size_mb": float(self.model_size_mb().detach()), "quantized_mb": self.stored_size_mb(),
                "mean_bits": self.mean_bits()}


class NoisyModel(nn.Module):
    """Runs `model` on its quantizer's noisy weights in training mode, on its own weights in eval mode.

    The objectives only call the model, so the solver hands them this wrapper (DDP wraps it too,
    which keeps the bit logits' gradients in sync).
    """

    def __init__(self, model: nn.Module, quantizer: DiffQuantizer):
        super().__init__()
        self.model = model
        self.quantizer = quantizer

    def forward(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        """The model's forward, through the noisy weights while training."""
        if not self.training:
            return self.model(*args, **kwargs)
        return torch.func.functional_call(self.model, self.quantizer.noisy_weights(), args, kwargs, strict=False)


def quantize_state(state: tp.Mapping[str, torch.Tensor], bits: tp.Mapping[str, torch.Tensor], group_size: int
                   ) -> tp.Tuple[tp.Dict[str, torch.Tensor], tp.Dict[str, tp.Dict[str, tp.Any]]]:
    """Split `state` into the weights kept as they are and the encoded weights of `bits`' keys
    (see :func:`demixlab.release.quantized.encode_weight`)."""
    missing = [name for name in bits if name not in state]
    if missing:
        raise DemixError(f"the DiffQ bit depths name weights the state lacks: {', '.join(missing[:3])}")
    kept = {key: value for key, value in state.items() if key not in bits}
    return kept, {name: encode_weight(state[name], bits[name], group_size) for name in bits}
