"""Smaller models: global magnitude pruning, float16 and int8 variants of model files and ONNX graphs."""
import json

import pytest
import torch

from demixlab.commands import main as cli
from demixlab.errors import EXIT_USER_ERROR
from demixlab.release.compression import prune_state, zero_fraction
from demixlab.release.model_file import load_package
from demixlab.separation import Separator
from tests.test_onnx import RATE, SOURCES, _model_file

pytest.importorskip("onnxruntime")


def test_pruning_ranks_weights_across_layers_and_leaves_the_rest():
    state = {"big.weight": torch.full((10, 10), 5.0), "small.weight": torch.linspace(0.01, 1, 100).view(10, 10),
             "small.bias": torch.zeros(10) + 0.001, "norm.weight": torch.full((10,), 0.001),
             "lstm.weight_ih_l0": torch.full((4, 5), 0.5), "bn.running_mean": torch.zeros(3, 3)}
    pruned = prune_state(state, 0.4)
    # 40 % of the 220 weights: the 20 LSTM weights at 0.5 and the 68 smallest of the ramp, none of the 5.0s
    assert int((pruned["lstm.weight_ih_l0"] == 0).sum()) == 20
    assert torch.equal(pruned["small.weight"] == 0, torch.arange(100).view(10, 10) < 68)
    assert torch.equal(pruned["big.weight"], state["big.weight"])
    for key in ("small.bias", "norm.weight", "bn.running_mean"):  # not matrices or kernels of weights
        assert torch.equal(pruned[key], state[key])
    assert zero_fraction(pruned) == pytest.approx(0.4)
    assert zero_fraction(state) == 0 and not torch.equal(pruned["small.weight"], state["small.weight"])


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


@pytest.mark.slow
def test_variants_of_a_model_file_separate_close_to_the_original(tmp_path, capsys):
    path = _model_file(tmp_path, "umx")
    mixture = 0.2 * torch.randn(2, 30000, generator=torch.Generator().manual_seed(2))
    reference = Separator(tmp_path, "tiny", device="cpu").separate_tensor(mixture, RATE)

    cli(["export", str(path), "--prune", "0.3", "--half"])
    variant = load_package(tmp_path / "tiny-prune30-half.th")
    assert {value.dtype for value in variant["state"].values() if value.is_floating_point()} == {torch.float16}
    assert zero_fraction(variant["state"]) == pytest.approx(0.3, abs=1e-3) and variant["origin"]["compressed_from"] == "tiny.th"
    assert load_package(path)["state"]["targets.drums.fc1.weight"].dtype == torch.float32  # the original stays
    pruned = Separator(tmp_path, "tiny-prune30-half", device="cpu").separate_tensor(mixture, RATE)

    cli(["export", str(path), "--quantize", "int8"])
    manifest = json.loads((tmp_path / "tiny-int8.onnx.json").read_text())
    assert manifest["weights"] == "int8" and 0 < manifest["max_error"] < 0.2
    assert (tmp_path / "tiny-int8.onnx").stat().st_size < 0.6 * (tmp_path / "tiny.th").stat().st_size
    quantized = Separator(tmp_path, "tiny-int8", device="cpu", backend="onnxruntime").separate_tensor(mixture, RATE)

    cli(["export", str(path), "--half", "--onnx"])
    manifest = json.loads((tmp_path / "tiny-half.onnx.json").read_text())
    assert manifest["weights"] == "float16" and manifest["max_error"] < 1e-2
    half = Separator(tmp_path, "tiny-half", device="cpu", backend="onnxruntime").separate_tensor(mixture, RATE)
    for source in SOURCES:  # changed, but not unrecognisably
        errors = [_relative_error(estimate[source], reference[source]) for estimate in (pruned, quantized, half)]
        assert all(0 < error < 0.5 for error in errors), (source, errors)
        assert errors[2] < 1e-2

    with pytest.raises(SystemExit) as exit_info:
        cli(["export", str(path), "--prune", "1.5"])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert "--prune must be a fraction between 0 and 1" in capsys.readouterr().err
