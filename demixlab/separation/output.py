"""What `demixlab separate` writes: which stems, how clipping is avoided, and writing them block
by block.

:class:`StemFiles` writes the stems of one track as the blocks arrive, to temporary files renamed
onto their targets only when the whole track succeeded (a failure midway leaves no stem behind).
With `--clip-mode rescale` the scale depends on a stem's peak over the whole track, so the stems
are first spooled to raw float32 files beside the targets, then scaled into their format.
"""
import contextlib
import os
import sys
import tempfile
import typing as tp
from pathlib import Path

import numpy as np
import torch

from ..audio import AudioWriter, convert_channels
from ..errors import DemixError
from ..files import atomic_paths

CLIP_MODES = ("rescale", "clamp", "none")
SPOOL_FRAMES = 1 << 16


def prevent_clip(wav: torch.Tensor, mode: str) -> torch.Tensor:
    """`rescale`: divide by the peak when above 1 (slightly more, so int formats do not clip);
    `clamp`: clip samples to [-0.99, 0.99]; `none`: unchanged."""
    if mode == "rescale":
        return wav / rescale_factor(float(wav.abs().max()))
    if mode == "clamp":
        return wav.clamp(-0.99, 0.99)
    return wav


def rescale_factor(peak: float) -> float:
    """What `rescale` divides a stem of this peak by (1 when it cannot clip)."""
    return max(1.01 * peak, 1.0)


def select_stems(stems: tp.Dict[str, torch.Tensor], mixture: torch.Tensor, two_stems: tp.Optional[str],
                 wanted: tp.Optional[tp.Sequence[str]]) -> tp.Dict[str, torch.Tensor]:
    """The stems to write: `two_stems` gives STEM and no_STEM (mixture minus STEM), `wanted` a subset.
    Works on whole signals and on aligned blocks alike."""
    if two_stems is not None:
        main = stems[two_stems]
        return {two_stems: main, f"no_{two_stems}": _match_channels(mixture, main) - main}
    if wanted:
        return {stem: stems[stem] for stem in wanted}
    return stems


def _match_channels(mixture: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mixture.shape[-2] == like.shape[-2]:
        return mixture
    return convert_channels(mixture, like.shape[-2])


class StemFiles:
    """Write {stem: (C, n) block} dicts to `targets[stem]`, atomically as a group (module docstring).

    Use as a context manager: the files appear when the block exits without an exception, and
    every temporary file is removed otherwise. `subtype` and `clip_mode` are `demixlab separate`'s.
    """

    def __init__(self, targets: tp.Mapping[str, Path], samplerate: int, subtype: str, clip_mode: str):
        if clip_mode not in CLIP_MODES:
            raise DemixError(f"unknown clip mode {clip_mode!r}: expected one of {', '.join(CLIP_MODES)}")
        self.targets = {stem: Path(path) for stem, path in targets.items()}
        self.samplerate, self.subtype, self.clip_mode = int(samplerate), subtype, clip_mode
        self._stack = contextlib.ExitStack()
        self._writers: tp.Dict[str, AudioWriter] = {}
        self._spools: tp.Dict[str, tp.Tuple[Path, tp.BinaryIO]] = {}
        self._peaks: tp.Dict[str, float] = {}
        self._channels: tp.Dict[str, int] = {}

    def __enter__(self) -> "StemFiles":
        try:
            self._open()
        except OSError as error:
            self._abort()
            raise DemixError(f"{next(iter(self.targets.values())).parent}: cannot write the stems "
                             f"({error.strerror or error})") from None
        except BaseException:
            self._abort()
            raise
        return self

    def _open(self) -> None:
        temporaries = self._stack.enter_context(atomic_paths(list(self.targets.values())))
        for (stem, target), tmp in zip(self.targets.items(), temporaries):
            self._writers[stem] = AudioWriter(tmp, target, self.samplerate, self.subtype)
            if self.clip_mode == "rescale":
                fd, spool = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".spool", dir=target.parent)
                self._spools[stem] = (Path(spool), os.fdopen(fd, "w+b"))
                self._stack.callback(os.unlink, spool)
                self._stack.callback(self._spools[stem][1].close)
                self._peaks[stem] = 0.0

    def write(self, stems: tp.Mapping[str, torch.Tensor]) -> None:
        """Append the next block of every stem."""
        for stem, block in stems.items():
            if self.clip_mode != "rescale":
                self._writers[stem].write(prevent_clip(block, self.clip_mode))
                continue
            self._peaks[stem] = max(self._peaks[stem], float(block.abs().max())) if block.numel() else self._peaks[stem]
            self._channels[stem] = block.shape[0]
            _, handle = self._spools[stem]
            try:
                handle.write(np.ascontiguousarray(block.detach().cpu().numpy().T, dtype=np.float32).tobytes())
            except OSError as error:
                raise DemixError(f"{self.targets[stem]}: cannot write audio ({error.strerror or error})") from None

    def _rescale(self) -> None:
        for stem, (_, handle) in self._spools.items():
            channels = self._channels.get(stem, 1)
            factor = rescale_factor(self._peaks[stem])
            try:
                handle.flush()
                handle.seek(0)
            except OSError as error:
                raise DemixError(f"{self.targets[stem]}: cannot write audio ({error.strerror or error})") from None
            while True:
                data = handle.read(SPOOL_FRAMES * channels * 4)
                if not data:
                    break
                block = torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(-1, channels).T.copy())
                self._writers[stem].write(block / factor)

    def __exit__(self, kind: tp.Any, error: tp.Any, trace: tp.Any) -> None:
        if kind is None:
            try:
                self._rescale()
                for writer in self._writers.values():
                    writer.close()
            except BaseException:
                self._abort()
                raise
            self._stack.__exit__(None, None, None)  # renames the files onto their targets
            return
        self._abort()

    def _abort(self) -> None:
        """Close every file and remove the temporary ones (called while an exception propagates)."""
        for writer in self._writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        self._stack.__exit__(*sys.exc_info())
