"""Box plots of per-track SDR (matplotlib, imported lazily with the Agg backend)."""
import math
import typing as tp
from pathlib import Path

from ..files import atomic_path

METRIC_TITLES = {"sdr": "museval SDR (median over frames) [dB]", "nsdr": "global SDR [dB]"}


def plot_track_scores(tracks: tp.Sequence[tp.Mapping[str, tp.Any]], sources: tp.Sequence[str],
                      path: tp.Union[str, Path], *, metrics: tp.Sequence[str] = ("sdr", "nsdr"),
                      title: str = "") -> None:
    """Write a PNG with one box plot panel per available metric: one box per source over tracks.

    `tracks` are per-track scores ({metric: {source: value}}); NaN and infinite values are left
    out (a track whose reference is silent has no SDR).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    available = [metric for metric in metrics if any(metric in track for track in tracks)]
    if not available:
        raise ValueError(f"no track has any of the metrics {', '.join(metrics)}")
    figure, axes = plt.subplots(1, len(available), figsize=(1.4 * len(sources) * len(available) + 2, 4.2),
                                squeeze=False)
    for axis, metric in zip(axes[0], available):
        columns = [[float(track[metric][source]) for track in tracks
                    if metric in track and _finite(track[metric].get(source))] for source in sources]
        axis.boxplot(columns, showmeans=True)
        axis.set_xticks(range(1, len(sources) + 1), list(sources))
        axis.set_ylabel(METRIC_TITLES.get(metric, metric))
        axis.grid(axis="y", alpha=0.3)
    counts = max(len(tracks), 1)
    figure.suptitle(f"{title} ({counts} track{'s' if counts > 1 else ''})" if title else f"{counts} track(s)")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def _finite(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
