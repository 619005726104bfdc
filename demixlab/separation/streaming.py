"""Separation of a signal that arrives block by block, in memory that does not grow with its length.

:func:`stream_bag` computes exactly what :func:`~demixlab.separation.bags.apply_bag` computes (the
same chunks, context padding, triangular blending, shifts and per-source weights, in the same
order of float operations), but reads the mixture from an iterator of blocks and yields the
stems as soon as they are final: a sample is final once every chunk covering it has run. Only
about one chunk of input and of output per model and shift is held. The length of the signal is
learnt when the blocks run out, so a pipe of unknown length works too.
"""
import collections
import itertools
import typing as tp
from concurrent.futures import Future

import torch

from ..errors import DemixError
from ..models import SeparationModel
from ..release.repository import Bag
from ..threads import shared_thread_pool
from .bags import blend_estimates, chunk_frames
from .chunking import _model_device, check_batch_chunks, check_jobs, chunk_jobs, run_batch


class InputWindow:
    """The part of a streamed (B, C, T) signal still needed, pulled from `blocks` on demand.

    :meth:`read` returns any range with zeros outside [0, T), as padding does in the in-memory
    path; :meth:`discard` drops what no reader needs any more.
    """

    def __init__(self, blocks: tp.Iterable[torch.Tensor]):
        self._blocks = iter(blocks)
        self._data: tp.Optional[torch.Tensor] = None
        self._start = 0  # position of _data's first sample
        self.end = 0  # samples received so far
        self.length: tp.Optional[int] = None  # T, once the blocks ran out

    def reaches(self, position: int) -> bool:
        """Whether the signal has at least `position` samples (pulls blocks until it knows)."""
        while self.end < position and self.length is None:
            block = next(self._blocks, None)
            if block is None:
                self.length = self.end
                break
            if block.dim() != 3:
                raise DemixError(f"expected blocks of shape (batch, channels, time), got {tuple(block.shape)}")
            self._data = block if self._data is None else torch.cat([self._data, block], dim=-1)
            self.end += block.shape[-1]
        return self.end >= position

    def read(self, begin: int, end: int) -> torch.Tensor:
        """Samples [begin, end), zero outside the signal; `begin` must not precede what was discarded."""
        self.reaches(end)
        if self._data is None:
            raise DemixError("the mixture is empty")
        assert begin >= self._start or begin < 0 and self._start == 0, (begin, self._start)
        inside = self._data[..., max(begin, 0) - self._start:max(min(end, self.end) - self._start, 0)]
        left = max(0, -begin)
        right = max(0, end - begin - left - inside.shape[-1])
        return torch.nn.functional.pad(inside, (left, right))

    def discard(self, before: int) -> None:
        """Forget the samples before position `before`."""
        if self._data is not None and before > self._start:
            self._data = self._data[..., before - self._start:].clone()
            self._start = before


