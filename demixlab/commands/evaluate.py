"""`demixlab evaluate --repo REPO -n NAME [overrides]`: score a model or bag on a dataset's test split.

    demixlab evaluate --repo release_models -n umxhq                      # the toy test set
    demixlab evaluate --repo REPO -n NAME dset=musdb18hq dset.root=/data/musdb18hq
    demixlab evaluate --repo REPO -n NAME dset=folder dset.root=DIR 'dset.sources=[a,b]' \\
        test.shifts=1 valid.segment=10 test.sdr=false

The dataset and the evaluation settings come from demixlab's configuration (conf/config.yaml)
with the given overrides: `dset=...` (only the test split is read: ROOT/test), `valid.segment`
and `valid.overlap` (chunks; default: the model file's segment), `test.shifts`, `test.sdr`
(BSS Eval on top of the global SDR), `test.sdr_backend` (torch, museval or check), `seed` (of
the shifts). Test tracks are read at the model's sample rate and channels. Prints the table
(museval SDR: median over frames then tracks; global SDR: mean over tracks) and writes
OUT/results.json (per track and summary) and OUT/sdr_boxplot.png.
"""
import argparse
import logging
import sys
import typing as tp
from pathlib import Path

from omegaconf import OmegaConf

from ..data import build_test_split, resolve_cache_dir
from ..errors import DemixError, exit_on_user_error
from ..evaluation.loop import evaluate, scored_sources
from ..evaluation.plots import plot_track_scores
from ..release.repository import Repository
from ..separation import bag_separator, resolve_device
from ..training.config import TrainingConfig, parse_config

logger = logging.getLogger(__name__)

HELP = "evaluate a model or bag of a repository on the test split of a dataset"


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab evaluate`; anything of the form key=value is a configuration override."""
    parser = parser or argparse.ArgumentParser(prog="demixlab evaluate", description=HELP)
    parser.add_argument("--repo", type=Path, required=True, help="the model repository folder")
    parser.add_argument("-n", "--name", required=True, help="model or bag of the repository")
    parser.add_argument("overrides", nargs="*", help="configuration overrides, e.g. dset=musdb18hq dset.root=DIR")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output folder (default: outputs/evaluations/NAME)")
    parser.add_argument("--sources", default=None,
                        help="comma-separated sources to score (default: all the dataset's sources)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--no-split", action="store_true", help="separate whole tracks at once (more memory)")
    return parser


def compose_config(overrides: tp.Sequence[str]) -> tp.Tuple[tp.Any, TrainingConfig]:
    """demixlab's composed configuration with `overrides`, raw and typed; a bad override exits with one line."""
    from ..train import main as dora_main  # noqa: PLC0415 - composing needs the Hydra main, not training

    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise DemixError(f"{bad[0]!r} is not an override (expected key=value, e.g. dset=musdb18hq)")
    cfg = dora_main.get_xp(list(overrides)).cfg
    return cfg, parse_config(cfg)


def run(args: argparse.Namespace) -> None:
    """Evaluate, print the table, write the JSON and the PNG."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg, config = compose_config(args.overrides)
    device = resolve_device(args.device)
    bag = Repository(args.repo).load(args.name)
    split = build_test_split(config.dset, samplerate=bag.samplerate, channels=bag.audio_channels,
                             base_dir=Path.cwd(), cache_dir=resolve_cache_dir(config.misc.cache_dir),
                             progress=config.misc.progress)
    wanted = [source.strip() for source in args.sources.split(",") if source.strip()] if args.sources else None
    sources = scored_sources(bag.sources, split.sources, wanted, model_name=repr(args.name))
    segment = config.valid.segment
    separate = bag_separator(bag, segment=segment, split=not args.no_split, overlap=config.valid.overlap,
                             shifts=config.test.shifts, seed=config.seed, device=device)
    logger.info("evaluating %r (%s) on %d test track(s) of %s", args.name, ", ".join(bag.sources),
                len(split.dataset), split.root)
    result = evaluate(separate, split.dataset, model_sources=bag.sources, dataset_sources=split.sources,
                      sources=sources, samplerate=bag.samplerate, museval=config.test.sdr,
                      sdr_backend=config.test.sdr_backend)
    result.info = {"model": args.name, "repo": str(args.repo.resolve()), "test_root": split.root,
                   "overrides": list(args.overrides), "dataset": OmegaConf.to_container(cfg.dset, resolve=True),
                   "segment": segment, "overlap": config.valid.overlap, "shifts": config.test.shifts,
                   "split": not args.no_split, "samplerate": bag.samplerate,
                   "sdr_backend": config.test.sdr_backend}
    out = args.out or Path("outputs") / "evaluations" / args.name
    result.save(out / "results.json")
    plot_track_scores(result.tracks, sources, out / "sdr_boxplot.png",
                      title=f"{args.name} on {Path(split.root).name}/test")
    museval_note = "museval SDR: median over frames, then tracks; " if config.test.sdr else ""
    print(f"{args.name} on {len(split.dataset)} test track(s) of {split.root} "
          f"({museval_note}global SDR: mean over tracks)")
    print(result.table())
    print(f"results: {out / 'results.json'}\nplot: {out / 'sdr_boxplot.png'}")


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab evaluate` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
