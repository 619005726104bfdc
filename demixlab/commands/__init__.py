"""The `demixlab` command: one subcommand per verb, each module parsing its arguments and wiring
the stages together (no library logic lives here).

    demixlab separate | export | import | evaluate | blend | plot-slicqt | grid-local | compare | search
             | automix  [--help]

Training itself runs through Dora (`dora run`, `dora grid`). Each module also has a `main(argv)`
for running it alone (the `tools.X` shims use them). The top layer: it may import any stage.
"""
import argparse
import importlib
import sys
import typing as tp

from .. import __version__
from ..errors import exit_on_user_error
from ..training.allocator import enlarge_kernel_cache

# subcommand -> module of this package
COMMANDS = {
    "separate": "separate",
    "export": "export",
    "import": "import_model",
    "evaluate": "evaluate",
    "blend": "blend",
    "plot-slicqt": "plot_slicqt",
    "grid-local": "grid_local",
    "compare": "compare",
    "search": "search",
    "automix": "automix",
}


def build_parser() -> argparse.ArgumentParser:
    """The `demixlab` parser with every subcommand's options."""
    parser = argparse.ArgumentParser(
        prog="demixlab", description="demixlab: train (with `dora run`), search, compare, export, import, evaluate, "
                                     "blend and run music source separation models, and make automix datasets.")
    parser.add_argument("--version", action="version", version=f"demixlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"{__name__}.{module_name}")
        module.build_parser(commands.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """The `demixlab` console script."""
    args = build_parser().parse_args(argv)
    enlarge_kernel_cache()
    module = importlib.import_module(f"{__name__}.{COMMANDS[args.command]}")
    module.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
