"""Validation and test of an XP during training.

Validation runs after every epoch on the validation tracks, for the raw weights and for each
EMA: the objective on training-length chunks (comparable with the training loss) and the MDX
global SDR per source of the whole separated tracks; the best candidate by `best.metric` is
kept. Every `valid.audio_every` epochs an excerpt of the first validation track and its
separation go to TensorBoard (:meth:`Validator.media_excerpt`). The test evaluates the best state
on the test split with the shared evaluation loop (:mod:`demixlab.evaluation.loop`) and writes
the per-track and summary JSON. Tracks are sharded
across processes and their results gathered.
"""
import logging
import math
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dora.log import LogProgress

from ..data import DataSplits
from ..errors import DemixError
from ..evaluation.loop import EvaluationResult, evaluate
from ..evaluation.metrics import aggregate, global_sdr, streamed_global_sdr
from ..models import SeparationModel
from ..models.losses import Objective
from ..separation import apply_model, stream_model
from . import distrib
from .config import TrainingConfig
from .optim import ModelEMA, swapped_weights

logger = logging.getLogger(__name__)


@dataclass
class MediaExcerpt:
    """An excerpt of a validation track and its separation, for TensorBoard.

    Attributes:
        track: the track's name.
        start: where the excerpt starts in the track, in seconds.
        samplerate: its sample rate.
        sources: the source names.
        mixture: (C, T) the mixture.
        references: (S, C, T) the true sources.
        estimates: (S, C, T) the model's estimates.
    """

    track: str
    start: float
    samplerate: int
    sources: tp.List[str]
    mixture: torch.Tensor
    references: torch.Tensor
    estimates: torch.Tensor


