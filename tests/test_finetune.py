"""Fine-tuning options (`finetune.freeze`, `finetune.lora`): frozen parameters stay fixed, a LoRA
XP trains only its adapters, resumes exactly, exports a family-standard model file that separates
like the adapted model; bad patterns are one-line errors. Tiny runs in this process, all children
of one parent XP trained once for the module (the crash-and-resume run is slow)."""
import logging
import shutil
import typing as tp
from pathlib import Path

import pytest
import torch

from demixlab.errors import DemixError
from demixlab.models import get_family
from demixlab.release.model_file import load_package, model_from_package
from demixlab.separation import Separator, apply_model
from demixlab.training.export import export
from demixlab.training.optim import ModelEMA
from demixlab.training.finetune import (FinetuneConfig, LoraConfig, apply_finetune, merge_adapters,
                                        trainable_summary)
from tests.cli import TINY, crash_in_epoch, load_checkpoint, run_in_process, signature

CHILD = [arg for arg in TINY if not arg.startswith("epochs=")] + ["epochs=2", "misc.progress=false"]
LORA = ["finetune.lora.enabled=true", "finetune.lora.rank=2", "finetune.lora.alpha=4.0"]


class Workdir(tp.NamedTuple):
    path: Path
    cache_dir: Path
    parent: str


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cache_dir) -> tp.Iterator[Workdir]:
    """A folder whose outputs/ holds a finished tiny parent XP; tests run their children in it."""
    path = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        patch.setenv("DEMIXLAB_CACHE", str(cache_dir))
        assert run_in_process(path, cache_dir, *TINY) == 0
        yield Workdir(path, cache_dir, signature(path, cache_dir, *TINY))


def _run(workdir: Workdir, monkeypatch: pytest.MonkeyPatch, *overrides: str,
         path: tp.Optional[Path] = None) -> tp.Tuple[int, dict]:
    """Run a child XP of the parent (in `path`, default the module's folder); returns its exit code
    and checkpoint (empty if none)."""
    path = path or workdir.path
    monkeypatch.chdir(path)
    monkeypatch.setenv("DEMIXLAB_CACHE", str(workdir.cache_dir))
    args = [*CHILD, f"continue_from={workdir.parent}", *overrides]
    code = run_in_process(path, workdir.cache_dir, *args)
    folder = path / "outputs" / "xps" / signature(path, workdir.cache_dir, *args)
    return code, (load_checkpoint(folder) if (folder / "checkpoint.th").exists() else {})


def _parent_state(workdir: Workdir) -> tp.Dict[str, torch.Tensor]:
    return load_checkpoint(workdir.path / "outputs" / "xps" / workdir.parent)["best_state"]


def _parameter_names(checkpoint: dict) -> tp.List[str]:
    model = get_family(checkpoint["family"]).build_model(checkpoint["sources"], checkpoint["samplerate"],
                                                         checkpoint["audio_channels"], checkpoint["model_options"])
    return [name for name, _ in model.named_parameters()]


@pytest.mark.slow
def test_frozen_parameters_are_unchanged_after_training(workdir, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="demixlab")
    code, child = _run(workdir, monkeypatch, "finetune.freeze=[*.fc1.*,targets.bass.bn1.*]")
    assert code == 0
    parent = _parent_state(workdir)
    frozen = [name for name in _parameter_names(child) if ".fc1." in name or name.startswith("targets.bass.bn1.")]
    assert len(frozen) == len(child["sources"]) + 2
    for name in frozen:
        assert torch.equal(child["model"][name], parent[name]), name
    assert not torch.equal(child["model"]["targets.bass.fc2.weight"], parent["targets.bass.fc2.weight"])
    total = sum(value.numel() for name, value in parent.items() if name in _parameter_names(child))
    fixed = sum(parent[name].numel() for name in frozen)
    assert f"trainable parameters: {total - fixed} of {total} (" in caplog.text


@pytest.mark.slow
def test_a_lora_xp_trains_only_adapters_and_exports_a_family_standard_file(workdir, monkeypatch, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="demixlab")
    code, child = _run(workdir, monkeypatch, *LORA, "ema.decays=[0.5]")
    assert code == 0
    parent = _parent_state(workdir)
    adapters = [key for key in child["model"] if ".lora_" in key]
    assert adapters and all(key.endswith((".lora_A", ".lora_B")) for key in adapters)
    for name in _parameter_names(child):  # every base parameter is where the parent left it
        key = name if name in child["model"] else name.replace(".weight", ".parametrizations.weight.original")
        assert torch.equal(child["model"][key], parent[name]), name
    assert any(not torch.equal(child["model"][key], torch.zeros_like(child["model"][key]))
               for key in adapters if key.endswith("lora_B"))  # B starts at zero: the adapters trained
    assert set(child["emas"]["ema_0.5"]) == set(child["model"])
    assert "trainable parameters: " in caplog.text and "trainable parameters: 0 of" not in caplog.text

    signature_ = child["signature"]
    path = export(signature_, tmp_path / "repo", dora_dir=workdir.path / "outputs")
    package = load_package(path)
    plain = get_family("umx").build_model(child["sources"], child["samplerate"], child["audio_channels"],
                                          child["model_options"])
    assert list(package["state"]) == list(plain.state_dict())
    # The exported model separates exactly like the adapted model it came from.
    adapted = get_family("umx").build_model(child["sources"], child["samplerate"], child["audio_channels"],
                                            child["model_options"])
    apply_finetune(adapted, FinetuneConfig(lora=LoraConfig(enabled=True, rank=2, alpha=4.0)))
    adapted.load_state_dict(child["best_state"])
    mixture = torch.randn(1, 2, 22050, generator=torch.Generator().manual_seed(0))
    expected = apply_model(adapted.eval(), mixture)
    torch.testing.assert_close(apply_model(model_from_package(package).eval(), mixture), expected)
    stems = Separator(tmp_path / "repo", signature_).separate_tensor(mixture[0], child["samplerate"])
    torch.testing.assert_close(torch.stack([stems[source] for source in child["sources"]]), expected[0])


