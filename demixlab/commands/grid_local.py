"""`demixlab grid-local NAME`: run the experiments of a Dora grid one after another here, without Slurm.

    demixlab grid-local NAME [PATTERN ...] [--dry_run]

The grid's signatures are materialised as `dora grid NAME --dry_run --init` would, then each XP
runs in turn with `dora run -f SIG`: a finished XP only reports its scores, an interrupted one
resumes. An XP the grid gives N > 1 GPUs runs as N processes (`dora run -d --ddp_workers N`:
NCCL on GPUs, gloo on CPU). PATTERNs keep the XPs whose signature or name contains one of them.
A summary table follows; the exit code is 1 if an XP failed.
"""
import argparse
import importlib
import subprocess
import sys
import typing as tp
from pathlib import Path

from dora.conf import SlurmConfig
from dora.shep import Sheep

from ..errors import DemixError, exit_on_user_error
from ..experiment import grid_experiments

HELP = "run a grid's XPs one after another on this machine, without Slurm"


def dora_main() -> tp.Any:
    """Dora's main of `dora run` (imported on first use: composing the configuration is slow)."""
    from ..train import main  # noqa: PLC0415 - composing the configuration is slow: only when running

    return main


def collect_grid(name: str) -> tp.List[tp.Tuple[Sheep, SlurmConfig]]:
    """The XPs of grid `name` with the Slurm settings the grid gives each."""
    package = dora_main().dora.grid_package or f"{dora_main().package}.grids"
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as error:
        if error.name not in (package, f"{package}.{name}"):
            raise
        folder = Path(importlib.import_module(package).__file__).parent
        grids = sorted(path.stem for path in folder.glob("*.py") if not path.name.startswith("_"))
        raise DemixError(f"no grid named {name!r} in {folder} (grids: {', '.join(grids)})") from None
    return grid_experiments(dora_main(), module.explorer)


def run_command(sheep: Sheep, slurm: SlurmConfig) -> tp.List[str]:
    """The `dora run` command of one XP."""
    command = [sys.executable, "-m", "dora", "-P", dora_main().package, "run"]
    if slurm.gpus > 1:
        command += ["-d", "--ddp_workers", str(slurm.gpus)]
    return command + ["-f", sheep.xp.sig]


def summary(rows: tp.List[tp.Tuple[Sheep, str]]) -> str:
    """One line per XP: signature, status, epochs, best valid global SDR, test SDRs, name."""
    def number(value: tp.Any) -> str:
        return f"{value:.2f}" if isinstance(value, (int, float)) else "-"

    lines = [f"{'sig':8}  {'status':8}  {'epochs':>6}  {'valid nSDR':>10}  {'test SDR':>8}  {'test nSDR':>9}  name"]
    for sheep, status in rows:
        history = sheep.xp.link.history
        best = next((entry for entry in reversed(history) if entry.get("best")), {})
        test = next((entry["test"] for entry in reversed(history) if "test" in entry), {})
        lines.append(f"{sheep.xp.sig:8}  {status:8}  {len(history):>6}  {number(best.get('valid', {}).get('nsdr')):>10}  "
                     f"{number(test.get('sdr')):>8}  {number(test.get('nsdr')):>9}  {dora_main().get_name(sheep.xp)}")
    return "\n".join(lines)


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab grid-local`."""
    parser = parser or argparse.ArgumentParser(prog="demixlab grid-local", description=HELP)
    parser.add_argument("grid", help="grid module name in grids/ (e.g. smoke)")
    parser.add_argument("patterns", nargs="*", help="only XPs whose signature or name contains one of these")
    parser.add_argument("--dry_run", action="store_true", help="list the XPs and initialise them, run nothing")
    return parser


def run(args: argparse.Namespace) -> None:
    """Run (or list) the grid's XPs and print the summary; exit code 1 if an XP failed."""
    xps = collect_grid(args.grid)
    if args.patterns:
        xps = [(sheep, slurm) for sheep, slurm in xps
               if any(p in sheep.xp.sig or p in dora_main().get_name(sheep.xp) for p in args.patterns)]
    if not xps:
        raise DemixError(f"grid {args.grid!r} has no XP{' matching ' + ' '.join(args.patterns) if args.patterns else ''}")
    for sheep, _ in xps:
        dora_main().init_xp(sheep.xp)
    rows = []
    for index, (sheep, slurm) in enumerate(xps):
        command = run_command(sheep, slurm)
        print(f"[{index + 1}/{len(xps)}] {sheep.xp.sig} {dora_main().get_name(sheep.xp)}: {' '.join(command[1:])}",
              flush=True)
        status = "listed"
        if not args.dry_run:
            status = "done" if subprocess.call(command) == 0 else "FAILED"
            sheep.xp.link.load()
        rows.append((sheep, status))
    print(summary(rows))
    if any(status == "FAILED" for _, status in rows):
        sys.exit(1)


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab grid-local` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
