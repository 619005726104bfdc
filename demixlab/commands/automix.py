"""`demixlab automix SRC -o DST`: a fine-tuning dataset of musically plausible remixes (the demucs
MDX 2021 automix set), written as a folder dataset.

    demixlab automix /data/musdb18hq --kind musdb18hq -o /data/automix --seconds 30 --count 500
    demixlab automix /data/mystems -o /data/automix --sources drums,bass,other,vocals --seed 1

SRC is read like the `dset` of that kind (`--kind folder`: SRC/train/TRACK/SOURCE.wav; its
training tracks only, MUSDB18's official validation tracks held out). Each remix takes every
source from a different track, stretched to a common tempo, aligned on the beat grid and
pitch-shifted to a common key (see :mod:`demixlab.data.automix`). Prints a summary of what was
made and rejected; DST/automix.json records where each stem came from, DST/automix.png plots it.
"""
import argparse
import logging
import sys
import typing as tp
from pathlib import Path

from ..data import DatasetConfig, resolve_cache_dir, training_tracks
from ..data.automix import MANIFEST, PLOT, AutomixOptions, make_automix
from ..errors import DemixError, exit_on_user_error

HELP = "make a fine-tuning dataset of beat- and key-matched remixes of a dataset's stems (demucs' automix)"

# --kind -> (dset.kind, dset.valid_tracks): the training tracks of each layout.
KINDS = {"folder": ("stems", None), "musdb18hq": ("stems", "musdb"), "musdb18": ("musdb", "musdb"),
         "moisesdb": ("moisesdb", None), "slakh": ("slakh", None)}


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab automix`."""
    parser = parser or argparse.ArgumentParser(prog="demixlab automix", description=HELP)
    parser.add_argument("src", type=Path, metavar="SRC", help="the dataset of stems to remix")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DST",
                        help="the folder dataset to create (DST/train/REMIX_NNNN/SOURCE.wav)")
    parser.add_argument("--kind", choices=sorted(KINDS), default="folder",
                        help="layout of SRC (default folder: SRC/train/TRACK/SOURCE.ext)")
    parser.add_argument("--sources", default="drums,bass,other,vocals",
                        help="comma-separated sources of every remix (default drums,bass,other,vocals)")
    parser.add_argument("--beat-source", default="drums",
                        help="the source whose beat sets the tempo and grid; never pitch-shifted (default drums)")
    parser.add_argument("--count", type=int, default=None, help="remixes to make (default: one per usable track)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of every remix (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every choice (default 0)")
    parser.add_argument("--max-semitones", type=int, default=2,
                        help="largest pitch shift onto the common key (default 2)")
    parser.add_argument("--max-tempo-change", type=float, default=0.15,
                        help="largest tempo change onto the common tempo, a fraction (default 0.15: +-15 %%)")
    parser.add_argument("--min-beat-confidence", type=float, default=0.3,
                        help="pulse clarity below which a track has no confident beat, 0 to 1 (default 0.3)")
    parser.add_argument("--samplerate", type=int, default=44100, help="sample rate of the remixes (default 44100)")
    parser.add_argument("--channels", type=int, default=2, help="channels of the remixes (default 2)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes analysing tracks and rendering remixes (default 1; same result for any)")
    parser.add_argument("--force", action="store_true", help="replace DST if it holds an earlier automix output")
    parser.add_argument("--cache-dir", default=None,
                        help="where file checks are cached (default $DEMIXLAB_CACHE or ~/.cache/demixlab)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> None:
    """Read SRC's training tracks, make the remixes, print the summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    sources = [source.strip() for source in args.sources.split(",") if source.strip()]
    options = AutomixOptions(sources=sources, beat_source=args.beat_source, seconds=args.seconds, count=args.count,
                             seed=args.seed, max_semitones=args.max_semitones,
                             max_tempo_change=args.max_tempo_change, min_beat_confidence=args.min_beat_confidence,
                             samplerate=args.samplerate, channels=args.channels)
    source_folder = args.src.expanduser().absolute()
    if not source_folder.is_dir():
        raise DemixError(f"SRC {args.src}: no such folder")
    kind, valid_tracks = KINDS[args.kind]
    if kind == "stems" and not (source_folder / "train").is_dir():
        raise DemixError(f"SRC {args.src}: not a {args.kind} dataset (no train/ folder; expected "
                         f"{args.src}/train/TRACK/{sources[0]}.wav...)")
    if args.output.expanduser().absolute() == source_folder:
        raise DemixError(f"-o {args.output}: is SRC itself; choose a new folder")
    dset = DatasetConfig(kind=kind, root=str(source_folder), sources=sources, samplerate=args.samplerate,
                         channels=args.channels, valid_tracks=valid_tracks)
    tracks = training_tracks(dset, base_dir=Path.cwd(), cache_dir=resolve_cache_dir(args.cache_dir),
                             progress=not args.no_progress)
    result = make_automix(tracks, options, args.output.expanduser(), origin=f"{args.kind} {source_folder}",
                          force=args.force, workers=args.workers, progress=not args.no_progress)
    print(f"automix: {args.kind} {source_folder} -> {result.destination / 'train'} (seed {args.seed})")
    for line in result.summary:
        print(line)
    print(f"manifest: {result.destination / MANIFEST}; plot: {result.destination / PLOT}")
    print(f"train on it: 'dset.extra=[{{kind: stems, root: {result.destination}, weight: 0.5}}]'")


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab automix` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