class _Pass:
    """One overlap-add pass of a model over the (possibly shifted) stream.

    The pass sees the signal `v[t] = x[t + delta]` of length `len(x) + extra` (a shift pass of
    :func:`~demixlab.separation.chunking.apply_model` pads then shifts), and its estimate of
    `x[p]` is its estimate of `v[p + crop]`. :meth:`run` yields the estimate of x, in order.
    """

    def __init__(self, model: SeparationModel, window: InputWindow, segment: tp.Optional[int], overlap: float,
                 jobs: int, delta: int = 0, extra: int = 0, crop: int = 0, batch_chunks: int = 1):
        self.model = model
        self.batch_chunks = batch_chunks
        self.window = window
        self.segment = segment
        self.overlap = overlap
        self.jobs = jobs
        self.delta, self.extra, self.crop = delta, extra, crop
        self.device = _model_device(model)
        self.needed_from = min(0, delta)  # earliest x position this pass will still read
        self.produced = 0  # x samples yielded so far
        self.done = False

    def _reaches(self, position: int) -> bool:
        return self.window.reaches(position - self.extra)

    def end_of_input(self) -> int:
        """The length of x (known once the blocks ran out)."""
        assert self.window.length is not None
        return self.window.length

    def _length(self) -> int:
        assert self.window.length is not None
        return self.window.length + self.extra

    def _chunk(self, offset: int, chunk_length: int, segment: int) -> tp.Tuple[torch.Tensor, int]:
        """The padded input of the chunk at `offset` (v coordinates) and where its estimate starts."""
        target = max(int(self.model.valid_length(segment)), chunk_length)
        start = offset - (target - chunk_length) // 2
        return self.window.read(start + self.delta, start + target + self.delta), offset - start

    def _estimate(self, chunks: tp.Sequence[tp.Tuple[torch.Tensor, int, int]]) -> tp.List[torch.Tensor]:
        """Estimates of (input, skip, length) chunks, run as one batch (see :func:`run_batch`)."""
        return [estimate.to("cpu") for estimate in run_batch(self.model, chunks, self.device)]

    def run(self) -> tp.Iterator[torch.Tensor]:
        """Yield consecutive (B, S, C, n) blocks of the estimate of x, `len(x)` samples in all."""
        segment = self.segment
        if segment is None or not self._reaches(segment + 1):  # the whole signal in one chunk
            while self._reaches(self.window.end + self.extra + 1):  # read it all
                pass
            length = self._length()
            chunk, skip = self._chunk(0, length, length)
            estimate, = self._estimate([(chunk, skip, length)])
            yield from self._emit(estimate.to(dtype=torch.promote_types(estimate.dtype, torch.float32)), 0)
            return
        stride = max(1, int((1 - self.overlap) * segment))
        position = torch.arange(segment, dtype=torch.float32)
        weight = torch.minimum(position + 1, segment - position)
        output: tp.Optional[torch.Tensor] = None  # v samples from `base` on, not yet final
        total_weight = torch.zeros(0)
        base = 0
        pool = shared_thread_pool(self.jobs) if self.jobs > 1 else None
        # batches of chunks in flight: (their offsets, the future or list of their estimates)
        pending: tp.Deque[tp.Tuple[tp.List[int], tp.Union[Future, tp.List[torch.Tensor]]]] = collections.deque()
        ready: tp.Deque[tp.Tuple[int, torch.Tensor]] = collections.deque()  # estimates not yet blended
        offsets = itertools.count(0, stride)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.jobs and not ready:
                    group: tp.List[int] = []
                    chunks = []
                    while len(group) < self.batch_chunks:
                        offset = next(offsets)
                        if not self._reaches(offset + 1):
                            exhausted = True
                            break
                        chunk_length = segment if self._reaches(offset + segment) else self._length() - offset
                        chunk, skip = self._chunk(offset, chunk_length, segment)
                        self.needed_from = self._next_start(offset + stride, segment)
                        group.append(offset)
                        chunks.append((chunk, skip, chunk_length))
                    if not group:
                        break
                    job: tp.Union[Future, tp.List[torch.Tensor]] = (
                        pool.submit(self._estimate, chunks) if pool is not None else self._estimate(chunks))
                    pending.append((group, job))
                if not ready:
                    if not pending:
                        break
                    group, job = pending.popleft()
                    ready.extend(zip(group, job.result() if isinstance(job, Future) else job))
                offset, estimate = ready.popleft()
                chunk_length = estimate.shape[-1]
                if output is None:
                    dtype = torch.promote_types(estimate.dtype, torch.float32)
                    output = torch.zeros(*estimate.shape[:-1], 0, dtype=dtype)
                end = offset + chunk_length - base
                if end > output.shape[-1]:
                    grow = end - output.shape[-1]
                    output = torch.cat([output, output.new_zeros(*output.shape[:-1], grow)], dim=-1)
                    total_weight = torch.cat([total_weight, total_weight.new_zeros(grow)])
                output[..., offset - base:end] += weight[:chunk_length] * estimate
                total_weight[offset - base:end] += weight[:chunk_length]
                more = bool(ready or pending or not exhausted)
                final = offset + stride if more else base + output.shape[-1]
                final = min(final - base, output.shape[-1])
                if final > 0:
                    yield from self._emit(output[..., :final] / total_weight[:final], base)
                    output, total_weight = output[..., final:], total_weight[final:]
                    base += final
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if output is not None and output.shape[-1]:
            yield from self._emit(output / total_weight, base)
        self.needed_from = self.window.end

    def _next_start(self, offset: int, segment: int) -> int:
        """The earliest x position the chunk at `offset` may read (a short last chunk is centred in
        its padded input, so it reads further back than a full one)."""
        target = max(int(self.model.valid_length(segment)), segment)
        return offset - target // 2 + self.delta

    def _emit(self, block: torch.Tensor, base: int) -> tp.Iterator[torch.Tensor]:
        """Yield the part of the v block starting at `base` that maps into x (cropped)."""
        begin = max(base, self.crop)
        end = base + block.shape[-1]
        if not self.window.reaches(end - self.crop):  # v extends past the end of x: crop there
            end = min(end, self.crop + self.end_of_input())
        if end > begin:
            self.produced += end - begin
            yield block[..., begin - base:end - base]


def stream_model(model: SeparationModel, blocks: tp.Iterable[torch.Tensor], *, segment: tp.Optional[int],
                 overlap: float = 0.25, batch_chunks: int = 1) -> tp.Iterator[torch.Tensor]:
    """Separate a (B, C, T) mixture that arrives as consecutive (B, C, n) blocks with one model:
    yields consecutive (B, S, C, n') blocks of the estimate, `T` samples in all.

    The chunks, their padding and their blending are :func:`~demixlab.separation.chunking.apply_model`'s
    (without shifts; `segment` in samples, None: the whole signal at once), so the blocks joined are its
    estimate; only the chunks not yet blended and the input they still need are held.
    """
    if not 0 <= overlap < 1:
        raise DemixError(f"overlap must be in [0, 1), got {overlap}")
    check_batch_chunks(batch_chunks)
    window = InputWindow(blocks)
    one = _Pass(model, window, segment, overlap, jobs=1, batch_chunks=batch_chunks)
    for block in one.run():
        yield block
        window.discard(one.needed_from)


