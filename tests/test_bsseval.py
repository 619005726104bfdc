"""BSS Eval v4 on torch (demixlab.bsseval) against museval's own numbers, frame by frame."""
import math

import numpy as np
import pytest
import torch

from demixlab.evaluation.bsseval import bss_eval_v4, track_metrics
from demixlab.errors import DemixError
from tests.references import import_reference

SAMPLERATE = 8000  # short clips: museval needs seconds per clip even at this rate
TOLERANCE_DB = 0.01
METRICS = ("sdr", "isr", "sir", "sar")


def museval_frames(references: torch.Tensor, estimates: torch.Tensor, window: int = SAMPLERATE,
                   hop: int = SAMPLERATE) -> dict:
    museval = import_reference("museval")
    out = museval.evaluate(references.transpose(1, 2).double().numpy(), estimates.transpose(1, 2).double().numpy(),
                           win=window, hop=hop)
    return dict(zip(METRICS, out))


def assert_frames_match(got: dict, expected: dict, metrics=METRICS) -> None:
    for metric in metrics:
        ours, theirs = got[metric].cpu().numpy(), expected[metric]
        assert ours.shape == theirs.shape, metric
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=metric)
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs), err_msg=metric)
        finite = np.isfinite(theirs)
        assert finite.any(), metric
        assert np.abs(ours[finite] - theirs[finite]).max() < TOLERANCE_DB, metric


