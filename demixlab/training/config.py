"""The training configuration's schema: typed dataclasses for every section of `conf/config.yaml`.

Hydra composes the configuration from YAML; :func:`parse_config` checks it against this schema
and returns a :class:`TrainingConfig`, which is all the solver and the stages below it see. Types
and unknown keys are checked by OmegaConf against the dataclasses (the error names the key);
ranges and choices by each dataclass' `__post_init__`. Every error is a one-line
:class:`~demixlab.errors.DemixError`. `model.*` and `loss.*` depend on the family: their schema
is the family's declared options (:meth:`demixlab.models.registry.Family.model_options`).

The schema only checks: signatures and the configuration digest are computed on the composed
configuration as Hydra gives it (:mod:`demixlab.experiment`), so declaring a type never changes
what an existing signature means.
"""
import dataclasses
import typing as tp
from dataclasses import dataclass, field

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data import DatasetConfig
from ..errors import DemixError
from ..evaluation.metrics import SDR_BACKENDS
from ..experiment import parse_signature
from ..models import get_family
from ..models.registry import schema_error
from ..release.repository import MODEL_SUFFIX
from .augment import AugmentConfig
from .diffq import QuantConfig
from .finetune import FinetuneConfig
from .optim import EmaConfig, OptimConfig, SchedulerConfig


def is_model_file(value: tp.Any) -> bool:
    """Whether a `continue_from` value names a model file (`PATH.th`) rather than an XP signature."""
    return isinstance(value, str) and value.endswith(MODEL_SUFFIX)


def _choice(key: str, value: str, choices: tp.Sequence[str]) -> None:
    if value not in choices:
        raise DemixError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def _at_least(key: str, value: tp.Any, low: float) -> None:
    if value < low:
        raise DemixError(f"{key} must be {'a positive integer' if low == 1 else f'>= {low:g}'}, got {value!r}")


@dataclass
class BestConfig:
    """`best`: the history key that picks the best state (and drives plateau and early stopping)."""

    metric: str = "valid.nsdr"
    mode: str = "max"  # max | min

    def __post_init__(self) -> None:
        _choice("best.mode", self.mode, ("max", "min"))


@dataclass
class EarlyStopConfig:
    """`early_stop`: stop after `patience` epochs without improvement of `best.metric` (0: never)."""

    patience: int = 140

    def __post_init__(self) -> None:
        _at_least("early_stop.patience", self.patience, 0)


@dataclass
class AmpConfig:
    """`amp`: autocast on CUDA (ignored on CPU)."""

    enabled: bool = False
    dtype: str = "bfloat16"  # bfloat16 | float16

    def __post_init__(self) -> None:
        _choice("amp.dtype", self.dtype, ("bfloat16", "float16"))


@dataclass
class ValidConfig:
    """`valid`: how validation and test tracks are separated (chunks of `segment` seconds), and how
    often an excerpt of `audio_seconds` goes to TensorBoard as audio and spectrograms (0: never;
    not in the signature)."""

    segment: tp.Optional[float] = None  # None: whole tracks
    overlap: float = 0.25
    audio_every: int = 0
    audio_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.segment is not None and self.segment <= 0:
            raise DemixError(f"valid.segment must be a positive number of seconds or null, got {self.segment}")
        if not 0 <= self.overlap < 1:
            raise DemixError(f"valid.overlap must be in [0, 1), got {self.overlap}")
        _at_least("valid.audio_every", self.audio_every, 0)
        if not self.audio_seconds > 0:
            raise DemixError(f"valid.audio_seconds must be a positive number of seconds, got {self.audio_seconds}")


@dataclass
class TestConfig:
    """`test`: the test-set evaluation (after training, and every `every` epochs)."""

    every: int = 0
    sdr: bool = True  # BSS Eval v4 next to the global SDR
    sdr_backend: str = "torch"  # torch | museval | check
    shifts: int = 0

    def __post_init__(self) -> None:
        _at_least("test.every", self.every, 0)
        _at_least("test.shifts", self.shifts, 0)
        _choice("test.sdr_backend", self.sdr_backend, SDR_BACKENDS)


