"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The demixlab cache (generated datasets, metadata) shared by the whole test session."""
    return Path(os.environ.get("DEMIXLAB_CACHE") or tmp_path_factory.mktemp("cache"))
