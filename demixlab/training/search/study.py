"""The search loop: Optuna's study in SQLite, trials asked, their XPs run, reported and pruned.

:class:`Search` resumes the trials a crashed search left running (their XPs continue from their
checkpoints), reads an XP that already finished instead of retraining it, prunes again without
training a trial whose XP was pruned before, and stops a trial's XP as soon as the pruner says
so. :func:`results_table` and :func:`write_plots` show the outcome.
"""
import dataclasses
import json
import math
import time
import typing as tp
import warnings
from pathlib import Path

import optuna
from dora.xp import XP
from optuna.trial import FrozenTrial, TrialState

from ...errors import DemixError
from ...experiment import DemixHydraMain
from ...files import atomic_path
from ..checkpoint import CHECKPOINT_NAME, read_checkpoint
from .runners import Runner, TrialRun
from .space import SearchSpace, is_number, make_pruner, make_sampler, override, trial_overrides


def metric_value(entry: tp.Mapping[str, tp.Any], metric: str) -> tp.Optional[float]:
    """The value of a dotted `metric` (e.g. `valid.nsdr`) in one history entry; None when absent."""
    value: tp.Any = entry
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def history_keys(entry: tp.Mapping[str, tp.Any], prefix: str = "") -> tp.List[str]:
    """The dotted keys of the numbers in a history entry (to name the choices in an error)."""
    keys = []
    for key, value in entry.items():
        if isinstance(value, dict):
            keys += history_keys(value, f"{prefix}{key}.")
        elif is_number(value) and prefix:
            keys.append(f"{prefix}{key}")
    return keys


def finished_history(xp: XP) -> tp.Optional[tp.List[tp.Dict[str, tp.Any]]]:
    """The history of an XP that finished training (its checkpoint says done), else None."""
    path = xp.folder / CHECKPOINT_NAME
    if not path.exists():
        return None
    state = read_checkpoint(path)
    return list(state["history"]) if state.get("done") else None


def running_history(xp: XP) -> tp.List[tp.Dict[str, tp.Any]]:
    """The epochs an XP has written so far (Dora's history.json, updated after every epoch)."""
    xp.link.load()
    return list(xp.link.history)


def search_folder(main: DemixHydraMain, space: SearchSpace) -> Path:
    """Where the study, its logs and plots live: `<dora.dir>/search/NAME`."""
    return Path(main.dora.dir).resolve() / "search" / space.name


def open_study(space: SearchSpace, folder: Path) -> optuna.Study:
    """Create the study in `folder/study.db`, or load it; a study started with another space is an error."""
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'study.db'}")
    identity = space.identity()
    try:
        existing = optuna.load_study(study_name=space.name, storage=storage)
    except KeyError:
        existing = None
    offset = len(existing.trials) if existing is not None else 0
    study = optuna.create_study(storage=storage, study_name=space.name, load_if_exists=True,
                                direction=space.direction, pruner=make_pruner(space),
                                sampler=make_sampler(space, offset))
    recorded = study.user_attrs.get("space")
    if recorded is None:
        study.set_user_attr("space", identity)
        for entry in space.enqueue:
            study.enqueue_trial(entry, skip_if_exists=True)
    elif json.loads(json.dumps(identity)) != recorded:
        changed = [key for key in identity if json.loads(json.dumps(identity[key])) != recorded.get(key)]
        raise space.error(", ".join(changed), f"differs from the study in {folder} (started with "
                                              f"{json.dumps({key: recorded.get(key) for key in changed})}); "
                                              "give the search a new name to start another")
    return study


@dataclasses.dataclass
class ActiveTrial:
    """A trial whose XP trains: its Optuna handle, XP, run, and the epochs reported so far."""

    trial: optuna.Trial
    xp: XP
    run: TrialRun
    reported: tp.Set[int]


