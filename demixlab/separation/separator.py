"""Python API for separation.

    from demixlab.separation import Separator
    separator = Separator("release_models", "my_bag", device="cpu")
    stems, samplerate = separator.separate_file("song.flac")   # {"drums": (C, T) tensor, ...}
    stems = separator.separate_tensor(wav, 48000)                # wav: (C, T) or (B, C, T)
    for mixture, stems in separator.separate_stream(blocks, 44100):  # blocks: (C, n) tensors
        ...                                                      # aligned blocks, bounded memory
    live = separator.stream()                  # causal models only, at the model's rate
    stems = live.push(block)                   # {"drums": (C, n)...}, live.latency samples late

Input of any sample rate and channel count is converted to the model's (julius resampling) and
the stems are converted back: same sample rate and length as the input, and the input's channel
count when it is mono (a mono input gives mono stems; other inputs give the model's channels).
"""
import collections
import typing as tp
from pathlib import Path

import torch

from ..audio import BlockResampler, convert_audio, convert_channels, load_audio_file
from ..errors import DemixError
from ..release.repository import Bag, Repository
from .bags import apply_bag
from .chunking import DEFAULT_BATCH_CHUNKS, check_batch_chunks, check_jobs
from .onnx_backend import BACKENDS, OnnxRuntimeModel
from .realtime import StreamingSeparator
from .streaming import stream_bag, take_samples


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
        backend: `torch`, or `onnxruntime` to run each model's network from its ONNX export
            (`NAME.onnx` next to `NAME.th`, see :mod:`demixlab.release.onnx_export`); the rest of
            the model (STFT, Wiener EM...) and the chunking stay the same.
        jobs: batches of chunks separated in parallel threads that share torch's intra-op threads;
            None (the default): on the CPU, one batch per intra-op thread for models that gain from it
            (HTDemucs, HDemucs...: see README), one at a time otherwise. The stems are the same.
        batch_chunks: chunks stacked into one forward pass (the same stems in fewer, larger passes;
            memory grows with it; on the CPU the default chunks side by side are faster for
            HTDemucs, see README).
        progress: show progress bars (stderr).
    """

    def __init__(self, repo: tp.Union[str, Path], name: str, *, device: str = "cpu",
                 segment: tp.Optional[float] = None, split: bool = True, overlap: float = 0.25, shifts: int = 0,
                 overrides: tp.Optional[tp.Mapping[str, tp.Any]] = None, jobs: tp.Optional[int] = None,
                 progress: bool = False, seed: int = 0, backend: str = "torch",
                 batch_chunks: int = DEFAULT_BATCH_CHUNKS):
        if backend not in BACKENDS:
            raise DemixError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        if segment is not None and segment <= 0:
            raise DemixError(f"segment must be a positive number of seconds, got {segment}")
        if shifts < 0:
            raise DemixError(f"shifts must be >= 0, got {shifts}")
        check_batch_chunks(batch_chunks)
        check_jobs(jobs)
        self.device = resolve_device(device)
        self.bag: Bag = Repository(repo).load(name, overrides=overrides).build(self.device)
        if backend == "onnxruntime":
            if self.device.type != "cpu":
                raise DemixError("--backend onnxruntime runs on the CPU: use --device cpu")
            for member in self.bag.members:
                if member.model is not None:
                    member.model = OnnxRuntimeModel(member.model, Path(repo) / f"{member.name}.th", member.name)
        self.segment = segment
        self.split = split
        self.overlap = overlap
        self.shifts = shifts
        self.jobs = jobs
        self.batch_chunks = batch_chunks
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
                              shifts=self.shifts, jobs=self.jobs, progress=self.progress, generator=generator,
                              batch_chunks=self.batch_chunks)
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

    def separate_stream(self, blocks: tp.Iterable[torch.Tensor], samplerate: int
                        ) -> tp.Iterator[tp.Tuple[torch.Tensor, tp.Dict[str, torch.Tensor]]]:
        """Separate a signal given as consecutive (C, n) or (B, C, n) blocks at `samplerate`.

        Yields (mixture, {stem: signal}) pairs of consecutive, aligned blocks: the input's own
        samples and the stems :meth:`separate_tensor` gives for the whole signal (same values within
        float rounding), while only about one chunk per model stays in memory. Resampling runs
        block by block (:class:`~demixlab.audio.BlockResampler`); no progress bar is shown.
        """
        mixtures: tp.Deque[torch.Tensor] = collections.deque()
        state: tp.Dict[str, tp.Any] = {"length": 0, "done": False, "shape": None, "estimate_shape": None}
        to_model = BlockResampler(samplerate, self.bag.samplerate)
        from_model = BlockResampler(self.bag.samplerate, samplerate)

        def model_blocks() -> tp.Iterator[torch.Tensor]:
            for block in blocks:
                if block.dim() not in (2, 3) or (state["shape"] is not None and (
                        block.dim(), block.shape[:-1]) != state["shape"]):
                    raise DemixError(f"expected consecutive (channels, time) or (batch, channels, time) blocks "
                                     f"of one shape, got {tuple(block.shape)}")
                state["shape"] = (block.dim(), block.shape[:-1])
                block = (block if block.dim() == 3 else block[None]).float()
                mixtures.append(block)
                state["length"] += block.shape[-1]
                converted = to_model.push(convert_channels(block, self.bag.audio_channels))
                if converted.shape[-1]:
                    yield converted
            state["done"] = True
            rest = to_model.finish()
            if rest.shape[-1]:
                yield rest

        pending: tp.Deque[torch.Tensor] = collections.deque()
        emitted = 0

        def ready(final: bool) -> tp.Iterator[tp.Tuple[torch.Tensor, tp.Dict[str, torch.Tensor]]]:
            nonlocal emitted
            count = max(0, min(sum(block.shape[-1] for block in pending), state["length"] - emitted))
            missing = state["length"] - emitted - count if final else 0  # resampling may give a sample less
            if count + missing <= 0:
                return
            estimate = take_samples(pending, count, state["estimate_shape"])
            if missing > 0:
                estimate = torch.nn.functional.pad(estimate, (0, missing))
            emitted += estimate.shape[-1]
            mixture = take_samples(mixtures, estimate.shape[-1], None)
            batched = state["shape"][0] == 3
            stems = {}
            for index, source in enumerate(self.bag.sources):
                stem = estimate[:, index]
                if mixture.shape[-2] == 1:
                    stem = convert_channels(stem, 1)
                stems[source] = stem if batched else stem[0]
            yield (mixture if batched else mixture[0]), stems

        generator = torch.Generator().manual_seed(self.seed)
        for estimate in stream_bag(self.bag, model_blocks(), segment=self.segment, split=self.split,
                                   overlap=self.overlap, shifts=self.shifts, jobs=self.jobs, generator=generator,
                                   batch_chunks=self.batch_chunks):
            state["estimate_shape"] = estimate.shape[:-1]
            pending.append(from_model.push(estimate))
            yield from ready(final=False)
        rest = from_model.finish()
        if rest.shape[-1]:
            pending.append(rest)
        yield from ready(final=True)

    def stream(self) -> StreamingSeparator:
        """A :class:`~demixlab.separation.realtime.StreamingSeparator` for one live stream at the
        model's rate: blocks of any size in, the stems of each block out, `latency` samples late.
        Only for causal models (a declared lookahead); others are a one-line error naming the family."""
        return StreamingSeparator(self.bag)

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
