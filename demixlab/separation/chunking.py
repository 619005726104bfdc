"""Apply a separation model to signals of any length with bounded memory (overlap-add).

Long signals are cut into overlapping chunks; the estimates are blended with triangular
weights (overlap-add), so only one batch of chunk activations is alive at a time (`batch_chunks`
chunks stacked on the batch axis run in one forward pass; `jobs` such batches may run in parallel
threads that share torch's intra-op threads, see :func:`chunk_jobs`). The estimates are blended in
the chunks' order whatever the threads, so the stems do not depend on `jobs` (beyond the float
rounding of kernels run on fewer threads). The output stays on `out_device` (the CPU by default)
while chunks run on the model's device. The model runs under :func:`torch.inference_mode`.
"""
import collections
import typing as tp

import torch
import tqdm

from ..errors import DemixError
from ..models import SeparationModel
from ..threads import shared_thread_pool

MAX_AUTOMATIC_JOBS = 4
"""Most batches of chunks side by side unless told otherwise: each holds its own activations (a
full-size HTDemucs chunk about 0.4 GB), so memory must not grow with the machine's core count."""
DEFAULT_BATCH_CHUNKS = 1
"""Chunks per forward pass unless told otherwise (see :func:`choose_batch_chunks`)."""


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_jobs(jobs: tp.Optional[int]) -> None:
    """A one-line error unless `jobs` is None (automatic) or a positive number of batches."""
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise DemixError(f"jobs must be at least 1, got {jobs!r}")


def chunk_jobs(model: SeparationModel, jobs: tp.Optional[int]) -> int:
    """Batches of chunks to run side by side: `jobs` itself when given; when None, torch's intra-op
    thread count (at most :data:`MAX_AUTOMATIC_JOBS`) for a model on the CPU that allows it
    (:attr:`SeparationModel.parallel_chunks`: one intra-op thread per batch, which keeps the cores
    busier than one OpenMP team waiting at every small operation), else 1."""
    if jobs is not None:
        check_jobs(jobs)
        return jobs
    if _model_device(model).type != "cpu" or not model.parallel_chunks:
        return 1
    return max(1, min(torch.get_num_threads(), MAX_AUTOMATIC_JOBS))


def check_batch_chunks(batch_chunks: int) -> None:
    """A one-line error unless `batch_chunks` is a positive number of chunks."""
    if isinstance(batch_chunks, bool) or not isinstance(batch_chunks, int) or batch_chunks < 1:
        raise DemixError(f"batch_chunks must be a positive number of chunks, got {batch_chunks!r}")


@torch.no_grad()
def apply_model(model: SeparationModel, mixture: torch.Tensor, *, segment: tp.Optional[int] = None,
             overlap: float = 0.25, shifts: int = 0, max_shift: tp.Optional[int] = None,
             generator: tp.Optional[torch.Generator] = None, out_device: tp.Union[str, torch.device] = "cpu",
             progress: bool = False, jobs: tp.Optional[int] = 1, batch_chunks: int = 1) -> torch.Tensor:
    """Separate a (B, C, T) mixture into (B, S, C, T) estimates.

    Args:
        model: maps (B, C, t) waveforms to (B, S, C, t) (see :class:`SeparationModel`); put it in
            eval mode first.
        segment: chunk length in samples; None runs the whole signal at once.
        overlap: fraction of a chunk shared with the next one (0 <= overlap < 1).
        shifts: if > 0, average the estimates over this many random time shifts of the input
            (up to `max_shift` samples, default half a second at the model's rate).
        generator: source of the random shifts, for reproducible evaluation.
        out_device: where the (potentially long) output is accumulated.
        jobs: batches of chunks separated in parallel threads that share torch's intra-op threads
            (at most `jobs` batches of activations alive); None: :func:`chunk_jobs` chooses.
        batch_chunks: chunks stacked into one forward pass (on the batch axis). For a model whose
            examples do not interact the result is the same as one chunk at a time (bit for bit
            when its kernels do not depend on the batch size); memory grows with it.
    """
    if mixture.dim() != 3:
        raise DemixError(f"expected a mixture of shape (batch, channels, time), got {tuple(mixture.shape)}")
    if not 0 <= overlap < 1:
        raise DemixError(f"overlap must be in [0, 1), got {overlap}")
    jobs = chunk_jobs(model, jobs)
    check_batch_chunks(batch_chunks)
    if shifts:
        if max_shift is None:
            max_shift = model.samplerate // 2
        length = mixture.shape[-1]
        padded = torch.nn.functional.pad(mixture, (max_shift, max_shift))
        total: tp.Optional[torch.Tensor] = None
        for _ in range(shifts):
            offset = int(torch.randint(max_shift + 1, (1,), generator=generator))
            shifted = padded[..., offset:offset + length + max_shift]
            estimate = apply_model(model, shifted, segment=segment, overlap=overlap, out_device=out_device,
                                progress=progress, jobs=jobs, batch_chunks=batch_chunks)
            start = max_shift - offset
            estimate = estimate[..., start:start + length]
            total = estimate if total is None else total.add_(estimate)  # in place: bounded memory
        assert total is not None
        return total.div_(shifts)
    return _overlap_add(model, mixture, segment, overlap, torch.device(out_device), progress, jobs, batch_chunks)


