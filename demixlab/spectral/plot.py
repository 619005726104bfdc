"""Ragged sliCQT spectrogram plots: every block drawn at its own time resolution.

matplotlib (Agg backend) is imported on first use, so importing demixlab never needs it.
"""
import typing as tp
from pathlib import Path

import numpy as np
import torch

from ..errors import DemixError
from ..files import atomic_path
from .slicqt import SliCQT, overlap_add


def slicqt_magnitudes(waveform: torch.Tensor, transform: SliCQT) -> tp.List[np.ndarray]:
    """Per block, the channel-averaged magnitude (F_b, N_b) of a (C, T) waveform, slices overlap-added.

    Column n of block b covers samples [n, n + 1) * slice_length / T_b of the waveform; the half slice
    of padding in front of the signal is already cropped.
    """
    if waveform.dim() != 2:
        raise DemixError(f"plot_slicqt expects a (channels, time) waveform, got shape {tuple(waveform.shape)}")
    device = transform.slice_window.device
    with torch.no_grad():
        blocks = transform(waveform.to(device=device, dtype=transform.slice_window.dtype))
    magnitudes = []
    for block in blocks:
        width = block.shape[-1]
        # overlap-add magnitudes (sum of the two overlapping slices), then drop the padding in front
        magnitude = overlap_add(block.abs()).mean(dim=0)[:, width // 2:]
        magnitudes.append(magnitude.cpu().double().numpy())
    return magnitudes


def plot_slicqt(waveform: torch.Tensor, transform: SliCQT, path: tp.Union[str, Path], title: str = "",
                dynamic_range: float = 100.0, cmap: str = "inferno", size: tp.Tuple[float, float] = (16.0, 9.0),
                dpi: int = 100) -> Path:
    """Write a PNG spectrogram of a (C, T) waveform (channels averaged) to `path`; return the path.

    Rows are the transform's frequency channels, equally tall, so the vertical axis follows its
    scale (Bark, mel, ...) and is labelled in Hz; each block is drawn with its own number of
    coefficients per second. Colours are dB, from the 99.9th percentile down by `dynamic_range`.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    magnitudes = slicqt_magnitudes(waveform, transform)
    duration = waveform.shape[-1] / transform.samplerate
    decibels = [20.0 * np.log10(np.maximum(m, 1e-12)) for m in magnitudes]
    top = float(np.quantile(np.concatenate([d.ravel() for d in decibels]), 0.999))

    figure, axes = plt.subplots(figsize=size, dpi=dpi)
    row = 0
    image = None
    for db, (bins, width) in zip(decibels, transform.block_shapes):
        seconds_per_column = transform.slice_length / width / transform.samplerate
        columns = min(db.shape[1], int(np.ceil(duration / seconds_per_column)))
        times = np.minimum(np.arange(columns + 1) * seconds_per_column, duration)
        rows = np.arange(row, row + bins + 1) - 0.5
        image = axes.pcolormesh(times, rows, db[:, :columns], vmin=top - dynamic_range, vmax=top, cmap=cmap,
                                shading="flat", rasterized=True)
        row += bins
    frequencies = np.asarray(transform.frequencies)
    ticks = np.unique(np.linspace(0, len(frequencies) - 1, 12).round().astype(int))
    axes.set_yticks(ticks)
    axes.set_yticklabels([f"{frequencies[t]:.0f}" if frequencies[t] < 1000 else f"{frequencies[t] / 1000:.1f}k"
                          for t in ticks])
    axes.set_ylim(-0.5, len(frequencies) - 0.5)
    axes.set_xlim(0.0, duration)
    axes.set_xlabel("Time (s)")
    axes.set_ylabel(f"Frequency (Hz, {transform.scale} scale)")
    axes.set_title(title or f"sliCQT {transform.scale}, {len(frequencies)} channels in "
                            f"{len(transform.block_shapes)} blocks, slice {transform.slice_length}")
    figure.colorbar(image, ax=axes, pad=0.01, label="dB")
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(figure)
    return path
