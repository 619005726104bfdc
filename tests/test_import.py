"""Importing Open-Unmix and demucs weights (tools.import_model), checked against the references.

Random-initialised reference models are saved in their own formats (Open-Unmix: one state dict
per target plus the JSON files its training script writes, read back by openunmix's own
`load_separator`; demucs: `serialize_model` + `torch.save`), imported, separated with
`demixlab separate` and compared with the reference's separation (openunmix `Separator`,
demucs `apply_model`).
"""
import json
import os
import pickle
import typing as tp
from fractions import Fraction
from pathlib import Path

import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from torch import nn

from demixlab.errors import EXIT_USER_ERROR, DemixError
from demixlab.models.demucs.importer import import_demucs, read_demucs_package
from demixlab.models.openunmix.importer import import_openunmix, openunmix_target_name
from demixlab.release.model_file import load_package, model_from_package
from demixlab.commands.separate import main as separate_main
from tests.references import import_reference
from tools.import_model import main as import_main

openunmix_utils = import_reference("openunmix.utils")
openunmix_model = import_reference("openunmix.model")
demucs_apply = import_reference("demucs.apply")
demucs_states = import_reference("demucs.states")
demucs_hdemucs = import_reference("demucs.hdemucs")
demucs_htdemucs = import_reference("demucs.htdemucs")

RATE = 44100
SOURCES = ["drums", "bass", "other", "vocals"]
UMX_NFFT, UMX_HOP, UMX_HIDDEN = 1024, 256, 16
RELATIVE_TOLERANCE = 1e-3


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    assert float(expected.abs().max()) > 1e-3  # not trivially silent
    return float((got - expected).abs().max() / expected.abs().max())


def _randomise_umx(target: nn.Module, seed: int) -> nn.Module:
    """Non-trivial normalisation and batch-norm statistics (the reference initialises identities)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(target.named_parameters()) + list(target.named_buffers()):
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator)
                if name.endswith("running_var") or name in ("input_scale", "output_scale"):
                    tensor.copy_(0.5 + noise)
                elif name in ("output_mean",):
                    tensor.copy_(0.5 + noise)
                else:
                    tensor.add_(0.2 * (noise - 0.5))
    return target


def _randomise_demucs(model: nn.Module, seed: int) -> nn.Module:
    """Move every weight away from its initial value; LayerScales get values of order one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith(".scale"):
                parameter.copy_(0.2 + 0.3 * noise.abs())
            else:
                parameter.add_(0.05 * noise)
    return model


def _write_track(path: Path, samples: int, seed: int) -> torch.Tensor:
    """A float32 stereo WAV; returns exactly what a reader gets back."""
    wav = 0.3 * torch.randn(2, samples, generator=torch.Generator().manual_seed(seed))
    sf.write(str(path), wav.T.numpy(), RATE, subtype="FLOAT")
    data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy())


def _separate_cli(repo: Path, name: str, track: Path, out: Path, *extra: str) -> torch.Tensor:
    """`demixlab separate` (in process) to float32 WAVs; returns the stems (S, C, T) in SOURCES order."""
    separate_main(["--repo", str(repo), "-n", name, "-o", str(out), "--float32", "--clip-mode", "none",
                   "--no-progress", *extra, str(track)])
    stems = []
    for source in SOURCES:
        data, rate = sf.read(str(out / track.stem / f"{source}.wav"), dtype="float32", always_2d=True)
        assert rate == RATE
        stems.append(torch.from_numpy(data.T.copy()))
    return torch.stack(stems)


# ------------------------------------------------------------------------------------ openunmix
@pytest.fixture(scope="module")
def umx_folder(tmp_path_factory) -> Path:
    """Four random Open-Unmix targets saved as Open-Unmix's training script saves them."""
    folder = tmp_path_factory.mktemp("umx")
    max_bin = int(openunmix_utils.bandwidth_to_max_bin(RATE, UMX_NFFT, 16000))
    torch.manual_seed(0)
    for seed, target in enumerate(SOURCES):
        model = _randomise_umx(openunmix_model.OpenUnmix(nb_bins=UMX_NFFT // 2 + 1, nb_channels=2,
                                                         hidden_size=UMX_HIDDEN, max_bin=max_bin), seed)
        torch.save(model.state_dict(), folder / f"{target}.pth")
        args = {"target": target, "nfft": UMX_NFFT, "nhop": UMX_HOP, "hidden_size": UMX_HIDDEN,
                "bandwidth": 16000, "nb_channels": 2, "unidirectional": False, "seq_dur": 6.0}
        (folder / f"{target}.json").write_text(json.dumps({"epochs_trained": 3, "args": args, "best_loss": 1.0,
                                                           "commit": "abcdef0"}, indent=4, sort_keys=True))
    (folder / "separator.json").write_text(json.dumps({"nfft": UMX_NFFT, "nhop": UMX_HOP, "sample_rate": RATE,
                                                       "nb_channels": 2}, indent=4, sort_keys=True))
    return folder


