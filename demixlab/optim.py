"""Optimizers, learning-rate schedules and exponential moving averages of weights."""
import contextlib
import math
import typing as tp

import torch
from omegaconf import DictConfig

from .errors import DemixError

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULERS = ("none", "plateau", "cosine")


def build_optimizer(model: torch.nn.Module, optim: DictConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over the model's trainable parameters.

    A model may define `parameter_groups()` returning {name: parameters} or {name: {"params":
    parameters, "lr": ..., "weight_decay": ...}} (the model's own defaults for that group, e.g. a
    transformer's). `optim.groups.NAME.lr` / `.weight_decay` override them when not null; all other
    parameters form the `default` group with `optim.lr` and `optim.weight_decay`.
    """
    if optim.optimizer not in OPTIMIZERS:
        raise DemixError(f"optim.optimizer={optim.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if not optim.lr > 0:
        raise DemixError(f"optim.lr must be > 0, got {optim.lr}")
    named = model.parameter_groups() if hasattr(model, "parameter_groups") else {}
    settings = dict(optim.get("groups") or {})
    for name, values in settings.items():
        if name not in named:
            raise DemixError(f"optim.groups.{name}: this model has no parameter group {name!r} "
                             f"(groups: {', '.join(named) or 'none'})")
        unknown = set(values or {}) - {"lr", "weight_decay"}
        if unknown:
            raise DemixError(f"optim.groups.{name}.{sorted(unknown)[0]}: only lr and weight_decay can be set per group")
    named = {name: dict(value) if isinstance(value, dict) else {"params": value} for name, value in named.items()}
    grouped = {id(param) for group in named.values() for param in group["params"]}
    groups = [{"name": "default", "params": [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]}]
    for name, group in named.items():
        group = {key: value for key, value in group.items() if value is not None}
        group.update({key: float(value) for key, value in (settings.get(name) or {}).items() if value is not None})
        group["params"] = [p for p in group["params"] if p.requires_grad]
        groups.append({"name": name, **group})
    optimizer = OPTIMIZERS[optim.optimizer]([group for group in groups if group["params"]], lr=float(optim.lr),
                                            betas=tuple(optim.betas), weight_decay=float(optim.weight_decay))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer


class LearningRateSchedule:
    """Per-epoch learning rate: constant, reduce-on-plateau of the best metric, or cosine decay
    with linear warm-up. `state_dict` holds only plain values (safe to load with weights_only)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: DictConfig, epochs: int, mode: str):
        if scheduler.name not in SCHEDULERS:
            raise DemixError(f"scheduler.name={scheduler.name!r}: choose one of {', '.join(SCHEDULERS)}")
        self.optimizer = optimizer
        self.name = scheduler.name
        self.epochs = epochs
        self.warmup_epochs = int(scheduler.get("warmup_epochs", 0) or 0)
        self.plateau: tp.Optional[torch.optim.lr_scheduler.ReduceLROnPlateau] = None
        if self.name == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=float(scheduler.factor), patience=int(scheduler.patience),
                cooldown=int(scheduler.cooldown))

    def start_epoch(self, epoch: int) -> None:
        """Set the learning rate for `epoch` (0-based) before training on it."""
        if self.name != "cosine":
            return
        if epoch < self.warmup_epochs:
            factor = (epoch + 1) / self.warmup_epochs
        else:
            progress = (epoch - self.warmup_epochs) / max(1, self.epochs - self.warmup_epochs)
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def end_epoch(self, metric: float) -> None:
        """Report the epoch's value of the best metric (drives the plateau schedule)."""
        if self.plateau is not None:
            self.plateau.step(metric)

    def state_dict(self) -> tp.Dict[str, tp.Any]:
        """Plain-value state (the optimizer's learning rates are saved with the optimizer)."""
        if self.plateau is None:
            return {}
        keys = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")
        return {key: getattr(self.plateau, key) for key in keys}

    def load_state_dict(self, state: tp.Dict[str, tp.Any]) -> None:
        """Restore what `state_dict` returned."""
        if self.plateau is not None:
            for key, value in state.items():
                setattr(self.plateau, key, value)
            self.plateau._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class ModelEMA:
    """An exponential moving average of a model's weights (buffers are copied as they are)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise DemixError(f"ema.decays must be in (0, 1), got {decay}")
        self.decay = decay
        self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    @property
    def name(self) -> str:
        """Name used in logs and history, e.g. `ema_0.999`."""
        return f"ema_{self.decay:g}"

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Blend the model's current weights into the average."""
        for key, value in model.state_dict().items():
            average = self.state[key]
            if average.is_floating_point():
                average.mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                average.copy_(value)

    def state_dict(self) -> tp.Dict[str, torch.Tensor]:
        """The averaged weights, in the model's state-dict format."""
        return self.state

    def load_state_dict(self, state: tp.Dict[str, torch.Tensor]) -> None:
        """Restore averaged weights."""
        for key, value in state.items():
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
