"""Model files: a trained model as a safe, self-describing torch file.

A model file holds plain containers and tensors only, so it loads with
`torch.load(weights_only=True)` and nothing in it is executed. The model is rebuilt from its
family's registry name and constructor options (`kwargs`); no class, config object or function is
pickled. Fields:

- format: "demixlab-model/1"; "demixlab-model/2" when it has a `quantized` field
- family: registry string (see :mod:`demixlab.models`); kwargs: the family's constructor options
- state: the weights (float16 when packaged with `half=True`; loaded back as float32)
- quantized (format 2 only): weights stored as integer levels (DiffQ exports; see
  :mod:`.quantized`), {key: encoded weight}, decoded to float32 weights when the model is built
- sources, samplerate, audio_channels
- segment: seconds the model should be run on when splitting a long signal, or None (any length)
- config: the resolved training config as plain containers, or None
- signature, metrics (last metrics), origin (e.g. {"kind": "xp"} or {"kind": "import", ...})
- demixlab_version, git_commit (of the demixlab checkout that wrote the file, None when unknown)
"""
import functools
import subprocess
import typing as tp
from pathlib import Path

import torch

from .. import __version__
from ..errors import DemixError
from ..files import load_torch, save_torch
from ..models import SeparationModel, get_family
from .quantized import decode_weight

FORMAT = "demixlab-model/1"
QUANTIZED_FORMAT = "demixlab-model/2"  # a model file with a `quantized` field
_FORMAT_NAME, _FORMAT_VERSION = QUANTIZED_FORMAT.split("/")  # the newest version this demixlab reads
REQUIRED_FIELDS = ("format", "family", "kwargs", "state", "sources", "samplerate", "audio_channels")


def package_model(family: str, kwargs: tp.Mapping[str, tp.Any], state: tp.Mapping[str, torch.Tensor], *,
                  sources: tp.Sequence[str], samplerate: int, audio_channels: int,
                  config: tp.Optional[tp.Mapping[str, tp.Any]] = None, signature: tp.Optional[str] = None,
                  metrics: tp.Optional[tp.Mapping[str, tp.Any]] = None,
                  origin: tp.Optional[tp.Mapping[str, tp.Any]] = None, segment: tp.Optional[float] = None,
                  half: bool = False) -> tp.Dict[str, tp.Any]:
    """A model file's content: plain containers and tensors only (loads with weights_only=True).

    `half` stores floating-point weights as float16 (half the file size); they are loaded back as
    float32 by :func:`model_from_package`.
    """
    if not isinstance(family, str) or not family:
        raise DemixError(f"family must be a registry name (a string), got {family!r}")
    tensors: tp.Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DemixError(f"state[{key!r}] is a {type(value).__name__}, expected a tensor")
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        tensors[str(key)] = value.clone()
    return {
        "format": FORMAT,
        "family": family,
        "kwargs": _plain(dict(kwargs)),
        "state": tensors,
        "sources": [str(source) for source in sources],
        "samplerate": int(samplerate),
        "audio_channels": int(audio_channels),
        "segment": None if segment is None else float(segment),
        "config": None if config is None else _plain(config),
        "signature": signature,
        "metrics": None if metrics is None else _plain(metrics),
        "origin": None if origin is None else _plain(origin),
        "demixlab_version": __version__,
        "git_commit": git_commit(),
    }


def save_package(package: tp.Mapping[str, tp.Any], path: tp.Union[str, Path]) -> None:
    """Write a model file atomically (readers never see a half-written file)."""
    check_package(package, str(path))
    save_torch(dict(package), path)


def load_package(path: tp.Union[str, Path]) -> tp.Dict[str, tp.Any]:
    """Read a model file with `weights_only=True`.

    Raises :class:`DemixError` naming the file when it is missing, corrupt, not a demixlab model
    file (e.g. a pickled demucs model, a training checkpoint) or of a newer format.
    """
    package = load_torch(path)
    check_package(package, str(path))
    return package


