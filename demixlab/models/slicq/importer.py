"""Import xumx-sliCQ-V2 weights into the ``slicq_cdae`` family (`demixlab import xumx_slicq PATH`)."""
import typing as tp
from pathlib import Path

from ...errors import DemixError
from ...files import load_torch, read_json_object
from ..contract import MUSDB_SOURCES, ImportedModel, PathLike, single_path
from .cdae import SliCQCDAE, load_reference_state_dict

XUMX_SLICQ_FILES = ("xumx_slicq_v2.pth", "xumx_slicq_v2.json")


def import_xumx_slicq(path: PathLike) -> ImportedModel:
    """Convert xumx-sliCQ-V2 weights to the ``slicq_cdae`` family.

    `path` is the folder its trainer writes (``xumx_slicq_v2.pth``, the `Unmix` state dict, and
    ``xumx_slicq_v2.json``, whose ``args`` give fscale, fbins, fmin, sample_rate and realtime) or
    the ``.pth`` itself (the JSON is looked up next to it; without it, the published defaults:
    Bark, 262 bins, 32.9 Hz, 44.1 kHz, offline). The autoencoder widths come from the weights.
    Sources are drums, bass, other, vocals (the reference's bass, vocals, other, drums, reordered).
    """
    path = Path(path)
    weights = path / XUMX_SLICQ_FILES[0] if path.is_dir() else path
    state = load_torch(weights)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a .chkpnt
        state = state["state_dict"]
    if not isinstance(state, dict) or "sliced_umx.0.cdaes.0.0.weight" not in state:
        raise DemixError(f"{weights}: not an xumx-sliCQ-V2 state dict (no 'sliced_umx.0.cdaes.0.0.weight')")
    if any(key.startswith("sliced_umx.0.cdaes.0.") and "lstm" in key for key in state):
        raise DemixError(f"{weights}: the LSTM variant of xumx-sliCQ (--lstm) has no demixlab family")
    args = (read_json_object(weights.parent / XUMX_SLICQ_FILES[1]) or {}).get("args") or {}
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
    sources = list(MUSDB_SOURCES)
    model = SliCQCDAE(sources, samplerate, channels, **kwargs)
    load_reference_state_dict(model, state)
    return ImportedModel(family="slicq_cdae", kwargs=kwargs, state=model.state_dict(), sources=sources,
                         samplerate=samplerate, audio_channels=channels, segment=None,
                         origin={"kind": "import", "format": "xumx_slicq", "file": str(weights.resolve())},
                         checked=True)




def import_xumx_slicq_paths(paths: tp.Sequence[Path]) -> ImportedModel:
    """The folder xumx-sliCQ-V2's trainer writes, or its .pth.

    The importer registered for `demixlab import xumx_slicq` (see :func:`import_xumx_slicq`).
    """
    return import_xumx_slicq(single_path(paths, "xumx_slicq"))
