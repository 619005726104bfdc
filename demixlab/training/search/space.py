"""The search space: reading and checking SPACE.yaml, trial overrides, the pruner and sampler it names.

:func:`read_space` checks the file's format (safe loader), :func:`check_space` composes the
configuration with every bound and choice, so an unknown key or a value the schema refuses is a
one-line error naming the key before anything runs. :func:`trial_overrides` gives a trial's
`dora run` overrides: `base`, then one `key=value` per parameter, the same argv, hence the same
signature, as `dora run` by hand.
"""
import dataclasses
import fnmatch
import math
import re
import typing as tp
import warnings
from pathlib import Path

import optuna
import yaml
from dora.conf import SlurmConfig
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from ...errors import DemixError
from ...experiment import ALWAYS_EXCLUDED, DemixHydraMain

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
# YAML 1.1 (PyYAML) reads `1e-4` as a string: accept the numbers people write.
NUMBER_PATTERN = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
DIRECTIONS = ("maximize", "minimize")
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its `study.stop()` once the grid is covered (which only works
    inside `study.optimize`); the search stops at its number of trials, and a trial drawn again
    from a covered grid is read from its finished XP."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: tp.Optional[tp.Sequence[float]]) -> None:
        """Nothing to do after a trial."""


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": _GridSampler,
}
SPACE_KEYS = ("name", "base", "metric", "direction", "trials", "params", "pruner", "sampler", "slurm", "enqueue")
RANGE_KEYS = ("low", "high", "log", "step")
Value = tp.Union[None, bool, int, float, str]


@dataclasses.dataclass
class Param:
    """One searched override: a range (`low`..`high`, log-uniform with `log`, on a grid of `step`;
    integers when both bounds are) or a list of `choices`."""

    key: str
    low: tp.Optional[float] = None
    high: tp.Optional[float] = None
    log: bool = False
    step: tp.Optional[float] = None
    choices: tp.Optional[tp.List[Value]] = None

    @property
    def is_int(self) -> bool:
        """Whether the range holds integers (both bounds and the step are)."""
        return all(isinstance(value, int) and not isinstance(value, bool)
                   for value in (self.low, self.high, self.step) if value is not None)

    def suggest(self, trial: optuna.Trial) -> Value:
        """Draw this parameter's value for `trial`."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        assert self.low is not None and self.high is not None
        if self.is_int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def allows(self, value: Value) -> bool:
        """Whether `value` is one of the choices, or a number within the range (an integer for an integer range)."""
        if self.choices is not None:
            return any(value == choice and type(value) is type(choice) for choice in self.choices)
        assert self.low is not None and self.high is not None
        if self.is_int and not (isinstance(value, int) and not isinstance(value, bool)):
            return False
        return is_number(value) and self.low <= tp.cast(float, value) <= self.high

    def probes(self) -> tp.List[Value]:
        """The values that must all compose: both bounds, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclasses.dataclass
class SearchSpace:
    """A parsed SPACE.yaml (see the module docstring)."""

    path: Path
    name: str
    base: tp.List[str]
    metric: str
    direction: str
    trials: int
    params: tp.List[Param]
    pruner: tp.Dict[str, tp.Any]
    sampler: tp.Dict[str, tp.Any]
    slurm: tp.Dict[str, tp.Any]
    enqueue: tp.List[tp.Dict[str, Value]]

    def error(self, where: str, message: str) -> DemixError:
        """A one-line error naming this file and the key at fault."""
        return DemixError(f"{self.path}: {where}: {message}")

    def identity(self) -> tp.Dict[str, tp.Any]:
        """What a study must keep to be resumed: base overrides, metric, direction and parameters."""
        return {"base": self.base, "metric": self.metric, "direction": self.direction,
                "params": [dataclasses.asdict(param) for param in self.params]}


def _number(value: tp.Any) -> tp.Any:
    if isinstance(value, str) and NUMBER_PATTERN.match(value.strip()):
        return float(value) if re.search(r"[.eE]", value) else int(value)
    return value


