"""`demixlab blend`: per-source bag weights fitted on the toy validation split. The bag it writes
loads like any bag, separates the validation track exactly as fitted, and never scores below its
best member; sources a model lacks weigh 0; mistakes are one-line errors."""
import math
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from demixlab.commands.blend import main as blend
from demixlab.data import as_dataset_config, build_valid_split
from demixlab.data.config import DatasetConfig
from demixlab.errors import EXIT_USER_ERROR
from demixlab.evaluation.blend import BlendStatistics, simplex_grid
from demixlab.evaluation.metrics import global_sdr
from demixlab.models import get_family
from demixlab.release.model_file import package_model, save_package
from demixlab.release.repository import Repository
from demixlab.separation import bag_separator
from demixlab.train import main
from tests.cli import TINY

RATE = 44100
SOURCES = ["drums", "bass", "other", "vocals"]
TINY_UMX = dict(n_fft=512, hop_length=128, hidden_size=8, nb_layers=1, bandwidth=8000.0, wiener_iterations=0)
TINY_HDEMUCS = dict(channels=8, nfft=256, depth=4, segment=1.0)
TOY = [override for override in TINY if override.startswith("dset.")]


def _save_random(path: Path, family: str, options: dict, sources: tp.List[str], seed: int, noise: float) -> None:
    """A model file of random weights (perturbed by `noise`: UMX starts as identity masks)."""
    torch.manual_seed(seed)
    model = get_family(family).build_model(sources, RATE, 2, options)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(noise * torch.randn_like(parameter))
    save_package(package_model(family, options, model.state_dict(), sources=sources, samplerate=RATE,
                               audio_channels=2, origin={"kind": "test"}), path)


@pytest.fixture
def repo(tmp_path) -> Path:
    folder = tmp_path / "repo"
    _save_random(folder / "umx_a.th", "umx", TINY_UMX, SOURCES, seed=1, noise=0.05)
    _save_random(folder / "hd_b.th", "hdemucs", TINY_HDEMUCS, SOURCES, seed=2, noise=0.0)
    _save_random(folder / "voc.th", "umx", TINY_UMX, ["vocals", "piano"], seed=3, noise=0.05)
    return folder


def _blend(repo: Path, cache_dir: Path, *args: str) -> None:
    """`demixlab blend REPO ARGS` (ARGS: models and overrides, then options), on the tiny toy
    dataset unless ARGS choose another."""
    first_option = next((index for index, arg in enumerate(args) if arg.startswith("-")), len(args))
    toy = [] if any(arg.startswith("dset=") for arg in args) else TOY
    blend([str(repo), *args[:first_option], *toy, f"misc.cache_dir={cache_dir}", "misc.progress=false",
           *args[first_option:], "--device", "cpu"])


def _table(stdout: str, names: tp.Sequence[str], bag: str) -> tp.Dict[str, tp.Dict[str, float]]:
    """The SDR rows of the printed table: {row label: {source: value}} ('-' cells left out)."""
    lines = stdout.splitlines()
    start = lines.index("validation global SDR (dB, mean over tracks)")
    header = lines[start + 1].split()
    rows = {}
    for line in lines[start + 2: start + 3 + len(names)]:
        label = next(name for name in [*names, f"bag {bag}"] if line.startswith(name))
        cells = line[len(label):].split()
        rows[label] = {source: float(cell) for source, cell in zip(header, cells) if cell != "-"}
    return rows


