"""Checkpoints: everything needed to resume an XP exactly, written atomically after every epoch.

A checkpoint holds plain containers and tensors only (it loads with `weights_only=True`): the
model, optimizer, schedule, gradient scaler and EMA states, the training record (history, best state, parent XP,
whether training is done) and what the XP is (family, options, sources, rate, channels, the
resolved configuration). Only rank 0 writes it.
"""
import logging
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .. import __version__
from ..errors import DemixError
from ..experiment import config_changes, flat_config
from ..files import load_torch, save_torch
from ..release.model_file import load_package, package_state
from ..release.repository import MODEL_SUFFIX
from . import distrib
from .finetune import merge_adapters
from .optim import LearningRateSchedule, ModelEMA

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.th"
CHECKPOINT_VERSION = 1


@dataclass
class Record:
    """What training has produced so far.

    Attributes:
        history: one entry per finished epoch (`train`, `valid`, optionally `test`, `best`).
        best_state: the weights (raw or EMA) that scored best on `best.metric`, on the CPU.
        best_bits: with `quant.diffq`, the integer bit depths of each quantised weight's groups
            when the best state was recorded (what export stores them with).
        parent: the signature of the XP this one was initialised from (`continue_from`).
        done: training finished and the final test ran.
    """

    history: tp.List[tp.Dict[str, tp.Any]] = field(default_factory=list)
    best_state: tp.Optional[tp.Dict[str, torch.Tensor]] = None
    best_bits: tp.Optional[tp.Dict[str, torch.Tensor]] = None
    parent: tp.Optional[str] = None
    done: bool = False


@dataclass
class XPIdentity:
    """What an XP trains, stored in its checkpoint and checked when resuming or fine-tuning."""

    family: str
    model_options: tp.Dict[str, tp.Any]
    sources: tp.List[str]
    samplerate: int
    audio_channels: int


def read_checkpoint(path: Path) -> tp.Dict[str, tp.Any]:
    """A training checkpoint's content, or a :class:`DemixError` naming the file."""
    state = load_torch(path)
    if not isinstance(state, dict) or "model_options" not in state:
        raise DemixError(f"{path}: not a demixlab training checkpoint")
    return state


class Checkpointer:
    """Writes and restores the checkpoint of the XP in `folder`.

    Args:
        folder: the XP folder.
        identity: what the XP trains.
        config: the composed configuration (stored resolved, compared on resume).
        model, optimizer, schedule, grad_scaler, emas: the training state restored in place.
        quantizer: with `quant.diffq`, the :class:`~demixlab.training.diffq.DiffQuantizer`: its bit
            logits are saved and restored, its rounded bits (`bits`, `best_bits`) and `group_size`
            saved for export.
    """

    def __init__(self, folder: Path, identity: XPIdentity, config: DictConfig, *, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, schedule: LearningRateSchedule, grad_scaler: torch.amp.GradScaler,
                 emas: tp.Sequence[ModelEMA], quantizer: tp.Optional[torch.nn.Module] = None):
        self.folder = folder
        self.path = folder / CHECKPOINT_NAME
        self.identity = identity
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.grad_scaler = grad_scaler
        self.emas = list(emas)
        self.quantizer = quantizer

    def save(self, record: Record) -> None:
        """Write the checkpoint atomically (rank 0 only)."""
        if not distrib.is_master():
            return
        save_torch({
            "version": CHECKPOINT_VERSION,
            "demixlab_version": __version__,
            "signature": self.folder.name,
            "family": self.identity.family,
            "model_options": self.identity.model_options,
            "sources": self.identity.sources,
            "samplerate": self.identity.samplerate,
            "audio_channels": self.identity.audio_channels,
            "config": OmegaConf.to_container(self.config, resolve=True),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "emas": {ema.name: ema.state_dict() for ema in self.emas},
            "best_state": record.best_state,
            **({"quantizer": self.quantizer.state_dict(), "bits": self.quantizer.rounded_bits(),
                "best_bits": record.best_bits, "group_size": self.quantizer.group_size}
               if self.quantizer is not None else {}),
            "history": record.history,
            "parent": record.parent,
            "done": record.done,
        }, self.path)

    def restore(self) -> tp.Optional[Record]:
        """Load this XP's checkpoint into the training state; None when there is none yet."""
        if not self.path.exists():
            return None
        state = read_checkpoint(self.path)
        self._check_compatible(state, f"checkpoint {self.path}")
        changes = config_changes(flat_config(OmegaConf.create(state["config"])), flat_config(self.config))
        if changes:
            logger.warning("the configuration behind this signature changed since the checkpoint was "
                           "written (was a default in conf/ edited?): %s", "; ".join(changes))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state.get("grad_scaler"):  # float16 AMP: the loss scale and its growth tracker
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        for ema in self.emas:
            if ema.name in state["emas"]:
                ema.load_state_dict(state["emas"][ema.name])
        if self.quantizer is not None:
            self.quantizer.load_state_dict(state["quantizer"])
        record = Record(history=list(state["history"]), best_state=state["best_state"], parent=state["parent"],
                        done=bool(state["done"]), best_bits=state.get("best_bits"))
        logger.info("resuming from %s after epoch %d", self.path, len(record.history))
        return record

    def parent_weights(self, parent: str, base_dir: Path) -> tp.Dict[str, torch.Tensor]:
        """The weights to start from: the best state of the finished XP `parent` (a signature: a
        sibling folder), or the weights of the model file `parent` (a path ending in .th, relative
        to `base_dir`, e.g. an imported community checkpoint); of this XP's family and sources.
        A parent trained with LoRA adapters gives its merged weights."""
        if parent.endswith(MODEL_SUFFIX):
            path = Path(parent).expanduser()
            package = load_package(path if path.is_absolute() else base_dir / path)
            self._check_compatible(package, f"continue_from={parent}")
            return package_state(package, f"continue_from={parent}")
        signature = parent
        parent_folder = self.folder.parent / signature
        path = parent_folder / CHECKPOINT_NAME
        if not parent_folder.is_dir():
            raise DemixError(f"continue_from={signature}: no experiment with that signature in {self.folder.parent}")
        if not path.exists():
            raise DemixError(f"continue_from={signature}: the experiment has no checkpoint yet ({path})")
        state = read_checkpoint(path)
        if not state.get("done"):
            raise DemixError(f"continue_from={signature}: the experiment has not finished training "
                             f"({len(state.get('history', []))} epochs so far); wait for it or resume it")
        self._check_compatible(state, f"continue_from={signature}")
        return merge_adapters(state["best_state"])

    def _check_compatible(self, state: tp.Mapping[str, tp.Any], what: str) -> None:
        if state.get("family") != self.identity.family:
            raise DemixError(f"{what} holds a {state.get('family')!r} model, this XP trains {self.identity.family!r}")
        if list(state.get("sources", [])) != self.identity.sources:
            raise DemixError(f"{what} separates {state.get('sources')}, this XP separates {self.identity.sources}")
