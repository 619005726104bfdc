"""Run demixlab's training as a user would: `dora run` in a subprocess (end-to-end tests), or the
same entry point in this process (error paths, which need no second interpreter)."""
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import torch

from tests.progress import Watched, run_until_stalled

# A tiny but real configuration: UMX with a small bottleneck, a short schedule...
TINY_SOLVER = [
    "model.hidden_size=16", "model.nb_layers=1",
    "epochs=2", "batch_size=2", "segment=1.0", "samples_per_track=2", "test.sdr=false",
    "misc.num_workers=0",
]
# ... on a small toy dataset.
TINY = [
    "dset.toy.train_tracks=2", "dset.toy.valid_tracks=1", "dset.toy.test_tracks=1",
    "dset.toy.train_duration=4.0", "dset.toy.eval_duration=3.0", *TINY_SOLVER,
]


def dora(workdir: Path, cache_dir: Path, *args: str, command: str = "run", check: bool = True,
         progress: tp.Sequence[Watched] = ()) -> subprocess.CompletedProcess:
    """Run `python -m dora -P demixlab COMMAND ARGS` in `workdir`; raise with its output if it fails.
    No fixed timeout: it may run as long as its output, `workdir/outputs` (the XPs' logs, histories,
    checkpoints), the cache or `progress` keep changing (see tests/progress.py)."""
    env = {**os.environ, "DEMIXLAB_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    result = run_until_stalled([sys.executable, "-m", "dora", "-P", "demixlab", command, *args], cwd=workdir,
                               env=env, progress=[workdir / "outputs", cache_dir, *progress])
    if check and result.returncode != 0:
        raise AssertionError(f"dora {command} {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def signature(workdir: Path, cache_dir: Path, *args: str) -> str:
    """The signature Dora gives these overrides."""
    code = ("import sys; from demixlab.train import main; "
            "print(main.get_xp(sys.argv[1:]).sig)")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=workdir, capture_output=True, text=True,
                         env={**os.environ, "DEMIXLAB_CACHE": str(cache_dir)}, check=True)
    return out.stdout.strip().splitlines()[-1]


def load_checkpoint(folder: Path) -> dict:
    """An XP's checkpoint, loaded the safe way."""
    return torch.load(folder / "checkpoint.th", weights_only=True)


def run_in_process(workdir: Path, cache_dir: Path, *overrides: str) -> int:
    """What `dora run OVERRIDES` does, in this process: compose and check the configuration, make the
    XP, enter it and run the training entry point. Returns the exit code (0 when it finished);
    messages go to stderr as they would (use capsys). Call with the working directory set to
    `workdir` (XPs land in its outputs/) and DEMIXLAB_CACHE set to `cache_dir`."""
    from demixlab.train import main, run

    assert Path.cwd() == workdir and os.environ.get("DEMIXLAB_CACHE") == str(cache_dir)
    # Dora resolves its output folder once, against the directory it was imported from.
    dora_dir, main.dora.dir = main.dora.dir, workdir / "outputs"
    try:
        xp = main.get_xp(list(overrides))
        main.init_xp(xp)
        with xp.enter():
            run(xp.cfg)
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    finally:
        main.dora.dir = dora_dir
    return 0