def is_number(value: tp.Any) -> bool:
    """Whether `value` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_param(space_error: tp.Callable[[str, str], DemixError], key: tp.Any, spec: tp.Any) -> Param:
    where = f"params.{key}"
    if not isinstance(key, str) or not re.match(r"^[A-Za-z_][\w.]*$", key):
        raise space_error("params", f"{key!r} is not an override key such as optim.lr")
    if not isinstance(spec, dict):
        raise space_error(where, f"expected {{low: ..., high: ...}} or {{choices: [...]}}, got {spec!r}")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise space_error(where, f"choices cannot be combined with {', '.join(map(str, extra))}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise space_error(where, f"choices must be a non-empty list, got {choices!r}")
        choices = [_number(choice) for choice in choices]
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise space_error(where, f"choices must be numbers, strings, booleans or null, got {choice!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise space_error(where, f"choices repeat a value: {choices!r}")
        return Param(key, choices=choices)
    unknown = sorted(set(spec) - set(RANGE_KEYS), key=str)
    if unknown:
        raise space_error(where, f"unknown field {unknown[0]!r} (a range has {', '.join(RANGE_KEYS)}; or give choices)")
    if "low" not in spec or "high" not in spec:
        raise space_error(where, "a range needs both low and high (or give choices)")
    low, high, step = _number(spec["low"]), _number(spec["high"]), _number(spec.get("step"))
    for field, value in (("low", low), ("high", high)):
        if not is_number(value):
            raise space_error(where, f"{field} must be a number, got {spec[field]!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise space_error(where, f"log must be true or false, got {log!r}")
    if not low < high:
        raise space_error(where, f"empty range: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise space_error(where, f"a log range needs low > 0, got {low}")
    if step is not None:
        if not is_number(step) or step <= 0:
            raise space_error(where, f"step must be a positive number, got {spec['step']!r}")
        if log:
            raise space_error(where, "step and log cannot be combined")
    return Param(key, low=low, high=high, log=log, step=step)


def _parse_options(space_error: tp.Callable[[str, str], DemixError], where: str, value: tp.Any,
                   choices: tp.Mapping[str, tp.Any], default: str) -> tp.Dict[str, tp.Any]:
    """`pruner:` / `sampler:`: a name, or a mapping with `name` and the class' keyword arguments."""
    if value is None:
        value = {"name": default}
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise space_error(where, f"expected a name or {{name: ..., option: value}}, got {value!r}")
    options = dict(value)
    name = str(options.get("name", default))
    if name not in choices:
        raise space_error(f"{where}.name", f"unknown {where} {name!r}: choose one of {', '.join(choices)}")
    options["name"] = name
    return options


