"""Import Open-Unmix weights into the ``umx`` family (`demixlab import openunmix ...`).

Open-Unmix's training script writes one ``TARGET.pth`` state dict per target (the hub names them
``TARGET-<hash>.pth``), with, next to them, ``TARGET.json`` (training ``args``) and
``separator.json`` (``sample_rate``, ``nfft``, ``nhop``, ``nb_channels``). Shapes that the
weights determine (bins, channels, hidden size, bandwidth, layers) are read from the weights; the
JSON files must agree with them.
"""
import re
import typing as tp
from pathlib import Path

import torch

from ...errors import DemixError
from ...files import load_torch, read_json_object
from ...spectral import bandwidth_to_max_bin
from ..contract import MUSDB_SOURCES, ImportedModel, PathLike

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
            rank = {name: index for index, name in enumerate(MUSDB_SOURCES)}
            found.sort(key=lambda p: (rank.get(openunmix_target_name(p), len(rank)), openunmix_target_name(p)))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DemixError(f"{path}: no such file or folder")
    return files


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
    """Open-Unmix target weights: TARGET.pth files, or folders of them (to the `umx` family).

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
        args = (read_json_object(path.parent / f"{target}.json") or {}).get("args") or {}
        separator = read_json_object(path.parent / "separator.json") or {}
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
    bandwidth = min((max_bin - 0.5) * rate / n_fft, rate / 2)
    if bandwidth_to_max_bin(rate, n_fft, bandwidth) != max_bin:  # pragma: no cover - guards the arithmetic
        raise DemixError(f"cannot express max_bin={max_bin} as a bandwidth at {rate} Hz, n_fft={n_fft}")
    return bandwidth

