"""Separate with a bag of models: every active member in chunks, blended per source.

The bag itself (members, weights, validation) is :class:`demixlab.release.repository.Bag`; this
module runs it. Each stem is `sum_m w[m, s] * est_m[s] / sum_m w[m, s]`, accumulated in place so
that at most one member's estimate and the output are alive at a time.
"""
import typing as tp

import torch

from ..release.repository import Bag, BagMember
from .chunking import apply_model

DEFAULT_SEGMENT = 30.0
"""Seconds per chunk for models whose file gives no segment (memory stays bounded)."""


def chunk_frames(bag: Bag, member: BagMember, segment: tp.Optional[float], split: bool) -> tp.Optional[int]:
    """Samples per chunk of one bag member: `segment` seconds, else the bag's, else the model file's,
    else :data:`DEFAULT_SEGMENT`; None (whole signals) when `split` is off."""
    seconds = segment if segment is not None else bag.segment
    if seconds is None:
        seconds = member.package.get("segment") or DEFAULT_SEGMENT
    # floor, like models that cannot exceed their segment (HTDemucs) count it
    return int(float(seconds) * bag.samplerate) if split else None


def apply_bag(bag: Bag, mixture: torch.Tensor, *, segment: tp.Optional[float] = None, split: bool = True,
              overlap: float = 0.25, shifts: int = 0, jobs: tp.Optional[int] = 1, progress: bool = False,
              generator: tp.Optional[torch.Generator] = None, batch_chunks: int = 1) -> torch.Tensor:
    """Separate a (B, C, T) mixture at the bag's rate and channels into (B, S, C, T).

    Each model runs in chunks of `segment` seconds (default: the bag's `segment`, else the
    model file's, else :data:`DEFAULT_SEGMENT`); `split=False` runs whole signals at once.
    Models are built on first use, on the device of those already built (the CPU if none is).
    `batch_chunks` chunks run stacked in one forward pass, `jobs` batches side by side (None: as
    each model allows, see :func:`~.chunking.chunk_jobs`).
    """
    bag.build(_tensor_device(bag.members))

    def estimates() -> tp.Iterator[tp.Tuple[BagMember, torch.Tensor]]:
        for member in bag.members:
            if member.active:
                assert member.model is not None
                yield member, apply_model(member.model, mixture, segment=chunk_frames(bag, member, segment, split),
                                          overlap=overlap, shifts=shifts, generator=generator, progress=progress,
                                          jobs=jobs, batch_chunks=batch_chunks)

    # the first estimate becomes the output buffer: one track-sized buffer
    return blend_estimates(bag, estimates(), in_place=True)


def blend_estimates(bag: Bag, estimates: tp.Iterable[tp.Tuple[BagMember, torch.Tensor]], *,
                    in_place: bool) -> torch.Tensor:
    """The bag's (B, S, C, T) blend of its active members' (B, S', C, T) estimates: per source, the
    mean of the members' estimates of it weighted by their weights (a member lacking it weighs 0).

    `in_place`: the first estimate, when its sources are the bag's, is scaled in place and becomes
    the output (it must not be used afterwards).
    """
    output: tp.Optional[torch.Tensor] = None
    for member, estimate in estimates:
        member_sources = list(member.package["sources"])
        if output is None and member_sources == bag.sources:
            weights = torch.tensor(member.weights, dtype=estimate.dtype)[:, None, None]
            output = estimate.mul_(weights) if in_place else estimate.mul(weights)
            continue
        if output is None:
            output = torch.zeros(estimate.shape[0], len(bag.sources), *estimate.shape[2:])
        for index, source in enumerate(bag.sources):
            weight = member.weights[index]
            if weight > 0:
                output[:, index] += weight * estimate[:, member_sources.index(source)]
        del estimate  # before the next member's estimate is computed
    assert output is not None  # the bag's validation guarantees a positive total weight per source
    total = torch.tensor([sum(member.weights[index] for member in bag.members)
                          for index in range(len(bag.sources))], dtype=output.dtype)
    return output.div_(total[:, None, None])


def bag_separator(bag: Bag, *, segment: tp.Optional[float] = None, split: bool = True, overlap: float = 0.25,
                  shifts: int = 0, seed: int = 0, device: tp.Union[str, torch.device] = "cpu",
                  progress: bool = False) -> tp.Callable[[torch.Tensor], torch.Tensor]:
    """A `(C, T) mixture -> (S, C, T) estimates` callable for the evaluation loop.

    `segment` (seconds, None: the bag's or model file's) chunks long tracks; shifts are drawn
    from a generator seeded with `seed`, so repeated evaluations agree.
    """
    generator = torch.Generator().manual_seed(seed)
    bag.build(device)

    def run(mixture: torch.Tensor) -> torch.Tensor:
        out = apply_bag(bag, mixture[None].to(device), segment=segment, split=split, overlap=overlap,
                        shifts=shifts, generator=generator, progress=progress)
        return out[0]

    return run


def _tensor_device(members: tp.Sequence[BagMember]) -> torch.device:
    for member in members:
        if member.model is not None:
            for tensor in member.model.parameters():
                return tensor.device
    return torch.device("cpu")
