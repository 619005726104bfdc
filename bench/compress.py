"""Smaller models and other runtimes, per family: file size, separation time in PyTorch and in
onnxruntime (same machine, same input), and the SDR change against the float32 model, in one table.

    python bench/compress.py [--families umx xumx ...] [--tracks 3] [--seconds 6] [--prune 0.3]
    python bench/compress.py --models TRAINED.th ... [--tracks 3] [--seconds 60]

Every family gets a small model with random weights (scaled like trained ones; no weights can be
downloaded here), written as a model file, or `--models` gives trained model files (`demixlab
export SIG`, e.g. of the README's main job), then compressed with `demixlab export FILE.th`:

- float32: the model file and its ONNX export (`--onnx`);
- half: float16 weights (`--half --onnx`): the file and the ONNX graph halve, compute stays float32;
- pruneNN: global magnitude pruning of NN % of the weights (`--prune`), torch and ONNX;
- int8: dynamic int8 quantisation of the ONNX graph's MatMul/Gemm/LSTM weights (`--quantize int8`).

Each variant separates the toy test set (`--tracks` generated toy songs of `--seconds` s) with
`Separator` in PyTorch and with `--backend onnxruntime`. Columns: model file and ONNX sizes (kB),
seconds to separate the whole test set in each runtime, the SDR change against the float32
PyTorch model (mean over tracks and sources of the MDX global SDR against the true stems), and
the fidelity: the SDR of the variant's stems against the float32 model's (how much the output
moved; float rounding gives ~100+ dB). With random weights the SDRs themselves are meaningless;
the changes measure what compression does to the output, not to a trained model's quality. With
`--models`, the float32 model's own SDR is printed above its rows and dSDR is the quality change;
`--seconds 60` or more makes the test songs long.

`--diffq PENALTY [...]` trains small UMX XPs on the toy dataset (`dora run`, the toy schedule, in a
temporary folder), one plain and one with DiffQ per penalty (`quant.diffq=PENALTY`, bits learning
rate `quant.lr=0.05`), exports them (`demixlab export SIG`: the DiffQ ones as integer levels) and
prints a second table on the same test set: the plain model, each DiffQ model's float weights
(trained with the noise, not rounded) and its quantised file, with the file size, the SDR change
against the plain model and the fidelity against the DiffQ model's float weights (what rounding
to the learned bits alone changes); `--seeds S [...]` repeats every XP per seed. `--families` with
no name skips the first table.
"""
import argparse
import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")  # as `demixlab` commands (before torch runs)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demixlab.commands import main as cli  # noqa: E402
from demixlab.data.toy import TOY_SOURCES, synthesize_track  # noqa: E402
from demixlab.models import family_names, get_family  # noqa: E402
from demixlab.release.model_file import load_package, package_model, save_package  # noqa: E402
from demixlab.separation import Separator  # noqa: E402

RATE = 44100
SOURCES = list(TOY_SOURCES)
OPTIONS = {
    "umx": dict(hidden_size=128, nb_layers=2, wiener_iterations=1),
    "xumx": dict(hidden_size=128, nb_layers=2, wiener_iterations=1),
    "slicq_cdae": dict(fbins=24, hidden_1=12, hidden_2=12),
    "hdemucs": dict(channels=16, nfft=1024, depth=4, segment=2.0),
    "htdemucs": dict(channels=16, nfft=1024, depth=3, bottom_channels=32, t_layers=1, t_heads=4, segment=2.0),
    "bs_roformer": dict(dim=32, depth=1, heads=2, dim_head=16, segment=2.0),
    "mel_roformer": dict(dim=32, depth=1, heads=2, dim_head=16, segment=2.0),
}


