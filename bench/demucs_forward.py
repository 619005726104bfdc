"""Forward time of demixlab's Hybrid Demucs models against PyPI demucs 4.1.0, side by side.

    python bench/demucs_forward.py [--seconds 10] [--runs 3] [--models hdemucs,htdemucs,htdemucs_defaults]

Each model is built once by the reference package (random weights), its state dict is loaded
into demixlab's model, and both separate the same stereo input in eval mode under no_grad,
alternately (so that both see the same machine load): one warm-up call each, then `--runs`
timed calls; the table shows the median time of each and the largest output difference.

Models: `hdemucs` (HDemucs class defaults, conf/model/hdemucs.yaml), `htdemucs` (the released
configuration of conf/model/htdemucs.yaml, segment = the input length), `htdemucs_defaults`
(HTDemucs class defaults). The reference is a test oracle only (install: see tests/).
"""
import argparse
import statistics
import time
import typing as tp

import torch

from demixlab.training.allocator import tune_cpu_runtime
from demixlab.models.demucs.hdemucs import HDemucs
from demixlab.models.demucs.htdemucs import HTDemucs

SOURCES = ["drums", "bass", "other", "vocals"]
RATE = 44100


def import_reference(name: str) -> tp.Any:
    """The reference module (tests/references.py stubs torchaudio the same way)."""
    import importlib
    import sys
    import types

    try:
        importlib.import_module("torchaudio")
    except Exception:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    return importlib.import_module(name)


def build(name: str, seconds: float) -> tp.Tuple[torch.nn.Module, torch.nn.Module]:
    """(reference, demixlab) models with the same weights, in eval mode."""
    if name == "hdemucs":
        reference = import_reference("demucs.hdemucs").HDemucs(SOURCES)
        ours: torch.nn.Module = HDemucs(SOURCES)
    else:
        options: tp.Dict[str, tp.Any] = {"segment": seconds}
        if name == "htdemucs":
            options.update(bottom_channels=512, dconv_mode=3, t_dropout=0.02)
        reference = import_reference("demucs.htdemucs").HTDemucs(SOURCES, **options)
        ours = HTDemucs(SOURCES, **options)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), ours.eval()


def timed(model: torch.nn.Module, mixture: torch.Tensor) -> tp.Tuple[float, torch.Tensor]:
    begin = time.perf_counter()
    out = model(mixture)
    return time.perf_counter() - begin, out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", default="hdemucs,htdemucs")
    args = parser.parse_args()
    tune_cpu_runtime()
    torch.manual_seed(0)
    mixture = 0.3 * torch.randn(args.batch, 2, int(args.seconds * RATE))
    print(f"batch {args.batch} x {args.seconds:g} s stereo at {RATE} Hz, {torch.get_num_threads()} threads, "
          f"median of {args.runs} runs after one warm-up, eval, no_grad")
    header = f"{'model':<18} {'params':>8} {'reference s':>12} {'demixlab s':>11} {'ratio':>6} {'max abs diff':>13}"
    rows = []
    for name in args.models.split(","):
        reference, ours = build(name, args.seconds)
        params = sum(p.numel() for p in ours.parameters())
        timed(reference, mixture)
        timed(ours, mixture)
        times: tp.Dict[str, tp.List[float]] = {"reference": [], "demixlab": []}
        difference = 0.0
        for _ in range(args.runs):
            elapsed, expected = timed(reference, mixture)
            times["reference"].append(elapsed)
            elapsed, got = timed(ours, mixture)
            times["demixlab"].append(elapsed)
            difference = max(difference, float((got - expected).abs().max()))
        ref_time, our_time = (statistics.median(times[key]) for key in ("reference", "demixlab"))
        rows.append(f"{name:<18} {params / 1e6:>7.2f}M {ref_time:>12.2f} {our_time:>11.2f} "
                    f"{our_time / ref_time:>6.2f} {difference:>13.2e}")
        print(f"{name}: reference {['%.2f' % t for t in times['reference']]}, "
              f"demixlab {['%.2f' % t for t in times['demixlab']]}", flush=True)
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
