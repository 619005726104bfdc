"""Import the reference implementations used as test oracles.

They install with `--no-deps` (see README); openunmix imports torchaudio at module level, which
cannot be imported with this torch build, so a stub module stands in for it.
"""
import importlib
import importlib.util
import sys
import types


def import_reference(name: str) -> types.ModuleType:
    """Import a reference package (openunmix, demucs, nsgt, norbert, museval, ...)."""
    if "torchaudio" not in sys.modules:
        try:
            importlib.import_module("torchaudio")
        except Exception:
            sys.modules.pop("torchaudio", None)
            sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    return importlib.import_module(name)


def import_roformer_reference(name: str) -> types.ModuleType:
    """audio-separator's vendored RoFormer module `name` (bs_roformer or mel_band_roformer): the
    classes the community checkpoints run with. The audio_separator package's own __init__ files
    import far more than these modules need, so empty package modules stand in for them."""
    if "audio_separator" in sys.modules:
        root = list(sys.modules["audio_separator"].__path__)[0]
    else:
        spec = importlib.util.find_spec("audio_separator")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("audio-separator is not installed (tests/requirements-reference.txt)")
        root = list(spec.submodule_search_locations)[0]
    for package, folder in (("audio_separator", root), ("audio_separator.separator", f"{root}/separator"),
                            ("audio_separator.separator.uvr_lib_v5", f"{root}/separator/uvr_lib_v5")):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [folder]
            sys.modules[package] = module
    return importlib.import_module(f"audio_separator.separator.uvr_lib_v5.roformer.{name}")
