"""Import community RoFormer checkpoints (MSST, UVR, audio-separator) into the ``bs_roformer`` and
``mel_roformer`` families (`demixlab import msst CKPT --config CONFIG.yaml`).

Such a model is two files: the state dict saved by torch (`.ckpt`/`.pth`/`.th`), read with the
weights-only loader, and the training YAML, read with a safe loader that also accepts the
`!!python/tuple` tag MSST writes for tuples (and no other tag that builds Python objects). The
YAML's `model:` section holds the constructor arguments of MSST's `BSRoformer` (with
`freqs_per_bands`) or `MelBandRoformer` (with `num_bands`), `audio:` the sample rate and chunk
size, `training:` the instruments and, for a single-target model, `target_instrument`.

Options map one to one onto demixlab's, except: `stereo` and `num_stems` are the channels and
the sources; `mask_estimator_depth` counts the MLP's linear layers in MSST's BS-RoFormer (hidden
layers = depth - 1) and its hidden layers in MSST's Mel-RoFormer (hidden layers = depth);
attention gates are on when the weights have them (`to_gates`); `zero_dc`, `skip_connection` and
`mlp_expansion_factor` default to what audio-separator runs when the YAML does not set them
(zero_dc off). Training-only keys (the multi-resolution STFT loss, flash/sage attention,
checkpointing) are accepted and not part of the model.
"""
import typing as tp
from pathlib import Path

import torch
import yaml

from ...errors import DemixError
from ...files import load_torch
from ..contract import ImportedModel

STATE_SUFFIXES = (".ckpt", ".pth", ".th", ".pt")
CONFIG_SUFFIXES = (".yaml", ".yml")
# MSST constructor arguments that do not change the network, or that demixlab derives.
_IGNORED = {"stereo", "num_stems", "dim_freqs_in", "flash_attn", "sage_attention", "use_torch_checkpoint",
            "multi_stft_resolution_loss_weight", "multi_stft_resolutions_window_sizes", "multi_stft_hop_size",
            "multi_stft_normalized", "match_input_audio_length", "sample_rate", "mask_estimator_depth"}
_SHARED = {"dim", "depth", "time_transformer_depth", "freq_transformer_depth", "linear_transformer_depth", "heads",
           "dim_head", "attn_dropout", "ff_dropout", "mlp_expansion_factor", "stft_n_fft", "stft_hop_length",
           "stft_win_length", "stft_normalized", "zero_dc", "skip_connection"}
_FAMILY_OPTIONS = {"bs_roformer": _SHARED | {"freqs_per_bands"}, "mel_roformer": _SHARED | {"num_bands"}}


class _TupleOnlyLoader(yaml.SafeLoader):
    """yaml's safe loader, plus `!!python/tuple` read as a list (MSST writes tuples that way)."""


_TupleOnlyLoader.add_constructor("tag:yaml.org,2002:python/tuple",
                                 lambda loader, node: list(loader.construct_sequence(node)))


def read_msst_config(path: Path) -> tp.Dict[str, tp.Any]:
    """An MSST YAML configuration, read safely; a one-line :class:`DemixError` names a bad file."""
    try:
        config = yaml.load(path.read_text(), Loader=_TupleOnlyLoader)  # noqa: S506 - a safe loader subclass
    except yaml.constructor.ConstructorError as error:
        raise DemixError(f"{path}: refusing the YAML tag {error.problem.split()[-1] if error.problem else '?'} "
                         "(only plain values and !!python/tuple are read)") from None
    except (OSError, yaml.YAMLError) as error:
        raise DemixError(f"{path}: not a readable YAML file ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise DemixError(f"{path}: expected a mapping with a 'model:' section (an MSST configuration)")
    return config


def _files(paths: tp.Sequence[Path]) -> tp.Tuple[Path, Path]:
    states = [path for path in paths if path.suffix.lower() in STATE_SUFFIXES]
    configs = [path for path in paths if path.suffix.lower() in CONFIG_SUFFIXES]
    if len(states) != 1 or len(configs) != 1 or len(paths) != 2:
        raise DemixError("msst: expected one checkpoint (.ckpt, .pth, .th, .pt) and one YAML configuration "
                         f"(--config CONFIG.yaml), got {', '.join(str(path) for path in paths) or 'nothing'}")
    for path in (states[0], configs[0]):
        if not path.is_file():
            raise DemixError(f"{path}: no such file")
    return states[0], configs[0]


def _sources(config: tp.Mapping[str, tp.Any], path: Path, num_stems: int,
             complement: bool) -> tp.Tuple[tp.List[str], bool]:
    """(sources, whether the last one is the complement of the others) from `training:`."""
    training = config.get("training") or {}
    instruments = [str(name) for name in training.get("instruments") or []]
    target = training.get("target_instrument")
    if target:
        target = str(target)
        if num_stems != 1:
            raise DemixError(f"{path}: target_instrument={target!r} but num_stems={num_stems} (expected 1)")
        if not complement:
            return [target], False
        others = [name for name in instruments if name != target]
        name = others[0] if len(others) == 1 else f"no_{target}"
        return [target, name], True
    if complement:
        raise DemixError(f"{path}: --complement needs a single-target model (training.target_instrument)")
    if len(instruments) != num_stems:
        raise DemixError(f"{path}: training.instruments lists {len(instruments)} sources but the model has "
                         f"num_stems={num_stems}")
    return instruments, False


def import_msst(paths: tp.Sequence[Path], complement: bool = False) -> ImportedModel:
    """An MSST/UVR BS- or Mel-RoFormer: a checkpoint and its YAML configuration.

    With `complement`, a single-target model also outputs the mixture minus its target, named
    after the configuration's other instrument (e.g. `other` for instruments [vocals, other]).
    """
    state_path, config_path = _files([Path(path) for path in paths])
    config = read_msst_config(config_path)
    options = dict(config["model"])
    family = "mel_roformer" if "num_bands" in options else "bs_roformer"
    unknown = sorted(set(options) - _FAMILY_OPTIONS[family] - _IGNORED)
    if unknown:
        raise DemixError(f"{config_path}: model.{unknown[0]} is not an option of the {family} family that "
                         f"demixlab imports (options: {', '.join(sorted(_FAMILY_OPTIONS[family]))})")
    state = load_torch(state_path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise DemixError(f"{state_path}: expected a state dict (parameter name -> tensor)")
    state = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}

    audio = config.get("audio") or {}
    samplerate = int(audio.get("sample_rate", options.get("sample_rate", 44100)))
    channels = 2 if options.get("stereo", False) else 1
    num_stems = int(options.get("num_stems", 1))
    sources, residual = _sources(config, config_path, num_stems, complement)
    depth = int(options.pop("mask_estimator_depth", 2 if family == "bs_roformer" else 1))
    kwargs = {key: value for key, value in options.items() if key in _FAMILY_OPTIONS[family]}
    kwargs["mask_hidden_layers"] = depth - 1 if family == "bs_roformer" else depth
    kwargs["attention_gates"] = any(key.endswith("to_gates.weight") for key in state)
    kwargs["residual"] = residual
    kwargs.setdefault("zero_dc", False)
    chunk = audio.get("chunk_size")
    if chunk:
        kwargs["segment"] = float(chunk) / samplerate
    return ImportedModel(family=family, kwargs=kwargs, state=state, sources=sources, samplerate=samplerate,
                         audio_channels=channels, segment=kwargs.get("segment"),
                         origin={"kind": "import", "format": "msst", "file": str(state_path.resolve()),
                                 "config": str(config_path.resolve())})
