"""DiffQ quantisation-aware training (`quant.diffq`): the noise, the size penalty, the integer
encoding, the solver with it on (exact resume) and the quantised model files it exports."""
import json
import math
import typing as tp
from pathlib import Path

import pytest
import torch

from demixlab.errors import DemixError
from demixlab.models import get_family
from demixlab.release.model_file import QUANTIZED_FORMAT, load_package, model_from_package
from demixlab.release.quantized import decode_weight, encode_weight, encoded_values, mean_bits
from demixlab.training.diffq import DiffQuantizer, NoisyModel, QuantConfig
from demixlab.training.export import export
from tests.cli import TINY, load_checkpoint
from tests.schema import parse_with
from tests.test_cuda import RATE, SMALL_OPTIONS
from tests.test_solver import RUN, _history, _resume_matches_an_uninterrupted_run, run_in  # noqa: F401 (fixture)

SOURCES = ["drums", "bass", "other", "vocals"]
DIFFQ = ["quant.diffq=0.001", "quant.min_size=0.001"]


def _quantizer(model: torch.nn.Module, **options: tp.Any) -> DiffQuantizer:
    return DiffQuantizer(model, QuantConfig(**{"diffq": 0.0, "min_size": 0.0, **options}))


def test_the_noise_has_the_quantisation_step_of_each_group():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32, bias=False)  # 2048 weights: 256 groups of 8
    quantizer = _quantizer(model, min_bits=2, max_bits=10)
    with torch.no_grad():  # alternate groups at 4 and 9 bits
        quantizer.logits[0].copy_(torch.tensor([-1.1, 1.95]).repeat(128))
    bits = quantizer.bits()[0].detach()
    torch.testing.assert_close(bits[:2], torch.tensor([4.0, 9.0]), atol=0.01, rtol=0)
    weight = model.weight.detach().flatten()
    step = (weight.max() - weight.min()) / (2 ** bits - 1)
    noise = torch.stack([(quantizer.noisy_weights()["weight"].detach().flatten() - weight) for _ in range(200)])
    noise = noise.view(200, 256, 8)
    assert (noise.abs() <= step[None, :, None] / 2 * (1 + 1e-5)).all()
    std = noise.std(dim=(0, 2))  # U(-step/2, step/2): std = step / sqrt(12)
    torch.testing.assert_close(std / (step / math.sqrt(12)), torch.ones(256), atol=0.1, rtol=0)
    assert float(step[0] / step[1]) > 30  # (2^9 - 1) / (2^4 - 1): very different scales


def test_the_size_penalty_is_differentiable_and_lowers_the_bits_under_pressure():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    quantizer = _quantizer(model, min_size=0.0005)  # the two weight matrices; biases stay float32
    assert quantizer.names == ["0.weight", "2.weight"]
    noisy = NoisyModel(model, quantizer).train()
    optimizer = torch.optim.Adam([*model.parameters(), *quantizer.parameters()], lr=0.05)
    inputs, targets = torch.randn(32, 16), torch.randn(32, 4)
    before = float(quantizer.model_size_mb().detach())
    assert before == pytest.approx((8 * (16 * 64 + 64 * 4) + 32 * (64 + 4)) / 8 / 2 ** 20, rel=1e-4)
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(noisy(inputs), targets) + 1000 * quantizer.model_size_mb()
        optimizer.zero_grad()
        loss.backward()
        assert all(logit.grad is not None and logit.grad.abs().sum() > 0 for logit in quantizer.logits)
        optimizer.step()
    assert float(quantizer.model_size_mb().detach()) < 0.9 * before
    assert quantizer.mean_bits() < 7.5
    noisy.eval()  # eval mode: the plain weights
    assert torch.equal(noisy(inputs), model(inputs))


