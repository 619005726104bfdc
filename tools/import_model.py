"""Import weights trained by another implementation into a demixlab model repository.

    python -m tools.import_model openunmix path/to/umx_folder -o release_models -n umxhq
    python -m tools.import_model openunmix vocals.pth drums.pth ... -o REPO -n NAME
    python -m tools.import_model demucs path/to/955717e8-8726e21a.th -o REPO -n htdemucs
    python -m tools.import_model xumx_slicq path/to/xumx_slicq_v2.pth -o REPO -n slicq

The result is the model file REPO/NAME.th (the origin is recorded in it), which `demixlab
separate --repo REPO -n NAME` and `python -m tools.test_pretrained --repo REPO -n NAME` use.
See :mod:`demixlab.importers` for what each format must contain. Demucs packages are read
without importing demucs and without running anything from the file.
"""
import argparse
import typing as tp
from pathlib import Path

from demixlab.errors import exit_on_user_error
from demixlab.importers import IMPORTERS, import_model, save_imported


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(prog="python -m tools.import_model", description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=sorted(IMPORTERS), help="the implementation that wrote the weights")
    parser.add_argument("sources", nargs="+", type=Path,
                        help="openunmix: TARGET.pth files or folders of them; demucs, xumx_slicq: one file")
    parser.add_argument("-o", "--repo", type=Path, required=True, help="the model repository folder (created)")
    parser.add_argument("-n", "--name", required=True, help="name of the model in the repository (REPO/NAME.th)")
    parser.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    parser.add_argument("--force", action="store_true", help="replace REPO/NAME.th if it exists")
    return parser


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """Convert, check (the model is built and the weights loaded) and save."""
    args = build_parser().parse_args(argv)
    imported = import_model(args.format, args.sources)
    path = save_imported(imported, args.repo, args.name, half=args.half, overwrite=args.force)
    params = sum(value.numel() for value in imported.state.values())
    print(f"{path}: {imported.family} model, sources {', '.join(imported.sources)}, {imported.samplerate} Hz, "
          f"{imported.audio_channels} channel(s), {params / 1e6:.2f} M weights")


if __name__ == "__main__":
    main()
