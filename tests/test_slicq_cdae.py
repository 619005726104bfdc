"""The sliCQ-CDAE family (xumx-sliCQ-V2): per-block autoencoders on the sliCQT, its loss, export."""
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from demixlab.errors import DemixError
from demixlab.models.losses import source_subsets
from demixlab.models import get_family
from demixlab.models.slicq.blocks import BlockCDAE, CausalConv2d, SliCQMaskNetwork, frequency_kernel
from demixlab.models.slicq.cdae import (REFERENCE_TARGETS, SliCQCDAE, build_slicq_cdae_objective,
                                        calibrate_slicq_cdae, complex_mse, export_onnx, load_reference_state_dict,
                                        mask_sum_loss, sd_sdr_loss)
from tests.cli import dora, signature

SOURCES = ["drums", "bass", "other", "vocals"]
PUBLISHED_PARAMETERS = 15_010_446
# A small configuration for fast tests: 9 blocks, slices of 764 samples, narrow autoencoders.
SMALL = dict(fbins=12, hidden_1=6, hidden_2=7)


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics, so that eval-mode parity means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if not value.dtype.is_floating_point:
                continue
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
            elif key.endswith("input_scale"):
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
            else:
                value.copy_(0.1 * torch.randn(value.shape, generator=generator))
    return module


@pytest.fixture(scope="module")
def audio():
    """One second of random stereo sources (B=1) and their mixture."""
    generator = torch.Generator().manual_seed(0)
    sources = 0.1 * torch.randn(1, 4, 2, 44100, generator=generator)
    return sources.sum(dim=1), sources


# ------------------------------------------------------------------------------- architecture
def test_published_parameter_count_and_kernels():
    model = SliCQCDAE(SOURCES, 44100, 2)
    assert len(model.network.blocks) == 70
    assert _count(model) == PUBLISHED_PARAMETERS
    assert [frequency_kernel(bins) for bins in (1, 9, 10, 19, 20, 86)] == [1, 1, 3, 3, 5, 5]
    block = model.network.blocks[1]  # (86, 16): f = 5, stride 8
    assert (block.bins, block.frames) == (86, 16)
    # The four sources' autoencoders as grouped layers: 2 channels in and out, 50/51 hidden, each.
    assert block.encode1.kernel_size == (5, 16) and block.encode1.stride == (1, 8) and block.encode1.bias is None
    assert block.encode1.groups == 4 and block.encode1.out_channels == 4 * 50 and block.encode2.out_channels == 4 * 51
    assert block.encode2.kernel_size == (5, 4) and block.decode2.kernel_size == (5, 4)
    assert block.decode1.bias is not None and block.decode1.out_channels == 4 * 2


def test_per_source_state_dicts_load_into_the_grouped_layers():
    """Model files of earlier versions hold one autoencoder per source (`cdaes.<s>.<layer>.*`)."""
    torch.manual_seed(0)
    block = _randomise(BlockCDAE(12, 16, sources=3, channels=2, hidden_1=4, hidden_2=5), 1)
    old = {}
    for key, value in block.state_dict().items():
        layer, _, name = key.partition(".")
        if layer in ("input_mean", "input_scale"):
            old[key] = value
            continue
        width = value.shape[0] // 3 if value.dim() else None
        for source in range(3):
            old[f"cdaes.{source}.{key}"] = value if width is None else value[source * width:(source + 1) * width]
    loaded = BlockCDAE(12, 16, sources=3, channels=2, hidden_1=4, hidden_2=5)
    loaded.load_state_dict(old)
    for key, value in block.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_masks_have_the_block_shapes():
    network = SliCQMaskNetwork([(1, 28), (12, 16), (25, 20)], sources=3, channels=2, hidden_1=5, hidden_2=6)
    magnitudes = [torch.rand(2, 2, bins, 4, frames) for bins, frames in network.block_shapes]
    with torch.no_grad():
        masks = network(magnitudes)
    assert [tuple(mask.shape) for mask in masks] == [(2, 3, 2, bins, 4, frames) for bins, frames in
                                                     network.block_shapes]
    assert all(float(mask.min()) >= 0 and float(mask.max()) <= 1 for mask in masks)  # sigmoid
    with pytest.raises(DemixError, match="too short"):
        network([magnitude[..., :2, :] for magnitude in magnitudes])


