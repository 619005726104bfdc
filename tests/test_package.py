"""Model files (demixlab.package) and `python -m tools.export` on checkpoints written like the solver's."""
import hashlib
from pathlib import Path

import pytest
import torch

from demixlab.errors import EXIT_USER_ERROR, DemixError
from demixlab.models import get_family
from demixlab.release.model_file import FORMAT, load_package, model_from_package, package_model, save_package
from tools.export import export, main as export_main

SOURCES = ["drums", "bass", "other", "vocals"]
TINY_UMX = dict(n_fft=512, hop_length=128, hidden_size=8, nb_layers=1, bandwidth=8000.0, wiener_iterations=1)
FIELDS = {"format", "family", "kwargs", "state", "sources", "samplerate", "audio_channels", "segment", "config",
          "signature", "metrics", "origin", "demixlab_version", "git_commit"}


def _tiny_umx(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = get_family("umx").build_model(SOURCES, 44100, 2, TINY_UMX)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def test_model_file_round_trip_loads_safely_and_rebuilds_the_same_model(tmp_path):
    model = _tiny_umx()
    package = package_model("umx", TINY_UMX, model.state_dict(), sources=SOURCES, samplerate=44100, audio_channels=2,
                            config={"epochs": 2}, signature="0123abcd", metrics={"valid": {"nsdr": 1.5}},
                            origin={"kind": "xp"}, segment=6.0)
    save_package(package, tmp_path / "m.th")
    raw = torch.load(tmp_path / "m.th", weights_only=True)
    assert set(raw) == FIELDS and raw["format"] == FORMAT and raw["family"] == "umx"
    assert raw["segment"] == 6.0 and raw["metrics"] == {"valid": {"nsdr": 1.5}}
    mixture = torch.randn(1, 2, 4000)
    rebuilt = model_from_package(load_package(tmp_path / "m.th"))
    assert not rebuilt.training
    torch.testing.assert_close(rebuilt(mixture), model(mixture))


def test_half_stores_float16_and_loads_float32(tmp_path):
    model = _tiny_umx()
    full = package_model("umx", TINY_UMX, model.state_dict(), sources=SOURCES, samplerate=44100, audio_channels=2)
    half = package_model("umx", TINY_UMX, model.state_dict(), sources=SOURCES, samplerate=44100, audio_channels=2,
                         half=True)
    save_package(full, tmp_path / "full.th")
    save_package(half, tmp_path / "half.th")
    assert all(value.dtype == torch.float16 for value in half["state"].values() if value.is_floating_point())
    assert any(value.dtype == torch.int64 for value in half["state"].values())  # BatchNorm counters stay integers
    assert (tmp_path / "half.th").stat().st_size < (tmp_path / "full.th").stat().st_size
    weight_bytes = [sum(value.nbytes for value in package["state"].values()) for package in (half, full)]
    assert weight_bytes[0] < 0.51 * weight_bytes[1]
    rebuilt = model_from_package(load_package(tmp_path / "half.th"))
    assert all(parameter.dtype == torch.float32 for parameter in rebuilt.parameters())
    mixture = torch.randn(1, 2, 4000)
    torch.testing.assert_close(rebuilt(mixture), model(mixture), rtol=2e-2, atol=2e-2)


def test_overrides_change_inference_options_and_unknown_ones_are_user_errors():
    model = _tiny_umx()
    package = package_model("umx", TINY_UMX, model.state_dict(), sources=SOURCES, samplerate=44100, audio_channels=2)
    mixture = torch.randn(1, 2, 4000)
    default = model_from_package(package)(mixture)
    no_wiener = model_from_package(package, {"wiener_iterations": 0, "softmask": True})(mixture)
    assert (default - no_wiener).abs().max() > 1e-4
    assert package["kwargs"]["wiener_iterations"] == 1  # the package itself is unchanged
    with pytest.raises(DemixError, match="model.niter is not an option of the 'umx' family"):
        model_from_package(package, {"niter": 2})


def test_bad_model_files_are_user_errors(tmp_path):
    model = _tiny_umx()
    with pytest.raises(DemixError, match="no such file"):
        load_package(tmp_path / "missing.th")
    (tmp_path / "garbage.th").write_bytes(b"not a torch file at all")
    with pytest.raises(DemixError, match="garbage.th: not a valid demixlab torch file"):
        load_package(tmp_path / "garbage.th")
    torch.save(model, tmp_path / "pickled.th")  # a pickled module, like demucs' own model files
    with pytest.raises(DemixError, match="pickled.th: not a valid demixlab torch file"):
        load_package(tmp_path / "pickled.th")
    torch.save({"model_options": {}, "model": model.state_dict()}, tmp_path / "checkpoint.th")
    with pytest.raises(DemixError, match="training checkpoint: export it"):
        load_package(tmp_path / "checkpoint.th")
    package = package_model("umx", TINY_UMX, model.state_dict(), sources=SOURCES, samplerate=44100, audio_channels=2)
    torch.save({**package, "format": "demixlab-model/3"}, tmp_path / "newer.th")
    with pytest.raises(DemixError, match="newer than this demixlab"):
        load_package(tmp_path / "newer.th")
    wrong = {**package, "kwargs": {**TINY_UMX, "hidden_size": 16}}
    with pytest.raises(DemixError, match="weights do not fit the 'umx' model"):
        model_from_package(wrong)
    with pytest.raises(DemixError, match="unknown model family 'nope'"):
        model_from_package({**package, "family": "nope"})


# --------------------------------------------------------------------------- tools.export
def _fake_xp(workdir: Path, signature: str, *, done: bool, best: bool) -> torch.nn.Module:
    """An XP folder holding a checkpoint with the solver's keys (no training needed)."""
    model = _tiny_umx(seed=1)
    current = {key: torch.zeros_like(value) for key, value in model.state_dict().items()}
    folder = workdir / "outputs" / "xps" / signature
    folder.mkdir(parents=True)
    torch.save({"family": "umx", "model_options": TINY_UMX, "sources": SOURCES, "samplerate": 44100,
                "audio_channels": 2, "config": {"segment": 1.0, "model": {"family": "umx", **TINY_UMX}},
                "model": current, "best_state": model.state_dict() if best else None,
                "history": [{"epoch": 1, "valid": {"nsdr": 0.5}}], "done": done, "signature": signature},
               folder / "checkpoint.th")
    return model


def test_export_writes_the_best_state_and_reports_errors_in_one_line(tmp_path, capsys, caplog):
    best = _fake_xp(tmp_path, "0123abcd", done=True, best=True)
    _fake_xp(tmp_path, "00000042", done=False, best=False)
    (tmp_path / "outputs" / "xps" / "fedcba98").mkdir()
    common = ["--dora-dir", str(tmp_path / "outputs"), "-o", str(tmp_path / "models")]

    export_main(["0123abcd", "00000042", *common])
    assert "00000042 has not finished training" in caplog.text
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["00000042.th", "0123abcd.th"]
    package = torch.load(tmp_path / "models" / "0123abcd.th", weights_only=True)
    assert package["origin"]["kind"] == "xp" and package["signature"] == "0123abcd"
    assert package["metrics"] == {"epoch": 1, "valid": {"nsdr": 0.5}} and package["segment"] is None
    assert package["config"]["model"]["hidden_size"] == 8
    for key, value in best.state_dict().items():
        torch.testing.assert_close(package["state"][key], value)
    fallback = torch.load(tmp_path / "models" / "00000042.th", weights_only=True)
    assert all(not value.any() for value in fallback["state"].values())  # no best state: the current weights

    for args, message in [(["deadbeef"], "unknown experiment deadbeef"),
                          (["fedcba98"], "experiment fedcba98 has no checkpoint yet"),
                          (["xyz"], "is not an experiment signature")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            export_main([*args, *common])
        assert exit_info.value.code == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_exported_segment_is_the_model_segment_attribute(tmp_path):
    options = dict(channels=8, nfft=256, depth=4, segment=1.5)
    model = get_family("hdemucs").build_model(SOURCES, 44100, 2, options)
    folder = tmp_path / "outputs" / "xps" / "0000beef"
    folder.mkdir(parents=True)
    torch.save({"family": "hdemucs", "model_options": options, "sources": SOURCES, "samplerate": 44100,
                "audio_channels": 2, "config": None, "model": model.state_dict(), "best_state": None,
                "history": [], "done": True}, folder / "checkpoint.th")
    path = export("0000beef", tmp_path / "models", sign=True, dora_dir=tmp_path / "outputs")
    assert path.name.startswith("0000beef-") and load_package(path)["segment"] == 1.5
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    assert path.stem == f"0000beef-{digest}"
