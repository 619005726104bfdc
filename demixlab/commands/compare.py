"""`demixlab compare`: XPs side by side, as Markdown, CSV and a PNG.

    demixlab compare SIG [SIG ...] [--sort COLUMN] [-o DIR] [--dora-dir DIR]
    demixlab compare --grid NAME [--sort COLUMN] [-o DIR]

Run from the directory `dora run` ran in (XPs are looked up under its `outputs/xps/`), and for
`--grid` from the repository root, where the grids live. Each XP's configuration and overrides
are composed from its `.argv.json` by Dora; the rest is read by :mod:`demixlab.training.compare`.
The Markdown is printed and written with the CSV and the PNG to `DIR` (default:
`outputs/compare/<grid name or signatures>/`).
"""
import argparse
import logging
import sys
import typing as tp
from pathlib import Path

from ..errors import DemixError, exit_on_user_error
from ..experiment import default_dora_dir, parse_signature
from ..training.compare import Experiment, compare, read_experiment
from ..training.export import find_xp_folder
from .grid_local import collect_grid, dora_main

HELP = "compare XPs (signatures or a grid's) side by side: Markdown and CSV tables, a PNG"


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab compare`."""
    parser = parser or argparse.ArgumentParser(prog="demixlab compare", description=HELP)
    parser.add_argument("signatures", nargs="*", metavar="SIG", help="experiment signatures")
    parser.add_argument("--grid", metavar="NAME", help="compare the XPs of this grid (grids/NAME.py) instead")
    parser.add_argument("--sort", default="test.global.mean", metavar="COLUMN",
                        help="sort each test set's XPs by this column, best first (default: test.global.mean; "
                             "e.g. valid.global.mean, test.museval.vocals, params, sec_per_epoch)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="folder for compare.md, compare.csv and compare.png (default: "
                             "DORA_DIR/compare/<grid name or signatures>)")
    parser.add_argument("--dora-dir", type=Path, default=None,
                        help="Dora's output folder holding xps/ (default: dora.dir of the config, i.e. outputs/ "
                             "under the current directory)")
    return parser


def _experiments(args: argparse.Namespace, dora_dir: Path) -> tp.List[Experiment]:
    main = dora_main()
    previous, main.dora.dir = main.dora.dir, dora_dir.resolve()
    try:
        return _read(args, dora_dir, main)
    finally:
        main.dora.dir = previous


def _read(args: argparse.Namespace, dora_dir: Path, main: tp.Any) -> tp.List[Experiment]:
    if args.grid:
        xps = [sheep.xp for sheep, _ in collect_grid(args.grid)]
        if not xps:
            raise DemixError(f"grid {args.grid!r} has no XP")
    else:
        xps = []
        for value in args.signatures:
            signature = parse_signature(value, "SIG")
            folder = find_xp_folder(signature, dora_dir)
            if not (folder / ".argv.json").is_file():
                raise DemixError(f"experiment {signature}: {folder / '.argv.json'} is missing (the overrides of the "
                                 "signature); was the folder made by Dora?")
            xps.append(main.get_xp_from_sig(signature))
    return [read_experiment(xp.sig, Path(xp.folder), xp.cfg, xp.delta) for xp in xps]


def run(args: argparse.Namespace) -> None:
    """Compare the XPs, print the Markdown and write the files."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if bool(args.grid) == bool(args.signatures):
        raise DemixError("give either signatures or --grid NAME")
    dora_dir = args.dora_dir if args.dora_dir is not None else default_dora_dir()
    comparison = compare(_experiments(args, dora_dir), sort=args.sort)
    warning = comparison.warning()
    if warning:
        print(f"demixlab: warning: {warning}", file=sys.stderr, flush=True)
    out = args.out
    if out is None:
        name = f"grid_{args.grid}" if args.grid else "-".join(sorted(xp.signature for xp in comparison.experiments))
        out = dora_dir / "compare" / (name if len(name) <= 80 else name[:71] + f"-and-{len(comparison.experiments) - 8}")
    paths = comparison.write(out)
    print(comparison.markdown())
    print(f"written: {', '.join(str(path) for path in paths)}", file=sys.stderr)


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab compare` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
