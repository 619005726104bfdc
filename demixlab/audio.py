"""Audio file reading, writing and conversion (soundfile + julius, no torchaudio needed)."""
import os
import shutil
import subprocess
import tempfile
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import julius
import numpy as np
import soundfile as sf
import torch

from .errors import DemixError
from .files import atomic_path


@dataclass(frozen=True)
class AudioInfo:
    """Shape and rate of an audio file, read from its header."""

    samplerate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.samplerate


def audio_info(path: tp.Union[str, Path]) -> AudioInfo:
    """Read the header of an audio file. Raises :class:`DemixError` naming the file if unreadable."""
    try:
        info = sf.info(str(path))
    except Exception as error:
        raise DemixError(f"{path}: cannot read audio header ({_short(error)})") from None
    if info.frames <= 0:
        raise DemixError(f"{path}: audio file is empty")
    return AudioInfo(samplerate=int(info.samplerate), channels=int(info.channels), frames=int(info.frames))


def read_audio(path: tp.Union[str, Path], offset: int = 0, frames: int = -1) -> np.ndarray:
    """Read `frames` samples (all if -1) from `offset` as a float32 array of shape (channels, time).

    Reading past the end returns fewer frames. Raises :class:`DemixError` naming the file when
    it cannot be decoded or holds NaN/Inf samples.
    """
    try:
        with sf.SoundFile(str(path)) as handle:
            if offset:
                handle.seek(offset)
            data = handle.read(frames, dtype="float32", always_2d=True)
    except Exception as error:
        raise DemixError(f"{path}: cannot read audio ({_short(error)})") from None
    data = data.T
    if not np.isfinite(data).all():
        raise DemixError(f"{path}: audio contains NaN or infinite samples")
    return np.ascontiguousarray(data)


def load_audio_file(path: tp.Union[str, Path]) -> tp.Tuple[torch.Tensor, int]:
    """Read a whole audio file as a float32 (C, T) tensor and its sample rate.

    Files soundfile cannot decode go through `ffmpeg` when it is on PATH; otherwise, or when
    ffmpeg fails too, a :class:`DemixError` names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DemixError(f"{path}: no such file")
    try:
        samplerate = int(sf.info(str(path)).samplerate)
    except Exception:
        return _load_with_ffmpeg(path)
    wav = read_audio(path)
    if wav.shape[-1] == 0:
        raise DemixError(f"{path}: audio file is empty")
    return torch.from_numpy(wav), samplerate


def _load_with_ffmpeg(path: Path) -> tp.Tuple[torch.Tensor, int]:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise DemixError(f"{path}: cannot read this audio format (install ffmpeg to read more formats)")
    with tempfile.TemporaryDirectory(prefix="demixlab-") as folder:
        decoded = os.path.join(folder, "decoded.wav")
        result = subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-vn", "-acodec", "pcm_f32le",
                                 "-f", "wav", decoded], capture_output=True, text=True, check=False)
        if result.returncode != 0 or not os.path.exists(decoded):
            detail = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise DemixError(f"{path}: cannot read audio, neither soundfile nor ffmpeg decodes it ({detail})")
        samplerate = int(sf.info(decoded).samplerate)
        wav = read_audio(decoded)
    if wav.shape[-1] == 0:
        raise DemixError(f"{path}: audio file is empty")
    return torch.from_numpy(wav), samplerate


WAV_SUBTYPES = {"int16": "PCM_16", "int24": "PCM_24", "float32": "FLOAT"}


def write_audio(path: tp.Union[str, Path], wav: tp.Union[np.ndarray, torch.Tensor], samplerate: int,
                subtype: str = "float32") -> None:
    """Write a (channels, time) signal atomically. The format follows the file extension
    (wav, flac, ogg, mp3); `subtype` is one of int16, int24, float32 for WAV."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    path = Path(path)
    kwargs = sound_format(path, subtype)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.asarray(wav, dtype=np.float32).T, samplerate, **kwargs)


def sound_format(path: Path, subtype: str) -> tp.Dict[str, tp.Any]:
    """soundfile's `format` and `subtype` for writing `path` (by its extension: wav, flac, ogg, mp3)
    with the sample format `subtype` (int16, int24 or float32; FLAC stores float32 as 24 bits)."""
    ext = Path(path).suffix.lower().lstrip(".")
    kwargs: tp.Dict[str, tp.Any] = {}
    if ext == "wav":
        if subtype not in WAV_SUBTYPES:
            raise DemixError(f"unknown WAV sample format {subtype!r}: expected one of {sorted(WAV_SUBTYPES)}")
        kwargs["subtype"] = WAV_SUBTYPES[subtype]
    elif ext == "flac":
        kwargs["subtype"] = "PCM_24" if subtype in ("int24", "float32") else "PCM_16"
    kwargs["format"] = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "mp3": "MP3"}.get(ext)
    if kwargs["format"] is None:
        raise DemixError(f"{path}: unsupported output extension .{ext} (expected wav, flac, ogg or mp3)")
    return kwargs


