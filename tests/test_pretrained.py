"""Evaluating a model file of a repository on a test set (tools.test_pretrained)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from demixlab.errors import EXIT_USER_ERROR, DemixError
from demixlab.evaluation.loop import scored_sources
from demixlab.models import get_family
from demixlab.release.model_file import model_from_package, package_model, save_package
from tests.cli import TINY
from tools.test_pretrained import main as evaluate_cli

RATE = 44100
TINY_UMX = dict(n_fft=512, hop_length=128, hidden_size=8, nb_layers=1, bandwidth=8000.0, wiener_iterations=0)
# The tests' tiny toy dataset, with a shorter test track: museval is slow.
TOY = [override for override in TINY if override.startswith("dset.") and "eval_duration" not in override]
TOY.append("dset.toy.eval_duration=1.5")


def _save_random_umx(path: Path, sources, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = get_family("umx").build_model(sources, RATE, 2, TINY_UMX)
    with torch.no_grad():
        for parameter in model.parameters():  # UMX starts as identity masks: make it do something
            parameter.add_(0.1 * torch.randn_like(parameter))
    package = package_model("umx", TINY_UMX, model.state_dict(), sources=sources, samplerate=RATE,
                            audio_channels=2, origin={"kind": "test"})
    save_package(package, path)
    return package


@pytest.fixture
def repo(tmp_path) -> Path:
    folder = tmp_path / "repo"
    _save_random_umx(folder / "tiny.th", ["drums", "bass", "other", "vocals"])
    return folder


def _read(path: Path) -> torch.Tensor:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == RATE
    return torch.from_numpy(data.T.copy())


def test_evaluates_prints_table_and_writes_json_and_png(repo, tmp_path, cache_dir, capsys):
    out = tmp_path / "eval"
    evaluate_cli(["--repo", str(repo), "-n", "tiny", "-o", str(out), "--device", "cpu",
                     *TOY, f"misc.cache_dir={cache_dir}", "misc.progress=false"])
    stdout = capsys.readouterr().out
    assert "SDR museval" in stdout and "SDR global" in stdout
    for row in ("drums", "bass", "other", "vocals", "mean"):
        assert any(line.startswith(row) for line in stdout.splitlines())

    report = json.loads((out / "results.json").read_text())
    assert report["model"] == "tiny" and report["sources"] == ["drums", "bass", "other", "vocals"]
    assert len(report["tracks"]) == 1
    track = report["tracks"][0]
    assert set(track) >= {"track", "nsdr", "sdr", "sir", "isr", "sar"}
    assert (out / "sdr_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The global SDR is the MDX definition on the model's own separation of the test track.
    folder = Path(report["test_root"]) / "test" / track["track"]
    references = torch.stack([_read(folder / f"{source}.wav") for source in report["sources"]])
    mixture = _read(folder / "mixture.wav") if (folder / "mixture.wav").exists() else references.sum(0)
    model = model_from_package(torch.load(repo / "tiny.th", weights_only=True))
    with torch.no_grad():
        estimate = model(mixture[None])[0].double()
    for index, source in enumerate(report["sources"]):
        reference = references[index].double()
        expected = 10 * math.log10((float(reference.pow(2).sum()) + 1e-7)
                                   / (float((reference - estimate[index]).pow(2).sum()) + 1e-7))
        assert track["nsdr"][source] == pytest.approx(expected, abs=1e-3)
        assert report["summary"][f"nsdr_{source}"] == pytest.approx(track["nsdr"][source])
        assert report["summary"][f"sdr_{source}"] == pytest.approx(track["sdr"][source])
    assert report["summary"]["nsdr"] == pytest.approx(np.mean([track["nsdr"][s] for s in report["sources"]]))


@pytest.mark.parametrize("override, message", [
    ("tset.shifts=1", "unknown option tset.shifts"),
    ("dset=nope", "unknown dset 'nope'"),
    ("test.sdr_backend=fast", "test.sdr_backend must be one of torch, museval, check"),
])
def test_bad_override_is_a_one_line_error(repo, tmp_path, cache_dir, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli(["--repo", str(repo), "-n", "tiny", "-o", str(tmp_path / "eval"), override, *TOY,
                      f"misc.cache_dir={cache_dir}", "misc.progress=false"])
    assert exit_info.value.code == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("demixlab: error:") and message in error[-1]
    assert not (tmp_path / "eval").exists()


def _stems_folder(root: Path, sources, seed: int = 0) -> None:
    """A dataset with only a test/ split: two short tracks, no mixture files."""
    rng = np.random.default_rng(seed)
    for track in ("first", "second"):
        folder = root / "test" / track
        folder.mkdir(parents=True)
        for source in sources:
            sf.write(str(folder / f"{source}.wav"), 0.1 * rng.standard_normal((RATE // 2, 2)), RATE, subtype="FLOAT")


def test_folder_dataset_and_source_subsets(tmp_path, cache_dir, capsys):
    repo = tmp_path / "repo"
    _save_random_umx(repo / "duo.th", ["vocals", "drums"])
    data = tmp_path / "stems"
    _stems_folder(data, ["vocals", "piano"])
    common = ["--repo", str(repo), "-n", "duo", "-o", str(tmp_path / "eval"), "dset=folder", f"dset.root={data}",
              "dset.sources=[vocals,piano]", f"misc.cache_dir={cache_dir}", "test.sdr=false", "misc.progress=false"]
    with pytest.raises(SystemExit):
        evaluate_cli(common)
    error = capsys.readouterr().err
    assert "piano missing" in error and "--sources vocals" in error

    evaluate_cli(common + ["--sources", "vocals"])
    stdout = capsys.readouterr().out
    assert "SDR global" in stdout and "SDR museval" not in stdout
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["sources"] == ["vocals"] and [t["track"] for t in report["tracks"]] == ["first", "second"]
    assert set(report["tracks"][0]["nsdr"]) == {"vocals"}
    assert (tmp_path / "eval" / "sdr_boxplot.png").is_file()


def test_scored_sources_rules():
    assert scored_sources(["a", "b", "c"], ["b", "a"]) == ["b", "a"]  # extra model sources are ignored
    assert scored_sources(["a", "b"], ["a", "b", "c"], ["b"]) == ["b"]
    with pytest.raises(DemixError, match="c missing"):
        scored_sources(["a", "b"], ["a", "b", "c"])
    with pytest.raises(DemixError, match="no source in common"):
        scored_sources(["x"], ["a"])
    with pytest.raises(DemixError, match="does not separate 'c'"):
        scored_sources(["a"], ["a", "c"], ["c"])
