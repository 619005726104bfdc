"""Training examples per second of one data-loading process, each augmentation on and off.

    python bench/loader.py [--examples 8] [--minutes 2] [--recipes htdemucs,umx] [--step-ms 0]

Generates (once, under --workdir) a folder dataset of two long stereo 44.1 kHz tracks of four
sources (16-bit WAV), then reads training examples the way a DataLoader worker does
(`SegmentDataset.__getitem__`: one random segment, then the dataset-side effects) for the
MUSDB-like recipes: HTDemucs (10 s + 1 s of shift) and Open-Unmix (6 s). Each row is one
configuration: plain reading, unaligned mixing, then each effect at probability 1 (the cost
when it is drawn; at probability p a worker pays about p times that on top of plain reading),
then the demucs repitch recipe (pitch/tempo at probability 0.2). Printed: examples per second
and milliseconds per example of ONE process. Then MUSDB18 ``.stem.mp4`` reading: the same two
tracks AAC-encoded (stempeg), plain examples read through musdb (one ffmpeg process per stem
per example, before) and from the WAV cache they are decoded into once (after), side by side. With --step-ms (a measured training step time for
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
from demixlab.data.musdb_cache import load_decoded_musdb
from demixlab.data.musdb_tracks import load_musdb_folder
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


def write_stem_files(folder: Path, root: Path) -> Path:
    """The tracks of `folder` as MUSDB18 ``.stem.mp4`` files (AAC) in ``root/train``."""
    import stempeg

    for track in sorted(folder.iterdir()):
        path = root / "train" / f"{track.name}.stem.mp4"
        if path.exists():
            continue
        stems = np.stack([sf.read(str(track / f"{source}.wav"), dtype="float32")[0] for source in SOURCES])
        data = np.concatenate([stems.sum(0, keepdims=True), stems])  # (5, time, channels)
        stempeg.write_stems(str(path), data, sample_rate=SR,
                            writer=stempeg.StreamsWriter(codec="aac", stem_names=["mixture", *SOURCES]))
    return root


def examples_per_second(dataset: SegmentDataset, examples: int) -> float:
    """Examples per second of one process reading `dataset` (after one warm-up example)."""
    dataset[(0, 0)]
    begin = time.perf_counter()
    for index in range(1, examples + 1):
        dataset[(1, index % len(dataset))]
    return examples / (time.perf_counter() - begin)


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
    "codec on mixture p=1": ({"codec": {"probability": 1.0, "target": "mixture"}}, 0.0),
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
    parser.add_argument("--musdb", action=argparse.BooleanOptionalAction, default=True,
                        help="also time MUSDB18 .stem.mp4 reading, musdb decode vs WAV cache (needs ffmpeg)")
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
            per_example = 1 / examples_per_second(dataset, args.examples)  # after a warm-up example
            line = f"{name:<26} {1 / per_example:>11.2f} {1000 * per_example:>11.1f}"
            if args.step_ms:
                line += f"  {math.ceil(batch * per_example / (args.step_ms / 1000)):>7d}"
            print(line, flush=True)
    if args.musdb:
        root = write_stem_files(folder, Path(args.workdir) / f"musdb_{args.minutes:g}min")
        begin = time.perf_counter()
        decoded = load_decoded_musdb(root, "train", SOURCES, Path(args.workdir) / "cache", progress=False)
        print(f"\nMUSDB18 .stem.mp4 ({len(decoded)} tracks of {args.minutes:g} min; WAV cache decoded or "
              f"checked in {time.perf_counter() - begin:.1f} s)")
        print(f"{'recipe':<10} {'musdb decode ex/s':>18} {'WAV cache ex/s':>15} {'speed-up':>9}")
        for recipe in args.recipes.split(","):
            frames = int(round(RECIPES[recipe][0] * SR))
            rates = [examples_per_second(SegmentDataset(tracks, frames, args.examples, seed=0), args.examples)
                     for tracks in (load_musdb_folder(root, "train", SOURCES), decoded)]
            print(f"{recipe:<10} {rates[0]:>18.2f} {rates[1]:>15.2f} {rates[1] / rates[0]:>8.1f}x", flush=True)


if __name__ == "__main__":
    main()
