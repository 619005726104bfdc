"""The generic training solver: one XP, any registered model family.

The solver never names a family: it builds the model, objective and calibration from the
registry entry that `model.family` selects, and only relies on the common model contract
(a (B, C, T) mixture in, (B, S, C, T) stems out).

Resume is exact. A checkpoint is written atomically after every epoch (model, optimizer,
schedule, EMAs, best state, history). All randomness of an epoch (segment sampling, shuffling,
augmentation, dropout) is seeded from (seed, epoch), so an epoch replayed after a crash, or
resumed from the checkpoint, is the same epoch the uninterrupted run trained.
"""
import logging
import math
import os
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch
from dora.log import LogProgress
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import __version__, distrib
from .apply import separate
from .augment import build_augmentation
from .data import build_datasets, resolve_cache_dir
from .errors import DemixError
from .evaluate_model import EvaluationResult, evaluate
from .evaluation import aggregate, check_sdr_backend, format_table, global_sdr
from .experiment import config_changes, flat_config, parse_signature
from .files import load_torch, save_torch
from .models import get_family
from .optim import LearningRateSchedule, ModelEMA, build_optimizer, swapped_weights
from .training_plot import plot_history

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.th"
CHECKPOINT_VERSION = 1
CALIBRATION_SEGMENTS_PER_TRACK = 8
# Random streams derived from (seed, epoch); the rank is added to per-process streams.
INIT_STREAM, DROPOUT_STREAM, AUGMENT_STREAM = 0, 1000, 2000


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one random stream of one epoch (streams: data, augmentation, dropout...)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def lookup(entry: tp.Mapping[str, tp.Any], path: str) -> tp.Any:
    """Read a dotted path such as `valid.nsdr` in a history entry (KeyError when absent)."""
    value: tp.Any = entry
    for part in path.split("."):
        value = value[part]
    return value


