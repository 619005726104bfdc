"""Metrics: the MDX global SDR and museval aggregation, checked against direct computations."""
import math

import numpy as np
import pytest
import torch

from demixlab.errors import DemixError
from demixlab.evaluation.metrics import (aggregate, check_sdr_backend, format_table, global_sdr, max_difference,
                                 museval_track, track_scores)

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


@pytest.mark.slow
def test_museval_track_and_aggregate_match_museval_stores():
    import museval  # runtime dependency; needs ffmpeg on PATH
    samplerate = 8000
    generator = torch.Generator().manual_seed(1)
    tracks, torch_tracks, store = [], [], museval.EvalStore()
    for index in range(3):
        references = torch.randn(2, 2, 4 * samplerate, generator=generator)
        references[1, :, :samplerate] = 0  # a silent frame: NaN in museval, dropped by the median
        estimates = references + (0.2 + 0.2 * index) * torch.randn(references.shape, generator=generator)
        scores = museval_track(references, estimates, samplerate, SOURCES)
        scores["nsdr"] = dict(zip(SOURCES, global_sdr(references, estimates).tolist()))
        tracks.append(scores)
        torch_tracks.append(track_scores(references, estimates, samplerate, SOURCES, backend="torch"))
        sdr, isr, sir, sar = museval.evaluate(references.transpose(1, 2).double().numpy(),
                                              estimates.transpose(1, 2).double().numpy(),
                                              win=samplerate, hop=samplerate)
        track_store = museval.TrackStore(track_name=f"t{index}", win=1, hop=1)
        for i, source in enumerate(SOURCES):
            track_store.add_target(source, {"SDR": sdr[i], "SIR": sir[i], "ISR": isr[i], "SAR": sar[i]})
        store.add_track(track_store.df)
    summary = aggregate(tracks, SOURCES)
    torch_summary = aggregate(torch_tracks, SOURCES)  # the default backend, same aggregation
    reference = store.agg_frames_tracks_scores()
    for source in SOURCES:
        for metric in ("SDR", "SIR", "ISR", "SAR"):
            assert summary[f"{metric.lower()}_{source}"] == pytest.approx(reference[(source, metric)], abs=1e-4)
            assert torch_summary[f"{metric.lower()}_{source}"] == pytest.approx(reference[(source, metric)], abs=0.01)
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


def test_track_scores_check_backend_returns_torch_scores_and_logs_the_difference(caplog):
    samplerate = 8000
    generator = torch.Generator().manual_seed(2)
    references = torch.randn(2, 1, 2 * samplerate, generator=generator)  # mono keeps museval quick
    estimates = references + 0.3 * torch.randn(references.shape, generator=generator)
    with caplog.at_level("INFO", logger="demixlab.evaluation"):
        checked = track_scores(references, estimates, samplerate, SOURCES, backend="check")
    assert checked == track_scores(references, estimates, samplerate, SOURCES, backend="torch")
    messages = [record.getMessage() for record in caplog.records if "BSS Eval check" in record.getMessage()]
    assert len(messages) == 1 and "SDR" in messages[0]
    assert all(record.levelname == "INFO" for record in caplog.records if "BSS Eval check" in record.getMessage())


def test_track_scores_rejects_bad_backends_and_shapes():
    references = torch.zeros(2, 2, 100)
    with pytest.raises(DemixError, match=r"backend must be one of torch, museval, check, got 'fast'"):
        track_scores(references, references, 50, SOURCES, backend="fast")
    with pytest.raises(DemixError, match=r"references \(2, 2, 100\) and estimates \(2, 2, 99\)"):
        track_scores(references, references[..., :99], 50, SOURCES, backend="museval")
    with pytest.raises(DemixError, match=r"test.sdr_backend must be one of"):
        check_sdr_backend("Torch")
    assert check_sdr_backend("check") == "check"


def test_max_difference_treats_matching_nan_and_inf_as_equal():
    first = {"sdr": {"drums": 1.0, "bass": math.inf}, "sir": {"drums": math.nan, "bass": 2.0}}
    assert max_difference(first, {"sdr": {"drums": 1.5, "bass": math.inf},
                                  "sir": {"drums": math.nan, "bass": 2.25}}) == 0.5
    assert max_difference(first, {"sdr": {"drums": 1.0, "bass": 50.0}, "sir": first["sir"]}) == math.inf
    assert max_difference(first, {"sdr": first["sdr"], "sir": {"drums": 0.0, "bass": 2.0}}) == math.inf
    assert max_difference(first, {"sdr": first["sdr"]}) == math.inf  # a metric missing on one side
