"""Side-by-side comparison of XPs (`demixlab compare`): one table row per XP, grouped by test set.

An XP is read from its Dora folder without loading any weights: the composed configuration and
its overrides (given by the caller, which composes them from `.argv.json` through Dora), the
solver's `history.json` (one entry per finished epoch: `train`, `valid`, `best`, and `test` once
tested) and whether training is done (the checkpoint's `done` flag, read memory-mapped, so its
tensors stay on disk). The parameter count comes from building the model on the meta device
(no memory); a family whose constructor computes with tensors is built once on the CPU instead.

Running XPs work: their history has the epochs done so far and no test scores yet. XPs whose
test sets differ (another dataset, other test tracks) are never ranked together: each test set
gets its own group, sorted on its own.
"""
import csv
import fnmatch
import io
import json
import logging
import math
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import DemixError
from ..experiment import ALWAYS_EXCLUDED, flatten
from ..files import atomic_path
from ..models import get_family
from .checkpoint import CHECKPOINT_NAME
from .plots import ComparedXP, plot_comparison

logger = logging.getLogger(__name__)

# dset keys that only shape the training (and validation) data: XPs that differ only in these
# share their test set. The toy dataset's test tracks depend on its seed, rate, test_tracks and
# eval_duration alone.
TRAINING_ONLY_DSET_KEYS = ("extra", "unaligned", "valid_tracks", "toy.train_tracks", "toy.valid_tracks",
                           "toy.train_duration")
# Columns where a lower value is better (sorted ascending); every other metric sorts descending.
ASCENDING = ("params", "sec_per_epoch")


@dataclass
class Experiment:
    """One XP as the comparison sees it.

    Attributes:
        signature: the XP's signature.
        folder: its Dora folder.
        cfg: its composed configuration.
        overrides: the overrides behind the signature ({key: value}, excluded keys left out).
        history: the solver's history entries so far.
        done: training and the final test finished.
        parameters: trainable parameters of the model.
    """

    signature: str
    folder: Path
    cfg: DictConfig
    overrides: tp.Dict[str, tp.Any]
    history: tp.List[tp.Dict[str, tp.Any]] = field(default_factory=list)
    done: bool = False
    parameters: tp.Optional[int] = None

    @property
    def family(self) -> str:
        """The model family's registry name."""
        return str(self.cfg.model.family)

    @property
    def sources(self) -> tp.List[str]:
        """The sources the model separates."""
        return [str(source) for source in self.cfg.dset.sources]

    @property
    def best_entry(self) -> tp.Optional[tp.Dict[str, tp.Any]]:
        """The history entry of the best epoch so far (by `best.metric`), None before epoch 1."""
        return next((entry for entry in reversed(self.history) if entry.get("best")),
                    self.history[-1] if self.history else None)

    @property
    def tested_epoch(self) -> tp.Optional[int]:
        """The last epoch after which the test set was evaluated (`test.every`, or the end), if any."""
        return next((int(entry["epoch"]) for entry in reversed(self.history) if "test" in entry), None)

    @property
    def test_entry(self) -> tp.Optional[tp.Dict[str, tp.Any]]:
        """The latest test scores (`test` of the last tested epoch), None when never tested."""
        return next((entry["test"] for entry in reversed(self.history) if "test" in entry), None)

    @property
    def status(self) -> str:
        """`done`, `not started`, or `E/N epochs` while training (or interrupted)."""
        if self.done:
            return "done"
        if not self.history:
            return "not started"
        return f"{len(self.history)}/{self.cfg.epochs} epochs"


def read_experiment(signature: str, folder: Path, cfg: DictConfig,
                    overrides: tp.Sequence[tp.Tuple[str, tp.Any]]) -> Experiment:
    """Read one XP's history, status and parameter count from its folder (no weights loaded)."""
    patterns = list(ALWAYS_EXCLUDED) + [str(pattern) for pattern in cfg.dora.exclude]
    kept = {str(key): value for key, value in overrides
            if not any(fnmatch.fnmatch(str(key), pattern) for pattern in patterns)}
    experiment = Experiment(signature=signature, folder=folder, cfg=cfg, overrides=kept)
    history_path = folder / "history.json"
    if history_path.is_file():
        try:
            history = json.loads(history_path.read_text())
        except (OSError, ValueError) as error:
            raise DemixError(f"{history_path}: not a readable history ({error})") from None
        if not isinstance(history, list):
            raise DemixError(f"{history_path}: expected a list of epochs")
        experiment.history = history
    checkpoint = folder / CHECKPOINT_NAME
    if checkpoint.is_file():
        try:  # memory-mapped: only the structure is read, the tensors stay on disk
            experiment.done = bool(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
                                   .get("done"))
        except Exception as error:  # a checkpoint being replaced, or a foreign file
            logger.warning("%s: could not read its done flag (%s)", checkpoint, str(error).splitlines()[0])
    experiment.parameters = count_parameters(cfg)
    return experiment


