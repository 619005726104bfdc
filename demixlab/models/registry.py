"""The registry of model families.

A family is everything the generic solver needs to train and use one kind of model without
knowing what it is: its model class (a :class:`~demixlab.models.contract.SeparationModel`), its
training objective, an optional calibration step run once on training data before the first
epoch (e.g. input statistics), and optional importers of weights written by other
implementations. Each family module registers itself; :mod:`demixlab.models` imports them all,
and everything else looks families up by name here.

The options of a family are declared once, by the type-annotated keyword arguments of its model
constructor (`model.*` keys) and of its objective builder (`loss.*` keys): :func:`option_schema`
turns them into a schema that rejects an unknown key or a value of the wrong type, naming it.
"""
import dataclasses
import difflib
import inspect
import typing as tp
from dataclasses import dataclass

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import DemixError
from .contract import Importer, SeparationModel
from .losses import Objective

# calibrate(model, batches of (mixture, sources)) -> None, updates the model in place.
Calibrate = tp.Callable[[torch.nn.Module, tp.Iterable[tp.Tuple[torch.Tensor, torch.Tensor]]], None]

_MODEL_ARGUMENTS = ("self", "sources", "samplerate", "audio_channels")
_OBJECTIVE_ARGUMENTS = ("model",)


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: registry string, also the `model.family` config value and the name saved in model files.
        model_class: a :class:`SeparationModel` whose constructor takes `sources`, `samplerate`,
            `audio_channels` and, as keyword arguments, the family's `model.*` options.
        build_objective: `build_objective(model, **loss_options)` builds the training objective
            from the constructed model and the `loss.*` options (its keyword arguments); the
            objective is called as `objective(model, mixture, sources)` with the (possibly
            DDP-wrapped) model and returns a dict of scalar tensors whose "loss" is minimised.
        calibrate: optional, run once on training batches before training starts.
        importers: optional, {format name: importer} for `demixlab import FORMAT`.
    """

    name: str
    model_class: tp.Type[SeparationModel]
    build_objective: tp.Callable[..., Objective]
    calibrate: tp.Optional[Calibrate] = None
    importers: tp.Mapping[str, Importer] = dataclasses.field(default_factory=dict)

    def model_options(self) -> tp.Type:
        """The schema of the `model.*` options (a dataclass, without `family`).

        A constructor that passes `**options` on to its base class declares the base's options too.
        """
        constructors = []
        for cls in self.model_class.__mro__:
            if "__init__" not in vars(cls):
                continue
            constructors.append(vars(cls)["__init__"])
            parameters = inspect.signature(constructors[-1]).parameters.values()
            if not any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
                break
        return option_schema(tuple(constructors), f"{self.name}_model_options", _MODEL_ARGUMENTS)

    def loss_options(self) -> tp.Type:
        """The schema of the `loss.*` options (a dataclass)."""
        return option_schema(self.build_objective, f"{self.name}_loss_options", _OBJECTIVE_ARGUMENTS)

    def check_model_options(self, options: tp.Mapping[str, tp.Any], prefix: str = "model.") -> None:
        """Raise a one-line :class:`DemixError` naming the first unknown or mistyped model option."""
        check_options(self.model_options(), options, prefix, f"the {self.name!r} family")

    def check_loss_options(self, options: tp.Mapping[str, tp.Any], prefix: str = "loss.") -> None:
        """Raise a one-line :class:`DemixError` naming the first unknown or mistyped loss option."""
        check_options(self.loss_options(), options, prefix, f"the {self.name!r} family's objective")

    def build_model(self, sources: tp.Sequence[str], samplerate: int, audio_channels: int,
                    options: tp.Mapping[str, tp.Any]) -> SeparationModel:
        """Instantiate the model; `options` are the `model.*` keys besides `family`, checked first."""
        self.check_model_options(options)
        return self.model_class(sources=list(sources), samplerate=samplerate, audio_channels=audio_channels,
                                **dict(options))

    def objective(self, model: SeparationModel, options: tp.Mapping[str, tp.Any]) -> Objective:
        """The training objective for `model`; `options` are the `loss.*` keys, checked first."""
        self.check_loss_options(options)
        return self.build_objective(model, **dict(options))


# ------------------------------------------------------------------------------------ option schemas
def _schema_type(annotation: tp.Any) -> tp.Any:
    """The closest type OmegaConf validates: primitives, Optional, lists and string-keyed dicts;
    anything else (unions, fractions, callables) is accepted as it is (`Any`)."""
    if annotation in (bool, int, float, str):
        return annotation
    origin, arguments = tp.get_origin(annotation), tp.get_args(annotation)
    if origin is tp.Union:
        rest = [argument for argument in arguments if argument is not type(None)]
        if len(rest) == 1 and len(arguments) == 2:
            inner = _schema_type(rest[0])
            return tp.Any if inner is tp.Any else tp.Optional[inner]
        return tp.Any
    if origin in (list, tuple) or origin is not None and origin.__name__ in ("Sequence", "List", "Tuple"):
        items = [argument for argument in arguments if argument is not Ellipsis]
        inner = _schema_type(items[0]) if len(set(items)) == 1 else tp.Any
        return tp.List[inner]
    if origin is dict or origin is not None and origin.__name__ in ("Mapping", "Dict"):
        if arguments and arguments[0] is str:
            return tp.Dict[str, _schema_type(arguments[1])]
        return tp.Dict[tp.Any, tp.Any]
    return tp.Any


_SCHEMAS: tp.Dict[tp.Tuple[tp.Any, str], tp.Type] = {}


def option_schema(functions: tp.Union[tp.Callable, tp.Sequence[tp.Callable]], name: str,
                  skip: tp.Sequence[str] = ()) -> tp.Type:
    """A dataclass with one field per keyword argument of `functions` (but `skip`; the first
    function that names an argument declares it), typed by its annotation (see
    :func:`_schema_type`) and defaulting to its default (required when it has none)."""
    functions = tuple(functions) if isinstance(functions, (list, tuple)) else (functions,)
    key = (functions, name)
    if key not in _SCHEMAS:
        fields = []
        seen = set(skip)
        for function in functions:
            hints = tp.get_type_hints(function)
            for parameter in inspect.signature(function).parameters.values():
                if parameter.name in seen or parameter.kind not in (parameter.KEYWORD_ONLY,
                                                                    parameter.POSITIONAL_OR_KEYWORD):
                    continue
                seen.add(parameter.name)
                fields.append(_field(parameter, hints))
        _SCHEMAS[key] = dataclasses.make_dataclass(name, fields)
    return _SCHEMAS[key]


def _field(parameter: inspect.Parameter, hints: tp.Mapping[str, tp.Any]) -> tp.Tuple[str, tp.Any, tp.Any]:
    """(name, schema type, dataclass field) of one keyword argument."""
    kind = _schema_type(hints.get(parameter.name, tp.Any))
    default = parameter.default
    if default is inspect.Parameter.empty:
        spec = dataclasses.field(default=MISSING)
    elif isinstance(default, (list, tuple, dict)):
        spec = dataclasses.field(default_factory=lambda value=default: _copy(value))
    else:
        spec = dataclasses.field(default=default)
    return parameter.name, kind, spec


def _copy(value: tp.Any) -> tp.Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(item) for item in value]
    return value


def check_options(schema: tp.Type, options: tp.Mapping[str, tp.Any], prefix: str, owner: str) -> None:
    """Validate `options` against a schema from :func:`option_schema`; errors name `prefix + key`."""
    accepted = [item.name for item in dataclasses.fields(schema)]
    for key in options:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise DemixError(f"{prefix}{key} is not an option of {owner}{hint}; options: {', '.join(accepted)}")
    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(dict(options)))
    except OmegaConfBaseException as error:
        raise DemixError(schema_error(error, prefix)) from None


def schema_error(error: OmegaConfBaseException, prefix: str = "") -> str:
    """One line naming the key of an OmegaConf validation error, e.g.
    `model.n_fft: Value 'abc' of type 'str' could not be converted to Integer`."""
    key = getattr(error, "full_key", None)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{prefix}{key}: {message}" if key else f"{prefix.rstrip('.')}: {message}"


# ------------------------------------------------------------------------------------------ registry
_FAMILIES: tp.Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family to the registry (names are unique; an import format names one importer)."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    for format_name, importer in family.importers.items():
        known = _importers().get(format_name)
        if known is not None and known is not importer:
            raise ValueError(f"import format {format_name!r} is already registered by another family")
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


def _importers() -> tp.Dict[str, Importer]:
    return {name: importer for family in _FAMILIES.values() for name, importer in family.importers.items()}


def import_formats() -> tp.List[str]:
    """The formats `get_importer` knows (from every family's registration), sorted."""
    return sorted(_importers())


def get_importer(format_name: str) -> Importer:
    """The importer registered for `format_name`, or a :class:`DemixError` listing the formats."""
    importers = _importers()
    if format_name not in importers:
        raise DemixError(f"unknown import format {format_name!r}: choose one of {', '.join(import_formats())}")
    return importers[format_name]
