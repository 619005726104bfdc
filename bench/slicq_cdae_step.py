"""Time one training step of the sliCQ-CDAE family, with and without the time-domain SDR term.

    python bench/slicq_cdae_step.py [--batch 2] [--seconds 2] [--steps 5] [--device auto] [--no-amp]

A step is the published one: the objective (sliCQT of mixture and sources, the 70 blocks'
autoencoders, the Wiener-EM step, the 14-subset complex MSE and the mask-sum term; with
`sdr_coef=1` also the inverse sliCQT and the SD-SDR combination loss), backward and an AdamW
update (the solver's, `build_optimizer`), on random stereo audio at 44.1 kHz, under bf16 autocast
on CUDA (as `amp.enabled: true`).
Prints the median step time after the first and the peak memory (CUDA: the allocator's peak;
CPU: the process's peak resident set, which only grows).
"""
import argparse
import contextlib
import resource
import time

import torch

from demixlab.training.allocator import tune_cpu_runtime
from demixlab.training.optim import OptimConfig, build_optimizer
from demixlab.models import get_family

SOURCES = ["drums", "bass", "other", "vocals"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device: torch.device, batch: int, seconds: float, steps: int, amp: bool, sdr_coef: float) -> None:
    """Time `steps` training steps with `loss.sdr_coef=sdr_coef` and print one line."""
    torch.manual_seed(0)
    family = get_family("slicq_cdae")
    model = family.build_model(SOURCES, 44100, 2, {}).to(device)
    objective = family.build_objective(model, sdr_coef=sdr_coef)
    optimizer = build_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-3, weight_decay=1e-5))  # as the solver
    sources = (torch.randn(batch, len(SOURCES), 2, int(seconds * 44100)) * 0.1).to(device)
    use_amp = amp and device.type == "cuda"
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        _sync(device)
        begin = time.perf_counter()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with autocast:
            loss = objective(model, sources.sum(1), sources)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - begin)
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB (CUDA allocator peak)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process peak RSS so far)"
    print(f"sdr_coef={sdr_coef:g}: first step {times[0]:.3f} s, median step after the first {steady:.3f} s, "
          f"peak memory {peak}, loss {float(loss.detach()):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA instead of bf16 autocast")
    args = parser.parse_args()
    tune_cpu_runtime()  # as `dora run`: freed memory kept, oneDNN's kernel cache enlarged
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(name)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"slicq_cdae training step: batch {args.batch} x {args.seconds:g} s stereo, {label}, torch "
          f"{torch.__version__}, bf16 autocast: {not args.no_amp and device.type == 'cuda'}")
    for sdr_coef in (0.0, 1.0):
        run(device, args.batch, args.seconds, args.steps, not args.no_amp, sdr_coef)


if __name__ == "__main__":
    main()