_PARAMETER_COUNTS: tp.Dict[str, int] = {}


def count_parameters(cfg: DictConfig) -> int:
    """Trainable parameters of the model `cfg` describes, built without weights when possible."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    family = get_family(str(model.pop("family")))
    sources = [str(source) for source in cfg.dset.sources]
    key = json.dumps([family.name, model, sources, cfg.dset.samplerate, cfg.dset.channels], sort_keys=True, default=str)
    if key not in _PARAMETER_COUNTS:
        def build(device: str) -> torch.nn.Module:
            with torch.device(device):
                return family.build_model(sources, int(cfg.dset.samplerate), int(cfg.dset.channels), model)

        try:
            built = build("meta")
        except (RuntimeError, NotImplementedError):  # e.g. `.item()` on a meta tensor
            built = build("cpu")
        _PARAMETER_COUNTS[key] = sum(p.numel() for p in built.parameters() if p.requires_grad)
    return _PARAMETER_COUNTS[key]


# ------------------------------------------------------------------------------ test sets
def test_set_of(experiment: Experiment) -> tp.Dict[str, tp.Any]:
    """The dataset settings that decide an XP's test set (flat {key: value})."""
    flat = flatten(OmegaConf.to_container(experiment.cfg.dset, resolve=True))
    return {key: value for key, value in flat.items()
            if not any(key == skip or key.startswith(f"{skip}.") for skip in TRAINING_ONLY_DSET_KEYS)}


@dataclass
class TestSetGroup:
    """XPs evaluated on the same test set: `label` names it (`dset.` keys that tell it apart)."""

    label: str
    experiments: tp.List[Experiment]


def group_by_test_set(experiments: tp.Sequence[Experiment]) -> tp.List[TestSetGroup]:
    """The XPs grouped by test set, in order of first appearance, each group labelled by its
    dataset kind and root and, when groups share those, by the keys that tell them apart."""
    keys: tp.List[str] = []
    members: tp.Dict[str, tp.List[Experiment]] = {}
    settings: tp.Dict[str, tp.Dict[str, tp.Any]] = {}
    for experiment in experiments:
        test_set = test_set_of(experiment)
        key = json.dumps(test_set, sort_keys=True, default=str)
        if key not in members:
            keys.append(key)
            members[key] = []
            settings[key] = test_set
        members[key].append(experiment)
    all_keys = sorted({name for test_set in settings.values() for name in test_set})
    differing = [name for name in all_keys if name not in ("kind", "root")
                 and len({json.dumps(test_set.get(name), default=str) for test_set in settings.values()}) > 1]
    groups = []
    for key in keys:
        test_set = settings[key]
        label = str(test_set.get("kind"))
        if test_set.get("root"):
            label += f" {test_set['root']}"
        details = [f"dset.{name}={_format_value(test_set.get(name))}" for name in differing]
        if details:
            label += f" ({', '.join(details)})"
        groups.append(TestSetGroup(label, members[key]))
    return groups


# ---------------------------------------------------------------------------------- table
def differing_overrides(experiments: tp.Sequence[Experiment]) -> tp.List[str]:
    """Override keys whose value is not the same for every XP (an absent key is the default)."""
    keys: tp.List[str] = []
    for experiment in experiments:
        keys += [key for key in experiment.overrides if key not in keys]
    keys.sort(key=lambda key: "." in key)  # group choices (model=..., dset=...) first
    return [key for key in keys
            if len({_format_value(experiment.overrides[key]) if key in experiment.overrides else None
                    for experiment in experiments}) > 1]


