"""Atomic file writing and safe loading of torch and JSON files."""
import contextlib
import json
import os
import tempfile
import typing as tp
from pathlib import Path

import torch

from .errors import DemixError


@contextlib.contextmanager
def atomic_path(path: tp.Union[str, Path]) -> tp.Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes private files; use the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_paths(paths: tp.Sequence[tp.Union[str, Path]]) -> tp.Iterator[tp.List[Path]]:
    """:func:`atomic_path` for several files written together: temporary paths next to each;
    all are renamed onto their targets only if the block succeeds, otherwise all are removed
    (a failure midway leaves none of the new files behind)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


def check_writable_folder(folder: tp.Union[str, Path], what: str) -> None:
    """Create `folder` if needed and check that a file can be written in it; otherwise raise a
    one-line :class:`DemixError` starting with `what` (e.g. `-o out/`)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".demixlab-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DemixError(f"{what}: cannot write in the folder {folder} ({reason})") from None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj: tp.Any, path: tp.Union[str, Path]) -> None:
    """Write `obj` with `torch.save` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: tp.Union[str, Path], map_location: tp.Any = "cpu") -> tp.Any:
    """Load a torch file with `weights_only=True`: tensors and plain containers only.

    Raises :class:`DemixError` naming the file when it is missing, truncated or holds anything
    that would need unpickling arbitrary objects (nothing in the file is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise DemixError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DemixError(f"{path}: not a valid demixlab torch file ({first_line})") from None


def read_json_object(path: tp.Union[str, Path]) -> tp.Optional[tp.Dict[str, tp.Any]]:
    """The JSON object in `path`, or None when there is no such file.

    Raises :class:`DemixError` naming the file when it is unreadable or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DemixError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(content, dict):
        raise DemixError(f"{path}: expected a JSON object")
    return content
