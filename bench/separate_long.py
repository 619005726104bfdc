"""Separate long synthetic stereo tracks file to file with a small random model: wall time and memory,
the in-memory path (whole track and stems in memory) next to the streamed one (`demixlab separate`).

    python bench/separate_long.py [--minutes 10 60] [--in-memory-up-to 10] [--family umx] [--device cpu]
                                  [--segment 10] [--jobs 1]

For every length, a 16-bit stereo 44.1 kHz WAV is written block by block, then each path runs in a
fresh subprocess so that its peak resident memory (ru_maxrss) is its own:

- in-memory: what `demixlab separate` did before streaming: read the whole file, `separate_tensor`,
  then write each stem (16-bit WAV, `--clip-mode rescale`);
- streamed: `demixlab separate` itself (blocks in, blocks out, stems renamed at the end).

Printed per run: wall time, peak RSS, RSS before separating (imports and model), and for the
streamed run the largest difference to the in-memory stems (in 16-bit steps) when both ran.
The in-memory path needs about 8 x the track's float32 size; `--in-memory-up-to` (minutes) skips
it on longer tracks, where it would not fit in this machine's memory.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SOURCES = ["drums", "bass", "other", "vocals"]
MODELS = {
    "umx": dict(hidden_size=64, nb_layers=2, wiener_iterations=1),
    "umx-no-wiener": dict(hidden_size=64, nb_layers=2, wiener_iterations=0),
    "umx-full": {},  # the family's defaults: the published UMX size (hidden 512, 3 LSTM layers)
    "hdemucs": dict(channels=8, depth=6, segment=10.0),
    "htdemucs": dict(channels=8, depth=4, bottom_channels=64, t_layers=1, t_heads=4, segment=10.0),
    "xumx": dict(hidden_size=64, nb_layers=2, wiener_iterations=1),
}
MIB = 1024 * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def write_track(path: Path, minutes: float) -> None:
    """Two tones and noise, written a minute at a time (the track never sits in memory)."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", 44100, 2, subtype="PCM_16") as handle:
        for start in range(0, int(minutes * 60 * 44100), 60 * 44100):
            count = min(60 * 44100, int(minutes * 60 * 44100) - start)
            t = (start + np.arange(count)) / 44100
            block = 0.3 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 331 * t)], axis=1)
            handle.write((block + 0.05 * rng.standard_normal((count, 2))).astype(np.float32))


def worker(args: argparse.Namespace) -> dict:
    """One separation in this process; returns its measurements."""
    from demixlab.audio import load_audio_file, write_audio
    from demixlab.commands.separate import main as separate
    from demixlab.models import get_family
    from demixlab.release.model_file import package_model, save_package
    from demixlab.separation import Separator
    from demixlab.separation.output import prevent_clip

    torch.manual_seed(0)
    options = MODELS[args.family]
    family = args.family.split("-")[0]
    model = get_family(family).build_model(SOURCES, 44100, 2, options)
    repo = Path(args.out) / "repo"
    save_package(package_model(family, options, model.state_dict(), sources=SOURCES, samplerate=44100,
                               audio_channels=2), repo / "bench.th")
    del model
    track = Path(args.track)
    before = _rss_bytes()
    begin = time.time()
    if args.mode == "streamed":
        separate(["--repo", str(repo), "-n", "bench", str(track), "-o", str(Path(args.out) / "streamed"),
                  "--device", args.device, "--segment", str(args.segment), "--jobs", str(args.jobs), "--no-progress"])
    else:
        separator = Separator(repo, "bench", device=args.device, segment=args.segment, jobs=args.jobs)
        wav, samplerate = load_audio_file(track)
        for stem, signal in separator.separate_tensor(wav, samplerate).items():
            write_audio(Path(args.out) / "in-memory" / track.stem / f"{stem}.wav", prevent_clip(signal, "rescale"),
                        samplerate, subtype="int16")
    wall = time.time() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": args.mode, "wall_s": wall, "peak_rss_mib": peak / MIB, "before_mib": before / MIB}


def max_step_difference(first: Path, second: Path) -> int:
    """The largest difference between two 16-bit files, in steps, read a block at a time."""
    worst = 0
    with sf.SoundFile(str(first)) as one, sf.SoundFile(str(second)) as two:
        assert one.frames == two.frames, (one.frames, two.frames)
        while True:
            a, b = one.read(1 << 20, dtype="int16"), two.read(1 << 20, dtype="int16")
            if not len(a):
                return worst
            worst = max(worst, int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--in-memory-up-to", type=float, default=10.0,
                        help="run the in-memory path only on tracks of at most this many minutes")
    parser.add_argument("--family", default="umx", choices=sorted(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--segment", type=float, default=10.0, help="seconds per chunk")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--track", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    print(f"stereo 44.1 kHz 16-bit WAV in and out, {args.family} {MODELS[args.family]}, device {args.device}, "
          f"segment {args.segment:g} s, {torch.get_num_threads()} threads")
    print(f"{'minutes':>7} {'path':>10} {'wall s':>8} {'peak RSS MiB':>13} {'RSS before MiB':>15} "
          f"{'max diff (16-bit steps)':>24}")
    for minutes in args.minutes:
        with tempfile.TemporaryDirectory(prefix="separate-long-") as folder:
            track = Path(folder) / "long.wav"
            write_track(track, minutes)
            modes = (["in-memory"] if minutes <= args.in_memory_up_to else []) + ["streamed"]
            for mode in modes:
                command = [sys.executable, __file__, "--mode", mode, "--track", str(track), "--out", folder,
                           "--family", args.family, "--device", args.device, "--segment", str(args.segment),
                           "--jobs", str(args.jobs)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{minutes:7g} {mode:>10}: failed ({done.returncode}): {last}")
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                difference = "-"
                if mode == "streamed" and "in-memory" in modes:
                    difference = str(max(max_step_difference(Path(folder) / "in-memory" / "long" / f"{stem}.wav",
                                                             Path(folder) / "streamed" / "long" / f"{stem}.wav")
                                         for stem in SOURCES))
                print(f"{minutes:7g} {mode:>10} {result['wall_s']:8.1f} {result['peak_rss_mib']:13.0f} "
                      f"{result['before_mib']:15.0f} {difference:>24}", flush=True)


if __name__ == "__main__":
    main()
