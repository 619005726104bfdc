"""The model contract: what every family's model offers the rest of demixlab.

The solver, the chunked separation, bags and model files only use what :class:`SeparationModel`
declares. A family's model subclasses it and overrides the optional hooks it needs; nothing
outside a family probes a model for attributes. An importer (a family's optional way to read
weights written by another implementation) returns an :class:`ImportedModel`.
"""
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import DemixError

# {"params": [...], "lr": float or None, "weight_decay": float or None}: a named optimizer group.
ParameterGroup = tp.Dict[str, tp.Any]
PathLike = tp.Union[str, Path]

# The order demixlab's datasets use for MUSDB's four sources.
MUSDB_SOURCES = ("drums", "bass", "other", "vocals")


def require(condition: bool, message: str) -> None:
    """Raise a one-line :class:`DemixError` with `message` unless `condition` holds."""
    if not condition:
        raise DemixError(message)


def check_model_io(sources: tp.Sequence[str], samplerate: int, audio_channels: int) -> None:
    """The checks every model starts with: distinct source names, a positive rate, channels."""
    require(len(sources) > 0 and len(set(sources)) == len(sources),
            f"sources must be a non-empty list of distinct names, got {list(sources)}")
    require(samplerate > 0, f"samplerate must be positive, got {samplerate}")
    require(audio_channels >= 1, f"audio_channels must be at least 1, got {audio_channels}")


@dataclass
class NetworkAxes:
    """Names and dynamic axes ({axis: label}) of a model's network inputs and outputs, in order.

    Labels shared between tensors are the same size (e.g. "batch", "frames"); every other axis is
    fixed by the model's options."""

    inputs: tp.Dict[str, tp.Dict[int, str]]
    outputs: tp.Dict[str, tp.Dict[int, str]]


class SeparationModel(nn.Module):
    """Base class of every family's model: a (B, C, T) mixture in, (B, S, C, T) stems out.

    Args:
        sources: names of the stems, in output order (distinct).
        samplerate: the rate the model runs at, in Hz.
        audio_channels: channels C of the mixture and of every stem.

    `forward(mixture)` must accept any length T the model supports in eval mode and return
    estimates of the same length. A family's objective may call its own model with extra keyword
    arguments (e.g. `for_loss=True`); everything else calls `forward(mixture)` only.

    Optional hooks, whose defaults suit a model that takes any length as it is:

    - :meth:`valid_length`: the input length to run for `length` samples; the chunked separation
      pads each chunk (centred, with real neighbouring samples) to it and crops the estimate.
    - :attr:`chunk_seconds`: seconds per chunk when separating long signals (stored in model files).
    - :attr:`parallel_chunks`: whether the chunked separation on the CPU runs chunks side by side in
      threads of one intra-op thread each (default) rather than one after the other on all threads.
    - :meth:`parameter_groups`: named parameter groups with their own learning rate or weight
      decay (`optim.groups.NAME.*` overrides them).
    - :attr:`lookahead` and :meth:`streamer`: a model whose output at a sample depends on the input
      up to `lookahead` samples later only (a causal model; framing included) separates a live
      stream block by block (:class:`ModelStreamer`). Default: None, not streamable.
    - :meth:`network_inputs`, :meth:`run_network`, :meth:`network_outputs`: `forward` split into the
      pre-processing (STFT, sliCQT...), the neural network and the post-processing (Wiener EM,
      masking, inverse transforms), so that the network alone can run in another runtime (ONNX);
      :meth:`network_axes` names the network's tensors and their dynamic axes. The default split
      is the whole `forward` as the network. For every model,
      `network_outputs(run_network(*network_inputs(x)[0].values()), network_inputs(x)[1], x)` is
      `forward(x)`.
    """

    def __init__(self, sources: tp.Sequence[str], samplerate: int, audio_channels: int):
        super().__init__()
        check_model_io(list(sources), samplerate, audio_channels)
        self.sources: tp.List[str] = list(sources)
        self.samplerate = int(samplerate)
        self.audio_channels = int(audio_channels)

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every family overrides it
        """Separate a (B, C, T) mixture into (B, S, C, T) stems."""
        raise NotImplementedError

    def valid_length(self, length: int) -> int:
        """The input length to run for `length` samples (default: `length` itself)."""
        return length

    @property
    def chunk_seconds(self) -> tp.Optional[float]:
        """Seconds per chunk when separating a long signal, or None to let the caller choose."""
        return None

    @property
    def parallel_chunks(self) -> bool:
        """Whether the chunked separation on the CPU may run this model's chunks side by side, in
        threads that share torch's intra-op threads (one each), by default. True (the default) for a
        model whose forward pass is a chain of tensor operations; a model that spreads its forward
        pass over threads itself says False (its chunks then run one after the other)."""
        return True

    @property
    def lookahead(self) -> tp.Optional[int]:
        """Samples of input after an output sample that it depends on, for a model that can separate
        a stream (:meth:`streamer`); None (the default): it needs whole chunks, it cannot stream."""
        return None

    def streamer(self) -> "ModelStreamer":
        """A fresh :class:`ModelStreamer` for one stream (only for a model with a `lookahead`)."""
        raise DemixError(f"{type(self).__name__} declares no lookahead: it cannot separate a stream")

    def parameter_groups(self) -> tp.Dict[str, ParameterGroup]:
        """Named optimizer groups besides the default one (default: none)."""
        return {}

    def network_inputs(self, mixture: torch.Tensor) -> tp.Tuple[tp.Dict[str, torch.Tensor], tp.Any]:
        """The pre-processing of `forward`: ({name: real tensor} for :meth:`run_network`, in order, and
        a context for :meth:`network_outputs`). Default: the mixture itself, no context."""
        return {"mixture": mixture}, None

    def run_network(self, *inputs: torch.Tensor) -> tp.Tuple[torch.Tensor, ...]:
        """The neural network of `forward` (what an ONNX export holds): real tensors in, a tuple of
        real tensors out. Default: `forward` on the mixture."""
        return (self(inputs[0]),)

    def network_outputs(self, outputs: tp.Sequence[torch.Tensor], context: tp.Any,
                        mixture: torch.Tensor) -> torch.Tensor:
        """The post-processing of `forward`: the network's outputs (and the context of
        :meth:`network_inputs`) -> (B, S, C, T) stems. Default: the network's only output."""
        return outputs[0]

    def network_axes(self) -> NetworkAxes:
        """The dynamic axes of the network's inputs and outputs, {name: {axis: label}}, outputs in
        the order :meth:`network` returns them. Default: batch and time of the mixture and stems."""
        return NetworkAxes(inputs={"mixture": {0: "batch", 2: "time"}}, outputs={"stems": {0: "batch", 3: "time"}})