def choose_candidate(candidates: tp.Mapping[str, tp.Mapping[str, float]], metric: str, mode: str) -> str:
    """The name of the best candidate (`main` first, then the EMAs) by `metric` (a `valid.KEY` of the
    history; `main` for any other metric) in `mode` (max or min). A candidate without the metric
    never wins, whichever way the metric is better."""
    names = list(candidates)
    if not metric.startswith("valid.") or len(names) == 1:
        return names[0]
    key = metric.split(".", 1)[1]
    missing = -math.inf if mode == "max" else math.inf
    pick = max if mode == "max" else min
    return pick(names, key=lambda name: candidates[name].get(key, missing))


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
        with `state` naming it and the other candidates' metrics under their names.

        Each track is read once and scored by every candidate in turn (their weights swapped in).
        """
        begin = time.time()
        self.model.eval()
        names = ["main"] + [ema.name for ema in emas]
        states = {ema.name: ema.state_dict() for ema in emas}
        loss_totals: tp.Dict[str, tp.Dict[str, torch.Tensor]] = {name: {} for name in names}
        loss_count = 0
        sdr_totals = {name: torch.zeros(len(self.sources), dtype=torch.float64) for name in names}
        dataset = self.data.valid
        indices = distrib.shard(range(len(dataset)))
        label = "Valid" if not emas else f"Valid ({len(names)} candidates)"
        raw = {key: value.detach().clone() for key, value in self.model.state_dict().items()} if emas else {}
        try:
            with torch.no_grad():
                for index in LogProgress(logger, indices, updates=self.config.misc.log_updates,
                                         name=f"{label} | Epoch {epoch + 1}"):
                    _, mixture, sources = dataset[index]
                    chunks = 0
                    for name in names:
                        if emas:
                            self.model.load_state_dict(states.get(name, raw))
                        chunks = self._track_losses(sources, loss_totals[name])
                        sdr_totals[name] += self._track_sdr(mixture, sources)
                    loss_count += chunks
        finally:
            if emas:
                self.model.load_state_dict(raw)
        candidates = {name: self._metrics(loss_totals[name], loss_count, sdr_totals[name], len(indices))
                      for name in names}
        chosen = choose_candidate(candidates, self.config.best.metric, self.config.best.mode)
        metrics: tp.Dict[str, tp.Any] = dict(candidates[chosen])
        if len(candidates) > 1:
            metrics["state"] = chosen
            for name, values in candidates.items():
                if name != chosen:
                    metrics[name] = values
        metrics["duration"] = time.time() - begin
        return metrics

    def _track_losses(self, sources: torch.Tensor, totals: tp.Dict[str, torch.Tensor]) -> int:
        """Add the objective's values on one track's chunks to `totals` (on the device); returns the
        number of chunks."""
        count = 0
        for chunk_mixture, chunk_sources in self._loss_chunks(sources):
            with self.autocast():
                losses = self.objective(self.model, chunk_mixture, chunk_sources)
            count += 1
            for key, value in losses.items():
                value = value.detach().float()
                totals[key] = totals[key] + value if key in totals else value
        return count

    def _metrics(self, loss_totals: tp.Dict[str, torch.Tensor], loss_count: int, sdr_total: torch.Tensor,
                 tracks: int) -> tp.Dict[str, float]:
        """One candidate's validation metrics, averaged across processes."""
        names = list(loss_totals)
        values = (torch.stack([loss_totals[name] for name in names]) / max(1, loss_count)).tolist() if names else []
        metrics = distrib.average_metrics(dict(zip(names, values)), loss_count)
        sdr = distrib.average_metrics({f"nsdr_{source}": float(sdr_total[i]) / max(1, tracks)
                                       for i, source in enumerate(self.sources)}, tracks)
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

    def _track_sdr(self, mixture: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """Global SDR per source of the model's estimate of one (C, T) track. The estimate is
        streamed (chunk by chunk, as :meth:`separate` computes it) into the sums of the SDR, so
        only the track's mixture and references are held, not a track-sized estimate too."""
        frames = self.valid_frames
        if frames is None:
            return global_sdr(sources, self.separate(mixture, shifts=0))
        blocks = (mixture[None, :, start:start + frames] for start in range(0, mixture.shape[-1], frames))
        with self.autocast():
            estimate = stream_model(self.model, blocks, segment=frames, overlap=self.config.valid.overlap)
            return streamed_global_sdr(sources, (block[0].float() for block in estimate))

    @property
    def valid_frames(self) -> tp.Optional[int]:
        """Samples per chunk when separating full tracks (`valid.segment`), None: whole tracks."""
        segment = self.config.valid.segment
        return None if segment is None else int(round(float(segment) * self.data.samplerate))

    def separate(self, mixture: torch.Tensor, shifts: int, generator: tp.Optional[torch.Generator] = None
                 ) -> torch.Tensor:
        """The model's (S, C, T) estimate of a (C, T) track, in chunks of `valid.segment` seconds."""
        frames = self.valid_frames
        with self.autocast():
            estimate = apply_model(self.model, mixture[None], segment=frames, overlap=self.config.valid.overlap,
                                   shifts=shifts, generator=generator)
        return estimate[0].float()

    @torch.no_grad()
    def media_excerpt(self, state: tp.Dict[str, torch.Tensor], seconds: float) -> MediaExcerpt:
        """`seconds` from the middle of the first validation track (all of it when shorter), and
        their separation by the weights `state` (the model's own weights are restored after)."""
        name, mixture, sources = self.data.valid[0]
        samplerate = self.data.samplerate
        length = mixture.shape[-1]
        frames = min(length, int(round(seconds * samplerate)))
        start = (length - frames) // 2
        mixture, sources = mixture[..., start:start + frames], sources[..., start:start + frames]
        with swapped_weights(self.model, state):
            self.model.eval()
            estimates = self.separate(mixture, shifts=0).cpu()
        return MediaExcerpt(track=name, start=start / samplerate, samplerate=samplerate, sources=self.sources,
                            mixture=mixture.float(), references=sources.float(), estimates=estimates)

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
