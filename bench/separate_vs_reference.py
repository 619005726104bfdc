"""Separation time and peak memory: demixlab against the reference implementations, side by side.

    python bench/separate_vs_reference.py [--seconds 60] [--models htdemucs,umx] [--repeats 3] [--threads 1]
                                          [--impls demixlab,demixlab-sequential]

The same random weights separate the same stereo track (`--seconds` long, 44.1 kHz):

- htdemucs: the released HTDemucs configuration (bottom_channels 512, dconv in encoder and
  decoder, 5 transformer layers, segment 7.8 s; about 42 M parameters) saved by demucs
  (`serialize_model` + `torch.save`), imported with `demixlab import demucs`. Reference:
  `demucs.apply.apply_model(split=True, overlap=0.25, shifts=0)`; demixlab: `demixlab.separation.Separator`
  (chunks of the model's segment, overlap 0.25; by default with 2+ threads the chunks run side by
  side, one intra-op thread each; `--jobs 1` one at a time on all threads).
- umx: four full-size Open-Unmix targets (umxhq architecture) saved as Open-Unmix's training
  script does, imported with `demixlab import openunmix`. Reference: openunmix `Separator`
  (niter=1, whole track); demixlab: the same whole track (`split=False`) and its default
  (30 s chunks).
- the batched configuration (`--batch-chunks`): htdemucs with every chunk of the track in one
  forward pass; umx in 7.5 s chunks, 4 per pass (a different chunking: its difference to the
  reference is that of shorter LSTM contexts, not of the batching).

With `--repeats N` the rows run in N interleaved rounds (reference, ours, reference, ...) and
the median time is printed (the machine may be shared: medians of interleaved runs, and the
process CPU time next to the wall time).

Every run happens in a fresh process: the time is the separation call alone (model loaded,
audio read), the memory is that process's peak resident set (VmHWM), next to its resident set
just before separating. Outputs are compared with the reference's (largest difference relative
to the reference's peak; for htdemucs also before the track's last 0.75 segment, where
apply_model blends extra chunks shorter than the segment and demixlab does not). The reference
packages are test oracles (install: see tests/).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SOURCES = ["drums", "bass", "other", "vocals"]
RATE = 44100
HTDEMUCS_RELEASED = dict(bottom_channels=512, dconv_mode=3, segment=Fraction(39, 5))
# The batched configuration of each model (Separator options).
BATCHED: tp.Dict[str, tp.Dict[str, tp.Any]] = {"htdemucs": dict(batch_chunks=16),
                                               "umx": dict(segment=7.5, batch_chunks=4)}


def _memory_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------------------- setup
def prepare(folder: Path, seconds: float, models: tp.Sequence[str]) -> None:
    """Write the track, the reference files (random weights, fixed seeds) and the imported models."""
    import soundfile as sf
    import torch
    from omegaconf import OmegaConf

    from demixlab.models.demucs.importer import import_demucs
    from demixlab.models.openunmix.importer import import_openunmix
    from demixlab.release.importing import save_imported
    from tests.references import import_reference

    generator = torch.Generator().manual_seed(0)
    track = 0.2 * torch.randn(2, int(seconds * RATE), generator=generator)
    sf.write(str(folder / "track.wav"), track.T.numpy(), RATE, subtype="FLOAT")
    repo = folder / "repo"
    if "htdemucs" in models:
        htdemucs = import_reference("demucs.htdemucs")
        states = import_reference("demucs.states")
        torch.manual_seed(1)
        model = htdemucs.HTDemucs(SOURCES, **HTDEMUCS_RELEASED)
        torch.save(states.serialize_model(model, OmegaConf.create({}), half=True), folder / "htdemucs.th")
        save_imported(import_demucs(folder / "htdemucs.th"), repo, "htdemucs")
    if "umx" in models:
        openunmix = import_reference("openunmix.model")
        umx_folder = folder / "umx"
        umx_folder.mkdir()
        torch.manual_seed(2)
        for target in SOURCES:
            net = openunmix.OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=512, max_bin=1487)
            with torch.no_grad():  # the reference starts with identity statistics: make the masks vary
                net.input_scale.uniform_(0.5, 2.0)
                net.output_mean.uniform_(0.5, 1.5)
            torch.save(net.state_dict(), umx_folder / f"{target}.pth")
            args = {"nfft": 4096, "nhop": 1024, "hidden_size": 512, "nb_channels": 2, "bandwidth": 16000}
            (umx_folder / f"{target}.json").write_text(json.dumps({"args": args}))
        (umx_folder / "separator.json").write_text(json.dumps({"nfft": 4096, "nhop": 1024, "sample_rate": RATE,
                                                               "nb_channels": 2}))
        save_imported(import_openunmix([umx_folder]), repo, "umx")


# -------------------------------------------------------------------------------------- workers
def work(folder: Path, model: str, impl: str) -> tp.Dict[str, tp.Any]:
    """One timed separation in this process; the estimates go to FOLDER/out_MODEL_IMPL.npy."""
    import numpy as np
    import soundfile as sf
    import torch

    data, _ = sf.read(str(folder / "track.wav"), dtype="float32", always_2d=True)
    mixture = torch.from_numpy(data.T.copy())
    if impl == "reference" and model == "htdemucs":
        from tests.references import import_reference

        apply = import_reference("demucs.apply")
        net = import_reference("demucs.states").load_model(str(folder / "htdemucs.th")).eval()  # our own file

        def run() -> torch.Tensor:
            return apply.apply_model(net, mixture[None], shifts=0, split=True, overlap=0.25)[0]
    elif impl == "reference" and model == "umx":
        from tests.references import import_reference

        separator = import_reference("openunmix.utils").load_separator(
            str(folder / "umx"), targets=SOURCES, niter=1, pretrained=True).eval()

        def run() -> torch.Tensor:
            with torch.no_grad():
                return separator(mixture[None])[0]
    else:
        from demixlab.separation import Separator

        options: tp.Dict[str, tp.Any] = {}
        if impl == "demixlab-batch":
            options = BATCHED[model]
        if impl == "demixlab-sequential":
            options = dict(jobs=1)
        ours = Separator(folder / "repo", model, device="cpu", split=impl != "demixlab-nosplit", **options)

        def run() -> torch.Tensor:
            stems = ours.separate_tensor(mixture, RATE)
            return torch.stack([stems[source] for source in SOURCES])
    rss_before = _memory_mb("VmRSS")
    cpu_begin = time.process_time()
    begin = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - begin
    cpu = time.process_time() - cpu_begin
    peak = _memory_mb("VmHWM")
    np.save(folder / f"out_{model}_{impl}.npy", out.float().numpy())
    return {"model": model, "impl": impl, "seconds": elapsed, "cpu_seconds": cpu, "rss_before_mb": rss_before,
            "peak_rss_mb": peak}


def _run_worker(folder: Path, model: str, impl: str, threads: tp.Optional[int]) -> tp.Dict[str, tp.Any]:
    command = [sys.executable, __file__, "--worker", model, impl, "--folder", str(folder)]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{model}/{impl} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _relative_difference(folder: Path, model: str, impl: str, end: tp.Optional[int] = None) -> float:
    """Largest |ours - reference| over the reference's peak, on samples [0, end)."""
    import numpy as np

    reference = np.load(folder / f"out_{model}_reference.npy")[..., :end]
    ours = np.load(folder / f"out_{model}_{impl}.npy")[..., :end]
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _demucs_tail_start(length: int, segment: int, overlap: float = 0.25) -> int:
    """Where apply_model starts blending its extra chunks that are shorter than the segment
    (demixlab's last chunk ends at the track's end instead): the outputs agree before it."""
    stride = int((1 - overlap) * segment)
    return next(offset for offset in range(0, length, stride) if offset + segment > length)


