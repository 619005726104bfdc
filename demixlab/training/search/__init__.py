"""Hyper-parameter search over Dora XPs with Optuna (`demixlab search SPACE.yaml`).

A search space is a YAML file (:func:`read_space`, format in README "Search hyper-parameters"):
fixed `base` overrides, a `metric` of the XPs' history with its `direction`, a number of
`trials`, and `params`, each an override key with a range (`low`, `high`, optional `log`,
`step`) or `choices`. :func:`check_space` composes the configuration with every bound and
choice, so an unknown key or a value the schema refuses is a one-line error before anything runs.

Every trial is a Dora XP: its overrides are `base` plus one `key=value` per parameter, the very
argv `dora run` gets, hence the same signature. :func:`run_search` asks Optuna for trials and
runs their XPs through a runner (:class:`LocalRunner`: `dora run` subprocesses here;
:class:`SlurmRunner`: Dora's Slurm launcher, as `dora grid` submits), reading each XP's history
while it trains: every epoch's metric is reported to Optuna's pruner, and a trial it prunes is
stopped. The study lives in SQLite under `<dora.dir>/search/NAME/study.db`, so rerunning the
same command resumes it: trials of a crashed search continue (their XPs resume from their
checkpoints), an XP that already finished is read instead of retrained, and a trial whose XP was
pruned before is pruned again without training.
"""
from .runners import LocalRunner, SlurmRunner
from .space import SearchSpace, check_space, read_space, slurm_config, trial_overrides
from .study import Search, failed_trials, results_table, search_folder, write_plots

__all__ = ["LocalRunner", "SlurmRunner", "slurm_config", "SearchSpace", "check_space", "read_space",
           "trial_overrides", "Search", "failed_trials", "results_table", "search_folder", "write_plots"]
