"""Waits bounded by progress, not by the clock.

A loaded machine (a shared workstation, a cluster node, CI next to a training job) runs the
end-to-end tests several times slower than a quiet one, so a fixed number of seconds is either too
short there or needlessly long everywhere. These helpers wait as long as something advances (a file
or folder that changes, a process' output, a Slurm job's state) and fail only when nothing has for
`stall_timeout` seconds, or after one generous overall `limit`, so that a run that keeps printing
without ever ending still fails. Both can be raised for very slow machines:
DEMIXLAB_TEST_STALL_TIMEOUT (seconds, default 180) and DEMIXLAB_TEST_LIMIT (default 3600).
"""
import os
import signal
import subprocess
import tempfile
import time
import typing as tp
from contextlib import contextmanager
from pathlib import Path

STALL_TIMEOUT = float(os.environ.get("DEMIXLAB_TEST_STALL_TIMEOUT", "180"))
LIMIT = float(os.environ.get("DEMIXLAB_TEST_LIMIT", "3600"))

# What can show progress: a file or folder (any change below it), or a callable whose value changes.
Watched = tp.Union[Path, tp.Callable[[], tp.Any]]


class Stalled(AssertionError):
    """Nothing advanced for `stall_timeout` seconds (or the overall limit passed)."""


def fingerprint(item: Watched) -> tp.Any:
    """A value that changes when `item` advances: a callable's value; for a file its size and
    modification time; for a folder, the number of files below it, their total size and latest
    modification time."""
    if callable(item):
        return item()
    path = Path(item)
    if not path.is_dir():
        try:
            stat = path.stat()
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns
    count = size = latest = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:  # removed meanwhile, or a dangling link
                continue
            count, size, latest = count + 1, size + stat.st_size, max(latest, stat.st_mtime_ns)
    return count, size, latest


def describe(item: Watched, value: tp.Any) -> str:
    if not callable(item):
        return str(item)
    name = getattr(item, "__doc__", None) or getattr(item, "__name__", "?")
    return f"{name} (still {str(value)[:100]!r})"


class Progress:
    """When any of `watched` last changed; looks at most once a second (folders are walked)."""

    def __init__(self, watched: tp.Iterable[Watched], stall_timeout: tp.Optional[float] = None):
        self.watched = list(watched)
        self.stall_timeout = STALL_TIMEOUT if stall_timeout is None else stall_timeout
        self.start = self.changed = self.looked = time.monotonic()
        self.last = [fingerprint(item) for item in self.watched]

    def stalled(self) -> bool:
        now = time.monotonic()
        if now - self.looked >= min(1.0, self.stall_timeout / 4):
            self.looked = now
            current = [fingerprint(item) for item in self.watched]
            if current != self.last:
                self.last, self.changed = current, now
        return now - self.changed > self.stall_timeout

    def report(self) -> str:
        watched = ", ".join(describe(item, value) for item, value in zip(self.watched, self.last)) or "nothing"
        return (f"no progress for {time.monotonic() - self.changed:.0f} s (stall timeout {self.stall_timeout:.0f} s; "
                f"watching {watched}; {time.monotonic() - self.start:.0f} s in all)")


def wait_while_progressing(condition: tp.Callable[[], bool], what: str, progress: tp.Iterable[Watched],
                           stall_timeout: tp.Optional[float] = None, limit: tp.Optional[float] = None,
                           poll: float = 0.2) -> None:
    """Return when `condition()` holds; fail when none of `progress` changed for `stall_timeout`
    seconds, or after `limit` seconds in all. `condition` may itself fail (raise) early."""
    tracker = Progress(progress, stall_timeout)
    limit = LIMIT if limit is None else limit
    while not condition():
        if tracker.stalled():
            raise Stalled(f"stalled waiting for {what}: {tracker.report()}")
        if time.monotonic() - tracker.start > limit:
            raise Stalled(f"waited {limit:.0f} s for {what}, still progressing: giving up")
        time.sleep(poll)


class Running:
    """A command started by :func:`started`, in a session (process group) of its own, its output
    going to temporary files so that it can be watched."""

    def __init__(self, command: tp.Sequence[str], cwd=None, env=None):
        self.command = list(command)
        self._stdout, self._stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=self._stdout, stderr=self._stderr, start_new_session=True)

    def output_size(self) -> int:
        """the command's output"""
        return os.fstat(self._stdout.fileno()).st_size + os.fstat(self._stderr.fileno()).st_size

    def output(self) -> tp.Tuple[str, str]:
        texts = []
        for file in (self._stdout, self._stderr):
            file.seek(0)
            texts.append(file.read().decode(errors="replace"))
        return texts[0], texts[1]

    def wait(self, progress: tp.Iterable[Watched] = (), output_is_progress: bool = True,
             stall_timeout: tp.Optional[float] = None, limit: tp.Optional[float] = None
             ) -> subprocess.CompletedProcess:
        """Wait for the command to end while it makes progress (see :func:`run_until_stalled`)."""
        watched = [*progress, self.output_size] if output_is_progress else list(progress)
        name = " ".join(self.command[:6]) + (" ..." if len(self.command) > 6 else "")
        try:
            wait_while_progressing(lambda: self.process.poll() is not None, f"`{name}` to end", watched,
                                   stall_timeout, limit, poll=0.05)
        except Stalled as stalled:
            self.kill()
            stdout, stderr = self.output()
            raise Stalled(f"{stalled}\n--- stdout (end) ---\n{stdout[-3000:]}\n--- stderr (end) ---\n"
                          f"{stderr[-3000:]}") from None
        return subprocess.CompletedProcess(self.command, self.process.returncode, *self.output())

    def kill(self) -> None:
        """SIGKILL the whole process group (the command and whatever it started, DDP workers...)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()

    def close(self) -> None:
        self.kill()
        self._stdout.close()
        self._stderr.close()


@contextmanager
def started(command: tp.Sequence[str], cwd=None, env=None) -> tp.Iterator[Running]:
    """Start `command`; whatever happens, its process group is killed on leaving the block."""
    running = Running(command, cwd, env)
    try:
        yield running
    finally:
        running.close()


def run_until_stalled(command: tp.Sequence[str], cwd=None, env=None, progress: tp.Iterable[Watched] = (),
                      output_is_progress: bool = True, stall_timeout: tp.Optional[float] = None,
                      limit: tp.Optional[float] = None) -> subprocess.CompletedProcess:
    """Like `subprocess.run(command, capture_output=True, text=True)`, but instead of a timeout:
    fail (killing the command's process group) when neither its output nor any of `progress` changed
    for `stall_timeout` seconds, or after `limit` seconds in all. Pass `output_is_progress=False`
    for a command that prints while waiting (a monitor redrawing its table)."""
    with started(command, cwd, env) as running:
        return running.wait(progress, output_is_progress, stall_timeout, limit)
