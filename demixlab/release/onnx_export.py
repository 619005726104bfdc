"""ONNX exports of model files: the network in ONNX, the rest in demixlab.

A model's :meth:`~demixlab.models.SeparationModel.run_network` (what the contract declares as the
neural network: no STFT, sliCQT, Wiener EM or inverse transform) is exported with torch's
TorchScript-tracing exporter to `NAME.onnx`, next to a manifest `NAME.onnx.json`:

- format: "demixlab-onnx/1"; family, sources, samplerate, audio_channels (as the model file's)
- model_sha256: SHA-256 of the model file the graph was exported from (a stale export is refused)
- inputs / outputs: {name: {"axes": {axis: label}, "dtype": ...}} in order, dynamic axes labelled
- example_length: the mixture length traced; dynamic_time: whether other lengths were checked to
  give PyTorch's result (otherwise every chunk is run at `example_length`)
- max_error: the largest difference to PyTorch seen on the checks, relative to the output's peak
- weights: "float32", "float16" or "int8" (dynamic quantisation of MatMul/Gemm/LSTM weights)
- opset, demixlab_version

:func:`load_manifest` checks a manifest against its model file; running the graph belongs to
:mod:`demixlab.separation.onnx_backend`.
"""
import contextlib
import hashlib
import json
import re
import typing as tp
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import DemixError
from ..files import atomic_path, read_json_object
from ..models import SeparationModel
from .model_file import model_from_package

ONNX_FORMAT = "demixlab-onnx/1"
OPSET = 18
EXAMPLE_SECONDS = 4.0
"""Seconds of mixture traced when the model file gives no segment."""


def onnx_paths(model_path: tp.Union[str, Path]) -> tp.Tuple[Path, Path]:
    """(`NAME.onnx`, `NAME.onnx.json`) of the model file `NAME.th`."""
    model_path = Path(model_path)
    return model_path.with_suffix(".onnx"), model_path.with_suffix(".onnx.json")


def file_sha256(path: tp.Union[str, Path]) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class NetworkModule(nn.Module):
    """`model.run_network` as a module whose forward takes the network inputs positionally."""

    def __init__(self, model: SeparationModel):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tp.Tuple[torch.Tensor, ...]:
        return tuple(self.model.run_network(*inputs))


def _push(stack: tp.List[str], label: str) -> None:
    stack.append(label)


def _pop(stack: tp.List[str]) -> None:  # returns None: a forward hook's result would replace the output
    if stack:
        stack.pop()


@contextlib.contextmanager
def _layer_tracker(model: nn.Module) -> tp.Iterator[tp.List[str]]:
    """Yield the stack of the submodules being run (qualified name and class), kept by hooks."""
    stack: tp.List[str] = []
    handles = []
    for name, module in model.named_modules():
        label = f"{name or 'model'} ({type(module).__name__})"
        handles.append(module.register_forward_pre_hook(lambda *_, label=label: _push(stack, label)))
        handles.append(module.register_forward_hook(lambda *_: _pop(stack)))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def _layer_of_operator(module: "NetworkModule", inputs: tp.Tuple[torch.Tensor, ...], reason: str
                       ) -> tp.Optional[str]:
    """The layer of the model (qualified name and class) whose forward calls the operator an exporter
    error names (`... the operator 'aten::X' ...`), found in a trace's scopes; None when unknown."""
    match = re.search(r"'(aten::[A-Za-z0-9_]+)'", reason)
    if match is None:
        return None
    try:
        traced = torch.jit.trace(module, inputs, check_trace=False)
    except Exception:  # pragma: no cover - the export traced it already
        return None
    layers = dict(module.model.named_modules())
    for node in traced.inlined_graph.nodes():
        if node.kind() == match.group(1):
            scope = node.scopeName().split("/")[-1].replace("__module.", "")
            name = scope[len("model."):] if scope.startswith("model.") else ""
            if name in layers:
                return f"{name or 'model'} ({type(layers[name]).__name__})"
    return None