def stream_bag(bag: Bag, blocks: tp.Iterable[torch.Tensor], *, segment: tp.Optional[float] = None,
               split: bool = True, overlap: float = 0.25, shifts: int = 0, jobs: tp.Optional[int] = 1,
               generator: tp.Optional[torch.Generator] = None, batch_chunks: int = 1) -> tp.Iterator[torch.Tensor]:
    """Separate a mixture given as (B, C, n) blocks at the bag's rate and channels; yield (B, S, C, m)
    blocks of the stems, in order, `T` samples in all (see the module docstring).

    The options are :func:`~demixlab.separation.bags.apply_bag`'s, and so is the result (the same
    random shifts for the same `generator`).
    """
    if not 0 <= overlap < 1:
        raise DemixError(f"overlap must be in [0, 1), got {overlap}")
    check_jobs(jobs)
    check_batch_chunks(batch_chunks)
    bag.build(_bag_device(bag))
    window = InputWindow(blocks)
    groups: tp.List[tp.Tuple[tp.Any, tp.List[_Pass]]] = []  # (member, its passes)
    for member in bag.members:
        if not member.active:
            continue
        assert member.model is not None
        frames = chunk_frames(bag, member, segment, split)
        member_jobs = chunk_jobs(member.model, jobs)
        if shifts:
            max_shift = member.model.samplerate // 2
            passes = []
            for _ in range(shifts):  # drawn in apply_model's order
                offset = int(torch.randint(max_shift + 1, (1,), generator=generator))
                passes.append(_Pass(member.model, window, frames, overlap, member_jobs, delta=offset - max_shift,
                                    extra=max_shift, crop=max_shift - offset, batch_chunks=batch_chunks))
        else:
            passes = [_Pass(member.model, window, frames, overlap, member_jobs, batch_chunks=batch_chunks)]
        groups.append((member, passes))
    everything = [one for _, passes in groups for one in passes]
    runs = {id(one): one.run() for one in everything}
    ready: tp.Dict[int, tp.Deque[torch.Tensor]] = {id(one): collections.deque() for one in everything}
    emitted = 0
    while not all(one.done for one in everything):
        laggard = min((one for one in everything if not one.done), key=lambda one: one.produced)
        block = next(runs[id(laggard)], None)
        if block is None:
            laggard.done = True
        else:
            ready[id(laggard)].append(block)
        upto = min(one.produced for one in everything)
        if upto > emitted:
            taken = {key: take_samples(blocks_of, upto - emitted) for key, blocks_of in ready.items()}
            yield _combine(bag, [(member, [taken[id(one)] for one in passes]) for member, passes in groups])
            emitted = upto
        window.discard(min(one.needed_from for one in everything))
    assert emitted == window.length, (emitted, window.length)


def take_samples(blocks: tp.Deque[torch.Tensor], count: int,
                 shape: tp.Optional[tp.Sequence[int]] = None) -> torch.Tensor:
    """Remove and return the first `count` samples of a deque of consecutive (..., n) blocks
    (`shape`: the leading dimensions of an empty result, needed when `count` is 0)."""
    taken, have = [], 0
    while have < count:
        block = blocks.popleft()
        if have + block.shape[-1] > count:
            blocks.appendleft(block[..., count - have:])
            block = block[..., :count - have]
        taken.append(block)
        have += block.shape[-1]
    if not taken:
        assert shape is not None
        return torch.zeros(*shape, 0)
    return taken[0] if len(taken) == 1 else torch.cat(taken, dim=-1)


def _combine(bag: Bag, estimates: tp.Sequence[tp.Tuple[tp.Any, tp.Sequence[torch.Tensor]]]) -> torch.Tensor:
    """Blend the members' estimates of one stretch as apply_bag does (shifts averaged first)."""
    return blend_estimates(bag, _shift_means(estimates), in_place=False)


def _shift_means(estimates: tp.Sequence[tp.Tuple[tp.Any, tp.Sequence[torch.Tensor]]]
                 ) -> tp.Iterator[tp.Tuple[tp.Any, torch.Tensor]]:
    """Each member's estimate: the mean of its shifted passes' estimates."""
    for member, shifted in estimates:
        estimate = shifted[0].clone() if len(shifted) > 1 else shifted[0]
        for other in shifted[1:]:
            estimate.add_(other)
        if len(shifted) > 1:
            estimate.div_(len(shifted))
        yield member, estimate


def _bag_device(bag: Bag) -> torch.device:
    for member in bag.members:
        if member.model is not None:
            return _model_device(member.model)
    return torch.device("cpu")