def clip(sources: int, seconds: float, seed: int, channels: int = 2) -> torch.Tensor:
    """Coloured noise with a different spectrum per source and channel."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(sources, channels, int(seconds * SAMPLERATE), generator=generator, dtype=torch.float64)
    kernel = torch.rand(sources * channels, 1, 9, generator=generator, dtype=torch.float64)
    coloured = torch.nn.functional.conv1d(noise.reshape(1, sources * channels, -1), kernel, padding=4,
                                          groups=sources * channels)
    return coloured.reshape(noise.shape)


def test_noisy_estimates_with_crosstalk_match_museval():
    # clip(...) is coloured noise: broadband, so the distortion filters are well defined and
    # ISR/SIR/SAR comparable (see test_band_limited_references_warn_that_isr_sir_sar_are_ill_defined).
    references = clip(3, 3, seed=0, channels=1)  # 3 sources (mono: museval's Gram system grows with S x C)
    generator = torch.Generator().manual_seed(1)
    estimates = references + 0.4 * torch.randn(references.shape, generator=generator, dtype=torch.float64)
    estimates = estimates + 0.3 * references.roll(1, dims=0)  # interference from the other sources
    got = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    assert got["sdr"].shape == (3, 3) and got["sdr"].dtype == torch.float64
    assert_frames_match(got, museval_frames(references, estimates))


def test_filtered_and_delayed_reference_matches_museval():
    references = clip(2, 3, seed=2)
    # An estimate that is a filtered, 37-sample delayed reference: the distortion filters absorb
    # most of it (high ISR-limited SDR loss, high SAR), which exercises the Gram system.
    filtered = torch.nn.functional.conv1d(references.reshape(1, 4, -1), torch.tensor([[[0.5, 0.3, -0.2]]] * 4,
                                          dtype=torch.float64), padding=1, groups=4).reshape(references.shape)
    estimates = torch.nn.functional.pad(filtered, (37, 0))[..., :references.shape[-1]]
    estimates = estimates + 0.01 * clip(2, 3, seed=3)
    got = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    expected = museval_frames(references, estimates)
    assert_frames_match(got, expected)
    assert np.nanmin(expected["sar"]) > 15  # the filters really explain the estimate


def test_silent_frames_are_nan_like_museval():
    references = clip(2, 4, seed=4)
    references[1, :, :SAMPLERATE + 100] = 0  # frames 0 and (partially) 1 of source 1
    estimates = references + 0.3 * clip(2, 4, seed=5)
    estimates[0, :, 3 * SAMPLERATE:] = 0  # a silent estimate in frame 3
    got = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    expected = museval_frames(references, estimates)
    assert np.isnan(expected["sdr"][:, 0]).all() and np.isnan(expected["sdr"][:, 3]).all()
    assert_frames_match(got, expected)


def test_perfect_estimate_gives_inf_sdr_like_museval():
    references = clip(2, 2, seed=6)
    got = bss_eval_v4(references, references.clone(), SAMPLERATE, SAMPLERATE)
    expected = museval_frames(references, references.clone())
    assert np.isposinf(expected["sdr"]).all() and torch.isposinf(got["sdr"]).all()
    # The other three are limited by floating point round-off in both (about 300 dB in museval).
    for metric in ("isr", "sir", "sar"):
        assert np.nanmin(expected[metric]) > 200 and got[metric].min() > 200, metric


def test_partial_last_frame_and_single_frame_windows_match_museval():
    references = clip(2, 2.6, seed=7, channels=1)  # mono keeps museval's Gram system small
    estimates = references + 0.5 * clip(2, 2.6, seed=8, channels=1)
    window, hop = 4000, 3000  # overlapping frames; the trailing 1.2 s partial frame is dropped
    got = bss_eval_v4(references, estimates, window, hop)
    assert got["sdr"].shape == (2, 6)
    assert_frames_match(got, museval_frames(references, estimates, window, hop))
    whole = bss_eval_v4(references, estimates, 10 ** 6, 10 ** 6)  # window > length: one frame
    assert_frames_match(whole, museval_frames(references, estimates, 10 ** 6, 10 ** 6))


def test_sdr_only_equals_the_full_computation():
    references = clip(2, 3, seed=9)
    estimates = references + 0.4 * clip(2, 3, seed=10)
    estimates[1, :, :SAMPLERATE] = 0
    full = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    fast = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE, sdr_only=True)
    assert set(fast) == {"sdr"}
    torch.testing.assert_close(fast["sdr"], full["sdr"], equal_nan=True)
    assert torch.isnan(fast["sdr"][:, 0]).all()


def test_track_metrics_is_the_median_over_frames_per_source():
    references = clip(2, 4, seed=11)
    references[0, :, :SAMPLERATE] = 0
    estimates = (references + 0.3 * clip(2, 4, seed=12)).float()  # float32 input: computed in float64
    frames = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    scores = track_metrics(references, estimates, SAMPLERATE, ["drums", "bass"])
    assert set(scores) == set(METRICS)
    for metric in METRICS:
        for index, source in enumerate(["drums", "bass"]):
            values = frames[metric][index].numpy()
            assert scores[metric][source] == pytest.approx(float(np.median(values[~np.isnan(values)])))
    assert set(track_metrics(references, estimates, SAMPLERATE, ["drums", "bass"], sdr_only=True)) == {"sdr"}


def test_silent_reference_track_gives_nan_instead_of_museval_error():
    references = clip(2, 2, seed=13)
    references[1] = 0  # museval refuses this track (ValueError); here every frame is NaN
    scores = track_metrics(references, references + 0.1, SAMPLERATE, ["drums", "bass"])
    assert all(math.isnan(scores[metric][source]) for metric in METRICS for source in ("drums", "bass"))


def test_shape_errors_name_both_shapes():
    references = torch.zeros(2, 2, 100)
    with pytest.raises(DemixError, match=r"references \(2, 2, 100\) and estimates \(2, 2, 90\)"):
        bss_eval_v4(references, torch.zeros(2, 2, 90), 50, 50)
    with pytest.raises(DemixError, match=r"references \(2, 100\) and estimates \(2, 100\)"):
        bss_eval_v4(references[0], references[0], 50, 50)
    with pytest.raises(DemixError, match="hop"):
        bss_eval_v4(references, references, 50, 0)
    with pytest.raises(DemixError, match=r"sources=3"):
        track_metrics(references, references, 50, ["a", "b", "c"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    references = clip(4, 3, seed=14)
    estimates = references + 0.4 * clip(4, 3, seed=15)
    cpu = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    cuda = bss_eval_v4(references.cuda(), estimates.cuda(), SAMPLERATE, SAMPLERATE)
    for metric in METRICS:
        assert cuda[metric].device.type == "cuda"
        torch.testing.assert_close(cuda[metric].cpu(), cpu[metric], atol=1e-6, rtol=0)


def test_band_limited_references_warn_that_isr_sir_sar_are_ill_defined(caplog, monkeypatch):
    import demixlab.evaluation.bsseval as bsseval
    references = clip(2, 2, seed=16)
    spectrum = torch.fft.rfft(references)
    spectrum[..., spectrum.shape[-1] // 4:] = 0  # nothing above 1 kHz: the Gram system is singular
    band_limited = torch.fft.irfft(spectrum, n=references.shape[-1])
    estimates = band_limited + 0.1 * clip(2, 2, seed=17)
    monkeypatch.setattr(bsseval, "_warned_singular", False)
    with caplog.at_level("WARNING", logger="demixlab.bsseval"):
        bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)  # broadband: no warning
        assert not caplog.records
        got = bss_eval_v4(band_limited, estimates, SAMPLERATE, SAMPLERATE)
    assert len(caplog.records) == 1 and "numerically singular" in caplog.records[0].getMessage()
    frames = band_limited.reshape(2, 2, 2, SAMPLERATE)
    errors = (estimates - band_limited).reshape(2, 2, 2, SAMPLERATE)
    expected_sdr = 10 * torch.log10(frames.pow(2).sum(dim=(1, 3)) / errors.pow(2).sum(dim=(1, 3)))
    torch.testing.assert_close(got["sdr"], expected_sdr)  # SDR stays the plain per-frame ratio
    for metric in ("isr", "sir", "sar"):  # ill-defined but not garbage: the dense fallback stays finite
        assert torch.isfinite(got[metric]).all(), metric



def test_gram_solver_matches_a_dense_solve_and_falls_back_on_indefinite_systems(monkeypatch):
    import demixlab.evaluation.bsseval as bsseval
    monkeypatch.setattr(bsseval, "_warned_singular", True)  # the indefinite system would warn
    generator = torch.Generator().manual_seed(18)
    tall = torch.randn(2, 60, 70, generator=generator, dtype=torch.float64)
    positive = tall @ tall.mT  # a batch of two well-conditioned Gram matrices
    indefinite = positive[0].clone()
    indefinite[-1, -1] *= -1  # Cholesky fails at its last pivot, workspace written: the fallback solves
    for matrix in (positive, positive[0], indefinite):
        rhs = torch.randn(*matrix.shape[:-1], 3, generator=generator, dtype=torch.float64)
        original = matrix.clone()
        solution = bsseval._solve(matrix, rhs)
        assert torch.equal(matrix, original)  # only overwrite=True may use it as workspace
        torch.testing.assert_close(matrix @ solution, rhs, rtol=0, atol=1e-9)
        torch.testing.assert_close(bsseval._solve(matrix.clone(), rhs, overwrite=True), solution, rtol=0, atol=0)
        torch_solution, _ = bsseval._solve_torch(matrix, rhs)  # the path of CUDA and other devices
        torch.testing.assert_close(matrix @ torch_solution, rhs, rtol=0, atol=1e-9)


def test_rounding_singular_gram_systems_are_loaded_not_solved_by_lu(monkeypatch):
    import demixlab.evaluation.bsseval as bsseval
    monkeypatch.setattr(bsseval, "_warned_singular", True)
    generator = torch.Generator().manual_seed(20)
    thin = torch.randn(60, 20, generator=generator, dtype=torch.float64)
    gram = thin @ thin.mT  # rank 20 of 60: positive semi-definite
    gram.diagonal().sub_(1e-14 * float(gram.diagonal().max()))  # its null space just below zero, as rounding leaves it
    rhs = thin @ torch.randn(20, 3, generator=generator, dtype=torch.float64)  # in its range: consistent

    def no_lu(*args, **kwargs):
        raise AssertionError("a positive semi-definite system fell back to LU")

    monkeypatch.setattr(bsseval.lapack, "dgesv", no_lu)
    minimum_norm = torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ rhs
    lapack_solution = bsseval._solve(gram, rhs)
    monkeypatch.setattr(torch.linalg, "solve", no_lu)
    torch_solution, singular = bsseval._solve_torch(gram, rhs)  # the path of CUDA and other devices
    assert singular
    for solution in (lapack_solution, torch_solution):
        torch.testing.assert_close(gram @ solution, rhs, rtol=0, atol=1e-9)
        # not LU's arbitrary null-space components: the minimum-norm solution, up to rounding's share
        assert torch.linalg.norm(solution - minimum_norm) < 1e-2 * torch.linalg.norm(minimum_norm)  # LU: 4 % off
    # in a batch, only the system that failed is loaded: the other's solution is untouched
    batch = torch.stack([gram, gram.diagonal().add(1.0).diag() + gram])
    solutions, _ = bsseval._solve_torch(batch, rhs.expand(2, -1, -1))
    torch.testing.assert_close(solutions[1], torch.cholesky_solve(rhs, torch.linalg.cholesky(batch[1])), rtol=0,
                               atol=0)


def test_frequency_tiles_do_not_change_the_metrics(monkeypatch):
    import demixlab.evaluation.bsseval as bsseval
    references = clip(2, 3, seed=19)
    estimates = references + 0.4 * clip(2, 3, seed=20) + 0.2 * references.roll(1, dims=0)
    monkeypatch.setattr(bsseval, "_tile_bins", lambda bins, device: 1000)  # ragged last tiles
    tiled = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    monkeypatch.setattr(bsseval, "_tile_bins", lambda bins, device: bins)  # what several threads use
    whole = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    for metric in METRICS:
        torch.testing.assert_close(tiled[metric], whole[metric], rtol=0, atol=1e-9)


@pytest.mark.parametrize("fft_size", [64, 128])
def test_lagged_correlations_match_a_direct_sum_over_blocks_and_chunks(monkeypatch, fft_size):
    import demixlab.evaluation.bsseval as bsseval
    # Small blocks and chunks: several chunks of several blocks, a ragged last block (537 samples).
    monkeypatch.setattr(bsseval, "_CORRELATION_FFT", fft_size)
    monkeypatch.setattr(bsseval, "_CORRELATION_FFT_ONE_THREAD", fft_size)
    monkeypatch.setattr(bsseval, "_CORRELATION_CHUNK", 3 * fft_size)
    generator = torch.Generator().manual_seed(21)
    first = torch.randn(3, 537, generator=generator, dtype=torch.float64)
    second = torch.randn(2, 537, generator=generator, dtype=torch.float64)
    max_lag = 7
    got = bsseval._lagged_correlations([first, second], max_lag)
    both = torch.cat([first, second])
    length = first.shape[-1]
    assert got.shape == (3, 5, 2 * max_lag + 1)
    for lag in range(-max_lag, max_lag + 1):  # sum_n first[p, n] both[q, n + lag]
        low, high = max(0, -lag), min(length, length - lag)
        expected = first[:, None, low:high].mul(both[None, :, low + lag:high + lag]).sum(-1)
        torch.testing.assert_close(got[..., max_lag + lag], expected, rtol=0, atol=1e-11)


def _reference_correlations(signals: torch.Tensor, filters_len: int) -> torch.Tensor:
    import demixlab.evaluation.bsseval as bsseval
    return bsseval._lagged_correlations([signals], filters_len - 1)


def test_block_schur_factor_is_the_cholesky_factor_of_the_dense_gram():
    import demixlab.evaluation.bsseval as bsseval
    filters_len, pairs = 16, 6
    correlations = _reference_correlations(clip(3, 0.5, seed=22).reshape(pairs, -1), filters_len)
    dense = bsseval._dense_gram(correlations, filters_len)  # (signal, delay) order
    order = torch.arange(pairs * filters_len).reshape(pairs, filters_len).T.reshape(-1)  # (delay, signal) order
    expected = torch.linalg.cholesky(dense[order][:, order]).mT.numpy()
    first_row = bsseval._first_block_row(correlations)
    np.testing.assert_array_equal(first_row, dense[order][:, order][:pairs].numpy())
    factor = np.full_like(expected, np.nan)
    assert bsseval._block_toeplitz_cholesky(first_row, factor)
    upper = np.triu(factor)
    assert np.isnan(np.tril(factor, -pairs)[np.tril_indices_from(factor, -pairs)]).all()  # never written
    np.testing.assert_allclose(upper, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    indefinite = first_row.copy()
    indefinite[0, 0] = -indefinite[0, 0]
    assert not bsseval._block_toeplitz_cholesky(indefinite, factor)


def test_block_toeplitz_solve_matches_the_dense_solve():
    import demixlab.evaluation.bsseval as bsseval
    filters_len, pairs = 24, 4
    correlations = _reference_correlations(clip(2, 0.5, seed=23).reshape(pairs, -1), filters_len)
    dense = bsseval._dense_gram(correlations, filters_len)
    rhs = torch.randn(pairs * filters_len, 3, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    torch.testing.assert_close(bsseval._gram_product(correlations, rhs, bsseval._EPS), dense @ rhs, rtol=1e-12,
                               atol=1e-12 * float(dense.abs().max()))
    solution = bsseval._solve_block_toeplitz(correlations, rhs)
    torch.testing.assert_close(solution, bsseval._solve(dense, rhs), rtol=1e-9, atol=0)
    torch.testing.assert_close(dense @ solution, rhs, rtol=0, atol=1e-9)


def test_rounding_singular_block_toeplitz_systems_are_loaded(monkeypatch, caplog):
    import demixlab.evaluation.bsseval as bsseval
    filters_len, pairs = 32, 4
    signals = clip(2, 1, seed=25).reshape(pairs, -1)
    spectrum = torch.fft.rfft(signals)
    spectrum[..., spectrum.shape[-1] // 4:] = 0  # band-limited: singular to rounding
    correlations = _reference_correlations(torch.fft.irfft(spectrum, n=signals.shape[-1]), filters_len)
    dense = bsseval._dense_gram(correlations, filters_len)
    rhs = dense @ torch.randn(pairs * filters_len, 2, generator=torch.Generator().manual_seed(26),
                              dtype=torch.float64)  # consistent
    attempts = []
    factorise = bsseval._block_toeplitz_cholesky
    monkeypatch.setattr(bsseval, "_block_toeplitz_cholesky", lambda *args: attempts.append(1) or factorise(*args))
    monkeypatch.setattr(bsseval, "_warned_singular", False)
    with caplog.at_level("WARNING", logger="demixlab.bsseval"):
        solution = bsseval._solve_block_toeplitz(correlations, rhs)
    assert len(attempts) == 2 and "numerically singular" in caplog.text  # broke down, then loaded
    torch.testing.assert_close(dense @ solution, rhs, rtol=0, atol=1e-8 * float(rhs.abs().max()))
    # the same Tikhonov solution as the dense loaded Cholesky solve's, up to what rounding leaves of it
    # (5e-4 here; both are 10-30 % from a pseudo-inverse's, depending on where that cuts the spectrum)
    loaded = bsseval._solve(dense, rhs)
    assert torch.linalg.norm(solution - loaded) < 1e-2 * torch.linalg.norm(loaded)


def test_metrics_are_unchanged_when_the_block_schur_algorithm_breaks_down(monkeypatch):
    import demixlab.evaluation.bsseval as bsseval
    references = clip(2, 3, seed=27)
    estimates = references + 0.4 * clip(2, 3, seed=28) + 0.2 * references.roll(1, dims=0)
    schur = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    monkeypatch.setattr(bsseval, "_block_toeplitz_cholesky", lambda first_row, factor: False)
    dense = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)  # falls back to the dense Cholesky solve
    for metric in METRICS:
        torch.testing.assert_close(schur[metric], dense[metric], rtol=0, atol=1e-9)


def test_single_source_matches_museval_with_infinite_sir():
    # One source: the all-sources system is the own-source one, so e_interf is exactly zero in
    # museval (SIR inf); demixlab must not solve it twice by different methods.
    references = clip(1, 3, seed=29)
    estimates = references + 0.3 * clip(1, 3, seed=30)
    got = bss_eval_v4(references, estimates, SAMPLERATE, SAMPLERATE)
    expected = museval_frames(references, estimates)
    assert np.isposinf(expected["sir"]).all() and torch.isposinf(got["sir"]).all()
    assert_frames_match(got, expected, metrics=("sdr", "isr", "sar"))
