"""ONNX exports of every family and the onnxruntime separation backend: the contract's split of
`forward`, parity with PyTorch through the same chunking, the CLI, and the errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from demixlab.commands import main as cli
from demixlab.errors import EXIT_USER_ERROR, DemixError
from demixlab.models import SeparationModel, family_names, get_family
from demixlab.release.model_file import load_package, package_model, save_package
from demixlab.release.onnx_export import export_onnx, trace_to_onnx
from demixlab.separation import Separator

pytest.importorskip("onnxruntime")

SOURCES = ["drums", "bass", "other", "vocals"]
RATE = 44100
# Small models of every family (chunks of 0.5 s), so that each export takes a few seconds.
TINY = {
    "umx": dict(n_fft=512, hop_length=128, hidden_size=16, nb_layers=1, bandwidth=8000.0, wiener_iterations=1),
    "xumx": dict(n_fft=512, hop_length=128, hidden_size=16, nb_layers=1, bandwidth=8000.0, wiener_iterations=1),
    "slicq_cdae": dict(fbins=12, hidden_1=4, hidden_2=4),
    "hdemucs": dict(channels=4, nfft=256, depth=3, segment=0.5),
    "htdemucs": dict(channels=8, nfft=256, depth=3, bottom_channels=16, t_layers=1, t_heads=2, segment=0.5),
    "bs_roformer": dict(dim=16, depth=1, heads=2, dim_head=8, stft_n_fft=512, stft_win_length=512,
                        freqs_per_bands=[4] * 16 + [16] * 12 + [1], segment=0.5),
    "mel_roformer": dict(dim=16, depth=1, heads=2, dim_head=8, stft_n_fft=512, stft_win_length=512, num_bands=16,
                         segment=0.5),
}


def test_every_family_is_covered():
    assert sorted(TINY) == family_names()


def _model_file(folder: Path, family: str, name: str = "tiny") -> Path:
    torch.manual_seed(0)
    model = get_family(family).build_model(SOURCES, RATE, 2, TINY[family])
    with torch.no_grad():  # random weights of a trained-like scale, not the initialisation's
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = folder / f"{name}.th"
    save_package(package_model(family, TINY[family], model.state_dict(), sources=SOURCES, samplerate=RATE,
                               audio_channels=2, segment=0.5), path)
    return path


@pytest.mark.parametrize("family", sorted(TINY))
def test_the_network_split_composes_to_forward(family):
    torch.manual_seed(0)
    model = get_family(family).build_model(SOURCES, RATE, 2, TINY[family]).eval()
    mixture = 0.1 * torch.randn(2, 2, model.valid_length(RATE // 2))
    with torch.no_grad():
        inputs, context = model.network_inputs(mixture)
        outputs = model.run_network(*inputs.values())
        axes = model.network_axes()
        assert list(inputs) == list(axes.inputs) and len(outputs) == len(axes.outputs)
        assert all(not tensor.is_complex() for tensor in [*inputs.values(), *outputs])
        assert torch.equal(model.network_outputs(outputs, context, mixture), model(mixture))


# The bigger graphs take 10-30 s each to trace and check on 2 busy cores: CI runs them (slow).
SLOW_EXPORTS = {"hdemucs", "htdemucs", "slicq_cdae"}


@pytest.mark.parametrize("family", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_EXPORTS else name
                                    for name in sorted(TINY)])
def test_onnxruntime_separates_like_pytorch(family, tmp_path):
    path = _model_file(tmp_path, family)
    manifest = json.loads(export_onnx(load_package(path), path).read_text())
    assert manifest["family"] == family and manifest["weights"] == "float32"
    assert manifest["max_error"] < 1e-4 and (tmp_path / "tiny.onnx").is_file()
    assert all("batch" in spec["axes"].values() for spec in manifest["inputs"].values())
    # 1.3 s in chunks of 0.5 s with overlap: full chunks, a shorter last one, batch 2.
    mixture = 0.2 * torch.randn(2, 2, int(1.3 * RATE), generator=torch.Generator().manual_seed(1))
    expected = Separator(tmp_path, "tiny", device="cpu").separate_tensor(mixture, RATE)
    separated = Separator(tmp_path, "tiny", device="cpu", backend="onnxruntime").separate_tensor(mixture, RATE)
    for source in SOURCES:
        scale = float(expected[source].abs().max())
        assert scale > 0
        error = float((separated[source] - expected[source]).abs().max()) / scale
        assert error < 1e-4, (source, error)


def test_the_commands_export_an_existing_model_file_and_separate_with_onnxruntime(tmp_path, capsys):
    path = _model_file(tmp_path, "umx")
    track = tmp_path / "song.wav"
    sf.write(track, 0.3 * np.random.default_rng(0).standard_normal((30000, 2)).astype(np.float32), RATE,
             subtype="FLOAT")
    plain = ["separate", "--repo", str(tmp_path), "-n", "tiny", str(track), "--float32", "--no-progress",
             "--segment", "0.3"]
    separate = [*plain, "--backend", "onnxruntime"]
    with pytest.raises(SystemExit) as exit_info:  # no export yet: the error says how to make one
        cli([*separate, "-o", str(tmp_path / "out")])
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"demixlab export {path} --onnx" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "song").exists()

    cli(["export", str(path), "--onnx"])
    assert (tmp_path / "tiny.onnx").is_file() and (tmp_path / "tiny.onnx.json").is_file()
    cli([*separate, "-o", str(tmp_path / "onnx")])
    cli([*plain, "-o", str(tmp_path / "torch")])
    for source in SOURCES:
        onnx, _ = sf.read(tmp_path / "onnx" / "song" / f"{source}.wav")
        reference, _ = sf.read(tmp_path / "torch" / "song" / f"{source}.wav")
        assert np.abs(onnx - reference).max() <= 1e-4 * np.abs(reference).max()

    save_package(load_package(path) | {"signature": "changed"}, path)  # the model file changes: stale export
    with pytest.raises(DemixError, match="exported from another version of tiny.th"):
        Separator(tmp_path, "tiny", backend="onnxruntime")


class _Eigen(nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x[..., :2, :2]).real


class _Unexportable(SeparationModel):
    def __init__(self):
        super().__init__(["a"], RATE, 2)
        self.front = nn.Linear(4, 4)
        self.eigen = _Eigen()

    def forward(self, mixture):
        return self.eigen(self.front(mixture.unflatten(-1, (-1, 4)))).flatten(-2)[:, None]


def test_a_layer_that_onnx_cannot_express_is_named_in_one_line(tmp_path):
    with pytest.raises(DemixError) as error:
        trace_to_onnx(_Unexportable(), torch.randn(1, 2, 16), tmp_path / "x.onnx")
    message = str(error.value)
    assert "layer eigen (_Eigen)" in message and "\n" not in message
