"""`demixlab search`: the space's checks, trials as Dora XPs, resuming, pruning, the plots."""
import json
import os
import re
import signal
import sys
import typing as tp
from pathlib import Path

import pytest
import yaml

from demixlab.commands.search import main as search_main
from demixlab.errors import DemixError
from demixlab.files import save_torch
from demixlab.training.search import (LocalRunner, Search, read_space, results_table, trial_overrides,
                                      write_plots)
from tests.cli import TINY, signature
from tests.leftovers import processes
from tests.progress import run_until_stalled, started, wait_while_progressing
from tests.test_slurm import job_field, job_id, queue, slurm, slurm_cluster, wait_for_job  # noqa: F401 (fixtures)

TINY_BASE = [item for item in TINY if not item.startswith(("model.hidden_size", "misc."))]


def write_space(folder: Path, **fields: tp.Any) -> Path:
    """A SPACE.yaml in `folder`: tiny UMX on tiny toy data, searching model.hidden_size by default."""
    space = {"name": "test", "base": TINY_BASE, "metric": "valid.nsdr", "trials": 2,
             "params": {"model.hidden_size": {"choices": [8, 16]}}, **fields}
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.fixture
def dora_main(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tp.Any:
    """demixlab's Dora main with its XPs (and searches) under tmp_path/outputs."""
    from demixlab.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEMIXLAB_CACHE", str(cache_dir))
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    return main


@pytest.mark.parametrize("params, expected", [
    ({"optim.lrr": {"low": 1e-4, "high": 1e-2}},
     "space.yaml: params.optim.lrr: unknown option optim.lrr: no such key in the configuration (did you mean optim.lr?)"),
    ({"optim.lr": {"low": "1e-2", "high": "1e-4", "log": True}},
     "space.yaml: params.optim.lr: empty range: low (0.01) must be below high (0.0001)"),
    ({"optim.lr": {"low": 1e-3, "high": 1e-3}}, "space.yaml: params.optim.lr: empty range: low (0.001)"),
    ({"model.hidden_size": {"choices": []}},
     "space.yaml: params.model.hidden_size: choices must be a non-empty list, got []"),
    ({"model.hidden_size": {"choices": [8, "big"]}},
     "space.yaml: params.model.hidden_size: 'big': model.hidden_size: Value 'big' of type 'str' could not be "
     "converted to Integer"),
    ({"optim.lr": {"low": 0, "high": 1e-2, "log": True}}, "space.yaml: params.optim.lr: a log range needs low > 0"),
    ({"optim.lr": {"low": 0.0, "high": 1e-2}}, "space.yaml: params.optim.lr: 0.0: optim.lr must be > 0, got 0.0"),
    ({"misc.num_workers": {"choices": [0, 1]}},
     "space.yaml: params.misc.num_workers: misc.* is left out of signatures: every trial would be the same XP"),
    ({"model": {"choices": ["umx", "nosuch"]}},
     "space.yaml: params.model: 'nosuch': unknown model 'nosuch' in 'model=nosuch': choose one of"),
    ({"epochs": {"low": 1, "hgh": 3}}, "space.yaml: params.epochs: unknown field 'hgh'"),
])
def test_space_errors_are_one_line_naming_the_key(tmp_path, dora_main, capsys, params, expected):
    path = write_space(tmp_path, params=params)
    with pytest.raises(SystemExit) as exit_info:
        search_main([str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"demixlab: error: {tmp_path / expected}"), err
    assert not (tmp_path / "outputs" / "search").exists()


@pytest.mark.parametrize("text, expected", [
    ("params: {a: [\n", "space.yaml: not valid YAML (line 2: expected the node content, but found '<stream end>')"),
    ("- a list\n", "space.yaml: expected a mapping with base, metric, trials and params, got list"),
    ("trials: 0\nparams: {epochs: {choices: [1, 2]}}\n", "space.yaml: trials: expected a positive integer, got 0"),
    ("trails: 3\nparams: {epochs: {choices: [1, 2]}}\n", "space.yaml: trails: unknown field (expected some of"),
    ("base: [epochs=2]\nparams: {epochs: {choices: [1, 2]}}\n",
     "space.yaml: params.epochs: also set in base: keep it in one place"),
    ("params: {epochs: {choices: [1, 2]}}\npruner: {name: median, n_startup: 1}\n",
     "space.yaml: pruner: median: "),
    ("params: {epochs: {choices: [1, 2]}}\nsampler: {name: tpe, seed: one}\n",
     "space.yaml: sampler.seed: expected an integer, got 'one'"),
    ("params: {epochs: {choices: [1, 2]}}\npruner: halving\n",
     "space.yaml: pruner.name: unknown pruner 'halving': choose one of median, percentile, successive_halving"),
    ("params: {epochs: {choices: [1, 2]}}\nenqueue: [{epochs: 3}]\n", "space.yaml: enqueue[0].epochs: 3 is outside params.epochs"),
    ("params: {epochs: {choices: [1, 2]}}\nenqueue: [{seed: 3}]\n", "space.yaml: enqueue[0].seed: not one of params"),
    ("params: {optim.lr: {low: 1e-4, high: 1e-2}}\nsampler: grid\n",
     "space.yaml: params.optim.lr: sampler grid needs choices for every parameter"),
])
def test_space_file_errors_are_one_line(tmp_path, dora_main, capsys, text, expected):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        search_main([str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"demixlab: error: {tmp_path / expected}"), err
    assert not (tmp_path / "outputs" / "search").exists()


def test_a_missing_space_file_is_a_one_line_error(tmp_path, dora_main, capsys):
    with pytest.raises(SystemExit):
        search_main([str(tmp_path / "nosuch.yaml")])
    assert capsys.readouterr().err == f"demixlab: error: {tmp_path / 'nosuch.yaml'}: cannot read the search space " \
                                      "(No such file or directory)\n"


@pytest.mark.slow
def test_a_trial_is_the_xp_dora_run_makes_of_its_overrides(tmp_path, cache_dir, dora_main):
    space = read_space(write_space(tmp_path, params={
        "optim.lr": {"low": 1e-6, "high": 1e-2, "log": True}, "model": {"choices": ["umx", "xumx"]},
        "augment.flip_channels": {"choices": [True, False]}, "optim.optimizer": {"choices": ["adam", "adamw"]}}))
    for params in ({"optim.lr": 1.2345678901234e-05, "model": "umx", "augment.flip_channels": False,
                    "optim.optimizer": "adamw"},
                   {"optim.lr": 0.003, "model": "xumx", "augment.flip_channels": True, "optim.optimizer": "adam"}):
        argv = trial_overrides(space, params)
        xp = dora_main.checked_xp(argv)
        # the signature `dora run ARGV` computes in its own process
        assert xp.sig == signature(tmp_path, cache_dir, *argv)
        # Hydra reads back the very values Optuna drew
        assert xp.cfg.optim.lr == params["optim.lr"] and xp.cfg.augment.flip_channels == params["augment.flip_channels"]
        assert xp.cfg.optim.optimizer == params["optim.optimizer"]
        # ... and the runner launches exactly that
        command = LocalRunner(dora_main, dora_main.get_slurm_config()).command(argv)
        assert command[:5] == [sys.executable, "-m", "dora", "-P", "demixlab"] and command[5:] == ["run", *argv]


class FakeRun:
    """A finished (or failing, or interrupted) training run."""

    def __init__(self, ok: tp.Optional[bool] = True, interrupt: bool = False):
        self.ok, self.interrupt, self.stopped, self.ended = ok, interrupt, False, False

    def finished(self) -> tp.Optional[bool]:
        if self.interrupt:
            raise KeyboardInterrupt
        self.ended = self.ok is not None
        return self.ok

    def stop(self) -> None:
        self.stopped = True

    def describe_failure(self) -> str:
        return "exit code 1: it broke"

    def where(self) -> str:
        return "nowhere"


class FakeRunner:
    """Trains nothing: writes `written` epochs of history (nSDR hidden_size / 10 - 1, then
    hidden_size / 10) and, when all are written, a finished checkpoint, as `dora run` would; its
    runs end with `ok` (None: still running); the run it starts as number `interrupt_at` raises
    KeyboardInterrupt (a crash). Records the XPs it was asked to start."""

    def __init__(self, epochs: int = 2, written: tp.Optional[int] = None, ok: tp.Optional[bool] = True,
                 interrupt_at: tp.Optional[int] = None):
        self.epochs, self.written, self.ok, self.interrupt_at = epochs, written or epochs, ok, interrupt_at
        self.started: tp.List[str] = []
        self.concurrent: tp.List[int] = []  # runs not ended when each one started
        self.runs: tp.List[FakeRun] = []

    def start(self, xp, argv, log) -> FakeRun:
        self.started.append(xp.sig)
        self.concurrent.append(1 + sum(not run.ended for run in self.runs))
        value = xp.cfg.model.hidden_size / 10
        history = [{"epoch": epoch + 1, "train": {"loss": 1.0}, "valid": {"loss": 1.0, "nsdr": value - 1 + epoch}}
                   for epoch in range(self.epochs)]
        interrupted = len(self.started) == self.interrupt_at
        written = 1 if interrupted else self.written
        xp.link.update_history(history[:written])
        if written == self.epochs:
            save_torch({"model_options": {}, "history": history, "done": True}, xp.folder / "checkpoint.th")
        self.runs.append(FakeRun(ok=self.ok, interrupt=interrupted))
        return self.runs[-1]


def _search(space_path: Path, main: tp.Any, runner: tp.Any) -> Search:
    space = read_space(space_path)
    return Search(space, main, runner, Path(main.dora.dir) / "search" / space.name, poll=0.0, log=lambda line: None)


def test_a_resumed_search_continues_the_interrupted_trial_and_reads_finished_xps(tmp_path, dora_main):
    space_path = write_space(tmp_path, trials=3, params={"model.hidden_size": {"choices": [8, 16, 32]}},
                             sampler={"name": "grid", "seed": 1}, pruner="none")
    crashing = FakeRunner(interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        _search(space_path, dora_main, crashing).run()
    assert len(crashing.started) == 2 and crashing.runs[1].stopped  # the XP being trained is stopped
    first, interrupted = crashing.started

    # Rerunning the command: the interrupted trial continues (same XP), one new trial, the finished one is kept.
    runner = FakeRunner()
    study = _search(space_path, dora_main, runner).run()
    assert runner.started[0] == interrupted and first not in runner.started and len(runner.started) == 2
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"] * 3
    assert {trial.params["model.hidden_size"] for trial in study.trials} == {8, 16, 32}
    assert [trial.value for trial in sorted(study.trials, key=lambda t: t.params["model.hidden_size"])] == [0.8, 1.6, 3.2]
    assert {trial.user_attrs["signature"] for trial in study.trials} == {first, *runner.started}

    # Once done, rerunning starts nothing; a new study over the same XPs reads them instead of retraining.
    idle = FakeRunner()
    assert len(_search(space_path, dora_main, idle).run().trials) == 3 and idle.started == []
    other = write_space(tmp_path, name="again", trials=3, params={"model.hidden_size": {"choices": [8, 16, 32]}},
                        sampler="grid", pruner="none")
    study = _search(other, dora_main, idle).run()
    assert idle.started == [] and sorted(trial.value for trial in study.trials) == [0.8, 1.6, 3.2]
    assert list(study.trials[0].intermediate_values) == [1, 2]
    table = results_table(study).splitlines()
    assert table[0].split() == ["trial", "state", "value", "params", "signature"]
    assert table[1].split()[1:4] == ["complete", "3.200", "model.hidden_size=32"]


@pytest.mark.parametrize("parallel", [1, 2])
def test_parallel_trials_train_at_the_same_time(tmp_path, dora_main, parallel):
    space = read_space(write_space(tmp_path, trials=3, params={"model.hidden_size": {"choices": [8, 16, 32]}},
                                   sampler="grid"))
    runner = FakeRunner()
    study = Search(space, dora_main, runner, tmp_path / "search", parallel=parallel, poll=0.0,
                   log=lambda line: None).run()
    assert runner.concurrent == ([1, 1, 1] if parallel == 1 else [1, 2, 1])  # both end in the same poll
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"] * 3


def test_a_pruned_trial_is_stopped_and_never_trained_again(tmp_path, dora_main):
    # the runner writes nSDR -0.2 then 0.8 for hidden_size 8: the threshold prunes it after epoch 1
    space_path = write_space(tmp_path, trials=2, params={"model.hidden_size": {"choices": [8]}},
                             pruner={"name": "threshold", "lower": 0.0}, sampler="random")
    runner = FakeRunner(written=1, ok=None)  # still training when the pruner decides
    study = _search(space_path, dora_main, runner).run()
    assert len(runner.started) == 1 and runner.runs[0].stopped
    assert [trial.state.name for trial in study.trials] == ["PRUNED", "PRUNED"]  # the second is the same XP
    assert study.trials[1].intermediate_values == {1: pytest.approx(-0.2)}
    assert "(-0.200)" in results_table(study)
    written, notes = write_plots(study, Path(dora_main.dora.dir) / "search" / "test", "valid.nsdr")
    assert [path.name for path in written] == ["intermediate.png"]
    assert notes[0] == "history.png: no complete trial yet" and notes[1].startswith("importance.png: needs 2")


def test_epochs_that_ran_before_the_poll_saw_them_are_pruned_at_the_pruners_epoch(tmp_path, dora_main):
    # two epochs written by the first poll: nSDR -0.2 then 0.8; the threshold prunes after epoch 1
    space = read_space(write_space(tmp_path, trials=1, params={"model.hidden_size": {"choices": [8]}},
                                   pruner={"name": "threshold", "lower": 0.0}, sampler="random"))
    lines: tp.List[str] = []
    runner = FakeRunner(epochs=3, written=2, ok=None)
    study = Search(space, dora_main, runner, tmp_path / "search", poll=0.0, log=lines.append).run()
    assert runner.runs[0].stopped and study.trials[0].state.name == "PRUNED"
    assert study.trials[0].intermediate_values == {1: pytest.approx(-0.2)}  # epoch 2 is past the decision
    assert any(re.search(r"pruned after epoch 1, 2 run \(valid\.nsdr -0\.200\)$", line) for line in lines), lines


def test_a_failed_trial_is_recorded_with_its_reason(tmp_path, dora_main):
    space_path = write_space(tmp_path, trials=1, params={"model.hidden_size": {"choices": [8]}})
    runner = FakeRunner(written=1, ok=False)
    search = _search(space_path, dora_main, runner)
    study = search.run()
    assert search.failed == [0] and study.trials[0].state.name == "FAIL"
    assert study.trials[0].user_attrs["error"].endswith("exit code 1: it broke")


def test_a_metric_missing_from_the_history_fails_the_trial_in_one_line(tmp_path, dora_main):
    space_path = write_space(tmp_path, trials=2, metric="valid.nsdrr")
    runner = FakeRunner(written=1, ok=None)
    search = _search(space_path, dora_main, runner)
    with pytest.raises(DemixError, match=r"space.yaml: metric: valid.nsdrr is not in the XPs' history "
                                         r"\(its valid keys: valid.loss, valid.nsdr\)$"):
        search.run()
    assert runner.runs[0].stopped and [trial.state.name for trial in search.study.trials] == ["FAIL"]


def test_a_study_cannot_resume_with_another_space(tmp_path, dora_main, capsys):
    search_main([str(write_space(tmp_path, trials=1)), "--check"])
    assert capsys.readouterr().out.splitlines()[-2:] == ["space checked: model.hidden_size", "no study yet"]
    assert not (tmp_path / "outputs" / "search").exists()
    _search(write_space(tmp_path, trials=1), dora_main, FakeRunner()).run()
    changed = write_space(tmp_path, trials=1, params={"model.hidden_size": {"choices": [8, 32]}})
    with pytest.raises(SystemExit):
        search_main([str(changed), "--check"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "space.yaml: params: differs from the study in" in err


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_search_on_toy_data_prunes_a_bad_trial_resumes_and_draws_its_plots(tmp_path, cache_dir):
    # Four trials of tiny UMX for 4 epochs. The first three are given: two good learning rates, which
    # the median pruner (two startup trials) lets finish, then one so high that it falls below their
    # median (0.42 dB against 0.97 and 0.90 at epoch 1 with Adam's loop; -0.14 dB at epoch 2 with the
    # fused kernel, whose rounding this learning rate amplifies): pruned before its last epoch (the
    # XP may finish the epoch that runs while the pruner stops it).
    space_path = write_space(
        tmp_path, name="toy", base=[item for item in TINY_BASE if not item.startswith("epochs=")] + ["epochs=4"],
        trials=4, params={"optim.lr": {"choices": [1e-3, 0.05]}, "model.hidden_size": {"choices": [8, 16]}},
        pruner={"name": "median", "n_startup_trials": 2}, sampler={"name": "random", "seed": 0},
        enqueue=[{"optim.lr": 1e-3, "model.hidden_size": 16}, {"optim.lr": 1e-3, "model.hidden_size": 8},
                 {"optim.lr": 0.05, "model.hidden_size": 16}])
    env = {**os.environ, "DEMIXLAB_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}

    def search() -> str:
        result = run_until_stalled([sys.executable, "-m", "demixlab", "search", str(space_path)], cwd=tmp_path,
                                   env=env, progress=[tmp_path / "outputs", cache_dir])
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    out = search()
    folder = tmp_path / "outputs" / "search" / "toy"
    table = out[out.index("trial  state"):].splitlines()
    rows = [line.split() for line in table[1:5]]
    states = [row[1] for row in rows]
    assert len(rows) == 4 and states[:2] == ["complete", "complete"] and "pruned" in states, out
    pruned_after = re.search(r"trial 2 \([0-9a-f]+\): pruned after epoch (\d+)(?:, (\d+) run)?", out)
    assert pruned_after and int(pruned_after.group(1)) < 4, out  # the pruner's epoch, whenever the poll saw it
    pruned_sig = next(row[-1] for row in rows if row[0] == "2")
    assert next(row for row in rows if row[0] == "2")[1] == "pruned"
    history = json.loads((tmp_path / "outputs" / "xps" / pruned_sig / "history.json").read_text())
    # stopped after the epochs the poll saw (the one it was pruned at, or more that ran before the poll)
    seen = int(pruned_after.group(2) or pruned_after.group(1))
    assert len(history) == seen <= 4, out
    for row in rows:  # each trial is the XP of its overrides, trained (history.json) under the signature shown
        folder_of_xp = tmp_path / "outputs" / "xps" / row[-1]
        assert json.loads((folder_of_xp / ".argv.json").read_text()) == read_space(space_path).base + row[3:5]
        assert (folder_of_xp / "history.json").exists()
    for name in ("history.png", "intermediate.png", "importance.png"):
        assert _png(folder / name), name

    again = search()  # resumes the finished study: trains nothing, same table
    assert "training" not in again and again[again.index("trial  state"):].splitlines()[:5] == table[:5]


def _running_in(folder: Path) -> tp.List[str]:
    """The command lines of the live processes whose working directory is `folder`."""
    found = []
    for process in processes().values():
        try:
            if process.state not in "ZX" and os.readlink(f"/proc/{process.pid}/cwd") == str(folder):
                found.append(" ".join(process.argv))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_killed_search_stops_its_trial_and_resumes_it_from_the_checkpoint(tmp_path, cache_dir):
    space_path = write_space(
        tmp_path, name="killed", trials=2, sampler={"name": "grid", "seed": 0}, pruner="none",
        base=[item for item in TINY_BASE if not item.startswith(("epochs=", "samples_per_track="))]
        + ["epochs=3", "samples_per_track=8"])
    command = [sys.executable, "-m", "demixlab", "search", str(space_path)]
    env = {**os.environ, "DEMIXLAB_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    xps = tmp_path / "outputs" / "xps"

    def epochs_done() -> int:
        """epochs in the first trial's history"""
        histories = [json.loads(path.read_text() or "[]") for path in xps.glob("*/history.json")]
        return max((len(history) for history in histories), default=0)

    with started(command, cwd=tmp_path, env=env) as search:
        wait_while_progressing(lambda: epochs_done() >= 1, "a first epoch", [tmp_path / "outputs", cache_dir])
        os.kill(search.process.pid, signal.SIGTERM)  # the search only: it must stop its `dora run` itself
        result = search.wait(progress=[tmp_path / "outputs"])
    assert result.returncode == 128 + signal.SIGTERM
    stopped = re.search(r"^trial 0 \(([0-9a-f]{8})\): stopped, resumes with the search$", result.stdout, re.M)
    assert stopped, result.stdout + result.stderr
    sig = stopped.group(1)
    assert _running_in(tmp_path) == []
    done_before = len(json.loads((xps / sig / "history.json").read_text()))
    assert 1 <= done_before < 3

    again = run_until_stalled(command, cwd=tmp_path, env=env, progress=[tmp_path / "outputs", cache_dir])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(rf"^trial 0 \({sig}\) model.hidden_size=\d+: continuing", again.stdout, re.M), again.stdout
    assert [entry["epoch"] for entry in json.loads((xps / sig / "history.json").read_text())] == [1, 2, 3]
    assert f"resuming from {xps / sig / 'checkpoint.th'} after epoch {done_before}" in (xps / sig / "train.log").read_text()
    rows = [line.split() for line in again.stdout[again.stdout.index("trial  state"):].splitlines()[1:3]]
    assert sorted((row[0], row[1]) for row in rows) == [("0", "complete"), ("1", "complete")]


@pytest.mark.slow
def test_a_search_through_slurm_cancels_the_pruned_trials_job(tmp_path, slurm):
    # A good trial, then a bad one that the median pruner (one startup trial) stops: its job is cancelled.
    space_path = write_space(
        tmp_path, name="slurm", trials=2, params={"optim.lr": {"choices": [1e-3, 0.05]}},
        base=[item for item in TINY_BASE if not item.startswith(("epochs=", "samples_per_track="))]
        + ["epochs=5", "samples_per_track=16", "model.hidden_size=16", "misc.device=cpu"],  # still training when pruned
        pruner={"name": "median", "n_startup_trials": 1}, slurm={"gpus": 0, "mem_per_gpu": 3, "cpus_per_gpu": 1,
                                                                  "time": 30},
        enqueue=[{"optim.lr": 1e-3}, {"optim.lr": 0.05}])
    result = run_until_stalled([sys.executable, "-m", "demixlab", "search", str(space_path), "--slurm", "--poll", "1"],
                               cwd=tmp_path, env=slurm, progress=[tmp_path / "outputs", lambda: queue(slurm)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout[result.stdout.index("trial  state"):].splitlines()[1:3]]
    assert [(row[0], row[1]) for row in rows] == [("0", "complete"), ("1", "pruned")], result.stdout
    good, bad = (tmp_path / "outputs" / "xps" / row[-1] for row in rows)
    assert job_field(job_id(good), "JobState", slurm) == "COMPLETED"
    bad_job = job_id(bad)
    wait_for_job(bad_job, slurm, lambda: job_field(bad_job, "JobState", slurm) != "COMPLETING", "scancel", bad)
    assert job_field(bad_job, "JobState", slurm) == "CANCELLED"
    assert job_field(job_id(bad), "NumTasks", slurm) == "1"  # gpus=0: one task, as `dora grid` asks
    assert len(json.loads((bad / "history.json").read_text())) < 5
