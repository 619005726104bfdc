"""Training throughput per family on CUDA, through `dora run` itself: steps/s and peak memory.

    python bench/gpu_steps.py [--families umx,htdemucs] [--dtypes bfloat16,float16] [--steps 60]
                              [--workers 8] [--budget 330] [--ddp]

Each (family, dtype) is a real XP on the built-in toy dataset (generated once into a temporary
cache) with the family's recipe batch size and segment, `amp.enabled=true`, two epochs of
`--steps` steps each and one short validation track. The table gives the second epoch's steps/s
(the first holds the warm-up: cuDNN autotuning, allocator growth, loader start) and the peak of
allocated CUDA memory in that epoch, as the solver records them in history.json
(`train.duration`, `train.peak_memory_gib`). Runs stop being started once `--budget` seconds
are spent, so the whole check stays inside its time limit; skipped rows say so.

`--ddp` adds one 2-process NCCL run (`dora run -d`, UMX) when the machine has two GPUs or more;
the solver itself checks that the processes hold identical weights after every epoch.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

# The recipes' batch sizes and segments (demixlab/conf/model/*.yaml).
RECIPES = {
    "umx": (16, 6.0), "xumx": (16, 6.0), "slicq_cdae": (32, 2.0), "hdemucs": (64, 10.0),
    "htdemucs": (32, 10.0), "bs_roformer": (16, 8.0), "mel_roformer": (16, 8.0),
}
TRAIN_TRACKS = 4


def run_xp(family: str, dtype: str, steps: int, workers: int, cache: Path, ddp: bool = False,
           timeout: float = 300, device: str = "cuda") -> tp.Dict[str, tp.Any]:
    """One two-epoch XP in its own folder; the second epoch's numbers or the error's last line."""
    batch, segment = RECIPES[family]
    per_track = -(-steps * batch // TRAIN_TRACKS)
    overrides = [
        f"model={family}", "dset=toy", f"dset.toy.train_tracks={TRAIN_TRACKS}", "dset.toy.valid_tracks=1",
        "dset.toy.test_tracks=1", f"dset.toy.train_duration={segment + 2:g}", "dset.toy.eval_duration=10.0",
        "epochs=2", f"batch_size={batch}", f"segment={segment:g}", f"samples_per_track={per_track}",
        "test.sdr=false", f"misc.device={device}", "amp.enabled=true", f"amp.dtype={dtype}",
        f"misc.num_workers={workers}", "misc.progress=false",
    ]
    workdir = Path(tempfile.mkdtemp(prefix=f"gpu_{family}_{dtype}_"))
    command = [sys.executable, "-m", "dora", "-P", "demixlab", "run", *(["-d"] if ddp else []), *overrides]
    env = {**os.environ, "DEMIXLAB_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    begin = time.time()
    try:
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall": time.time() - begin}
    wall = time.time() - begin
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {result.returncode}", "wall": wall}
    history = json.loads(next((workdir / "outputs" / "xps").glob("*/history.json")).read_text())
    train = history[-1]["train"]
    actual_steps = per_track * TRAIN_TRACKS // batch
    log = result.stdout + result.stderr
    return {"steps_per_s": actual_steps / train["duration"], "peak_gib": train.get("peak_memory_gib", float("nan")),
            "loss": train["loss"], "wall": wall, "steps": actual_steps,
            "identical": "weights identical" in log if ddp else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(RECIPES))
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--steps", type=int, default=60, help="training steps per epoch (two epochs per XP)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (misc.num_workers)")
    parser.add_argument("--budget", type=float, default=330, help="seconds after which no new XP starts")
    parser.add_argument("--ddp", action="store_true", help="add a 2-process NCCL run when 2 GPUs are present")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (no AMP on the CPU)")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_steps.py: no CUDA device")
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"{device_name}, {torch.cuda.device_count()} GPU(s), torch {torch.__version__}, "
          f"{args.steps} steps per epoch, recipe batch and segment per family", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="gpu_cache_"))
    start = time.time()
    rows = []
    jobs = [(family, dtype, False) for family in args.families.split(",") for dtype in args.dtypes.split(",")]
    if args.ddp and torch.cuda.device_count() >= 2:
        jobs.append(("umx", "bfloat16", True))
    for family, dtype, ddp in jobs:
        name = f"{family}{' (2 GPUs, NCCL)' if ddp else ''}"
        if time.time() - start > args.budget:
            rows.append((name, dtype, {"error": "skipped: time budget spent"}))
            continue
        result = run_xp(family, dtype, args.steps, args.workers, cache, ddp=ddp, device=args.device)
        rows.append((name, dtype, result))
        print(f"  {name} {dtype}: {result}", flush=True)
    batch_header = "batch x s"
    print(f"\n{'family':<24} {'amp':<9} {batch_header:>10} {'steps/s':>8} {'peak GiB':>9} {'loss':>8} {'XP s':>6}")
    for name, dtype, result in rows:
        batch, segment = RECIPES[name.split()[0]]
        if "error" in result:
            print(f"{name:<24} {dtype:<9} {f'{batch} x {segment:g}':>10}  {result['error']}")
            continue
        extra = "" if result["identical"] is None else f"  replicas identical: {result['identical']}"
        print(f"{name:<24} {dtype:<9} {f'{batch} x {segment:g}':>10} {result['steps_per_s']:>8.2f} "
              f"{result['peak_gib']:>9.2f} {result['loss']:>8.4f} {result['wall']:>6.0f}{extra}")
    failed = [name for name, _, result in rows if "error" in result and not result["error"].startswith("skipped")]
    if failed or any(result.get("identical") is False for _, _, result in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
