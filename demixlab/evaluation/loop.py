"""The evaluation loop: separate every track of a test set and score it.

The same metrics as the solver's test (:mod:`.metrics`): per track
and source the MDX global SDR (`nsdr`, averaged over tracks) and, optionally, museval's BSS
Eval v4 (`sdr`, `sir`, `isr`, `sar`: median over 1 s frames, then median over tracks), by
default with demixlab's torch implementation of museval's numbers (`sdr_backend`).

The separation itself is a callable `(C, T) mixture -> (S, C, T) estimates`, so that anything
that separates (a repository bag, a model in chunks) can be evaluated the same way:
:func:`demixlab.separation.bag_separator` wraps a bag.

Sources: the model must produce every source it is scored on. By default these are all the
dataset's sources (extra model sources are ignored); `sources` selects a subset explicitly. The
dataset's mixture is what the model separates, so a model that produces only some of a
dataset's stems (e.g. vocals only) is scored on those, with the other stems still in the mixture.
"""
import json
import logging
import math
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import TrackDataset
from ..errors import DemixError
from ..files import atomic_path
from .metrics import aggregate, check_sdr_backend, format_table, global_sdr, track_scores

logger = logging.getLogger(__name__)

Separate = tp.Callable[[torch.Tensor], torch.Tensor]  # (C, T) -> (S, C, T)
METRIC_DEFINITIONS = {"nsdr": "MDX global SDR, mean over tracks",
                      "sdr": "museval BSS Eval v4 SDR, median over frames then tracks"}


@dataclass
class EvaluationResult:
    """Per-track scores ({"track": name, metric: {source: value}}) and their aggregate."""

    sources: tp.List[str]
    tracks: tp.List[tp.Dict[str, tp.Any]]
    summary: tp.Dict[str, float]
    info: tp.Dict[str, tp.Any] = field(default_factory=dict)
    sdr_backend: str = "torch"

    def table(self) -> str:
        """The plain-text table: museval SDR (when computed) and global SDR per source, and the mean."""
        return format_table(self.summary, self.sources)

    def to_json(self) -> tp.Dict[str, tp.Any]:
        """JSON-ready content: sources, summary, per-track scores, metric definitions, `info`."""
        return {**self.info, "sources": self.sources, "summary": self.summary, "tracks": self.tracks,
                "definitions": {**METRIC_DEFINITIONS, "sdr_backend": self.sdr_backend}}

    def save(self, path: tp.Union[str, Path]) -> None:
        """Write :meth:`to_json` atomically (NaN/inf are written as null / strings by json's rules)."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(_json_safe(self.to_json()), indent=2))


def scored_sources(model_sources: tp.Sequence[str], dataset_sources: tp.Sequence[str],
                   wanted: tp.Optional[tp.Sequence[str]] = None, model_name: str = "the model") -> tp.List[str]:
    """The sources to score (see the module docstring); a :class:`DemixError` says what is missing."""
    model_sources, dataset_sources = list(model_sources), list(dataset_sources)
    if wanted:
        wanted = list(wanted)
        for source in wanted:
            if source not in dataset_sources:
                raise DemixError(f"--sources: {source!r} is not a source of the dataset "
                                 f"({', '.join(dataset_sources)})")
            if source not in model_sources:
                raise DemixError(f"--sources: {model_name} does not separate {source!r} "
                                 f"(it separates {', '.join(model_sources)})")
        return wanted
    missing = [source for source in dataset_sources if source not in model_sources]
    if missing:
        common = [source for source in dataset_sources if source in model_sources]
        hint = (f"; score the common sources with --sources {','.join(common)}" if common
                else "; no source in common: check dset.sources")
        raise DemixError(f"{model_name} separates {', '.join(model_sources)} but the dataset has "
                         f"{', '.join(dataset_sources)}: {', '.join(missing)} missing{hint}")
    extra = [source for source in model_sources if source not in dataset_sources]
    if extra:
        logger.info("%s also separates %s, which the dataset lacks: not scored", model_name, ", ".join(extra))
    return dataset_sources


def evaluate(separate: Separate, dataset: TrackDataset, *, model_sources: tp.Sequence[str],
             dataset_sources: tp.Sequence[str], sources: tp.Sequence[str], samplerate: int, museval: bool = True,
             sdr_backend: str = "torch", indices: tp.Optional[tp.Iterable[int]] = None,
             log_name: str = "Test") -> EvaluationResult:
    """Separate every track of `dataset` and score `sources`.

    Args:
        separate: (C, T) mixture -> (S, C, T) estimates in `model_sources` order.
        dataset: items (name, mixture (C, T), references (S', C, T) in `dataset_sources` order).
        sources: the sources scored (present in both lists, see :func:`scored_sources`).
        museval: also compute BSS Eval v4 next to the global SDR.
        sdr_backend: its implementation (:data:`.metrics.SDR_BACKENDS`); `check`
            compares torch with museval on the first track only (museval is slow).
        indices: the dataset items to evaluate (default: all), e.g. this process' share.
        log_name: prefix of the per-track log lines.
    """
    check_sdr_backend(sdr_backend)
    model_index = [list(model_sources).index(source) for source in sources]
    data_index = [list(dataset_sources).index(source) for source in sources]
    begin = time.time()
    tracks: tp.List[tp.Dict[str, tp.Any]] = []
    indices = list(range(len(dataset)) if indices is None else indices)
    for count, index in enumerate(indices, 1):
        start = time.time()
        name, mixture, references = dataset[index]
        with torch.no_grad():
            estimate = separate(mixture)
        if estimate.shape[0] != len(model_sources) or estimate.shape[1:] != mixture.shape:
            raise DemixError(f"the model returned estimates of shape {tuple(estimate.shape)} for a mixture of shape "
                             f"{tuple(mixture.shape)} (expected {len(model_sources)} sources)")
        estimate = estimate[model_index].float().cpu()
        references = references[data_index]
        scores: tp.Dict[str, tp.Any] = {"track": name,
                                        "nsdr": dict(zip(sources, global_sdr(references, estimate).tolist()))}
        if museval:
            backend = "torch" if sdr_backend == "check" and tracks else sdr_backend
            scores.update(track_scores(references, estimate, samplerate, list(sources), backend=backend))
        tracks.append(scores)
        logger.info("%s | track %d/%d %s: global SDR %s (%.1f s)", log_name, count, len(indices), name,
                    " ".join(f"{s} {v:.2f}" for s, v in scores["nsdr"].items()), time.time() - start)
    summary = aggregate([{key: value for key, value in track.items() if key != "track"} for track in tracks],
                        list(sources))
    summary["duration"] = time.time() - begin
    return EvaluationResult(sources=list(sources), tracks=tracks, summary=summary, sdr_backend=sdr_backend)


def _json_safe(value: tp.Any) -> tp.Any:
    """Replace NaN and infinities (not valid JSON) by None and signed strings."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value
