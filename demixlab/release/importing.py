"""Import weights trained by other implementations into a model repository.

Each family registers importers for the formats it reads (see :mod:`demixlab.models`); an importer
returns an :class:`~demixlab.models.contract.ImportedModel` (family, constructor options,
weights and metadata), which :func:`save_imported` turns into a normal demixlab model file
(`REPO/NAME.th`, see :mod:`demixlab.release.model_file`) with its origin recorded.
"""
import inspect
import re
import typing as tp
from pathlib import Path

from ..errors import DemixError
from ..models import ImportedModel, get_importer
from .model_file import model_from_package, package_model, save_package

PathLike = tp.Union[str, Path]


def import_model(format_name: str, paths: tp.Sequence[PathLike], **options: tp.Any) -> ImportedModel:
    """Run the importer registered for `format_name` on `paths` (files or folders) with the format's
    `options`; an option the format does not take is a :class:`DemixError` naming it."""
    importer = get_importer(format_name)
    accepted = [name for name, parameter in inspect.signature(importer).parameters.items()
                if parameter.kind is parameter.KEYWORD_ONLY or (parameter.kind is parameter.POSITIONAL_OR_KEYWORD
                                                                 and parameter.default is not parameter.empty)]
    for name in options:
        if name not in accepted:
            raise DemixError(f"{format_name}: --{name.replace('_', '-')} is not an option of this format "
                             f"(options: {', '.join(accepted) or 'none'})")
    return importer([Path(path) for path in paths], **options)


def to_package(imported: ImportedModel, *, half: bool = False) -> tp.Dict[str, tp.Any]:
    """A demixlab model file's content; the weights are checked by building the model."""
    package = package_model(imported.family, imported.kwargs, imported.state, sources=imported.sources,
                            samplerate=imported.samplerate, audio_channels=imported.audio_channels,
                            origin=imported.origin, segment=imported.segment, half=half)
    if not imported.checked:
        model_from_package(package)  # fails with a DemixError if the weights do not fit
    return package


def save_imported(imported: ImportedModel, repo: PathLike, name: str, *, half: bool = False,
                  overwrite: bool = False) -> Path:
    """Write `imported` as ``REPO/NAME.th`` (atomically) and return that path."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name) or name.endswith((".th", ".yaml")):
        raise DemixError(f"model name {name!r}: use letters, digits, '_', '-' and '.', without an extension")
    path = Path(repo) / f"{name}.th"
    if path.exists() and not overwrite:
        raise DemixError(f"{path} already exists (pass --force to replace it)")
    if (Path(repo) / f"{name}.yaml").exists():
        raise DemixError(f"{Path(repo) / (name + '.yaml')}: a bag already has the name {name!r}")
    save_package(to_package(imported, half=half), path)
    return path