def test_integer_levels_decode_within_half_a_step_of_each_group():
    torch.manual_seed(0)
    weight = torch.randn(5, 7, 3)  # 105 values: 14 groups of 8, the last of 1
    bits = torch.randint(2, 9, (14,))
    entry = encode_weight(weight, bits, 8)
    assert entry["levels"].dtype == torch.uint8 and entry["levels"].numel() == 105
    assert entry["wide_levels"].numel() == 0 and entry["bits"].tolist() == bits.tolist()
    step = ((weight.max() - weight.min()) / (2.0 ** bits - 1)).repeat_interleave(8)[:105]
    decoded = decode_weight(entry)
    assert decoded.shape == weight.shape
    assert ((decoded - weight).flatten().abs() <= step / 2 + 1e-6).all()
    mixed = torch.where(torch.arange(14) % 2 == 0, 4, 12)  # uint8 levels for 4 bits, int16 for 12
    entry = encode_weight(weight, mixed, 8)
    assert entry["levels"].numel() == 56 and entry["wide_levels"].numel() == 49
    assert entry["wide_levels"].dtype == torch.int16 and int(entry["wide_levels"].max()) == 2 ** 12 - 1
    step = ((weight.max() - weight.min()) / (2.0 ** mixed - 1)).repeat_interleave(8)[:105]
    assert ((decode_weight(entry) - weight).flatten().abs() <= step / 2 + 1e-6).all()
    with pytest.raises(DemixError, match="bit depths must be in"):
        encode_weight(weight, torch.full((14,), 16), 8)


