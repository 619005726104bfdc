"""The onnxruntime backend: a model whose network runs in onnxruntime.

:class:`OnnxRuntimeModel` is a :class:`~demixlab.models.SeparationModel` like any other, so the
chunking, padding, blending, shifts and bags are the PyTorch path's: only the network part of
each chunk (see the contract's `network_inputs` / `run_network` / `network_outputs`) runs in the
exported graph (:mod:`demixlab.release.onnx_export`); the pre- and post-processing (STFT,
sliCQT, Wiener EM, inverse transforms) stay in PyTorch.
"""
import typing as tp
from pathlib import Path

import torch

from ..errors import DemixError
from ..models import SeparationModel
from ..release.onnx_export import load_manifest, open_session, run_session

BACKENDS = ("torch", "onnxruntime")


class OnnxRuntimeModel(SeparationModel):
    """`model`'s forward with its network replaced by the ONNX graph of the model file `model_path`.

    A graph whose time axis is not dynamic (see the manifest's `dynamic_time`) runs every chunk
    at its traced length: shorter chunks are padded to it like any chunk.
    """

    def __init__(self, model: SeparationModel, model_path: tp.Union[str, Path], name: str):
        super().__init__(model.sources, model.samplerate, model.audio_channels)
        self.model = model.eval()
        onnx_path, self.manifest = load_manifest(model_path, name)
        self.session = open_session(onnx_path)

    @property
    def chunk_seconds(self) -> tp.Optional[float]:
        """The wrapped model's."""
        return self.model.chunk_seconds

    def valid_length(self, length: int) -> int:
        """The wrapped model's, or the traced length when the graph's time axis is fixed."""
        if self.manifest.get("dynamic_time", True):
            return self.model.valid_length(length)
        traced = int(self.manifest["example_length"])
        if length > traced:
            raise DemixError(f"this ONNX export runs at most {traced} samples at once (its time axis is fixed): "
                             f"separate with --segment <= {traced / self.samplerate:g}")
        return traced

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        """Pre-processing in PyTorch, the network in onnxruntime, post-processing in PyTorch."""
        with torch.no_grad():
            inputs, context = self.model.network_inputs(mixture)
            outputs = run_session(self.session, list(inputs.values()))
            return self.model.network_outputs(outputs, context, mixture)
