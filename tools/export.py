"""Export trained XPs as model files: `python -m tools.export SIG [SIG ...] [-o release_models] [--sign] [--half]`.

Run from the directory `dora run` ran in (XPs are looked up under its `outputs/xps/`, or under
`--dora-dir DIR/xps/`). Only the
XP's checkpoint is read (no dataset is built): its best weights (the best of the raw and EMA
weights; the current weights when no best was recorded yet) become `OUT/SIG.th`, or
`OUT/SIG-<sha256[:8]>.th` with `--sign` (the first 8 hex digits of the file's SHA-256). `--half`
stores float16 weights. An XP whose training is not finished is exported with a warning.

The model file's `segment` (seconds per chunk when separating) is the model's `segment`
attribute when it has one (e.g. Demucs models: the training segment of HTDemucs, which it
cannot exceed), else None: separation then uses its default chunk length.
"""
import argparse
import hashlib
import io
import logging
import sys
import typing as tp
from pathlib import Path

import torch

from demixlab.errors import DemixError, exit_on_user_error
from demixlab.experiment import parse_signature
from demixlab.files import atomic_path, load_torch
from demixlab.package import load_package, model_from_package, package_model

logger = logging.getLogger("tools.export")

CHECKPOINT_NAME = "checkpoint.th"


def find_xp_folder(signature: str, dora_dir: tp.Optional[Path] = None) -> Path:
    """The folder of the XP with this signature: `DORA_DIR/xps/SIG`, where Dora's folder defaults
    to the configured `dora.dir` (outputs/ under the current directory)."""
    if dora_dir is None:
        from demixlab.train import main

        dora_dir = Path(main.dora.dir)
    folder = Path(dora_dir) / "xps" / signature
    if not folder.is_dir():
        raise DemixError(f"unknown experiment {signature}: no folder {folder} (run the export from the "
                         "directory `dora run` ran in, or pass --dora-dir)")
    return folder


def model_segment(model: torch.nn.Module) -> tp.Optional[float]:
    """Seconds the model should run on when splitting: its `max_segment` or `segment` attribute, if any."""
    for attribute in ("max_segment", "segment"):
        value = getattr(model, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def export(signature: tp.Any, out: Path, sign: bool = False, half: bool = False,
           dora_dir: tp.Optional[Path] = None) -> Path:
    """Write the model file of one XP and return its path."""
    signature = parse_signature(signature, "SIG")
    folder = find_xp_folder(signature, dora_dir)
    checkpoint_path = folder / CHECKPOINT_NAME
    if not checkpoint_path.is_file():
        raise DemixError(f"experiment {signature} has no checkpoint yet ({checkpoint_path}): train it first")
    checkpoint = load_torch(checkpoint_path)
    if not isinstance(checkpoint, dict) or "model_options" not in checkpoint:
        raise DemixError(f"{checkpoint_path}: not a demixlab training checkpoint")
    if not checkpoint.get("done"):
        logger.warning("experiment %s has not finished training (%d epochs so far): exporting its best "
                       "weights so far", signature, len(checkpoint.get("history") or []))
    state = checkpoint.get("best_state") or checkpoint["model"]
    history = checkpoint.get("history") or []
    metrics = history[-1] if history else None
    package = package_model(
        checkpoint["family"], checkpoint["model_options"], state, sources=checkpoint["sources"],
        samplerate=checkpoint["samplerate"], audio_channels=checkpoint["audio_channels"],
        config=checkpoint.get("config"), signature=signature, metrics=metrics,
        origin={"kind": "xp", "folder": str(folder.resolve())}, half=half)
    model = model_from_package(package)  # checks that the weights fit the model they describe
    package["segment"] = model_segment(model)
    del model

    buffer = io.BytesIO()
    torch.save(package, buffer)
    data = buffer.getvalue()
    name = f"{signature}-{hashlib.sha256(data).hexdigest()[:8]}" if sign else signature
    path = out / f"{name}.th"
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    load_package(path)  # what we wrote reads back the safe way
    return path


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.splitlines()[0])
    parser.add_argument("signatures", nargs="+", metavar="SIG", help="experiment signatures")
    parser.add_argument("-o", "--out", type=Path, default=Path("release_models"),
                        help="repository folder to write to (default: release_models)")
    parser.add_argument("--sign", action="store_true", help="name the file SIG-<sha256[:8]>.th")
    parser.add_argument("--half", action="store_true", help="store float16 weights")
    parser.add_argument("--dora-dir", type=Path, default=None,
                        help="Dora's output folder holding xps/ (default: dora.dir of the config, i.e. outputs/ "
                             "under the current directory)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    for signature in args.signatures:
        path = export(signature, args.out, sign=args.sign, half=args.half, dora_dir=args.dora_dir)
        print(path)


if __name__ == "__main__":
    main()
