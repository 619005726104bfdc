"""Time one training step of a model family on random audio, and its page faults.

    python bench/train_step.py [--family umx] [--batch 8] [--seconds 2] [--steps 5] [--no-keep-memory]

Prints forward, backward and optimizer times per step, and the minor page faults and system
time each step costs: with glibc's default settings every step faults its large tensors back
in; `demixlab.training.allocator.tune_cpu_runtime` (used by `dora run`) avoids that.
"""
import argparse
import resource
import time

import torch

from demixlab.training.allocator import tune_cpu_runtime
from demixlab.models import get_family

SOURCES = ["drums", "bass", "other", "vocals"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="umx")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-keep-memory", action="store_true", help="leave glibc's allocator settings alone")
    args = parser.parse_args()
    if not args.no_keep_memory:
        tune_cpu_runtime()
    torch.manual_seed(0)
    family = get_family(args.family)
    model = family.build_model(SOURCES, 44100, 2, {})
    objective = family.build_objective(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sources = torch.randn(args.batch, len(SOURCES), 2, int(args.seconds * 44100)) * 0.1
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.family}: {params / 1e6:.2f} M parameters, batch {args.batch} x {args.seconds:g} s, "
          f"{torch.get_num_threads()} threads, keep freed memory: {not args.no_keep_memory}")
    print(f"{'step':>4} {'forward s':>10} {'backward s':>11} {'optim s':>8} {'total s':>8} {'sys s':>6} {'page faults':>12}")
    totals = []
    for step in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        begin = time.perf_counter()
        loss = objective(model, sources.sum(1), sources)["loss"]
        forward = time.perf_counter()
        optimizer.zero_grad()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_SELF)
        totals.append(end - begin)
        print(f"{step:>4} {forward - begin:>10.3f} {backward - forward:>11.3f} {end - backward:>8.3f} "
              f"{end - begin:>8.3f} {after.ru_stime - before.ru_stime:>6.2f} {after.ru_minflt - before.ru_minflt:>12}")
    steady = sorted(totals[1:])[len(totals[1:]) // 2] if len(totals) > 1 else totals[0]
    print(f"median step after the first: {steady:.3f} s")


if __name__ == "__main__":
    main()
