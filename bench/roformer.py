"""BS-RoFormer and Mel-RoFormer: demixlab's model against audio-separator's class (what the
community checkpoints run with), same weights, same input, side by side.

    python bench/roformer.py                        # a reduced model (dim 128, depth 4), 4 s stereo: CPU,
                                                    # and CUDA when a GPU is available
    python bench/roformer.py --devices cuda --dim 384 --depth 6 --seconds 8 --batch 2   # the paper's size

For each implementation and family: the median time of an eval forward and of a training step
(forward, the multi-resolution loss, backward), and the peak memory of each (CPU: the growth of
the process' peak RSS, each measurement in a fresh process; CUDA: torch's peak allocation). The
reference has attention gates, so demixlab's model is built with `attention_gates=True`.
Needs the reference packages of tests/requirements-reference.txt.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(implementation: str, family: str, args: argparse.Namespace) -> torch.nn.Module:
    """The reference model (seeded) or demixlab's loaded with its weights."""
    from demixlab.models import get_family
    from demixlab.models.roformer.model import PAPER_FREQS_PER_BANDS
    from tests.references import import_roformer_reference

    torch.manual_seed(0)
    common = dict(dim=args.dim, depth=args.depth, heads=8, dim_head=64, stereo=True, num_stems=1,
                  time_transformer_depth=1, freq_transformer_depth=1, stft_hop_length=441, attn_dropout=0.0,
                  ff_dropout=0.0)
    if family == "bs_roformer":
        reference = import_roformer_reference("bs_roformer").BSRoformer(
            freqs_per_bands=tuple(PAPER_FREQS_PER_BANDS), mask_estimator_depth=2, **common)
    else:
        reference = import_roformer_reference("mel_band_roformer").MelBandRoformer(
            num_bands=60, mask_estimator_depth=1, **common)
    if implementation == "reference":
        return reference
    options = dict(dim=args.dim, depth=args.depth, heads=8, dim_head=64, attn_dropout=0.0, ff_dropout=0.0,
                   attention_gates=True, mask_hidden_layers=1)
    model = get_family(family).build_model(["vocals"], 44100, 2, options)
    model.load_state_dict(reference.state_dict())
    return model


def measure(implementation: str, family: str, mode: str, args: argparse.Namespace) -> dict:
    """Time (median of `repeats` after a warm-up) and peak memory of one mode in this process."""
    from demixlab.models import get_family

    device = torch.device(args.device)
    model = build(implementation, family, args).to(device)
    frames = int(args.seconds * 44100) // 441 * 441
    mixture = 0.3 * torch.randn(args.batch, 2, frames, generator=torch.Generator().manual_seed(1)).to(device)
    references = 0.1 * torch.randn(args.batch, 1, 2, frames, generator=torch.Generator().manual_seed(2)).to(device)
    objective = get_family(family).objective(model, {}) if implementation == "demixlab" else None

    def step() -> None:
        if mode == "forward":
            with torch.no_grad():
                model(mixture)
            return
        model.zero_grad(set_to_none=True)
        if objective is not None:
            loss = objective(model, mixture, references)["loss"]
        else:
            loss = model(mixture, target=references[:, 0])
        loss.backward()

    model.train(mode == "train")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    return {"seconds": statistics.median(times[1:]), "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when available)")
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", default="bs_roformer,mel_roformer")
    parser.add_argument("--worker", nargs=3, metavar=("IMPLEMENTATION", "FAMILY", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker, args)))
        return
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"dim {args.dim}, depth {args.depth}, batch {args.batch} x {args.seconds:g} s stereo, median of "
          f"{args.repeats} after a warm-up; CPU: {torch.get_num_threads()} threads")
    print(f"{'device':6} {'family':13} {'mode':8} {'reference s':>12} {'demixlab s':>11} {'ratio':>6} "
          f"{'ref MiB':>9} {'demixlab MiB':>13}")
    for device in devices:
        for family in args.families.split(","):
            for mode in ("forward", "train"):
                results = {}
                for implementation in ("reference", "demixlab"):
                    command = [sys.executable, __file__, "--worker", implementation, family, mode, "--device",
                               device] + [item for key in ("dim", "depth", "seconds", "batch", "repeats")
                                          for item in (f"--{key}", str(getattr(args, key)))]
                    output = subprocess.run(command, check=True, capture_output=True, text=True,
                                            env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout
                    results[implementation] = json.loads(output.strip().splitlines()[-1])
                ref, ours = results["reference"], results["demixlab"]
                print(f"{device:6} {family:13} {mode:8} {ref['seconds']:12.3f} {ours['seconds']:11.3f} "
                      f"{ours['seconds'] / ref['seconds']:6.2f} {ref['peak_mib']:9.0f} {ours['peak_mib']:13.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
