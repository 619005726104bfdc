"""The generic training solver: one XP, any registered model family.

The solver never names a family: it builds the model, objective and calibration from the
registry entry that `model.family` selects, and only relies on the model contract
(:class:`~demixlab.models.SeparationModel`: a (B, C, T) mixture in, (B, S, C, T) stems out).
It runs the loop; the checkpoint (:mod:`.checkpoint`), validation and test (:mod:`.validation`)
and what the XP shows (:mod:`.reporting`) live beside it. With `quant.diffq`, the objective sees
the model through DiffQ's noisy weights and the size penalty joins the loss (:mod:`.diffq`).

Resume is exact. A checkpoint is written atomically after every epoch (model, optimizer,
schedule, EMAs, best state, history). All randomness of an epoch (segment sampling, shuffling,
augmentation, dropout) is seeded from (seed, epoch), so an epoch replayed after a crash, or
resumed from the checkpoint, is the same epoch the uninterrupted run trained.
"""
import logging
import os
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch
from dora.log import LogProgress
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from ..data import build_datasets, resolve_cache_dir
from ..errors import DemixError
from ..models import get_family
from . import distrib
from .augment import build_augmentation, build_example_effects
from .checkpoint import Checkpointer, Record, XPIdentity
from .config import TrainingConfig, is_model_file, parse_config
from .diffq import DiffQuantizer, NoisyModel
from .finetune import adapted_state, apply_finetune, is_adapted, trainable_summary
from .optim import LearningRateSchedule, ModelEMA, build_optimizer
from .reporting import Reporter
from .validation import Validator

logger = logging.getLogger(__name__)

