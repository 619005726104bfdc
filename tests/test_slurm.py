"""`dora grid` on a real single-node Slurm (tests/slurm/local_cluster.sh), through submitit.

Skipped, with the reason, only where Slurm is not installed and cannot be (no root for apt).
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.cli import load_checkpoint
from tests.progress import run_until_stalled, wait_while_progressing
from tests.test_grids import make_workdir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "local_cluster.sh"

FAILING_GRID = '''
from ._explorers import DemixExplorer


@DemixExplorer
def explorer(launcher):
    launcher.slurm_(gpus=0, mem_per_gpu=2, cpus_per_gpu=1, time=10)
    launcher({"dset": "folder", "dset.root": "/nonexistent/stems", "dset.sources": ["a", "b"]})
'''

REQUEUE_GRID = '''
from ._explorers import DemixExplorer
from .smoke import TINY_TOY


@DemixExplorer
def explorer(launcher):
    launcher.slurm_(gpus=0, mem_per_gpu=3, cpus_per_gpu=1, time=30)
    # Epochs of a few seconds each: the job must still be training when it is requeued.
    launcher({**TINY_TOY, "epochs": 5, "samples_per_track": 60, "model.hidden_size": 16, "model.nb_layers": 1})
'''


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory, cache_dir):
    """Start the local cluster (installing Slurm if needed); yield the environment to reach it.
    Stopping it, however the tests went, cancels any job left, ends job steps and its munged."""
    state_dir = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "DEMIXLAB_SLURM_DIR": str(state_dir)}
    try:
        started = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True)
        if started.returncode == 3:
            pytest.skip(f"no Slurm here and no root to install it: {started.stderr.strip()}")
        assert started.returncode == 0, started.stderr
        env.update(SLURM_CONF=str(state_dir / "slurm.conf"), PATH=f"{REPO / 'tests' / 'slurm' / 'bin'}:{env['PATH']}",
                   DEMIXLAB_CACHE=str(cache_dir))
        yield env
    finally:
        stopped = subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture
def slurm(slurm_cluster, tmp_path):
    """The cluster for one test. At teardown, pass or fail, the jobs the test submitted are cancelled,
    and waited for until Slurm no longer lists them (their steps have ended)."""
    yield slurm_cluster
    left = submitted_jobs(tmp_path, slurm_cluster) & set(queue(slurm_cluster))
    if left:
        subprocess.run(["scancel", *sorted(left)], env=slurm_cluster, capture_output=True)
        wait_while_progressing(lambda: not left & set(queue(slurm_cluster)), f"Slurm to end jobs {sorted(left)}",
                               [lambda: queue(slurm_cluster)])


def queue(env: dict) -> dict:
    """Job id -> state (and why, when pending) of the jobs Slurm lists (pending, running, completing)."""
    out = subprocess.run(["squeue", "-h", "-o", "%A %T %r"], env=env, capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


def submitted_jobs(folder: Path, env: dict) -> set:
    """The ids of the jobs submitted from `folder`: recorded by Dora in XP folders, or listed by Slurm
    with a working directory in it."""
    jobs = {json.loads(path.read_text())["job_id"] for path in folder.rglob("job.json")}
    out = subprocess.run(["squeue", "-h", "-o", "%A %Z"], env=env, capture_output=True, text=True).stdout
    for line in out.splitlines():
        job, _, workdir = line.partition(" ")
        if Path(workdir) == folder or folder in Path(workdir).parents:
            jobs.add(job)
    return jobs


def grid(workdir: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`dora grid ARGS` from `workdir`. It may run, monitoring, as long as the XPs' folders (logs,
    histories) or the queue change; its own output is no sign of progress (the monitor prints a
    countdown every second)."""
    result = run_until_stalled(["python", "-m", "dora", "-P", "demixlab", "grid", *args], cwd=workdir, env=env,
                               progress=[workdir / "outputs", lambda: queue(env)], output_is_progress=False)
    assert result.returncode == 0, f"dora grid {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def job_id(folder: Path) -> str:
    return json.loads((folder / "job.json").read_text())["job_id"]


