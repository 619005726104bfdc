"""Device-agnostic helpers for multi-process training.

`dora run -d` starts one process per GPU (or per `--ddp_workers` on CPU) and `dora.distrib`
only tells each process its rank and the world size. Everything else lives here: the process
group (NCCL on CUDA, gloo on CPU), DDP wrapping, distributed sampling and metric averaging.
With one process every helper is a no-op, so the solver reads the same either way.
"""
import hashlib
import logging
import typing as tp

import torch
import torch.distributed as dist
from dora import distrib as dora_distrib
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


def rank() -> int:
    """This process' rank (0 when not distributed)."""
    return dora_distrib.rank()


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dora_distrib.world_size()


def is_master() -> bool:
    """True on the process that writes checkpoints, history and logs."""
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group when several processes run; the backend follows the device."""
    if dora_distrib.get_distrib_spec().world_size <= 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dora_distrib.init(backend=backend)
    logger.info("distributed: rank %d of %d (%s)", rank(), world_size(), backend)


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap the model in DDP when distributed; return it unchanged otherwise."""
    if world_size() <= 1:
        return model
    device = next(model.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard(items: tp.Sequence[tp.Any]) -> tp.List[tp.Any]:
    """This process' share of a list (every world_size-th item, starting at its rank)."""
    return list(items[rank()::world_size()])


def average_metrics(metrics: tp.Dict[str, float], count: float = 1.0) -> tp.Dict[str, float]:
    """Average per-process metrics, weighting each process by `count` (e.g. examples seen).

    Every process must call it, even one with nothing to report (empty `metrics`, count 0):
    keys are gathered rather than assumed identical across processes.
    """
    if world_size() <= 1:
        return dict(metrics)
    gathered: tp.List[tp.Any] = [None] * world_size()
    dist.all_gather_object(gathered, (dict(metrics), float(count)))
    totals: tp.Dict[str, float] = {}
    weights: tp.Dict[str, float] = {}
    for part, weight in gathered:
        for key, value in part.items():
            totals[key] = totals.get(key, 0.0) + value * weight
            weights[key] = weights.get(key, 0.0) + weight
    return {key: totals[key] / weights[key] for key in sorted(totals) if weights[key] > 0}


def broadcast_tensors(tensors: tp.Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of these tensors to every process, in place."""
    if world_size() <= 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def replicas_identical(model: torch.nn.Module) -> bool:
    """True if every process holds exactly the same parameters and buffers (compared by hash).

    DDP keeps replicas in sync by construction; this catches what breaks it (a rank that
    skipped a step, non-broadcast buffers, a bad resume).
    """
    if world_size() <= 1:
        return True
    digest = hashlib.sha1()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    gathered: tp.List[tp.Any] = [None] * world_size()
    dist.all_gather_object(gathered, digest.hexdigest())
    return len(set(gathered)) == 1


def barrier() -> None:
    """Wait for every process (no-op when alone)."""
    if world_size() > 1:
        dist.barrier()