def read_space(path: tp.Union[str, Path]) -> SearchSpace:
    """Read and check the format of a SPACE.yaml (safe loader); one-line :class:`DemixError` on any
    problem, naming the file and the key. The keys themselves are checked by :func:`check_space`."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text())
    except OSError as error:
        raise DemixError(f"{path}: cannot read the search space ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise DemixError(f"{path}: not valid YAML ({where}{problem})") from None
    if not isinstance(content, dict):
        raise DemixError(f"{path}: expected a mapping with base, metric, trials and params, got {type(content).__name__}")

    def space_error(where: str, message: str) -> DemixError:
        return DemixError(f"{path}: {where}: {message}")

    unknown = sorted(set(content) - set(SPACE_KEYS), key=str)
    if unknown:
        raise space_error(str(unknown[0]), f"unknown field (expected some of {', '.join(SPACE_KEYS)})")
    name = str(content.get("name") or path.stem)
    if not NAME_PATTERN.match(name):
        raise space_error("name", f"{name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
    base = content.get("base") or []
    if isinstance(base, str):
        base = base.split()
    if not isinstance(base, list) or not all(isinstance(item, str) and "=" in item for item in base):
        raise space_error("base", f"expected a list of overrides such as [model=umx, epochs=3], got {base!r}")
    metric = content.get("metric", "valid.nsdr")
    if not isinstance(metric, str) or not re.match(r"^[A-Za-z_]\w*(\.\w+)+$", metric):
        raise space_error("metric", f"expected a history key such as valid.nsdr, got {metric!r}")
    direction = content.get("direction", "maximize")
    if direction not in DIRECTIONS:
        raise space_error("direction", f"choose one of {', '.join(DIRECTIONS)}, got {direction!r}")
    trials = content.get("trials", 10)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise space_error("trials", f"expected a positive integer, got {trials!r}")
    params_spec = content.get("params")
    if not isinstance(params_spec, dict) or not params_spec:
        raise space_error("params", "expected a mapping of override keys to ranges or choices, got "
                                    f"{params_spec!r}")
    params = [_parse_param(space_error, key, spec) for key, spec in params_spec.items()]
    base_keys = {item.split("=", 1)[0].lstrip("+~") for item in base}
    for param in params:
        if param.key in base_keys:
            raise space_error(f"params.{param.key}", "also set in base: keep it in one place")
    pruner = _parse_options(space_error, "pruner", content.get("pruner"), PRUNERS, "median")
    sampler = _parse_options(space_error, "sampler", content.get("sampler"), SAMPLERS, "tpe")
    if sampler["name"] == "grid":
        for param in params:
            if param.choices is None:
                raise space_error(f"params.{param.key}", "sampler grid needs choices for every parameter")
    slurm = content.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise space_error("slurm", f"expected a mapping such as {{gpus: 1, time: 60}}, got {slurm!r}")
    fields = {field.name for field in dataclasses.fields(SlurmConfig)}
    for key in slurm:
        if key not in fields:
            raise space_error(f"slurm.{key}", f"unknown Slurm setting (Dora's are {', '.join(sorted(fields))})")
    enqueue = content.get("enqueue") or []
    keys = {param.key: param for param in params}
    if not isinstance(enqueue, list) or not all(isinstance(entry, dict) for entry in enqueue):
        raise space_error("enqueue", f"expected a list of {{key: value}} mappings, got {enqueue!r}")
    for index, entry in enumerate(enqueue):
        for key, value in entry.items():
            if key not in keys:
                raise space_error(f"enqueue[{index}].{key}", "not one of params")
            entry[key] = value = _number(value)
            if not keys[key].allows(value):
                raise space_error(f"enqueue[{index}].{key}", f"{value!r} is outside params.{key}")
    space = SearchSpace(path=path, name=name, base=list(base), metric=metric, direction=direction, trials=trials,
                        params=params, pruner=pruner, sampler=sampler, slurm=dict(slurm), enqueue=enqueue)
    make_pruner(space)  # their options: errors now, before anything is written
    make_sampler(space, 0)
    return space


def override(key: str, value: Value) -> str:
    """The Hydra override setting `key` to `value`, written so that Hydra reads back this very value."""
    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"{key}={value!r}"
    if re.match(r"^[A-Za-z_][\w/-]*$", value) and value.lower() not in ("true", "false", "null", "inf", "nan"):
        return f"{key}={value}"
    return f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'


def trial_overrides(space: SearchSpace, params: tp.Mapping[str, Value]) -> tp.List[str]:
    """The `dora run` overrides of a trial: `base`, then one per parameter (in the space's order)."""
    return list(space.base) + [override(param.key, params[param.key]) for param in space.params]


def check_space(space: SearchSpace, main: DemixHydraMain) -> None:
    """Compose the configuration with `base`, then with every bound and choice of every parameter:
    an unknown key or a value the schema refuses is a one-line error naming the key."""
    try:
        cfg = main.checked_xp(space.base).cfg
    except DemixError as error:
        raise space.error("base", str(error)) from None
    excluded = list(ALWAYS_EXCLUDED) + list(cfg.dora.exclude)
    for param in space.params:
        where = f"params.{param.key}"
        pattern = next((pattern for pattern in excluded if fnmatch.fnmatch(param.key, pattern)), None)
        if pattern is not None:
            raise space.error(where, f"{pattern} is left out of signatures: every trial would be the same XP")
        is_group = param.key in main.default_choices()
        if not is_group and not _has_key(cfg, param.key):
            # let Hydra and the schema name it (with a 'did you mean'), else say it plainly
            try:
                main.checked_xp(space.base + [override(param.key, param.probes()[0])])
            except DemixError as error:
                raise space.error(where, str(error)) from None
            raise space.error(where, f"unknown option {param.key}: no such key in the configuration")
        for value in param.probes():
            try:
                main.checked_xp(space.base + [override(param.key, value)])
            except DemixError as error:
                raise space.error(where, f"{value!r}: {error}") from None


def _has_key(cfg: DictConfig, key: str) -> bool:
    node: tp.Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def slurm_config(main: DemixHydraMain, space: SearchSpace) -> SlurmConfig:
    """conf/config.yaml's Slurm settings with the space's `slurm:` on top."""
    return dataclasses.replace(main.get_slurm_config(), **space.slurm)


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    """The pruner the space names (MedianPruner by default), with its options."""
    options = dict(space.pruner)
    name = options.pop("name")
    try:
        return PRUNERS[name](**options)
    except (TypeError, ValueError) as error:
        raise space.error("pruner", f"{name}: {str(error).splitlines()[0]}") from None


def make_sampler(space: SearchSpace, offset: int) -> optuna.samplers.BaseSampler:
    """The sampler the space names (TPE by default, seed 0). `offset` (the number of trials the
    study already holds) shifts the seed of a random or TPE sampler, so that a resumed search does
    not draw its first values again."""
    options = dict(space.sampler)
    name = options.pop("name")
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise space.error("sampler.seed", f"expected an integer, got {seed!r}")
    options["seed"] = seed
    if name == "grid":  # its seed orders the grid: keep it; it draws unvisited points anyway
        options["search_space"] = {param.key: list(param.choices or []) for param in space.params}
    else:
        options["seed"] += offset
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SAMPLERS[name](**options)
    except (TypeError, ValueError) as error:
        raise space.error("sampler", f"{name}: {str(error).splitlines()[0]}") from None


