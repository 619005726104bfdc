"""Latency and real-time factor of live separation (`Separator.stream()`) per streamable family.

    python bench/stream.py [--block 1024] [--seconds 20] [--threads N] [--families umx,slicq_cdae]

Each family that can stream runs in its causal configuration at full size (the family's default
options, random weights, 4 stereo sources at 44.1 kHz): umx and xumx with a unidirectional LSTM
and `wiener_iterations=0`, slicq_cdae with `realtime=true` (causal first convolutions, the mixture
phase; its work comes once per sliCQT slice, every 9030 samples, so most blocks take no time and
the slowest block holds a whole slice). White noise is pushed in blocks of `--block` samples, as
an audio callback would. Printed per family:

- latency: the model's declared lookahead (samples, ms): how late every stem sample is;
- with a block: the latency plus the block's own duration (a sample waits for its block to fill);
- real-time factor: separation time / audio duration (below 1: keeps up), in wall time and in
  this process's CPU time (less sensitive to a shared machine's load);
- the slowest block's time next to a block's duration (above it: a real-time callback would drop).

Families that declare no lookahead are listed as not streamable.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SOURCES = ["drums", "bass", "other", "vocals"]
RATE = 44100
CAUSAL = {"umx": dict(unidirectional=True, wiener_iterations=0),
          "xumx": dict(unidirectional=True, wiener_iterations=0),
          "slicq_cdae": dict(realtime=True)}
"""The causal configuration of every family that can stream."""


def main() -> None:
    """Separate noise block by block with each streamable family; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=1024, help="samples per pushed block (default: 1024)")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio streamed per family (default: 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--families", default=None, help="comma-separated families to run (default: all)")
    args = parser.parse_args()
    import torch

    from demixlab.models import family_names, get_family
    from demixlab.release.model_file import package_model, save_package
    from demixlab.separation import Separator

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"blocks of {args.block} samples ({1000 * args.block / RATE:.1f} ms) at {RATE} Hz, {args.seconds:g} s per "
          f"family, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print(f"{'family':10} {'parameters':>10} {'latency':>16} {'with a block':>13} {'RTF wall':>9} {'RTF CPU':>8} "
          f"{'median / slowest block':>23}")
    noise = 0.1 * torch.randn(2, int(args.seconds * RATE), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="demixlab-stream-") as tmp:
        chosen = args.families.split(",") if args.families else family_names()
        unknown = sorted(set(chosen) - set(family_names()))
        if unknown:
            parser.error(f"--families: unknown {', '.join(unknown)} (choose from {', '.join(family_names())})")
        for family in chosen:
            if family not in CAUSAL:
                print(f"{family:10} not streamable (declares no lookahead)")
                continue
            torch.manual_seed(0)
            model = get_family(family).build_model(SOURCES, RATE, 2, CAUSAL[family])
            save_package(package_model(family, CAUSAL[family], model.state_dict(), sources=SOURCES, samplerate=RATE,
                                       audio_channels=2), Path(tmp) / f"{family}.th")
            live = Separator(tmp, family).stream()
            times = []
            cpu = time.process_time()
            for start in range(0, noise.shape[-1], args.block):
                begin = time.perf_counter()
                live.push(noise[:, start:start + args.block])
                times.append(time.perf_counter() - begin)
            live.flush()
            cpu = time.process_time() - cpu
            latency_ms = 1000 * live.latency / RATE
            block_ms = 1000 * args.block / RATE
            parameters = sum(parameter.numel() for parameter in model.parameters())
            print(f"{family:10} {parameters / 1e6:9.1f}M {live.latency:6d} = {latency_ms:5.1f} ms "
                  f"{latency_ms + block_ms:10.1f} ms {sum(times) / args.seconds:9.3f} {cpu / args.seconds:8.3f} "
                  f"{1000 * statistics.median(times):8.1f} / {1000 * max(times):6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
