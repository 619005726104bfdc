"""Speed and peak memory of demixlab's sliCQT against xumx-slicq-v2 1.0.0a2's transform, side by side.

    python bench/slicqt.py [--device cpu|cuda] [--batch 2] [--seconds 6] [--runs 3] [--threads N]
                           [--scale bark --fbins 262 --fmin 32.9] [--implementations demixlab,xumx-slicq-v2]

Both transforms get the same input, a (batch, 2, seconds * 44100) float32 waveform, and run four
operations: `forward` (waveform -> blocks), `inverse` (blocks -> waveform), `inv+bwd` (inverse,
then backward of a scalar loss to the coefficients: what training through the inverse costs) and
`fwd+inv+bwd` (forward, inverse, backward to the waveform: gradients through both ways).
Each (implementation, operation) runs in its own child process; the table shows the median time
of `--runs` calls after one warm-up call, and the peak memory of one call:

- CUDA: `torch.cuda.max_memory_allocated()` during the first timed call minus the memory
  allocated before it (input, tables and, for the inverse, the coefficients);
- CPU: peak resident set size during the first (cold) call, sampled every 0.5 ms from
  /proc/self/statm, minus the resident size before it. Memory the allocator kept from earlier
  can hide part of the growth: take it as an order of magnitude.

The reference's inverse writes into tensors in place and cannot be differentiated: its gradient
rows print the error it raises. On a busy machine, `--threads 1` avoids waiting for torch's
intra-op thread pool. The reference is a test oracle only (install: see tests/requirements-reference.txt).
"""
import argparse
import multiprocessing
import resource
import statistics
import sys
import threading
import time
import typing as tp
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository (for spawned children too)
RATE = 44100
OPERATIONS = ("forward", "inverse", "inv+bwd", "fwd+inv+bwd")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak_rss_growth(call: tp.Callable[[], None]) -> int:
    """Run `call` while a thread samples the resident set size; the peak minus the size before."""
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - before


def _transforms(name: str, args: argparse.Namespace, device: torch.device) -> tp.Tuple[tp.Callable, tp.Callable]:
    """(forward, inverse) of one implementation, both on complex blocks (..., F_b, S, T_b)."""
    if name == "demixlab":
        from demixlab.spectral import SliCQT

        transform = SliCQT(args.scale, args.fbins, args.fmin, samplerate=RATE).to(device)
        return transform, transform.inverse
    from tests.references import import_reference

    reference = import_reference("xumx_slicq_v2.transforms")
    base = reference.NSGTBase(args.scale, args.fbins, args.fmin, device=str(device))
    encoder, decoder = reference.make_filterbanks(base)

    def forward(x: torch.Tensor) -> tp.List[torch.Tensor]:
        return [torch.view_as_complex(block) for block in encoder(x)]

    def inverse(blocks: tp.List[torch.Tensor], length: int) -> torch.Tensor:
        # the reference rearranges its input in place: hand it copies
        return decoder([torch.view_as_real(block).clone() for block in blocks], length)

    return forward, inverse


def _measure(name: str, operation: str, args: argparse.Namespace, queue: tp.Any) -> None:
    """Child process: time one (implementation, operation) and put (median seconds, peak bytes)."""
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        forward, inverse = _transforms(name, args, device)
        waveform = torch.randn(args.batch, 2, int(args.seconds * RATE), generator=torch.Generator().manual_seed(0))
        waveform = waveform.to(device)
        length = waveform.shape[-1]
        with torch.no_grad():
            blocks = forward(waveform)

        def call() -> None:
            if operation == "forward":
                with torch.no_grad():
                    forward(waveform)
            elif operation == "inverse":
                with torch.no_grad():
                    inverse(blocks, length)
            elif operation == "inv+bwd":
                leaves = [block.clone().requires_grad_(True) for block in blocks]
                inverse(leaves, length).square().sum().backward()
            else:
                signal = waveform.clone().requires_grad_(True)
                estimate = inverse(forward(signal * 1.0), length)  # a non-leaf input, for the reference
                estimate.square().sum().backward()

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        if device.type == "cpu":
            peak = _peak_rss_growth(call)
        else:
            call()  # warm-up (plans, caches)
        sync()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for run in range(args.runs):
            begin = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - begin)
            if run == 0 and device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() - before
        queue.put((statistics.median(times), peak, None))
    except Exception as error:  # report, do not hide: the reference may not support an operation
        queue.put((None, None, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--scale", default="bark")
    parser.add_argument("--fbins", type=int, default=262)
    parser.add_argument("--fmin", type=float, default=32.9)
    parser.add_argument("--implementations", default="demixlab,xumx-slicq-v2")
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    print(f"sliCQT {args.scale}-{args.fbins} from {args.fmin} Hz, input ({args.batch}, 2, {int(args.seconds * RATE)}) "
          f"float32 on {args.device}, median of {args.runs} runs, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} CPU threads")
    memory = "CUDA peak allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"{'implementation':16}  {'operation':12}  {'time (s)':>9}  {memory + ' (MiB)':>26}")
    for name in args.implementations.split(","):
        for operation in OPERATIONS:
            queue = context.Queue()
            process = context.Process(target=_measure, args=(name, operation, args, queue))
            process.start()
            seconds, peak, error = queue.get()
            process.join()
            if error:
                print(f"{name:16}  {operation:12}  failed: {error}")
            else:
                print(f"{name:16}  {operation:12}  {seconds:9.3f}  {peak / 2 ** 20:26.1f}")


if __name__ == "__main__":
    main()
