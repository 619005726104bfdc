"""Import weights trained by other implementations into demixlab model files.

Each importer reads files as the reference implementation writes them and returns an
:class:`ImportedModel` (family, constructor options, weights and metadata), which
:func:`save_imported` turns into a normal demixlab model file (`REPO/NAME.th`, see
:mod:`demixlab.package`) with its origin recorded.

- ``openunmix``: one ``TARGET.pth`` state dict per target (also the hub's ``TARGET-<hash>.pth``),
  plus, when present next to it, the ``TARGET.json`` (training ``args``) and ``separator.json``
  (``sample_rate``, ``nfft``, ``nhop``, ``nb_channels``) that Open-Unmix's training script writes.
  Shapes that the weights determine (bins, channels, hidden size, bandwidth, layers) are read from
  the weights; the JSON files must agree with them.
- ``demucs``: a package written by ``demucs.states.serialize_model`` and ``torch.save`` (a pickled
  dict with ``klass``, ``args``, ``kwargs``, ``state``). It is read with torch's weights-only
  unpickler: tensors, plain containers, ``fractions.Fraction`` and the two supported model class
  *names* (`demucs.hdemucs.HDemucs`, `demucs.htdemucs.HTDemucs`), which are never imported. Any
  other global makes the file a :class:`DemixError` naming it; nothing in the file is executed.
- ``xumx_slicq``: the folder xumx-sliCQ-V2's trainer writes (``xumx_slicq_v2.pth`` and
  ``xumx_slicq_v2.json``), mapped to the ``slicq_cdae`` family.
"""
import json
import logging
import math
import pickletools
import re
import typing as tp
import warnings
import zipfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

from .errors import DemixError
from .files import load_torch

logger = logging.getLogger(__name__)

PathLike = tp.Union[str, Path]

# The order demixlab's datasets use; other target names follow alphabetically.
MUSDB_ORDER = ("drums", "bass", "other", "vocals")


@dataclass
class ImportedModel:
    """A converted model: what :func:`demixlab.package.package_model` needs, plus its origin."""

    family: str
    kwargs: tp.Dict[str, tp.Any]
    state: tp.Dict[str, torch.Tensor]
    sources: tp.List[str]
    samplerate: int
    audio_channels: int
    segment: tp.Optional[float] = None
    origin: tp.Dict[str, tp.Any] = field(default_factory=dict)
    checked: bool = False  # the state was already loaded into the family's model (strict)


# ------------------------------------------------------------------------------------ openunmix
_HUB_SUFFIX = re.compile(r"^(?P<target>.+)-[0-9a-f]{8}$")
_LSTM_KEY = re.compile(r"^lstm\.weight_ih_l(?P<layer>\d+)$")
_UMX_EXTRA_KEYS = ("stft.window", "transform.0.window", "sample_rate")


def openunmix_target_name(path: Path) -> str:
    """The target a ``.pth`` file holds: ``vocals.pth`` and the hub's ``vocals-b62c91ce.pth`` hold ``vocals``."""
    match = _HUB_SUFFIX.match(path.stem)
    return match.group("target") if match else path.stem