class Search:
    """Runs a study's trials (see the module docstring). `log` prints one line per event."""

    def __init__(self, space: SearchSpace, main: DemixHydraMain, runner: Runner, folder: Path,
                 parallel: int = 1, poll: float = 2.0, log: tp.Callable[[str], None] = print):
        self.space = space
        self.main = main
        self.runner = runner
        self.folder = folder
        self.parallel = max(1, parallel)
        self.poll = poll
        self.log = log
        self.study = open_study(space, folder)
        self.failed: tp.List[int] = []

    def run(self) -> optuna.Study:
        """Resume the trials a crash left running, then ask new ones until the study holds `trials`
        finished trials; on Ctrl-C (or any error) the XPs being trained are stopped, their trials
        left running for the next time."""
        active: tp.List[ActiveTrial] = []
        interrupted = [frozen._trial_id for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        try:
            while True:
                while len(active) < self.parallel and interrupted:
                    self._begin(optuna.Trial(self.study, interrupted.pop(0)), active, resumed=True)
                while len(active) < self.parallel and self._unstarted() > 0:
                    self._begin(self.study.ask(), active, resumed=False)
                if not active:
                    break
                time.sleep(self.poll)
                for item in list(active):
                    if self._advance(item):
                        active.remove(item)
        finally:
            for item in active:
                if item.trial.number not in self.failed:
                    self.log(f"trial {item.trial.number} ({item.xp.sig}): stopped, resumes with the search")
                item.run.stop()
        return self.study

    def _unstarted(self) -> int:
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        return self.space.trials - len(self.study.get_trials(deepcopy=False, states=states))

    def _begin(self, trial: optuna.Trial, active: tp.List[ActiveTrial], resumed: bool) -> None:
        params = {param.key: param.suggest(trial) for param in self.space.params}
        argv = trial_overrides(self.space, params)
        try:
            xp = self.main.checked_xp(argv)
        except DemixError as error:
            self._fail(trial, f"{' '.join(argv)}: {error}")
            return
        trial.set_user_attr("signature", xp.sig)
        trial.set_user_attr("overrides", argv)
        described = f"trial {trial.number} ({xp.sig}) {' '.join(override(k, v) for k, v in params.items())}"
        done = finished_history(xp)
        if done is not None:
            self.log(f"{described}: finished before, reading its history")
            self._report(trial, done, set(), prune=False)
            self._complete(trial, xp, done)
            return
        pruned = self._pruned_before(xp.sig, trial.number)
        if pruned is not None:
            for step, value in pruned.intermediate_values.items():
                trial.report(value, step)
            self.log(f"{described}: pruned before (trial {pruned.number}), not trained again")
            self.study.tell(trial, state=TrialState.PRUNED)
            return
        self.main.init_xp(xp)
        action = "continuing" if resumed or xp.folder.joinpath(CHECKPOINT_NAME).exists() else "training"
        run = self.runner.start(xp, argv, self.folder / "logs" / f"trial_{trial.number:03d}_{xp.sig}.log")
        self.log(f"{described}: {action} ({run.where()})")
        active.append(ActiveTrial(trial, xp, run, set(trial.storage.get_trial(trial._trial_id).intermediate_values)))

    def _pruned_before(self, sig: str, number: int) -> tp.Optional[FrozenTrial]:
        return next((frozen for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
                     if frozen.user_attrs.get("signature") == sig and frozen.number != number), None)

    def _report(self, trial: optuna.Trial, history: tp.Sequence[tp.Mapping[str, tp.Any]],
                reported: tp.Set[int], prune: bool = True) -> tp.Optional[int]:
        """Report the epochs not reported yet, in order. With `prune`, returns the first epoch after
        which the pruner wants the trial stopped (later epochs, which ran before the poll saw them,
        are not reported), else None; without, reports them all (a finished trial)."""
        for step, entry in enumerate(history, start=1):
            if step in reported:
                continue
            value = metric_value(entry, self.space.metric)
            reported.add(step)
            if value is None:
                section = self.space.metric.split(".")[0]
                if section in ("train", "valid"):  # in every epoch's entry: a typo
                    keys = ", ".join(key for key in history_keys(entry) if key.startswith(f"{section}."))
                    error = self.space.error("metric", f"{self.space.metric} is not in the XPs' history "
                                                       f"(its {section} keys: {keys})")
                    self._fail(trial, str(error))
                    raise error
                continue
            if math.isfinite(value):
                trial.report(value, step)
                if prune and trial.should_prune():
                    return step
        return None

    def _advance(self, item: ActiveTrial) -> bool:
        """Read the trial's new epochs; prune it, or settle it when its run ended. True once settled."""
        history = running_history(item.xp)
        pruned_at = self._report(item.trial, history, item.reported)
        if pruned_at is not None:
            item.run.stop()
            late = f", {len(history)} run" if len(history) > pruned_at else ""
            self.log(f"trial {item.trial.number} ({item.xp.sig}): pruned after epoch {pruned_at}{late} "
                     f"({self.space.metric} {_format(metric_value(history[pruned_at - 1], self.space.metric))})")
            self.study.tell(item.trial, state=TrialState.PRUNED)
            return True
        finished = item.run.finished()
        if finished is None:
            return False
        done = finished_history(item.xp) if finished else None
        if done is None:
            self._fail(item.trial, f"{item.xp.sig}: {item.run.describe_failure()}")
            return True
        self._report(item.trial, done, item.reported, prune=False)
        self._complete(item.trial, item.xp, done)
        return True

    def _complete(self, trial: optuna.Trial, xp: XP, history: tp.Sequence[tp.Mapping[str, tp.Any]]) -> None:
        values = [value for value in (metric_value(entry, self.space.metric) for entry in history)
                  if value is not None and math.isfinite(value)]
        if not values:
            self._fail(trial, f"{xp.sig}: no finite {self.space.metric} in its history")
            return
        best = max(values) if self.space.direction == "maximize" else min(values)
        self.study.tell(trial, best)
        self.log(f"trial {trial.number} ({xp.sig}): complete, best {self.space.metric} {best:.3f}")

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("error", reason)
        self.study.tell(trial, state=TrialState.FAIL)
        self.failed.append(trial.number)
        self.log(f"trial {trial.number}: FAILED, {reason}")


def _format(value: tp.Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)


def ranked_trials(study: optuna.Study) -> tp.List[FrozenTrial]:
    """Complete trials best first, then pruned ones (by their last reported value), then the rest."""
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0

    def last(trial: FrozenTrial) -> float:
        values = trial.intermediate_values
        return sign * values[max(values)] if values else math.inf

    trials = study.get_trials(deepcopy=False)
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}
    return sorted(trials, key=lambda trial: (order.get(trial.state, 2),
                                            sign * trial.value if trial.value is not None else last(trial),
                                            trial.number))