CALIBRATION_SEGMENTS_PER_TRACK = 8
# Devices on which `amp.enabled` turns autocast (and, for float16, the gradient scaler) on. The CPU
# is left out on purpose: autocast there is slower than float32. Tests add it to run the AMP path.
AMP_DEVICES = ("cuda",)
# Random streams derived from (seed, epoch); the rank is added to per-process streams.
INIT_STREAM, DROPOUT_STREAM, AUGMENT_STREAM = 0, 1000, 2000


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one random stream of one epoch (streams: data, augmentation, dropout...)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class EpochSampler(Sampler):
    """Wraps a sampler of indices into one of (epoch, index) pairs (see
    :meth:`demixlab.data.SegmentDataset.__getitem__`), so that DataLoader workers that persist
    across epochs still know which epoch an index belongs to."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: its shuffle and the epoch its examples are drawn for."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> tp.Iterator[tp.Tuple[int, int]]:
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def lookup(entry: tp.Mapping[str, tp.Any], path: str) -> tp.Any:
    """Read a dotted path such as `valid.nsdr` in a history entry (KeyError when absent)."""
    value: tp.Any = entry
    for part in path.split("."):
        value = value[part]
    return value


class Solver:
    """Trains, validates, tests and checkpoints one XP.

    Args:
        cfg: the composed Hydra config (checked against :class:`TrainingConfig`).
        folder: the XP folder; everything the XP writes goes there.
        base_dir: the directory `dora` ran from (user paths resolve against it).
        device: where to train.
    """

    def __init__(self, cfg: DictConfig, folder: Path, base_dir: Path, device: torch.device):
        config = parse_config(cfg)
        if config.batch_size % distrib.world_size():
            raise DemixError(f"batch_size={config.batch_size} is not divisible by the {distrib.world_size()} "
                             "processes")
        self.config: TrainingConfig = config
        self.folder = folder
        self.base_dir = base_dir
        self.device = device
        self.family = get_family(config.model["family"])
        self.augment = build_augmentation(config.augment, config.dset.samplerate)
        self.data = build_datasets(
            config.dset, segment=config.segment, samples_per_track=config.samples_per_track, seed=config.seed,
            cache_dir=resolve_cache_dir(config.misc.cache_dir), base_dir=base_dir,
            extra_frames=self.augment.extra_frames, with_test=True, progress=config.misc.progress,
            transform=build_example_effects(config.augment, config.dset.samplerate))
        self.sources = list(self.data.sources)
        self.segment_frames = int(round(config.segment * self.data.samplerate))

        torch.manual_seed(epoch_seed(config.seed, 0, INIT_STREAM))  # initial weights depend on the seed alone
        self.model = self.family.build_model(self.sources, self.data.samplerate, self.data.channels,
                                             config.model_options)
        apply_finetune(self.model, config.finetune)  # before the optimizer: it sees trainable parameters only
        self.model.to(device)
        self.objective = self.family.objective(self.model, config.loss)
        self.optimizer = build_optimizer(self.model, config.optim)
        # quant.diffq: learned bit depths, noisy weights in training and a size penalty in the loss
        self.quantizer: tp.Optional[DiffQuantizer] = None
        train_model: torch.nn.Module = self.model
        if config.quant.diffq is not None:
            self.quantizer = DiffQuantizer(self.model, config.quant).to(device)
            lr = config.quant.lr if config.quant.lr is not None else config.optim.lr
            self.optimizer.add_param_group({"name": "diffq_bits", "params": list(self.quantizer.parameters()),
                                            "lr": float(lr), "initial_lr": float(lr), "weight_decay": 0.0})
            train_model = NoisyModel(self.model, self.quantizer)
        self.schedule = LearningRateSchedule(self.optimizer, config.scheduler, config.epochs, config.best.mode)
        self.emas = [ModelEMA(self.model, decay) for decay in config.ema.decays]
        self.record = Record()
        self.ddp_model = distrib.wrap(train_model)
        self.amp_dtype = getattr(torch, config.amp.dtype)
        self.use_amp = config.amp.enabled and device.type in AMP_DEVICES
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        self._loader: tp.Optional[DataLoader] = None
        self._sampler: tp.Any = None

        raw = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(raw, dict)
        identity = XPIdentity(family=self.family.name, model_options=config.model_options, sources=self.sources,
                              samplerate=self.data.samplerate, audio_channels=self.data.channels)
        self.checkpointer = Checkpointer(folder, identity, cfg, model=self.model, optimizer=self.optimizer,
                                         schedule=self.schedule, grad_scaler=self.grad_scaler, emas=self.emas,
                                         quantizer=self.quantizer)
        self.validator = Validator(self.model, self.objective, self.data, config, device, self._autocast,
                                   report_info={"signature": folder.name, "dataset": raw["dset"]}, folder=folder)
        self.reporter = Reporter(folder, self.sources, config.epochs, title=f"XP {folder.name} ({self.family.name})")
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info("model %s: %s sources, %.2f M trainable parameters", self.family.name,
                    "/".join(self.sources), params / 1e6)
        logger.info(trainable_summary(self.model))

    # ------------------------------------------------------------------ state
    def restore(self) -> None:
        """Resume from this XP's checkpoint, else initialise from `continue_from`, else calibrate."""
        record = self.checkpointer.restore()
        if record is not None:
            self.record = record
        elif self.config.continue_from is not None:
            parent = self.config.continue_from
            weights = self.checkpointer.parent_weights(parent, self.base_dir)
            if is_adapted(self.model.state_dict()):  # finetune.lora: the parent's weights are the base
                weights = adapted_state(self.model, weights)
            try:
                self.model.load_state_dict(weights)
            except RuntimeError as error:
                raise DemixError(f"continue_from={parent}: its weights do not fit this model's "
                                 f"configuration ({str(error).splitlines()[0]})") from None
            for ema in self.emas:
                ema.load_state_dict(self.model.state_dict())
            self.record.parent = parent
            what = "model file" if is_model_file(parent) else "the best state of XP"
            logger.info("initialised from %s %s", what, parent)
        else:
            self._calibrate()
        self._synchronise()

    def _synchronise(self) -> None:
        """Start every process from rank 0's weights, buffers and EMAs (restoring and calibrating may
        differ across processes: calibration sees each process' own data)."""
        distrib.broadcast_tensors(list(self.model.parameters()) + list(self.model.buffers()))
        for ema in self.emas:
            distrib.broadcast_tensors(ema.state_dict().values())

    def _calibrate(self) -> None:
        if self.family.calibrate is None:
            return
        dataset = self.data.train
        per_track = self.config.samples_per_track
        keep = min(per_track, CALIBRATION_SEGMENTS_PER_TRACK)
        indices = [index for index in range(len(dataset)) if index % per_track < keep]
        dataset.set_epoch(0)
        loader = DataLoader(Subset(dataset, indices), batch_size=self._local_batch_size(),
                            num_workers=self._num_workers())
        frames = self.segment_frames

        def batches() -> tp.Iterator[tp.Tuple[torch.Tensor, torch.Tensor]]:
            for batch in LogProgress(logger, loader, updates=self.config.misc.log_updates, name="Calibration"):
                yield self.augment.model_input(batch[..., :frames].to(self.device), None)

        self.family.calibrate(self.model, batches())
        for ema in self.emas:
            ema.load_state_dict(self.model.state_dict())

    # --------------------------------------------------------------- training
    def _num_workers(self) -> int:
        value = self.config.misc.num_workers
        if value == "auto":
            if self.device.type == "cpu":
                return 0
            return min(4, max(1, (os.cpu_count() or 1) // distrib.world_size() - 1))
        return int(value)

    def _local_batch_size(self) -> int:
        return self.config.batch_size // distrib.world_size()

    def _autocast(self) -> tp.ContextManager:
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def train(self) -> tp.Dict[str, tp.Any]:
        """Run (or resume) training, then the final test; returns the final test scores."""
        self.restore()
        record = self.record
        self.reporter.sync_history(record.history)
        epochs = self.config.epochs
        while not record.done and len(record.history) < epochs and not self._should_stop_early():
            self._run_epoch(len(record.history))
        if not record.done:
            if len(record.history) < epochs:
                logger.info("early stopping: no improvement of %s for %d epochs",
                            self.config.best.metric, self.config.early_stop.patience)
            if "test" not in record.history[-1]:
                record.history[-1]["test"] = self._test(len(record.history))
                self.reporter.scalars({"epoch": len(record.history), "test": record.history[-1]["test"]})
            record.done = True
            self.checkpointer.save(record)
            self.reporter.sync_history(record.history)
        test = record.history[-1]["test"]
        self.reporter.test_table(test, len(record.history))
        return test

    def _run_epoch(self, epoch: int) -> None:
        entry: tp.Dict[str, tp.Any] = {"epoch": epoch + 1}
        entry["train"] = self._train_epoch(epoch)
        entry["valid"] = self.validator.validate(epoch, self.emas)
        metric = self._best_metric_value(entry)
        previous = self._best_metric_history()
        improved = previous is None or (metric > previous if self.config.best.mode == "max" else metric < previous)
        if improved:
            self.record.best_state = {key: value.detach().cpu().clone() for key, value in self._state_of(
                entry["valid"].get("state", "main")).items()}
            if self.quantizer is not None:
                self.record.best_bits = self.quantizer.rounded_bits()
        entry["best"] = bool(improved)
        self.schedule.end_epoch(metric)
        if distrib.world_size() > 1:
            if not distrib.replicas_identical(self.ddp_model):  # the model, and DiffQ's bit logits with it
                raise RuntimeError(f"epoch {epoch + 1}: the {distrib.world_size()} processes hold different weights")
            logger.info("epoch %d: weights identical on the %d processes", epoch + 1, distrib.world_size())
        test_every = self.config.test.every
        if test_every and (epoch + 1) % test_every == 0 and epoch + 1 < self.config.epochs:
            entry["test"] = self._test(epoch + 1)
        self.record.history.append(entry)
        self.checkpointer.save(self.record)
        self.reporter.epoch(entry, self.record.history)
        audio_every = self.config.valid.audio_every
        if audio_every and (epoch + 1) % audio_every == 0 and distrib.is_master():
            state = self._state_of(entry["valid"].get("state", "main"))
            self.reporter.media(epoch + 1, self.validator.media_excerpt(state, self.config.valid.audio_seconds))

    def _state_of(self, name: str) -> tp.Dict[str, torch.Tensor]:
        for ema in self.emas:
            if ema.name == name:
                return ema.state_dict()
        return self.model.state_dict()

    def _train_loader(self) -> DataLoader:
        """The training DataLoader, built once: its sampler hands the workers (epoch, index) pairs,
        so persistent workers draw the same examples as fresh ones would (exact resume)."""
        if self._loader is None:
            dataset = self.data.train
            self._sampler = EpochSampler(DistributedSampler(dataset, num_replicas=distrib.world_size(),
                                                            rank=distrib.rank(), shuffle=True, seed=self.config.seed,
                                                            drop_last=True))
            workers = self._num_workers()
            self._loader = DataLoader(dataset, batch_size=self._local_batch_size(), sampler=self._sampler,
                                      drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                      pin_memory=self.device.type == "cuda")
            if len(self._loader) == 0:
                raise DemixError(f"batch_size={self.config.batch_size} is larger than the {len(dataset)} training "
                                 f"examples per epoch (tracks x samples_per_track)")
        return self._loader

    def _train_epoch(self, epoch: int) -> tp.Dict[str, float]:
        """One epoch of training steps. Nothing in a step waits for the device: losses, gradient
        norms and the first non-finite step are accumulated there and read at log points."""
        seed = self.config.seed
        torch.manual_seed(epoch_seed(seed, epoch, DROPOUT_STREAM + distrib.rank()))
        generator = torch.Generator(device=self.device)
        generator.manual_seed(epoch_seed(seed, epoch, AUGMENT_STREAM + distrib.rank()))
        loader = self._train_loader()
        self._sampler.set_epoch(epoch)
        self.ddp_model.train()
        totals: tp.Dict[str, torch.Tensor] = {}
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        begin = time.time()
        progress = LogProgress(logger, loader, updates=self.config.misc.log_updates, name=f"Train | Epoch {epoch + 1}")
        for step, batch in enumerate(progress):
            mixture, sources = self.augment.model_input(batch.to(self.device, non_blocking=True), generator)
            with self._autocast():
                losses = self.objective(self.ddp_model, mixture, sources)
            loss = losses["loss"]
            if self.quantizer is not None:  # trained on loss + penalty; `loss` stays the objective's, as in validation
                penalty = self.config.quant.diffq * self.quantizer.model_size_mb()
                losses = {**losses, "diffq_penalty": penalty}
                loss = loss + penalty
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            self.optimizer.zero_grad(set_to_none=True)
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = self._clip_gradients()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            for ema in self.emas:
                ema.update()
            for key, value in losses.items():
                value = value.detach().float()
                totals[key] = totals[key] + value if key in totals else value
            totals["grad_norm"] = totals["grad_norm"] + grad_norm if "grad_norm" in totals else grad_norm
            if progress.update() or step + 1 == len(loader):  # a log line (or the end): read the device once
                self._check_finite(first_bad, epoch)
                progress.update(loss=f"{float(totals['loss']) / (step + 1):.4f}")
        count = len(loader)
        # DDP broadcasts buffers before each forward, which then updates them from each process'
        # own batch: after the last step the BatchNorm statistics (and their EMAs) differ.
        distrib.broadcast_tensors(self.model.buffers())
        for ema in self.emas:
            distrib.broadcast_tensors(ema.state_dict().values())
        names = list(totals)
        means = (torch.stack([totals[name] for name in names]) / count).tolist()
        metrics = distrib.average_metrics(dict(zip(names, means)), count)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.quantizer is not None:  # the sizes at the end of the epoch
            metrics.update(self.quantizer.metrics())
        metrics["duration"] = time.time() - begin
        if self.device.type == "cuda":  # this process' peak of allocated tensors in the epoch
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return metrics

    def _check_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        step = int(first_bad)
        if step >= 0:
            raise DemixError(f"epoch {epoch + 1}, step {step + 1}: the training loss is not finite (NaN or inf); "
                             "lower optim.lr or enable optim.clip_grad")

    def _clip_gradients(self) -> torch.Tensor:
        """The gradients' total norm (clipped to `optim.clip_grad` when positive), on the device."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.optim.clip_grad
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm).float()
        if not params:
            return torch.zeros((), device=self.device)
        norms = torch._foreach_norm([p.grad for p in params])
        return torch.linalg.vector_norm(torch.stack(norms)).float()

    def _test(self, epoch: int) -> tp.Dict[str, float]:
        state = self.record.best_state if self.record.best_state is not None else self.model.state_dict()
        return self.validator.test(epoch, state)

    # ---------------------------------------------------------- bookkeeping
    def _best_metric_value(self, entry: tp.Mapping[str, tp.Any]) -> float:
        try:
            return float(lookup(entry, self.config.best.metric))
        except (KeyError, TypeError):
            available = sorted(f"{section}.{key}" for section in ("train", "valid")
                               for key, value in entry[section].items() if isinstance(value, float))
            raise DemixError(f"best.metric={self.config.best.metric!r} is not a metric; choose one of "
                             f"{', '.join(available)}") from None

    def _best_metric_history(self) -> tp.Optional[float]:
        values = [self._best_metric_value(entry) for entry in self.record.history]
        if not values:
            return None
        return max(values) if self.config.best.mode == "max" else min(values)

    def _should_stop_early(self) -> bool:
        patience = self.config.early_stop.patience
        if not patience or not self.record.history:
            return False
        best_epoch = max(index for index, entry in enumerate(self.record.history) if entry["best"])
        return len(self.record.history) - 1 - best_epoch >= patience

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        self.reporter.close()
