"""Validation and test of an XP during training.

Validation runs after every epoch on the validation tracks, for the raw weights and for each
EMA: the objective on training-length chunks (comparable with the training loss) and the MDX
global SDR per source of the whole separated tracks; the best candidate by `best.metric` is
kept. The test evaluates the best state on the test split with the shared evaluation loop
(:mod:`demixlab.evaluation.loop`) and writes the per-track and summary JSON. Tracks are sharded
across processes and their results gathered.
"""
import logging
import math
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch
from dora.log import LogProgress

from ..data import DataSplits
from ..errors import DemixError
from ..evaluation.loop import EvaluationResult, evaluate
from ..evaluation.metrics import aggregate, global_sdr
from ..models import SeparationModel
from ..models.losses import Objective
from ..separation import apply_model
from . import distrib
from .config import TrainingConfig
from .optim import ModelEMA, swapped_weights

logger = logging.getLogger(__name__)


class Validator:
    """Validates and tests one XP's model.

    Args:
        model: the (unwrapped) model being trained.
        objective: its training objective.
        data: the XP's datasets.
        config: the XP's configuration.
        device: where the model runs.
        autocast: a context manager factory for mixed precision (a no-op when disabled).
        report_info: extra fields of the test reports (signature, dataset).
        folder: the XP folder (test reports go to `test/epoch_N.json` and `test_results.json`).
    """

    def __init__(self, model: SeparationModel, objective: Objective, data: DataSplits, config: TrainingConfig,
                 device: torch.device, autocast: tp.Callable[[], tp.ContextManager],
                 report_info: tp.Dict[str, tp.Any], folder: Path):
        self.model = model
        self.objective = objective
        self.data = data
        self.config = config
        self.device = device
        self.autocast = autocast
        self.report_info = report_info
        self.folder = folder
        self.sources = list(data.sources)
        self.segment_frames = int(round(config.segment * data.samplerate))
        self.batch_size = config.batch_size // distrib.world_size()

    # ----------------------------------------------------------------------------- validation
    def validate(self, epoch: int, emas: tp.Sequence[ModelEMA]) -> tp.Dict[str, tp.Any]:
        """Validate the raw weights and each EMA; the best of them by `best.metric` is reported,
        with `state` naming it and the other candidates' metrics under their names."""
        begin = time.time()
        candidates = {"main": self._validate_state(epoch)}
        for ema in emas:
            with swapped_weights(self.model, ema.state_dict()):
                candidates[ema.name] = self._validate_state(epoch, ema.name)
        best = self.config.best
        key = best.metric.split(".", 1)[1] if best.metric.startswith("valid.") else None
        chosen = "main"
        if key is not None and len(candidates) > 1:
            pick = max if best.mode == "max" else min
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
        for index in LogProgress(logger, indices, updates=self.config.misc.log_updates,
                                 name=f"{label} | Epoch {epoch + 1}"):
            _, mixture, sources = dataset[index]
            for chunk_mixture, chunk_sources in self._loss_chunks(sources):
                with self.autocast():
                    losses = self.objective(self.model, chunk_mixture, chunk_sources)
                loss_count += 1
                for key, value in losses.items():
                    loss_totals[key] = loss_totals.get(key, 0.0) + float(value)
            estimate = self.separate(mixture, shifts=0)
            sdr_total += global_sdr(sources, estimate)
        tracks = max(1, len(indices))
        metrics = {key: value / max(1, loss_count) for key, value in loss_totals.items()}
        metrics = distrib.average_metrics(metrics, loss_count)
        sdr = distrib.average_metrics({f"nsdr_{source}": float(sdr_total[i]) / tracks
                                       for i, source in enumerate(self.sources)}, len(indices))
        metrics.update(sdr)
        metrics["nsdr"] = float(np.mean([sdr[f"nsdr_{source}"] for source in self.sources]))
        return metrics

    def _loss_chunks(self, sources: torch.Tensor) -> tp.Iterator[tp.Tuple[torch.Tensor, torch.Tensor]]:
        """The objective on a full track, computed on consecutive training-length segments
        (batched), so its memory stays bounded and its value compares with the training loss."""
        frames = self.segment_frames
        length = sources.shape[-1]
        if length < frames:
            sources = torch.nn.functional.pad(sources, (0, frames - length))
            length = frames
        chunks = sources[..., : (length // frames) * frames].unfold(-1, frames, frames)  # S, C, N, frames
        chunks = chunks.permute(2, 0, 1, 3)
        for start in range(0, chunks.shape[0], self.batch_size):
            batch = chunks[start:start + self.batch_size].to(self.device)
            yield batch.sum(dim=1), batch

    def separate(self, mixture: torch.Tensor, shifts: int, generator: tp.Optional[torch.Generator] = None
                 ) -> torch.Tensor:
        """The model's (S, C, T) estimate of a (C, T) track, in chunks of `valid.segment` seconds."""
        segment = self.config.valid.segment
        frames = None if segment is None else int(round(float(segment) * self.data.samplerate))
        with self.autocast():
            estimate = apply_model(self.model, mixture[None], segment=frames, overlap=self.config.valid.overlap,
                                   shifts=shifts, generator=generator)
        return estimate[0].float()

    # ----------------------------------------------------------------------------------- test
    @torch.no_grad()
    def test(self, epoch: int, state: tp.Dict[str, torch.Tensor]) -> tp.Dict[str, float]:
        """Evaluate `state` on the test set; write the per-track and summary JSON (rank 0)."""
        dataset = self.data.test
        if dataset is None:
            raise DemixError("the dataset has no test split (a test/ folder) to evaluate on")
        begin = time.time()
        generator = torch.Generator().manual_seed(self.config.seed)
        test = self.config.test
        with swapped_weights(self.model, state):
            self.model.eval()
            result = evaluate(lambda mixture: self.separate(mixture, test.shifts, generator),
                              dataset, model_sources=self.sources, dataset_sources=self.sources,
                              sources=self.sources, samplerate=self.data.samplerate, museval=test.sdr,
                              sdr_backend=test.sdr_backend, indices=distrib.shard(range(len(dataset))),
                              log_name=f"Test | Epoch {epoch}")
        per_track = self._gather_tracks(result.tracks)
        summary = aggregate([{k: v for k, v in track.items() if k != "track"} for track in per_track], self.sources)
        summary["duration"] = time.time() - begin
        if distrib.is_master():
            report = EvaluationResult(self.sources, per_track, summary, info={"epoch": epoch, **self.report_info},
                                      sdr_backend=test.sdr_backend)
            for path in (self.folder / "test" / f"epoch_{epoch:04d}.json", self.folder / "test_results.json"):
                report.save(path)
        return summary

    def _gather_tracks(self, tracks: tp.List[tp.Dict[str, tp.Any]]) -> tp.List[tp.Dict[str, tp.Any]]:
        if distrib.world_size() <= 1:
            return tracks
        gathered: tp.List[tp.Any] = [None] * distrib.world_size()
        torch.distributed.all_gather_object(gathered, tracks)
        return sorted((track for part in gathered for track in part), key=lambda track: track["track"])
