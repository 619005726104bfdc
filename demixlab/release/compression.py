"""Smaller models: float16 weights, int8 quantisation of ONNX graphs, global magnitude pruning.

- Model files (`.th`): :func:`prune_state` zeroes the smallest weights of the whole network
  (global magnitude pruning of every weight matrix and kernel, as xumx-sliCQ-V2 pruned its
  model); float16 storage is :func:`~demixlab.release.model_file.package_model`'s `half`.
- ONNX graphs: :func:`convert_onnx_weights` stores the weights as float16 (each followed by a Cast
  to float32, so every CPU kernel still computes in float32) or quantises the weights of the
  MatMul, Gemm and LSTM nodes to int8 with onnxruntime's dynamic quantiser (activations are
  quantised on the fly at run time).
"""
import typing as tp
from pathlib import Path

import torch

from ..errors import DemixError
from .model_file import FORMAT, load_package, model_from_package, package_state, save_package

ONNX_WEIGHTS = ("float32", "float16", "int8")
INT8_OPERATORS = ["MatMul", "Gemm", "LSTM"]


def prunable(key: str, value: torch.Tensor) -> bool:
    """Whether a state entry is a weight matrix or kernel that pruning may zero (floating, at
    least 2-D, its name's last part a weight: Linear/Conv/LSTM weights; not norms, biases or
    statistics)."""
    return value.is_floating_point() and value.dim() >= 2 and key.rsplit(".", 1)[-1].startswith("weight")


def prune_state(state: tp.Mapping[str, torch.Tensor], fraction: float) -> tp.Dict[str, torch.Tensor]:
    """A copy of `state` whose `fraction` smallest-magnitude prunable weights (see :func:`prunable`),
    ranked together across all layers, are zero."""
    if not 0 <= fraction < 1:
        raise DemixError(f"--prune must be a fraction in [0, 1), got {fraction}")
    keys = [key for key, value in state.items() if prunable(key, value)]
    if not keys:
        raise DemixError("this model has no weight matrices or kernels to prune")
    pruned = {key: value.clone() for key, value in state.items()}
    magnitudes = torch.cat([state[key].detach().abs().flatten().float() for key in keys])
    count = int(fraction * magnitudes.numel())
    if count == 0:
        return pruned
    threshold = torch.kthvalue(magnitudes, count).values
    for key in keys:
        pruned[key][state[key].abs() <= threshold] = 0
    return pruned


def variant_name(name: str, *, half: bool = False, prune: tp.Optional[float] = None,
                 quantize: tp.Optional[str] = None) -> str:
    """`NAME-prune30-half-int8`-style name of a compressed copy of the model `NAME`."""
    parts = [name] + ([f"prune{round(100 * prune):d}"] if prune else []) + (["half"] if half else [])
    return "-".join(parts + ([quantize] if quantize else []))


def write_variant(path: tp.Union[str, Path], out: tp.Optional[tp.Union[str, Path]] = None, *, half: bool = False,
                  prune: tp.Optional[float] = None, quantize: tp.Optional[str] = None) -> Path:
    """Write a compressed copy of the model file `path` as `OUT/<variant name>.th` (OUT: its folder):
    pruned (`prune` fraction) and/or with float16 weights; `quantize` only names it (the int8
    weights live in its ONNX export). Returns the new file's path."""
    path = Path(path)
    package = dict(load_package(path))
    state = package_state(package, str(path))  # quantized (DiffQ) weights are decoded: the variant stores floats
    package.pop("quantized", None)
    package["format"] = FORMAT
    if prune:
        state = prune_state(state, prune)
    package["state"] = {key: value.half() if half and value.is_floating_point() else value
                        for key, value in state.items()}
    package["origin"] = {**(package.get("origin") or {}), "compressed_from": path.name, "prune": prune, "half": half,
                         "quantize": quantize}
    model_from_package(package)  # the weights still fit
    target = Path(out or path.parent) / f"{variant_name(path.stem, half=half, prune=prune, quantize=quantize)}.th"
    save_package(package, target)
    return target


def zero_fraction(state: tp.Mapping[str, torch.Tensor]) -> float:
    """The fraction of prunable weights that are zero."""
    values = [value for key, value in state.items() if prunable(key, value)]
    total = sum(value.numel() for value in values)
    return sum(int((value == 0).sum()) for value in values) / max(total, 1)


def convert_onnx_weights(path: tp.Union[str, Path], weights: str) -> None:
    """Convert the ONNX graph at `path` in place: float32 (unchanged), float16 or int8 (see the
    module docstring)."""
    if weights not in ONNX_WEIGHTS:
        raise DemixError(f"unknown ONNX weight format {weights!r}: expected one of {', '.join(ONNX_WEIGHTS)}")
    if weights == "float16":
        _float16_weights(Path(path))
    elif weights == "int8":
        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic
        except ImportError:
            raise DemixError("int8 quantisation needs onnxruntime: pip install onnxruntime") from None
        quantized = Path(path).with_name(Path(path).name + ".int8")
        try:
            quantize_dynamic(str(path), str(quantized), op_types_to_quantize=INT8_OPERATORS,
                             weight_type=QuantType.QInt8)
            quantized.replace(path)
        finally:
            quantized.unlink(missing_ok=True)


def _float16_weights(path: Path) -> None:
    """Store every float32 initializer of at least 16 values as float16, cast back where used."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inputs = {value.name for value in graph.input}
    casts = []
    for initializer in graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT or initializer.name in inputs:
            continue
        array = numpy_helper.to_array(initializer)
        if array.size < 16:
            continue
        name = initializer.name
        initializer.CopyFrom(numpy_helper.from_array(array.astype(np.float16), f"{name}__float16"))
        # The Cast gives the weight its old name back: the nodes using it are unchanged.
        casts.append(helper.make_node("Cast", [f"{name}__float16"], [name], to=onnx.TensorProto.FLOAT,
                                      name=f"{name}__cast"))
    for node in reversed(casts):
        graph.node.insert(0, node)
    onnx.save(model, str(path))
