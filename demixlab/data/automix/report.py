"""What an automix run tells: the summary printed at the end and its PNG (tempo and key of the
source tracks, the groups each remix took, the changes applied and the rejections)."""
import typing as tp
from collections import Counter
from pathlib import Path

import numpy as np

from ...files import atomic_path
from .analysis import CANDIDATE_REASONS, NO_BEAT, NOTE_NAMES, TOO_SHORT, TRACK_REASONS, TrackAnalysis
from .remix import Plans


def rejection_counts(analyses: tp.Sequence[TrackAnalysis], plans: Plans) -> tp.Dict[str, tp.Dict[str, int]]:
    """Rejections per reason (zeros included): {"tracks": refused at analysis, "candidates":
    candidate stems refused while planning}."""
    refused = Counter(analysis.rejected for analysis in analyses if analysis.rejected)
    return {"tracks": {reason: int(refused.get(reason, 0)) for reason in TRACK_REASONS},
            "candidates": {reason: int(plans.rejected.get(reason, 0)) for reason in CANDIDATE_REASONS}}


def summary_lines(analyses: tp.Sequence[TrackAnalysis], plans: Plans, sources: tp.Sequence[str],
                  seconds: float, requested: int) -> tp.List[str]:
    """The end-of-run summary: remixes made, tracks and candidates rejected per reason, and the
    tempo changes and pitch shifts applied."""
    usable = sum(analysis.rejected is None for analysis in analyses)
    counts = rejection_counts(analyses, plans)
    lines = [f"remixes: {len(plans.remixes)} of {requested} requested, {len(sources)} sources "
             f"({', '.join(sources)}) x {seconds:g} s",
             f"tracks: {len(analyses)} analysed, {usable} usable; rejected: "
             + ", ".join(f"{reason} {count}" for reason, count in counts["tracks"].items()),
             "candidate stems rejected: "
             + ", ".join(f"{reason} {count}" for reason, count in counts["candidates"].items()),
             f"remix attempts abandoned (no candidate left for a source): {plans.abandoned}"]
    stems = [choice for plan in plans.remixes for choice in plan.stems.values()]
    if stems:
        changes = np.array([abs(choice.stretch - 1) * 100 for choice in stems])
        shifts = np.array([abs(choice.semitones) for choice in stems])
        lines.append(f"applied per stem: tempo change median {np.median(changes):.1f} % (max {changes.max():.1f} %), "
                     f"pitch shift median {np.median(shifts):g} semitone(s) (max {shifts.max():g}); "
                     f"{int(np.sum((changes == 0) & (shifts == 0)))} of {len(stems)} stems unchanged")
    return lines


def plot_automix(analyses: tp.Sequence[TrackAnalysis], plans: Plans, path: tp.Union[str, Path]) -> None:
    """Write a PNG: left, tempo against key (the major key with the same notes) of every track,
    usable or rejected, with each remix drawn as lines from its common tempo and key (a star) to
    the tracks its stems came from; middle, the tempo changes and pitch shifts applied; right,
    the rejections per reason."""
    import matplotlib  # noqa: PLC0415 - plots only when asked

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (scatter, changes, bars) = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2, 1.2, 1]})
    by_index = {analysis.index: analysis for analysis in analyses}
    colours = plt.get_cmap("tab10")
    usable = [(a.tempo, a.key.pitch_set) for a in analyses if a.rejected is None and a.key is not None]
    scatter.scatter([x for x, _ in usable], [y for _, y in usable], s=30, color="dimgray", label="usable track",
                    zorder=2)
    for number, plan in enumerate(plans.remixes[:10]):
        if plan.key is None:
            continue
        # Remixes around the same reference would hide each other: spread their stars a little.
        star = (plan.tempo, plan.key.pitch_set + 0.12 * (number % 5 - 2))
        for choice in plan.stems.values():
            track = by_index[choice.track]
            if track.key is not None and track.tempo is not None:
                scatter.plot([star[0], track.tempo], [star[1], track.key.pitch_set], "-",
                             color=colours(number), alpha=0.6, linewidth=1.2, zorder=3)
        scatter.plot(*star, "*", color=colours(number), markersize=13, markeredgecolor="black", label=plan.name,
                     zorder=4)
    markers = {NO_BEAT: "x", TOO_SHORT: "s"}
    for reason, marker in markers.items():
        shown = [(a.tempo, a.key.pitch_set) for a in analyses
                 if a.rejected == reason and a.key is not None and a.tempo is not None]
        if shown:
            scatter.scatter([x for x, _ in shown], [y for _, y in shown], marker=marker, s=40, color="tab:red",
                            label=f"rejected: {reason}", zorder=3)
    scatter.set_yticks(range(12), [f"{name} / {NOTE_NAMES[(index + 9) % 12]}m"
                                   for index, name in enumerate(NOTE_NAMES)])
    scatter.set_ylim(-0.5, 11.5)
    scatter.set_xlabel("tempo [BPM]")
    scatter.set_ylabel("key (major / relative minor)")
    scatter.set_title(f"tracks and remixes (first {min(10, len(plans.remixes))} of {len(plans.remixes)})")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=7, loc="best", ncol=2)

    stems = [choice for plan in plans.remixes for choice in plan.stems.values()]
    tempo_changes = [(choice.stretch - 1) * 100 for choice in stems]
    changes.hist(tempo_changes, bins=15, color="tab:blue", alpha=0.8)
    changes.set_xlabel("tempo change per stem [%]")
    changes.set_ylabel("stems")
    shifts = Counter(choice.semitones for choice in stems)
    inset = changes.inset_axes([0.62, 0.6, 0.35, 0.35])
    steps = sorted(int(step) for step in shifts)
    inset.bar(steps, [shifts[step] for step in steps], color="tab:orange", width=0.8)
    inset.set_xticks(steps)
    inset.set_title("pitch shift [semitones]", fontsize=7)
    inset.tick_params(labelsize=6)
    changes.set_title(f"changes applied ({len(stems)} stems)")

    counts = rejection_counts(analyses, plans)
    labels = ([f"track: {reason}" for reason in counts["tracks"]]
              + [f"stem: {reason}" for reason in counts["candidates"]])
    values = [*counts["tracks"].values(), *counts["candidates"].values()]
    bars.barh(labels, values, color=["tab:purple"] * len(counts["tracks"]) + ["tab:red"] * len(counts["candidates"]))
    for position, value in enumerate(values):
        bars.text(value, position, f" {value}", va="center", fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel(f"rejected tracks / candidate stems\n({plans.abandoned} remix attempts abandoned)")
    bars.set_title("rejections")
    bars.set_xlim(0, max(1, max(values)) * 1.2)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
