"""Model repositories and bags of models.

A repository is a folder of model files (`NAME.th`, see :mod:`demixlab.release.model_file`) and
bag files (`NAME.yaml`)::

    models: [umx_a1b2c3d4, hdemucs_5e6f7a8b]   # model files of the same folder
    weights:                                   # optional: one row per model, one column per source
      - [1.0, 1.0, 0.0, 1.0]                   #   (in the order of the bag's sources, see below)
      - [1.0, 1.0, 1.0, 0.0]
    segment: 8.0                               # optional: seconds per chunk for every model

Loading `NAME` gives the bag `NAME.yaml` when it exists, else the one-model bag of `NAME.th`.

The bag's sources are the union of its models' sources, in order of first appearance (the first
model's sources, then those the next models add). A model lacking one of the bag's sources takes
weight 0 for it, whatever the `weights` row says; every source needs a positive total weight.
Each source is the weighted average of the models' estimates of it:
`out[s] = sum_m w[m, s] * est_m[s] / sum_m w[m, s]`. Models whose weight for a source is 0 are not
used for it, and a model whose weights are all 0 is neither loaded nor run. All models must share
the sample rate and the number of audio channels. :func:`demixlab.separation.bags.apply_bag`
runs a bag.
"""
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..errors import DemixError
from ..files import atomic_path
from .model_file import load_package, model_from_package

MODEL_SUFFIX = ".th"
BAG_SUFFIX = ".yaml"
BAG_KEYS = {"models", "weights", "segment"}


@dataclass
class BagMember:
    """One model of a bag: its name, its model file content and its weight per bag source."""

    name: str
    package: tp.Dict[str, tp.Any]
    weights: tp.List[float]
    model: tp.Optional[torch.nn.Module] = None

    @property
    def active(self) -> bool:
        """Whether the model contributes to any source (otherwise it is never built nor run)."""
        return any(weight > 0 for weight in self.weights)


@dataclass
class Bag:
    """Models blended per source (see the module docstring). A single model is a one-entry bag.

    Models are built lazily (:meth:`build`); :func:`demixlab.separation.bags.apply_bag` runs them.
    """

    name: str
    members: tp.List[BagMember]
    sources: tp.List[str]
    samplerate: int
    audio_channels: int
    segment: tp.Optional[float] = None
    overrides: tp.Dict[str, tp.Any] = field(default_factory=dict)

    def build(self, device: tp.Union[str, torch.device] = "cpu") -> "Bag":
        """Build the models that contribute to some source and move them to `device`."""
        for member in self.members:
            if member.active and member.model is None:
                # Sharing: a second copy of the weights would be most of a separation's memory
                # (142 MiB of 880 for full-size UMX on 10 s chunks).
                member.model = model_from_package(member.package, self.overrides, share_weights=True).to(device)
        return self


