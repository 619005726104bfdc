"""Apply a separation model to signals of any length with bounded memory.

Long signals are cut into overlapping chunks; the estimates are blended with triangular
weights (overlap-add), so only one chunk of activations is alive at a time. The output stays
on `out_device` (the CPU by default) while chunks run on the model's device.
"""
import typing as tp

import torch
import tqdm

from .errors import DemixError


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def separate(model: torch.nn.Module, mixture: torch.Tensor, *, segment: tp.Optional[int] = None,
             overlap: float = 0.25, shifts: int = 0, max_shift: tp.Optional[int] = None,
             generator: tp.Optional[torch.Generator] = None, out_device: tp.Union[str, torch.device] = "cpu",
             progress: bool = False) -> torch.Tensor:
    """Separate a (B, C, T) mixture into (B, S, C, T) estimates.

    Args:
        model: maps (B, C, t) waveforms to (B, S, C, t); put it in eval mode first.
        segment: chunk length in samples; None runs the whole signal at once.
        overlap: fraction of a chunk shared with the next one (0 <= overlap < 1).
        shifts: if > 0, average the estimates over this many random time shifts of the input
            (up to `max_shift` samples, default half a second at the model's rate).
        generator: source of the random shifts, for reproducible evaluation.
        out_device: where the (potentially long) output is accumulated.
    """
    if mixture.dim() != 3:
        raise DemixError(f"expected a mixture of shape (batch, channels, time), got {tuple(mixture.shape)}")
    if not 0 <= overlap < 1:
        raise DemixError(f"overlap must be in [0, 1), got {overlap}")
    if shifts:
        if max_shift is None:
            max_shift = int(getattr(model, "samplerate", 44100)) // 2
        length = mixture.shape[-1]
        padded = torch.nn.functional.pad(mixture, (max_shift, max_shift))
        total: tp.Optional[torch.Tensor] = None
        for _ in range(shifts):
            offset = int(torch.randint(max_shift + 1, (1,), generator=generator))
            shifted = padded[..., offset:offset + length + max_shift]
            estimate = separate(model, shifted, segment=segment, overlap=overlap, out_device=out_device,
                                progress=progress)
            start = max_shift - offset
            estimate = estimate[..., start:start + length]
            total = estimate if total is None else total + estimate
        assert total is not None
        return total / shifts
    return _overlap_add(model, mixture, segment, overlap, torch.device(out_device), progress)


def _overlap_add(model: torch.nn.Module, mixture: torch.Tensor, segment: tp.Optional[int], overlap: float,
                 out_device: torch.device, progress: bool) -> torch.Tensor:
    device = _model_device(model)
    length = mixture.shape[-1]
    if segment is None or length <= segment:
        return model(mixture.to(device)).to(out_device)
    stride = max(1, int((1 - overlap) * segment))
    # Triangular weights, never zero: chunk edges count least where chunks overlap.
    position = torch.arange(segment, dtype=torch.float32, device=out_device)
    weight = torch.minimum(position + 1, segment - position)
    output: tp.Optional[torch.Tensor] = None
    total_weight = torch.zeros(length, device=out_device)
    offsets = range(0, length, stride)
    for offset in tqdm.tqdm(offsets, desc="chunks", leave=False, disable=not progress):
        chunk = mixture[..., offset:offset + segment]
        chunk_length = chunk.shape[-1]
        if chunk_length < segment:  # models may need a fixed input length
            chunk = torch.nn.functional.pad(chunk, (0, segment - chunk_length))
        estimate = model(chunk.to(device))[..., :chunk_length].to(out_device)
        if output is None:
            output = torch.zeros(*estimate.shape[:-1], length, dtype=estimate.dtype, device=out_device)
        output[..., offset:offset + chunk_length] += weight[:chunk_length] * estimate
        total_weight[offset:offset + chunk_length] += weight[:chunk_length]
        if offset + segment >= length:
            break
    assert output is not None
    return output / total_weight
