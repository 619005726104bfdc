"""Running a trial's XP: `dora run` in a subprocess here, or a Slurm job submitted as `dora grid` does.

A runner's `start(xp, argv, log)` returns a :class:`TrialRun` at once; the search polls its
`finished()` and reads the XP's history meanwhile, and `stop()`s it when the pruner says so (the
XP's checkpoint keeps the epochs done, so the same XP resumes exactly if it is ever run again).
"""
import logging
import os
import signal
import subprocess
import sys
import typing as tp
from pathlib import Path

from dora.conf import SlurmConfig, SubmitRules
from dora.shep import Sheep, Shepherd
from dora.xp import XP

from ...experiment import DemixHydraMain

logger = logging.getLogger(__name__)


class TrialRun(tp.Protocol):
    """A trial's XP being trained."""

    def finished(self) -> tp.Optional[bool]:
        """None while it runs; then whether it ended well."""

    def stop(self) -> None:
        """Stop it now (its checkpoint keeps the epochs done)."""

    def describe_failure(self) -> str:
        """Why it failed, in one line, and where to read more."""

    def where(self) -> str:
        """Where it runs, e.g. its log file or its Slurm job."""


class Runner(tp.Protocol):
    """Starts trials' XPs."""

    def start(self, xp: XP, argv: tp.List[str], log: Path) -> TrialRun:
        """Start (or continue) training `xp` with overrides `argv`."""


class LocalRun:
    """`dora run ARGV` in a subprocess (a session of its own), its output going to a log file."""

    def __init__(self, command: tp.List[str], log: Path):
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as stream:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stream,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def finished(self) -> tp.Optional[bool]:
        """None while `dora run` runs, then whether it exited with 0."""
        code = self.process.poll()
        return None if code is None else code == 0

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL it if it is still there after `grace` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
            try:
                os.killpg(self.process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def where(self) -> str:
        """Its log file."""
        return f"log: {self.log}"

    def describe_failure(self) -> str:
        """The last `demixlab: error` line (or the last line) of the log, and the log's path."""
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("demixlab: error")]
        last = errors[-1] if errors else (lines[-1] if lines else "no output")
        return f"exit code {self.process.returncode}: {last} (log: {self.log})"


class LocalRunner:
    """Runs each trial's XP here with `dora run` (several GPUs of the Slurm settings: `-d`)."""

    def __init__(self, main: DemixHydraMain, slurm: SlurmConfig):
        self.main = main
        self.slurm = slurm

    def command(self, argv: tp.Sequence[str]) -> tp.List[str]:
        """The `dora run` command line of a trial."""
        command = [sys.executable, "-m", "dora", "-P", self.main.package, "run"]
        if self.slurm.gpus > 1:
            command += ["-d", "--ddp_workers", str(self.slurm.gpus)]
        return command + list(argv)

    def start(self, xp: XP, argv: tp.List[str], log: Path) -> LocalRun:
        """Start `dora run ARGV` (a finished XP only reports, an interrupted one resumes)."""
        return LocalRun(self.command(argv), log)


class SlurmRun:
    """A trial's XP submitted to Slurm through Dora's Shepherd (submitit), as `dora grid` does."""

    FAILED = ("FAILED", "CANCELLED", "OUT_OF_MEMORY", "TIMEOUT", "MISSING", "NODE_FAIL")  # ended for good

    def __init__(self, shepherd: Shepherd, sheep: Sheep):
        self.shepherd = shepherd
        self.sheep = sheep

    def finished(self) -> tp.Optional[bool]:
        """None while the job is pending or running, then whether it completed."""
        self.shepherd.update()
        state = self.sheep.state()
        if state == "COMPLETED":
            return True
        if state in self.FAILED:
            return False
        return None

    def stop(self) -> None:
        """Cancel the job (scancel)."""
        self.shepherd.cancel_lazy(sheep=self.sheep)
        self.shepherd.commit()

    def where(self) -> str:
        """Its Slurm job."""
        return f"Slurm job {self.sheep.current_job_id}"

    def describe_failure(self) -> str:
        """The job's state and its log."""
        return f"Slurm job {self.sheep.current_job_id} {self.sheep.state()} (log: {self.sheep.log})"


class SlurmRunner:
    """Submits each trial's XP to Slurm with the search's Slurm settings (`slurm:` of the space
    over `slurm:` of conf/config.yaml, the settings a grid sets with `launcher.slurm_(...)`)."""

    def __init__(self, main: DemixHydraMain, slurm: SlurmConfig):
        self.shepherd = Shepherd(main, log=logger.info)
        self.slurm = slurm

    def start(self, xp: XP, argv: tp.List[str], log: Path) -> SlurmRun:
        """Submit the XP (unless its job is already pending or running) and return at once."""
        sheep = self.shepherd.get_sheep_from_argv(argv)
        self.shepherd.maybe_submit_lazy(sheep, self.slurm, SubmitRules(retry=True))
        self.shepherd.commit()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as stream:
            stream.write(f"Slurm job {sheep.current_job_id}, log {sheep.log}\n")
        return SlurmRun(self.shepherd, sheep)