@pytest.fixture(scope="module")
def umx_reference(umx_folder) -> nn.Module:
    """The reference separator, loaded from the files by openunmix itself (proves their format)."""
    return openunmix_utils.load_separator(str(umx_folder), targets=SOURCES, niter=1, pretrained=True).eval()


def test_openunmix_import_reads_shapes_and_metadata(umx_folder):
    imported = import_openunmix([umx_folder])
    assert imported.family == "umx" and imported.sources == SOURCES and imported.samplerate == RATE
    assert imported.kwargs["n_fft"] == UMX_NFFT and imported.kwargs["hop_length"] == UMX_HOP
    assert imported.kwargs["hidden_size"] == UMX_HIDDEN and imported.kwargs["nb_layers"] == 3
    model = model_from_package({"format": "demixlab-model/1", "family": "umx", "kwargs": imported.kwargs,
                                "state": imported.state, "sources": imported.sources, "samplerate": RATE,
                                "audio_channels": 2})
    assert model.max_bin == int(openunmix_utils.bandwidth_to_max_bin(RATE, UMX_NFFT, 16000))


def test_openunmix_cli_import_and_separate_match_reference(umx_folder, umx_reference, tmp_path, capsys):
    repo = tmp_path / "repo"
    # Files in the reverse order: sources follow the command line.
    import_main(["openunmix", *[str(umx_folder / f"{s}.pth") for s in reversed(SOURCES)], "-o", str(repo),
                 "-n", "umx_imported"])
    assert "umx_imported.th" in capsys.readouterr().out
    package = load_package(repo / "umx_imported.th")
    assert package["sources"] == SOURCES[::-1]
    assert package["origin"]["kind"] == "import" and package["origin"]["format"] == "openunmix"
    import_main(["openunmix", str(umx_folder), "-o", str(repo), "-n", "umx"])  # a folder: MUSDB order

    track = tmp_path / "song.wav"
    mixture = _write_track(track, int(2.3 * RATE), seed=1)
    with torch.no_grad():
        expected = umx_reference(mixture[None])[0]
    no_split = _separate_cli(repo, "umx", track, tmp_path / "no_split", "--no-split")
    assert _relative_error(no_split, expected) < RELATIVE_TOLERANCE
    # Default splitting (the model file has no segment: 30 s chunks) on a shorter track: same result.
    split = _separate_cli(repo, "umx", track, tmp_path / "split")
    assert _relative_error(split, expected) < RELATIVE_TOLERANCE


def test_openunmix_hub_names_and_old_checkpoint_keys(umx_folder, tmp_path):
    """Torch-hub style `TARGET-<sha>.pth` files without JSON, with the keys old checkpoints carry."""
    folder = tmp_path / "hub"
    folder.mkdir()
    for target in ("vocals", "bass"):
        state = torch.load(umx_folder / f"{target}.pth", weights_only=True)
        state["stft.window"] = torch.hann_window(UMX_NFFT)
        state["sample_rate"] = torch.tensor(RATE)
        torch.save(state, folder / f"{target}-0123abcd.pth")
    assert openunmix_target_name(folder / "vocals-0123abcd.pth") == "vocals"
    imported = import_openunmix([folder])
    assert imported.sources == ["bass", "vocals"]  # MUSDB order
    assert imported.kwargs["hop_length"] == UMX_NFFT // 4 and imported.samplerate == RATE  # defaults
    assert not any("window" in key or "sample_rate" in key for key in imported.state)


