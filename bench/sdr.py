"""BSS Eval v4 time and agreement: demixlab.evaluation.bsseval (torch) against museval, on the same tracks.

    python bench/sdr.py [--tracks 3] [--seconds 20] [--no-museval] [--threads N] [--profile]
    OMP_NUM_THREADS=2 python bench/sdr.py ...   # both sides on 2 threads (numpy reads it at import)

Tracks are toy-dataset songs (demixlab/data/toy.py: drums, bass, other, vocals; stereo 44.1 kHz)
with plausible estimates: each stem slightly low-passed and delayed, plus 15 % of the other
stems (interference) and noise. Two variants of every track:

- "noise floor": the stems plus a -60 dB white noise floor (as any recording has);
- "band-limited": the stems as synthesized. Their spectra are so empty that the Gram system
  of the distortion filters is numerically singular: SDR is unaffected, but ISR/SIR/SAR are
  then rounding noise in museval itself (shown: museval against museval on the same input
  scaled by 1 + 1e-12).

Every track is scored with museval.evaluate(win=hop=1 s) and with demixlab.evaluation.bsseval (all four
metrics on CPU, SDR only on CPU, all four on CUDA when available). Prints the time per track,
the speed-up and the largest |difference| in dB per metric over tracks, sources and frames.
With --profile, also the CPU all-four-metrics time per stage (seconds per track, wall clock).
"""
import argparse
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demixlab.evaluation import bsseval  # noqa: E402
from demixlab.evaluation.bsseval import METRICS, bss_eval_v4  # noqa: E402
from demixlab.data.toy import TOY_SOURCES, synthesize_track  # noqa: E402
from tests.references import import_reference  # noqa: E402

RATE = 44100


def make_track(seed: int, seconds: float, noise_floor: bool) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """(references, estimates), float64 (4, 2, T)."""
    stems = synthesize_track(seed, seconds, RATE)
    references = torch.from_numpy(np.stack([stems[name] for name in TOY_SOURCES])).double()
    generator = torch.Generator().manual_seed(seed)
    if noise_floor:
        rms = references.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
        references = references + 1e-3 * rms * torch.randn(references.shape, generator=generator, dtype=torch.float64)
    smooth = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64).repeat(8, 1, 1)
    filtered = torch.nn.functional.conv1d(references.reshape(1, 8, -1), smooth, padding=1, groups=8)
    filtered = torch.nn.functional.pad(filtered.reshape(references.shape), (3, 0))[..., :references.shape[-1]]
    interference = 0.15 * (references.sum(0, keepdim=True) - references)
    noise = 0.01 * torch.randn(references.shape, generator=generator, dtype=torch.float64)
    return references, filtered + interference + noise


def frame_difference(first: tp.Sequence[np.ndarray], second: tp.Sequence[np.ndarray]) -> tp.List[float]:
    """Largest |difference| per metric over finite frames; inf when NaN/inf frames differ."""
    out = []
    for mine, theirs in zip(first, second):
        if not (np.array_equal(np.isnan(mine), np.isnan(theirs)) and np.array_equal(np.isinf(mine), np.isinf(theirs))):
            out.append(np.inf)
        else:
            finite = np.isfinite(theirs)
            out.append(float(np.abs(mine[finite] - theirs[finite]).max()) if finite.any() else 0.0)
    return out


def timed(func: tp.Callable[[], tp.Any], sync: bool = False) -> tp.Tuple[tp.Any, float]:
    begin = time.perf_counter()
    out = func()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - begin


class StageTimer:
    """Wall-clock seconds spent in each stage function of demixlab.evaluation.bsseval, exclusive of
    the stages it calls (the module's functions are wrapped while enabled)."""

    STAGES = {"_lagged_correlations": "cross-correlations (FFT)", "_distortion_filters": "systems' assembly",
              "_block_toeplitz_cholesky": "block Schur factor, all", "_solve_block_toeplitz": "solve and refine, all",
              "_solve": "dense solve, all sources", "_solve_own": "dense solve, own sources",
              "_filtered_metrics": "per-frame projections", "bss_eval_v4": "framing, SDR, silence"}

    def __init__(self) -> None:
        self.seconds: tp.Dict[str, float] = {name: 0.0 for name in self.STAGES}
        self.enabled = False
        self._children = [0.0]
        for name in self.STAGES:
            if hasattr(bsseval, name):
                setattr(bsseval, name, self._wrap(name, getattr(bsseval, name)))

    def _wrap(self, name: str, func: tp.Callable) -> tp.Callable:
        def timed_stage(*args, **kwargs):
            if not self.enabled:
                return func(*args, **kwargs)
            stage = name + "_own" if name == "_solve" and args[0].dim() > 2 else name  # the batched own systems
            self._children.append(0.0)
            begin = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - begin
                self.seconds[stage] += elapsed - self._children.pop()
                self._children[-1] += elapsed
        return timed_stage

    def report(self, runs: int) -> None:
        total = sum(self.seconds.values())
        print(f"stages of 'torch cpu' (s per track, exclusive; {total / runs:.3f} s in all):")
        for name, label in self.STAGES.items():
            print(f"  {label:<28} {self.seconds[name] / runs:>8.3f}  {100 * self.seconds[name] / total:>5.1f} %")


