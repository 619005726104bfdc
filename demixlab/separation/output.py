"""What `demixlab separate` writes: which stems, and how clipping is avoided."""
import typing as tp

import torch

from ..audio import convert_channels

CLIP_MODES = ("rescale", "clamp", "none")


def prevent_clip(wav: torch.Tensor, mode: str) -> torch.Tensor:
    """`rescale`: divide by the peak when above 1 (slightly more, so int formats do not clip);
    `clamp`: clip samples to [-0.99, 0.99]; `none`: unchanged."""
    if mode == "rescale":
        return wav / max(1.01 * float(wav.abs().max()), 1.0)
    if mode == "clamp":
        return wav.clamp(-0.99, 0.99)
    return wav


def select_stems(stems: tp.Dict[str, torch.Tensor], mixture: torch.Tensor, two_stems: tp.Optional[str],
                 wanted: tp.Optional[tp.Sequence[str]]) -> tp.Dict[str, torch.Tensor]:
    """The stems to write: `two_stems` gives STEM and no_STEM (mixture minus STEM), `wanted` a subset."""
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