@pytest.mark.slow
def test_a_lora_xp_resumes_exactly(workdir, monkeypatch, tmp_path):
    args = [*LORA, "ema.decays=[0.9]", "finetune.lora.targets=[*.fc2,*.fc3]"]
    code, reference = _run(workdir, monkeypatch, *args)
    assert code == 0
    other = tmp_path / "other"  # the same XP in another folder, holding a copy of the parent
    shutil.copytree(workdir.path / "outputs" / "xps" / workdir.parent, other / "outputs" / "xps" / workdir.parent)
    with monkeypatch.context() as patch:
        crash_in_epoch(patch, 2)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _run(workdir, patch, *args, path=other)
    code, state = _run(workdir, monkeypatch, *args, path=other)
    assert code == 0 and len(state["history"]) == 2
    for key in ("model", "best_state"):
        assert set(state[key]) == set(reference[key])
        for name, value in reference[key].items():
            assert torch.equal(state[key][name], value), (key, name)
    assert {key.split(".")[2] for key in state["model"] if ".lora_" in key} == {"fc2", "fc3"}


def test_merging_adapters_gives_the_weights_the_model_computes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Conv1d(3, 5, 3), torch.nn.Conv2d(2, 2, 3))
    apply_finetune(model, FinetuneConfig(lora=LoraConfig(enabled=True, rank=2)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    merged = merge_adapters(model.state_dict())
    assert sorted(merged) == sorted(["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"])
    for index, layer in enumerate(model):
        assert torch.equal(merged[f"{index}.weight"], layer.weight)
    assert trainable_summary(model) == "trainable parameters: 82 of 185 (44.32 %)"


def test_the_ema_of_an_adapted_model_averages_the_adapters_and_follows_the_frozen_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    apply_finetune(model, FinetuneConfig(freeze=["1.*"], lora=LoraConfig(enabled=True, targets=["0"])))
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        model[0].parametrizations.weight[0].lora_B.fill_(2.0)
        model[1].running_mean.fill_(4.0)
    ema.update()
    state = ema.state_dict()
    assert torch.equal(state["0.parametrizations.weight.0.lora_B"], torch.ones(3, 8))  # averaged
    assert torch.equal(state["1.running_mean"], torch.full((3,), 2.0))  # buffers too
    live = model.state_dict()
    for key in ("0.parametrizations.weight.original", "0.bias", "1.weight", "2.weight"):  # frozen: not copied
        assert state[key].data_ptr() == live[key].data_ptr(), key


@pytest.mark.parametrize("overrides, message", [
    (["finetune.freeze=[encoder.*]"], "finetune.freeze: pattern 'encoder.*' matches no parameter of the model"),
    ([*LORA, "finetune.lora.targets=[lstm]"],
     "finetune.lora.targets: pattern 'lstm' matches no Linear/Conv1d/Conv2d layer of the model"),
    (["finetune.lora.enabled=true", "finetune.lora.rank=0"], "finetune.lora.rank must be a positive integer, got 0"),
])
def test_bad_finetune_options_are_one_line_errors(in_process, capsys, overrides, message):
    assert in_process(*CHILD, *overrides) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("demixlab: error:")]
    assert len(errors) == 1 and message in errors[0]


def test_an_empty_lora_target_list_is_refused():
    with pytest.raises(DemixError, match="finetune.lora.targets is empty"):
        LoraConfig(enabled=True, targets=[])


def test_finetune_keys_enter_the_config_digest_only_when_on():
    from demixlab.experiment import flat_config
    from demixlab.train import main

    off = flat_config(main.get_xp(["finetune.lora.rank=4"]).cfg)  # LoRA off: its options are not part of it
    assert not any(key.startswith("finetune.") for key in off)
    on = flat_config(main.get_xp(["finetune.freeze=[a.*]", *LORA]).cfg)
    assert on["finetune.freeze"] == ["a.*"] and on["finetune.lora.rank"] == 2 and on["finetune.lora.targets"] == ["*"]