class AudioWriter:
    """Write a (C, n)-block stream to `tmp` in the format `target`'s extension names (see
    :func:`sound_format`); the file opens at the first block. Write errors (a full disk...) are
    :class:`DemixError` naming `target`."""

    def __init__(self, tmp: Path, target: Path, samplerate: int, subtype: str = "float32"):
        self.tmp, self.target, self.samplerate = Path(tmp), Path(target), int(samplerate)
        self.kwargs = sound_format(self.target, subtype)
        self._handle: tp.Optional[sf.SoundFile] = None

    def write(self, block: tp.Union[np.ndarray, torch.Tensor]) -> None:
        """Append a (channels, n) block."""
        if isinstance(block, torch.Tensor):
            block = block.detach().cpu().numpy()
        try:
            if self._handle is None:
                self._handle = sf.SoundFile(str(self.tmp), "w", self.samplerate, block.shape[0], **self.kwargs)
            self._handle.write(np.asarray(block, dtype=np.float32).T)
        except Exception as error:
            raise DemixError(f"{self.target}: cannot write audio ({_short(error)})") from None

    def close(self) -> None:
        """Flush and close the file."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            try:
                handle.close()
            except Exception as error:
                raise DemixError(f"{self.target}: cannot write audio ({_short(error)})") from None


def convert_audio(wav: torch.Tensor, from_samplerate: int, to_samplerate: int, channels: int) -> torch.Tensor:
    """Convert a (..., channels, time) signal to `channels` channels (see :func:`convert_channels`)
    and `to_samplerate` Hz (julius' polyphase resampling)."""
    wav = convert_channels(wav, channels)
    if from_samplerate != to_samplerate:
        wav = julius.resample_frac(wav, from_samplerate, to_samplerate)
    return wav


# ITU-R BS.775 down-mix to stereo of the usual layouts (WAV channel order): per input channel, its
# gains into left and right. Centre and surrounds enter at -3 dB, the LFE is left out.
_MINUS_3DB = 0.7071067811865476
_STEREO_DOWNMIX = {
    3: [(1, 0), (0, 1), (_MINUS_3DB, _MINUS_3DB)],  # L R C
    4: [(1, 0), (0, 1), (_MINUS_3DB, 0), (0, _MINUS_3DB)],  # L R Ls Rs (quad)
    5: [(1, 0), (0, 1), (_MINUS_3DB, _MINUS_3DB), (_MINUS_3DB, 0), (0, _MINUS_3DB)],  # L R C Ls Rs (5.0)
    6: [(1, 0), (0, 1), (_MINUS_3DB, _MINUS_3DB), (0, 0), (_MINUS_3DB, 0), (0, _MINUS_3DB)],  # 5.1
    8: [(1, 0), (0, 1), (_MINUS_3DB, _MINUS_3DB), (0, 0), (_MINUS_3DB, 0), (0, _MINUS_3DB),  # 7.1
        (_MINUS_3DB, 0), (0, _MINUS_3DB)],
}


def downmix_matrix(channels: int) -> torch.Tensor:
    """The (2, channels) stereo down-mix of a `channels`-channel layout: ITU-R BS.775 for 3.0, quad,
    5.0, 5.1 and 7.1 (centre and surrounds at -3 dB, LFE dropped); other counts put odd channels
    left and even ones right. Rows are scaled so that no output can exceed the loudest input."""
    if channels in _STEREO_DOWNMIX:
        matrix = torch.tensor(_STEREO_DOWNMIX[channels], dtype=torch.float64).t()
    else:
        matrix = torch.zeros(2, channels, dtype=torch.float64)
        matrix[0, 0::2] = 1.0
        matrix[1, 1::2] = 1.0
    return (matrix / matrix.sum(dim=1, keepdim=True)).float()


def convert_channels(wav: torch.Tensor, channels: int) -> torch.Tensor:
    """Change the channel count of a (..., channels, time) signal.

    From mono: the channel repeated. To stereo from more channels: the standard down-mix of
    :func:`downmix_matrix` (a 5.1 file keeps its centre, where vocals live). To mono: the average
    of the stereo down-mix (of the channels themselves from stereo). Any other change (e.g. stereo
    to 5.1) is a :class:`DemixError`.
    """
    current = wav.shape[-2]
    if current == channels:
        return wav
    if current == 1:
        return wav.expand(*wav.shape[:-2], channels, wav.shape[-1])
    if current > 2 and channels <= 2:
        matrix = downmix_matrix(current).to(device=wav.device, dtype=wav.dtype)
        wav = torch.einsum("oc,...ct->...ot", matrix, wav)
        current = 2
    if channels == 1:
        return wav.mean(dim=-2, keepdim=True)
    if current == channels:
        return wav
    raise DemixError(f"cannot convert {current}-channel audio to {channels} channels")


def _short(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------------------- block-wise audio I/O
BLOCK_FRAMES = 1 << 16
"""Frames per block when reading a file block by block (about 1.5 s at 44.1 kHz)."""


class AudioReader:
    """Read an audio file block by block, in memory that does not grow with the file's length.

    soundfile reads what it decodes (WAV, FLAC, OGG, MP3); anything else is decoded by an `ffmpeg`
    process into a pipe (float32 WAV), when ffmpeg is on PATH. Iterating yields float32 (C, n)
    tensors of at most `blocksize` frames, the same samples :func:`load_audio_file` reads. Errors
    (unreadable, empty, NaN/Inf samples, ffmpeg failing midway) are :class:`DemixError` naming the file.

    Attributes:
        samplerate, channels: the file's.
        frames: the length from the header, or None when decoding through ffmpeg (unknown until the end).
    """

    def __init__(self, path: tp.Union[str, Path], blocksize: int = BLOCK_FRAMES):
        self.path = Path(path)
        self.blocksize = int(blocksize)
        self._process: tp.Optional[subprocess.Popen] = None
        self._errors: tp.Optional[tp.IO[bytes]] = None
        self._handle: tp.Optional[sf.SoundFile] = None
        if not self.path.is_file():
            raise DemixError(f"{self.path}: no such file")
        try:
            self._handle = sf.SoundFile(str(self.path))
        except Exception:
            self._open_ffmpeg()
            return
        self.samplerate = int(self._handle.samplerate)
        self.channels = int(self._handle.channels)
        self.frames: tp.Optional[int] = int(self._handle.frames)
        if self.frames <= 0:
            self.close()
            raise DemixError(f"{self.path}: audio file is empty")

    def _open_ffmpeg(self) -> None:
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None:
            raise DemixError(f"{self.path}: cannot read this audio format (install ffmpeg to read more formats)")
        self._errors = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [ffmpeg, "-nostdin", "-v", "error", "-i", str(self.path), "-vn", "-acodec", "pcm_f32le", "-f", "wav", "-"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._errors)
        try:
            self.channels, self.samplerate = self._wav_header()
        except DemixError:
            self.close()
            raise
        self.frames = None

    def _pipe_read(self, size: int) -> bytes:
        assert self._process is not None and self._process.stdout is not None
        chunks, missing = [], size
        while missing > 0:
            data = self._process.stdout.read(missing)
            if not data:
                break
            chunks.append(data)
            missing -= len(data)
        return b"".join(chunks)

    def _ffmpeg_failure(self) -> DemixError:
        assert self._process is not None and self._errors is not None
        self._process.wait()
        self._errors.seek(0)
        lines = self._errors.read().decode(errors="replace").strip().splitlines()
        return DemixError(f"{self.path}: cannot read audio, neither soundfile nor ffmpeg decodes it "
                          f"({lines[-1] if lines else 'unknown error'})")

    def _wav_header(self) -> tp.Tuple[int, int]:
        """(channels, samplerate) of ffmpeg's WAV stream; leaves the pipe at the first sample."""
        riff = self._pipe_read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            raise self._ffmpeg_failure()
        fmt: tp.Optional[bytes] = None
        while True:
            header = self._pipe_read(8)
            if len(header) < 8:
                raise self._ffmpeg_failure()
            size = int.from_bytes(header[4:], "little")
            if header[:4] == b"data":
                break
            body = self._pipe_read(size + (size & 1))
            if header[:4] == b"fmt ":
                fmt = body
        if fmt is None or len(fmt) < 8:
            raise self._ffmpeg_failure()
        return int.from_bytes(fmt[2:4], "little"), int.from_bytes(fmt[4:8], "little")

    def __iter__(self) -> tp.Iterator[torch.Tensor]:
        read = 0
        while True:
            block = self._read_block()
            if block is None:
                break
            if not np.isfinite(block).all():
                raise DemixError(f"{self.path}: audio contains NaN or infinite samples")
            read += block.shape[-1]
            yield torch.from_numpy(block)
        if read == 0:
            raise DemixError(f"{self.path}: audio file is empty")

    def _read_block(self) -> tp.Optional[np.ndarray]:
        if self._handle is not None:
            try:
                data = self._handle.read(self.blocksize, dtype="float32", always_2d=True)
            except Exception as error:
                raise DemixError(f"{self.path}: cannot read audio ({_short(error)})") from None
            return np.ascontiguousarray(data.T) if len(data) else None
        frame_bytes = 4 * self.channels
        data = self._pipe_read(self.blocksize * frame_bytes)
        if len(data) < frame_bytes:
            assert self._process is not None
            if self._process.wait() != 0:
                raise self._ffmpeg_failure()
            return None
        usable = len(data) - len(data) % frame_bytes
        return np.frombuffer(data[:usable], dtype="<f4").reshape(-1, self.channels).T.astype(np.float32)

    def close(self) -> None:
        """Close the file, or stop the ffmpeg process."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            assert self._process.stdout is not None
            self._process.stdout.close()
            self._process = None
        if self._errors is not None:
            self._errors.close()
            self._errors = None

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.close()


class BlockResampler:
    """julius' polyphase resampling (:func:`convert_audio`) applied block by block.

    `push(block)` returns the output samples whose filter support is complete; `finish()` the rest,
    up to the `floor(new * T / old)` samples julius gives for the whole (..., T) signal (the ends
    replicate the first and last samples, as julius pads). The output equals julius' on the whole
    signal within float rounding, while only a few filter lengths of input stay in memory.
    """

    def __init__(self, old_samplerate: int, new_samplerate: int):
        self.identity = old_samplerate == new_samplerate
        self._resample = julius.ResampleFrac(int(old_samplerate), int(new_samplerate))
        if not self.identity:
            self.old = self._resample.old_sr
            self.new = self._resample.new_sr
            kernel_length = self._resample.kernel.shape[-1]
            self.width = (kernel_length - self.old) // 2
        self._buffer: tp.Optional[torch.Tensor] = None
        self._buffer_start = 0  # input position of the buffer's first sample
        self._received = 0  # input samples pushed so far
        self._step = 0  # next output step (each gives `new` samples, from input `step * old - width` on)
        self._first: tp.Optional[torch.Tensor] = None

    def push(self, block: torch.Tensor) -> torch.Tensor:
        """Add the next (..., n) input samples; return the (..., m) output samples now complete."""
        if self.identity:
            return block
        if self._first is None:
            self._first = block[..., :1]
            self._buffer = block[..., :0]
        assert self._buffer is not None
        self._buffer = torch.cat([self._buffer, block], dim=-1)
        self._received += block.shape[-1]
        steps = max(0, (self._received - self.width) // self.old)
        return self._run(steps, final_length=None)

    def finish(self) -> torch.Tensor:
        """The remaining output samples of the whole signal pushed."""
        if self.identity or self._buffer is None:
            return torch.zeros(0) if self._buffer is None else self._buffer[..., :0]
        total = self.new * self._received // self.old
        steps = -(-total // self.new)
        return self._run(steps, final_length=total)

    def _run(self, steps: int, final_length: tp.Optional[int]) -> torch.Tensor:
        assert self._buffer is not None and self._first is not None
        if steps <= self._step:
            return self._buffer.new_zeros(*self._buffer.shape[:-1], 0)
        begin = self._step * self.old - self.width
        end = steps * self.old + self.width
        window = self._buffer[..., max(begin, self._buffer_start) - self._buffer_start:
                              min(end, self._received) - self._buffer_start]
        left = self._first.expand(*self._first.shape[:-1], max(0, -begin))
        right = self._buffer[..., -1:].expand(*self._buffer.shape[:-1], max(0, end - self._received))
        window = torch.cat([left, window, right], dim=-1)
        shape = window.shape[:-1]
        kernel = self._resample.kernel.to(window)
        out = torch.nn.functional.conv1d(window.reshape(-1, 1, window.shape[-1]), kernel, stride=self.old)
        out = out.transpose(1, 2).reshape(*shape, -1)
        emitted = self._step * self.new
        self._step = steps
        if final_length is not None:
            out = out[..., :max(0, final_length - emitted)]
        keep = steps * self.old - self.width  # the next step's first input sample
        if keep > self._buffer_start:
            self._buffer = self._buffer[..., keep - self._buffer_start:]
            self._buffer_start = keep
        return out
