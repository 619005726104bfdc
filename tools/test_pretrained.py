"""Evaluate a model or bag of a repository on the test split of a dataset.

    python -m tools.test_pretrained --repo release_models -n umxhq                      # toy test set
    python -m tools.test_pretrained --repo REPO -n NAME dset=musdb18hq dset.root=/data/musdb18hq
    python -m tools.test_pretrained --repo REPO -n NAME dset=folder dset.root=DIR 'dset.sources=[a,b]' \\
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

from demixlab.api import resolve_device
from demixlab.data import resolve_cache_dir
from demixlab.errors import DemixError, exit_on_user_error
from demixlab.evaluation import check_sdr_backend
from demixlab.evaluate_model import bag_separator, evaluate, load_test_split, scored_sources

logger = logging.getLogger("demixlab.test_pretrained")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; anything of the form key=value is a configuration override."""
    parser = argparse.ArgumentParser(prog="python -m tools.test_pretrained", description=__doc__.splitlines()[0])
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


def compose_config(overrides: tp.Sequence[str]) -> tp.Any:
    """demixlab's composed configuration with `overrides`; a bad override exits with one line."""
    from demixlab.train import main as dora_main

    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise DemixError(f"{bad[0]!r} is not an override (expected key=value, e.g. dset=musdb18hq)")
    return dora_main.get_xp(list(overrides)).cfg


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """Evaluate, print the table, write the JSON and the PNG."""
    from demixlab.evaluation_plot import plot_track_scores
    from demixlab.repository import Repository

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    cfg = compose_config(args.overrides)
    sdr_backend = check_sdr_backend(str(cfg.test.get("sdr_backend", "torch")))
    device = resolve_device(args.device)
    bag = Repository(args.repo).load(args.name)
    split = load_test_split(cfg.dset, samplerate=bag.samplerate, channels=bag.audio_channels, base_dir=Path.cwd(),
                            cache_dir=resolve_cache_dir(cfg.misc.cache_dir), progress=bool(cfg.misc.progress))
    wanted = [source.strip() for source in args.sources.split(",") if source.strip()] if args.sources else None
    sources = scored_sources(bag.sources, split.sources, wanted, model_name=repr(args.name))
    segment = cfg.valid.segment
    if segment is not None and float(segment) <= 0:
        raise DemixError(f"valid.segment={segment}: expected a positive number of seconds or null")
    separate = bag_separator(bag, segment=None if segment is None else float(segment), split=not args.no_split,
                             overlap=float(cfg.valid.overlap), shifts=int(cfg.test.shifts), seed=int(cfg.seed),
                             device=device)
    logger.info("evaluating %r (%s) on %d test track(s) of %s", args.name, ", ".join(bag.sources),
                len(split.dataset), split.root)
    result = evaluate(separate, split.dataset, model_sources=bag.sources, dataset_sources=split.sources,
                      sources=sources, samplerate=bag.samplerate, museval=bool(cfg.test.sdr),
                      sdr_backend=sdr_backend)
    result.info = {"model": args.name, "repo": str(args.repo.resolve()), "test_root": split.root,
                   "overrides": list(args.overrides), "dataset": OmegaConf.to_container(cfg.dset, resolve=True),
                   "segment": segment, "overlap": float(cfg.valid.overlap), "shifts": int(cfg.test.shifts),
                   "split": not args.no_split, "samplerate": bag.samplerate,
                   "sdr_backend": sdr_backend}
    out = args.out or Path("outputs") / "evaluations" / args.name
    result.save(out / "results.json")
    plot_track_scores(result.tracks, sources, out / "sdr_boxplot.png",
                      title=f"{args.name} on {Path(split.root).name}/test")
    museval_note = "museval SDR: median over frames, then tracks; " if cfg.test.sdr else ""
    print(f"{args.name} on {len(split.dataset)} test track(s) of {split.root} "
          f"({museval_note}global SDR: mean over tracks)")
    print(result.table())
    print(f"results: {out / 'results.json'}\nplot: {out / 'sdr_boxplot.png'}")


if __name__ == "__main__":
    main()
