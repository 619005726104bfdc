"""`demixlab export SIG [SIG ...]`: write trained XPs as model files of a repository.

    demixlab export SIG [SIG ...] [-o release_models] [--sign] [--half] [--dora-dir DIR] [--onnx]
    demixlab export REPO/NAME.th [--onnx]          # an existing (e.g. imported) model file
    demixlab export REPO/NAME.th [--half] [--prune 0.3] [--quantize int8]   # a smaller copy, NAME-prune30-half-int8

Run from the directory `dora run` ran in (XPs are looked up under its `outputs/xps/`, or under
`--dora-dir DIR/xps/`). Only the XP's checkpoint is read; see :mod:`demixlab.training.export`.
`--onnx` also writes the model's network as `NAME.onnx` with its manifest `NAME.onnx.json`
(:mod:`demixlab.release.onnx_export`), for `demixlab separate --backend onnxruntime`; for a model
file they go next to it (or to `-o`). Compression (:mod:`demixlab.release.compression`): `--half`
stores float16 weights (in the ONNX graph too), `--prune F` zeroes the fraction F of smallest
weights, `--quantize int8` quantises the ONNX graph's MatMul/Gemm/LSTM weights (it implies
`--onnx`). On an experiment they apply to `SIG.th`; on a model file they write a copy named after
them (`NAME-prune30-half.th`), leaving the original as it is.
"""
import argparse
import logging
import sys
import typing as tp
from pathlib import Path

from ..errors import DemixError, exit_on_user_error
from ..release.model_file import load_package
from ..release.compression import write_variant
from ..release.onnx_export import export_onnx
from ..release.repository import MODEL_SUFFIX
from ..training.export import export

HELP = "export trained XPs as model files (SIG.th) of a repository"


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab export`."""
    parser = parser or argparse.ArgumentParser(prog="demixlab export", description=HELP)
    parser.add_argument("signatures", nargs="+", metavar="SIG", help="experiment signatures, or model files (.th)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="repository folder to write to (default: release_models; for a model file, its folder)")
    parser.add_argument("--sign", action="store_true", help="name the file SIG-<sha256[:8]>.th")
    parser.add_argument("--half", action="store_true", help="store float16 weights (model file and ONNX graph)")
    parser.add_argument("--prune", type=float, default=None, metavar="FRACTION",
                        help="zero the FRACTION (0-1) of smallest-magnitude weights, ranked across all layers")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8 weights for the MatMul/Gemm/LSTM nodes of the ONNX graph (implies --onnx)")
    parser.add_argument("--onnx", action="store_true",
                        help="also write the network as ONNX (NAME.onnx + NAME.onnx.json) for --backend onnxruntime")
    parser.add_argument("--dora-dir", type=Path, default=None,
                        help="Dora's output folder holding xps/ (default: dora.dir of the config, i.e. outputs/ "
                             "under the current directory)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Export every signature and print the paths written."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if args.prune is not None and not 0 < args.prune < 1:
        raise DemixError(f"--prune must be a fraction between 0 and 1, got {args.prune}")
    weights = "int8" if args.quantize else "float16" if args.half else "float32"
    for target in args.signatures:
        if target.endswith(MODEL_SUFFIX):
            if args.sign:
                raise DemixError(f"{target}: --sign applies to experiments, not to model files")
            path = Path(target)
            load_package(path)  # a readable model file, before anything is written
            if args.half or args.prune or args.quantize:
                path = write_variant(path, args.out, half=args.half, prune=args.prune, quantize=args.quantize)
                print(path)
        else:
            path = export(target, args.out or Path("release_models"), sign=args.sign, half=args.half,
                          prune=args.prune, dora_dir=args.dora_dir)
            print(path)
        if args.onnx or args.quantize:
            out = path.parent if args.out is None or not target.endswith(MODEL_SUFFIX) else args.out
            print(export_onnx(load_package(path), path, out=out, weights=weights).with_suffix(""))


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab export` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
