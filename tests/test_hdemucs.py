"""Hybrid Demucs (v3) and Hybrid Transformer Demucs (v4), checked against PyPI demucs 4.1.0.

Parity tests build a reference model with random weights (made non-trivial: LayerScales and
norms far from their initial values), load its state dict into demixlab's model with
`strict=True`, and compare the outputs on the same stereo input in eval mode.
"""
import json
import typing as tp

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from demixlab.errors import DemixError
from demixlab.models import get_family
from demixlab.models.demucs.hdemucs import HDemucs
from demixlab.models.demucs.htdemucs import HTDemucs
from demixlab.training.optim import OptimConfig, ParameterGroupConfig, build_optimizer
from demixlab.train import main
from tests.cli import TINY, dora, load_checkpoint, signature
from tests.references import import_reference

reference_hdemucs = import_reference("demucs.hdemucs")
reference_htdemucs = import_reference("demucs.htdemucs")

SOURCES = ["drums", "bass", "other", "vocals"]
RATE = 44100
TOLERANCE = 1e-4
HDEMUCS_DEFAULT_PARAMS = 83_637_832
HTDEMUCS_DEFAULT_PARAMS = 26_899_536
HTDEMUCS_RELEASED_PARAMS = 41_984_456  # conf/model/htdemucs.yaml: the released htdemucs configuration


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Move every parameter away from its initial value; LayerScales (initialised at 1e-4 or
    1e-3, which would hide their branches) get values of order one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith(".scale"):
                parameter.copy_(0.2 + 0.3 * noise.abs())
            else:
                parameter.add_(0.05 * noise)
    return module


