"""Python API for separation.

    from demixlab.separation import Separator
    separator = Separator("release_models", "my_bag", device="cpu")
    stems, samplerate = separator.separate_file("song.flac")   # {"drums": (C, T) tensor, ...}
    stems = separator.separate_tensor(wav, 48000)                # wav: (C, T) or (B, C, T)

Input of any sample rate and channel count is converted to the model's (julius resampling) and
the stems are converted back: same sample rate and length as the input, and the input's channel
count when it is mono (a mono input gives mono stems; other inputs give the model's channels).
"""
import typing as tp
from pathlib import Path

import torch

from ..audio import convert_audio, convert_channels, load_audio_file
from ..errors import DemixError
from ..release.repository import Bag, Repository
from .bags import apply_bag


class Separator:
    """Separate audio with a model or bag of a repository (see :mod:`demixlab.release.repository`).

    Args:
        repo: the repository folder.
        name: the model or bag to use.
        device: where the models run (`cpu`, `cuda`, `cuda:1`...; `auto` picks CUDA when available).
        segment: seconds per chunk (default: the bag's or model file's segment); None with
            `split=False` runs whole tracks at once.
        overlap: fraction of a chunk shared with the next.
        shifts: random time shifts averaged (the shift trick; 0 disables).
        overrides: constructor options changed at load time, e.g. {"wiener_iterations": 0}.
        jobs: chunks separated in parallel threads.
        progress: show progress bars (stderr).
    """

    def __init__(self, repo: tp.Union[str, Path], name: str, *, device: str = "cpu",
                 segment: tp.Optional[float] = None, split: bool = True, overlap: float = 0.25, shifts: int = 0,
                 overrides: tp.Optional[tp.Mapping[str, tp.Any]] = None, jobs: int = 1, progress: bool = False,
                 seed: int = 0):
        if segment is not None and segment <= 0:
            raise DemixError(f"segment must be a positive number of seconds, got {segment}")
        if shifts < 0:
            raise DemixError(f"shifts must be >= 0, got {shifts}")
        self.device = resolve_device(device)
        self.bag: Bag = Repository(repo).load(name, overrides=overrides).build(self.device)
        self.segment = segment
        self.split = split
        self.overlap = overlap
        self.shifts = shifts
        self.jobs = jobs
        self.progress = progress
        self.seed = seed

    @property
    def sources(self) -> tp.List[str]:
        """The stems produced, in order."""
        return list(self.bag.sources)

    @property
    def samplerate(self) -> int:
        """The rate the models run at (inputs are resampled to it and back)."""
        return self.bag.samplerate

    def separate_tensor(self, wav: torch.Tensor, samplerate: int) -> tp.Dict[str, torch.Tensor]:
        """Separate a (C, T) or (B, C, T) signal sampled at `samplerate` into {stem: signal}, each
        of the input's length and rate (see the module docstring for the channels)."""
        if wav.dim() not in (2, 3) or wav.shape[-1] == 0:
            raise DemixError(f"expected a (channels, time) or (batch, channels, time) signal, got {tuple(wav.shape)}")
        batched = wav.dim() == 3
        mixture = wav if batched else wav[None]
        channels = mixture.shape[-2]
        length = mixture.shape[-1]
        converted = convert_audio(mixture.float(), samplerate, self.bag.samplerate, self.bag.audio_channels)
        generator = torch.Generator().manual_seed(self.seed)
        estimates = apply_bag(self.bag, converted, segment=self.segment, split=self.split, overlap=self.overlap,
                              shifts=self.shifts, jobs=self.jobs, progress=self.progress, generator=generator)
        del converted
        stems = {}
        for index, source in enumerate(self.bag.sources):
            stem = estimates[:, index]
            if samplerate != self.bag.samplerate:
                stem = convert_audio(stem, self.bag.samplerate, samplerate, stem.shape[-2])
            stem = _fit_length(stem, length)
            if channels == 1:
                stem = convert_channels(stem, 1)
            stems[source] = stem if batched else stem[0]
        return stems

    def separate_file(self, path: tp.Union[str, Path]) -> tp.Tuple[tp.Dict[str, torch.Tensor], int]:
        """Read an audio file (anything soundfile reads, else through ffmpeg when it is on PATH)
        and separate it: returns ({stem: (C, T) signal}, the file's sample rate)."""
        wav, samplerate = load_audio_file(path)
        return self.separate_tensor(wav, samplerate), samplerate


def _fit_length(wav: torch.Tensor, length: int) -> torch.Tensor:
    if wav.shape[-1] >= length:
        return wav[..., :length]
    return torch.nn.functional.pad(wav, (0, length - wav.shape[-1]))


def resolve_device(name: str) -> torch.device:
    """A `--device` value (cpu, cuda, cuda:N or auto: CUDA when available) as a torch device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DemixError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemixError(f"--device {name}: no CUDA device is available")
    return device