@pytest.mark.parametrize("family_name", sorted(SMALL_OPTIONS))
def test_every_family_trains_through_the_noisy_weights(family_name):
    torch.manual_seed(0)
    family = get_family(family_name)
    model = family.build_model(SOURCES, RATE, 2, SMALL_OPTIONS[family_name]).train()
    quantizer = _quantizer(model, min_size=0.005)
    sources = 0.1 * torch.randn(1, len(SOURCES), 2, model.valid_length(RATE // 2))
    losses = family.objective(model, {})(NoisyModel(model, quantizer).train(), sources.sum(1), sources)
    losses["loss"].backward()  # the objective alone: a weight the model read around the noise gives its bits no gradient
    trained = dict(model.named_parameters())
    for name, logit in zip(quantizer.names, quantizer.logits):
        assert trained[name].grad is not None and logit.grad is not None and bool(torch.isfinite(logit.grad).all())
        if trained[name].max() > trained[name].min():  # constant tensors (e.g. fresh norms) have no noise
            assert logit.grad.abs().sum() > 0, name


@pytest.mark.parametrize("values, message", [
    ({"quant.diffq": -1.0}, "quant.diffq must be a penalty >= 0 or null"),
    ({"quant.group_size": 0}, "quant.group_size must be a positive integer"),
    ({"quant.max_bits": 16}, "quant.min_bits and quant.max_bits must satisfy"),
    ({"quant.min_bits": 9, "quant.max_bits": 8}, "quant.min_bits and quant.max_bits must satisfy"),
    ({"quant.init_bits": 1.0}, "quant.init_bits must be in"),
    ({"quant.lr": 0.0}, "quant.lr must be > 0 or null"),
    ({"quant.min_size": -0.1}, "quant.min_size must be >= 0"),
    ({"quant.diffq": 0.1, "finetune.lora.enabled": True}, "quant.diffq cannot train LoRA adapters"),
])
def test_bad_quant_values_are_one_line_errors_naming_the_key(values, message):
    with pytest.raises(DemixError, match=message):
        parse_with(values)


def test_bad_quant_value_on_the_command_line(in_process, capsys):
    assert in_process(*TINY, "quant.group_size=abc") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("demixlab: error:")]
    assert len(errors) == 1 and "quant.group_size" in errors[0]


def test_quant_keys_enter_the_config_digest_only_when_on():
    from demixlab.experiment import flat_config
    from demixlab.train import main

    off = flat_config(main.get_xp(["quant.group_size=4"]).cfg)  # DiffQ off: its options are not part of it
    assert not any(key.startswith("quant.") for key in off)
    assert off == flat_config(main.get_xp([]).cfg)
    on = flat_config(main.get_xp(["quant.diffq=0.0003"]).cfg)
    assert on["quant.diffq"] == 0.0003 and on["quant.group_size"] == 8 and on["quant.max_bits"] == 15


def test_a_too_large_min_size_is_a_one_line_error():
    with pytest.raises(DemixError, match="quant.min_size=1000.0: no weight tensor"):
        DiffQuantizer(torch.nn.Linear(4, 4), QuantConfig(diffq=0.0, min_size=1000.0))


@pytest.mark.slow
def test_a_diffq_xp_resumes_exactly_and_exports_a_smaller_quantised_file(tmp_path, run_in, monkeypatch):
    checkpoint = _resume_matches_an_uninterrupted_run(tmp_path, run_in, monkeypatch,
                                                      [*RUN, *DIFFQ, "quant.lr=0.05", "ema.decays=[0.5]"])
    straight = load_checkpoint(next((tmp_path / "straight" / "outputs" / "xps").iterdir()))
    for name, value in straight["quantizer"].items():  # the bit logits resumed exactly too
        assert torch.equal(checkpoint["quantizer"][name], value), name
    history = _history(tmp_path / "resumed")
    train = history[-1]["train"]
    assert {"model_size_mb", "quantized_mb", "mean_bits"} <= set(train)
    assert train["quantized_mb"] < 0.5 * sum(4 * v.numel() for v in checkpoint["model"].values()
                                             if v.is_floating_point()) / 2 ** 20
    assert history[-1]["train"]["model_size_mb"] < history[0]["train"]["model_size_mb"]  # the bits went down

    outputs = tmp_path / "resumed" / "outputs"
    path = export(checkpoint["signature"], tmp_path / "repo", dora_dir=outputs)
    package = load_package(path)
    assert package["format"] == QUANTIZED_FORMAT and set(package["quantized"]) == set(checkpoint["best_bits"])
    assert all(entry["levels"].dtype == torch.uint8 and entry["wide_levels"].dtype == torch.int16
               for entry in package["quantized"].values())
    origin = package["origin"]["diffq"]
    assert origin["stored_bytes"] < 0.4 * origin["float32_bytes"]
    model = model_from_package(package)
    for name, value in checkpoint["best_state"].items():  # every weight within half a step of the trained one
        entry = package["quantized"].get(name)
        if entry is None:
            assert torch.equal(model.state_dict()[name], value), name
        else:
            step = (entry["max"] - entry["min"]) / (2.0 ** entry["bits"].float() - 1)
            error = (model.state_dict()[name] - value).flatten().abs()
            assert (error <= step.repeat_interleave(entry["group_size"])[:error.numel()] / 2 + 1e-6).all(), name


@pytest.mark.slow
def test_the_quantised_export_separates_like_the_noise_free_model(tmp_path, in_process, capsys, cache_dir):
    """UMX trained 2 epochs with DiffQ on the tiny toy set: its quantised file is smaller than the
    float32 export and its global SDR on the test track is within 0.1 dB of the training's own test."""
    from tools.test_pretrained import main as evaluate_cli

    assert in_process(*TINY, *DIFFQ, "test.sdr=false") == 0
    folder, = (tmp_path / "outputs" / "xps").iterdir()
    quantized = export(folder.name, tmp_path / "repo", dora_dir=tmp_path / "outputs")
    checkpoint = load_checkpoint(folder)
    plain = {key: value for key, value in checkpoint.items() if key not in ("bits", "best_bits")}
    torch.save(plain, folder / "checkpoint.th")  # the same XP without its bits: a float32 export
    float32 = export(folder.name, tmp_path / "float32", dora_dir=tmp_path / "outputs")
    assert quantized.stat().st_size < 0.6 * float32.stat().st_size
    capsys.readouterr()
    evaluate_cli(["--repo", str(tmp_path / "repo"), "-n", folder.name, "-o", str(tmp_path / "eval"), "--device", "cpu",
                  *[arg for arg in TINY if arg.startswith("dset.")], f"misc.cache_dir={cache_dir}",
                  "misc.progress=false", "test.sdr=false"])
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    quantized_sdr = sum(sum(track["nsdr"].values()) / len(track["nsdr"]) for track in report["tracks"])
    quantized_sdr /= len(report["tracks"])
    float_sdr = checkpoint["history"][-1]["test"]["nsdr"]
    assert abs(quantized_sdr - float_sdr) < 0.1, (quantized_sdr, float_sdr)


@pytest.mark.slow
def test_a_convolutional_family_trains_with_diffq_and_logs_its_sizes(tmp_path, in_process):
    """HDemucs (small) for one epoch: the sizes reach the history and TensorBoard; the export is quantised."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_hdemucs import SMALL_MODELS

    args = [*(arg for arg in TINY if not arg.startswith(("model.", "epochs="))), *SMALL_MODELS["hdemucs"], "epochs=1"]
    assert in_process(*args, *DIFFQ) == 0
    folder, = (tmp_path / "outputs" / "xps").iterdir()
    train = json.loads((folder / "history.json").read_text())[-1]["train"]
    assert 0 < train["quantized_mb"] < train["model_size_mb"] * 2 and 2 <= train["mean_bits"] <= 15
    events = EventAccumulator(str(folder / "tensorboard")).Reload()
    assert {"train/model_size_mb", "train/quantized_mb", "train/mean_bits"} <= set(events.Tags()["scalars"])
    package = load_package(export(folder.name, tmp_path / "repo", dora_dir=tmp_path / "outputs"))
    assert package["quantized"] and package["family"] == "hdemucs"
    model_from_package(package)


def _quantized_umx_file(path: Path) -> tp.Tuple[torch.nn.Module, Path]:
    """A tiny UMX saved as a quantised model file (bits drawn at random), and the path."""
    from demixlab.release.model_file import package_model, save_package
    from demixlab.training.diffq import quantize_state
    from tests.test_pretrained import TINY_UMX

    torch.manual_seed(0)
    model = get_family("umx").build_model(SOURCES, RATE, 2, TINY_UMX)
    quantizer = _quantizer(model, min_size=0.001)
    bits = {name: torch.randint(3, 12, bits.shape) for name, bits in quantizer.rounded_bits().items()}
    kept, quantized = quantize_state(model.state_dict(), bits, quantizer.group_size)
    package = package_model("umx", TINY_UMX, kept, sources=SOURCES, samplerate=RATE, audio_channels=2)
    package.update(format=QUANTIZED_FORMAT, quantized=quantized)
    save_package(package, path)
    return model, path


def test_a_quantised_file_loads_dequantised_and_compresses_to_a_float_variant(tmp_path):
    from demixlab.release.compression import write_variant
    from demixlab.release.model_file import FORMAT

    model, path = _quantized_umx_file(tmp_path / "q.th")
    loaded = model_from_package(load_package(path))
    package = load_package(path)
    for name, value in model.state_dict().items():
        entry = package["quantized"].get(name)
        if entry is None:
            assert torch.equal(loaded.state_dict()[name], value), name
        else:
            step = ((entry["max"] - entry["min"]) / (2.0 ** entry["bits"].float() - 1)).repeat_interleave(8)
            assert ((loaded.state_dict()[name] - value).flatten().abs() <= step[:value.numel()] / 2 + 1e-6).all()
    half = load_package(write_variant(path, half=True))  # a float16 copy of the dequantised weights
    assert half["format"] == FORMAT and "quantized" not in half
    assert set(half["state"]) == set(model.state_dict())
    torch.testing.assert_close(model_from_package(half).state_dict(), loaded.state_dict(), atol=2e-3, rtol=1e-3)
    newer = dict(package, format="demixlab-model/3")
    with pytest.raises(DemixError, match="newer than this demixlab"):
        model_from_package(newer)


@pytest.mark.slow
def test_two_processes_train_with_diffq_in_lockstep(tmp_path, cache_dir):
    """DDP (gloo, 2 CPU processes): each rank draws its own noise; the bit logits' gradients are
    averaged with the weights', so the weights and the logits stay identical on both."""
    from tests.cli import dora, signature

    result = dora(tmp_path, cache_dir, "-d", "--ddp_workers", "2", *TINY, *DIFFQ)
    assert "All workers completed successfully" in result.stdout + result.stderr
    folder = tmp_path / "outputs" / "xps" / signature(tmp_path, cache_dir, *TINY, *DIFFQ)
    log = (folder / "train.log").read_text()
    assert "epoch 2: weights identical on the 2 processes" in log
    assert load_checkpoint(folder)["best_bits"]


def test_mean_bits_weights_each_group_by_the_values_it_holds():
    generator = torch.Generator().manual_seed(3)
    first = encode_weight(torch.randn(10, generator=generator), torch.tensor([4, 12]), group_size=8)  # 8 + 2 values
    second = encode_weight(torch.randn(3, 2, generator=generator), torch.tensor([2]), group_size=8)  # 6 values
    assert [encoded_values(first), encoded_values(second)] == [10, 6]
    assert mean_bits([first, second]) == pytest.approx((8 * 4 + 2 * 12 + 6 * 2) / 16)
    assert mean_bits([]) == 0
