"""Plots of XPs (matplotlib, imported lazily with the Agg backend): an XP's training curves and the
comparison of several XPs as PNGs, spectrograms as images for TensorBoard."""
import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_path


def plot_history(history: tp.Sequence[tp.Mapping[str, tp.Any]], sources: tp.Sequence[str],
                 path: tp.Union[str, Path], title: str = "") -> None:
    """Write `path`: train/valid loss per epoch (left) and validation global SDR per source and
    their mean (right); epochs that improved the best state (by `best.metric`) are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(entry["epoch"]) for entry in history]
    figure, (losses, sdrs) = plt.subplots(1, 2, figsize=(11, 4))
    losses.plot(epochs, [entry["train"]["loss"] for entry in history], marker=".", label="train")
    if all("loss" in entry["valid"] for entry in history):
        losses.plot(epochs, [entry["valid"]["loss"] for entry in history], marker=".", label="valid")
    losses.set_xlabel("epoch")
    losses.set_ylabel("loss")
    losses.legend()
    for source in sources:
        sdrs.plot(epochs, [entry["valid"][f"nsdr_{source}"] for entry in history], alpha=0.7, label=source)
    sdrs.plot(epochs, [entry["valid"]["nsdr"] for entry in history], color="black", linewidth=2, label="mean")
    best = [(entry["epoch"], entry["valid"]["nsdr"]) for entry in history if entry.get("best")]
    if best:
        sdrs.scatter(*zip(*best), color="black", marker="*", s=60, zorder=3, label="best state")
    sdrs.set_xlabel("epoch")
    sdrs.set_ylabel("validation global SDR [dB]")
    sdrs.legend(fontsize="small")
    for axis in (losses, sdrs):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


@dataclass
class ComparedXP:
    """What the comparison plot shows of one XP.

    Attributes:
        label: its legend entry.
        valid: the best epoch's validation global SDR by source (and `mean`); empty before epoch 1.
        test: the test global SDR by source (and `mean`); empty when not tested yet.
        epochs: the epochs done.
        curve: the validation global SDR (mean over sources) of each epoch done.
        best_epoch: the best epoch so far, None before epoch 1.
    """

    label: str
    valid: tp.Dict[str, float]
    test: tp.Dict[str, float]
    epochs: tp.List[int]
    curve: tp.List[float]
    best_epoch: tp.Optional[int]


def plot_comparison(groups: tp.Sequence[tp.Tuple[str, tp.Sequence[ComparedXP]]], path: tp.Union[str, Path]) -> None:
    """Write `path`: one row per test set, with the XPs side by side as grouped bars (one group of
    bars per source and the mean): the best epoch's validation global SDR (left) and the test
    global SDR (middle), and the validation curves overlaid (right, best epochs starred). An XP
    keeps its colour in the three panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    count = max(len(xps) for _, xps in groups)
    colours = plt.get_cmap("tab10" if count <= 10 else "tab20")
    figure, axes = plt.subplots(len(groups), 3, figsize=(17, 4.2 * len(groups)), squeeze=False,
                                gridspec_kw={"width_ratios": [1.15, 1.15, 1]})
    for (label, xps), (valid_axis, test_axis, curve_axis) in zip(groups, axes):
        columns = list(dict.fromkeys(key for xp in xps for key in (*xp.valid, *xp.test) if key != "mean")) + ["mean"]
        for axis, attribute, name in ((valid_axis, "valid", "validation global SDR, best epoch [dB]"),
                                      (test_axis, "test", "test global SDR [dB]")):
            width = 0.8 / max(1, len(xps))
            drawn = False
            for index, xp in enumerate(xps):
                scores = getattr(xp, attribute)
                positions = [column + (index - (len(xps) - 1) / 2) * width for column in range(len(columns))]
                values = [scores.get(key, math.nan) for key in columns]
                if any(math.isfinite(value) for value in values):
                    axis.bar(positions, values, width=width, color=colours(index % colours.N), label=xp.label)
                    drawn = True
            axis.axhline(0, color="black", linewidth=0.6)
            axis.set_xticks(range(len(columns)), columns)
            axis.set_ylabel(name)
            axis.grid(axis="y", alpha=0.3)
            if not drawn:
                axis.text(0.5, 0.5, "no XP has this yet", transform=axis.transAxes, ha="center", va="center",
                          color="grey")
        valid_axis.set_title(f"test set: {label}", loc="left", fontsize="medium")
        for index, xp in enumerate(xps):
            colour = colours(index % colours.N)
            curve_axis.plot(xp.epochs, xp.curve, marker="o", markersize=3, color=colour, label=xp.label)
            if xp.best_epoch is not None and xp.best_epoch in xp.epochs:
                curve_axis.scatter([xp.best_epoch], [xp.curve[xp.epochs.index(xp.best_epoch)]], marker="*",
                                   s=90, color=colour, edgecolor="black", linewidth=0.5, zorder=3)
        curve_axis.set_xlabel("epoch")
        curve_axis.set_ylabel("validation global SDR, mean [dB]")
        curve_axis.set_xlim(0.5, max([epoch for xp in xps for epoch in xp.epochs] + [1]) + 0.5)
        curve_axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        curve_axis.grid(alpha=0.3)
        curve_axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                          title="XP (* best epoch)", title_fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def log_magnitude(waveform: torch.Tensor, n_fft: int = 2048, hop: int = 512) -> np.ndarray:
    """The (frequency, frame) STFT magnitude of a (C, T) waveform, channels averaged, in dB."""
    mono = waveform.float().mean(dim=0)
    if mono.shape[-1] < n_fft:
        mono = torch.nn.functional.pad(mono, (0, n_fft - mono.shape[-1]))
    spectrum = torch.stft(mono, n_fft, hop_length=hop, window=torch.hann_window(n_fft), return_complex=True)
    return 20.0 * np.log10(np.maximum(spectrum.abs().numpy(), 1e-10))