def _openunmix_files(sources: tp.Sequence[PathLike]) -> tp.List[Path]:
    """Expand folders into their ``.pth`` files (known MUSDB targets first); keep files in the given order."""
    files: tp.List[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(path.glob("*.pth"))
            if not found:
                raise DemixError(f"{path}: no Open-Unmix target weights (*.pth) in this folder")
            rank = {name: index for index, name in enumerate(MUSDB_ORDER)}
            found.sort(key=lambda p: (rank.get(openunmix_target_name(p), len(rank)), openunmix_target_name(p)))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DemixError(f"{path}: no such file or folder")
    return files


def _read_json(path: Path) -> tp.Optional[tp.Dict[str, tp.Any]]:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DemixError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(content, dict):
        raise DemixError(f"{path}: expected a JSON object")
    return content


def _openunmix_state(path: Path) -> tp.Dict[str, torch.Tensor]:
    state = load_torch(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a TARGET.chkpnt
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise DemixError(f"{path}: expected an Open-Unmix state dict (parameter name -> tensor)")
    missing = [key for key in ("input_mean", "fc1.weight", "fc3.weight", "output_mean") if key not in state]
    if missing:
        raise DemixError(f"{path}: not an Open-Unmix target state dict (no {missing[0]!r})")
    return {key: value for key, value in state.items() if key not in _UMX_EXTRA_KEYS}


def _umx_shapes(state: tp.Mapping[str, torch.Tensor], path: Path) -> tp.Dict[str, tp.Any]:
    """Architecture options implied by one target's weights."""
    nb_bins = int(state["output_mean"].shape[0])
    max_bin = int(state["input_mean"].shape[0])
    hidden_size, fc1_inputs = (int(size) for size in state["fc1.weight"].shape)
    if fc1_inputs % max_bin:
        raise DemixError(f"{path}: fc1.weight has {fc1_inputs} inputs, not a multiple of max_bin={max_bin}")
    channels = fc1_inputs // max_bin
    if int(state["fc3.weight"].shape[0]) != channels * nb_bins:
        raise DemixError(f"{path}: fc3.weight has {state['fc3.weight'].shape[0]} outputs, expected "
                         f"{channels} channels x {nb_bins} bins")
    layers = sorted(int(match.group("layer")) for match in map(_LSTM_KEY.match, state) if match)
    if not layers:
        raise DemixError(f"{path}: no LSTM weights (lstm.weight_ih_l0)")
    return {"nb_bins": nb_bins, "max_bin": max_bin, "hidden_size": hidden_size, "audio_channels": channels,
            "nb_layers": len(layers), "unidirectional": "lstm.weight_ih_l0_reverse" not in state}


def _agree(path: Path, what: str, stored: tp.Any, expected: tp.Any) -> None:
    if stored is not None and stored != expected:
        raise DemixError(f"{path}: {what}={stored!r} disagrees with the weights ({expected!r})")


def import_openunmix(sources: tp.Sequence[PathLike], *, samplerate: tp.Optional[int] = None,
                     hop_length: tp.Optional[int] = None) -> ImportedModel:
    """Convert Open-Unmix target weights (files or folders of ``TARGET.pth``) to the ``umx`` family.

    Targets become sources in the given order (a folder: drums, bass, other, vocals first). The
    sample rate and hop come from ``separator.json`` / ``TARGET.json`` next to the weights, else
    from `samplerate` / `hop_length`, else Open-Unmix's defaults (44100 Hz, n_fft // 4).
    """
    files = _openunmix_files(sources)
    if not files:
        raise DemixError("no Open-Unmix weights given")
    targets = [openunmix_target_name(path) for path in files]
    duplicates = sorted({name for name in targets if targets.count(name) > 1})
    if duplicates:
        raise DemixError(f"target {duplicates[0]!r} is given twice: "
                         f"{', '.join(str(p) for p, t in zip(files, targets) if t == duplicates[0])}")
    shapes: tp.Optional[tp.Dict[str, tp.Any]] = None
    state: tp.Dict[str, torch.Tensor] = {}
    rates, hops = set(), set()
    for path, target in zip(files, targets):
        target_state = _openunmix_state(path)
        target_shapes = _umx_shapes(target_state, path)
        if shapes is None:
            shapes = target_shapes
        elif target_shapes != shapes:
            different = next(key for key in shapes if shapes[key] != target_shapes[key])
            raise DemixError(f"{path}: {different}={target_shapes[different]} differs from the other targets' "
                             f"({shapes[different]}); demixlab's umx shares the architecture across targets")
        n_fft = 2 * (target_shapes["nb_bins"] - 1)
        args = (_read_json(path.parent / f"{target}.json") or {}).get("args") or {}
        separator = _read_json(path.parent / "separator.json") or {}
        for meta, where in ((args, path.parent / f"{target}.json"), (separator, path.parent / "separator.json")):
            _agree(where, "nfft", meta.get("nfft"), n_fft)
            _agree(where, "nb_channels", meta.get("nb_channels"), target_shapes["audio_channels"])
        _agree(path.parent / f"{target}.json", "hidden_size", args.get("hidden_size"), target_shapes["hidden_size"])
        rate = separator.get("sample_rate") or args.get("sample_rate")
        hop = separator.get("nhop") or args.get("nhop")
        if rate is not None:
            rates.add(int(rate))
        if hop is not None:
            hops.add(int(hop))
        state.update({f"targets.{target}.{key}": value for key, value in target_state.items()})
    assert shapes is not None
    if len(rates) > 1 or len(hops) > 1:
        raise DemixError(f"the targets' JSON files disagree on the sample rate {sorted(rates)} or hop {sorted(hops)}")
    rate = samplerate or (rates.pop() if rates else 44100)
    n_fft = 2 * (shapes["nb_bins"] - 1)
    hop = hop_length or (hops.pop() if hops else n_fft // 4)
    kwargs = {"n_fft": n_fft, "hop_length": hop, "hidden_size": shapes["hidden_size"],
              "nb_layers": shapes["nb_layers"], "unidirectional": shapes["unidirectional"],
              "bandwidth": _bandwidth_for(shapes["max_bin"], rate, n_fft),
              "wiener_iterations": 1, "wiener_window": 300, "softmask": False, "residual": False}
    return ImportedModel(family="umx", kwargs=kwargs, state=state, sources=targets, samplerate=rate,
                         audio_channels=shapes["audio_channels"], segment=None,
                         origin={"kind": "import", "format": "openunmix", "files": [str(p.resolve()) for p in files]})


def _bandwidth_for(max_bin: int, rate: int, n_fft: int) -> float:
    """A bandwidth (Hz) that demixlab's `bandwidth_to_max_bin` turns into exactly `max_bin` bins:
    half-way between bin `max_bin - 1` and the next, capped at the Nyquist frequency."""
    from .spectral import bandwidth_to_max_bin

    bandwidth = min((max_bin - 0.5) * rate / n_fft, rate / 2)
    if bandwidth_to_max_bin(rate, n_fft, bandwidth) != max_bin:  # pragma: no cover - guards the arithmetic
        raise DemixError(f"cannot express max_bin={max_bin} as a bandwidth at {rate} Hz, n_fft={n_fft}")
    return bandwidth


# --------------------------------------------------------------------------------------- demucs
# Model classes demucs pickles by reference, and the demixlab family each one maps to.
DEMUCS_CLASSES = {"demucs.hdemucs.HDemucs": "hdemucs", "demucs.htdemucs.HTDemucs": "htdemucs"}
_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")


class DemucsClassName(str):
    """The name of the model class a demucs package refers to (the class itself is never imported)."""


def _class_stand_in(qualified_name: str) -> type:
    """A harmless class the weights-only unpickler returns in place of a demucs model class."""
    return type(qualified_name.rsplit(".", 1)[-1], (), {"qualified_name": qualified_name})


def read_demucs_package(path: PathLike) -> tp.Dict[str, tp.Any]:
    """Read a pickled demucs package without importing demucs or executing anything from it.

    Returns the package dict with ``klass`` replaced by a :class:`DemucsClassName`. A file that
    needs a global outside the allow-list is a :class:`DemixError` naming that global.
    """
    path = Path(path)
    if not path.is_file():
        raise DemixError(f"{path}: no such file")
    stand_ins = {name: _class_stand_in(name) for name in DEMUCS_CLASSES}
    allowed: tp.List[tp.Any] = [(cls, name) for name, cls in stand_ins.items()] + [Fraction]
    if zipfile.is_zipfile(path):
        # List the globals first: an unsupported model class gets a precise message.
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as error:
            raise DemixError(f"{path}: not a readable torch file ({_first_line(error)})") from None
        refused = [name for name in needed if name not in DEMUCS_CLASSES and name != "fractions.Fraction"]
        if refused:
            raise _refusal(path, refused[0])
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler warns about pickle protocols
            package = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        match = _GLOBAL_IN_ERROR.search(str(error))
        name = match.group(1) if match else _first_unsafe_global(path)
        if name:
            raise _refusal(path, name) from None
        raise DemixError(f"{path}: not a readable demucs package ({_first_line(error)})") from None
    if not isinstance(package, dict) or not {"klass", "kwargs", "state"} <= set(package):
        raise DemixError(f"{path}: not a demucs model package (expected a dict with klass, args, kwargs, state; "
                         "a bag of models is a .yaml file)")
    klass = package["klass"]
    if not isinstance(klass, type) or getattr(klass, "qualified_name", None) not in DEMUCS_CLASSES:
        raise DemixError(f"{path}: 'klass' is {klass!r}, expected one of {', '.join(DEMUCS_CLASSES)}")
    package = dict(package)
    package["klass"] = DemucsClassName(klass.qualified_name)
    return package


def _first_unsafe_global(path: Path) -> tp.Optional[str]:
    """The first global a plain pickle file refers to that is neither torch's nor a container.

    The opcodes are only parsed (:mod:`pickletools`), never executed.
    """
    strings: tp.List[str] = []
    try:
        with open(path, "rb") as stream:
            for opcode, argument, _ in pickletools.genops(stream):
                if isinstance(argument, str) and "UNICODE" in opcode.name:
                    strings.append(argument)
                name = None
                if opcode.name in ("GLOBAL", "INST") and isinstance(argument, str):
                    name = argument.replace(" ", ".")
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                if name and not name.startswith(("torch.", "collections.OrderedDict")) \
                        and name not in DEMUCS_CLASSES and name != "fractions.Fraction":
                    return name
    except Exception:  # not a pickle, or truncated: nothing more to say
        return None
    return None


def _refusal(path: Path, name: str) -> DemixError:
    if name.startswith("demucs."):
        return DemixError(f"{path}: unsupported demucs model class {name} (supported: {', '.join(DEMUCS_CLASSES)}); "
                          "nothing was loaded")
    return DemixError(f"{path}: refusing to load: the file needs the global {name}, which is not an allowed "
                      "tensor/container type (nothing was executed)")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _segment_seconds(segment: tp.Any, samplerate: int, where: str) -> float:
    """Seconds as a float whose `int(segment * samplerate)` is the reference's sample count
    (a Fraction such as 39/5 may not survive the float conversion exactly)."""
    try:
        exact = Fraction(segment)
    except (TypeError, ValueError):
        raise DemixError(f"{where}: kwargs segment={segment!r} is not a number of seconds") from None
    samples = math.floor(exact * samplerate)
    seconds = float(exact)
    if int(seconds * samplerate) != samples:
        seconds = (samples + 0.5) / samplerate
    return seconds


def import_demucs(path: PathLike) -> ImportedModel:
    """Convert a demucs HDemucs/HTDemucs package (``serialize_model`` + ``torch.save``) to the
    ``hdemucs`` / ``htdemucs`` family; constructor options carry over unchanged."""
    import inspect

    from .models import get_family

    path = Path(path)
    package = read_demucs_package(path)
    family_name = DEMUCS_CLASSES[package["klass"]]
    args = list(package.get("args") or [])
    kwargs = dict(package.get("kwargs") or {})
    if len(args) > 1:
        raise DemixError(f"{path}: {len(args)} positional constructor arguments; only `sources` may be positional")
    if args:
        if "sources" in kwargs:
            raise DemixError(f"{path}: `sources` given both positionally and as a keyword")
        kwargs["sources"] = args[0]
    state = package["state"]
    if not isinstance(state, dict):
        raise DemixError(f"{path}: 'state' is a {type(state).__name__}, expected a dict of tensors")
    if state.get("__quantized"):
        raise DemixError(f"{path}: the weights are DiffQ-quantized; only plain (float32/float16) states import")
    sources = kwargs.pop("sources", None)
    if not isinstance(sources, (list, tuple)) or not sources:
        raise DemixError(f"{path}: kwargs has no list of sources")
    samplerate = int(kwargs.pop("samplerate", 44100))
    audio_channels = int(kwargs.pop("audio_channels", 2))
    family = get_family(family_name)
    accepted = set(inspect.signature(family.model_class).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise DemixError(f"{path}: {package['klass']} option {unknown[0]!r} has no counterpart in demixlab's "
                         f"{family_name} family")
    segment = None
    if "segment" in kwargs:
        segment = _segment_seconds(kwargs["segment"], samplerate, str(path))
        kwargs["segment"] = segment
    kwargs = {key: list(value) if isinstance(value, tuple) else value for key, value in kwargs.items()}
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DemixError(f"{path}: state[{key!r}] is a {type(value).__name__}, expected a tensor")
        tensors[key] = value.float() if value.dtype == torch.float16 else value
    origin = {"kind": "import", "format": "demucs", "file": str(path.resolve()), "class": str(package["klass"])}
    if isinstance(package.get("training_args"), dict) and package["training_args"].get("dora"):
        origin["demucs_training"] = True
    return ImportedModel(family=family_name, kwargs=kwargs, state=tensors, sources=[str(s) for s in sources],
                         samplerate=samplerate, audio_channels=audio_channels, segment=segment, origin=origin)


# ----------------------------------------------------------------------------------- xumx_slicq
XUMX_SLICQ_FILES = ("xumx_slicq_v2.pth", "xumx_slicq_v2.json")


def import_xumx_slicq(path: PathLike) -> ImportedModel:
    """Convert xumx-sliCQ-V2 weights to the ``slicq_cdae`` family.

    `path` is the folder its trainer writes (``xumx_slicq_v2.pth``, the `Unmix` state dict, and
    ``xumx_slicq_v2.json``, whose ``args`` give fscale, fbins, fmin, sample_rate and realtime) or
    the ``.pth`` itself (the JSON is looked up next to it; without it, the published defaults:
    Bark, 262 bins, 32.9 Hz, 44.1 kHz, offline). The autoencoder widths come from the weights.
    Sources are drums, bass, other, vocals (the reference's bass, vocals, other, drums, reordered).
    """
    from .models import family_names, get_family

    if "slicq_cdae" not in family_names():
        raise DemixError("the slicq_cdae model family is not available in this demixlab; cannot import "
                         "xumx-sliCQ-V2 weights")
    from .models.slicq_cdae import load_reference_state_dict

    path = Path(path)
    weights = path / XUMX_SLICQ_FILES[0] if path.is_dir() else path
    state = load_torch(weights)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a .chkpnt
        state = state["state_dict"]
    if not isinstance(state, dict) or "sliced_umx.0.cdaes.0.0.weight" not in state:
        raise DemixError(f"{weights}: not an xumx-sliCQ-V2 state dict (no 'sliced_umx.0.cdaes.0.0.weight')")
    if any(key.startswith("sliced_umx.0.cdaes.0.") and "lstm" in key for key in state):
        raise DemixError(f"{weights}: the LSTM variant of xumx-sliCQ (--lstm) has no demixlab family")
    args = (_read_json(weights.parent / XUMX_SLICQ_FILES[1]) or {}).get("args") or {}
    samplerate = int(args.get("sample_rate", 44100))
    scale = str(args.get("fscale", "bark"))
    if float(args.get("fgamma", 0.0) or 0.0) != 0.0:
        raise DemixError(f"{weights.parent / XUMX_SLICQ_FILES[1]}: fgamma={args['fgamma']} (variable-Q offset) "
                         "is not supported")
    kwargs = {"scale": scale, "fbins": int(args.get("fbins", 262)), "fmin": float(args.get("fmin", 32.9)),
              "fmax": float(args.get("fmax", samplerate / 2)),
              "hidden_1": int(state["sliced_umx.0.cdaes.0.0.weight"].shape[0]),
              "hidden_2": int(state["sliced_umx.0.cdaes.0.3.weight"].shape[0]),
              "realtime": bool(args.get("realtime", False)), "wiener_iterations": 1}
    channels = int(args.get("nb_channels", 2))
    sources = list(MUSDB_ORDER)
    model = get_family("slicq_cdae").build_model(sources, samplerate, channels, kwargs)
    load_reference_state_dict(model, state)
    return ImportedModel(family="slicq_cdae", kwargs=kwargs, state=model.state_dict(), sources=sources,
                         samplerate=samplerate, audio_channels=channels, segment=None,
                         origin={"kind": "import", "format": "xumx_slicq", "file": str(weights.resolve())},
                         checked=True)


# ---------------------------------------------------------------------------------------- output
IMPORTERS: tp.Dict[str, tp.Callable[..., ImportedModel]] = {
    "openunmix": lambda sources: import_openunmix(sources),
    "demucs": lambda sources: import_demucs(_single(sources, "demucs")),
    "xumx_slicq": lambda sources: import_xumx_slicq(_single(sources, "xumx_slicq")),
}


def _single(sources: tp.Sequence[PathLike], kind: str) -> PathLike:
    if len(sources) != 1:
        raise DemixError(f"{kind}: expected one model file, got {len(sources)}")
    return sources[0]


def import_model(kind: str, sources: tp.Sequence[PathLike]) -> ImportedModel:
    """Run the importer `kind` (openunmix, demucs, xumx_slicq) on `sources`."""
    if kind not in IMPORTERS:
        raise DemixError(f"unknown import format {kind!r}: choose one of {', '.join(IMPORTERS)}")
    return IMPORTERS[kind](list(sources))


def to_package(imported: ImportedModel, *, half: bool = False) -> tp.Dict[str, tp.Any]:
    """A demixlab model file's content; the weights are checked by building the model."""
    from .package import model_from_package, package_model

    package = package_model(imported.family, imported.kwargs, imported.state, sources=imported.sources,
                            samplerate=imported.samplerate, audio_channels=imported.audio_channels,
                            origin=imported.origin, segment=imported.segment, half=half)
    if not imported.checked:
        model_from_package(package)  # fails with a DemixError if the weights do not fit
    return package


def save_imported(imported: ImportedModel, repo: PathLike, name: str, *, half: bool = False,
                  overwrite: bool = False) -> Path:
    """Write `imported` as ``REPO/NAME.th`` (atomically) and return that path."""
    from .package import save_package

    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name) or name.endswith((".th", ".yaml")):
        raise DemixError(f"model name {name!r}: use letters, digits, '_', '-' and '.', without an extension")
    path = Path(repo) / f"{name}.th"
    if path.exists() and not overwrite:
        raise DemixError(f"{path} already exists (pass --force to replace it)")
    if (Path(repo) / f"{name}.yaml").exists():
        raise DemixError(f"{Path(repo) / (name + '.yaml')}: a bag already has the name {name!r}")
    save_package(to_package(imported, half=half), path)
    return path
