"""Separating a live stream with causal models, at a fixed latency.

A model that declares a finite :attr:`~demixlab.models.SeparationModel.lookahead` (a causal model,
e.g. UMX/X-UMX with a unidirectional LSTM and no Wiener EM, or the realtime sliCQ-CDAE) separates
audio block by block: :class:`StreamingSeparator` takes blocks of any size and returns, for each,
as many samples of every stem, delayed by :attr:`StreamingSeparator.latency` samples. The delayed
stems are the stems of the whole signal (within float rounding): `streamed[..., latency:]` equals
the offline estimate. No chunking, overlap or shifts are involved: the model runs once over the stream.
"""
import collections
import typing as tp

import torch

from ..audio import convert_channels
from ..errors import DemixError
from ..models import ModelStreamer
from ..release.repository import Bag
from .streaming import take_samples


class StreamingSeparator:
    """Separate a live stream with a bag of causal models (see the module docstring).

    Blocks are (C, n) or (B, C, n) at the bag's sample rate, of any channel count (converted to
    the model's; a mono input gives mono stems). :meth:`push` returns {stem: block of n samples},
    the stems delayed by `latency` samples (zeros first); :meth:`flush` returns the last
    `latency` samples once the stream ended.
    """

    def __init__(self, bag: Bag):
        self.bag = bag
        self._members: tp.List[tp.Tuple[tp.Any, ModelStreamer]] = []
        lookaheads = []
        for member in bag.members:
            if not member.active:
                continue
            assert member.model is not None
            lookahead = member.model.lookahead
            if lookahead is None:
                raise DemixError(f"model {member.name!r} of family {member.package.get('family', '?')} cannot "
                                 "separate a stream: it declares no finite lookahead (only causal models stream, "
                                 "see README: Streaming)")
            lookaheads.append(int(lookahead))
            self._members.append((member, member.model.eval().streamer()))
        self.latency = max(lookaheads)  # samples between a sample of input and the same sample of the stems
        self._ready: tp.List[tp.Deque[torch.Tensor]] = [collections.deque() for _ in self._members]
        self._produced = [0] * len(self._members)
        self._combined = 0  # stem samples combined so far
        self._output: tp.Deque[torch.Tensor] = collections.deque()  # the delayed stems not yet returned
        self._shape: tp.Optional[tp.Tuple[int, tp.Tuple[int, ...]]] = None  # (dim, leading shape) of the blocks
        self.pushed = 0
        self.finished = False

    def push(self, block: torch.Tensor) -> tp.Dict[str, torch.Tensor]:
        """Separate the next block (C, n) or (B, C, n); return {stem: n samples}, `latency` late."""
        if self.finished:
            raise DemixError("the stream was flushed: start a new one with Separator.stream()")
        shape = (block.dim(), tuple(block.shape[:-1]))
        if block.dim() not in (2, 3) or (self._shape is not None and shape != self._shape):
            raise DemixError(f"expected consecutive (channels, time) or (batch, channels, time) blocks of one shape, "
                             f"got {tuple(block.shape)}")
        first = self._shape is None
        self._shape = shape
        mixture = convert_channels((block if block.dim() == 3 else block[None]).float(), self.bag.audio_channels)
        for index, (_, streamer) in enumerate(self._members):
            self._collect(index, streamer.push(mixture))
        if first:  # the delay line starts with `latency` samples of silence
            self._output.append(torch.zeros(mixture.shape[0], len(self.bag.sources), mixture.shape[1], self.latency))
        self._combine()
        self.pushed += block.shape[-1]
        return self._stems(take_samples(self._output, block.shape[-1]))

    def flush(self) -> tp.Dict[str, torch.Tensor]:
        """End the stream: return the last `latency` samples of the delayed stems."""
        if self._shape is None:
            raise DemixError("the stream is empty: push blocks before flushing it")
        if self.finished:
            raise DemixError("the stream was already flushed")
        self.finished = True
        for index, (_, streamer) in enumerate(self._members):
            self._collect(index, streamer.finish())
        self._combine()
        return self._stems(take_samples(self._output, self.latency))

    def _collect(self, index: int, stems: torch.Tensor) -> None:
        if stems.shape[-1]:
            self._ready[index].append(stems)
            self._produced[index] += stems.shape[-1]

    def _combine(self) -> None:
        """Blend the members' stems where all have some (per-source weights, as apply_bag)."""
        upto = min(self._produced)
        if upto <= self._combined:
            return
        count = upto - self._combined
        output: tp.Optional[torch.Tensor] = None
        for (member, _), ready in zip(self._members, self._ready):
            estimate = take_samples(ready, count)
            member_sources = list(member.package["sources"])
            if output is None:
                output = estimate.new_zeros(estimate.shape[0], len(self.bag.sources), *estimate.shape[2:])
            for index, source in enumerate(self.bag.sources):
                weight = member.weights[index]
                if weight > 0:
                    output[:, index] += weight * estimate[:, member_sources.index(source)]
        assert output is not None
        total = torch.tensor([sum(member.weights[index] for member in self.bag.members)
                              for index in range(len(self.bag.sources))], dtype=output.dtype)
        self._output.append(output.div_(total[:, None, None]))
        self._combined = upto

    def _stems(self, estimate: torch.Tensor) -> tp.Dict[str, torch.Tensor]:
        assert self._shape is not None
        batched = self._shape[0] == 3
        stems = {}
        for index, source in enumerate(self.bag.sources):
            stem = estimate[:, index]
            if self._shape[1][-1] == 1:
                stem = convert_channels(stem, 1)
            stems[source] = stem if batched else stem[0]
        return stems
