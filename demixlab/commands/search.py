"""`demixlab search SPACE.yaml`: an Optuna search whose trials are Dora XPs.

    demixlab search SPACE.yaml [--slurm] [--parallel N] [--poll SECONDS] [--top N] [--check]

The space is checked against the configuration first (one-line errors), then trials run one after
another with `dora run` (or, with --slurm, as Slurm jobs submitted like `dora grid` does), the
pruner stopping bad ones after any epoch. The study lives in `<dora.dir>/search/NAME/`: rerun
the same command to resume or extend it. Prints the trials, best first, and writes history.png,
intermediate.png and importance.png there. Exit code 1 if a trial failed in this run.
"""
import argparse
import signal
import sys
import typing as tp

from ..errors import DemixError, exit_on_user_error
from ..training.search import (LocalRunner, Search, SlurmRunner, check_space, failed_trials, read_space,
                               results_table, search_folder, slurm_config, write_plots)

HELP = "search hyper-parameters with Optuna, each trial a Dora XP (pruned early when it lags)"


def _dora_main() -> tp.Any:
    from ..train import main  # noqa: PLC0415 - composing the configuration is slow: only when running

    return main


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab search`."""
    parser = parser or argparse.ArgumentParser(prog="demixlab search", description=HELP)
    parser.add_argument("space", help="the search space (YAML: name, base, metric, direction, trials, params, "
                                      "pruner, sampler, slurm, enqueue; README 'Search hyper-parameters')")
    parser.add_argument("--slurm", action="store_true",
                        help="submit every trial to Slurm (the space's slurm: settings over conf/config.yaml's)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="trials trained at the same time (default 1)")
    parser.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                        help="how often the XPs' histories (and Slurm jobs) are read (default 2, 10 with --slurm)")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="trials shown in the table (default 10)")
    parser.add_argument("--check", action="store_true", help="check the space and show the study; train nothing")
    return parser


def run(args: argparse.Namespace) -> None:
    """Check the space, run (or resume) the search, print the table and write the plots."""
    if args.parallel < 1:
        raise DemixError(f"--parallel must be at least 1, got {args.parallel}")
    space = read_space(args.space)
    main = _dora_main()
    check_space(space, main)
    folder = search_folder(main, space)
    print(f"search {space.name}: {space.trials} trials, {space.direction} {space.metric}", flush=True)
    print(f"study: {folder / 'study.db'}", flush=True)
    if args.check:
        print(f"space checked: {', '.join(param.key for param in space.params)}", flush=True)
        if not (folder / "study.db").exists():
            print("no study yet")
            return
    slurm = slurm_config(main, space)
    runner = SlurmRunner(main, slurm) if args.slurm else LocalRunner(main, slurm)
    search = Search(space, main, runner, folder, parallel=args.parallel, poll=args.poll or (10.0 if args.slurm else 2.0))
    if not args.check:
        # a kill (SIGTERM) stops the trials being trained, as Ctrl-C does; they resume next time
        previous = signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
        try:
            search.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    print(results_table(search.study, args.top), flush=True)
    for trial in failed_trials(search.study):
        print(f"trial {trial.number} failed: {trial.user_attrs.get('error', 'no reason recorded')}")
    written, notes = write_plots(search.study, folder, space.metric)
    for path in written:
        print(f"wrote {path}")
    for note in notes:
        print(f"left out {note}")
    if search.failed:
        sys.exit(1)


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab search` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
