"""`demixlab blend REPO MODEL [MODEL ...] [overrides] -n BAG`: fit a bag's per-source weights on a
dataset's validation split and write the bag into the repository.

    demixlab blend release_models umx_sig hdemucs_sig -n blend                # the toy validation set
    demixlab blend REPO A B C dset=musdb18hq dset.root=/data/musdb18hq dset.valid_tracks=musdb -n best3
    demixlab blend REPO A B dset=folder dset.root=DIR 'dset.sources=[a,b]' -n ab --step 0.05 --force

The dataset comes from demixlab's configuration with the given overrides, as for `demixlab
evaluate` (`dset=...`); its validation split is the one training validates on. Every model
separates the validation tracks once (chunks of its model file's segment, or of `valid.segment`
seconds when that override is given, which the bag then records); the weights of each source
are searched on a grid of the simplex (`--step`) against the mean global SDR of the blend (see
:mod:`demixlab.evaluation.blend`). Writes REPO/BAG.yaml atomically and prints each model's and
the bag's validation SDR per source, and the weights.
"""
import argparse
import logging
import sys
import typing as tp
from pathlib import Path

from ..data import build_valid_split, resolve_cache_dir
from ..errors import DemixError, exit_on_user_error
from ..evaluation.blend import blend_statistics, fit_weights, format_blend_table
from ..release.repository import BAG_SUFFIX, MODEL_SUFFIX, Repository, make_bag, save_bag
from ..separation import bag_separator, resolve_device
from .evaluate import compose_config

logger = logging.getLogger(__name__)

HELP = "fit a bag's per-source weights on a dataset's validation split and write it into a repository"


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab blend`; positional key=value items are configuration overrides."""
    parser = parser or argparse.ArgumentParser(prog="demixlab blend", description=HELP)
    parser.add_argument("repo", type=Path, metavar="REPO", help="the model repository folder")
    parser.add_argument("items", nargs="+", metavar="MODEL",
                        help="model files of the repository (names), and configuration overrides such as dset=...")
    parser.add_argument("-n", "--name", required=True, help="name of the bag to write (REPO/NAME.yaml)")
    parser.add_argument("--step", type=float, default=0.1,
                        help="grid step of the weights, a fraction of 1 such as 0.1 (default), 0.05 or 0.25")
    parser.add_argument("--force", action="store_true", help="replace the bag NAME.yaml if it exists")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--no-split", action="store_true", help="separate whole tracks at once (more memory)")
    return parser


def grid_divisions(step: float) -> int:
    """The number of parts `--step` divides 1 into (a one-line error unless it divides 1 exactly)."""
    divisions = round(1 / step) if step > 0 else 0
    if not 0 < step <= 1 or abs(divisions * step - 1) > 1e-9:
        raise DemixError(f"--step {step:g}: expected a fraction that divides 1, such as 0.1, 0.05 or 0.25")
    return divisions


def run(args: argparse.Namespace) -> None:
    """Separate the validation tracks with every model, fit the weights, write and print the bag."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    overrides = [item for item in args.items if "=" in item]
    names = [item for item in args.items if "=" not in item]
    divisions = grid_divisions(args.step)
    if not names:
        raise DemixError("give at least one MODEL of the repository to blend")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DemixError(f"model {repeated[0]!r} is given twice")
    repository = Repository(args.repo)
    bag_path = args.repo / f"{args.name}{BAG_SUFFIX}"
    if (args.repo / f"{args.name}{MODEL_SUFFIX}").is_file() or args.name in names:
        raise DemixError(f"-n {args.name}: {args.repo / (args.name + MODEL_SUFFIX)} is a model file; "
                         "a bag of that name would hide it, choose another name")
    if bag_path.is_file() and not args.force:
        raise DemixError(f"-n {args.name}: the bag {bag_path} exists; pass --force to replace it")
    for name in names:
        if (args.repo / f"{name}{BAG_SUFFIX}").is_file():
            raise DemixError(f"MODEL {name!r}: {args.repo / (name + BAG_SUFFIX)} is a bag; blend model files")
    members = {name: repository.load(name) for name in names}
    bag = make_bag(args.name, [(name, member.members[0].package) for name, member in members.items()],
                   where=f"blend of {', '.join(names)}")

    cfg, config = compose_config(overrides)
    split = build_valid_split(config.dset, samplerate=bag.samplerate, channels=bag.audio_channels,
                              base_dir=Path.cwd(), cache_dir=resolve_cache_dir(config.misc.cache_dir),
                              progress=config.misc.progress)
    sources = [source for source in bag.sources if source in split.sources]
    if not sources:
        raise DemixError(f"the models separate {', '.join(bag.sources)} but the dataset has "
                         f"{', '.join(split.sources)}: no source in common to fit; check dset.sources")
    unfitted = [source for source in bag.sources if source not in sources]
    if unfitted:
        logger.warning("the dataset lacks %s: those sources keep equal weights", ", ".join(unfitted))
    segment = config.valid.segment if any(item.startswith("valid.segment=") for item in overrides) else None
    device = resolve_device(args.device)
    separators = {name: bag_separator(member, segment=segment, split=not args.no_split, overlap=config.valid.overlap,
                                      device=device) for name, member in members.items()}
    logger.info("separating %d validation track(s) of %s with %d model(s)", len(split.dataset), split.root,
                len(names))
    stats = blend_statistics(separators, {name: member.sources for name, member in members.items()}, split.dataset,
                             split.sources, sources)
    fit = fit_weights(stats, divisions)
    weights = [[fit.weights[source].get(name, 0.0) if source in fit.weights
                else float(source in members[name].sources) for source in bag.sources] for name in names]
    save_bag(bag_path, names, weights, segment=segment)
    Repository(args.repo).load(args.name)  # what we wrote reads back as a bag
    print(f"{args.name}: {len(names)} model(s) blended on {len(fit.tracks)} validation track(s) of {split.root}")
    print(format_blend_table(fit, names, args.name))
    if unfitted:
        print(f"not fitted (the dataset lacks them): {', '.join(unfitted)}; equal weights among the models "
              "that separate them")
    print(f"bag: {bag_path}")


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab blend` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
