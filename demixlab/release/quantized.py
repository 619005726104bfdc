"""Weights stored as integer levels with one bit depth per group of weights (DiffQ exports).

A weight tensor is flattened and cut into groups of `group_size` consecutive values (the last group
may be shorter); each group has its own bit depth `b` (1 to :data:`MAX_BITS`), the tensor one range
`[min, max]`. A value `w` of a group of `b` bits is stored as the level
`round((w - min) / delta)` with `delta = (max - min) / (2^b - 1)` and read back as
`min + level * delta`: the error is at most `delta / 2`, the noise DiffQ trains with
(:mod:`demixlab.training.diffq`). An encoded weight is a dict of tensors and numbers only (a model
file's `quantized` field; it loads with `weights_only=True`):

- levels: uint8, the levels of the groups of at most 8 bits, in order (flattened)
- wide_levels: int16, the levels of the groups of more than 8 bits, in order
- bits: uint8, the bit depth of each group
- min, max: float32 scalars, the tensor's range
- shape: the tensor's shape (list of ints); group_size: int
"""
import typing as tp

import torch

from ..errors import DemixError

MAX_BITS = 15  # levels up to 2^15 - 1 fit an int16
ENTRY_FIELDS = ("levels", "wide_levels", "bits", "min", "max", "shape", "group_size")


def group_deltas(low: torch.Tensor, high: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The quantisation step of each group: the tensor's range over `2^bits - 1` levels."""
    return (high - low) / (2.0 ** bits - 1)


def per_value(values: torch.Tensor, group_size: int, count: int) -> torch.Tensor:
    """Repeat a per-group tensor for each of the `count` values its groups cover."""
    return values.repeat_interleave(group_size)[:count]


def encode_weight(weight: torch.Tensor, bits: torch.Tensor, group_size: int) -> tp.Dict[str, tp.Any]:
    """Encode `weight` with the integer bit depths `bits` (one per group of `group_size` values)."""
    flat = weight.detach().float().flatten().cpu()
    groups = -(-flat.numel() // group_size)
    bits = bits.detach().round().long().cpu().flatten()
    if bits.numel() != groups:
        raise DemixError(f"{groups} groups of {group_size} values need {groups} bit depths, got {bits.numel()}")
    if int(bits.min()) < 1 or int(bits.max()) > MAX_BITS:
        raise DemixError(f"bit depths must be in [1, {MAX_BITS}], got [{int(bits.min())}, {int(bits.max())}]")
    low, high = flat.min(), flat.max()
    delta = per_value(group_deltas(low, high, bits.double()), group_size, flat.numel())
    top = per_value(2 ** bits - 1, group_size, flat.numel())
    levels = torch.where(delta > 0, torch.round((flat.double() - low.double()) / delta), torch.zeros_like(delta))
    levels = torch.minimum(levels.clamp_(min=0).long(), top)
    wide = per_value(bits > 8, group_size, flat.numel())
    return {
        "levels": levels[~wide].to(torch.uint8),
        "wide_levels": levels[wide].to(torch.int16),
        "bits": bits.to(torch.uint8),
        "min": low.clone(),
        "max": high.clone(),
        "shape": list(weight.shape),
        "group_size": int(group_size),
    }


def decode_weight(entry: tp.Mapping[str, tp.Any], where: str = "quantized weight") -> torch.Tensor:
    """The float32 tensor an encoded weight stands for (see the module docstring)."""
    if not isinstance(entry, dict) or any(field not in entry for field in ENTRY_FIELDS):
        raise DemixError(f"{where}: expected a dict with the fields {', '.join(ENTRY_FIELDS)}")
    bits, group_size = entry["bits"], int(entry["group_size"])
    count = encoded_values(entry)
    if group_size < 1 or bits.numel() != -(-count // group_size):
        raise DemixError(f"{where}: {bits.numel()} bit depths do not fit {count} levels in groups of {group_size}")
    wide = per_value(bits > 8, group_size, count)
    if int(wide.sum()) != entry["wide_levels"].numel():
        raise DemixError(f"{where}: {entry['wide_levels'].numel()} wide levels, but the groups of more than 8 "
                         f"bits hold {int(wide.sum())} values")
    levels = torch.empty(count, dtype=torch.float64)
    levels[~wide] = entry["levels"].double()
    levels[wide] = entry["wide_levels"].double()
    delta = per_value(group_deltas(entry["min"].double(), entry["max"].double(), bits.double()), group_size, count)
    values = entry["min"].double() + levels * delta
    return values.float().reshape(entry["shape"])


def encoded_values(entry: tp.Mapping[str, tp.Any]) -> int:
    """How many weight values an encoded weight holds."""
    return entry["levels"].numel() + entry["wide_levels"].numel()


def mean_bits(entries: tp.Iterable[tp.Mapping[str, tp.Any]]) -> float:
    """The mean bit depth over all values of the encoded weights (0 for none)."""
    entries = list(entries)
    total = sum(float(per_value(entry["bits"].float(), int(entry["group_size"]), encoded_values(entry)).sum())
                for entry in entries)
    return total / max(sum(encoded_values(entry) for entry in entries), 1)


def encoded_bytes(entry: tp.Mapping[str, tp.Any]) -> int:
    """Bytes of tensor data an encoded weight stores (levels, bit depths, range)."""
    return sum(entry[key].numel() * entry[key].element_size()
               for key in ("levels", "wide_levels", "bits", "min", "max"))