class Repository:
    """A folder of model files (`NAME.th`) and bag files (`NAME.yaml`)."""

    def __init__(self, folder: tp.Union[str, Path]):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DemixError(f"--repo {self.folder}: no such folder")

    def names(self) -> tp.List[str]:
        """Every model and bag name the repository holds, sorted."""
        return sorted({path.stem for path in self.folder.iterdir()
                       if path.suffix in (MODEL_SUFFIX, BAG_SUFFIX) and not path.name.startswith(".")})

    def load(self, name: str, overrides: tp.Optional[tp.Mapping[str, tp.Any]] = None) -> Bag:
        """The bag `NAME.yaml`, else the one-model bag of `NAME.th`; models are built lazily
        (:meth:`Bag.build`). `overrides` change constructor options of every model."""
        bag_path = self.folder / f"{name}{BAG_SUFFIX}"
        if bag_path.is_file():
            return self._load_bag(name, bag_path, dict(overrides or {}))
        model_path = self.folder / f"{name}{MODEL_SUFFIX}"
        if model_path.is_file():
            package = load_package(model_path)
            return make_bag(name, [(name, package)], overrides=overrides)
        available = ", ".join(self.names()) or "none"
        raise DemixError(f"no model or bag named {name!r} in {self.folder} (available: {available})")

    def _load_bag(self, name: str, path: Path, overrides: tp.Dict[str, tp.Any]) -> Bag:
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise DemixError(f"{path}: invalid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("models"), list) or not spec["models"]:
            raise DemixError(f"{path}: expected a mapping with 'models: [name, ...]' (a non-empty list)")
        unknown = sorted(set(spec) - BAG_KEYS)
        if unknown:
            raise DemixError(f"{path}: unknown key {unknown[0]!r} (expected {', '.join(sorted(BAG_KEYS))})")
        entries = []
        for model_name in spec["models"]:
            model_path = self.folder / f"{model_name}{MODEL_SUFFIX}"
            if not model_path.is_file():
                raise DemixError(f"{path}: model {model_name!r} not found ({model_path} is missing)")
            entries.append((str(model_name), load_package(model_path)))
        segment = spec.get("segment")
        if segment is not None and (isinstance(segment, bool) or not isinstance(segment, (int, float))
                                    or segment <= 0):
            raise DemixError(f"{path}: segment must be a positive number of seconds, got {segment!r}")
        return make_bag(name, entries, weights=spec.get("weights"), segment=segment, overrides=overrides,
                        where=str(path))


def save_bag(path: tp.Union[str, Path], models: tp.Sequence[str], weights: tp.Sequence[tp.Sequence[float]],
             segment: tp.Optional[float] = None) -> None:
    """Write a bag file atomically: `models`, `weights` (one row per model, one column per bag
    source) and, when given, `segment`."""
    spec: tp.Dict[str, tp.Any] = {"models": list(models),
                                  "weights": [[float(value) for value in row] for row in weights]}
    if segment is not None:
        spec["segment"] = float(segment)
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(spec, default_flow_style=None, sort_keys=False))


def make_bag(name: str, entries: tp.Sequence[tp.Tuple[str, tp.Dict[str, tp.Any]]],
             weights: tp.Optional[tp.Sequence[tp.Sequence[float]]] = None, segment: tp.Optional[float] = None,
             overrides: tp.Optional[tp.Mapping[str, tp.Any]] = None, where: tp.Optional[str] = None) -> Bag:
    """Validate and assemble a bag from (model name, model file content) pairs (module docstring)."""
    where = where or name
    first_name, first = entries[0]
    sources: tp.List[str] = []
    for model_name, package in entries:
        for key in ("samplerate", "audio_channels"):
            if package[key] != first[key]:
                raise DemixError(f"{where}: model {model_name!r} has {key} {package[key]} but "
                                 f"{first_name!r} has {first[key]}; a bag's models must agree")
        sources += [source for source in package["sources"] if source not in sources]
    if weights is None:
        weights = [[1.0] * len(sources) for _ in entries]
    if (not isinstance(weights, (list, tuple)) or len(weights) != len(entries)
            or any(not isinstance(row, (list, tuple)) or len(row) != len(sources) for row in weights)):
        raise DemixError(f"{where}: weights must be {len(entries)} rows (one per model) of {len(sources)} "
                         f"numbers (one per source: {', '.join(sources)})")
    members = []
    for (model_name, package), row in zip(entries, weights):
        for value in row:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise DemixError(f"{where}: weights of {model_name!r} must be non-negative numbers, got {row}")
        member_weights = [float(value) if source in package["sources"] else 0.0
                          for source, value in zip(sources, row)]
        members.append(BagMember(model_name, package, member_weights))
    for index, source in enumerate(sources):
        if sum(member.weights[index] for member in members) <= 0:
            raise DemixError(f"{where}: source {source!r} has no model with a positive weight")
    return Bag(name=name, members=members, sources=sources, samplerate=int(first["samplerate"]),
               audio_channels=int(first["audio_channels"]), segment=segment, overrides=dict(overrides or {}))
