"""Optimizer parameter groups, learning-rate schedules and EMA."""
import math

import pytest
import torch
from omegaconf import open_dict

from demixlab.errors import DemixError
from demixlab.models import SeparationModel
from demixlab.train import main
from demixlab.training.config import parse_config
from demixlab.training.optim import (OPTIMIZERS, LearningRateSchedule, ModelEMA, OptimConfig, ParameterGroupConfig,
                                     SchedulerConfig, build_optimizer, swapped_weights)


class TwoParts(SeparationModel):
    def __init__(self):
        super().__init__(["a"], samplerate=100, audio_channels=1)
        self.body = torch.nn.Linear(3, 3)
        self.transformer = torch.nn.Linear(3, 3)

    def parameter_groups(self):
        return {"transformer": {"params": list(self.transformer.parameters())}}


def optim_cfg(groups=None, **overrides):
    groups = {name: ParameterGroupConfig(**values) for name, values in (groups or {}).items()}
    return OptimConfig(**{"optimizer": "adam", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0,
                          "clip_grad": 0.0, "groups": groups, **overrides})


def test_named_groups_get_their_own_settings_and_the_rest_the_defaults():
    model = TwoParts()
    optimizer = build_optimizer(model, optim_cfg(groups={"transformer": {"lr": 1e-4, "weight_decay": 0.05}}))
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["default"]["lr"] == 1e-3 and groups["default"]["weight_decay"] == 0.0
    assert groups["transformer"]["lr"] == 1e-4 and groups["transformer"]["weight_decay"] == 0.05
    assert {id(p) for p in groups["transformer"]["params"]} == {id(p) for p in model.transformer.parameters()}
    assert {id(p) for p in groups["default"]["params"]} == {id(p) for p in model.body.parameters()}


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_the_optimizer_is_torchs_fused_kernel_with_the_same_steps(name):
    """build_optimizer takes the fused kernel on the CPU; its steps are the plain loop's."""
    model = TwoParts()
    optimizer = build_optimizer(model, optim_cfg(optimizer=name, weight_decay=1e-2))
    assert all(group["fused"] for group in optimizer.param_groups)
    plain = TwoParts()
    plain.load_state_dict(model.state_dict())
    loop = OPTIMIZERS[name](plain.parameters(), lr=1e-3, weight_decay=1e-2, foreach=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for ours, theirs in zip(model.parameters(), plain.parameters()):
            ours.grad = torch.randn(ours.shape, generator=generator)
            theirs.grad = ours.grad.clone()
        optimizer.step()
        loop.step()
    for ours, theirs in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(ours, theirs, atol=1e-7, rtol=1e-6)


def test_a_group_keeps_the_model_defaults_unless_the_config_overrides_them():
    class WithDefaults(TwoParts):
        def parameter_groups(self):
            return {"transformer": {"params": list(self.transformer.parameters()), "lr": None, "weight_decay": 0.1}}

    groups = {g["name"]: g for g in build_optimizer(WithDefaults(), optim_cfg()).param_groups}
    assert groups["transformer"]["weight_decay"] == 0.1 and groups["transformer"]["lr"] == 1e-3  # lr None: default
    overridden = build_optimizer(WithDefaults(), optim_cfg(groups={"transformer": {"weight_decay": 0.2}}))
    assert {g["name"]: g for g in overridden.param_groups}["transformer"]["weight_decay"] == 0.2
    declared = build_optimizer(WithDefaults(), optim_cfg(groups={"transformer": {"lr": None, "weight_decay": None}}))
    assert {g["name"]: g for g in declared.param_groups}["transformer"]["weight_decay"] == 0.1  # null: the model's


def test_a_group_the_model_lacks_is_an_error_naming_the_key():
    with pytest.raises(DemixError, match="optim.groups.attention: this model has no parameter group 'attention'"):
        build_optimizer(TwoParts(), optim_cfg(groups={"attention": {"lr": 1.0}}))


def test_the_schema_names_a_setting_a_group_does_not_have():
    cfg = main.get_xp(["model=htdemucs"]).cfg
    with open_dict(cfg):
        cfg.optim.groups.transformer.momentum = 0.5
    with pytest.raises(DemixError, match="optim.groups.transformer.momentum"):
        parse_config(cfg)


def test_unknown_optimizer_and_bad_lr_are_user_errors():
    with pytest.raises(DemixError, match="optim.optimizer"):
        optim_cfg(optimizer="sgd")
    with pytest.raises(DemixError, match="optim.lr"):
        optim_cfg(lr=0)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    optimizer = build_optimizer(TwoParts(), optim_cfg())
    schedule = LearningRateSchedule(optimizer, SchedulerConfig(name="cosine", warmup_epochs=2), 10, "max")
    rates = []
    for epoch in range(10):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate epoch `epoch` trains with
        schedule.end_epoch(0.0)
    assert rates[0] == pytest.approx(0.5e-3) and rates[1] == pytest.approx(1e-3)
    assert rates[2] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert rates[2:] == sorted(rates[2:], reverse=True)


def test_plateau_schedule_state_round_trips():
    cfg = SchedulerConfig(name="plateau", factor=0.5, patience=1, cooldown=0)
    optimizer = build_optimizer(TwoParts(), optim_cfg())
    schedule = LearningRateSchedule(optimizer, cfg, 10, "max")
    for metric in (1.0, 0.5, 0.4):
        schedule.end_epoch(metric)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    state = schedule.state_dict()
    restored_optimizer = build_optimizer(TwoParts(), optim_cfg())
    restored_optimizer.load_state_dict(optimizer.state_dict())
    restored = LearningRateSchedule(restored_optimizer, cfg, 10, "max")
    restored.load_state_dict(state)
    for scheduled in (schedule, restored):
        scheduled.end_epoch(0.3)
        scheduled.end_epoch(0.2)
    assert restored_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-3)


def test_ema_averages_weights_and_swapping_restores_them():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, 0.0)
    ema = ModelEMA(model, 0.5)
    for value in (2.0, 4.0):
        torch.nn.init.constant_(model.weight, value)
        ema.update()
    assert ema.name == "ema_0.5"
    assert ema.state_dict()["weight"].item() == pytest.approx(0.5 * (0.5 * 0 + 0.5 * 2) + 0.5 * 4)
    with swapped_weights(model, ema.state_dict()):
        assert model.weight.item() == pytest.approx(2.5)
    assert model.weight.item() == 4.0
    with pytest.raises(DemixError, match="ema.decays"):
        ModelEMA(model, 1.0)