def check_package(package: tp.Any, where: str = "model package") -> None:
    """Raise a one-line :class:`DemixError` unless `package` is a model file's content we can read."""
    if not isinstance(package, dict) or "format" not in package:
        hint = " (a training checkpoint: export it with `demixlab export SIG`)" if (
            isinstance(package, dict) and "model_options" in package) else ""
        raise DemixError(f"{where}: not a demixlab model file{hint}")
    name, _, version = str(package["format"]).partition("/")
    if name != _FORMAT_NAME or not version.isdigit():
        raise DemixError(f"{where}: unknown model file format {package['format']!r} (expected {FORMAT})")
    if int(version) > int(_FORMAT_VERSION):
        raise DemixError(f"{where}: model file format {package['format']} is newer than this demixlab "
                         f"({__version__}, reads up to {QUANTIZED_FORMAT}); upgrade demixlab")
    missing = [field for field in REQUIRED_FIELDS if field not in package]
    if missing:
        raise DemixError(f"{where}: model file lacks the field(s) {', '.join(missing)}")
    if not isinstance(package["state"], dict) or not isinstance(package["kwargs"], dict):
        raise DemixError(f"{where}: model file 'state' and 'kwargs' must be dicts")
    if not isinstance(package.get("quantized", {}), dict):
        raise DemixError(f"{where}: model file 'quantized' must be a dict of encoded weights")
    if not isinstance(package["sources"], list) or not package["sources"]:
        raise DemixError(f"{where}: model file 'sources' must be a non-empty list")


def model_from_package(package: tp.Mapping[str, tp.Any],
                       overrides: tp.Optional[tp.Mapping[str, tp.Any]] = None,
                       share_weights: bool = False) -> SeparationModel:
    """Build the family's model from a model file's content, load its weights, eval mode.

    `overrides` replace constructor options stored in `kwargs` (inference options such as the
    UMX/X-UMX Wiener `wiener_iterations`, `wiener_window`, `softmask`, `residual`); an option the
    family does not have is a :class:`DemixError` naming it. With `share_weights`, the model's
    float32 parameters and buffers are the package's tensors, not copies (half the memory; the
    package then changes with the model).
    """
    where = str(package.get("signature") or package.get("family") or "model package") \
        if isinstance(package, dict) else "model package"
    check_package(package, where)
    family = get_family(package["family"])
    options = dict(package["kwargs"])
    options.update(overrides or {})
    model = family.build_model(package["sources"], int(package["samplerate"]), int(package["audio_channels"]),
                               options)
    state = package_state(package, where)
    try:
        model.load_state_dict(state, assign=share_weights)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first_line[:2])
        raise DemixError(f"{where}: weights do not fit the {family.name!r} model built from the file's "
                         f"options ({detail[:300]})") from None
    return model.eval()


def package_state(package: tp.Mapping[str, tp.Any], where: str = "model package") -> tp.Dict[str, torch.Tensor]:
    """A model file's weights as the model loads them: float16 weights as float32, and the
    `quantized` weights decoded (dequantized) to float32."""
    state = {key: value.float() if value.dtype == torch.float16 else value
             for key, value in package["state"].items()}
    for key, entry in (package.get("quantized") or {}).items():
        state[key] = decode_weight(entry, f"{where}: quantized[{key!r}]")
    return state


@functools.lru_cache(maxsize=1)
def git_commit() -> tp.Optional[str]:
    """The commit of the demixlab checkout this package runs from, or None (not a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def _plain(value: tp.Any) -> tp.Any:
    """Convert OmegaConf containers, tuples, paths and numpy scalars to plain python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a requirement
        pass
    if isinstance(value, dict):
        return {str(key) if not isinstance(key, (int, str)) else key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise DemixError(f"cannot store a {type(value).__name__} in a model file: plain containers only")
