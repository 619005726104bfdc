"""`demixlab separate --repo DIR -n NAME TRACK [TRACK ...]`: separate tracks with a model or bag.

Tracks are separated one after the other, each read and written block by block
(:meth:`~demixlab.separation.Separator.separate_stream`, :class:`~demixlab.separation.output.StemFiles`):
memory does not grow with a track's length, and a track's stems appear only once all are
complete. `--batch-chunks N` stacks N chunks into one forward pass and `--jobs N` runs batches in
parallel threads (by default on the CPU, one per torch thread for models that gain from it; memory
grows with the chunks in flight, not with the track). An output folder that cannot be written is
an error before any separation. A track that cannot be read, separated or written is reported in
one line and skipped (none of its stems is left behind); the others are still written, and the
exit code is then non-zero.
"""
import argparse
import contextlib
import sys
import typing as tp
from pathlib import Path

import tqdm
import yaml

from ..audio import AudioReader
from ..errors import EXIT_USER_ERROR, DemixError, exit_on_user_error
from ..files import check_writable_folder
from ..separation import Separator
from ..separation.chunking import DEFAULT_BATCH_CHUNKS
from ..separation.onnx_backend import BACKENDS
from ..separation.output import CLIP_MODES, StemFiles, select_stems

HELP = "separate tracks with a model or bag of a repository"


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab separate`."""
    parser = parser or argparse.ArgumentParser(prog="demixlab separate", description=HELP)
    parser.add_argument("tracks", nargs="+", type=Path, help="audio files (any format soundfile or ffmpeg reads)")
    parser.add_argument("--repo", type=Path, default=Path("release_models"),
                        help="folder of model files and bags (default: release_models)")
    parser.add_argument("-n", "--name", required=True, help="model or bag of the repository")
    parser.add_argument("-o", "--out", type=Path, default=Path("separated"), help="output folder (default: separated)")
    parser.add_argument("--filename", default="{track}/{stem}.{ext}",
                        help="output path under --out; keys {track} (input name without extension), {trackext}, "
                             "{stem}, {ext}, {name} (default: {track}/{stem}.{ext})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto: CUDA when available (default)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="run the networks in torch (default) or onnxruntime (CPU; needs the ONNX export "
                             "NAME.onnx made by `demixlab export ... --onnx`)")
    parser.add_argument("--segment", type=float, default=None,
                        help="seconds per chunk (default: the bag's, else the model file's, else 30)")
    parser.add_argument("--overlap", type=float, default=0.25, help="chunk overlap fraction (default: 0.25)")
    parser.add_argument("--shifts", type=int, default=0, help="random shifts averaged (default: 0)")
    parser.add_argument("--no-split", action="store_true", help="run whole tracks at once (more memory)")
    parser.add_argument("--two-stems", metavar="STEM", help="write STEM and no_STEM (the mixture minus STEM)")
    parser.add_argument("--stems", help="comma-separated stems to write (default: all)")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--flac", action="store_true", help="write FLAC")
    fmt.add_argument("--mp3", action="store_true", help="write MP3")
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--int24", action="store_true", help="24-bit WAV/FLAC (default: 16-bit)")
    depth.add_argument("--float32", action="store_true", help="32-bit float WAV")
    parser.add_argument("--clip-mode", choices=CLIP_MODES, default="rescale",
                        help="avoid clipping: rescale a stem whose peak exceeds 1, clamp it, or none "
                             "(default: rescale)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="batches of chunks separated in parallel threads sharing torch's threads "
                             "(default: on the CPU one per torch thread, at most 4, for models that gain "
                             "from it, e.g. HTDemucs; else 1)")
    parser.add_argument("--batch-chunks", type=int, default=DEFAULT_BATCH_CHUNKS, metavar="N",
                        help="chunks stacked into one forward pass: the same stems in fewer, larger passes "
                             "(on the CPU the default chunks side by side are faster for HTDemucs), more memory "
                             f"(default: {DEFAULT_BATCH_CHUNKS})")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model option stored in the model file, e.g. wiener_iterations=0 for "
                             "UMX/X-UMX (repeatable; VALUE is read as YAML)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random shifts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_options(options: tp.Sequence[str]) -> tp.Dict[str, tp.Any]:
    """`["wiener_iterations=0", "softmask=true"]` -> `{"wiener_iterations": 0, "softmask": True}`."""
    parsed: tp.Dict[str, tp.Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise DemixError(f"--option {option!r}: expected KEY=VALUE, e.g. wiener_iterations=0")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise DemixError(f"--option {option!r}: {value!r} is not a valid YAML value") from None
    return parsed


def run(args: argparse.Namespace) -> None:
    """Separate every track of `args`; exits non-zero when some track failed."""
    ext = "flac" if args.flac else "mp3" if args.mp3 else "wav"
    subtype = "int24" if args.int24 else "float32" if args.float32 else "int16"
    if args.float32 and ext != "wav":
        raise DemixError("--float32 is for WAV output only")
    if args.two_stems and args.stems:
        raise DemixError("--two-stems and --stems cannot be combined")
    if args.jobs is not None and args.jobs < 1:
        raise DemixError(f"--jobs must be at least 1, got {args.jobs}")
    if args.shifts < 0:
        raise DemixError(f"--shifts must be >= 0, got {args.shifts}")
    if args.batch_chunks < 1:
        raise DemixError(f"--batch-chunks must be at least 1, got {args.batch_chunks}")
    if args.segment is not None and args.segment <= 0:
        raise DemixError(f"--segment must be a positive number of seconds, got {args.segment}")
    device = "cpu" if args.backend == "onnxruntime" and args.device == "auto" else args.device
    separator = Separator(args.repo, args.name, device=device, segment=args.segment, split=not args.no_split,
                          overlap=args.overlap, shifts=args.shifts, jobs=args.jobs, progress=not args.no_progress,
                          seed=args.seed, overrides=parse_options(args.option), backend=args.backend,
                          batch_chunks=args.batch_chunks)
    wanted = [stem.strip() for stem in args.stems.split(",") if stem.strip()] if args.stems else None
    for stem in ([args.two_stems] if args.two_stems else []) + (wanted or []):
        if stem not in separator.sources:
            raise DemixError(f"unknown stem {stem!r} for {args.name}: choose among {', '.join(separator.sources)}")
    _check_template(args.filename)
    check_writable_folder(args.out, f"-o {args.out}")
    names = ([args.two_stems, f"no_{args.two_stems}"] if args.two_stems else wanted or separator.sources)

    failures = 0
    for track in tqdm.tqdm(args.tracks, desc="tracks", unit="track", disable=args.no_progress or len(args.tracks) < 2):
        try:
            targets = {stem: args.out / args.filename.format(track=track.stem, trackext=track.name, stem=stem, ext=ext,
                                                             name=args.name) for stem in names}
            _separate_track(separator, track, targets, args, subtype, wanted)
            tqdm.tqdm.write(f"{track}: {len(targets)} stems written to {args.out / track.stem}"
                            if args.filename.startswith("{track}/") else f"{track}: {len(targets)} stems written",
                            file=sys.stderr)
        except DemixError as error:
            failures += 1
            print(f"demixlab: error: {error}", file=sys.stderr, flush=True)
    if failures:
        print(f"demixlab: {failures} of {len(args.tracks)} track(s) failed", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def _separate_track(separator: Separator, track: Path, targets: tp.Dict[str, Path], args: argparse.Namespace,
                    subtype: str, wanted: tp.Optional[tp.List[str]]) -> None:
    """Read, separate and write one track block by block; a failure leaves no stem and no new folder."""
    with AudioReader(track) as reader:  # an unreadable track fails before any folder is made
        folders = sorted({target.parent for target in targets.values()})
        created = sorted({folder for path in folders for folder in (path, *path.parents) if not folder.exists()},
                         key=lambda folder: len(folder.parts), reverse=True)
        try:
            for folder in folders:
                check_writable_folder(folder, f"{track}: output folder")
            _write_stems(separator, reader, targets, args, subtype, wanted)
        except BaseException:
            for folder in created:  # deepest first; only the empty ones we made
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise


def _write_stems(separator: Separator, reader: AudioReader, targets: tp.Dict[str, Path], args: argparse.Namespace,
                 subtype: str, wanted: tp.Optional[tp.List[str]]) -> None:
    track = reader.path
    with StemFiles(targets, reader.samplerate, subtype, args.clip_mode) as files:
        total = reader.frames / reader.samplerate if reader.frames else None
        shape = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]" if total else "{desc}: {n:.0f} s [{elapsed}]"
        with tqdm.tqdm(total=total, unit="s", desc=track.name, leave=False, disable=args.no_progress,
                       bar_format=shape) as bar:
            def blocks() -> tp.Iterator:
                for block in reader:
                    bar.update(block.shape[-1] / reader.samplerate)
                    yield block

            for mixture, stems in separator.separate_stream(blocks(), reader.samplerate):
                files.write(select_stems(stems, mixture, args.two_stems, wanted))


def _check_template(template: str) -> None:
    try:
        template.format(track="t", trackext="t.wav", stem="s", ext="wav", name="n")
    except (KeyError, IndexError, ValueError) as error:
        raise DemixError(f"--filename {template!r}: bad template ({error!r}); keys: track, trackext, stem, ext, "
                         "name") from None


@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab separate` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