def global_sdr(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """MDX's SDR of one stem: 10 log10(|ref|^2 / |ref - est|^2) with a small epsilon."""
    signal = float(reference.double().square().sum()) + 1e-8
    noise = float((reference.double() - estimate.double()).square().sum()) + 1e-8
    return 10 * torch.log10(torch.tensor(signal / noise)).item()


def quiet(*argv: str) -> None:
    """Run a `demixlab` command without its printing."""
    with contextlib.redirect_stdout(io.StringIO()):
        cli(list(argv))


def separate_all(repo: Path, name: str, backend: str, tracks: tp.Sequence[torch.Tensor]
                 ) -> tp.Tuple[float, tp.List[tp.Dict[str, torch.Tensor]]]:
    """(seconds, stems per track) of one model in one runtime on every track (model loading excluded)."""
    separator = Separator(repo, name, device="cpu", backend=backend)
    separator.separate_tensor(tracks[0][:, :RATE], RATE)  # warm-up: kernels and caches
    begin = time.time()
    stems = [separator.separate_tensor(track, RATE) for track in tracks]
    return time.time() - begin, stems


def mean_fidelity(outputs: tp.Sequence[tp.Dict[str, torch.Tensor]], baseline: tp.Sequence[tp.Dict[str, torch.Tensor]]
                  ) -> float:
    """The mean over tracks and sources of the SDR of `outputs` against `baseline`'s stems."""
    return sum(global_sdr(stems[source], base[source]) for stems, base in zip(outputs, baseline)
               for source in SOURCES) / (len(SOURCES) * len(outputs))


DIFFQ_BITS_LR = 0.05  # the bits move in the toy schedule's 144 steps (optim.lr, 1e-3, barely moves them)
DIFFQ_UMX = ["model=umx", "model.hidden_size=64", "model.nb_layers=2", "test.sdr=false", "misc.progress=false"]


def train_toy_umx(workdir: Path, penalty: tp.Optional[float], seed: int) -> tp.Tuple[Path, Path]:
    """Train a small UMX on the toy dataset (with DiffQ when `penalty` is not None) in `workdir`;
    return (its exported model file, a float32 export of the same best weights)."""
    from demixlab.files import load_torch, save_torch
    from demixlab.train import main as dora_main

    args = DIFFQ_UMX + [f"seed={seed}"] + (
        [f"quant.diffq={penalty}", f"quant.lr={DIFFQ_BITS_LR}"] if penalty is not None else [])
    workdir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "dora", "-P", "demixlab", "run", *args], cwd=workdir, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    dora_main.dora.dir = workdir / "outputs"
    signature = dora_main.get_xp(args).sig
    outputs = str(workdir / "outputs")
    quiet("export", signature, "-o", str(workdir / "repo"), "--dora-dir", outputs)
    checkpoint = workdir / "outputs" / "xps" / signature / "checkpoint.th"
    state = load_torch(checkpoint)
    save_torch({key: value for key, value in state.items() if key not in ("bits", "best_bits")}, checkpoint)
    quiet("export", signature, "-o", str(workdir / "float32"), "--dora-dir", outputs)
    return workdir / "repo" / f"{signature}.th", workdir / "float32" / f"{signature}.th"