def _format_value(value: tp.Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _sources(experiments: tp.Sequence[Experiment]) -> tp.List[str]:
    names: tp.List[str] = []
    for experiment in experiments:
        names += [source for source in experiment.sources if source not in names]
    return names


def metric_columns(experiments: tp.Sequence[Experiment]) -> tp.List[str]:
    """The score columns for these XPs: validation global SDR at the best epoch, test museval SDR
    (only when some XP has it) and test global SDR, each per source and their mean."""
    sources = _sources(experiments) + ["mean"]
    columns = [f"valid.global.{source}" for source in sources]
    if any((experiment.test_entry or {}).get("sdr") is not None for experiment in experiments):
        columns += [f"test.museval.{source}" for source in sources]
    return columns + [f"test.global.{source}" for source in sources]


def table_columns(experiments: tp.Sequence[Experiment]) -> tp.List[str]:
    """Every column of the comparison of these XPs, in order."""
    return (["xp", "family"] + [f"override:{key}" for key in differing_overrides(experiments)]
            + ["params", "epochs", "planned_epochs", "best_epoch", "test_epoch"] + metric_columns(experiments)
            + ["sec_per_epoch", "status"])


def table_row(experiment: Experiment) -> tp.Dict[str, tp.Any]:
    """One XP's values by column (absent: not available yet, or not of this XP)."""
    row: tp.Dict[str, tp.Any] = {"xp": experiment.signature, "family": experiment.family,
                                 "params": experiment.parameters, "epochs": len(experiment.history),
                                 "planned_epochs": int(experiment.cfg.epochs), "status": experiment.status}
    for key, value in experiment.overrides.items():
        row[f"override:{key}"] = _format_value(value)
    best = experiment.best_entry
    if best is not None:
        row["best_epoch"] = int(best["epoch"])
        valid = best.get("valid", {})
        row.update({f"valid.global.{source}": valid.get(f"nsdr_{source}") for source in experiment.sources})
        row["valid.global.mean"] = valid.get("nsdr")
    row["test_epoch"] = experiment.tested_epoch
    test = experiment.test_entry or {}
    for name, metric in (("museval", "sdr"), ("global", "nsdr")):
        if metric in test:
            row.update({f"test.{name}.{source}": test.get(f"{metric}_{source}") for source in experiment.sources})
            row[f"test.{name}.mean"] = test[metric]
    durations = [entry["train"].get("duration", 0.0) + entry.get("valid", {}).get("duration", 0.0)
                 for entry in experiment.history if "duration" in entry.get("train", {})]
    if durations:
        row["sec_per_epoch"] = sum(durations) / len(durations)
    return {key: value for key, value in row.items() if value is not None}


def sort_rows(rows: tp.List[tp.Dict[str, tp.Any]], column: tp.Optional[str]) -> tp.List[tp.Dict[str, tp.Any]]:
    """Rows sorted by `column` (scores: best first; params and seconds: smallest first); rows
    without a value for it come last, in their given order."""
    if column is None:
        return list(rows)
    sign = 1 if column in ASCENDING else -1
    present = [row for row in rows if _is_number(row.get(column))]
    absent = [row for row in rows if not _is_number(row.get(column))]
    return sorted(present, key=lambda row: sign * float(row[column])) + absent


def check_sort_column(column: str, experiments: tp.Sequence[Experiment]) -> None:
    """Raise a one-line error unless `column` is a numeric column of this comparison."""
    numeric = ["params", "epochs", "best_epoch", "test_epoch", "sec_per_epoch"] + [
        name for name in table_columns(experiments) if name.startswith(("valid.", "test."))]
    if column not in numeric:
        raise DemixError(f"--sort {column}: not a score column of these XPs; choose one of {', '.join(numeric)}")


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cell(column: str, value: tp.Any) -> str:
    if value is None:
        return "default" if column.startswith("override:") else "-"
    if column == "params":
        return f"{value / 1e6:.2f} M"
    if column == "sec_per_epoch":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


# --------------------------------------------------------------------------------- output
@dataclass
class Comparison:
    """The comparison of some XPs: their groups by test set, each sorted by `sort`."""

    groups: tp.List[TestSetGroup]
    sort: tp.Optional[str]

    @property
    def experiments(self) -> tp.List[Experiment]:
        """Every XP, group after group."""
        return [experiment for group in self.groups for experiment in group.experiments]

    def sorted_rows(self, group: TestSetGroup) -> tp.List[tp.Dict[str, tp.Any]]:
        """The rows of one group, sorted."""
        return sort_rows([table_row(experiment) for experiment in group.experiments], self.sort)

    def warning(self) -> tp.Optional[str]:
        """A line saying the XPs use several test sets, None when they share one."""
        if len(self.groups) < 2:
            return None
        return (f"the XPs use {len(self.groups)} different test sets ({'; '.join(g.label for g in self.groups)}): "
                "they are ranked within each test set only, never across")

    def markdown(self) -> str:
        """The comparison as Markdown: one table per test set."""
        experiments = self.experiments
        lines = [f"# Comparison of {len(experiments)} XPs", ""]
        lines.append("Validation: the MDX global SDR [dB] of the best epoch so far; test: the last test of each XP, "
                     "after epoch test_epoch (museval SDR: median over frames and tracks; global SDR: mean over tracks); "
                     f"sec_per_epoch: mean training + validation time. Sorted by {self.sort or 'nothing'}.")
        warning = self.warning()
        if warning:
            lines += ["", f"> **Warning**: {warning}."]
        for group in self.groups:
            columns = [column for column in table_columns(experiments)
                       if column in table_columns(group.experiments) or column.startswith("override:")]
            lines += ["", f"## Test set: {group.label}", ""]
            lines.append("| " + " | ".join(column.removeprefix("override:") for column in columns) + " |")
            lines.append("|" + "|".join("---" if column in ("xp", "family", "status") or column.startswith("override:")
                                        else "---:" for column in columns) + "|")
            for row in self.sorted_rows(group):
                lines.append("| " + " | ".join(_cell(column, row.get(column)) for column in columns) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        """The comparison as CSV: one row per XP, a `test_set` column, full precision."""
        columns = table_columns(self.experiments)
        columns.insert(2, "test_set")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([column.removeprefix("override:") for column in columns])
        for group in self.groups:
            for row in self.sorted_rows(group):
                row = {**row, "test_set": group.label}
                writer.writerow(["" if row.get(column) is None else row[column] for column in columns])
        return buffer.getvalue()

    def write(self, out: Path) -> tp.List[Path]:
        """Write `out/compare.md`, `out/compare.csv` and `out/compare.png` (atomically); returns them."""
        paths = [out / "compare.md", out / "compare.csv", out / "compare.png"]
        for path, text in zip(paths, (self.markdown(), self.csv())):
            with atomic_path(path) as tmp:
                tmp.write_text(text)
        differing = differing_overrides(self.experiments)
        plot_comparison([(group.label, [plotted(experiment, differing) for experiment in group.experiments])
                         for group in self.groups], paths[2])
        return paths


def plotted(experiment: Experiment, differing: tp.Sequence[str]) -> ComparedXP:
    """What the comparison plot shows of one XP; its label names the `differing` overrides it sets."""
    row = table_row(experiment)
    overrides = " ".join(f"{key}={_format_value(experiment.overrides[key])}" for key in differing
                         if key in experiment.overrides and key != "model")  # the family is named
    label = f"{experiment.signature} {experiment.family}" + (f" {overrides}" if overrides else "")
    if len(label) > 60:
        label = label[:57] + "..."
    scores = {kind: {column.rsplit(".", 1)[1]: value for column, value in row.items()
                     if column.startswith(f"{kind}.global.") and _is_number(value)} for kind in ("valid", "test")}
    best = experiment.best_entry
    return ComparedXP(label=label, valid=scores["valid"], test=scores["test"],
                      epochs=[int(entry["epoch"]) for entry in experiment.history],
                      curve=[float(entry.get("valid", {}).get("nsdr", math.nan)) for entry in experiment.history],
                      best_epoch=int(best["epoch"]) if best is not None else None)


def compare(experiments: tp.Sequence[Experiment], sort: tp.Optional[str] = "test.global.mean") -> Comparison:
    """Group the XPs by test set; `sort` (a numeric column) orders each group."""
    if not experiments:
        raise DemixError("no experiment to compare")
    if sort is not None:
        check_sort_column(sort, experiments)
    return Comparison(group_by_test_set(experiments), sort)
