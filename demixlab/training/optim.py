"""Optimizers, learning-rate schedules and exponential moving averages of weights, with the
schema of their configuration sections (`optim`, `scheduler`, `ema`)."""
import contextlib
import math
import typing as tp
from dataclasses import dataclass, field

import torch

from ..errors import DemixError
from ..models import SeparationModel

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULERS = ("none", "plateau", "cosine", "step")


@dataclass
class ParameterGroupConfig:
    """`optim.groups.NAME`: a model parameter group's own settings (null: the model's default)."""

    lr: tp.Optional[float] = None
    weight_decay: tp.Optional[float] = None


@dataclass
class OptimConfig:
    """`optim`: the optimizer and its per-group settings."""

    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-3
    betas: tp.List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-5
    clip_grad: float = 0.0  # max gradient norm; 0 disables clipping
    groups: tp.Dict[str, ParameterGroupConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise DemixError(f"optim.optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise DemixError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise DemixError(f"optim.betas must be two numbers [beta1, beta2], got {list(self.betas)}")
        if self.clip_grad < 0:
            raise DemixError(f"optim.clip_grad must be >= 0 (0 disables clipping), got {self.clip_grad}")


@dataclass
class SchedulerConfig:
    """`scheduler`: the per-epoch learning-rate schedule."""

    name: str = "plateau"  # none | plateau | cosine | step
    factor: float = 0.3  # plateau, step: lr multiplier
    patience: int = 80  # plateau: epochs without improvement of `best.metric`
    cooldown: int = 10  # plateau
    warmup_epochs: int = 0  # cosine: linear warm-up epochs
    step_epochs: int = 0  # step: epochs between two multiplications by `factor` (set by the families that use it)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULERS:
            raise DemixError(f"scheduler.name={self.name!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.name == "step" and self.step_epochs < 1:
            raise DemixError(f"scheduler.name=step needs scheduler.step_epochs >= 1 (pass +scheduler.step_epochs=N "
                             f"where the configuration has no such key), got {self.step_epochs}")


@dataclass
class EmaConfig:
    """`ema`: exponential moving averages of the weights, validated next to the raw weights."""

    decays: tp.List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for decay in self.decays:
            if not 0 < decay < 1:
                raise DemixError(f"ema.decays must be in (0, 1), got {decay}")


def build_optimizer(model: SeparationModel, optim: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over the model's trainable parameters, with torch's fused kernel where it
    runs (floating-point parameters on CPU or CUDA): one kernel per parameter instead of a dozen
    ops (sliCQ-CDAE's 910 tensors: an AdamW step 104 ms -> 35 ms on one CPU thread).

    The model's `parameter_groups()` returns {name: {"params": parameters, "lr": ...,
    "weight_decay": ...}} (the model's own defaults for that group, e.g. a transformer's).
    `optim.groups.NAME.lr` / `.weight_decay` override them when not null; all other parameters
    form the `default` group with `optim.lr` and `optim.weight_decay`.
    """
    named = {name: dict(group) for name, group in model.parameter_groups().items()}
    for name in optim.groups:
        if name not in named:
            raise DemixError(f"optim.groups.{name}: this model has no parameter group {name!r} "
                             f"(groups: {', '.join(named) or 'none'})")
    grouped = {id(param) for group in named.values() for param in group["params"]}
    groups = [{"name": "default", "params": [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]}]
    for name, group in named.items():
        group = {key: value for key, value in group.items() if value is not None}
        settings = optim.groups.get(name)
        if settings is not None:
            group.update({key: float(value) for key, value in
                          (("lr", settings.lr), ("weight_decay", settings.weight_decay)) if value is not None})
        group["params"] = [p for p in group["params"] if p.requires_grad]
        groups.append({"name": name, **group})
    groups = [group for group in groups if group["params"]]
    optimizer = OPTIMIZERS[optim.optimizer](groups, lr=float(optim.lr), betas=tuple(optim.betas),
                                            weight_decay=float(optim.weight_decay),
                                            fused=_fused_kernel_fits([p for group in groups for p in group["params"]]))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer


def _fused_kernel_fits(parameters: tp.Sequence[torch.Tensor]) -> tp.Optional[bool]:
    """True where torch's fused Adam/AdamW kernel takes every parameter, else None (the default)."""
    fits = bool(parameters) and all(parameter.is_floating_point() and parameter.device.type in ("cpu", "cuda")
                                    for parameter in parameters)
    return True if fits else None


class LearningRateSchedule:
    """The per-epoch learning rate, through `torch.optim.lr_scheduler`: constant (`none`),
    `ReduceLROnPlateau` on the best metric (`plateau`), cosine decay after a linear warm-up
    (`cosine`, a `LambdaLR`), or `StepLR` (`step`: times `factor` every `step_epochs` epochs).

    The optimizer holds the learning rate of the coming epoch; :meth:`end_epoch` moves it on.
    `state_dict` holds plain values only (it loads with `weights_only=True`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: SchedulerConfig, epochs: int, mode: str):
        self.optimizer = optimizer
        self.name = scheduler.name
        lr_scheduler = torch.optim.lr_scheduler
        self.scheduler: tp.Optional[tp.Any] = None
        if self.name == "plateau":
            self.scheduler = lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=float(scheduler.factor),
                                                            patience=int(scheduler.patience),
                                                            cooldown=int(scheduler.cooldown))
        elif self.name == "step":
            self.scheduler = lr_scheduler.StepLR(optimizer, step_size=int(scheduler.step_epochs),
                                                 gamma=float(scheduler.factor))
        elif self.name == "cosine":
            warmup = int(scheduler.warmup_epochs)

            def factor(epoch: int) -> float:
                if epoch < warmup:
                    return (epoch + 1) / warmup
                progress = (epoch - warmup) / max(1, epochs - warmup)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

            self.scheduler = lr_scheduler.LambdaLR(optimizer, factor)

    def end_epoch(self, metric: float) -> None:
        """Set the learning rate of the next epoch; `metric` is the epoch's value of the best metric
        (what the plateau schedule watches)."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(metric)
        elif self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> tp.Dict[str, tp.Any]:
        """The scheduler's state (the learning rates themselves are saved with the optimizer)."""
        if self.scheduler is None:
            return {}
        return {key: value for key, value in self.scheduler.state_dict().items() if key != "lr_lambdas"}

    def load_state_dict(self, state: tp.Dict[str, tp.Any]) -> None:
        """Restore what `state_dict` returned (an empty state, as a checkpoint of a constant
        schedule has, leaves the scheduler as built)."""
        if self.scheduler is not None and state:
            self.scheduler.__dict__.update(state)


class ModelEMA:
    """An exponential moving average of a model's state, updated in place with foreach kernels:
    floating-point parameters and buffers (e.g. BatchNorm running statistics) are averaged,
    integer buffers (e.g. BatchNorm's `num_batches_tracked`) copied. Frozen parameters
    (`requires_grad` off, e.g. the base weights under `finetune`) never change: the average holds
    the model's own tensors for them, neither copied nor updated.

    Args:
        model: the model whose state is averaged (its tensors are followed, not copied, between
            updates: load weights into it in place, as `load_state_dict` does).
        decay: weight of the old average at each update, in (0, 1).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise DemixError(f"ema.decays must be in (0, 1), got {decay}")
        self.decay = decay
        live = model.state_dict()
        frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
        self._frozen = frozen & set(live)
        self.state = {key: value.detach() if key in self._frozen else value.detach().clone()
                      for key, value in live.items()}
        live = {key: value for key, value in live.items() if key not in self._frozen}
        floats = [key for key, value in live.items() if value.is_floating_point()]
        self._float_average = [self.state[key] for key in floats]
        self._float_live = [live[key] for key in floats]
        others = [key for key, value in live.items() if not value.is_floating_point()]
        self._other_average = [self.state[key] for key in others]
        self._other_live = [live[key] for key in others]

    @property
    def name(self) -> str:
        """Name used in logs and history, e.g. `ema_0.999`."""
        return f"ema_{self.decay:g}"

    @torch.no_grad()
    def update(self) -> None:
        """Blend the model's current weights into the average (one foreach kernel per dtype group)."""
        if self._float_average:
            torch._foreach_lerp_(self._float_average, self._float_live, 1 - self.decay)
        for average, value in zip(self._other_average, self._other_live):
            average.copy_(value)

    def state_dict(self) -> tp.Dict[str, torch.Tensor]:
        """The averaged weights, in the model's state-dict format."""
        return self.state

    def load_state_dict(self, state: tp.Dict[str, torch.Tensor]) -> None:
        """Restore averaged weights (in place; frozen parameters are the model's own and are left alone)."""
        for key, value in state.items():
            if key not in self._frozen:
                self.state[key].copy_(value)


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, state: tp.Dict[str, torch.Tensor]) -> tp.Iterator[None]:
    """Temporarily load `state` into `model` (e.g. to validate an EMA), then restore its weights."""
    original = {key: value.detach().clone() for key, value in model.state_dict().items()}
    model.load_state_dict(state)
    try:
        yield
    finally:
        model.load_state_dict(original)