def diffq_table(penalties: tp.Sequence[float], seeds: tp.Sequence[int], mixtures: tp.Sequence[torch.Tensor],
                references: tp.Sequence[torch.Tensor]) -> None:
    """Train, export and compare a plain and DiffQ small UMXs, one per penalty and seed (see the
    module docstring); dSDR is against the plain model of the first seed."""
    with tempfile.TemporaryDirectory(prefix="compress-diffq-") as folder:
        rows = {}
        for seed in seeds:
            tag = f" s{seed}" if len(seeds) > 1 else ""
            rows[f"plain{tag} float32"] = train_toy_umx(Path(folder) / f"plain{seed}", None, seed)[0]
            for penalty in penalties:
                quantized, noisy_float = train_toy_umx(Path(folder) / f"diffq{penalty:g}-{seed}", penalty, seed)
                rows.update({f"diffq {penalty:g}{tag} float": noisy_float, f"diffq {penalty:g}{tag} levels": quantized})
        print(f"\nsmall UMX trained on the toy dataset ({' '.join(DIFFQ_UMX[:3])}), with and without DiffQ:")
        print(f"{'model':>22} {'.th kB':>8} {'mean bits':>9} {'torch s':>8} {'SDR':>7} {'dSDR':>7} {'fidelity dB':>11}")
        outputs: tp.Dict[str, tp.List[tp.Dict[str, torch.Tensor]]] = {}
        base_sdr: tp.Optional[float] = None
        for row, path in rows.items():
            seconds, outputs[row] = separate_all(path.parent, path.stem, "torch", mixtures)
            sdr = sum(global_sdr(stems[source], reference[index]) for stems, reference in zip(outputs[row], references)
                      for index, source in enumerate(SOURCES)) / (len(SOURCES) * len(references))
            base_sdr = sdr if base_sdr is None else base_sdr
            diffq = (load_package(path)["origin"] or {}).get("diffq")
            bits = f"{diffq['mean_bits']:9.2f}" if diffq else f"{'32':>9}"
            fidelity = f"{mean_fidelity(outputs[row], outputs[row.replace('levels', 'float')]):.1f}" \
                if row.endswith("levels") else "-"
            print(f"{row:>22} {path.stat().st_size / 1e3:8.0f} {bits} {seconds:8.2f} {sdr:7.3f} {sdr - base_sdr:+7.3f} "
                  f"{fidelity:>11}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=family_names(), choices=family_names(),
                        help="families of the random-weight table (none: skip it)")
    parser.add_argument("--tracks", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--prune", type=float, default=0.3)
    parser.add_argument("--models", nargs="+", type=Path, default=[],
                        help="trained model files (44.1 kHz, drums/bass/other/vocals) instead of random weights")
    parser.add_argument("--diffq", type=float, nargs="+", default=None, metavar="PENALTY",
                        help="also train a small UMX on the toy dataset without and with quant.diffq=PENALTY and "
                             "compare them (see the docstring); with `--families` and no name, only that")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="--diffq: the XPs' seeds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # the quantiser's INFO lines
    references = []  # (4, 2, T) per track, in TOY_SOURCES order
    for index in range(args.tracks):
        stems = synthesize_track(1000 + index, args.seconds, RATE)
        references.append(torch.stack([torch.from_numpy(stems[source]) for source in SOURCES]).float())
    mixtures = [reference.sum(dim=0) for reference in references]
    prune_name = f"prune{round(100 * args.prune)}"
    print(f"toy test set: {args.tracks} x {args.seconds:g} s stereo 44.1 kHz; {torch.get_num_threads()} threads; "
          + ("trained models" if args.models else "random weights (see the docstring)"))
    if args.diffq is not None:
        diffq_table(args.diffq, args.seeds, mixtures, references)
        if not args.families and not args.models:
            return
        print()
    header = (f"{'family':>12} {'variant':>9} {'params':>8} {'.th kB':>8} {'.onnx kB':>9} {'torch s':>8} "
              f"{'ORT s':>7} {'dSDR torch':>10} {'dSDR ORT':>9} {'fidelity dB':>11}")
    print(header)
    for family, trained in [(name, None) for name in ([] if args.models else args.families)] + [
            (load_package(path)["family"], path) for path in args.models]:
        with tempfile.TemporaryDirectory(prefix="compress-") as folder:
            repo = Path(folder)
            if trained is None:
                torch.manual_seed(0)
                model = get_family(family).build_model(SOURCES, RATE, 2, OPTIONS[family])
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.add_(0.05 * torch.randn_like(parameter))
                params = sum(parameter.numel() for parameter in model.parameters())
                segment = OPTIONS[family].get("segment")
                save_package(package_model(family, OPTIONS[family], model.state_dict(), sources=SOURCES,
                                           samplerate=RATE, audio_channels=2, segment=segment), repo / "m.th")
            else:
                package = load_package(trained)
                if list(package["sources"]) != SOURCES or int(package["samplerate"]) != RATE:
                    sys.exit(f"{trained}: expected a {RATE} Hz model of {SOURCES} (the toy test set's sources)")
                params = sum(value.numel() for value in package["state"].values() if value.is_floating_point())
                shutil.copyfile(trained, repo / "m.th")
            quiet("export", str(repo / "m.th"), "--onnx")
            quiet("export", str(repo / "m.th"), "--half", "--onnx")
            quiet("export", str(repo / "m.th"), "--prune", str(args.prune), "--onnx")
            quiet("export", str(repo / "m.th"), "--quantize", "int8")
            variants = {"float32": "m", "half": "m-half", prune_name: f"m-{prune_name}", "int8": "m-int8"}
            baseline: tp.Optional[tp.List[tp.Dict[str, torch.Tensor]]] = None
            base_sdr = 0.0
            for variant, name in variants.items():
                row: tp.Dict[str, tp.Any] = {}
                results = {}
                for backend in (["onnxruntime"] if variant == "int8" else ["torch", "onnxruntime"]):
                    row[backend], results[backend] = separate_all(repo, name, backend, mixtures)
                sdrs = {backend: sum(global_sdr(stems[source], reference[index])
                                     for stems, reference in zip(outputs, references)
                                     for index, source in enumerate(SOURCES)) / (len(SOURCES) * len(references))
                        for backend, outputs in results.items()}
                if baseline is None:
                    baseline, base_sdr = results["torch"], sdrs["torch"]
                    if trained is not None:
                        print(f"{trained}: {family}, float32 SDR {base_sdr:.3f} dB (mean over tracks and sources)")
                compared = results.get("torch", results["onnxruntime"]) if variant != "float32" else results["onnxruntime"]
                fidelity = sum(global_sdr(stems[source], base[source]) for stems, base in zip(compared, baseline)
                               for source in SOURCES) / (len(SOURCES) * len(references))
                # int8 is a quantised ONNX graph only: its .th is the float32 file's copy
                th_size = f"{(repo / f'{name}.th').stat().st_size / 1e3:8.0f}" if variant != "int8" else f"{'-':>8}"
                onnx_size = (repo / f"{name}.onnx").stat().st_size / 1e3
                torch_time = f"{row['torch']:8.2f}" if "torch" in row else f"{'-':>8}"
                torch_sdr = f"{sdrs['torch'] - base_sdr:+10.3f}" if "torch" in sdrs else f"{'-':>10}"
                print(f"{family:>12} {variant:>9} {params / 1e6:7.2f}M {th_size} {onnx_size:9.0f} {torch_time} "
                      f"{row['onnxruntime']:7.2f} {torch_sdr} {sdrs['onnxruntime'] - base_sdr:+9.3f} "
                      f"{fidelity:11.1f}", flush=True)


if __name__ == "__main__":
    main()
