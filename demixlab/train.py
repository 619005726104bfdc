"""Training entry point: `dora run [key=value ...]` runs `main` inside a Dora XP.

Dora finds the package by this module (a `train.py` next to `__init__.py`). Also runnable as
`python -m demixlab.train [key=value ...]`. Every composed configuration is checked against the
schema (:func:`demixlab.training.config.parse_config`) before an XP is made of it.
"""
import logging
from pathlib import Path

import torch
from dora import distrib as dora_distrib
from dora import XP, get_xp, to_absolute_path
from omegaconf import DictConfig

from .errors import DemixError, exit_on_user_error
from .experiment import hydra_main
from .training import distrib
from .training.allocator import tune_cpu_runtime
from .training.config import parse_config
from .training.solver import Solver

logger = logging.getLogger("demixlab.train")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available; each process of a multi-GPU run takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise DemixError(f"misc.device={name!r}: choose one of auto, cpu, cuda")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DemixError("misc.device=cuda but no CUDA device is available")
        return torch.device("cuda", dora_distrib.get_distrib_spec().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _separate_worker_log(folder: Path) -> None:
    """Ranks > 0 write their log to train_rank{N}.log instead of sharing rank 0's train.log."""
    rank = dora_distrib.get_distrib_spec().rank
    if rank == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            replacement = logging.FileHandler(folder / f"train_rank{rank}.log")
            replacement.setFormatter(handler.formatter)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(replacement)


def _log_error_to_files(error: DemixError) -> None:
    """Record a user error in the XP's log files; the console gets the one-line message only."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@exit_on_user_error
def run(cfg: DictConfig) -> None:
    """Train (or resume) the current XP and report its test scores."""
    xp = get_xp()
    _separate_worker_log(xp.folder)
    try:
        _train(cfg, xp)
    except DemixError as error:
        _log_error_to_files(error)
        raise


def _train(cfg: DictConfig, xp: XP) -> None:
    if cfg.misc.verbose:
        logging.getLogger("demixlab").setLevel(logging.DEBUG)
    tune_cpu_runtime()
    device = resolve_device(cfg.misc.device)
    distrib.init(device)
    logger.info("XP %s in %s, device %s", xp.sig, xp.folder, device)
    solver = Solver(cfg, folder=xp.folder, base_dir=Path(to_absolute_path(".")), device=device)
    try:
        solver.train()
    finally:
        solver.close()


@hydra_main(config_path="conf", config_name="config", version_base="1.3", validate=parse_config)
def main(cfg: DictConfig) -> None:
    """Hydra/Dora main (see `run`)."""
    run(cfg)


if __name__ == "__main__":
    main()
