"""Automix: a fine-tuning dataset of musically plausible remixes (demucs' MDX 2021 recipe).

Every track of a dataset is analysed (:mod:`.analysis`: tempo and beat grid of the beat source,
key of the other sources), remixes are planned from stems of different tracks whose tempo and
key can be matched (:mod:`.remix`), rendered (Rubber Band through pedalboard) and written as a
folder dataset ``DST/train/REMIX_NNNN/SOURCE.wav`` with a manifest ``DST/automix.json`` and a
plot ``DST/automix.png`` (:mod:`.report`). DST appears whole or not at all: everything is written
into a temporary sibling folder renamed at the end.
"""
import contextlib
import json
import multiprocessing
import shutil
import tempfile
import typing as tp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ...audio import write_audio
from ...errors import DemixError
from ...files import atomic_path, check_writable_folder
from ..tracks import Track, conform
from .analysis import CANDIDATE_REASONS, TRACK_REASONS, TrackAnalysis, analyse_track, import_librosa
from .remix import AutomixOptions, Plans, RemixPlan, plan_remixes, render_remix
from .report import plot_automix, rejection_counts, summary_lines

__all__ = ["AutomixOptions", "AutomixResult", "CANDIDATE_REASONS", "MANIFEST", "PLOT", "RemixPlan", "TRACK_REASONS",
           "TrackAnalysis", "analyse_track", "check_destination", "make_automix"]

MANIFEST = "automix.json"
PLOT = "automix.png"
MANIFEST_VERSION = 1


@dataclass
class AutomixResult:
    """What :func:`make_automix` made: the analyses, the plans, and the summary lines."""

    destination: Path
    analyses: tp.List[TrackAnalysis]
    plans: Plans
    summary: tp.List[str]


def check_destination(destination: Path, force: bool) -> None:
    """Refuse a destination that cannot be written or that holds anything but an earlier automix
    output (which `force` allows replacing)."""
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise DemixError(f"-o {destination}: exists and is not a folder")
    if destination.is_dir() and any(destination.iterdir()):
        if not (destination / MANIFEST).is_file():
            raise DemixError(f"-o {destination}: a folder that is not empty and holds no {MANIFEST} "
                             "(not an earlier automix output); choose a new folder")
        if not force:
            raise DemixError(f"-o {destination}: holds an earlier automix output; pass --force to replace it")
    check_writable_folder(destination.parent, f"-o {destination}")


def make_automix(tracks: tp.Sequence[Track], options: AutomixOptions, destination: tp.Union[str, Path], *,
                 origin: str = "", force: bool = False, workers: int = 1, progress: bool = True) -> AutomixResult:
    """Analyse `tracks`, plan and render the remixes, and write them to `destination`.

    Args:
        tracks: the dataset's tracks (each with every source of `options.sources`).
        options: what to make.
        destination: the folder dataset to create (replaced only with `force`, and only when
            it holds an earlier automix output).
        origin: where the tracks come from, recorded in the manifest.
        workers: processes that analyse tracks and render remixes (the result does not depend
            on it: every choice is planned in this process).
        progress: show progress bars.
    """
    if workers < 1:
        raise DemixError(f"--workers {workers}: expected at least 1 process")
    destination = Path(destination).absolute()
    check_destination(destination, force)
    import_librosa()  # fail before any work when it is missing
    converted = [conform(track, options.samplerate, options.channels) for track in tracks]
    for track in converted:
        missing = [source for source in options.sources if source not in track.sources]
        if missing:
            raise DemixError(f"track {track.name}: has no source {', '.join(missing)} (it has "
                             f"{', '.join(track.sources)}); check --sources")
    with _pool(workers) as pool:
        analyses = list(tqdm(pool.map(_analyse, [(track, index, options) for index, track in enumerate(tracks)]),
                             total=len(tracks), desc="analysing", unit="track", disable=not progress,
                             dynamic_ncols=True))
    plans = plan_remixes(analyses, options)
    requested = options.count or sum(analysis.rejected is None for analysis in analyses)
    if not plans.remixes:
        counts = rejection_counts(analyses, plans)
        raise DemixError("no remix could be made: every combination was rejected ("
                         + ", ".join(f"{reason} {count}" for group in counts.values() for reason, count in group.items()
                                     if count)
                         + "); allow more with --max-tempo-change / --max-semitones, or shorten --seconds")
    summary = summary_lines(analyses, plans, options.sources, options.seconds, requested)
    building = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        jobs = [(converted, plan, options, building / "train" / plan.name) for plan in plans.remixes]
        with _pool(workers) as pool:
            for _ in tqdm(pool.map(_write_remix, jobs), total=len(jobs), desc="writing remixes", unit="remix",
                          disable=not progress, dynamic_ncols=True):
                pass
        manifest = {"version": MANIFEST_VERSION, "origin": origin, "options": dict(vars(options)),
                    "rejected": rejection_counts(analyses, plans), "abandoned_attempts": plans.abandoned,
                    "tracks": [analysis.summary() for analysis in analyses],
                    "remixes": [plan.summary() for plan in plans.remixes]}
        with atomic_path(building / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        plot_automix(analyses, plans, building / PLOT)
        building.chmod(0o755)
        _replace(building, destination)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return AutomixResult(destination, analyses, plans, summary)


class _InProcess(contextlib.AbstractContextManager):
    """The one-process stand-in of a process pool."""

    def map(self, function: tp.Callable, items: tp.Iterable) -> tp.Iterator:
        """`function` of every item, in order (as :meth:`Executor.map`)."""
        return map(function, items)

    def __exit__(self, *exc: tp.Any) -> None:
        return None


def _pool(workers: int) -> tp.Any:
    """A pool of `workers` processes (spawned: no copy of this process' torch threads), or this
    process alone."""
    if workers == 1:
        return _InProcess()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _analyse(job: tp.Tuple[Track, int, AutomixOptions]) -> TrackAnalysis:
    track, index, options = job
    return analyse_track(track, index, options.beat_source, options.min_beat_confidence, options.min_track_seconds)


def _write_remix(job: tp.Tuple[tp.Sequence[Track], RemixPlan, AutomixOptions, Path]) -> None:
    tracks, plan, options, folder = job
    for source, audio in render_remix(tracks, plan, options.seconds).items():
        write_audio(folder / f"{source}.wav", audio, options.samplerate)


def _replace(built: Path, destination: Path) -> None:
    """Rename `built` onto `destination`; an existing destination is moved aside first and
    removed once the new one is in place."""
    old = None
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{built.name.rsplit('.', 2)[-2]}")
        destination.rename(old)
    try:
        built.rename(destination)
    except OSError:
        if old is not None:
            old.rename(destination)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
