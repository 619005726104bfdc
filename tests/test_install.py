"""A non-editable install works on its own: `pip install .` ships every subpackage and the
configuration, and the installed `demixlab` command trains (through Dora), exports, imports,
evaluates and separates from a directory that is not the repository."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli import TINY
from tests.progress import run_until_stalled

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install --no-deps .` (a wheel build, not editable) into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    result = run_until_stalled([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                "--no-cache-dir", "--target", str(target), str(REPO)], progress=[target])
    assert result.returncode == 0, f"pip install failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return target


def _run(installed: Path, workdir: Path, cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "DEMIXLAB_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    result = run_until_stalled(list(args), cwd=workdir, env=env, progress=[workdir, cache_dir])
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def test_the_installed_package_trains_exports_imports_evaluates_and_separates(installed, tmp_path, cache_dir):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    command = [str(installed / "bin" / "demixlab")]
    found = _run(installed, workdir, cache_dir, sys.executable, "-c", "import demixlab; print(demixlab.__file__)")
    assert found.stdout.strip().startswith(str(installed))  # not the checkout
    assert (installed / "demixlab" / "conf" / "model" / "umx.yaml").is_file()
    assert "grid-local" in _run(installed, workdir, cache_dir, *command, "--help").stdout

    quick = [arg for arg in TINY if not arg.startswith("epochs=")] + ["epochs=1", "model.wiener_iterations=0"]
    _run(installed, workdir, cache_dir, sys.executable, "-m", "dora", "-P", "demixlab", "run", *quick)
    xp, = (workdir / "outputs" / "xps").iterdir()
    exported = _run(installed, workdir, cache_dir, *command, "export", xp.name, "-o", "repo")
    assert Path(exported.stdout.strip()) == Path("repo") / f"{xp.name}.th"

    # Open-Unmix weights as its training script writes them: one state dict per target.
    package = torch.load(workdir / "repo" / f"{xp.name}.th", weights_only=True)
    weights = workdir / "umx_weights"
    weights.mkdir()
    for source in package["sources"]:
        prefix = f"targets.{source}."
        torch.save({key[len(prefix):]: value for key, value in package["state"].items() if key.startswith(prefix)},
                   weights / f"{source}.pth")
    imported = _run(installed, workdir, cache_dir, *command, "import", "openunmix", str(weights), "-o", "repo",
                    "-n", "imported")
    assert "umx model" in imported.stdout

    evaluated = _run(installed, workdir, cache_dir, *command, "evaluate", "--repo", "repo", "-n", xp.name, "-o",
                     "scores", *[arg for arg in TINY if arg.startswith("dset.")], "test.sdr=false")
    assert "SDR global" in evaluated.stdout
    assert json.loads((workdir / "scores" / "results.json").read_text())["summary"]["nsdr"] > -100

    track = next((cache_dir / "toy").glob("toy-*/test/*/mixture.wav"))
    _run(installed, workdir, cache_dir, *command, "separate", "--repo", "repo", "-n", "imported", str(track),
         "-o", "stems", "--no-progress")
    assert sorted(path.name for path in (workdir / "stems" / "mixture").iterdir()) == [
        f"{source}.wav" for source in sorted(package["sources"])]