def _mixture(samples: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return 0.3 * torch.randn(batch, 2, samples, generator=torch.Generator().manual_seed(seed))


def _compare(reference: nn.Module, ours: nn.Module, mixture: torch.Tensor, train: bool = False) -> float:
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.train(train)
    ours.train(train)
    with torch.no_grad():
        expected = reference(mixture)
        got = ours(mixture)
    assert got.shape == expected.shape == (mixture.shape[0], len(SOURCES), *mixture.shape[1:])
    assert expected.abs().max() > 1e-2  # not a trivially silent output
    return float((got - expected).abs().max())


# Small settings (nfft 256: the branches merge at the third layer) plus the options under test.
SMALL_HD = dict(channels=8, nfft=256, depth=4)
SHORT = 16000  # samples: 250 STFT frames
HDEMUCS_CASES = {
    "small": {},
    # The BiLSTM sees more than its 200-step window at layer 2 (windowed path).
    "lstm_attn_dconv_both_norms": dict(depth=3, dconv_mode=3, dconv_attn=2, dconv_lstm=2, norm_starts=1,
                                       norm_groups=2, dconv_comp=2),
    "dconv_decoder_undilated": dict(dconv_mode=2, dconv_depth=-2, context=2, emb_smooth=False),
    "magnitude_wiener_residual": dict(cac=False, wiener_iters=1, end_iters=1, wiener_residual=True),
    "magnitude_phase": dict(cac=False, wiener_iters=-1, end_iters=-1),
    "spectrogram_only": dict(hybrid=False, cac=False, wiener_iters=0, end_iters=2, depth=3),
    "hybrid_old_no_emb_no_rewrite": dict(hybrid_old=True, freq_emb=0, rewrite=False, context_enc=1,
                                         channels_time=12, growth=1.5),
    "multi_freqs": dict(multi_freqs=[0.25, 0.5], multi_freqs_depth=2, kernel_size=8, time_stride=4),
}


@pytest.mark.parametrize("case", list(HDEMUCS_CASES))
def test_hdemucs_matches_reference(case):
    options = {**SMALL_HD, **HDEMUCS_CASES[case]}
    torch.manual_seed(0)
    reference = _randomise(reference_hdemucs.HDemucs(SOURCES, **options), seed=2)
    # Two examples (per-example normalisation); more than one 300-frame Wiener window.
    mixture = _mixture(24000, batch=2) if case in ("small", "magnitude_wiener_residual") else _mixture(SHORT)
    error = _compare(reference, HDemucs(SOURCES, **options), mixture)
    assert error < TOLERANCE, f"{case}: max abs error {error:.3g}"


def test_hdemucs_matches_reference_in_training_mode():
    # No randomness in HDemucs' forward: train mode (end_iters) must agree as well.
    options = {**SMALL_HD, "cac": False, "hybrid": False, "wiener_iters": 0, "end_iters": 1}
    reference = _randomise(reference_hdemucs.HDemucs(SOURCES, **options), seed=3)
    assert _compare(reference, HDemucs(SOURCES, **options), _mixture(SHORT), train=True) < TOLERANCE


def test_hdemucs_defaults_match_reference():
    torch.manual_seed(0)
    reference = _randomise(reference_hdemucs.HDemucs(SOURCES), seed=4)
    ours = HDemucs(SOURCES)
    assert _count(ours) == _count(reference) == HDEMUCS_DEFAULT_PARAMS
    assert ours.segment == 40 and ours.samplerate == RATE
    assert _compare(reference, ours, _mixture(RATE // 4, seed=2)) < TOLERANCE


# Small settings (the branches stay apart down to the transformer, short sequences) plus the options
# under test.
SMALL_HT = dict(channels=8, nfft=1024, depth=3, segment=0.4)
HTDEMUCS_CASES: tp.Dict[str, tp.Tuple[dict, int]] = {
    # name: (options, input samples); inputs shorter than the segment are padded to it.
    "short_input_padded": (dict(t_layers=3), 9000),
    "bottom_channels_dconv_both": (dict(bottom_channels=32, dconv_mode=3, t_layers=2, t_heads=4), SHORT),
    "scaled_post_norm_cross_first": (dict(t_emb="scaled", t_norm_first=False, t_norm_out=False,
                                          t_layer_scale=False, t_cross_first=True, t_layers=3, t_heads=4,
                                          t_gelu=False), SHORT),
    "cape_group_norms": (dict(t_emb="cape", t_norm_in=False, t_norm_in_group=True, t_group_norm=True,
                              t_layers=2, t_hidden_scale=2.0, t_weight_pos_embed=0.5), SHORT),
    "magnitude_wiener": (dict(cac=False, wiener_iters=1, end_iters=1, t_layers=1), SHORT),
    "multi_freqs_no_emb": (dict(multi_freqs=[0.4], multi_freqs_depth=2, freq_emb=0, t_layers=2), SHORT),
    "no_transformer": (dict(t_layers=0, bottom_channels=16), SHORT),
    "no_train_segment": (dict(use_train_segment=False, t_layers=2, segment=0.2), SHORT + 321),
}


@pytest.mark.parametrize("case", list(HTDEMUCS_CASES))
def test_htdemucs_matches_reference(case):
    options, samples = HTDEMUCS_CASES[case]
    options = {**SMALL_HT, **options}
    torch.manual_seed(0)
    reference = _randomise(reference_htdemucs.HTDemucs(SOURCES, **options), seed=5)
    error = _compare(reference, HTDemucs(SOURCES, **options), _mixture(samples))
    assert error < TOLERANCE, f"{case}: max abs error {error:.3g}"


def test_htdemucs_matches_reference_in_training_mode():
    # Without dropout nor random embedding shifts, training mode is deterministic: the input is
    # used at its own length (no padding to the segment).
    options = {**SMALL_HT, "t_layers": 2}
    reference = _randomise(reference_htdemucs.HTDemucs(SOURCES, **options), seed=6)
    assert _compare(reference, HTDemucs(SOURCES, **options), _mixture(SHORT, batch=2), train=True) < TOLERANCE


def test_htdemucs_released_configuration_matches_reference():
    # conf/model/htdemucs.yaml's configuration, with a short segment to keep the test fast (the
    # segment has no parameters). The class defaults only differ by fewer parameters.
    options = dict(bottom_channels=512, dconv_mode=3, segment=0.25)
    torch.manual_seed(0)
    reference = _randomise(reference_htdemucs.HTDemucs(SOURCES, **options), seed=7)
    ours = HTDemucs(SOURCES, **options)
    assert _count(ours) == _count(reference) == HTDEMUCS_RELEASED_PARAMS
    assert _compare(reference, ours, _mixture(RATE // 4 - 321)) < TOLERANCE
    assert _count(HTDemucs(SOURCES)) == _count(reference_htdemucs.HTDemucs(SOURCES)) == HTDEMUCS_DEFAULT_PARAMS


def test_htdemucs_eval_input_longer_than_the_segment_is_an_error():
    model = HTDemucs(SOURCES, **SMALL_HT).eval()
    assert model.valid_length(1000) == int(0.4 * RATE)
    with pytest.raises(DemixError, match="training segment"):
        model(_mixture(int(0.4 * RATE) + 1))


@pytest.mark.parametrize("batch_chunks", [1, 2])
def test_htdemucs_chunks_side_by_side_give_the_stems_of_one_chunk_at_a_time(batch_chunks):
    from demixlab.separation import apply_model
    from demixlab.separation.chunking import chunk_jobs

    torch.manual_seed(0)
    model = _randomise(HTDemucs(SOURCES, **SMALL_HT, t_layers=2), seed=8).eval()
    mixture = _mixture(int(1.5 * RATE), seed=3)
    segment = int(0.4 * RATE)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert chunk_jobs(model, None) == 2  # the default on the CPU with 2 threads: side by side
        sequential = apply_model(model, mixture, segment=segment, batch_chunks=batch_chunks)
        side_by_side = apply_model(model, mixture, segment=segment, batch_chunks=batch_chunks, jobs=None)
    finally:
        torch.set_num_threads(previous)
    assert side_by_side.shape == sequential.shape == (1, 4, 2, mixture.shape[-1])
    scale = sequential.abs().max()
    assert scale > 0.01
    assert (side_by_side - sequential).abs().max() / scale <= 1e-6


def test_models_that_thread_themselves_run_chunks_in_order():
    from demixlab.separation.chunking import chunk_jobs

    umx = get_family("umx").build_model(SOURCES, RATE, 2, dict(n_fft=256, hop_length=64, hidden_size=16))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert chunk_jobs(umx, None) == 1 and chunk_jobs(umx, 3) == 3
        assert chunk_jobs(HTDemucs(SOURCES, **SMALL_HT), None) == 2
        torch.set_num_threads(8)  # a big machine: memory must not grow with the cores
        assert chunk_jobs(HTDemucs(SOURCES, **SMALL_HT), None) == 4 and chunk_jobs(umx, 8) == 8
    finally:
        torch.set_num_threads(previous)


def _family_model(overrides: tp.List[str]) -> tp.Tuple[nn.Module, tp.Any]:
    cfg = main.get_xp(overrides).cfg
    options = {key: value for key, value in OmegaConf.to_container(cfg.model, resolve=True).items()
               if key != "family"}
    return get_family(cfg.model.family).build_model(SOURCES, RATE, 2, options), cfg


def test_family_configs_are_the_reference_configurations():
    hdemucs, cfg = _family_model(["model=hdemucs"])
    assert isinstance(hdemucs, HDemucs) and _count(hdemucs) == HDEMUCS_DEFAULT_PARAMS
    assert cfg.loss.loss == "l1" and cfg.optim.lr == 3e-4 and list(cfg.augment.scale) == [0.25, 1.25]
    del hdemucs
    htdemucs, cfg = _family_model(["model=htdemucs", "dset=musdb18hq", "dset.root=/data/musdb18hq"])
    assert isinstance(htdemucs, HTDemucs) and _count(htdemucs) == HTDEMUCS_RELEASED_PARAMS
    assert htdemucs.segment == 10 and cfg.valid.segment == 10 and cfg.augment.remix == 4
    # The model's segment follows the training segment (the toy dataset shortens it).
    _, cfg = _family_model(["model=htdemucs"])
    assert cfg.model.segment == cfg.segment == cfg.valid.segment


def test_unknown_options_are_errors():
    family = get_family("hdemucs")
    with pytest.raises(DemixError, match="model.t_layers is not an option"):
        family.build_model(SOURCES, RATE, 2, {"t_layers": 2})
    with pytest.raises(DemixError, match="wiener_iters == model.end_iters"):
        HDemucs(SOURCES, **SMALL_HD, cac=False, wiener_iters=1, end_iters=0)
    with pytest.raises(DemixError, match="too shallow"):
        HDemucs(SOURCES, channels=8, depth=3)
    with pytest.raises(DemixError, match="loss.combinations is not an option"):
        family.objective(HDemucs(SOURCES, **SMALL_HD), {"combinations": "all"})


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_objective_is_the_weighted_waveform_loss(loss):
    torch.manual_seed(0)
    model = HTDemucs(SOURCES, **{**SMALL_HT, "segment": 8000 / RATE}, t_layers=1)
    weights = {"drums": 2.0, "vocals": 0.5}
    objective = get_family("htdemucs").build_objective(model, loss=loss, source_weights=weights)
    mixture = _mixture(8000, batch=2)
    references = 0.1 * torch.randn(2, len(SOURCES), 2, 8000, generator=torch.Generator().manual_seed(3))
    model.eval()  # deterministic, so that the direct computation sees the same estimates
    metrics = objective(model, mixture, references)
    with torch.no_grad():
        difference = model(mixture) - references
    errors = (difference.abs() if loss == "l1" else difference ** 2).mean(dim=(0, 2, 3))
    weight = torch.tensor([2.0, 1.0, 1.0, 0.5])
    torch.testing.assert_close(metrics["loss"], (errors * weight).sum() / weight.sum())
    torch.testing.assert_close(metrics["loss_bass"], errors[1])
    metrics["loss"].backward()
    assert all(p.grad is not None for p in model.crosstransformer.parameters())


def test_transformer_parameters_get_their_own_optimizer_group():
    model = HTDemucs(SOURCES, **SMALL_HT, t_layers=2, bottom_channels=16, t_weight_decay=0.05)
    optim = OptimConfig(optimizer="adam", lr=3e-4, betas=[0.9, 0.999], weight_decay=0.0,
                        groups={"transformer": ParameterGroupConfig(lr=1e-4)})
    groups = {group["name"]: group for group in build_optimizer(model, optim).param_groups}
    transformer = {id(p) for p in model.crosstransformer.parameters()}
    assert {id(p) for p in groups["transformer"]["params"]} == transformer
    assert groups["transformer"]["lr"] == 1e-4 and groups["transformer"]["weight_decay"] == 0.05
    assert groups["default"]["lr"] == 3e-4 and groups["default"]["weight_decay"] == 0.0
    assert not transformer & {id(p) for p in groups["default"]["params"]}
    assert len(groups["default"]["params"]) + len(transformer) == len(list(model.parameters()))
    # Without a transformer the group exists but is empty (so the yaml's group settings stay valid).
    empty = HTDemucs(SOURCES, **SMALL_HT, t_layers=0)
    assert [g["name"] for g in build_optimizer(empty, optim).param_groups] == ["default"]


# Small models (HDemucs: nfft 256, the hybrid branches merge at the third layer; HTDemucs: the real
# depth, short transformer sequences); no EMAs, to validate once.
SMALL_MODELS = {
    "hdemucs": ["model=hdemucs", "model.channels=4", "model.nfft=256", "model.depth=4", "model.dconv_attn=3",
                "model.dconv_lstm=3", "ema.decays=[]"],
    "htdemucs": ["model=htdemucs", "model.channels=8", "model.bottom_channels=16",
                 "model.t_layers=2", "model.t_heads=4", "optim.groups.transformer.weight_decay=0.01", "ema.decays=[]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SMALL_MODELS))
def test_dora_run_trains_the_family(tmp_path, cache_dir, family):
    args = [*(arg for arg in TINY if not arg.startswith("model.")), *SMALL_MODELS[family]]
    dora(tmp_path, cache_dir, *args)
    folder = tmp_path / "outputs" / "xps" / signature(tmp_path, cache_dir, *args)
    history = json.loads((folder / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert {"loss", "loss_vocals"} <= set(history[0]["train"])
    assert "nsdr" in history[-1]["valid"] and "nsdr_drums" in history[-1]["test"]
    checkpoint = load_checkpoint(folder)
    assert checkpoint["done"] and checkpoint["family"] == family
