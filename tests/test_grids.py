"""Grids without Slurm: `dora grid --dry_run --init`, `dora run -f SIG`, demixlab grid-local, finetune."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import dora, load_checkpoint
from tests.progress import run_until_stalled

REPO = Path(__file__).resolve().parents[1]


def make_workdir(path: Path, extra_grids: dict = {}) -> Path:  # noqa: B006 (read only)
    """A scratch directory to run `dora` and `demixlab grid-local` from: its own outputs/ and the
    repository's grids (plus `extra_grids`: module name -> source)."""
    grids = path / "grids"
    grids.mkdir(parents=True)
    for module in (REPO / "grids").glob("*.py"):
        (grids / module.name).symlink_to(module)
    for name, source in extra_grids.items():
        (grids / f"{name}.py").write_text(source)
    return path


def xps_by_argv(workdir: Path) -> dict:
    """{' '.join(argv): signature} of the XPs initialised in `workdir`."""
    return {" ".join(json.loads((folder / ".argv.json").read_text())): folder.name
            for folder in (workdir / "outputs" / "xps").iterdir()}


def tool(workdir: Path, cache_dir: Path, *args: str, env: dict = {}, check: bool = True  # noqa: B006
         ) -> subprocess.CompletedProcess:
    result = run_until_stalled([sys.executable, "-m", *args], cwd=workdir, progress=[workdir / "outputs", cache_dir],
                               env={**os.environ, "DEMIXLAB_CACHE": str(cache_dir), **env})
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.mark.slow
def test_dry_run_init_then_run_one_xp_then_finetune_the_finished_one_locally(tmp_path, cache_dir):
    workdir = make_workdir(tmp_path)
    # Materialise the smoke grid's signatures without any Slurm.
    dora(workdir, cache_dir, "smoke", "--dry_run", "--init", command="grid")
    xps = xps_by_argv(workdir)
    assert len(xps) == 4
    parent = next(sig for argv, sig in xps.items() if "model=xumx" in argv)
    dora(workdir, cache_dir, "-f", parent)
    assert load_checkpoint(workdir / "outputs" / "xps" / parent)["done"]

    # The finetune grid continues finished parents only, and says why it skips the others.
    env = {"FINETUNE_PARENT_GRID": "smoke"}
    listed = tool(workdir, cache_dir, "demixlab", "grid-local", "finetune", "--dry_run", env=env)
    skipped = [line for line in listed.stdout.splitlines() if line.startswith("finetune: skipping")]
    assert len(skipped) == 3 and all("training not finished (0/2 epochs)" in line for line in skipped)
    assert f"continue_from={parent}" in listed.stdout

    ran = tool(workdir, cache_dir, "demixlab", "grid-local", "finetune", env=env)
    child = next(sig for argv, sig in xps_by_argv(workdir).items() if f'continue_from="{parent}"' in argv)
    state = load_checkpoint(workdir / "outputs" / "xps" / child)
    assert state["parent"] == parent and state["done"]
    assert state["config"]["optim"]["lr"] == 1e-4  # variant=finetune
    summary = ran.stdout.splitlines()
    assert summary[-2].startswith("sig") and summary[-1].startswith(f"{child}  done")


@pytest.mark.slow
def test_grid_local_reports_an_unknown_grid_and_a_failing_xp(tmp_path, cache_dir):
    failing = '''
from ._explorers import DemixExplorer


@DemixExplorer
def explorer(launcher):
    launcher({"dset": "folder", "dset.root": "/nonexistent/stems", "dset.sources": ["a", "b"]})
'''
    workdir = make_workdir(tmp_path, {"failing": failing})
    unknown = tool(workdir, cache_dir, "demixlab", "grid-local", "nosuch", check=False)
    assert unknown.returncode == 2 and "no grid named 'nosuch'" in unknown.stderr and "smoke" in unknown.stderr
    result = tool(workdir, cache_dir, "demixlab", "grid-local", "failing", check=False)
    assert result.returncode == 1
    assert "dset.root=/nonexistent/stems: no such directory" in result.stderr
    assert "FAILED" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize("value, expected", [("12345678", "12345678"), ("00123456", "00123456"),
                                             ('"1234e567"', "1234e567"), ("0abcdef1", "0abcdef1")])
def test_continue_from_accepts_signatures_hydra_reads_as_numbers(value, expected):
    from demixlab.experiment import parse_signature
    from demixlab.train import main

    cfg = main.get_xp([f"continue_from={value}"]).cfg
    assert parse_signature(cfg.continue_from, "continue_from") == expected
