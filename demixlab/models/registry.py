"""The registry of model families.

A family is everything the generic solver needs to train and use one kind of model without
knowing what it is: how to build it from its config, its training objective, and an optional
calibration step run once on training data before the first epoch (e.g. input statistics).
Each family module registers itself; :mod:`demixlab.models` imports them all, and the solver
only looks names up through it.
"""
import inspect
import typing as tp
from dataclasses import dataclass

import torch

from ..errors import DemixError
from ..losses import Objective

# calibrate(model, batches of (mixture, sources)) -> None, updates the model in place.
Calibrate = tp.Callable[[torch.nn.Module, tp.Iterable[tp.Tuple[torch.Tensor, torch.Tensor]]], None]


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: registry string, also the `model.family` config value and the name saved in model files.
        model_class: an `nn.Module` whose constructor takes `sources`, `samplerate`, `audio_channels`
            and the family's `model.*` config keys, and whose `forward(mixture)` maps a (B, C, T)
            waveform to (B, S, C, T) waveforms.
        build_objective: `build_objective(model, **loss_options)` builds the training objective
            from the constructed model and the `loss.*` config keys; the objective is called with
            the (possibly DDP-wrapped) model, and may call `model(mixture, for_loss=True)` for a
            family-specific output.
        calibrate: optional, run once on training batches before training starts.
    """

    name: str
    model_class: tp.Type[torch.nn.Module]
    build_objective: tp.Callable[..., Objective]
    calibrate: tp.Optional[Calibrate] = None

    def build_model(self, sources: tp.Sequence[str], samplerate: int, audio_channels: int,
                    options: tp.Mapping[str, tp.Any]) -> torch.nn.Module:
        """Instantiate the model; `options` are the `model.*` keys besides `family`.

        An option the constructor does not take is a :class:`DemixError` naming it.
        """
        fixed = {"sources", "samplerate", "audio_channels"}
        parameters = inspect.signature(self.model_class).parameters
        accepted = sorted(name for name, parameter in parameters.items()
                          if name not in fixed and parameter.kind in (parameter.KEYWORD_ONLY,
                                                                       parameter.POSITIONAL_OR_KEYWORD))
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise DemixError(f"model.{unknown[0]} is not an option of the {self.name!r} family; "
                             f"options: {', '.join(accepted)}")
        return self.model_class(sources=list(sources), samplerate=samplerate, audio_channels=audio_channels,
                                **dict(options))


def require(condition: bool, message: str) -> None:
    """Raise a one-line :class:`DemixError` with `message` unless `condition` holds."""
    if not condition:
        raise DemixError(message)


def check_model_io(sources: tp.Sequence[str], samplerate: int, audio_channels: int) -> None:
    """The checks every family's constructor starts with: distinct source names, a positive rate, channels."""
    require(len(sources) > 0 and len(set(sources)) == len(sources),
            f"sources must be a non-empty list of distinct names, got {list(sources)}")
    require(samplerate > 0, f"samplerate must be positive, got {samplerate}")
    require(audio_channels >= 1, f"audio_channels must be at least 1, got {audio_channels}")


_FAMILIES: tp.Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family to the registry (names are unique)."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """Return a registered family, or raise a :class:`DemixError` listing the choices."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise DemixError(f"unknown model family {name!r}: choose one of {', '.join(family_names())}") from None


def family_names() -> tp.List[str]:
    """Names of all registered families, sorted."""
    return sorted(_FAMILIES)