class ModelStreamer:
    """`forward` of a causal model on a signal that arrives in blocks (see
    :attr:`SeparationModel.lookahead`).

    :meth:`push` takes the next (B, C, n) block and returns the next (B, S, C, m) samples of the
    stems that no later input changes; once `k` samples were pushed, at least `k - lookahead`
    stem samples have been returned. :meth:`finish` returns the rest: `k` samples in all, those
    of `forward` on the whole signal (within float rounding). A family's model subclasses it."""

    def push(self, block: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every streamer overrides it
        """Add a (B, C, n) block; return the stem samples it completes (B, S, C, m), m >= 0."""
        raise NotImplementedError

    def finish(self) -> torch.Tensor:  # pragma: no cover - every streamer overrides it
        """The stem samples still due once the signal ended (B, S, C, m)."""
        raise NotImplementedError


@dataclass
class ImportedModel:
    """Weights converted from another implementation: what a model file needs, plus its origin.

    Attributes:
        family: the registry name of the family the weights load into.
        kwargs: the family's constructor options.
        state: the weights, in the family's state-dict format.
        sources, samplerate, audio_channels: as :class:`SeparationModel`'s.
        segment: seconds per chunk when separating (None: the model's own choice).
        origin: where the weights came from (format, files), recorded in the model file.
        checked: the state was already loaded into the family's model with `strict=True`.
    """

    family: str
    kwargs: tp.Dict[str, tp.Any]
    state: tp.Dict[str, torch.Tensor]
    sources: tp.List[str]
    samplerate: int
    audio_channels: int
    segment: tp.Optional[float] = None
    origin: tp.Dict[str, tp.Any] = field(default_factory=dict)
    checked: bool = False


# importer(paths, **options) -> ImportedModel: the files or folders a user names on `demixlab import
# FORMAT`, and the format's keyword options (e.g. msst's `complement`). Its docstring's first line
# says what the format reads.
Importer = tp.Callable[..., ImportedModel]


def single_path(paths: tp.Sequence[PathLike], format_name: str) -> Path:
    """The one file or folder an importer of `format_name` takes, or a :class:`DemixError`."""
    if len(paths) != 1:
        raise DemixError(f"{format_name}: expected one model file or folder, got {len(paths)}")
    return Path(paths[0])
