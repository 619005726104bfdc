"""Metrics: the MDX global SDR and museval aggregation, checked against direct computations."""
import math

import numpy as np
import pytest
import torch

from demixlab.evaluation import aggregate, format_table, global_sdr, museval_track

SOURCES = ["drums", "bass"]


def test_global_sdr_matches_direct_numpy_formula():
    generator = torch.Generator().manual_seed(0)
    references = torch.randn(3, 2, 2, 1000, generator=generator)
    estimates = references + 0.1 * torch.randn(3, 2, 2, 1000, generator=generator)
    got = global_sdr(references, estimates)
    ref, est = references.double().numpy(), estimates.double().numpy()
    expected = 10 * np.log10(((ref ** 2).sum(axis=(-2, -1)) + 1e-7) / (((ref - est) ** 2).sum(axis=(-2, -1)) + 1e-7))
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert global_sdr(references, references).min() > 100  # perfect estimate: eps-limited, huge


def test_museval_track_and_aggregate_match_museval_stores():
    import museval  # runtime dependency; needs ffmpeg on PATH
    samplerate = 8000
    generator = torch.Generator().manual_seed(1)
    tracks, store = [], museval.EvalStore()
    for index in range(3):
        references = torch.randn(2, 2, 4 * samplerate, generator=generator)
        references[1, :, :samplerate] = 0  # a silent frame: NaN in museval, dropped by the median
        estimates = references + (0.2 + 0.2 * index) * torch.randn(references.shape, generator=generator)
        scores = museval_track(references, estimates, samplerate, SOURCES)
        scores["nsdr"] = dict(zip(SOURCES, global_sdr(references, estimates).tolist()))
        tracks.append(scores)
        sdr, isr, sir, sar = museval.evaluate(references.transpose(1, 2).double().numpy(),
                                              estimates.transpose(1, 2).double().numpy(),
                                              win=samplerate, hop=samplerate)
        track_store = museval.TrackStore(track_name=f"t{index}", win=1, hop=1)
        for i, source in enumerate(SOURCES):
            track_store.add_target(source, {"SDR": sdr[i], "SIR": sir[i], "ISR": isr[i], "SAR": sar[i]})
        store.add_track(track_store.df)
    summary = aggregate(tracks, SOURCES)
    reference = store.agg_frames_tracks_scores()
    for source in SOURCES:
        for metric in ("SDR", "SIR", "ISR", "SAR"):
            assert summary[f"{metric.lower()}_{source}"] == pytest.approx(reference[(source, metric)], abs=1e-4)
        assert summary[f"nsdr_{source}"] == pytest.approx(np.mean([t["nsdr"][source] for t in tracks]))
    assert summary["sdr"] == pytest.approx(np.mean([summary[f"sdr_{s}"] for s in SOURCES]))


def test_aggregate_ignores_nan_tracks_for_median_metrics():
    tracks = [{"sdr": {"drums": math.nan, "bass": 1.0}}, {"sdr": {"drums": 3.0, "bass": 2.0}},
              {"sdr": {"drums": 5.0, "bass": 9.0}}]
    summary = aggregate(tracks, SOURCES)
    assert summary["sdr_drums"] == 4.0
    assert summary["sdr_bass"] == 2.0


def test_format_table_lists_every_source_and_the_mean():
    scores = {"sdr": 1.5, "sdr_drums": 1.0, "sdr_bass": 2.0, "nsdr": 3.5, "nsdr_drums": 3.0, "nsdr_bass": 4.0}
    table = format_table(scores, SOURCES)
    lines = table.splitlines()
    assert "SDR museval" in lines[0] and "SDR global" in lines[0]
    assert lines[2].split() == ["drums", "1.000", "3.000"]
    assert lines[-1].split() == ["mean", "1.500", "3.500"]
