"""Dora experiment glue: the Hydra main decorator, signatures and XP lookup.

demixlab's `hydra_main` is Dora's, with two changes:

- Naming a config group's default explicitly gives the same signature as omitting it:
  `dora run model=umx` *is* `dora run` (plain Dora hashes the typed group choice, so the two
  would train twice under different signatures). Only choices that differ from the defaults
  enter the signature. The cost: changing a group's default in conf/config.yaml changes the
  signatures of XPs that named the old default; tests/test_signatures.py pins them.
- A bad override (unknown group option such as `model=foo`, malformed syntax) is reported in
  one line, with the valid choices, instead of a Hydra traceback.

A signature hashes only the overrides, so editing a default in conf/ never changes a signature:
it changes what the signature means. `config_digest` hashes the resolved config behind it;
tests/test_signatures.py pins both, and the solver warns when an XP resumes under a config that
differs from the one it started with.

It also works around a Dora 0.1.13 bug: its config comparison keeps its key path in a mutable
default argument, so after one failed comparison every later signature computed in the same
process used corrupted key names.
"""
import difflib
import fnmatch
import hashlib
import json
import logging
import re
import sys
import typing as tp
from pathlib import Path

import yaml
from dora.conf import SlurmConfig
from dora.explore import Explorer, Herd, Launcher
from dora.hydra import HydraMain, _compare_config
from dora.shep import Sheep, Shepherd
from dora.xp import XP
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import EXIT_USER_ERROR, DemixError

logger = logging.getLogger(__name__)

SIGNATURE_PATTERN = re.compile(r"^[0-9a-f]{8}$")
CONFIG_DIR = Path(__file__).parent / "conf"
"""The Hydra configuration (config.yaml and its groups), shipped inside the package."""


