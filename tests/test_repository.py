"""Repositories and bags: per-source weighted blending across families, validation errors."""
import typing as tp
from pathlib import Path

import pytest
import torch
import yaml

from demixlab.separation import apply_bag, apply_model
from demixlab.errors import DemixError
from demixlab.models import Family, get_family, registry
from demixlab.release.model_file import model_from_package, package_model, save_package
from demixlab.release.repository import Repository

RATE = 44100
SOURCES = ["drums", "bass", "other", "vocals"]
TINY_UMX = dict(n_fft=512, hop_length=128, hidden_size=8, nb_layers=1, bandwidth=8000.0, wiener_iterations=0)
TINY_HDEMUCS = dict(channels=8, nfft=256, depth=4, segment=1.0)


class RaisingModel(torch.nn.Module):
    """A model that must never run (nor be built): bag members whose weights are all zero."""

    def __init__(self, sources: tp.List[str], samplerate: int, audio_channels: int, marker: int = 0):
        super().__init__()
        raise AssertionError("a model whose bag weights are all zero was built")


@pytest.fixture
def raising_family(monkeypatch):
    """Register the RaisingModel family for one test (the registry is left as it was)."""
    monkeypatch.setitem(registry._FAMILIES, "test-raising",
                        Family("test-raising", RaisingModel, build_objective=lambda model: None))


def _randomised(family: str, options: dict, sources: tp.List[str], seed: int, samplerate: int = RATE,
                channels: int = 2) -> dict:
    torch.manual_seed(seed)
    model = get_family(family).build_model(sources, samplerate, channels, options)
    with torch.no_grad():
        for parameter in model.parameters():  # non-trivial outputs (UMX starts as identity masks)
            parameter.add_(0.1 * torch.randn_like(parameter))
    return package_model(family, options, model.state_dict(), sources=sources, samplerate=samplerate,
                         audio_channels=channels, origin={"kind": "test"})


@pytest.fixture
def repo(tmp_path) -> Path:
    save_package(_randomised("umx", TINY_UMX, SOURCES, seed=1), tmp_path / "umx_a.th")
    save_package(_randomised("hdemucs", TINY_HDEMUCS, SOURCES, seed=2), tmp_path / "hd_b.th")
    return tmp_path


def _write_bag(folder: Path, name: str, **spec) -> None:
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def test_bag_of_two_families_is_the_per_source_weighted_mix_of_its_models(repo):
    weights = [[1.0, 3.0, 0.0, 1.0], [2.0, 1.0, 1.0, 0.0]]
    _write_bag(repo, "blend", models=["umx_a", "hd_b"], weights=weights, segment=0.2)
    mixture = torch.randn(1, 2, 12000, generator=torch.Generator().manual_seed(0))
    bag = Repository(repo).load("blend")
    assert bag.sources == SOURCES and bag.segment == 0.2
    out = apply_bag(bag, mixture)

    frames = int(0.2 * RATE)
    models = [model_from_package(torch.load(repo / f"{name}.th", weights_only=True)) for name in ("umx_a", "hd_b")]
    estimates = [apply_model(model, mixture, segment=frames) for model in models]
    w = torch.tensor(weights)
    expected = sum(w[m][None, :, None, None] * estimates[m] for m in range(2)) / w.sum(0)[None, :, None, None]
    assert out.shape == (1, 4, 2, 12000)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Sources with a single contributor are that model's estimate exactly; the blend differs from both.
    torch.testing.assert_close(out[:, 2], estimates[1][:, 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 3], estimates[0][:, 3], rtol=1e-5, atol=1e-5)
    assert (out[:, 0] - estimates[0][:, 0]).abs().max() > 1e-3


def test_a_single_model_is_a_one_entry_bag(repo):
    bag = Repository(repo).load("umx_a")
    assert [member.name for member in bag.members] == ["umx_a"] and bag.segment is None
    mixture = torch.randn(1, 2, 5000)
    model = model_from_package(torch.load(repo / "umx_a.th", weights_only=True))
    torch.testing.assert_close(apply_bag(bag, mixture, segment=0.05), apply_model(model, mixture, segment=2205))
    assert Repository(repo).names() == ["hd_b", "umx_a"]


