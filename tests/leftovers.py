"""Processes a test session leaves behind (read from /proc, so Linux only).

A process counts as the session's when it was not there when the session started and it is a
descendant of the pytest process, or carries the session's mark in its environment (the tests'
subprocesses inherit it, and so do daemons they start, like the local Slurm cluster and its
munged), or names the session's temporary folder in its command line or in SLURM_CONF (job
steps: slurmd passes them little of its environment besides SLURM_CONF). Other people's processes,
dora runs and test sessions included, match none of these.
"""
import os
import signal
import time
import typing as tp
import uuid
from dataclasses import dataclass
from pathlib import Path

MARK = "DEMIXLAB_TEST_SESSION"
# Helpers of the pytest interpreter itself, which end with it.
INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    start: int  # clock ticks after boot: (pid, start) names a process even when PIDs are reused
    state: str
    argv: tp.Tuple[str, ...]

    def __str__(self) -> str:
        command = " ".join(self.argv) or "?"
        return f"{self.pid} {command[:300]}"


def supported() -> bool:
    return Path("/proc/self/stat").exists()


def new_mark() -> str:
    return uuid.uuid4().hex


def processes() -> tp.Dict[int, Process]:
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        # The command name (2nd field) is in parentheses and may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2:].split()
        found[int(name)] = Process(int(name), int(fields[1]), int(fields[19]), fields[0],
                                   tuple(arg.decode(errors="replace") for arg in argv if arg))
    return found


def environment(pid: int) -> tp.List[str]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # another user's process, or ended
        return []


def baseline() -> tp.Set[tp.Tuple[int, int]]:
    """The processes alive now, which are not the session's whatever they look like."""
    return {(process.pid, process.start) for process in processes().values()}


def _descendants(root: int, table: tp.Dict[int, Process]) -> tp.Set[int]:
    children: tp.Dict[int, tp.List[int]] = {}
    for process in table.values():
        children.setdefault(process.ppid, []).append(process.pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _mentions(text: str, folder: str) -> bool:
    return text == folder or text.endswith(f"={folder}") or f"{folder}/" in text


def left_behind(before: tp.Set[tp.Tuple[int, int]], mark: str, folders: tp.Sequence[Path] = (),
                root: tp.Optional[int] = None) -> tp.List[Process]:
    """The session's processes (see the module's docstring) alive now; zombies do not count."""
    root = os.getpid() if root is None else root
    table = processes()
    descendants = _descendants(root, table)
    folders = [str(folder) for folder in folders]
    found = []
    for process in table.values():
        if process.pid == root or (process.pid, process.start) in before or process.state in "ZX":
            continue
        if process.pid in descendants:
            if process.ppid == root and any(helper in " ".join(process.argv) for helper in INTERPRETER_HELPERS):
                continue
            found.append(process)
        elif any(_mentions(arg, folder) for arg in process.argv for folder in folders):
            found.append(process)
        else:
            env = environment(process.pid)
            if f"{MARK}={mark}" in env or any(
                    entry.startswith(f"SLURM_CONF={folder}/") for entry in env for folder in folders):
                found.append(process)
    return sorted(found, key=lambda process: process.pid)


def wait_until_gone(find: tp.Callable[[], tp.List[Process]], patience: float = 10) -> tp.List[Process]:
    """`find()` once it is empty, or what it still finds once that has not changed for `patience`
    seconds: processes that are ending, a cluster stopping, may need a moment, more on a loaded
    machine."""
    found = find()
    changed = time.monotonic()
    while found and time.monotonic() - changed < patience:
        time.sleep(0.5)
        now = find()
        if now != found:
            found, changed = now, time.monotonic()
    return found


def kill(found: tp.Iterable[Process]) -> None:
    for process in found:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
