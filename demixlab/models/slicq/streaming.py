"""The realtime sliCQ-CDAE on a live stream: the block-wise sliCQT, the autoencoders run slice by
slice with their state carried over, the mixture phase and the overlap-add of the inverse.

Layouts as in :mod:`.cdae` and :mod:`.blocks`: a block of the transform is (B, C, F_b, m, T_b) for
m slices of T_b coefficients (hop T_b / 2 in the flattened coefficients); masks come out as
(B, sources, C, F_b, m, T_b).
"""
import typing as tp
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ...errors import DemixError
from ...spectral import StreamingInverseSliCQT, StreamingSliCQT
from ..contract import ModelStreamer
from .blocks import BlockCDAE

if tp.TYPE_CHECKING:  # pragma: no cover - the model module imports this one
    from .cdae import SliCQCDAE


@contextmanager
def _native_kernels() -> tp.Iterator[None]:
    """Inference with ATen's own convolutions: oneDNN builds a primitive per new shape (6 s for the 70
    blocks' first slices at full size) and takes 3x longer than ATen on a slice or two (measured)."""
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


class BlockCDAEStreamer:
    """A realtime :class:`BlockCDAE` (eval mode) on slices that arrive in order: :meth:`push` returns
    the masks of the slices that no later slice changes, those of the block on all slices (within
    float rounding).

    Each layer runs once per frame of its input, on what arrived plus the frames of its kernel's
    past it keeps: the causal first convolution keeps the last T_b - 1 normalised coefficients
    (zeros at the start, its causal padding), the (f, 4) convolution the last 3 frames, the two
    transposed convolutions the last frames that still add to coming outputs. A mask of slice s
    needs slice s + 2 (`slice_lookahead`); the last two slices' masks come with `final`.
    """

    slice_lookahead = 2  # slices after a mask's slice that it depends on (frame 2s + 4 of the first layer)

    def __init__(self, block: BlockCDAE):
        if not block.realtime:
            raise DemixError("only a realtime (causal) sliCQ-CDAE block can separate a stream")
        self.block = block
        self.hop = block.frames // 2
        self._inputs: tp.Optional[torch.Tensor] = None  # last T_b - 1 normalised coefficients
        self._encoded: tp.Optional[torch.Tensor] = None  # last (up to) 3 frames after encode1
        self._inner: tp.Optional[torch.Tensor] = None  # last 3 frames after encode2 (zeros before the first)
        self._decoded: tp.Optional[torch.Tensor] = None  # last frame before decode1 (zeros before the first)
        self._masks: tp.Optional[torch.Tensor] = None  # mask coefficients not yet returned as whole slices

    def push(self, magnitude: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Add the magnitudes of the next slices (B, C, F_b, m, T_b); return the masks that are final
        (B, sources, C, F_b, m', T_b). With `final` (the stream ended), all the remaining masks."""
        block = self.block
        batch, channels, bins, slices, frames = magnitude.shape
        if slices:
            x = magnitude.reshape(batch, channels, bins, slices * frames)
            x = (x + block.input_mean[:, None]) * block.input_scale[:, None]
            x = x.repeat(1, block.sources, 1, 1)
            if self._inputs is None:  # the causal padding of the first convolution
                self._inputs = x.new_zeros(*x.shape[:-1], frames - 1)
            x = torch.cat([self._inputs, x], dim=-1)
            self._inputs = x[..., x.shape[-1] - (frames - 1):]
            conv = block.encode1
            y = F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)  # 2m frames
            self._encode(F.relu(block.norm1(y)))
        if final:
            if self._inner is None:
                raise DemixError(f"audio too short for the sliCQ-CDAE: need at least {block.min_slices()} slices")
            self._decode(block.decode2(self._inner)[..., 3:])  # the frames after the last encoded one
        return self._whole_slices(magnitude)

    def _encode(self, encoded: torch.Tensor) -> None:
        """Run the (f, 4) convolution on the new encode1 frames, then the transposed one."""
        block = self.block
        if self._encoded is not None:
            encoded = torch.cat([self._encoded, encoded], dim=-1)
        self._encoded = encoded[..., -3:]
        if encoded.shape[-1] < 4:
            return
        inner = F.relu(block.norm2(block.encode2(encoded)))
        if self._inner is None:  # no frames before the first: they add nothing
            self._inner = inner.new_zeros(*inner.shape[:-1], 3)
        inner = torch.cat([self._inner, inner], dim=-1)
        self._inner = inner[..., -3:]
        self._decode(block.decode2(inner)[..., 3:inner.shape[-1]])  # outputs with all 4 inputs known

    def _decode(self, decoded: torch.Tensor) -> None:
        """BatchNorm and ReLU on new decode2 frames, then decode1: keep the coefficients they finish."""
        block = self.block
        decoded = F.relu(block.norm3(decoded))
        if self._decoded is None:
            self._decoded = decoded.new_zeros(*decoded.shape[:-1], 1)
        decoded = torch.cat([self._decoded, decoded], dim=-1)
        self._decoded = decoded[..., -1:]
        # Coefficient u adds frames u // hop - 1 and u // hop: final from the kept frame's second hop on.
        masks = torch.sigmoid(block.decode1(decoded)[..., self.hop:decoded.shape[-1] * self.hop])
        self._masks = masks if self._masks is None else torch.cat([self._masks, masks], dim=-1)

    def _whole_slices(self, magnitude: torch.Tensor) -> torch.Tensor:
        """The complete slices of the kept mask coefficients, (B, sources, C, F_b, m, T_b), for
        inputs like `magnitude` (B, C, F_b, ., T_b)."""
        batch, channels, bins, _, frames = magnitude.shape
        count = 0 if self._masks is None else self._masks.shape[-1] // frames
        if self._masks is None:
            done = magnitude.new_zeros(batch, self.block.sources * channels, bins, 0)
        else:
            done, self._masks = self._masks[..., :count * frames], self._masks[..., count * frames:]
        return done.reshape(batch, self.block.sources, channels, bins, count, frames)


class SliCQCDAEStreamer(ModelStreamer):
    """A realtime sliCQ-CDAE (see :attr:`SliCQCDAE.lookahead`) on a stream: the sliCQT slices each
    block completes go through the autoencoders (:class:`BlockCDAEStreamer`, state carried over),
    the masks multiply the mixture (its phase), and the overlap-add of the inverse sliCQT returns
    the samples no later slice changes. The model must be in eval mode (BatchNorm statistics)."""

    def __init__(self, model: "SliCQCDAE"):
        if model.training:
            raise DemixError("a sliCQ-CDAE streams in eval mode (model.eval()): in training mode its BatchNorm "
                             "layers normalise with the statistics of the whole input")
        self.model = model
        self.analysis = StreamingSliCQT(model.transform)
        self.networks = [BlockCDAEStreamer(block) for block in model.network.blocks]
        self.synthesis = StreamingInverseSliCQT(model.transform)
        self._waiting: tp.Optional[tp.List[torch.Tensor]] = None  # mixture slices whose masks are due
        self.length = 0

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Add a (B, C, n) block; return the stem samples it completes (B, S, C, m)."""
        self.length += block.shape[-1]
        with _native_kernels():
            return self._separate(self.analysis.push(block.float()), final=False)

    def finish(self) -> torch.Tensor:
        """The remaining stem samples (the end of the signal zero-padded, as the sliCQT pads it)."""
        if self.length < self.model.min_length:
            raise DemixError(f"audio too short for the slicq_cdae model: {self.length} samples, need at least "
                             f"{self.model.min_length} ({self.model.network.min_slices()} slices of the sliCQT)")
        with _native_kernels():
            returned = self.synthesis.emitted  # before the last slices: never more than was pushed
            last = self._separate(self.analysis.finish(), final=True)
            rest = self.synthesis.finish(max(self.length, self.synthesis.emitted))
            return torch.cat([last, rest], dim=-1)[..., :self.length - returned]  # the inverse's crop

    def _separate(self, blocks: tp.List[torch.Tensor], final: bool) -> torch.Tensor:
        """The stem samples that the next sliCQT slices complete."""
        batch, channels = blocks[0].shape[:2]
        nothing = blocks[0].real.new_zeros(batch, len(self.model.sources), channels, 0)
        if not final and blocks[0].shape[-2] == 0:
            return nothing
        magnitudes = [block.abs() for block in blocks]
        masks = [network.push(magnitude, final) for network, magnitude in zip(self.networks, magnitudes)]
        waiting = blocks if self._waiting is None else \
            [torch.cat([old, new], dim=-2) for old, new in zip(self._waiting, blocks)]
        count = masks[0].shape[-2]
        ready = [block[..., :count, :] for block in waiting]
        self._waiting = [block[..., count:, :] for block in waiting]
        if count == 0:
            return nothing
        estimates = self.model.estimate(ready, [block.abs() for block in ready], masks)
        return self.synthesis.push(estimates)