@pytest.mark.parametrize("realtime", [False, True])
def test_half_slice_convolutions_match_the_strided_layers(realtime):
    """The block runs its (f, T_b) convolutions of stride T_b / 2 as (f, 2) convolutions over half
    slices; the layers as declared (strided, the first causal in realtime, on the input repeated
    per source) give the same masks, running statistics and gradients in training mode."""
    import copy

    import torch.nn.functional as F
    torch.manual_seed(0)
    for bins, frames in [(1, 28), (12, 16), (25, 20)]:
        block = _randomise(BlockCDAE(bins, frames, sources=3, channels=2, hidden_1=5, hidden_2=6,
                                     realtime=realtime), 1).train()
        declared = copy.deepcopy(block)
        magnitude = torch.rand(2, 2, bins, 5, frames)
        weights = torch.rand(2, 3, 2, bins, 5, frames)
        masks = block(magnitude)
        (masks * weights).sum().backward()

        length = 5 * frames
        x = magnitude.reshape(2, 2, bins, length)
        x = (x + declared.input_mean[:, None]) * declared.input_scale[:, None]
        y = F.relu(declared.norm1(declared.encode1(x.repeat(1, 3, 1, 1))))
        y = F.relu(declared.norm2(declared.encode2(y)))
        y = F.relu(declared.norm3(declared.decode2(y)))
        expected = torch.sigmoid(declared.decode1(y))[..., :length].reshape(masks.shape)
        (expected * weights).sum().backward()
        torch.testing.assert_close(masks, expected, atol=1e-6, rtol=1e-5)
        for (name, ours), theirs in zip(block.state_dict().items(), declared.state_dict().values()):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)
        # (relative to the largest gradient: a one-bin block's input_mean has none, up to rounding)
        scale = max(float(parameter.grad.abs().max()) for parameter in declared.parameters())
        for (name, ours), theirs in zip(block.named_parameters(), declared.parameters()):
            assert float((ours.grad - theirs.grad).abs().max()) < 1e-5 * scale, name


# ---------------------------------------------------------------------------------- reference
def test_reference_state_dict_gives_the_same_masks_and_outputs(audio):
    from tests.references import import_reference
    transforms = import_reference("xumx_slicq_v2.transforms")
    reference_model = import_reference("xumx_slicq_v2.model")
    mixture = audio[0][..., :22050]  # 4 slices: the fewest that the offline autoencoders take, plus one
    base = transforms.NSGTBase("bark", 262, 32.9, fs=44100.0, device="cpu")
    forward, backward = transforms.make_filterbanks(base)
    blocks = forward(mixture)  # (B, C, F_b, S, T_b, 2), reference order of targets
    reference = _randomise(reference_model.Unmix(transforms.ComplexNorm()(blocks)), seed=1).eval()

    model = SliCQCDAE(SOURCES, 44100, 2)
    load_reference_state_dict(model, reference.state_dict())
    model.eval()
    order = [REFERENCE_TARGETS.index(name) for name in SOURCES]
    with torch.no_grad():
        reference_estimates, reference_masks = reference([block.clone() for block in blocks], return_masks=True)
        estimates, masks = model(mixture, for_loss=True)
        waveforms = model(mixture)
        # (the reference inverse works in place on its input)
        reference_waveforms = backward([block.clone() for block in reference_estimates], mixture.shape[-1])
    # Reference outputs are (targets, B, ...): reorder the targets, move them after the batch.
    mask_error = max(float((ours - theirs[order].transpose(0, 1)).abs().max())
                     for ours, theirs in zip(masks, reference_masks))
    assert mask_error < 1e-5  # measured: 1.2e-7 (the transforms agree to ~3e-6)
    unmapped = max(float((ours - theirs.transpose(0, 1)).abs().max()) for ours, theirs in zip(masks, reference_masks))
    assert unmapped > 1e-2  # the target order is mapped, not ignored
    estimate_error = max(float((ours - torch.view_as_complex(theirs[order].transpose(0, 1).contiguous())).abs().max())
                         for ours, theirs in zip(estimates, reference_estimates))
    assert estimate_error < 1e-4  # measured: 3e-6 (Wiener step included)
    assert waveforms.shape == (1, 4, 2, mixture.shape[-1])
    assert float((waveforms - reference_waveforms[order].transpose(0, 1)).abs().max()) < 1e-5  # measured: 2e-7

    with pytest.raises(DemixError, match="targets"):
        load_reference_state_dict(SliCQCDAE(["vocals", "accompaniment", "x", "y"], 44100, 2, **SMALL),
                                  reference.state_dict())
    with pytest.raises(DemixError, match="blocks"):
        load_reference_state_dict(SliCQCDAE(SOURCES, 44100, 2, **SMALL), reference.state_dict())


