"""Atomic writes and safe loading of torch files."""
import os
import pickle

import pytest
import torch

from demixlab.errors import DemixError
from demixlab.files import atomic_path, load_torch, save_torch


def test_atomic_path_replaces_only_on_success_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.th"
    save_torch({"a": torch.ones(2)}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("crash while writing")
    assert torch.equal(load_torch(target)["a"], torch.ones(2))  # the previous file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["state.th"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's private 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch, writer):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.th"
    if writer == "torch.save":
        torch.save({"state": Payload()}, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump({"state": Payload()}, handle)
    with pytest.raises(DemixError, match="evil.th: not a valid demixlab torch file"):
        load_torch(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_and_truncated_files_are_user_errors(tmp_path):
    with pytest.raises(DemixError, match="no such file"):
        load_torch(tmp_path / "absent.th")
    path = tmp_path / "cut.th"
    save_torch({"a": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DemixError, match="cut.th"):
        load_torch(path)