def chunk_input(model: SeparationModel, mixture: torch.Tensor, offset: int, chunk_length: int,
                segment: int) -> tp.Tuple[torch.Tensor, int]:
    """The model's input for mixture[..., offset:offset + chunk_length], and where in the model's
    output the estimate of that stretch starts.

    The chunk is padded, centred, to `model.valid_length(segment)` samples with the real
    neighbouring samples where there are some and zeros past the signal's ends (demucs' convention).
    """
    target = max(int(model.valid_length(segment)), chunk_length)
    length = mixture.shape[-1]
    start = offset - (target - chunk_length) // 2
    inside = mixture[..., max(0, start):min(length, start + target)]
    return torch.nn.functional.pad(inside, (max(0, -start), max(0, start + target - length))), offset - start


def run_batch(model: SeparationModel, chunks: tp.Sequence[tp.Tuple[torch.Tensor, int, int]],
              device: torch.device) -> tp.List[torch.Tensor]:
    """The model's estimates for (input, skip, length) chunks of (B, C, t) inputs: the chunks of one
    input length run stacked on the batch axis in one forward pass (under inference mode), and each
    estimate is cropped to its `length` samples from `skip`."""
    estimates: tp.List[tp.Optional[torch.Tensor]] = [None] * len(chunks)
    by_length: tp.Dict[int, tp.List[int]] = collections.defaultdict(list)
    for index, (chunk, _, _) in enumerate(chunks):
        by_length[chunk.shape[-1]].append(index)
    with torch.inference_mode():  # worker threads do not inherit the caller's mode
        for indices in by_length.values():
            batch = chunks[indices[0]][0].shape[0]
            stacked = (chunks[indices[0]][0] if len(indices) == 1
                       else torch.cat([chunks[index][0] for index in indices], dim=0))
            output = model(stacked.to(device))
            for position, index in enumerate(indices):
                _, skip, length = chunks[index]
                estimates[index] = output[position * batch:(position + 1) * batch, ..., skip:skip + length]
    return tp.cast(tp.List[torch.Tensor], estimates)


def _overlap_add(model: SeparationModel, mixture: torch.Tensor, segment: tp.Optional[int], overlap: float,
                 out_device: torch.device, progress: bool, jobs: int = 1, batch_chunks: int = 1) -> torch.Tensor:
    device = _model_device(model)
    length = mixture.shape[-1]
    if segment is None or length <= segment:
        estimate, = run_batch(model, [(*chunk_input(model, mixture, 0, length, length), length)], device)
        # a normal tensor (not an inference one): callers may scale it in place
        return estimate.to(out_device, dtype=torch.promote_types(estimate.dtype, torch.float32), copy=True)
    stride = max(1, int((1 - overlap) * segment))
    # Triangular weights, never zero: chunk edges count least where chunks overlap.
    position = torch.arange(segment, dtype=torch.float32, device=out_device)
    weight = torch.minimum(position + 1, segment - position)
    output: tp.Optional[torch.Tensor] = None
    total_weight = torch.zeros(length, device=out_device)
    offsets = range(0, length, stride)  # like demucs' apply_model: the last chunks may be shorter
    groups = [offsets[first:first + batch_chunks] for first in range(0, len(offsets), batch_chunks)]
    jobs = min(jobs, len(groups))  # fewer threads, each with more intra-op threads

    def run_group(group: tp.Sequence[int]) -> tp.List[torch.Tensor]:
        chunks = []
        for offset in group:
            chunk_length = min(segment, length - offset)
            chunks.append((*chunk_input(model, mixture, offset, chunk_length, segment), chunk_length))
        return [estimate.to(out_device) for estimate in run_batch(model, chunks, device)]

    def estimates() -> tp.Iterator[tp.Tuple[int, torch.Tensor]]:
        if jobs == 1:
            for group in groups:
                yield from zip(group, run_group(group))
            return
        with shared_thread_pool(jobs) as pool:
            pending: tp.Deque = collections.deque()
            for group in groups:  # keep at most `jobs` batches in flight: memory stays bounded
                pending.append((group, pool.submit(run_group, group)))
                if len(pending) >= jobs:
                    first, future = pending.popleft()
                    yield from zip(first, future.result())
            while pending:
                first, future = pending.popleft()
                yield from zip(first, future.result())

    for offset, estimate in tqdm.tqdm(estimates(), total=len(offsets), desc="chunks", leave=False,
                                      disable=not progress):
        chunk_length = estimate.shape[-1]
        if output is None:
            # Accumulate in float32 at least: chunks estimated under bf16/fp16 autocast are blended exactly.
            dtype = torch.promote_types(estimate.dtype, torch.float32)
            output = torch.zeros(*estimate.shape[:-1], length, dtype=dtype, device=out_device)
        output[..., offset:offset + chunk_length] += weight[:chunk_length] * estimate
        total_weight[offset:offset + chunk_length] += weight[:chunk_length]
    assert output is not None
    return output.div_(total_weight)  # in place: no second track-sized buffer
