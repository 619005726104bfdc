"""Shared pytest fixtures and the `slow` marker."""
import os
import typing as tp
from pathlib import Path

import pytest

from tests.cli import run_in_process


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end runs (dora subprocesses, Slurm, several processes, "
                                       "installs); deselect with -m 'not slow'")


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