class DemixHydraMain(HydraMain):
    """Dora's HydraMain with default-group normalisation, one-line override errors and a schema.

    `validate(cfg)`, when given, checks every composed configuration (raising a
    :class:`DemixError`) before an XP is made of it; its result is not kept, so the schema never
    changes the configuration that signatures and digests are computed on.
    """

    _default_choices: tp.Optional[tp.Dict[str, str]] = None

    def __init__(self, *args: tp.Any, validate: tp.Optional[tp.Callable[[DictConfig], tp.Any]] = None,
                 **kwargs: tp.Any):
        super().__init__(*args, **kwargs)
        self.validate = validate

    def get_xp(self, argv: tp.Sequence[str]) -> XP:
        """The XP these overrides define, its configuration checked; a bad override or value
        exits with a one-line error (exit code 2)."""
        try:
            return self.checked_xp(argv)
        except DemixError as error:
            self._exit(str(error))

    def checked_xp(self, argv: tp.Sequence[str]) -> XP:
        """Like `get_xp`, but a bad override or value raises a one-line :class:`DemixError` (for
        callers that check many override lists, such as `demixlab search`)."""
        try:
            xp = super().get_xp(argv)
        except (HydraException, OmegaConfBaseException, AssertionError) as error:
            raise DemixError(self._describe_override_error(argv, error)) from None
        if self.validate is not None:
            self.validate(xp.cfg)
        return xp

    @staticmethod
    def _exit(message: str) -> tp.NoReturn:
        print(f"demixlab: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)

    def _get_base_config(self, overrides: tp.List[str] = []):  # noqa: B006 (matches Dora's signature)
        cfg, delta = super()._get_base_config(overrides)
        defaults = self.default_choices()
        delta = [(group, value) for group, value in delta if defaults.get(group) != value]
        return cfg, delta

    def _get_delta(self, init, other):
        return [(".".join(diff.path), diff.other_value) for diff in _compare_config(init, other, [])]

    def default_choices(self) -> tp.Dict[str, str]:
        """The option each of our config groups selects when not overridden, e.g. {'model': 'umx'}."""
        if self._default_choices is None:
            with initialize_config_dir(str(self.full_config_path), job_name=self._job_name, **self.hydra_kwargs):
                cfg = compose(self.config_name, return_hydra_config=True)
            choices = dict(cfg.hydra.runtime.choices)
            self._default_choices = {group: str(value) for group, value in choices.items()
                                     if not group.startswith("hydra")}
        return self._default_choices

    def group_options(self, group: str) -> tp.List[str]:
        """The options available in a config group (the yaml files in conf/GROUP/)."""
        with initialize_config_dir(str(self.full_config_path), job_name=self._job_name, **self.hydra_kwargs):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None
            return sorted(hydra.config_loader.get_group_options(group))

    def _describe_override_error(self, argv: tp.Sequence[str], error: Exception) -> str:
        for arg in argv:
            group, _, value = arg.partition("=")
            if group in self.default_choices() and value and value not in self.group_options(group):
                options = ", ".join(self.group_options(group))
                return f"unknown {group} {value!r} in '{arg}': choose one of {options}"
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        unknown_key = re.match(r"Could not override '([^']+)'", message)
        if unknown_key and "not in struct" in str(error.__cause__):
            key = unknown_key.group(1)
            group = key.split(".", 1)[0]
            chosen = next((arg for arg in argv if arg.startswith(f"{group}=")), None)
            if chosen is not None and key in flat_config(self._base_cfg):
                return f"unknown option {key}: it exists with the default {group} but not with {chosen}"
            close = difflib.get_close_matches(key, list(flat_config(self._base_cfg)), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return f"unknown option {key}: no such key in the configuration{hint}"
        return f"invalid overrides {' '.join(argv)}: {message}"


def hydra_main(config_name: str, config_path: str,
               validate: tp.Optional[tp.Callable[[DictConfig], tp.Any]] = None, **kwargs) -> tp.Callable:
    """Wrap the training main; like `dora.hydra_main` (see the class and module docstrings)."""

    def decorator(main: tp.Callable) -> DemixHydraMain:
        return DemixHydraMain(main, config_name=config_name, config_path=config_path, validate=validate, **kwargs)

    return decorator


def parse_signature(value: tp.Any, key: str) -> str:
    """Validate a signature given on the command line.

    Hydra parses unquoted hex-looking values: `12345678` becomes an int (recoverable, as long as
    the leading zeros are restored) and `1234e567` a float (not recoverable: the user must quote
    it as `key='"1234e567"'`).
    """
    if isinstance(value, bool):
        raise DemixError(f"{key}={value} is not an experiment signature (8 hex digits)")
    if isinstance(value, int) and 0 <= value < 10 ** 8:
        value = f"{value:08d}"
    elif isinstance(value, float):
        raise DemixError(
            f"{key}={value}: Hydra parsed the signature as a number; quote it: {key}='\"<signature>\"'")
    value = str(value)
    if not SIGNATURE_PATTERN.match(value):
        raise DemixError(f"{key}={value!r} is not an experiment signature (8 lowercase hex digits)")
    return value


ALWAYS_EXCLUDED = ("dora.*", "slurm.*")
# Keys added after signatures were first pinned, with the value that keeps what XPs trained
# before they existed (off). While a key holds that value it is left out of `flat_config`: the
# digests of existing signatures stay the same, and resuming an older checkpoint does not warn.
NEUTRAL_DEFAULTS: tp.Dict[str, tp.Any] = {
    "dset.extra": [],
    "dset.unaligned": 0.0,
    "dset.missing": "refuse",
    "dset.moisesdb.length_tolerance": 2.0,
    "dset.slakh.valid_tracks": None,
    "augment.codec.target": "stems",
    "finetune.freeze": [],
}
NEUTRAL_SECTIONS = ("augment.pitch_tempo", "augment.codec", "augment.eq", "augment.reverb", "augment.distortion")
# Later sections switched on by a key, left out while that key holds its off value.
NEUTRAL_SWITCHES: tp.Dict[str, tp.Tuple[str, tp.Any]] = {"finetune.lora": ("enabled", False), "quant": ("diffq", None)}


def flatten(node: tp.Any) -> tp.Dict[str, tp.Any]:
    """Nested dicts as {dotted.key: leaf}; an empty dict is a leaf."""
    flat: tp.Dict[str, tp.Any] = {}

    def walk(node: tp.Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = node

    walk(node, "")
    return flat


def flat_config(cfg: DictConfig) -> tp.Dict[str, tp.Any]:
    """The resolved config as {dotted.key: value}, without the keys excluded from signatures, nor
    the later additions while they are off (`NEUTRAL_DEFAULTS`; a section of `NEUTRAL_SECTIONS`
    whose `probability` is 0; a section of `NEUTRAL_SWITCHES` whose switch is off)."""
    patterns = list(ALWAYS_EXCLUDED) + list(cfg.dora.exclude)
    flat = {key: value for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items()
            if not any(fnmatch.fnmatch(key, pattern) for pattern in patterns)}
    for key, value in NEUTRAL_DEFAULTS.items():
        if key in flat and flat[key] == value:
            del flat[key]
    for section in NEUTRAL_SECTIONS:
        if flat.get(f"{section}.probability", None) == 0:
            for key in [key for key in flat if key.startswith(f"{section}.")]:
                del flat[key]
    for section, (switch, off) in NEUTRAL_SWITCHES.items():
        if flat.get(f"{section}.{switch}", None) == off:
            for key in [key for key in flat if key.startswith(f"{section}.")]:
                del flat[key]
    return flat


def config_digest(cfg: DictConfig) -> str:
    """8 hex digits identifying everything a signature stands for (the resolved, non-excluded config)."""
    payload = json.dumps(sorted(flat_config(cfg).items()), default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:8]


def config_changes(old: tp.Mapping[str, tp.Any], new: tp.Mapping[str, tp.Any]) -> tp.List[str]:
    """Human-readable differences between two flat configs, e.g. ['epochs: 6 -> 8']."""
    keys = sorted(set(old) | set(new))
    missing = "<absent>"
    return [f"{key}: {old.get(key, missing)} -> {new.get(key, missing)}" for key in keys
            if old.get(key, missing) != new.get(key, missing)]


def grid_experiments(main: HydraMain, explorer: Explorer) -> tp.List[tp.Tuple[Sheep, SlurmConfig]]:
    """The XPs a grid's explorer defines, each with the Slurm settings the grid gives it.

    Like `dora grid NAME --dry_run`: nothing is submitted and Slurm is never called.
    """
    herd = Herd()
    explorer(Launcher(Shepherd(main, log=lambda *args: None), main.get_slurm_config(), herd))
    herd.complete()
    return [(sheep, herd.slurm_configs[sig]) for sig, sheep in herd.sheeps.items()]


def default_dora_dir() -> Path:
    """Dora's output folder as configured (`dora.dir` of config.yaml, relative to the current directory)."""
    with open(CONFIG_DIR / "config.yaml") as stream:
        return Path(yaml.safe_load(stream)["dora"]["dir"])
