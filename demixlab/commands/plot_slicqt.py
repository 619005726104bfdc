"""`demixlab plot-slicqt AUDIO -o out.png`: the sliCQT spectrogram of an audio file as a PNG.

    demixlab plot-slicqt AUDIO_FILE -o out.png [--scale bark --bins 262 --fmin 32.9 --fmax 22050]
                         [--offset 0 --duration 10 --title TEXT --dynamic-range 100]

Each block of the transform is drawn at its own time resolution.

The file is read with soundfile (any format demixlab reads) at its own sample rate; channels are
averaged in the plot. `--fmax` defaults to the file's Nyquist frequency.
"""
import argparse
import typing as tp

import torch

from ..audio import audio_info, read_audio
from ..errors import DemixError, exit_on_user_error
from ..spectral.plot import plot_slicqt
from ..spectral.scales import SCALES
from ..spectral.slicqt import SliCQT

HELP = "plot the sliCQT spectrogram of an audio file as a PNG"


def build_parser(parser: tp.Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """The options of `demixlab plot-slicqt`."""
    parser = parser or argparse.ArgumentParser(prog="demixlab plot-slicqt", description=HELP)
    parser.add_argument("audio", help="audio file to analyse")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    parser.add_argument("--scale", default="bark", choices=SCALES)
    parser.add_argument("--bins", type=int, default=262, help="frequency bands (bands per octave for oct)")
    parser.add_argument("--fmin", type=float, default=32.9, help="lowest band (Hz)")
    parser.add_argument("--fmax", type=float, default=None, help="highest band (Hz; default: Nyquist)")
    parser.add_argument("--offset", type=float, default=0.0, help="start (seconds)")
    parser.add_argument("--duration", type=float, default=None, help="length (seconds; default: to the end)")
    parser.add_argument("--title", default="", help="plot title (default: the configuration)")
    parser.add_argument("--dynamic-range", type=float, default=100.0, help="colour range below the peak (dB)")
    return parser


def run(args: argparse.Namespace) -> None:
    """Read, transform, plot."""
    if not args.output.lower().endswith(".png"):
        raise DemixError(f"--output {args.output}: expected a .png file")
    if args.offset < 0 or (args.duration is not None and args.duration <= 0):
        raise DemixError("--offset must be >= 0 and --duration > 0 seconds")
    info = audio_info(args.audio)
    start = int(round(args.offset * info.samplerate))
    frames = -1 if args.duration is None else int(round(args.duration * info.samplerate))
    if start >= info.frames:
        raise DemixError(f"{args.audio}: --offset {args.offset} s is past the end ({info.duration:.2f} s)")
    wav = torch.from_numpy(read_audio(args.audio, offset=start, frames=frames))
    fmax = args.fmax if args.fmax is not None else info.samplerate / 2.0
    transform = SliCQT(args.scale, args.bins, args.fmin, fmax, samplerate=info.samplerate)
    path = plot_slicqt(wav, transform, args.output, title=args.title, dynamic_range=args.dynamic_range)
    print(f"wrote {path} ({transform.scale}, {transform.num_channels} channels in {len(transform.block_shapes)} "
          f"blocks, slice {transform.slice_length} samples)")



@exit_on_user_error
def main(argv: tp.Optional[tp.Sequence[str]] = None) -> None:
    """`demixlab plot-slicqt` on its own (see the module docstring)."""
    run(build_parser().parse_args(argv))