@pytest.mark.parametrize("edit, message", [
    (lambda f: (f / "separator.json").write_text(json.dumps({"nfft": 2048})), "nfft=2048 disagrees"),
    (lambda f: (f / "bass.pth").write_bytes(b"not a torch file"), "bass.pth"),
    (lambda f: torch.save({"fc1.weight": torch.zeros(2, 2)}, f / "bass.pth"), "not an Open-Unmix target"),
])
def test_openunmix_bad_files_are_one_line_errors(umx_folder, tmp_path, edit, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("bass.pth", "vocals.pth", "separator.json"):
        (folder / name).write_bytes((umx_folder / name).read_bytes())
    edit(folder)
    with pytest.raises(DemixError, match=message):
        import_openunmix([folder])


def test_openunmix_targets_must_share_the_architecture(umx_folder, tmp_path):
    small = openunmix_model.OpenUnmix(nb_bins=UMX_NFFT // 2 + 1, nb_channels=2, hidden_size=8, max_bin=372)
    torch.save(small.state_dict(), tmp_path / "piano.pth")
    with pytest.raises(DemixError, match="hidden_size=8 differs"):
        import_openunmix([umx_folder / "vocals.pth", tmp_path / "piano.pth"])


# ---------------------------------------------------------------------------------------- demucs
SMALL_HDEMUCS = dict(channels=8, nfft=256, depth=4)
SMALL_HTDEMUCS = dict(channels=8, nfft=1024, depth=3, t_layers=1, segment=Fraction(2, 5))


def _demucs_package(model: nn.Module, path: Path) -> nn.Module:
    """Save as demucs does (float16 state) and give the reference the weights that were saved."""
    package = demucs_states.serialize_model(model, OmegaConf.create({"dset": {"segment": 11}}), half=True)
    torch.save(package, path)
    model.load_state_dict({key: value.float() for key, value in package["state"].items()})
    return model.eval()


@pytest.fixture(scope="module")
def demucs_files(tmp_path_factory) -> tp.Dict[str, tp.Tuple[Path, nn.Module]]:
    folder = tmp_path_factory.mktemp("demucs")
    torch.manual_seed(0)
    hdemucs = _randomise_demucs(demucs_hdemucs.HDemucs(SOURCES, **SMALL_HDEMUCS), seed=1)
    htdemucs = _randomise_demucs(demucs_htdemucs.HTDemucs(SOURCES, **SMALL_HTDEMUCS), seed=2)
    return {"hdemucs": (folder / "hd-0011aabb.th", _demucs_package(hdemucs, folder / "hd-0011aabb.th")),
            "htdemucs": (folder / "ht.th", _demucs_package(htdemucs, folder / "ht.th"))}


def test_demucs_package_reads_without_demucs_classes(demucs_files):
    package = read_demucs_package(demucs_files["htdemucs"][0])
    assert package["klass"] == "demucs.htdemucs.HTDemucs" and isinstance(package["klass"], str)
    assert package["kwargs"]["segment"] == Fraction(2, 5)
    imported = import_demucs(demucs_files["htdemucs"][0])
    assert imported.family == "htdemucs" and imported.sources == SOURCES
    assert imported.segment == pytest.approx(0.4) and int(imported.kwargs["segment"] * RATE) == int(0.4 * RATE)
    assert imported.kwargs["t_layers"] == 1 and "sources" not in imported.kwargs


def test_hdemucs_import_matches_apply_model(demucs_files, tmp_path):
    path, reference = demucs_files["hdemucs"]
    repo = tmp_path / "repo"
    import_main(["demucs", str(path), "-o", str(repo), "-n", "hd"])
    assert load_package(repo / "hd.th")["family"] == "hdemucs"
    samples = 16384
    track = tmp_path / "song.wav"
    mixture = _write_track(track, samples, seed=2)
    expected = demucs_apply.apply_model(reference, mixture[None], shifts=0, split=False)[0]
    got = _separate_cli(repo, "hd", track, tmp_path / "no_split", "--no-split")
    assert _relative_error(got, expected) < RELATIVE_TOLERANCE

    # Splitting (overlap 0.25) with chunks of a valid length: identical wherever full chunks are
    # blended. HDemucs has no `valid_length`: demucs runs the last, shorter chunks as they are, while
    # demixlab pads them to the segment with their real neighbours, so the tail differs slightly.
    track = tmp_path / "long.wav"
    mixture = _write_track(track, 3 * samples + 5000, seed=3)
    segment = (samples + 0.25) / RATE
    expected = demucs_apply.apply_model(reference, mixture[None], shifts=0, split=True, overlap=0.25,
                                        segment=segment)[0]
    got = _separate_cli(repo, "hd", track, tmp_path / "split", "--segment", repr(segment))
    stride = int(0.75 * samples)
    first_partial = next(offset for offset in range(0, mixture.shape[-1], stride)
                         if offset + samples > mixture.shape[-1])
    assert first_partial > 2 * samples
    assert _relative_error(got[..., :first_partial], expected[..., :first_partial]) < RELATIVE_TOLERANCE


def test_htdemucs_import_matches_apply_model(demucs_files, tmp_path):
    path, reference = demucs_files["htdemucs"]
    repo = tmp_path / "repo"
    import_main(["demucs", str(path), "-o", str(repo), "-n", "ht"])
    segment_samples = int(0.4 * RATE)
    track = tmp_path / "song.wav"
    mixture = _write_track(track, segment_samples, seed=4)
    expected = demucs_apply.apply_model(reference, mixture[None], shifts=0, split=False)[0]
    got = _separate_cli(repo, "ht", track, tmp_path / "no_split", "--no-split")
    assert _relative_error(got, expected) < RELATIVE_TOLERANCE

    # Splitting with the model's own segment (the file's), as `demixlab separate` does by default.
    track = tmp_path / "long.wav"
    mixture = _write_track(track, int(1.3 * RATE), seed=5)
    expected = demucs_apply.apply_model(reference, mixture[None], shifts=0, split=True, overlap=0.25)[0]
    got = _separate_cli(repo, "ht", track, tmp_path / "split")
    # HTDemucs asks for its training length (valid_length): the shorter last chunks are padded with
    # their neighbours exactly as demucs does, so the whole track matches.
    assert _relative_error(got, expected) < RELATIVE_TOLERANCE


class _RunsCommand:
    """Pickles as a call to os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("writer", ["torch_zip", "plain_pickle"])
def test_malicious_demucs_file_is_refused_and_nothing_runs(tmp_path, writer, capsys):
    marker = tmp_path / "executed"
    content = {"klass": _RunsCommand(f"touch {marker}"), "args": [], "kwargs": {}, "state": {}}
    path = tmp_path / "evil.th"
    if writer == "torch_zip":
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(DemixError, match=r"refusing to load: the file needs the global (posix|os|nt)\.system"):
        import_demucs(path)
    with pytest.raises(SystemExit) as exit_info:
        import_main(["demucs", str(path), "-o", str(tmp_path / "repo"), "-n", "evil"])
    assert exit_info.value.code == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip()
    assert error.startswith("demixlab: error:") and "system" in error and len(error.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "repo" / "evil.th").exists()


class _OtherModel(nn.Module):
    pass


def test_unknown_model_class_and_quantized_states_are_refused(tmp_path, demucs_files):
    path = tmp_path / "other.th"
    torch.save({"klass": _OtherModel, "args": [], "kwargs": {}, "state": {}}, path)
    with pytest.raises(DemixError, match="_OtherModel"):
        import_demucs(path)
    package = torch.load(demucs_files["hdemucs"][0], weights_only=False)  # our own file, trusted here
    package["state"] = {"__quantized": True}
    torch.save(package, path)
    with pytest.raises(DemixError, match="DiffQ"):
        import_demucs(path)


def test_import_refuses_to_overwrite(demucs_files, tmp_path, capsys):
    path = demucs_files["hdemucs"][0]
    import_main(["demucs", str(path), "-o", str(tmp_path), "-n", "hd"])
    with pytest.raises(SystemExit):
        import_main(["demucs", str(path), "-o", str(tmp_path), "-n", "hd"])
    assert "already exists" in capsys.readouterr().err
    import_main(["demucs", str(path), "-o", str(tmp_path), "-n", "hd", "--force", "--half"])
    assert load_package(tmp_path / "hd.th")["state"]["freq_emb.embedding.weight"].dtype == torch.float16


# ------------------------------------------------------------------------------------ xumx_slicq
XUMX_ORDER = ["bass", "vocals", "other", "drums"]  # the reference's target order


@pytest.fixture(scope="module")
def xumx_slicq_folder(tmp_path_factory) -> tp.Tuple[Path, nn.Module, tp.Any]:
    """A random xumx-sliCQ-V2 `Unmix` (published sliCQT: Bark, 262 bins) saved as its trainer does:
    the state dict and a JSON file of `args`. Returns the folder, the model and its filterbanks."""
    transforms = import_reference("xumx_slicq_v2.transforms")
    reference_model = import_reference("xumx_slicq_v2.model")
    base = transforms.NSGTBase("bark", 262, 32.9, fs=float(RATE), device="cpu")
    forward, backward = transforms.make_filterbanks(base)
    blocks = forward(torch.zeros(1, 2, 22050))
    torch.manual_seed(0)
    reference = reference_model.Unmix(transforms.ComplexNorm()(blocks)).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, value in reference.state_dict().items():
            if value.dtype.is_floating_point:
                noise = torch.rand(value.shape, generator=generator)
                value.copy_(noise + 0.5 if key.endswith(("running_var", "input_scale")) else 0.2 * (noise - 0.5))
    folder = tmp_path_factory.mktemp("xumx")
    torch.save(reference.state_dict(), folder / "xumx_slicq_v2.pth")
    args = {"fscale": "bark", "fbins": 262, "fmin": 32.9, "sample_rate": RATE, "realtime": False,
            "nb_channels": 2, "seq_dur": 2.0, "fgamma": 0.0}
    (folder / "xumx_slicq_v2.json").write_text(json.dumps({"args": args}))
    return folder, reference, (forward, backward)


def test_xumx_slicq_import_maps_targets_and_options(xumx_slicq_folder, tmp_path):
    folder, reference, _ = xumx_slicq_folder
    repo = tmp_path / "repo"
    import_main(["xumx_slicq", str(folder), "-o", str(repo), "-n", "slicq"])
    package = load_package(repo / "slicq.th")
    assert package["family"] == "slicq_cdae" and package["sources"] == SOURCES
    assert package["kwargs"] == {"scale": "bark", "fbins": 262, "fmin": 32.9, "fmax": RATE / 2, "hidden_1": 50,
                                 "hidden_2": 51, "realtime": False, "wiener_iterations": 1}
    theirs = reference.state_dict()
    for block in (0, 37, 69):
        assert torch.equal(package["state"][f"network.blocks.{block}.input_scale"],
                           theirs[f"sliced_umx.{block}.input_scale"])
        grouped = package["state"][f"network.blocks.{block}.decode1.weight"]  # source s owns group s
        width = grouped.shape[0] // len(SOURCES)
        for index, source in enumerate(SOURCES):  # demixlab's order <- the reference's
            ours = grouped[index * width:(index + 1) * width]
            assert torch.equal(ours, theirs[f"sliced_umx.{block}.cdaes.{XUMX_ORDER.index(source)}.9.weight"])
    with pytest.raises(DemixError, match="not an xumx-sliCQ-V2 state dict"):
        import_main.__wrapped__(["xumx_slicq", str(repo / "slicq.th"), "-o", str(repo), "-n", "again"])


@pytest.mark.skipif(not os.environ.get("DEMIXLAB_SLOW_TESTS"),
                    reason="full-size sliCQ separation: minutes on 2 loaded cores (set DEMIXLAB_SLOW_TESTS=1)")
def test_xumx_slicq_import_separates_as_the_reference(xumx_slicq_folder, tmp_path):
    folder, reference, (forward, backward) = xumx_slicq_folder
    mixture = 0.3 * torch.randn(1, 2, 22050, generator=torch.Generator().manual_seed(6))  # 4 slices: the fewest
    with torch.no_grad():
        blocks = forward(mixture)
        expected = backward([block.clone() for block in reference([block.clone() for block in blocks])],
                            mixture.shape[-1])  # (targets in the reference's order, B, C, T)
    expected = torch.stack([expected[XUMX_ORDER.index(source), 0] for source in SOURCES])
    import_main(["xumx_slicq", str(folder / "xumx_slicq_v2.pth"), "-o", str(tmp_path), "-n", "slicq"])
    with torch.no_grad():
        got = model_from_package(load_package(tmp_path / "slicq.th"))(mixture)[0]
    assert _relative_error(got, expected) < RELATIVE_TOLERANCE
