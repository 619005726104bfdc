"""`demixlab export SIG [SIG ...]`: write trained XPs as model files of a repository.

    demixlab export SIG [SIG ...] [-o release_models] [--sign] [--half] [--dora-dir DIR]

Run from the directory `dora run` ran in (XPs are looked up under its `outputs/xps/`, or under
`--dora-dir DIR/xps/`). Only the XP's checkpoint is read; see :mod:`demixlab.training.export`.
"""
import argparse
import logging
import sys
import typing as tp
from pathlib import Path

from ..errors import exit_on_user_error
from ..training.export import export

HELP = "export trained XPs as model files (SIG.th) of a repository"


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab export`."""
    parser = parser or argparse.ArgumentParser(prog="demixlab export", description=HELP)
    parser.add_argument("signatures", nargs="+", metavar="SIG", help="experiment signatures")
    parser.add_argument("-o", "--out", type=Path, default=Path("release_models"),
                        help="repository folder to write to (default: release_models)")
    parser.add_argument("--sign", action="store_true", help="name the file SIG-<sha256[:8]>.th")
    parser.add_argument("--half", action="store_true", help="store float16 weights")
    parser.add_argument("--dora-dir", type=Path, default=None,
                        help="Dora's output folder holding xps/ (default: dora.dir of the config, i.e. outputs/ "
                             "under the current directory)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Export every signature and print the paths written."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    for signature in args.signatures:
        print(export(signature, args.out, sign=args.sign, half=args.half, dora_dir=args.dora_dir))


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab export` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