def check_config(cfg: DictConfig) -> None:
    """Reject nonsensical solver settings with a message naming the key."""
    def positive_int(key: str) -> None:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DemixError(f"{key} must be a positive integer, got {value!r}")

    for key in ("epochs", "batch_size", "samples_per_track"):
        positive_int(key)
    if not isinstance(cfg.segment, (int, float)) or cfg.segment <= 0:
        raise DemixError(f"segment must be a positive number of seconds, got {cfg.segment!r}")
    if cfg.best.mode not in ("max", "min"):
        raise DemixError(f"best.mode must be 'max' or 'min', got {cfg.best.mode!r}")
    if cfg.amp.dtype not in ("bfloat16", "float16"):
        raise DemixError(f"amp.dtype must be 'bfloat16' or 'float16', got {cfg.amp.dtype!r}")
    if not 0 <= cfg.valid.overlap < 1:
        raise DemixError(f"valid.overlap must be in [0, 1), got {cfg.valid.overlap}")
    for key in ("test.every", "test.shifts", "early_stop.patience"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or value < 0:
            raise DemixError(f"{key} must be a non-negative integer, got {value!r}")
    check_sdr_backend(cfg.test.sdr_backend)
    if cfg.continue_from is not None:
        parse_signature(cfg.continue_from, "continue_from")
    if cfg.batch_size % distrib.world_size():
        raise DemixError(f"batch_size={cfg.batch_size} is not divisible by the {distrib.world_size()} processes")


class Solver:
    """Trains, validates, tests and checkpoints one XP.

    Args:
        cfg: the composed Hydra config.
        folder: the XP folder; everything the XP writes goes there.
        base_dir: the directory `dora` ran from (user paths resolve against it).
        device: where to train.
    """

    def __init__(self, cfg: DictConfig, folder: Path, base_dir: Path, device: torch.device):
        check_config(cfg)
        self.cfg = cfg
        self.folder = folder
        self.device = device
        self.checkpoint_path = folder / CHECKPOINT_NAME
        self.family = get_family(cfg.model.family)
        self.augment = build_augmentation(cfg.augment, int(cfg.dset.samplerate))
        self.data = build_datasets(
            cfg.dset, segment=float(cfg.segment), samples_per_track=int(cfg.samples_per_track), seed=int(cfg.seed),
            cache_dir=resolve_cache_dir(cfg.misc.cache_dir), base_dir=base_dir,
            extra_frames=self.augment.extra_frames, with_test=True, progress=bool(cfg.misc.progress))
        self.sources = list(self.data.sources)
        self.samplerate = int(self.data.samplerate)
        self.segment_frames = int(round(float(cfg.segment) * self.samplerate))

        options = {key: value for key, value in OmegaConf.to_container(cfg.model, resolve=True).items()
                   if key != "family"}
        self.model_options = options
        torch.manual_seed(epoch_seed(int(cfg.seed), 0, INIT_STREAM))  # initial weights depend on the seed alone
        self.model = self.family.build_model(self.sources, self.samplerate, int(self.data.channels), options)
        self.model.to(device)
        loss_options = OmegaConf.to_container(cfg.loss, resolve=True) if cfg.get("loss") else {}
        self.objective = self.family.build_objective(self.model, **loss_options)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = LearningRateSchedule(self.optimizer, cfg.scheduler, int(cfg.epochs), cfg.best.mode)
        self.emas = [ModelEMA(self.model, float(decay)) for decay in cfg.ema.decays]
        self.history: tp.List[tp.Dict[str, tp.Any]] = []
        self.best_state: tp.Optional[tp.Dict[str, torch.Tensor]] = None
        self.parent: tp.Optional[str] = None
        self.done = False
        self.ddp_model = distrib.wrap(self.model)
        self.amp_dtype = getattr(torch, cfg.amp.dtype)
        self.use_amp = bool(cfg.amp.enabled) and device.type == "cuda"
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self._writer: tp.Any = None
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info("model %s: %s sources, %.2f M trainable parameters", self.family.name,
                    "/".join(self.sources), params / 1e6)

    # ------------------------------------------------------------------ state
    def state(self) -> tp.Dict[str, tp.Any]:
        """Everything needed to resume; plain containers and tensors only (weights_only-safe)."""
        return {
            "version": CHECKPOINT_VERSION,
            "demixlab_version": __version__,
            "signature": self.folder.name,
            "family": self.family.name,
            "model_options": self.model_options,
            "sources": self.sources,
            "samplerate": self.samplerate,
            "audio_channels": int(self.data.channels),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "emas": {ema.name: ema.state_dict() for ema in self.emas},
            "best_state": self.best_state,
            "history": self.history,
            "parent": self.parent,
            "done": self.done,
        }

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (master only)."""
        if not distrib.is_master():
            return
        save_torch(self.state(), self.checkpoint_path)

    def restore(self) -> None:
        """Resume from this XP's checkpoint, else initialise from `continue_from`, else calibrate."""
        if self.checkpoint_path.exists():
            state = load_torch(self.checkpoint_path)
            self._check_compatible(state, f"checkpoint {self.checkpoint_path}")
            changes = config_changes(flat_config(OmegaConf.create(state["config"])), flat_config(self.cfg))
            if changes:
                logger.warning("the configuration behind this signature changed since the checkpoint was "
                               "written (was a default in conf/ edited?): %s", "; ".join(changes))
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            for ema in self.emas:
                if ema.name in state["emas"]:
                    ema.load_state_dict(state["emas"][ema.name])
            self.best_state = state["best_state"]
            self.history = list(state["history"])
            self.parent = state["parent"]
            self.done = bool(state["done"])
            logger.info("resuming from %s after epoch %d", self.checkpoint_path, len(self.history))
        elif self.cfg.continue_from is not None:
            self._init_from_parent(parse_signature(self.cfg.continue_from, "continue_from"))
        else:
            self._calibrate()

    def _check_compatible(self, state: tp.Mapping[str, tp.Any], what: str) -> None:
        if state.get("family") != self.family.name:
            raise DemixError(f"{what} holds a {state.get('family')!r} model, this XP trains {self.family.name!r}")
        if list(state.get("sources", [])) != self.sources:
            raise DemixError(f"{what} separates {state.get('sources')}, this XP separates {self.sources}")

    def _init_from_parent(self, signature: str) -> None:
        parent_folder = self.folder.parent / signature
        path = parent_folder / CHECKPOINT_NAME
        if not parent_folder.is_dir():
            raise DemixError(f"continue_from={signature}: no experiment with that signature in {self.folder.parent}")
        if not path.exists():
            raise DemixError(f"continue_from={signature}: the experiment has no checkpoint yet ({path})")
        state = load_torch(path)
        if not state.get("done"):
            raise DemixError(f"continue_from={signature}: the experiment has not finished training "
                             f"({len(state.get('history', []))} epochs so far); wait for it or resume it")
        self._check_compatible(state, f"continue_from={signature}")
        try:
            self.model.load_state_dict(state["best_state"])
        except RuntimeError as error:
            raise DemixError(f"continue_from={signature}: its weights do not fit this model's "
                             f"configuration ({str(error).splitlines()[0]})") from None
        for ema in self.emas:
            ema.load_state_dict(self.model.state_dict())
        self.parent = signature
        logger.info("initialised from the best state of XP %s", signature)

    def _calibrate(self) -> None:
        if self.family.calibrate is None:
            return
        dataset = self.data.train
        per_track = int(self.cfg.samples_per_track)
        keep = min(per_track, CALIBRATION_SEGMENTS_PER_TRACK)
        indices = [index for index in range(len(dataset)) if index % per_track < keep]
        dataset.set_epoch(0)
        loader = DataLoader(Subset(dataset, indices), batch_size=self._local_batch_size(),
                            num_workers=self._num_workers())
        frames = self.segment_frames

        def batches() -> tp.Iterator[tp.Tuple[torch.Tensor, torch.Tensor]]:
            for sources in LogProgress(logger, loader, updates=self.cfg.misc.log_updates, name="Calibration"):
                sources = sources[..., :frames].to(self.device)
                yield sources.sum(dim=1), sources

        self.family.calibrate(self.model, batches())
        for ema in self.emas:
            ema.load_state_dict(self.model.state_dict())

    # --------------------------------------------------------------- training
    def _num_workers(self) -> int:
        value = self.cfg.misc.num_workers
        if value == "auto":
            if self.device.type == "cpu":
                return 0
            return min(4, max(1, (os.cpu_count() or 1) // distrib.world_size() - 1))
        if not isinstance(value, int) or value < 0:
            raise DemixError(f"misc.num_workers must be 'auto' or a non-negative integer, got {value!r}")
        return value

    def _local_batch_size(self) -> int:
        return int(self.cfg.batch_size) // distrib.world_size()

    def _autocast(self) -> tp.ContextManager:
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def train(self) -> tp.Dict[str, tp.Any]:
        """Run (or resume) training, then the final test; returns the final test scores."""
        self.restore()
        self._sync_history()
        epochs = int(self.cfg.epochs)
        while not self.done and len(self.history) < epochs and not self._should_stop_early():
            self._run_epoch(len(self.history))
        if not self.done:
            if len(self.history) < epochs:
                logger.info("early stopping: no improvement of %s for %d epochs",
                            self.cfg.best.metric, self.cfg.early_stop.patience)
            if "test" not in self.history[-1]:
                self.history[-1]["test"] = self._test(len(self.history))
                self._log_scalars({"epoch": len(self.history), "test": self.history[-1]["test"]})
            self.done = True
            self.save_checkpoint()
            self._sync_history()
        test = self.history[-1]["test"]
        self._log_test_table(test, len(self.history))
        return test

    def _run_epoch(self, epoch: int) -> None:
        entry: tp.Dict[str, tp.Any] = {"epoch": epoch + 1}
        self.schedule.start_epoch(epoch)
        entry["train"] = self._train_epoch(epoch)
        entry["valid"] = self._validate(epoch)
        metric = self._best_metric_value(entry)
        previous = self._best_metric_history()
        improved = previous is None or (metric > previous if self.cfg.best.mode == "max" else metric < previous)
        if improved:
            self.best_state = {key: value.detach().cpu().clone() for key, value in self._state_of(
                entry["valid"].get("state", "main")).items()}
        entry["best"] = bool(improved)
        self.schedule.end_epoch(metric)
        if distrib.world_size() > 1:
            if not distrib.replicas_identical(self.model):
                raise RuntimeError(f"epoch {epoch + 1}: the {distrib.world_size()} processes hold different weights")
            logger.info("epoch %d: weights identical on the %d processes", epoch + 1, distrib.world_size())
        test_every = int(self.cfg.test.every)
        if test_every and (epoch + 1) % test_every == 0 and epoch + 1 < int(self.cfg.epochs):
            entry["test"] = self._test(epoch + 1)
        self.history.append(entry)
        self.save_checkpoint()
        self._sync_history()
        self._log_scalars(entry)
        self._log_epoch(entry)
        if distrib.is_master():
            plot_history(self.history, self.sources, self.folder / "curves.png",
                         title=f"XP {self.folder.name} ({self.family.name})")

    def _state_of(self, name: str) -> tp.Dict[str, torch.Tensor]:
        for ema in self.emas:
            if ema.name == name:
                return ema.state_dict()
        return self.model.state_dict()

    def _train_epoch(self, epoch: int) -> tp.Dict[str, float]:
        seed = int(self.cfg.seed)
        torch.manual_seed(epoch_seed(seed, epoch, DROPOUT_STREAM + distrib.rank()))
        augment_generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, AUGMENT_STREAM + distrib.rank()))
        dataset = self.data.train
        dataset.set_epoch(epoch)
        sampler = DistributedSampler(dataset, num_replicas=distrib.world_size(), rank=distrib.rank(),
                                     shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        batch_size = self._local_batch_size()
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=self._num_workers(),
                            persistent_workers=False, pin_memory=self.device.type == "cuda")
        if len(loader) == 0:
            raise DemixError(f"batch_size={self.cfg.batch_size} is larger than the {len(dataset)} training "
                             f"examples per epoch (tracks x samples_per_track)")
        self.ddp_model.train()
        totals: tp.Dict[str, float] = {}
        count = 0
        begin = time.time()
        progress = LogProgress(logger, loader, updates=self.cfg.misc.log_updates, name=f"Train | Epoch {epoch + 1}")
        for sources in progress:
            sources = self.augment(sources, augment_generator).to(self.device, non_blocking=True)
            mixture = sources.sum(dim=1)
            with self._autocast():
                losses = self.objective(self.ddp_model, mixture, sources)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise DemixError(f"epoch {epoch + 1}: the training loss became {loss.item()}; "
                                 "lower optim.lr or enable optim.clip_grad")
            self.optimizer.zero_grad(set_to_none=True)
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = self._clip_gradients()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            for ema in self.emas:
                ema.update(self.model)
            count += 1
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm
            progress.update(loss=f"{totals['loss'] / count:.4f}")
        # DDP broadcasts buffers before each forward, which then updates them from each process'
        # own batch: after the last step the BatchNorm statistics (and their EMAs) differ.
        distrib.broadcast_tensors(self.model.buffers())
        for ema in self.emas:
            distrib.broadcast_tensors(ema.state_dict().values())
        metrics = distrib.average_metrics({key: value / count for key, value in totals.items()}, count)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["duration"] = time.time() - begin
        return metrics

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = float(self.cfg.optim.clip_grad)
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        norms = [p.grad.detach().norm() for p in params]
        return float(torch.stack(norms).norm()) if norms else 0.0

    # ------------------------------------------------------------- evaluation
    def _validate(self, epoch: int) -> tp.Dict[str, tp.Any]:
        """Validate the raw weights and each EMA on full tracks; keep the best of them."""
        begin = time.time()
        candidates = {"main": self._validate_state(epoch)}
        for ema in self.emas:
            with swapped_weights(self.model, ema.state_dict()):
                candidates[ema.name] = self._validate_state(epoch, ema.name)
        key = self.cfg.best.metric.split(".", 1)[1] if self.cfg.best.metric.startswith("valid.") else None
        chosen = "main"
        if key is not None and len(candidates) > 1:
            pick = max if self.cfg.best.mode == "max" else min
            chosen = pick(candidates, key=lambda name: candidates[name].get(key, -math.inf))
        metrics: tp.Dict[str, tp.Any] = dict(candidates[chosen])
        if len(candidates) > 1:
            metrics["state"] = chosen
            for name, values in candidates.items():
                if name != chosen:
                    metrics[name] = values
        metrics["duration"] = time.time() - begin
        return metrics

    @torch.no_grad()
    def _validate_state(self, epoch: int, name: str = "main") -> tp.Dict[str, float]:
        self.model.eval()
        dataset = self.data.valid
        indices = distrib.shard(range(len(dataset)))
        loss_totals: tp.Dict[str, float] = {}
        loss_count = 0
        sdr_total = torch.zeros(len(self.sources), dtype=torch.float64)
        label = "Valid" if name == "main" else f"Valid {name}"
        for index in LogProgress(logger, indices, updates=self.cfg.misc.log_updates,
                                 name=f"{label} | Epoch {epoch + 1}"):
            _, mixture, sources = dataset[index]
            for chunk_mixture, chunk_sources in self._loss_chunks(mixture, sources):
                with self._autocast():
                    losses = self.objective(self.model, chunk_mixture, chunk_sources)
                loss_count += 1
                for key, value in losses.items():
                    loss_totals[key] = loss_totals.get(key, 0.0) + float(value)
            estimate = self._separate(mixture, self.cfg.valid.segment, shifts=0)
            sdr_total += global_sdr(sources, estimate)
        tracks = max(1, len(indices))
        metrics = {key: value / max(1, loss_count) for key, value in loss_totals.items()}
        metrics = distrib.average_metrics(metrics, loss_count)
        sdr = distrib.average_metrics({f"nsdr_{source}": float(sdr_total[i]) / tracks
                                       for i, source in enumerate(self.sources)}, len(indices))
        metrics.update(sdr)
        metrics["nsdr"] = float(np.mean([sdr[f"nsdr_{source}"] for source in self.sources]))
        return metrics

    def _loss_chunks(self, mixture: torch.Tensor, sources: torch.Tensor
                     ) -> tp.Iterator[tp.Tuple[torch.Tensor, torch.Tensor]]:
        """The objective on a full track, computed on consecutive training-length segments
        (batched), so its memory stays bounded and its value compares with the training loss."""
        frames = self.segment_frames
        length = sources.shape[-1]
        if length < frames:
            sources = torch.nn.functional.pad(sources, (0, frames - length))
            length = frames
        chunks = sources[..., : (length // frames) * frames].unfold(-1, frames, frames)  # S, C, N, frames
        chunks = chunks.permute(2, 0, 1, 3)
        for start in range(0, chunks.shape[0], self._local_batch_size()):
            batch = chunks[start:start + self._local_batch_size()].to(self.device)
            yield batch.sum(dim=1), batch

    def _separate(self, mixture: torch.Tensor, segment: tp.Optional[float], shifts: int,
                  generator: tp.Optional[torch.Generator] = None) -> torch.Tensor:
        frames = None if segment is None else int(round(float(segment) * self.samplerate))
        with self._autocast():
            estimate = separate(self.model, mixture[None], segment=frames, overlap=float(self.cfg.valid.overlap),
                                shifts=shifts, generator=generator)
        return estimate[0].float()

    @torch.no_grad()
    def _test(self, epoch: int) -> tp.Dict[str, float]:
        """Evaluate the best state on the test set; write the per-track and summary JSON."""
        dataset = self.data.test
        if dataset is None:
            raise DemixError("the dataset has no test split (a test/ folder) to evaluate on")
        begin = time.time()
        state = self.best_state if self.best_state is not None else self.model.state_dict()
        generator = torch.Generator().manual_seed(int(self.cfg.seed))
        shifts = int(self.cfg.test.shifts)
        sdr_backend = str(self.cfg.test.sdr_backend)
        with swapped_weights(self.model, state):
            self.model.eval()
            result = evaluate(lambda mixture: self._separate(mixture, self.cfg.valid.segment, shifts, generator),
                              dataset, model_sources=self.sources, dataset_sources=self.sources,
                              sources=self.sources, samplerate=self.samplerate, museval=bool(self.cfg.test.sdr),
                              sdr_backend=sdr_backend, indices=distrib.shard(range(len(dataset))),
                              log_name=f"Test | Epoch {epoch}")
        per_track = self._gather_tracks(result.tracks)
        summary = aggregate([{k: v for k, v in track.items() if k != "track"} for track in per_track], self.sources)
        summary["duration"] = time.time() - begin
        if distrib.is_master():
            info = {"epoch": epoch, "signature": self.folder.name,
                    "dataset": OmegaConf.to_container(self.cfg.dset, resolve=True)}
            report = EvaluationResult(self.sources, per_track, summary, info=info, sdr_backend=sdr_backend)
            for path in (self.folder / "test" / f"epoch_{epoch:04d}.json", self.folder / "test_results.json"):
                report.save(path)
        return summary

    def _gather_tracks(self, tracks: tp.List[tp.Dict[str, tp.Any]]) -> tp.List[tp.Dict[str, tp.Any]]:
        if distrib.world_size() <= 1:
            return tracks
        gathered: tp.List[tp.Any] = [None] * distrib.world_size()
        torch.distributed.all_gather_object(gathered, tracks)
        return sorted((track for part in gathered for track in part), key=lambda track: track["track"])

    # ---------------------------------------------------------- bookkeeping
    def _best_metric_value(self, entry: tp.Mapping[str, tp.Any]) -> float:
        try:
            return float(lookup(entry, self.cfg.best.metric))
        except (KeyError, TypeError):
            available = sorted(f"{section}.{key}" for section in ("train", "valid")
                               for key, value in entry[section].items() if isinstance(value, float))
            raise DemixError(f"best.metric={self.cfg.best.metric!r} is not a metric; choose one of "
                             f"{', '.join(available)}") from None

    def _best_metric_history(self) -> tp.Optional[float]:
        values = [self._best_metric_value(entry) for entry in self.history]
        if not values:
            return None
        return max(values) if self.cfg.best.mode == "max" else min(values)

    def _should_stop_early(self) -> bool:
        patience = int(self.cfg.early_stop.patience)
        if not patience or not self.history:
            return False
        best_epoch = max(index for index, entry in enumerate(self.history) if entry["best"])
        return len(self.history) - 1 - best_epoch >= patience

    def _sync_history(self) -> None:
        """Mirror the history into Dora's history.json (what `dora info` and grids read)."""
        from dora import get_xp, is_xp

        if distrib.is_master() and is_xp():
            get_xp().link.update_history(self.history)

    def _log_scalars(self, entry: tp.Mapping[str, tp.Any]) -> None:
        """TensorBoard scalars of one epoch, under train/, valid/ and test/."""
        if not distrib.is_master():
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events that a crashed run logged after its last checkpoint.
            self._writer = SummaryWriter(log_dir=str(self.folder / "tensorboard"), purge_step=entry["epoch"])
        for section in ("train", "valid", "test"):
            for key, value in entry.get(section, {}).items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{section}/{key}", value, entry["epoch"])
        self._writer.flush()

    def _log_epoch(self, entry: tp.Mapping[str, tp.Any]) -> None:
        valid = entry["valid"]
        parts = [f"Epoch {entry['epoch']}/{self.cfg.epochs}", f"train loss {entry['train']['loss']:.4f}",
                 f"valid loss {valid.get('loss', math.nan):.4f}", f"valid nSDR {valid['nsdr']:.3f} dB"]
        parts += [f"{source} {valid[f'nsdr_{source}']:.2f}" for source in self.sources]
        parts.append(f"{entry['train']['duration'] + valid['duration']:.0f} s")
        if entry["best"]:
            parts.append("(best)")
        logger.info(" | ".join(parts))

    def _log_test_table(self, test: tp.Mapping[str, float], epoch: int) -> None:
        if distrib.is_master():
            logger.info("Test set scores (best state, after epoch %d; museval SDR: median of frames and tracks, "
                        "global SDR: mean over tracks), %s:\n%s", epoch, self.folder / "test_results.json",
                        format_table(dict(test), self.sources))

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