@pytest.mark.slow
def test_training_step_gradients_match_the_reference(audio, monkeypatch):
    """One training-mode step (BatchNorm on batch statistics) of the reference model and criteria
    (xumx-sliCQ-V2's loop) and of ours: the same loss and the same gradient for every weight."""
    import types

    from tests.references import import_reference
    monkeypatch.setitem(sys.modules, "auraloss", sys.modules.get("auraloss", types.ModuleType("auraloss")))
    transforms = import_reference("xumx_slicq_v2.transforms")
    reference_model = import_reference("xumx_slicq_v2.model")
    criteria = import_reference("xumx_slicq_v2.loss")
    mixture, sources = audio[0][..., :22050], audio[1][..., :22050]
    forward, _ = transforms.make_filterbanks(transforms.NSGTBase("bark", 262, 32.9, fs=44100.0, device="cpu"))
    reference = _randomise(reference_model.Unmix(transforms.ComplexNorm()(forward(mixture))), seed=2).train()
    model = SliCQCDAE(SOURCES, 44100, 2)
    load_reference_state_dict(model, reference.state_dict())
    model.train()

    order = [SOURCES.index(name) for name in REFERENCE_TARGETS]
    estimates, masks = reference(forward(mixture), return_masks=True)
    targets = forward(sources[:, order].transpose(0, 1).contiguous())
    reference_loss = criteria.ComplexMSELossCriterion()(estimates, targets) + criteria.MaskSumLossCriterion()(masks)
    reference_loss.backward()
    loss = build_slicq_cdae_objective(model)(model, mixture, sources)["loss"]
    loss.backward()
    assert float(loss) == pytest.approx(float(reference_loss), rel=1e-5)

    # The reference's gradients mapped onto our parameters as its weights are.
    parameters = dict(reference.named_parameters())
    mapped = SliCQCDAE(SOURCES, 44100, 2)
    load_reference_state_dict(mapped, {key: parameters[key].grad if key in parameters else value
                                       for key, value in reference.state_dict().items()})
    expected = dict(mapped.named_parameters())
    errors = {name: float((parameter.grad - expected[name]).abs().max() / expected[name].abs().max().clamp_min(1e-6))
              for name, parameter in model.named_parameters()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 5e-3, (worst, errors[worst])  # measured: 1.4e-3 (the transforms agree to ~3e-6)


# --------------------------------------------------------------------------------- objective
class _Fixed(nn.Module):
    """Stands in for the model in the objective: returns fixed estimates and masks."""

    def __init__(self, estimates, masks):
        super().__init__()
        self.estimates, self.masks = estimates, masks

    def forward(self, mixture, for_loss=False):
        assert for_loss
        return self.estimates, self.masks


def test_perfect_estimate_leaves_only_the_mask_sum_term(audio):
    mixture, sources = audio
    model = SliCQCDAE(SOURCES, 44100, 2, **SMALL)
    objective = build_slicq_cdae_objective(model, sdr_coef=1.0)
    targets = model.analyse(sources)
    half = [torch.full(block.shape, 0.125) for block in targets]  # masks summing to 0.5
    metrics = objective(_Fixed(targets, half), mixture, sources)
    assert float(metrics["loss_complex"]) == 0 and float(metrics["loss_mask"]) == pytest.approx(0.25)
    # SD-SDR of a perfect estimate (through the inverse transform): very negative.
    assert float(metrics["loss_sdr"]) < -100
    assert float(metrics["loss"]) == pytest.approx(0.25 + float(metrics["loss_sdr"]))
    quarter = [torch.full(block.shape, 0.25) for block in targets]
    metrics = build_slicq_cdae_objective(model)(_Fixed(targets, quarter), mixture, sources)
    assert float(metrics["loss"]) == 0 and "loss_sdr" not in metrics


def test_complex_loss_is_the_reference_14_subset_mse(audio):
    mixture, sources = audio
    model = SliCQCDAE(SOURCES, 44100, 2, **SMALL)
    targets = model.analyse(sources)
    generator = torch.Generator().manual_seed(3)
    estimates = [block + 0.05 * torch.randn(block.shape, dtype=block.dtype, generator=generator)
                 for block in targets]
    masks = [torch.rand(block.shape, generator=generator) for block in targets]
    metrics = build_slicq_cdae_objective(model, mask_coef=2.0)(_Fixed(estimates, masks), mixture, sources)
    # The reference criterion, written out: per block the mean over the 14 subsets of the MSE of
    # the real views of the summed estimates and targets; then the mean over blocks.
    expected_blocks = []
    for estimate, target in zip(estimates, targets):
        errors = [torch.view_as_real(estimate[:, list(s)].sum(1) - target[:, list(s)].sum(1)).square().mean()
                  for s in source_subsets(4)]
        expected_blocks.append(float(torch.stack(errors).mean()))
    expected_mask = np.mean([float((mask.sum(1) - 1).square().mean()) for mask in masks])
    assert len(source_subsets(4)) == 14
    assert float(metrics["loss_complex"]) == pytest.approx(np.mean(expected_blocks), rel=1e-5)
    assert float(metrics["loss_mask"]) == pytest.approx(expected_mask, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(np.mean(expected_blocks) + 2 * expected_mask, rel=1e-5)
    drums = [e[:, 0] for e in estimates], [t[:, 0] for t in targets]
    assert float(metrics["loss_drums"]) == pytest.approx(float(complex_mse(*drums)), rel=1e-5)
    assert float(mask_sum_loss(masks)) == pytest.approx(expected_mask, rel=1e-5)


def test_sd_sdr_loss_matches_numpy():
    generator = torch.Generator().manual_seed(4)
    reference = torch.randn(3, 2, 1000, generator=generator)
    estimate = 0.8 * reference + 0.3 * torch.randn(3, 2, 1000, generator=generator)
    values = []
    for s_hat, s in zip(estimate.reshape(-1, 1000).double().numpy(), reference.reshape(-1, 1000).double().numpy()):
        s_hat, s = s_hat - s_hat.mean(), s - s.mean()
        alpha = s_hat @ s / (s @ s)
        values.append(-10 * np.log10(alpha ** 2 * (s @ s) / ((s_hat - s) @ (s_hat - s))))
    assert float(sd_sdr_loss(estimate, reference)) == pytest.approx(np.mean(values), rel=1e-4)


def test_gradients_reach_every_parameter(audio):
    mixture, sources = audio
    torch.manual_seed(0)
    model = SliCQCDAE(SOURCES, 44100, 2, **SMALL)
    objective = build_slicq_cdae_objective(model, sdr_coef=0.1)
    metrics = objective(model, mixture, sources)
    metrics["loss"].backward()
    assert set(metrics) >= {"loss", "loss_complex", "loss_mask", "loss_sdr", "loss_vocals"}
    missing = [name for name, parameter in model.named_parameters()
               if parameter.grad is None or not bool(parameter.grad.abs().sum() > 0)]
    # A one-bin block's input offset is a constant per channel after its first convolution,
    # which training-mode BatchNorm removes: its gradient is zero, in the reference too.
    single_bin = [f"network.blocks.{index}.input_mean" for index, (bins, _) in enumerate(model.network.block_shapes)
                  if bins == 1]
    assert single_bin and set(missing) <= set(single_bin)
    assert [name for name in missing if name not in single_bin] == []


@pytest.mark.parametrize("options, match", [
    ({"sdr_coef": -1}, "loss.sdr_coef"), ({"mask_coef": "x"}, "loss.mask_coef"),
    ({"mix_coef": 1}, "loss.mix_coef"), ({"combinations": "pairs"}, "loss.combinations"),
    ({"source_weights": {"guitar": 1}}, "loss.source_weights"),
])
def test_objective_rejects_bad_options(options, match):
    with pytest.raises(DemixError, match=match):
        get_family("slicq_cdae").objective(SliCQCDAE(SOURCES, 44100, 2, **SMALL), options)


# ---------------------------------------------------------------------------------- realtime
def test_realtime_masks_are_causal_up_to_the_lookahead():
    torch.manual_seed(0)
    for realtime in (True, False):
        block = _randomise(BlockCDAE(12, 16, sources=2, channels=2, hidden_1=4, hidden_2=5, realtime=realtime),
                           seed=2).eval()
        magnitude = torch.rand(1, 2, 12, 6, 16)
        changed = magnitude.clone()
        flat = changed.view(1, 2, 12, 96)
        change_at = 60
        flat[..., change_at:] = torch.rand(1, 2, 12, 96 - change_at)
        with torch.no_grad():
            before = block(magnitude).flatten(-2)
            after = block(changed).flatten(-2)
        past = change_at - block.lookahead  # 60 - 24
        differs = (before - after).abs().amax(dim=(0, 1, 2, 3)) > 0
        if realtime:
            assert not bool(differs[:past].any())  # the past before the lookahead is untouched
            assert bool(differs[past:].any())
        else:
            assert bool(differs[:past].any())  # offline, the future reaches back


def test_realtime_model_uses_the_mixture_phase(audio):
    mixture = audio[0][..., :22050]
    model = SliCQCDAE(SOURCES, 44100, 2, realtime=True, **SMALL).eval()
    assert isinstance(model.network.blocks[0].encode1, CausalConv2d)
    with torch.no_grad():
        estimates, masks = model(mixture, for_loss=True)
        blocks = model.analyse(mixture)
    for estimate, mask, block in zip(estimates, masks, blocks):
        torch.testing.assert_close(estimate, mask * block.unsqueeze(1), atol=1e-6, rtol=1e-5)
    assert model(mixture).shape == (1, 4, 2, mixture.shape[-1])


# ------------------------------------------------------------------------- calibration, checks
def test_calibration_whitens_each_block(audio):
    mixture, sources = audio
    model = SliCQCDAE(SOURCES, 44100, 2, **SMALL)
    batches = [(mixture, sources), (0.5 * mixture.flip(-1), sources)]
    calibrate_slicq_cdae(model, batches)
    for index, block in enumerate(model.network.blocks):
        values = torch.cat([model.analyse(m)[index].abs().mean(dim=1).flatten(-2) for m, _ in batches], dim=-1)
        values = values.transpose(-1, -2).reshape(-1, block.bins)  # (coefficients, F_b)
        normalised = (values + block.input_mean.detach()) * block.input_scale.detach()
        assert normalised.mean(dim=0).abs().max() < 1e-3
        std = normalised.std(dim=0, unbiased=False)
        assert ((std - 1).abs() < 1e-3).all() or (std < 1).all()  # floored stds scale down
    with pytest.raises(DemixError, match="no training batches"):
        calibrate_slicq_cdae(model, [])


def test_bad_options_and_short_audio():
    with pytest.raises(DemixError, match="model.fmax"):
        SliCQCDAE(SOURCES, 16000, 2)
    with pytest.raises(DemixError, match="model.scale"):
        SliCQCDAE(SOURCES, 44100, 2, scale="erb")
    model = SliCQCDAE(SOURCES, 44100, 2, **SMALL)
    with pytest.raises(DemixError, match="too short"):
        model(torch.zeros(1, 2, model.min_length - 1))
    assert model(torch.zeros(1, 2, model.min_length)).shape == (1, 4, 2, model.min_length)


def test_family_is_registered_with_the_config_options():
    from omegaconf import OmegaConf

    from demixlab.experiment import CONFIG_DIR

    config = OmegaConf.load(CONFIG_DIR / "model" / "slicq_cdae.yaml")
    options = {key: value for key, value in OmegaConf.to_container(config.model).items() if key != "family"}
    family = get_family("slicq_cdae")
    model = family.build_model(SOURCES, 44100, 2, options)
    assert isinstance(model, SliCQCDAE) and _count(model) == PUBLISHED_PARAMETERS
    family.objective(model, OmegaConf.to_container(config.loss))
    assert config.optim.optimizer == "adamw" and config.segment == 2.0 and config.amp.enabled
    with pytest.raises(DemixError, match="model.hidden_size"):
        family.build_model(SOURCES, 44100, 2, {"hidden_size": 8})


# --------------------------------------------------------------------------------------- ONNX
def test_onnx_export_matches_onnxruntime(tmp_path, audio):
    onnxruntime = pytest.importorskip("onnxruntime")
    mixture, _ = audio
    model = _randomise(SliCQCDAE(SOURCES, 44100, 2, **SMALL), seed=5)
    path = tmp_path / "masks.onnx"
    export_onnx(model, path, slices=8)
    assert model.training  # left in its mode
    model.eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Another batch size and slice count than the export example (dynamic axes).
    magnitudes = [block.abs() for block in model.analyse(torch.cat([mixture, 0.5 * mixture]))]
    assert magnitudes[0].shape[0] == 2 and magnitudes[0].shape[-2] != 8
    outputs = session.run(None, {f"magnitude_{index}": m.numpy() for index, m in enumerate(magnitudes)})
    with torch.no_grad():
        expected = model.network(magnitudes)
    assert len(outputs) == len(expected) == len(model.network.blocks)
    for output, mask in zip(outputs, expected):
        assert output.shape == tuple(mask.shape)
        np.testing.assert_allclose(output, mask.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------ end to end
TINY_SLICQ = [
    "model=slicq_cdae", "model.fbins=12", "model.hidden_1=4", "model.hidden_2=4",
    "dset.toy.train_tracks=2", "dset.toy.valid_tracks=1", "dset.toy.test_tracks=1",
    "dset.toy.train_duration=2.0", "dset.toy.eval_duration=2.0",
    "epochs=1", "batch_size=2", "segment=1.0", "samples_per_track=1", "test.sdr=false", "misc.num_workers=0",
]


@pytest.mark.slow
def test_dora_run_trains_slicq_cdae(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small tensors: threads only contend on a busy machine
    dora(tmp_path, cache_dir, *TINY_SLICQ)
    folder = tmp_path / "outputs" / "xps" / signature(tmp_path, cache_dir, *TINY_SLICQ)
    history = json.loads((folder / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1]
    assert {"loss", "loss_complex", "loss_mask", "loss_vocals"} <= set(history[0]["train"])
    assert "nsdr" in history[0]["valid"] and "nsdr_bass" in history[0]["test"]
    assert torch.load(folder / "checkpoint.th", weights_only=True)["family"] == "slicq_cdae"