def trace_to_onnx(model: SeparationModel, mixture: torch.Tensor, path: Path, opset: int = OPSET) -> None:
    """Export `model.run_network` traced on the network inputs of `mixture` to `path` (not atomic).

    A layer ONNX cannot express is a one-line :class:`DemixError` naming the layer and the reason."""
    axes = model.network_axes()
    inputs, _ = model.network_inputs(mixture)
    if list(inputs) != list(axes.inputs):
        raise DemixError(f"the model's network inputs {list(inputs)} differ from its declared axes {list(axes.inputs)}")
    module = NetworkModule(model).eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    with _layer_tracker(model) as stack, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: shape checks become constants
        try:
            torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(axes.inputs),
                              output_names=list(axes.outputs), dynamic_axes={**axes.inputs, **axes.outputs},
                              opset_version=opset, dynamo=False)
        except DemixError:
            raise
        except Exception as error:
            lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
            reason = lines[0] if lines else type(error).__name__
            layer = stack[-1] if stack else _layer_of_operator(module, tuple(inputs.values()), reason)
            where = f"layer {layer}" if layer else f"the {type(model).__name__} network"
            raise DemixError(f"cannot export {where} to ONNX: {reason[:300]}") from None
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def export_onnx(package: tp.Mapping[str, tp.Any], model_path: tp.Union[str, Path], *,
                out: tp.Optional[tp.Union[str, Path]] = None, seconds: tp.Optional[float] = None,
                weights: str = "float32", opset: int = OPSET) -> Path:
    """Write the ONNX graph and manifest of the model file `model_path` (whose content is
    `package`) as `OUT/NAME.onnx` and `OUT/NAME.onnx.json` (OUT: the model file's folder by default);
    returns the manifest's path.

    The network is traced on `seconds` of mixture (default: the model file's segment, else
    :data:`EXAMPLE_SECONDS`), then checked in onnxruntime against PyTorch on batch 2 and on another
    length. `weights` float16 converts the graph's weights and activations, int8 quantises its
    MatMul/Gemm weights dynamically (onnxruntime's quantiser).
    """
    from .compression import convert_onnx_weights  # onnx is only needed here

    model_path = Path(model_path)
    folder = Path(out) if out is not None else model_path.parent
    onnx_path, manifest_path = onnx_paths(folder / model_path.name)
    model = model_from_package(package)
    samplerate = int(package["samplerate"])
    seconds = seconds or package.get("segment") or model.chunk_seconds or EXAMPLE_SECONDS
    length = int(model.valid_length(int(float(seconds) * samplerate)))
    generator = torch.Generator().manual_seed(0)
    mixture = 0.1 * torch.randn(1, model.audio_channels, length, generator=generator)
    with atomic_path(onnx_path) as tmp:
        trace_to_onnx(model, mixture, tmp, opset)
        checks = _check_against_torch(model, tmp, length, generator)  # float32: are other lengths exact?
        if weights != "float32":
            convert_onnx_weights(tmp, weights)
            checks["max_error"] = _check_against_torch(model, tmp, length, generator, other_length=False)["max_error"]
    axes = model.network_axes()
    manifest = {
        "format": ONNX_FORMAT,
        "family": package["family"],
        "sources": list(package["sources"]),
        "samplerate": samplerate,
        "audio_channels": int(package["audio_channels"]),
        "model_file": model_path.name,
        "model_sha256": file_sha256(model_path),
        "inputs": {name: {"axes": {str(k): v for k, v in labels.items()}} for name, labels in axes.inputs.items()},
        "outputs": {name: {"axes": {str(k): v for k, v in labels.items()}} for name, labels in axes.outputs.items()},
        "example_length": length,
        "dynamic_time": checks["dynamic_time"],
        "max_error": checks["max_error"],
        "weights": weights,
        "opset": opset,
        "demixlab_version": __version__,
    }
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def _check_against_torch(model: SeparationModel, path: Path, length: int, generator: torch.Generator,
                         other_length: bool = True) -> tp.Dict[str, tp.Any]:
    """Run the graph in onnxruntime on batch 2 at the traced length and (`other_length`) another one;
    the largest error relative to the output peak, and whether the other length matched."""
    session = open_session(path)
    errors = []
    dynamic_time = True
    other = int(model.valid_length(max(1, length * 3 // 4))) if other_length else length
    for index, size in enumerate([length] + ([other] if other != length else [])):
        mixture = 0.1 * torch.randn(2, model.audio_channels, size, generator=generator)
        inputs, _ = model.network_inputs(mixture)
        with torch.no_grad():
            expected = model.run_network(*inputs.values())
        try:
            outputs = run_session(session, list(inputs.values()))
        except Exception:  # onnxruntime rejects the shape: the traced graph fixed the length
            if index == 0:
                raise
            dynamic_time = False
            continue
        error = max(_relative_error(output, reference) for output, reference in zip(outputs, expected))
        if index > 0 and error > 1e-2:
            dynamic_time = False
            continue
        errors.append(error)
    return {"dynamic_time": dynamic_time, "max_error": max(errors)}


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    if output.shape != reference.shape:
        return float("inf")
    scale = float(reference.abs().max()) or 1.0
    return float((output.float() - reference.float()).abs().max()) / scale


def open_session(path: tp.Union[str, Path], threads: tp.Optional[int] = None) -> tp.Any:
    """An onnxruntime CPU session of `path` (a :class:`DemixError` when onnxruntime is missing)."""
    try:
        import onnxruntime
    except ImportError:
        raise DemixError("onnxruntime is not installed: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise DemixError(f"{path}: onnxruntime cannot load it ({str(error).strip().splitlines()[0][:200]})") from None


_NUMPY_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def run_session(session: tp.Any, inputs: tp.Sequence[torch.Tensor]) -> tp.List[torch.Tensor]:
    """Run a session on tensors given in its input order (cast to the graph's input types);
    float32 tensors out."""
    feeds = {}
    for spec, tensor in zip(session.get_inputs(), inputs):
        dtype = _NUMPY_TYPES.get(spec.type, "float32")
        feeds[spec.name] = tensor.detach().cpu().numpy().astype(dtype, copy=False)
    return [torch.from_numpy(output).float() for output in session.run(None, feeds)]


def load_manifest(model_path: tp.Union[str, Path], name: str) -> tp.Tuple[Path, tp.Dict[str, tp.Any]]:
    """The ONNX graph path and manifest of the model file `model_path`, checked: a missing export
    says how to make one, a stale one (another model file) says to re-export."""
    onnx_path, manifest_path = onnx_paths(model_path)
    hint = f"make one with `demixlab export {model_path} --onnx`"
    manifest = read_json_object(manifest_path)
    if manifest is None or not onnx_path.is_file():
        raise DemixError(f"model {name!r} has no ONNX export ({onnx_path} is missing): {hint}")
    if manifest.get("format") != ONNX_FORMAT:
        raise DemixError(f"{manifest_path}: unknown format {manifest.get('format')!r} (expected {ONNX_FORMAT})")
    if manifest.get("model_sha256") != file_sha256(model_path):
        raise DemixError(f"{onnx_path} was exported from another version of {Path(model_path).name}: {hint}")
    return onnx_path, manifest
