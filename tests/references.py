"""Import the reference implementations used as test oracles.

They install with `--no-deps` (see README); openunmix imports torchaudio at module level, which
cannot be imported with this torch build, so a stub module stands in for it.
"""
import importlib
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