@dataclass
class MiscConfig:
    """`misc`: how the XP runs, not what it trains (excluded from signatures)."""

    num_workers: tp.Any = "auto"  # auto | a non-negative integer
    device: str = "auto"  # auto | cpu | cuda
    cache_dir: tp.Optional[str] = None
    verbose: bool = False
    progress: bool = True
    log_updates: int = 5

    def __post_init__(self) -> None:
        workers = self.num_workers
        if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise DemixError(f"misc.num_workers must be 'auto' or a non-negative integer, got {workers!r}")
        _choice("misc.device", self.device, ("auto", "cpu", "cuda"))


@dataclass
class TrainingConfig:
    """The whole configuration of an XP (`conf/config.yaml` and its groups), typed."""

    seed: int = 42
    epochs: int = 1000
    batch_size: int = 16
    segment: float = 6.0
    samples_per_track: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    best: BestConfig = field(default_factory=BestConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    valid: ValidConfig = field(default_factory=ValidConfig)
    test: TestConfig = field(default_factory=TestConfig)
    model: tp.Dict[str, tp.Any] = field(default_factory=dict)  # family + the family's options
    loss: tp.Dict[str, tp.Any] = field(default_factory=dict)  # the family's objective options
    dset: DatasetConfig = MISSING  # a `dset=` group always sets it
    continue_from: tp.Any = None  # a signature (Hydra may parse it as a number) or a model file (.th)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    misc: MiscConfig = field(default_factory=MiscConfig)
    dora: tp.Dict[str, tp.Any] = field(default_factory=dict)  # Dora's own settings
    slurm: tp.Dict[str, tp.Any] = field(default_factory=dict)  # Dora's Slurm settings

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "samples_per_track"):
            _at_least(key, getattr(self, key), 1)
        if not self.segment > 0:
            raise DemixError(f"segment must be a positive number of seconds, got {self.segment!r}")
        if self.continue_from is not None and not is_model_file(self.continue_from):
            self.continue_from = parse_signature(self.continue_from, "continue_from")
        if "family" not in self.model:
            raise DemixError("model.family is not set: choose a model with model=NAME")
        if self.quant.diffq is not None and self.finetune.lora.enabled:
            raise DemixError("quant.diffq cannot train LoRA adapters (finetune.lora.enabled): quantise the merged "
                             "model in a second fine-tuning XP")
        family = get_family(str(self.model["family"]))
        family.check_model_options(self.model_options)
        family.check_loss_options(self.loss)

    @property
    def model_options(self) -> tp.Dict[str, tp.Any]:
        """The family's constructor options: `model.*` without `family`."""
        return {key: value for key, value in self.model.items() if key != "family"}


def parse_config(cfg: DictConfig) -> TrainingConfig:
    """Check a composed configuration against the schema and return it typed.

    Raises a one-line :class:`DemixError` naming the first unknown key, value of the wrong type,
    or value out of range.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainingConfig), cfg)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or _section_given_a_value(TrainingConfig, cfg)
        raise DemixError(schema_error(error) if not key or getattr(error, "full_key", None)
                         else f"{key}: expected a section of options, got {OmegaConf.select(cfg, key)!r}") from None
    assert isinstance(config, TrainingConfig)
    return config


def _section_given_a_value(schema: tp.Any, cfg: tp.Any, prefix: str = "") -> tp.Optional[str]:
    """The first key where `schema` declares a section (a dataclass) and `cfg` holds a plain value
    (OmegaConf's merge error does not say where)."""
    for item in dataclasses.fields(schema):
        kind = item.type
        options = [arg for arg in tp.get_args(kind) if arg is not type(None)] if tp.get_origin(kind) is tp.Union else [kind]
        section = next((option for option in options if dataclasses.is_dataclass(option)), None)
        if section is None or not isinstance(cfg, DictConfig) or item.name not in cfg:
            continue
        value = cfg[item.name]
        if value is None:
            continue
        if not isinstance(value, DictConfig):
            return f"{prefix}{item.name}"
        found = _section_given_a_value(section, value, f"{prefix}{item.name}.")
        if found:
            return found
    return None

