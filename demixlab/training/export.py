"""Export trained XPs as model files (`demixlab export SIG [SIG ...]`).

Only the XP's checkpoint is read (no dataset is built): its best weights (the best of the raw and
EMA weights; the current weights when no best was recorded yet) become `OUT/SIG.th`, or
`OUT/SIG-<sha256[:8]>.th` with `sign` (the first 8 hex digits of the file's SHA-256). `half`
stores float16 weights. LoRA adapters (`finetune.lora`) are merged into the weights they adapt,
so the file holds exactly the family's keys. An XP whose training is not finished is exported with a warning. The
model file's `segment` is the model's :attr:`~demixlab.models.SeparationModel.chunk_seconds`.

An XP trained with `quant.diffq` is exported quantised: every weight DiffQ trained is rounded to the
integer bits its groups had with the best state and stored as integer levels in the file's
`quantized` field (format `demixlab-model/2`, see :mod:`demixlab.release.quantized`); loading
decodes them to float32 weights. Its `origin.diffq` records the mean bits and the sizes.
"""
import hashlib
import io
import logging
import typing as tp
from pathlib import Path

import torch

from ..errors import DemixError
from ..experiment import default_dora_dir, parse_signature
from ..files import atomic_path
from ..release.compression import prune_state
from ..release.model_file import QUANTIZED_FORMAT, load_package, model_from_package, package_model
from ..release.quantized import encoded_bytes, encoded_values, mean_bits
from .checkpoint import CHECKPOINT_NAME, read_checkpoint
from .diffq import quantize_state
from .finetune import merge_adapters

logger = logging.getLogger(__name__)


def find_xp_folder(signature: str, dora_dir: tp.Optional[Path] = None) -> Path:
    """The folder of the XP with this signature: `DORA_DIR/xps/SIG`, where Dora's folder defaults
    to the configured `dora.dir` (outputs/ under the current directory)."""
    folder = Path(dora_dir if dora_dir is not None else default_dora_dir()) / "xps" / signature
    if not folder.is_dir():
        raise DemixError(f"unknown experiment {signature}: no folder {folder} (run demixlab from the "
                         "directory `dora run` ran in, or pass --dora-dir)")
    return folder


def export(signature: tp.Any, out: Path, sign: bool = False, half: bool = False,
           dora_dir: tp.Optional[Path] = None, prune: tp.Optional[float] = None) -> Path:
    """Write the model file of one XP and return its path (`prune`: the fraction of smallest
    weights zeroed, see :func:`demixlab.release.compression.prune_state`)."""
    signature = parse_signature(signature, "SIG")
    folder = find_xp_folder(signature, dora_dir)
    checkpoint_path = folder / CHECKPOINT_NAME
    if not checkpoint_path.is_file():
        raise DemixError(f"experiment {signature} has no checkpoint yet ({checkpoint_path}): train it first")
    checkpoint = read_checkpoint(checkpoint_path)
    if not checkpoint.get("done"):
        logger.warning("experiment %s has not finished training (%d epochs so far): exporting its best "
                       "weights so far", signature, len(checkpoint.get("history") or []))
    state = merge_adapters(checkpoint.get("best_state") or checkpoint["model"])
    if prune:
        state = prune_state(state, prune)
    history = checkpoint.get("history") or []
    metrics = history[-1] if history else None
    bits = checkpoint.get("best_bits") if checkpoint.get("best_state") else checkpoint.get("bits")
    quantized: tp.Dict[str, tp.Any] = {}
    origin: tp.Dict[str, tp.Any] = {"kind": "xp", "folder": str(folder.resolve()),
                                    **({"prune": prune} if prune else {})}
    if bits:  # quant.diffq
        float_bytes = sum(state[name].numel() * 4 for name in bits)
        state, quantized = quantize_state(state, bits, int(checkpoint["group_size"]))
        stored = sum(encoded_bytes(entry) for entry in quantized.values())
        values = sum(encoded_values(entry) for entry in quantized.values())
        origin["diffq"] = {"group_size": int(checkpoint["group_size"]), "weights": len(quantized),
                           "mean_bits": round(mean_bits(quantized.values()), 3), "float32_bytes": float_bytes,
                           "stored_bytes": stored}
        logger.info("DiffQ: %d weight tensors (%d values) stored at %.2f bits on average: %.1f kB instead of "
                    "%.1f kB as float32", len(quantized), values, origin["diffq"]["mean_bits"], stored / 1024,
                    float_bytes / 1024)
    package = package_model(
        checkpoint["family"], checkpoint["model_options"], state, sources=checkpoint["sources"],
        samplerate=checkpoint["samplerate"], audio_channels=checkpoint["audio_channels"],
        config=checkpoint.get("config"), signature=signature, metrics=metrics, origin=origin, half=half)
    if quantized:
        package.update(format=QUANTIZED_FORMAT, quantized=quantized)
    model = model_from_package(package)  # checks that the weights fit the model they describe
    package["state"] = {key: package["state"][key] for key in model.state_dict()
                        if key in package["state"]}  # the family's key order
    package["segment"] = model.chunk_seconds
    del model

    buffer = io.BytesIO()
    torch.save(package, buffer)
    data = buffer.getvalue()
    name = f"{signature}-{hashlib.sha256(data).hexdigest()[:8]}" if sign else signature
    path = Path(out) / f"{name}.th"
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    load_package(path)  # what we wrote reads back the safe way
    return path