def nanmedian(values: np.ndarray) -> np.ndarray:
    return np.array([np.median(row[~np.isnan(row)]) if (~np.isnan(row)).any() else np.nan for row in values])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--no-museval", action="store_true", help="time the torch backend only")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="time each stage of the CPU computation")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    museval = None if args.no_museval else import_reference("museval")
    cuda = torch.cuda.is_available()
    print(f"{args.tracks} tracks x {len(TOY_SOURCES)} sources x {args.seconds:g} s stereo at {RATE} Hz; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", CUDA {torch.cuda.get_device_name()}" if cuda else ", no CUDA"))
    if cuda:  # warm-up: CUDA context, cuFFT plans and cuSOLVER handles
        warm_refs, warm_ests = make_track(10_000, 2.0, True)
        bss_eval_v4(warm_refs.cuda(), warm_ests.cuda(), RATE, RATE)
        torch.cuda.synchronize()
    profiler = StageTimer() if args.profile else None
    for variant, noise_floor in (("noise floor", True), ("band-limited", False)):
        times: tp.Dict[str, tp.List[float]] = {"museval": [], "torch cpu": [], "torch cpu sdr_only": [],
                                               "torch cuda": []}
        diffs: tp.Dict[str, tp.List[float]] = {"torch cpu - museval": [0.0] * 4, "torch cuda - torch cpu": [0.0] * 4,
                                               "museval - museval(x(1+1e-12))": [0.0] * 4}
        print(f"\n== {variant} ==")
        for track in range(args.tracks):
            references, estimates = make_track(track, args.seconds, noise_floor)
            if profiler is not None:
                profiler.enabled = True
            ours, elapsed = timed(lambda: bsseval.bss_eval_v4(references, estimates, RATE, RATE))
            times["torch cpu"].append(elapsed)
            if profiler is not None:
                profiler.enabled = False
            mine = [ours[metric].numpy() for metric in METRICS]
            _, elapsed = timed(lambda: bss_eval_v4(references, estimates, RATE, RATE, sdr_only=True))
            times["torch cpu sdr_only"].append(elapsed)
            if cuda:
                on_gpu, elapsed = timed(lambda: bss_eval_v4(references.cuda(), estimates.cuda(), RATE, RATE), sync=True)
                times["torch cuda"].append(elapsed)
                gpu = [on_gpu[metric].cpu().numpy() for metric in METRICS]
                diffs["torch cuda - torch cpu"] = np.maximum(diffs["torch cuda - torch cpu"],
                                                             frame_difference(gpu, mine))
            if museval is not None:
                refs_np, ests_np = references.transpose(1, 2).numpy(), estimates.transpose(1, 2).numpy()
                reference, elapsed = timed(lambda: museval.evaluate(refs_np, ests_np, win=RATE, hop=RATE))
                times["museval"].append(elapsed)
                diffs["torch cpu - museval"] = np.maximum(diffs["torch cpu - museval"],
                                                          frame_difference(mine, reference))
                if track == 0:
                    scale = 1 + 1e-12
                    rescaled = museval.evaluate(refs_np * scale, ests_np * scale, win=RATE, hop=RATE)
                    diffs["museval - museval(x(1+1e-12))"] = frame_difference(reference, rescaled)
            print(f"track {track}: median SDR per source " + ", ".join(
                f"{name} {value:.2f}" for name, value in zip(TOY_SOURCES, nanmedian(mine[0]))) + " dB")
        print(f"{'backend':<20} {'s per track':>12} {'speed-up vs museval':>20}")
        base = np.mean(times["museval"]) if times["museval"] else None
        for name, values in times.items():
            if values:
                speedup = f"{base / np.mean(values):.1f}x" if base else "-"
                print(f"{name:<20} {np.mean(values):>12.3f} {speedup:>20}")
        if profiler is not None:
            profiler.report(args.tracks)
            profiler.seconds = dict.fromkeys(profiler.seconds, 0.0)
        print("largest |difference| in dB over frames (inf: NaN/inf frames differ):")
        for name, values in diffs.items():
            if (name != "torch cuda - torch cpu" or cuda) and (museval is not None or "museval" not in name):
                print(f"  {name:<32} " + "  ".join(f"{metric.upper()} {value:.2e}"
                                                     for metric, value in zip(METRICS, values)))

if __name__ == "__main__":
    main()