@pytest.mark.slow
def test_blend_writes_a_bag_that_scores_as_printed_and_never_below_its_best_member(repo, cache_dir, capsys,
                                                                                    monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _blend(repo, cache_dir, "umx_a", "hd_b", "-n", "fit")
    stdout = capsys.readouterr().out
    spec = yaml.safe_load((repo / "fit.yaml").read_text())
    assert spec["models"] == ["umx_a", "hd_b"] and "segment" not in spec
    weights = torch.tensor(spec["weights"])
    assert weights.shape == (2, 4)
    torch.testing.assert_close(weights.sum(0), torch.ones(4, dtype=weights.dtype))  # normalised per source
    assert torch.allclose(weights * 10, (weights * 10).round())  # on the 0.1 grid

    rows = _table(stdout, ["umx_a", "hd_b"], "fit")
    for source in SOURCES:  # never below the best member on the fitted split
        assert rows["bag fit"][source] >= max(rows["umx_a"][source], rows["hd_b"][source])
    # These two random models err differently: a true blend beats both.
    assert ((weights > 0) & (weights < 1)).any() and rows["bag fit"]["mean"] > rows["hd_b"]["mean"] + 1
    assert "mean" in stdout and f"bag: {repo / 'fit.yaml'}" in stdout

    # The bag, loaded by the repository and run like `demixlab separate` runs it, scores as printed.
    split = build_valid_split(_toy_config(), samplerate=RATE, channels=2, base_dir=tmp_path, cache_dir=cache_dir)
    assert len(split.dataset) == 1
    _, mixture, references = split.dataset[0]
    scores = {}
    for name in ("fit", "umx_a", "hd_b"):
        estimate = bag_separator(Repository(repo).load(name))(mixture)
        scores[name] = global_sdr(references, estimate).tolist()
    for index, source in enumerate(SOURCES):
        assert scores["fit"][index] == pytest.approx(rows["bag fit"][source], abs=2e-3)
        assert scores["umx_a"][index] == pytest.approx(rows["umx_a"][source], abs=2e-3)
        assert scores["fit"][index] >= max(scores["umx_a"][index], scores["hd_b"][index]) - 1e-4


def _toy_config() -> DatasetConfig:
    """The dataset options of the tiny toy dataset, composed as the command composes them."""
    return as_dataset_config(main.get_xp(TOY).cfg.dset)


def test_a_model_lacking_a_source_weighs_zero_for_it(repo, cache_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _blend(repo, cache_dir, "umx_a", "voc", "valid.segment=1.0", "-n", "with_voc", "--step", "0.25")
    stdout = capsys.readouterr().out
    spec = yaml.safe_load((repo / "with_voc.yaml").read_text())
    assert spec["segment"] == 1.0
    bag = Repository(repo).load("with_voc")
    assert bag.sources == [*SOURCES, "piano"]
    umx, voc = spec["weights"]
    assert umx[:3] == [1.0, 1.0, 1.0] and voc[:3] == [0.0, 0.0, 0.0]  # only umx_a separates them
    assert umx[4] == 0.0 and voc[4] == 1.0  # piano: not in the dataset, not fitted; only voc has it
    assert umx[3] + voc[3] == pytest.approx(1.0) and umx[3] * 4 == round(umx[3] * 4)
    rows = _table(stdout, ["umx_a", "voc"], "with_voc")
    assert set(rows["voc"]) == {"vocals"} and set(rows["bag with_voc"]) == {*SOURCES, "mean"}
    assert rows["bag with_voc"]["drums"] == rows["umx_a"]["drums"]
    assert rows["bag with_voc"]["vocals"] >= max(rows["umx_a"]["vocals"], rows["voc"]["vocals"])


@pytest.mark.parametrize("args, message", [
    (["umx_a", "nope", "-n", "x"], "no model or bag named 'nope'"),
    (["umx_a", "hd_b", "-n", "umx_a"], "is a model file; a bag of that name would hide it"),
    (["umx_a", "umx_a", "-n", "x"], "model 'umx_a' is given twice"),
    (["umx_a", "hd_b", "-n", "x", "--step", "0.3"], "--step 0.3: expected a fraction that divides 1"),
    (["umx_a", "old", "-n", "x"], "is a bag; blend model files"),
    (["umx_a", "hd_b", "-n", "old"], "the bag"),
    (["umx_a", "hd_b", "dset=folder", "dset.sources=[a,b]", "-n", "x"], "dset.root is not set"),
    (["umx_a", "hd_b", "dset=folder", "dset.root=missing", "dset.sources=[a,b]", "-n", "x"],
     "dset.root=missing: no such directory"),
    (["umx_a", "hd_b", "dset=folder", "dset.root=ab", "dset.sources=[a,b]", "-n", "x"], "no source in common"),
])
def test_mistakes_are_one_line_errors(repo, cache_dir, capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    (repo / "old.yaml").write_text("models: [umx_a]\n")
    for split in ("train", "valid"):  # a folder dataset of other sources than the models'
        (tmp_path / "ab" / split / "song").mkdir(parents=True)
        for source in ("a", "b"):
            sf.write(tmp_path / "ab" / split / "song" / f"{source}.wav", np.zeros((4410, 2), np.float32), RATE)
    with pytest.raises(SystemExit) as exit_info:
        _blend(repo, cache_dir, *args)
    assert exit_info.value.code == EXIT_USER_ERROR
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("demixlab: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert (repo / "old.yaml").read_text() == "models: [umx_a]\n" and not (repo / "x.yaml").exists()


def test_an_existing_bag_is_replaced_with_force(repo, cache_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (repo / "old.yaml").write_text("models: [umx_a]\n")
    _blend(repo, cache_dir, "umx_a", "hd_b", "-n", "old", "--force", "--step", "0.5")
    assert yaml.safe_load((repo / "old.yaml").read_text())["models"] == ["umx_a", "hd_b"]


def test_the_blend_score_is_the_global_sdr_of_the_blended_estimate():
    generator = torch.Generator().manual_seed(0)
    references = torch.randn(3, 2, 1000, generator=generator)  # 3 tracks of one source
    estimates = [references + scale * torch.randn(3, 2, 1000, generator=generator) for scale in (0.5, 0.8, 1.5)]
    gram = torch.stack([torch.stack([references[t], *(e[t] for e in estimates)]).flatten(1).double()
                        @ torch.stack([references[t], *(e[t] for e in estimates)]).flatten(1).double().T
                        for t in range(3)])
    stats = BlendStatistics(sources=["a"], models={"a": ["m0", "m1", "m2"]}, gram={"a": gram})
    candidates = torch.tensor([[1.0, 0, 0], [0.2, 0.5, 0.3], [2.0, 1.0, 1.0]])
    for weights, score in zip(candidates, stats.scores("a", candidates).tolist()):
        blended = sum(w * e for w, e in zip(weights / weights.sum(), estimates))
        expected = global_sdr(references[:, None], blended[:, None]).mean().item()
        assert score == pytest.approx(expected, abs=1e-5)  # the blend itself is summed in float32


def test_the_simplex_grid_holds_every_one_hot_vector():
    grid = simplex_grid(3, 10)
    assert grid.shape == (math.comb(12, 2), 3)
    torch.testing.assert_close(grid.sum(1), torch.ones(len(grid), dtype=grid.dtype))
    for row in torch.eye(3, dtype=grid.dtype):
        assert (grid == row).all(1).any()