def failed_trials(study: optuna.Study) -> tp.List[FrozenTrial]:
    """The study's failed trials (their reason is the user attribute `error`)."""
    return study.get_trials(deepcopy=False, states=(TrialState.FAIL,))


def results_table(study: optuna.Study, top: tp.Optional[int] = None) -> str:
    """The best trials as a table: trial, state, value (the best epoch's metric; for a pruned trial
    its last reported one, in brackets), parameters, signature."""
    rows = [("trial", "state", "value", "params", "signature")]
    for trial in ranked_trials(study)[:top]:
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            value_text = f"({trial.intermediate_values[max(trial.intermediate_values)]:.3f})"
        else:
            value_text = _format(trial.value)
        params = " ".join(override(key, value) for key, value in trial.params.items())
        rows.append((str(trial.number), trial.state.name.lower(), value_text, params,
                     str(trial.user_attrs.get("signature", "-"))))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join("  ".join([row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                                row[3].ljust(widths[3]), row[4]]).rstrip() for row in rows)


def write_plots(study: optuna.Study, folder: Path, metric: str) -> tp.Tuple[tp.List[Path], tp.List[str]]:
    """Optuna's optimization history, intermediate values (epoch curves, pruned trials cut short) and,
    with at least 2 complete trials whose parameters differ, parameter importances, as PNGs in
    `folder`. Returns the files written and a note for each plot left out."""
    import matplotlib  # noqa: PLC0415 - plotting only at the end of a search

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415
    from optuna.visualization import matplotlib as optuna_plots  # noqa: PLC0415

    written: tp.List[Path] = []
    notes: tp.List[str] = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = [key for key in {key for trial in complete for key in trial.params}
               if len({repr(trial.params.get(key)) for trial in complete}) > 1]
    plots: tp.List[tp.Tuple[str, tp.Callable[[], tp.Any]]] = []
    if complete:
        plots.append(("history.png", lambda: optuna_plots.plot_optimization_history(study, target_name=metric)))
    else:
        notes.append("history.png: no complete trial yet")
    if any(trial.intermediate_values for trial in study.get_trials(deepcopy=False)):
        plots.append(("intermediate.png", lambda: optuna_plots.plot_intermediate_values(study)))
    if len(complete) >= 2 and varying:
        plots.append(("importance.png", lambda: optuna_plots.plot_param_importances(study, target_name=metric)))
    else:
        notes.append(f"importance.png: needs 2 complete trials with different parameters "
                     f"({len(complete)} complete{', all alike' if len(complete) >= 2 else ''})")
    for name in ("history.png", "intermediate.png", "importance.png"):
        if name not in {plot[0] for plot in plots} and (folder / name).exists():
            (folder / name).unlink()  # from an earlier run: it would not match the table
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        for name, plot in plots:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot()
            figure = axes.figure
            if name == "intermediate.png":
                axes.set_xlabel("epoch")
                axes.set_ylabel(metric)
            if name != "importance.png":  # trials and epochs are whole numbers
                axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            figure.set_size_inches(8, 5)
            with atomic_path(folder / name) as tmp:
                figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(folder / name)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return written, notes
