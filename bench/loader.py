"""Training examples per second of one data-loading process, each augmentation on and off.

    python bench/loader.py [--examples 8] [--minutes 2] [--recipes htdemucs,umx] [--step-ms 0]

Generates (once, under --workdir) a folder dataset of two long stereo 44.1 kHz tracks of four
sources (16-bit WAV), then reads training examples the way a DataLoader worker does
(`SegmentDataset.__getitem__`: one random segment, then the dataset-side effects) for the
MUSDB-like recipes: HTDemucs (10 s + 1 s of shift) and Open-Unmix (6 s). Each row is one
configuration: plain reading, unaligned mixing, then each effect at probability 1 (the cost
when it is drawn; at probability p a worker pays about p times that on top of plain reading),
then the demucs repitch recipe (pitch/tempo at probability 0.2). Printed: examples per second
and milliseconds per example of ONE process. With --step-ms (a measured training step time for
the recipe's batch size), the number of workers that keep up with it is printed as well:
workers = batch_size / (examples per second x step seconds).
"""
import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from demixlab.data import SegmentDataset
from demixlab.data.scan import scan_stems_folder
from demixlab.training.effects import (CodecConfig, DistortionConfig, EqConfig, ExampleEffects, PitchTempoConfig,
                                       ReverbConfig)

SR = 44100
SOURCES = ["drums", "bass", "other", "vocals"]
RECIPES = {"htdemucs": (10.0 + 1.0, 32), "umx": (6.0, 16)}  # (seconds read per example, batch size)


def write_tracks(root: Path, minutes: float) -> Path:
    folder = root / f"train_{minutes:g}min"
    for number in range(2):
        track = folder / f"track{number}"
        track.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(number)
        frames = int(minutes * 60 * SR)
        time_axis = np.arange(frames) / SR
        for index, source in enumerate(SOURCES):
            path = track / f"{source}.wav"
            if path.exists():
                continue
            tone = 0.2 * np.sin(2 * np.pi * 55 * (index + 1) * time_axis) * (1 + np.sin(2 * np.pi * 0.5 * time_axis))
            noise = 0.02 * rng.standard_normal(frames)
            wav = np.stack([tone + noise, 0.8 * tone + noise], axis=1).astype(np.float32)
            sf.write(str(path), np.clip(wav, -0.95, 0.95), SR, subtype="PCM_16")
    return folder


def effects(**options) -> ExampleEffects:
    configs = {"pitch_tempo": PitchTempoConfig, "codec": CodecConfig, "eq": EqConfig, "reverb": ReverbConfig,
               "distortion": DistortionConfig}
    return ExampleEffects(SR, **{name: cls(**options.get(name, {})) for name, cls in configs.items()})


CONFIGURATIONS = {
    "plain": ({}, 0.0),
    "unaligned=1": ({}, 1.0),
    "pitch_tempo p=1": ({"pitch_tempo": {"probability": 1.0}}, 0.0),
    "pitch_tempo p=1 fast": ({"pitch_tempo": {"probability": 1.0, "high_quality": False}}, 0.0),
    "codec p=1": ({"codec": {"probability": 1.0}}, 0.0),
    "eq p=1": ({"eq": {"probability": 1.0}}, 0.0),
    "reverb p=1": ({"reverb": {"probability": 1.0}}, 0.0),
    "distortion p=1": ({"distortion": {"probability": 1.0}}, 0.0),
    "demucs repitch (p=0.2)": ({"pitch_tempo": {"probability": 0.2}}, 0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8, help="examples timed per row")
    parser.add_argument("--minutes", type=float, default=2.0, help="length of each generated track")
    parser.add_argument("--recipes", default="htdemucs,umx")
    parser.add_argument("--step-ms", type=float, default=0.0, help="a measured training step time (ms)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "demixlab-bench-loader"))
    args = parser.parse_args()
    folder = write_tracks(Path(args.workdir), args.minutes)
    tracks = scan_stems_folder(folder, SOURCES, Path(args.workdir) / "cache", progress=False)
    for recipe in args.recipes.split(","):
        seconds, batch = RECIPES[recipe]
        frames = int(round(seconds * SR))
        print(f"\n{recipe}: {seconds:g} s stereo examples, batch {batch}")
        print(f"{'configuration':<26} {'examples/s':>11} {'ms/example':>11}" + ("  workers" if args.step_ms else ""))
        for name, (options, unaligned) in CONFIGURATIONS.items():
            transform = effects(**options)
            dataset = SegmentDataset(tracks, frames, args.examples, seed=0, unaligned=unaligned,
                                     transform=transform if transform.active else None)
            dataset[(0, 0)]  # warm-up: file handles, pedalboard's first call
            begin = time.perf_counter()
            for index in range(1, args.examples + 1):
                dataset[(1, index % len(dataset))]
            per_example = (time.perf_counter() - begin) / args.examples
            line = f"{name:<26} {1 / per_example:>11.2f} {1000 * per_example:>11.1f}"
            if args.step_ms:
                line += f"  {math.ceil(batch * per_example / (args.step_ms / 1000)):>7d}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
