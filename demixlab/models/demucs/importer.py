"""Import Hybrid Demucs packages into the ``hdemucs`` / ``htdemucs`` families (`demixlab import demucs FILE`).

demucs writes a model as ``torch.save`` of ``demucs.states.serialize_model``: a pickled dict with
``klass``, ``args``, ``kwargs``, ``state``. It is read here with torch's weights-only unpickler:
tensors, plain containers, ``fractions.Fraction`` and the two supported model class *names*
(`demucs.hdemucs.HDemucs`, `demucs.htdemucs.HTDemucs`), which are never imported. Any other
global makes the file a :class:`DemixError` naming it; nothing in the file is executed.
"""
import inspect
import math
import pickletools
import re
import typing as tp
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path

import torch

from ...errors import DemixError
from ..contract import ImportedModel, PathLike, single_path
from .hdemucs import HDemucs
from .htdemucs import HTDemucs

MODEL_CLASSES = {"hdemucs": HDemucs, "htdemucs": HTDemucs}

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
    accepted = set(inspect.signature(MODEL_CLASSES[family_name]).parameters)
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




def import_demucs_paths(paths: tp.Sequence[Path]) -> ImportedModel:
    """One demucs model package (.th) of an HDemucs or HTDemucs.

    The importer registered for `demixlab import demucs` (see :func:`import_demucs`).
    """
    return import_demucs(single_path(paths, "demucs"))