def main() -> None:
    """Prepare the files, run every (model, implementation) in its own process, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--models", default="htdemucs,umx")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the median time is printed")
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the workers (default: torch's)")
    parser.add_argument("--impls", default=None,
                        help="comma-separated implementations to run besides the reference (default: all): "
                             "demixlab, demixlab-sequential, demixlab-batch, demixlab-nosplit")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(args.folder, *args.worker)))
        return
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    import torch

    with tempfile.TemporaryDirectory(prefix="demixlab-bench-") as tmp:
        folder = Path(tmp)
        prepare(folder, args.seconds, models)
        threads = args.threads or torch.get_num_threads()
        print(f"{args.seconds:g} s stereo track at {RATE} Hz, CPU, torch {torch.__version__}, {threads} threads, "
              f"load average {os.getloadavg()[0]:.1f} at start, median of {args.repeats} interleaved run(s)")
        print(f"{'model':9} {'implementation':36} {'time [s]':>9} {'CPU [s]':>8} {'x ref':>6} {'RSS before [MB]':>16} "
              f"{'peak RSS [MB]':>14} {'max rel. diff':>14} {'(before tail)':>14}")
        plans = {"htdemucs": [("reference", "demucs apply_model split, ov 0.25"),
                              ("demixlab", "demixlab Separator split, ov 0.25"),
                              ("demixlab-sequential", "demixlab --jobs 1 (one chunk at a time)"),
                              ("demixlab-batch", "demixlab --batch-chunks 16")],
                 "umx": [("reference", "openunmix Separator niter=1"),
                         ("demixlab-nosplit", "demixlab Separator --no-split"),
                         ("demixlab", "demixlab Separator (30 s chunks)"),
                         ("demixlab-batch", "demixlab --segment 7.5 --batch-chunks 4")]}
        if args.impls:
            chosen = {"reference", *(name.strip() for name in args.impls.split(","))}
            plans = {model: [(impl, label) for impl, label in plan if impl in chosen] for model, plan in plans.items()}
        for model in models:
            rows: tp.Dict[str, tp.List[tp.Dict[str, tp.Any]]] = {impl: [] for impl, _ in plans[model]}
            for _ in range(args.repeats):  # interleaved: every implementation sees the same load
                for impl, _ in plans[model]:
                    rows[impl].append(_run_worker(folder, model, impl, args.threads))
            reference = statistics.median(row["seconds"] for row in rows["reference"])
            for impl, label in plans[model]:
                seconds = statistics.median(row["seconds"] for row in rows[impl])
                cpu = statistics.median(row["cpu_seconds"] for row in rows[impl])
                last = rows[impl][-1]
                diff = before_tail = "-"
                if impl != "reference":
                    diff = f"{_relative_difference(folder, model, impl):.2e}"
                if impl != "reference" and model == "htdemucs":
                    tail = _demucs_tail_start(int(args.seconds * RATE), int(HTDEMUCS_RELEASED["segment"] * RATE))
                    before_tail = f"{_relative_difference(folder, model, impl, tail):.2e}"
                print(f"{model:9} {label:36} {seconds:9.2f} {cpu:8.2f} {seconds / reference:6.2f} "
                      f"{last['rss_before_mb']:16.0f} {last['peak_rss_mb']:14.0f} {diff:>14} {before_tail:>14}",
                      flush=True)

if __name__ == "__main__":
    main()
