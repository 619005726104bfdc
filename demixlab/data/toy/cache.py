"""The toy dataset on disk: generated once per spec into the cache, atomically, and found again.

Layout: ``ROOT/{train,valid,test}/<track>/{mixture,drums,bass,other,vocals}.wav``, stereo,
32-bit float WAV, with ``mixture`` the exact float32 sum of the stems in TOY_SOURCES order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .synthesis import SPLITS, ToySpec, mix_stems, synthesize_track, track_seed

logger = logging.getLogger("demixlab.data.toy")

GENERATOR_VERSION = 1  # bump when the audio changes; part of the cache folder name

_STALE_SECONDS = 3600.0  # a temp folder untouched this long belongs to a dead generator
_TEMP_GLOB = ".toy-v*.tmp"
_WAVE_FORMAT_IEEE_FLOAT = 3


def ensure_toy_dataset(spec: ToySpec, cache_root: Path, progress: bool = True) -> Path:
    """Return the dataset root for `spec` under cache_root, generating it first if needed.

    Generation happens in a temporary sibling folder that is renamed into place at the end, so
    the root exists only when complete; concurrent callers each generate and the first rename
    wins. Temp folders left by crashed generators are removed once they are an hour old.
    """
    cache_root = Path(cache_root)
    root = cache_root / toy_dataset_name(spec)
    # The root only ever appears through the atomic rename below: existing means complete.
    if root.is_dir():
        return root
    cache_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache_root)
    total = spec.train_tracks + spec.valid_tracks + spec.test_tracks
    logger.info("Generating the toy dataset (%d tracks) in %s", total, root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=cache_root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset should not be
        _generate(spec, tmp, progress)
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.is_dir():
                raise
            logger.info("Another process generated %s first, using it", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def toy_dataset_name(spec: ToySpec) -> str:
    """Folder name of `spec`'s dataset: generator version plus a short hash of the spec."""
    fields = dataclasses.asdict(spec)
    # 12 and 12.0 must name the same folder, as they give the same audio.
    fields["train_duration"] = float(spec.train_duration)
    fields["eval_duration"] = float(spec.eval_duration)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return f"toy-v{GENERATOR_VERSION}-{digest}"


def _generate(spec: ToySpec, out: Path, progress: bool) -> None:
    """Write every track of `spec` under `out`."""
    jobs = []
    for split in SPLITS:
        (out / split).mkdir()
        count, duration = spec.split(split)
        jobs += [(split, index, duration) for index in range(count)]

    def write(job: tp.Tuple[str, int, float]) -> None:
        split, index, duration = job
        stems = synthesize_track(track_seed(spec.seed, split, index), duration, spec.samplerate)
        folder = out / split / f"toy_{split}_{index:03d}"
        folder.mkdir()
        for name, wav in [("mixture", mix_stems(stems)), *stems.items()]:
            _write_wav(folder / f"{name}.wav", wav, spec.samplerate)

    # numpy releases the GIL in its heavy loops, so threads give most of a second core.
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        for _ in tqdm(pool.map(write, jobs), total=len(jobs), desc="toy dataset", unit="track",
                      disable=not progress):
            pass


def _write_wav(path: Path, wav: np.ndarray, samplerate: int) -> None:
    """Write (channels, time) float32 audio as a 32-bit float WAV, byte-identical for equal input.

    The RIFF layout is written here (a `fmt ` chunk of WAVE_FORMAT_IEEE_FLOAT, a `fact` chunk,
    the interleaved little-endian samples) because libsndfile adds a PEAK chunk holding the time
    of writing to float WAVs, so its files would depend on the clock.
    """
    channels, frames = wav.shape
    data = np.ascontiguousarray(wav.T, dtype="<f4").tobytes()
    block = 4 * channels
    fmt = struct.pack("<HHIIHHH", _WAVE_FORMAT_IEEE_FLOAT, channels, samplerate, samplerate * block, block, 32, 0)
    chunks = [b"fmt ", struct.pack("<I", len(fmt)), fmt, b"fact", struct.pack("<II", 4, frames),
              b"data", struct.pack("<I", len(data)), data]
    body = b"WAVE" + b"".join(chunks)
    with open(path, "wb") as handle:
        handle.write(b"RIFF" + struct.pack("<I", len(body)) + body)


def _remove_stale_temps(cache_root: Path) -> None:
    """Delete temp folders of generators that died (nothing in them changed for an hour)."""
    now = time.time()
    for folder in cache_root.glob(_TEMP_GLOB):
        try:
            newest = max([folder.stat().st_mtime] + [
                os.stat(os.path.join(parent, name)).st_mtime
                for parent, dirs, files in os.walk(folder) for name in dirs + files])
        except OSError:  # vanished meanwhile: its generator just finished
            continue
        if now - newest > _STALE_SECONDS:
            logger.info("Removing the stale temporary folder %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
