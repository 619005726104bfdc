"""Peak memory of validating one full-length track, per family and track length.

    python bench/valid_memory.py [--families umx,xumx,slicq_cdae] [--minutes 3,6,10]

For each (family, length) a fresh process builds the family's published model (its recipe from
demixlab/conf, `dset=folder` on a generated dataset whose validation split is one stereo track of
that length, 4 sources of filtered noise) through the solver, calibrates it, then runs one
validation (the objective on training-length chunks and the chunked separation, global SDR per
source) exactly as `dora run` does after an epoch. Printed: the process' peak resident memory
during validation, its growth over the memory held before validation (model, optimizer, the
dataset's index), and the time. The audio is written once per length under --workdir.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["drums", "bass", "other", "vocals"]


def write_track(folder: Path, seconds: float, seed: int) -> None:
    """Four stereo stems of low-passed noise (16-bit WAV) and no mixture file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    frames = int(seconds * 44100)
    for index, source in enumerate(SOURCES):
        if (folder / f"{source}.wav").exists():
            continue
        with sf.SoundFile(str(folder / f"{source}.wav"), "w", 44100, 2, subtype="PCM_16") as handle:
            for start in range(0, frames, 44100 * 30):
                block = rng.standard_normal((min(44100 * 30, frames - start), 2)).astype(np.float32)
                block = np.cumsum(block, axis=0) * (0.002 * (index + 1))  # brown-ish noise, per source level
                block -= block.mean(axis=0)
                handle.write(np.clip(block, -0.9, 0.9))


def dataset(workdir: Path, minutes: float) -> Path:
    root = workdir / f"long_{minutes:g}min"
    write_track(root / "train" / "short", 20.0, 0)
    write_track(root / "valid" / "long", minutes * 60, 1)
    write_track(root / "test" / "short", 5.0, 2)
    return root


def measure(family: str, root: Path) -> dict:
    """In this process: build the XP, calibrate, validate once; memory and time."""
    import torch

    sys.path.insert(0, str(ROOT))
    from demixlab.train import main
    from demixlab.training.allocator import tune_cpu_runtime
    from demixlab.training.solver import Solver

    tune_cpu_runtime()  # as `dora run`
    overrides = [f"model={family}", "dset=folder", f"dset.root={root}", f"dset.sources=[{','.join(SOURCES)}]",
                 "misc.num_workers=0", "misc.progress=false", "batch_size=4", "samples_per_track=1"]
    cfg = main.get_xp(overrides).cfg
    with tempfile.TemporaryDirectory() as folder:
        solver = Solver(cfg, folder=Path(folder) / "xp", base_dir=Path.cwd(), device=torch.device("cpu"))
        solver.restore()
        with open("/proc/self/statm") as statm:
            before = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        begin = time.time()
        metrics = solver.validator.validate(0, solver.emas)
        seconds = time.time() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak, "before_mib": before, "seconds": seconds, "nsdr": metrics["nsdr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="umx,xumx,slicq_cdae")
    parser.add_argument("--minutes", default="3,6,10")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "demixlab-valid-memory")
    parser.add_argument("--worker", nargs=2, metavar=("FAMILY", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker[0], Path(args.worker[1]))))
        return
    print(f"{'family':12} {'minutes':>7} {'peak MiB':>9} {'growth MiB':>11} {'valid s':>8}")
    for family in args.families.split(","):
        for minutes in (float(value) for value in args.minutes.split(",")):
            root = dataset(args.workdir, minutes)
            output = subprocess.run([sys.executable, __file__, "--worker", family, str(root)], check=True,
                                    capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            print(f"{family:12} {minutes:7g} {result['peak_mib']:9.0f} {result['peak_mib'] - result['before_mib']:11.0f} "
                  f"{result['seconds']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