def test_a_built_bag_holds_each_model_s_weights_once(repo):
    """A bag's models use the file's tensors instead of copies (a copy doubled a separation's memory)."""
    bag = Repository(repo).load("umx_a").build()
    member = bag.members[0]
    model_state = member.model.state_dict()
    assert set(model_state) == set(member.package["state"])
    for key, value in member.package["state"].items():
        assert model_state[key].data_ptr() == value.data_ptr(), key
    # A model built on its own still copies: the package keeps its values when that model changes.
    copy = model_from_package(member.package)
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    stored = torch.load(repo / "umx_a.th", weights_only=True)["state"]
    for key, value in member.package["state"].items():
        torch.testing.assert_close(value, stored[key], rtol=0, atol=0)


def test_models_with_all_zero_weights_are_neither_built_nor_run(repo, raising_family):
    package = package_model("test-raising", {"marker": 1}, {}, sources=SOURCES, samplerate=RATE, audio_channels=2)
    save_package(package, repo / "raises.th")
    _write_bag(repo, "skip", models=["umx_a", "raises"], weights=[[1, 1, 1, 1], [0, 0, 0, 0]])
    bag = Repository(repo).load("skip")
    out = apply_bag(bag, torch.randn(1, 2, 4000))
    assert out.shape == (1, 4, 2, 4000) and bag.members[1].model is None
    _write_bag(repo, "runs", models=["umx_a", "raises"], weights=[[1, 1, 1, 1], [0, 1, 0, 0]])
    with pytest.raises(AssertionError, match="was built"):  # the test model does raise when used
        apply_bag(Repository(repo).load("runs"), torch.randn(1, 2, 4000))


def test_models_with_different_sources_blend_over_the_union(tmp_path):
    save_package(_randomised("umx", TINY_UMX, ["vocals", "accompaniment"], seed=3), tmp_path / "two.th")
    save_package(_randomised("umx", TINY_UMX, ["drums", "vocals"], seed=4), tmp_path / "dv.th")
    _write_bag(tmp_path, "union", models=["two", "dv"], weights=[[1, 1, 5], [1, 1, 1]])
    bag = Repository(tmp_path).load("union")
    assert bag.sources == ["vocals", "accompaniment", "drums"]
    assert bag.members[0].weights == [1.0, 1.0, 0.0]  # "two" lacks drums: weight 0 whatever the file says
    mixture = torch.randn(1, 2, 3000)
    out = apply_bag(bag, mixture, split=False)
    first, second = (model_from_package(member.package)(mixture) for member in bag.members)
    torch.testing.assert_close(out[:, 0], (first[:, 0] + second[:, 1]) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1], first[:, 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 2], second[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, message", [
    (dict(models=["umx_a", "nope"]), "model 'nope' not found"),
    (dict(models=["umx_a", "hd_b"], weights=[[1, 1, 1, 1]]), "weights must be 2 rows"),
    (dict(models=["umx_a", "hd_b"], weights=[[1, 1, 1], [1, 1, 1]]), "of 4 numbers"),
    (dict(models=["umx_a", "hd_b"], weights=[[1, 1, 0, 1], [1, 1, 0, 1]]), "source 'other' has no model"),
    (dict(models=["umx_a"], weights=[[1, -1, 1, 1]]), "non-negative"),
    (dict(models=[]), "non-empty list"),
    (dict(models=["umx_a"], extra=1), "unknown key 'extra'"),
    (dict(models=["umx_a"], segment=-2), "segment must be a positive"),
    (dict(models=["umx_a", "rate"]), "samplerate 22050"),
    (dict(models=["umx_a", "mono"]), "audio_channels 1"),
])
def test_bag_errors_are_one_line_user_errors(repo, spec, message):
    save_package(_randomised("umx", TINY_UMX, SOURCES, seed=5, samplerate=22050), repo / "rate.th")
    save_package(_randomised("umx", TINY_UMX, SOURCES, seed=6, channels=1), repo / "mono.th")
    _write_bag(repo, "bad", **spec)
    with pytest.raises(DemixError, match=message) as error:
        Repository(repo).load("bad")
    assert "\n" not in str(error.value) and "bad.yaml" in str(error.value)


def test_unknown_names_and_folders_are_user_errors(repo, tmp_path):
    with pytest.raises(DemixError, match=r"no model or bag named 'missing'.*available: hd_b, umx_a"):
        Repository(repo).load("missing")
    with pytest.raises(DemixError, match="no such folder"):
        Repository(tmp_path / "nowhere")
    (repo / "broken.yaml").write_text("models: [unclosed")
    with pytest.raises(DemixError, match="invalid YAML"):
        Repository(repo).load("broken")
