"""Training curves of an XP as a PNG (matplotlib, imported lazily with the Agg backend)."""
import typing as tp
from pathlib import Path

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
