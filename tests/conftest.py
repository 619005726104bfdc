"""Shared pytest fixtures, the `slow` marker, and the check that the tests leave no process behind."""
import os
import typing as tp
from pathlib import Path

import pytest

from tests import leftovers
from tests.cli import run_in_process


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs (dora subprocesses, Slurm, several processes, "
                                       "installs); deselect with -m 'not slow'")


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory) -> tp.Iterator[None]:
    """Fail the session, naming them, if processes the tests started (dora, submitit, DDP workers,
    Slurm daemons and job steps, munged...) are still alive once every fixture has been torn down;
    they are killed then. See tests/leftovers.py for what counts as the session's."""
    if not leftovers.supported():
        yield
        return
    before = leftovers.baseline()
    mark, previous = leftovers.new_mark(), os.environ.get(leftovers.MARK)
    os.environ[leftovers.MARK] = mark  # inherited by every subprocess, and by what they start
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(leftovers.MARK, None)
        else:
            os.environ[leftovers.MARK] = previous
    folders = [tmp_path_factory.getbasetemp()]
    left = leftovers.wait_until_gone(lambda: leftovers.left_behind(before, mark, folders))
    if left:
        leftovers.kill(left)
        pytest.fail("processes started by the tests were still alive at the end of the session (killed now):\n"
                    + "\n".join(f"  {process}" for process in left), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_subprocess() -> tp.Iterator[None]:
    """The programs the tests start (dora runs, Slurm jobs, DDP workers) compute with one thread each,
    unless OMP_NUM_THREADS says otherwise. On a loaded machine a pool of several OpenMP threads waits
    at every operation for whichever of its threads is not scheduled: with one busy loop beside it, a
    tiny training run took 4 times as long with 2 threads as with 1 (the same time on a quiet machine).
    This process' own thread pool, started when torch was imported, keeps its size."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    if previous is None:
        os.environ.pop("OMP_NUM_THREADS", None)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The demixlab cache (generated datasets, metadata) shared by the whole test session."""
    return Path(os.environ.get("DEMIXLAB_CACHE") or tmp_path_factory.mktemp("cache"))


@pytest.fixture
def in_process(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tp.Callable[..., int]:
    """`in_process(*overrides)`: `dora run OVERRIDES` in this process from `tmp_path`, with the
    session's cache (see :func:`tests.cli.run_in_process`); returns the exit code."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEMIXLAB_CACHE", str(cache_dir))
    return lambda *overrides: run_in_process(tmp_path, cache_dir, *overrides)
