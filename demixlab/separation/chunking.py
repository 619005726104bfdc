"""Apply a separation model to signals of any length with bounded memory (overlap-add).

Long signals are cut into overlapping chunks; the estimates are blended with triangular
weights (overlap-add), so only one chunk of activations is alive at a time (or `jobs` chunks
when they run in parallel threads). The output stays on `out_device` (the CPU by default) while
chunks run on the model's device.
"""
import collections
import typing as tp
from concurrent.futures import ThreadPoolExecutor

import torch
import tqdm

from ..errors import DemixError
from ..models import SeparationModel


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def apply_model(model: SeparationModel, mixture: torch.Tensor, *, segment: tp.Optional[int] = None,
             overlap: float = 0.25, shifts: int = 0, max_shift: tp.Optional[int] = None,
             generator: tp.Optional[torch.Generator] = None, out_device: tp.Union[str, torch.device] = "cpu",
             progress: bool = False, jobs: int = 1) -> torch.Tensor:
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
        jobs: chunks separated in parallel threads (at most `jobs` chunks of activations alive).
    """
    if mixture.dim() != 3:
        raise DemixError(f"expected a mixture of shape (batch, channels, time), got {tuple(mixture.shape)}")
    if not 0 <= overlap < 1:
        raise DemixError(f"overlap must be in [0, 1), got {overlap}")
    if jobs < 1:
        raise DemixError(f"jobs must be at least 1, got {jobs}")
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
                                progress=progress, jobs=jobs)
            start = max_shift - offset
            estimate = estimate[..., start:start + length]
            total = estimate if total is None else total.add_(estimate)  # in place: bounded memory
        assert total is not None
        return total.div_(shifts)
    return _overlap_add(model, mixture, segment, overlap, torch.device(out_device), progress, jobs)


def _run_chunk(model: SeparationModel, mixture: torch.Tensor, offset: int, chunk_length: int, segment: int,
               device: torch.device) -> torch.Tensor:
    """The model's estimate for mixture[..., offset:offset + chunk_length].

    The chunk is padded, centred, to `model.valid_length(segment)` samples with the real
    neighbouring samples where there are some and zeros past the signal's ends, then the estimate
    is trimmed back (demucs' convention).
    """
    target = max(int(model.valid_length(segment)), chunk_length)
    length = mixture.shape[-1]
    start = offset - (target - chunk_length) // 2
    inside = mixture[..., max(0, start):min(length, start + target)]
    chunk = torch.nn.functional.pad(inside, (max(0, -start), max(0, start + target - length)))
    skip = offset - start
    with torch.no_grad():  # worker threads do not inherit the caller's no_grad
        return model(chunk.to(device))[..., skip:skip + chunk_length]


def _overlap_add(model: SeparationModel, mixture: torch.Tensor, segment: tp.Optional[int], overlap: float,
                 out_device: torch.device, progress: bool, jobs: int = 1) -> torch.Tensor:
    device = _model_device(model)
    length = mixture.shape[-1]
    if segment is None or length <= segment:
        estimate = _run_chunk(model, mixture, 0, length, length, device)
        return estimate.to(out_device, dtype=torch.promote_types(estimate.dtype, torch.float32))
    stride = max(1, int((1 - overlap) * segment))
    # Triangular weights, never zero: chunk edges count least where chunks overlap.
    position = torch.arange(segment, dtype=torch.float32, device=out_device)
    weight = torch.minimum(position + 1, segment - position)
    output: tp.Optional[torch.Tensor] = None
    total_weight = torch.zeros(length, device=out_device)
    offsets = range(0, length, stride)  # like demucs' apply_model: the last chunks may be shorter

    def run_chunk(offset: int) -> torch.Tensor:
        return _run_chunk(model, mixture, offset, min(segment, length - offset), segment, device).to(out_device)

    def estimates() -> tp.Iterator[tp.Tuple[int, torch.Tensor]]:
        if jobs == 1:
            for offset in offsets:
                yield offset, run_chunk(offset)
            return
        with ThreadPoolExecutor(jobs) as pool:
            pending: tp.Deque = collections.deque()
            for offset in offsets:  # keep at most `jobs` chunks in flight: memory stays bounded
                pending.append((offset, pool.submit(run_chunk, offset)))
                if len(pending) >= jobs:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()

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
