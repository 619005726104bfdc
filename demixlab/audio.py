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
    ext = path.suffix.lower().lstrip(".")
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
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.asarray(wav, dtype=np.float32).T, samplerate, **kwargs)


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
