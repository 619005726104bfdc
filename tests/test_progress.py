"""The test machinery itself: waits bounded by progress (tests/progress.py) and the detection of
processes a session leaves behind (tests/leftovers.py). Each test takes a few seconds, the last one
(a whole session) about 15."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import leftovers
from tests.progress import Stalled, run_until_stalled, started, wait_while_progressing

PYTHON = [sys.executable, "-I", "-S", "-u", "-c"]


def gone(pid: int, patience: float = 10) -> bool:
    """Whether process `pid` ends (or is a zombie) within `patience` seconds: a SIGKILL takes a moment."""
    deadline = time.monotonic() + patience
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in "ZX":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@pytest.mark.slow
def test_a_slow_but_progressing_wait_succeeds_past_the_stall_timeout(tmp_path):
    log = tmp_path / "train.log"
    done = threading.Event()

    def train():
        for step in range(20):  # 4 s in all, a line every 0.2 s
            with log.open("a") as file:
                file.write(f"step {step}\n")
            time.sleep(0.2)
        done.set()

    start = time.monotonic()
    threading.Thread(target=train, daemon=True).start()
    wait_while_progressing(done.is_set, "training", [tmp_path], stall_timeout=2)
    assert time.monotonic() - start > 3


def test_a_stalled_wait_fails_after_the_stall_timeout_naming_what_it_watched(tmp_path):
    (tmp_path / "train.log").write_text("epoch 1\n")
    start = time.monotonic()
    with pytest.raises(Stalled, match=r"stalled waiting for a second epoch: no progress for \d+ s .*train\.log"):
        wait_while_progressing(lambda: False, "a second epoch", [tmp_path / "train.log"], stall_timeout=1)
    assert time.monotonic() - start < 10


def test_a_changing_value_is_progress_too():
    values = iter(range(1000))
    start = time.monotonic()
    with pytest.raises(Stalled, match="waited 3 s for the end, still progressing"):
        wait_while_progressing(lambda: False, "the end", [lambda: next(values)], stall_timeout=1, limit=3, poll=0.05)
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_a_command_that_keeps_printing_runs_past_the_stall_timeout():
    result = run_until_stalled([*PYTHON, "import time\nfor i in range(40): print(i); time.sleep(0.1)"],
                               stall_timeout=2)
    assert result.returncode == 0 and result.stdout.split() == [str(i) for i in range(40)]


def test_a_command_that_stalls_fails_and_its_process_group_is_killed(tmp_path):
    pids = tmp_path / "pids"
    # A parent and a child, both silent; the parent prints its PIDs first.
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"open({str(pids)!r}, 'w').write(f'{{__import__(\"os\").getpid()}} {{child.pid}}')\n"
              "print('started'); time.sleep(600)")
    start = time.monotonic()
    with pytest.raises(Stalled, match=r"(?s)no progress for .*the command's output.*--- stdout \(end\) ---\nstarted"):
        run_until_stalled([*PYTHON, script], stall_timeout=2)
    assert time.monotonic() - start < 30
    for pid in map(int, pids.read_text().split()):
        assert gone(pid)


@pytest.mark.slow
def test_a_watched_folder_is_progress_for_a_silent_command(tmp_path):
    script = f"import time, pathlib\nfor i in range(20): pathlib.Path({str(tmp_path)!r}, str(i)).touch(); time.sleep(0.2)"
    assert run_until_stalled([*PYTHON, script], progress=[tmp_path], stall_timeout=2).returncode == 0
    assert len(list(tmp_path.iterdir())) == 20


def test_started_kills_the_process_group_when_the_block_fails():
    with pytest.raises(RuntimeError):
        with started([*PYTHON, "import time; time.sleep(600)"]) as running:
            pid = running.process.pid
            raise RuntimeError("the test failed")
    assert gone(pid)


def detached(*args: str, env: dict) -> int:
    """Start `sleep 600` (in Python, with `args` on its command line) in a session of its own, from a
    parent that exits at once, as daemons do; its PID."""
    spawn = ("import subprocess, sys\n"
             "print(subprocess.Popen(sys.argv[1:], start_new_session=True, stdout=subprocess.DEVNULL,\n"
             "                       stderr=subprocess.DEVNULL).pid)")
    out = subprocess.run([*PYTHON, spawn, *PYTHON, "import time; time.sleep(600)", *args], env=env,
                         capture_output=True, text=True, check=True).stdout
    return int(out)


@pytest.mark.skipif(not leftovers.supported(), reason="needs /proc")
def test_leftovers_are_the_session_s_processes_only(tmp_path):
    session = tmp_path / "session"
    unmarked = {key: value for key, value in os.environ.items() if key != leftovers.MARK}
    older = detached(f"{session}/older", env=unmarked)  # there before the session: never its
    before = leftovers.baseline()
    mark = leftovers.new_mark()
    pids = [older]
    try:
        pids.append(subprocess.Popen([*PYTHON, "import time; time.sleep(600)"]).pid)  # a descendant
        pids.append(detached("marked", env={**unmarked, leftovers.MARK: mark}))  # carries the mark
        pids.append(detached(f"--dir={session}", env=unmarked))  # names a folder of the session
        pids.append(detached(f"{session}0/x", env=unmarked))  # a folder whose name only starts alike
        pids.append(detached("marked elsewhere", env={**unmarked, leftovers.MARK: leftovers.new_mark()}))
        left = leftovers.left_behind(before, mark, [session])
        assert [process.pid for process in left] == sorted(pids[1:4]), "\n".join(map(str, left))
        assert "marked" in str(left[1]) or "marked" in str(left[2])
        leftovers.kill(left)
        assert leftovers.wait_until_gone(lambda: leftovers.left_behind(before, mark, [session])) == []
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


LEAKING_TEST = '''
import subprocess, sys


def test_that_leaks_a_process(tmp_path):
    leaked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "leaked-by-the-test"],
                              start_new_session=True)
    (tmp_path.parent.parent / "leaked.pid").write_text(str(leaked.pid))
'''


@pytest.mark.slow  # a pytest session in a subprocess, which waits 10 s for the leaked process to end
@pytest.mark.skipif(not leftovers.supported(), reason="needs /proc")
def test_a_session_that_leaves_a_process_behind_fails_naming_it_and_kills_it(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.conftest import no_process_left_behind  # noqa: F401\n")
    (tmp_path / "test_leak.py").write_text(LEAKING_TEST)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    result = run_until_stalled([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                                str(tmp_path / "base"), "test_leak.py"], cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "1 passed, 1 error" in output, output
    assert "processes started by the tests were still alive at the end of the session (killed now):" in output
    leaked = int((tmp_path / "leaked.pid").read_text())
    assert f"{leaked} " in output and "leaked-by-the-test" in output
    assert gone(leaked)
