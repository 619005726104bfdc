"""Check configuration values the way `dora run` does: compose, override, validate against the schema."""
import typing as tp

from omegaconf import OmegaConf, open_dict

from demixlab.train import main
from demixlab.training.config import TrainingConfig, parse_config


def parse_with(values: tp.Mapping[str, tp.Any], *groups: str) -> TrainingConfig:
    """The default configuration (with `groups` such as `model=xumx`) with `values` ({dotted key:
    value}, keys the YAML may lack) set, checked by the schema."""
    cfg = main.get_xp(list(groups)).cfg
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, force_add=True)
    return parse_config(cfg)