def job_field(job: str, field: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S*)", out)
    return match.group(1) if match else ""


def wait_for_job(job: str, env: dict, condition, what: str, folder: Path) -> None:
    """Wait for `condition()` while the job's XP folder or its state keep changing."""
    wait_while_progressing(condition, what, [folder, lambda: job_field(job, "JobState", env)])


def final_states(output: str) -> dict:
    """Signature -> state in the last table the grid monitor printed."""
    rows = re.findall(r"^\S*\d+\s+.*?\s(\w{3})\s+([0-9a-f]{8})\s", re.sub(r"\x1b\[[0-9;]*m", "", output), re.M)
    return {sig: state for state, sig in rows}


def test_smoke_grid_runs_to_completion_including_a_two_process_xp(tmp_path, slurm):
    workdir = make_workdir(tmp_path)
    result = grid(workdir, slurm, "smoke", "--interval", "0.05")
    states = final_states(result.stdout + result.stderr)
    assert len(states) == 4 and set(states.values()) == {"COM"}, states
    for sig in states:
        assert load_checkpoint(workdir / "outputs" / "xps" / sig)["done"]
    two_process = [sig for sig in states if job_field(job_id(workdir / "outputs" / "xps" / sig), "NumTasks", slurm) == "2"]
    assert len(two_process) == 1
    folder = workdir / "outputs" / "xps" / two_process[0]
    assert "epoch 2: weights identical on the 2 processes" in (folder / "train.log").read_text()
    assert "rank 1 of 2 (gloo)" in (folder / "train_rank1.log").read_text()


def test_a_failed_job_shows_failed_and_retry_resubmits_it(tmp_path, slurm):
    workdir = make_workdir(tmp_path, {"failing": FAILING_GRID})
    result = grid(workdir, slurm, "failing", "--interval", "0.05")
    states = final_states(result.stdout + result.stderr)
    assert list(states.values()) == ["FAI"], states
    folder = workdir / "outputs" / "xps" / next(iter(states))
    first = job_id(folder)
    grid(workdir, slurm, "failing", "--no_monitoring")  # without -r a failed XP stays failed
    assert job_id(folder) == first
    grid(workdir, slurm, "failing", "-r", "--no_monitoring")
    second = job_id(folder)
    assert second != first
    wait_for_job(second, slurm, lambda: job_field(second, "JobState", slurm) == "FAILED", "the resubmitted job to fail",
                 folder)
    assert "dset.root=/nonexistent/stems: no such directory" in (folder / "train.log").read_text()


def test_a_job_requeued_while_training_resumes_from_its_checkpoint(tmp_path, slurm):
    workdir = make_workdir(tmp_path, {"requeue": REQUEUE_GRID})
    grid(workdir, slurm, "requeue", "--no_monitoring")
    folder = next((workdir / "outputs" / "xps").iterdir())
    job = job_id(folder)
    history = folder / "history.json"
    wait_for_job(job, slurm, lambda: history.exists() and len(json.loads(history.read_text() or "[]")) >= 1,
                 "a first epoch", folder)
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
    # Slurm holds a requeued job for about two minutes (BeginTime); release it now.
    wait_for_job(job, slurm, lambda: job_field(job, "JobState", slurm) == "PENDING", "the job to be requeued", folder)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    wait_for_job(job, slurm, lambda: job_field(job, "JobState", slurm) == "COMPLETED", "the requeued job to complete",
                 folder)
    assert job_field(job, "Restarts", slurm) == "1"
    epochs = [entry["epoch"] for entry in json.loads(history.read_text())]
    assert epochs == [1, 2, 3, 4, 5]
    log = (folder / "train.log").read_text()
    assert re.search(r"resuming from .*checkpoint.th after epoch [1-4]\b", log), log[-4000:]
    assert log.count("input statistics from") == 1  # calibrated once: the second run resumed, not restarted
