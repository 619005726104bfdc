"""Separate a long synthetic stereo track with a small random model: wall time and memory.

    python bench/separate_long.py [--minutes 10] [--family umx] [--device cpu] [--segment 10] [--jobs 1]

Each configuration (chunked, then `--no-split`) runs in a fresh subprocess so that its peak
resident memory (ru_maxrss) is its own. Printed per run: wall time, peak RSS, the RSS growth
during separation, and the track-sized buffers that growth must include (the input and the
stems); the rest is what the model's activations (chunks) cost. On CUDA the peak of GPU memory
(torch.cuda.max_memory_allocated) is the activations alone, since the stems accumulate on the CPU.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCES = ["drums", "bass", "other", "vocals"]
MODELS = {
    "umx": dict(hidden_size=64, nb_layers=2, wiener_iterations=1),
    "hdemucs": dict(channels=8, depth=6, segment=10.0),
    "htdemucs": dict(channels=8, depth=4, bottom_channels=64, t_layers=1, t_heads=4, segment=10.0),
    "xumx": dict(hidden_size=64, nb_layers=2, wiener_iterations=1),
}
MIB = 1024 * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def worker(args: argparse.Namespace) -> dict:
    """One separation in this process; returns its measurements."""
    from demixlab.separation import Separator
    from demixlab.models import get_family
    from demixlab.release.model_file import package_model, save_package

    torch.manual_seed(0)
    options = MODELS[args.family]
    model = get_family(args.family).build_model(SOURCES, 44100, 2, options)
    with tempfile.TemporaryDirectory() as folder:
        save_package(package_model(args.family, options, model.state_dict(), sources=SOURCES, samplerate=44100,
                                   audio_channels=2), Path(folder) / "bench.th")
        del model
        separator = Separator(folder, "bench", device=args.device, segment=args.segment, split=not args.no_split,
                              jobs=args.jobs)
    length = int(args.minutes * 60 * 44100)
    time_axis = torch.arange(length) / 44100
    track = 0.3 * torch.stack([torch.sin(2 * torch.pi * 220 * time_axis), torch.sin(2 * torch.pi * 331 * time_axis)])
    track += 0.05 * torch.randn(2, length, generator=torch.Generator().manual_seed(0))
    del time_axis
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = _rss_bytes()
    begin = time.time()
    stems = separator.separate_tensor(track, 44100)
    wall = time.time() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "family": args.family, "split": not args.no_split, "segment": args.segment, "jobs": args.jobs,
        "wall_s": wall, "peak_rss_mib": peak / MIB, "rss_growth_mib": (peak - before) / MIB,
        "stems_mib": sum(stem.numel() * stem.element_size() for stem in stems.values()) / MIB,
        "input_mib": track.numel() * track.element_size() / MIB,
    }
    if args.device.startswith("cuda"):
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / MIB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--family", default="umx", choices=sorted(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--segment", type=float, default=10.0, help="seconds per chunk of the split run")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only-split", action="store_true", help="skip the --no-split run (it needs much memory)")
    parser.add_argument("--no-split", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"{args.minutes:g} min stereo 44.1 kHz, {args.family} {MODELS[args.family]}, device {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'split':>9} {'jobs':>4} {'wall s':>8} {'peak RSS MiB':>13} {'RSS growth MiB':>15} {'stems MiB':>10} "
          f"{'input MiB':>10} {'CUDA peak MiB':>14}")
    runs = [[]] if args.only_split else [[], ["--no-split"]]
    for extra in runs:
        command = [sys.executable, __file__, "--worker", "--minutes", str(args.minutes), "--family", args.family,
                   "--device", args.device, "--segment", str(args.segment), "--jobs", str(args.jobs), *extra]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{'no' if extra else f'{args.segment:g} s':>9}: failed ({done.returncode}): {last}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        split = f"{args.segment:g} s" if result["split"] else "no"
        cuda = f"{result['cuda_peak_mib']:14.0f}" if "cuda_peak_mib" in result else f"{'-':>14}"
        print(f"{split:>9} {result['jobs']:4d} {result['wall_s']:8.1f} {result['peak_rss_mib']:13.0f} "
              f"{result['rss_growth_mib']:15.0f} {result['stems_mib']:10.0f} {result['input_mib']:10.0f} {cuda}")


if __name__ == "__main__":
    main()