def spectrogram_images(decibels: tp.Mapping[str, np.ndarray], titles: tp.Mapping[str, str], samplerate: int,
                       hop: int, top: float, dynamic_range: float = 80.0, cmap: str = "inferno", rows: int = 256,
                       lowest: float = 30.0) -> tp.Dict[str, np.ndarray]:
    """Render (frequency, frame) dB spectrograms as (H, W, 3) uint8 RGB images, by name: time in
    seconds, a log-frequency axis in Hz from `lowest` to Nyquist (`rows` rows, interpolated between
    bins), one colour scale for all, from `top` dB down by `dynamic_range`. One figure is drawn
    and its image replaced for each spectrogram (a new figure per image costs 4 times more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nyquist = samplerate / 2
    first = next(iter(decibels.values()))
    position = np.geomspace(lowest, nyquist, rows) / nyquist * (first.shape[0] - 1)
    below = np.minimum(np.floor(position).astype(int), first.shape[0] - 2)
    weight = (position - below)[:, None]
    duration = first.shape[1] * hop / samplerate
    figure, axes = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    figure.subplots_adjust(left=0.12, right=0.98, bottom=0.15, top=0.9)
    image = axes.imshow(np.zeros((rows, first.shape[1])), origin="lower", aspect="auto", interpolation="nearest",
                        cmap=cmap, vmin=top - dynamic_range, vmax=top,
                        extent=(0.0, duration, np.log10(lowest), np.log10(nyquist)))
    ticks = [f for f in (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000) if lowest <= f <= nyquist]
    axes.set_yticks(np.log10(ticks), [f"{f}" if f < 1000 else f"{f // 1000}k" for f in ticks])
    axes.set_xlabel("Time (s)")
    axes.set_ylabel("Frequency (Hz)")
    figure.colorbar(image, ax=axes, pad=0.01, label="dB")
    pictures = {}
    for name, values in decibels.items():
        image.set_data(values[below] * (1 - weight) + values[below + 1] * weight)
        axes.set_title(titles[name], fontsize="medium")
        figure.canvas.draw()
        pictures[name] = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return pictures
