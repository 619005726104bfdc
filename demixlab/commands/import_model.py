"""`demixlab import FORMAT PATH... -o REPO -n NAME`: import weights trained by another implementation.

    demixlab import openunmix path/to/umx_folder -o release_models -n umxhq
    demixlab import openunmix vocals.pth drums.pth ... -o REPO -n NAME
    demixlab import demucs path/to/955717e8-8726e21a.th -o REPO -n htdemucs
    demixlab import xumx_slicq path/to/xumx_slicq_v2.pth -o REPO -n slicq
    demixlab import msst model.ckpt --config config.yaml -o REPO -n vocals [--complement]

The result is the model file REPO/NAME.th (the origin is recorded in it), which `demixlab
separate --repo REPO -n NAME` and `demixlab evaluate --repo REPO -n NAME` use. The formats are
those the model families register (see each family's importer for what a format must contain).
Demucs packages are read without importing demucs and without running anything from the file.
"""
import argparse
import typing as tp
from pathlib import Path

from ..errors import exit_on_user_error
from ..models import get_importer, import_formats
from ..release.importing import import_model, save_imported

HELP = "import weights trained by another implementation into a repository"


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab import`."""
    formats = "; ".join(f"{name}: {_summary(get_importer(name))}" for name in import_formats())
    parser = parser or argparse.ArgumentParser(prog="demixlab import", description=HELP)
    parser.add_argument("format", choices=import_formats(), help=f"the implementation that wrote the weights ({formats})")
    parser.add_argument("sources", nargs="+", type=Path, help="the files or folders the format reads")
    parser.add_argument("--config", type=Path, default=None,
                        help="the training configuration that goes with the weights (msst: the YAML)")
    parser.add_argument("--complement", action="store_true",
                        help="single-target models: also output the mixture minus the target, named "
                             "after the configuration's other instrument")
    parser.add_argument("-o", "--repo", type=Path, required=True, help="the model repository folder (created)")
    parser.add_argument("-n", "--name", required=True, help="name of the model in the repository (REPO/NAME.th)")
    parser.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    parser.add_argument("--force", action="store_true", help="replace REPO/NAME.th if it exists")
    return parser


def _summary(importer: tp.Callable) -> str:
    """The first line of an importer's docstring."""
    lines = (importer.__doc__ or "").strip().splitlines()
    return lines[0].rstrip(".") if lines else ""


def run(args: argparse.Namespace) -> None:
    """Convert, check (the model is built and the weights loaded) and save."""
    paths = list(args.sources) + ([args.config] if args.config else [])
    options = {"complement": True} if args.complement else {}
    imported = import_model(args.format, paths, **options)
    path = save_imported(imported, args.repo, args.name, half=args.half, overwrite=args.force)
    params = sum(value.numel() for value in imported.state.values())
    print(f"{path}: {imported.family} model, sources {', '.join(imported.sources)}, {imported.samplerate} Hz, "
          f"{imported.audio_channels} channel(s), {params / 1e6:.2f} M weights")


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab import` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
