"""Multi-process training on CPU (gloo): `dora run -d --ddp_workers 2`."""
import json

import pytest

from tests.cli import TINY, dora, signature

pytestmark = pytest.mark.slow


def test_two_processes_train_in_lockstep_even_when_a_rank_has_no_validation_track(tmp_path, cache_dir):
    # One validation and one test track for two processes: rank 1 has nothing to evaluate and
    # must still take part in every collective.
    result = dora(tmp_path, cache_dir, "-d", "--ddp_workers", "2", *TINY)
    assert "All workers completed successfully" in result.stdout + result.stderr
    folder = tmp_path / "outputs" / "xps" / signature(tmp_path, cache_dir, *TINY)
    history = json.loads((folder / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]  # one entry per epoch, written once
    assert "nsdr_drums" in history[-1]["valid"] and "nsdr_drums" in history[-1]["test"]
    log = (folder / "train.log").read_text()
    # The solver compares a hash of every parameter and buffer across processes after each epoch.
    assert "epoch 1: weights identical on the 2 processes" in log
    assert "epoch 2: weights identical on the 2 processes" in log
    assert "rank 1 of 2 (gloo)" in (folder / "train_rank1.log").read_text()


def test_a_batch_that_does_not_split_across_processes_is_a_clear_error(tmp_path, cache_dir):
    args = [arg for arg in TINY if not arg.startswith("batch_size=")] + ["batch_size=3"]
    result = dora(tmp_path, cache_dir, "-d", "--ddp_workers", "2", *args, check=False)
    assert result.returncode != 0
    assert "demixlab: error: batch_size=3 is not divisible by the 2 processes" in result.stdout + result.stderr
