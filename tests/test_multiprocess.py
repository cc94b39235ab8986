"""Consumers in supervised processes: run_consumer_with_multi_process and Booster.multi_process_consume.

The supervisor under test is test_frame/crash/multiprocess_worker.py, started as a real process. Its
children's function appends ``s <id> <pid>`` when a call starts and ``d <id> <pid>`` when it ends to a
record file; the supervisor writes ``supervisor <pid>`` first.
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, ConfigurationError, run_consumer_with_multi_process, task_deco
from funboost_like.brokers.registry import get_broker
from funboost_like.concurrency.forker import FORKER_NAME
from funboost_like.concurrency.multiprocess import ProcessSupervisor
from funboost_like.core.reference import BoosterReferenceError, booster_reference, resolve_booster
from tests.conftest import REPO, subprocess_env

WORKER = REPO / "test_frame" / "crash" / "multiprocess_worker.py"
GRACE = 3.0  # GRACEFUL_STOP_SECONDS given to the supervisor and its children

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(signal, "SIGKILL"),
                       reason="needs POSIX signals and /proc"),
    # Other test modules import eventlet, which warns at every fork of this process (the fork tests below).
    pytest.mark.filterwarnings("ignore:Using fork\\(\\) is a bad idea:DeprecationWarning"),
]
START_METHODS = pytest.mark.parametrize("start_method", ["fork", "spawn"])


# -- helpers --------------------------------------------------------------------------------------


class Record:
    """Reads the record file incrementally (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.supervisor = 0
        self.started: collections.Counter[int] = collections.Counter()
        self.done: collections.Counter[int] = collections.Counter()
        self.done_by_pid: collections.Counter[int] = collections.Counter()
        self._offset = 0

    def refresh(self) -> Record:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].decode().splitlines():
            kind, *fields = line.split()
            if kind == "supervisor":
                self.supervisor = int(fields[0])
            elif kind == "s":
                self.started[int(fields[0])] += 1
            else:
                self.done[int(fields[0])] += 1
                self.done_by_pid[int(fields[1])] += 1
        return self


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children_of(pid: int) -> list[int]:
    """Live children of ``pid``; multiprocessing's resource tracker (spawn) is listed too."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def descendants_of(pid: int) -> list[int]:
    """Live children of ``pid``, their children, and so on."""
    found = children_of(pid)
    return found + [grandchild for child in found for grandchild in descendants_of(child)]


def is_forker(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == FORKER_NAME
    except (FileNotFoundError, ProcessLookupError):
        return False


def consumer_children(pid: int) -> list[int]:
    """The consumer processes a supervisor in process ``pid`` runs: its children, or with fork its forker's."""
    result = []
    for child in children_of(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if is_forker(child):
            result += children_of(child)
        elif b"resource_tracker" not in cmdline:
            result.append(child)
    return sorted(result)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\nsupervisor log:\n{tail(logs)}")
        time.sleep(0.02)


def kill_one_and_see_it_replaced(proc: subprocess.Popen[bytes], log: Path, start_timeout: float) -> None:
    """Wait for the supervisor ``proc``'s two consumer children, SIGKILL one, wait for its replacement."""
    wait_until(lambda: len(consumer_children(proc.pid)) == 2, start_timeout, "two children", log)
    first = consumer_children(proc.pid)
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: len(set(consumer_children(proc.pid)) - set(first)) == 1, 15, "the killed child's replacement",
               log)


def tail(path: Path) -> str:
    return path.read_text("utf-8", "replace")[-4000:] if path.exists() else ""


def publish(queue: str, total: int) -> None:
    @task_deco(queue, broker_kind=BrokerEnum.PERSISTQUEUE)
    def record(i: int) -> None:  # the worker's signature
        raise AssertionError("never run here")

    record.publish_many([{"i": i} for i in range(total)])


def rows(queue: str) -> int:
    """Every row of the queue's file, leased ones included."""
    path = get_broker(BrokerEnum.PERSISTQUEUE).path(queue)  # type: ignore[attr-defined]
    if not path.exists():
        return 0
    with closing(sqlite3.connect(path)) as conn, conn:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


@pytest.fixture
def supervisors() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Supervisor processes a test starts; any still alive at the end is killed with its children."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            for child in descendants_of(proc.pid):
                os.kill(child, signal.SIGKILL)
            proc.kill()
            proc.wait(5)


def start_supervisor(queue: str, record: Path, queues: Path, tmp_path: Path, start_method: str, *worker_args: str,
                     lease: float | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    extra = {"FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS": str(GRACE)}
    if lease is not None:
        extra["FUNBOOST_LIKE_SQLITE_LEASE_SECONDS"] = str(lease)
    log_path = tmp_path / f"supervisor-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(WORKER), queue, str(record), "--start-method", start_method,
                                 *worker_args], env=subprocess_env(queues, **extra), stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    return proc, log_path


def stop_and_check_nothing_left(proc: subprocess.Popen[bytes], sig: int, log: Path) -> float:
    """Signal the supervisor; it must exit 0 and leave no descendant alive. Return how long it took."""
    descendants = descendants_of(proc.pid)
    proc.send_signal(sig)
    sent = time.monotonic()
    try:
        code = proc.wait(GRACE + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the supervisor did not exit after signal {sig}\n{tail(log)}")
    took = time.monotonic() - sent
    assert code == 0, f"supervisor exit code {code}\n{tail(log)}"
    wait_until(lambda: not any(alive(pid) for pid in descendants), 5, f"processes {descendants} to end", log)
    return took


# -- the supervisor in a real process ---------------------------------------------------------------


@START_METHODS
@pytest.mark.timeout(60)
def test_children_share_the_queue_and_run_each_message_once(
        isolated_settings: Path, tmp_path: Path, queue_name: str, start_method: str,
        supervisors: list[subprocess.Popen[bytes]]) -> None:
    total, processes = 3000, 3
    publish(queue_name, total)
    record = Record(tmp_path / "record.txt")
    # Calls of 5 ms: one child alone would need 1.5 s, so the others (spawn takes a while) join in.
    proc, log = start_supervisor(queue_name, record.path, isolated_settings, tmp_path, start_method,
                                 "--processes", str(processes), "--concurrent-num", "10", "--sleep", "0.005")
    supervisors.append(proc)
    wait_until(lambda: len(consumer_children(proc.pid)) == processes, 20, f"{processes} children", log)
    pids = consumer_children(proc.pid)
    wait_until(lambda: sum(record.refresh().done.values()) >= total, 40, f"{total} calls", log)
    time.sleep(0.3)  # a duplicate would show up now
    stop_and_check_nothing_left(proc, signal.SIGTERM, log)

    record.refresh()
    assert record.supervisor == proc.pid
    assert set(record.done) == set(range(total))
    repeated = {i: n for i, n in record.done.items() if n != 1}
    assert not repeated, f"{len(repeated)} message(s) ran more than once"
    assert set(record.done_by_pid) <= set(pids), "a call ran outside the supervised children"
    assert len(record.done_by_pid) >= 2, f"the children did not share the queue: {record.done_by_pid}"
    assert rows(queue_name) == 0
    assert f"with {start_method}" in tail(log)


@START_METHODS
@pytest.mark.timeout(60)
def test_sigkilled_child_is_restarted_and_no_message_is_lost(
        isolated_settings: Path, tmp_path: Path, queue_name: str, start_method: str,
        supervisors: list[subprocess.Popen[bytes]]) -> None:
    total, processes, concurrent_num = 3000, 3, 5
    publish(queue_name, total)
    record = Record(tmp_path / "record.txt")
    proc, log = start_supervisor(queue_name, record.path, isolated_settings, tmp_path, start_method,
                                 "--processes", str(processes), "--concurrent-num", str(concurrent_num),
                                 "--sleep", "0.005", lease=1.0)
    supervisors.append(proc)
    wait_until(lambda: len(record.refresh().done) >= 300, 30, "300 calls", log)
    working = [pid for pid, _ in record.done_by_pid.most_common() if pid in consumer_children(proc.pid)]
    assert working, f"no child is working\n{tail(log)}"
    victim = working[0]
    before = set(consumer_children(proc.pid))
    os.kill(victim, signal.SIGKILL)
    progress_at_kill = len(record.refresh().done)

    def replaced() -> bool:
        now = set(consumer_children(proc.pid))
        return victim not in now and len(now) == processes and bool(now - before)

    wait_until(replaced, 15, "the killed child to be replaced", log)
    wait_until(lambda: len(record.refresh().done) >= total and rows(queue_name) == 0, 40,
               "every message done and acknowledged", log)
    stop_and_check_nothing_left(proc, signal.SIGTERM, log)

    record.refresh()
    lost = set(range(total)) - set(record.done)
    duplicates = sum(record.done.values()) - len(record.done)
    assert progress_at_kill < total, "the kill came after the work was done"
    assert not lost, f"{len(lost)} message(s) lost: {sorted(lost)[:20]}"
    assert duplicates <= concurrent_num, f"{duplicates} duplicates for one kill of a child with {concurrent_num} slots"
    assert "signal SIGKILL" in tail(log) and "restarted child" in tail(log)


@pytest.mark.timeout(60)
def test_sigint_stops_children_gracefully_and_hands_the_rest_back(
        isolated_settings: Path, tmp_path: Path, queue_name: str, supervisors: list[subprocess.Popen[bytes]]) -> None:
    total, pause = 60, 0.5
    publish(queue_name, total)
    record = Record(tmp_path / "record.txt")
    proc, log = start_supervisor(queue_name, record.path, isolated_settings, tmp_path, "fork",
                                 "--processes", "2", "--concurrent-num", "3", "--sleep", str(pause))
    supervisors.append(proc)

    def mid_run() -> bool:
        record.refresh()
        return len(record.done) >= 6 and len(record.started) > len(record.done)

    wait_until(mid_run, 30, "calls to be running", log)
    took = stop_and_check_nothing_left(proc, signal.SIGINT, log)

    record.refresh()
    waiting = get_broker(BrokerEnum.PERSISTQUEUE).count(queue_name)
    assert took <= pause + GRACE, f"took {took:.1f}s to stop"
    assert record.started == record.done, "a started call did not finish"
    assert set(record.done.values()) == {1}
    assert len(record.done) + waiting == total
    assert rows(queue_name) == waiting  # nothing left leased to the stopped children
    assert "Traceback" not in tail(log), tail(log)


@pytest.mark.timeout(60)
def test_children_stop_on_their_own_when_the_supervisor_is_sigkilled(
        isolated_settings: Path, tmp_path: Path, queue_name: str, supervisors: list[subprocess.Popen[bytes]]) -> None:
    record = Record(tmp_path / "record.txt")
    proc, log = start_supervisor(queue_name, record.path, isolated_settings, tmp_path, "fork", "--processes", "2")
    supervisors.append(proc)
    wait_until(lambda: len(consumer_children(proc.pid)) == 2, 20, "2 children", log)
    pids = consumer_children(proc.pid)
    proc.kill()
    proc.wait(5)
    wait_until(lambda: not any(alive(pid) for pid in pids), 20, f"the orphaned children {pids} to stop", log)
    assert "is gone; stopping" in tail(log)


# -- the supervisor in this process -----------------------------------------------------------------


@task_deco("test_multiprocess_module_level", broker_kind=BrokerEnum.PERSISTQUEUE, concurrent_num=5)
def module_level_record(i: int) -> None:
    with open(os.environ["FUNBOOST_LIKE_TEST_RECORD"], "a") as f:
        f.write(f"d {i} {os.getpid()}\n")


def _exit_at_once() -> None:
    os._exit(3)


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.1)


def test_booster_pickles_by_reference() -> None:
    assert pickle.loads(pickle.dumps(module_level_record)) is module_level_record
    ref = booster_reference(module_level_record)
    assert ref == f"{__name__}:module_level_record"
    assert resolve_booster(ref) is module_level_record

    @task_deco("test_multiprocess_local", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def local(i: int) -> None:
        return None

    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(local)
    with pytest.raises(BoosterReferenceError, match="top level"):
        booster_reference(local)
    with pytest.raises(BoosterReferenceError):
        run_consumer_with_multi_process(local, 2, start_method="spawn")


def test_a_broker_whose_queues_live_in_one_process_is_refused_at_once() -> None:
    @task_deco("test_multiprocess_local_only", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def local(i: int) -> None:
        return None

    local.push(1)
    with pytest.raises(ConfigurationError, match="LOCAL_PYTHON_QUEUE, whose queues live in one process"):
        run_consumer_with_multi_process(local, 2, start_method="fork")
    with pytest.raises(ConfigurationError, match="PERSISTQUEUE"):
        local.multi_process_consume(1, start_method="fork")
    assert local.get_message_count() == 1  # nothing started, nothing taken
    local.clear()


def test_bad_arguments_fail_at_once() -> None:
    with pytest.raises(ValueError, match="process_num"):
        run_consumer_with_multi_process(module_level_record, 0)
    with pytest.raises(TypeError):
        run_consumer_with_multi_process(lambda i: i, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start method"):
        run_consumer_with_multi_process(module_level_record, 2, start_method="teleport")


@pytest.mark.timeout(30)
def test_multi_process_consume_returns_a_running_supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "record.txt"
    monkeypatch.setenv("FUNBOOST_LIKE_TEST_RECORD", str(record))
    total = 200
    module_level_record.clear()
    module_level_record.publish_many([{"i": i} for i in range(total)])
    supervisor = module_level_record.multi_process_consume(2, start_method="fork")
    try:
        assert supervisor.is_running and supervisor.start_method == "fork"
        pids = supervisor.pids
        assert len(pids) == 2
        deadline = time.monotonic() + 20
        while rows("test_multiprocess_module_level") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        supervisor.stop()
        assert supervisor.join(15)
    lines = record.read_text().split()
    done = collections.Counter(int(i) for i in lines[1::3])
    assert set(done) == set(range(total)) and set(done.values()) == {1}
    assert {int(p) for p in lines[2::3]} <= set(pids)
    assert not supervisor.pids and not any(alive(pid) for pid in pids)


@pytest.mark.timeout(30)
def test_a_child_that_keeps_dying_is_restarted_with_a_growing_pause() -> None:
    supervisor = ProcessSupervisor(_exit_at_once, (), 1, start_method="fork", fast_exit_seconds=5.0,
                                   backoff_base=0.2, backoff_max=0.4).start()
    try:
        time.sleep(1.6)
    finally:
        supervisor.stop()
        assert supervisor.join(10)
    # Pauses of 0.2, 0.4, 0.4, ... s: a handful of restarts, not the hundreds of a tight loop.
    assert 2 <= supervisor.restarts <= 8, supervisor.restarts


@pytest.mark.timeout(30)
def test_a_child_that_ignores_sigterm_is_killed_after_the_stop_timeout() -> None:
    supervisor = ProcessSupervisor(_ignore_sigterm, (), 2, start_method="fork", stop_timeout=0.5).start()
    deadline = time.monotonic() + 10
    while len(supervisor.pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    pids = supervisor.pids
    assert len(pids) == 2
    time.sleep(0.2)  # let the children ignore SIGTERM
    began = time.monotonic()
    supervisor.stop()
    assert supervisor.join(10)
    assert 0.4 <= time.monotonic() - began < 5
    assert not any(alive(pid) for pid in pids)


def _forever() -> None:
    while True:
        time.sleep(0.05)


@pytest.mark.timeout(30)
def test_a_killed_forker_is_replaced_and_its_children_stop(caplog: pytest.LogCaptureFixture) -> None:
    """With fork the children are a forker's (see funboost_like/concurrency/forker.py). If the forker itself
    is SIGKILLed its children stop on their own and the supervisor starts a new forker and new children."""
    supervisor = ProcessSupervisor(_forever, (), 2, start_method="fork", stop_timeout=2.0).start()
    try:
        deadline = time.monotonic() + 10
        while len(supervisor.pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        first = supervisor.pids
        forker = supervisor._forker
        assert len(first) == 2 and forker is not None and forker.process.pid is not None
        assert all(_stat(pid) is not None and int(_stat(pid)[1]) == forker.process.pid for pid in first)  # type: ignore[index]
        os.kill(forker.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (len(supervisor.pids) < 2 or set(supervisor.pids) & set(first)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(supervisor.pids) == 2 and not set(supervisor.pids) & set(first), supervisor.pids
        assert supervisor._forker is not forker
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in first)  # they saw their parent go and stopped
    finally:
        pids = supervisor.pids
        supervisor.stop()
        assert supervisor.join(10)
    assert not any(alive(pid) for pid in pids)
    assert "the forker of funboost_like-child" in caplog.text


def test_a_child_whose_supervisor_died_before_it_started_stops_too(tmp_path: Path) -> None:
    # The supervisor passes its pid, so a child whose parent is already someone else when it starts
    # (the supervisor was killed right after forking it) still notices.
    script = (
        "import os, signal, time\n"
        "from funboost_like.concurrency import multiprocess\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('stopped', flush=True), os._exit(0)))\n"
        "multiprocess._watch_supervisor(os.getppid() + 1_000_000)\n"
        "time.sleep(20)\n"
        "print('not stopped', flush=True)\n"
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], env=subprocess_env(tmp_path), capture_output=True,
                         text=True, timeout=30).stdout
    assert out.strip() == "stopped" and time.monotonic() - started < 10


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """What a failed test leaves running: the script and its children."""
    if proc.poll() is None:
        for child in descendants_of(proc.pid):
            os.kill(child, signal.SIGKILL)
        proc.kill()


def start_script_with_children(tmp_path: Path, name: str, source: str, children: int) -> subprocess.Popen[str]:
    """Runs ``source`` as a script that prints 'ready' and then has ``children`` child processes."""
    script = tmp_path / name
    script.write_text(source)
    proc = subprocess.Popen([sys.executable, str(script)], env=subprocess_env(tmp_path), stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 15
    while len(consumer_children(proc.pid)) < children and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def test_one_sigterm_stops_every_supervisor_of_the_process(tmp_path: Path) -> None:
    """A script that starts two supervisors (one in the background, one in the main thread, as a pipeline
    of two steps does) stopped only the last one's children on SIGTERM; the first one's kept running and
    the script never ended."""
    proc = start_script_with_children(tmp_path, "two_supervisors.py", (
        "import time\n"
        "from funboost_like.concurrency.multiprocess import ProcessSupervisor\n"
        "def forever():\n"
        "    while True:\n"
        "        time.sleep(0.05)\n"
        "if __name__ == '__main__':\n"
        "    first = ProcessSupervisor(forever, (), 2, start_method='fork', name='first').start()\n"
        "    second = ProcessSupervisor(forever, (), 1, start_method='fork', name='second')\n"
        "    print('ready', flush=True)\n"
        "    second.run()\n"
        "    print('first stopped:', first.join(10), flush=True)\n"), 3)
    try:
        descendants = descendants_of(proc.pid)
        assert len(consumer_children(proc.pid)) == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0 and "first stopped: True" in out
        assert not any(alive(pid) for pid in descendants)
    finally:
        kill_tree(proc)


FORKS_SCRIPT = """
import os, sys, threading
from funboost_like import BrokerEnum, task_deco

def note_fork(path=sys.argv[2]):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{os.getpid()} {threading.active_count()}\\n".encode())
    os.close(fd)

os.register_at_fork(before=note_fork)

@task_deco(sys.argv[1], broker_kind=BrokerEnum.PERSISTQUEUE)
def work(x):
    return x

if __name__ == "__main__":
    supervisor = work.multi_process_consume(2, start_method="fork")
    print("ready", flush=True)
    while not supervisor.join(0.2):  # the script's main thread goes on beside the supervising thread
        pass
"""


@pytest.mark.timeout(60)
def test_no_child_is_forked_from_a_multi_threaded_process(
        isolated_settings: Path, tmp_path: Path, queue_name: str, supervisors: list[subprocess.Popen[bytes]]) -> None:
    """``multi_process_consume`` replaced a dead child by forking from its supervising thread, beside the
    script's main thread: a lock another thread held at that moment stays held forever in the child, and
    Python 3.12+ warns "This process is multi-threaded, use of fork() may lead to deadlocks". Every child,
    first ones and replacements, is now forked by a single-threaded forker process."""
    script, forks, log = tmp_path / "forks.py", tmp_path / "forks.txt", tmp_path / "supervisor.log"
    script.write_text(FORKS_SCRIPT)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-W", "always::DeprecationWarning", str(script), queue_name,
                                 str(forks)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=subprocess_env(isolated_settings, FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS=str(GRACE)))
    supervisors.append(proc)
    kill_one_and_see_it_replaced(proc, log, 20)
    stop_and_check_nothing_left(proc, signal.SIGTERM, log)
    threads_at_fork = [int(line.split()[1]) for line in forks.read_text().splitlines()]
    assert len(threads_at_fork) >= 3 and set(threads_at_fork) == {1}, forks.read_text()
    assert "multi-threaded" not in tail(log), tail(log)


ENDING_SCRIPT = """
{patch}
import os, sys, threading, time
from funboost_like import BrokerEnum, ConcurrentModeEnum, task_deco

def note(line, path={record!r}):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (line + "\\n").encode())
    os.close(fd)

@task_deco({queue!r}, broker_kind=BrokerEnum.PERSISTQUEUE, concurrent_mode=ConcurrentModeEnum.{mode})
def record(i):
    note(f"d {{i}} {{os.getpid()}}")

if __name__ == "__main__":
    def background():
        for _ in range(20):
            note(f"{{os.getpid()}}", {background!r})
            time.sleep(0.1)

    note(f"supervisor {{os.getpid()}}")
    threading.Thread(target=background).start()
    record.multi_process_consume(2)  # the script's last line, as in the seed
"""


@pytest.mark.parametrize("mode, patch, start_method", [
    ("THREADING", "", "spawn"),
    ("GEVENT", "from gevent import monkey; monkey.patch_all()", ""),
    ("EVENTLET", "import eventlet; eventlet.monkey_patch()", ""),
], ids=["THREADING-spawn", "GEVENT", "EVENTLET"])
def test_a_script_ending_with_multi_process_consume_keeps_its_children_under_every_mode(
        isolated_settings: Path, tmp_path: Path, queue_name: str, supervisors: list[subprocess.Popen[bytes]],
        mode: str, patch: str, start_method: str) -> None:
    """A child SIGKILLed after the script's last line ran is replaced and consumes. Spawned children used to
    fail to import the script (the interpreter drops ``__main__.__file__`` when the script ends); under
    gevent and eventlet, forked children ran the parent's green threads (the supervisor's own and the
    script's), and under eventlet the script's end did not wait for the supervisor. Green threads now
    spawn by default, and only the parent runs the script's code."""
    if patch:
        pytest.importorskip(mode.lower())
    record = Record(tmp_path / "record.txt")
    script = tmp_path / "ending.py"
    background = tmp_path / "background.txt"
    script.write_text(textwrap.dedent(ENDING_SCRIPT.format(patch=patch, record=str(record.path), queue=queue_name,
                                                            mode=mode, background=str(background))))
    extra = {"FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS": str(GRACE),
             "FUNBOOST_LIKE_MULTI_PROCESS_START_METHOD": start_method}
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-W", "ignore", str(script)], stdout=out, stderr=subprocess.STDOUT,
                                env=subprocess_env(isolated_settings, **extra), cwd=tmp_path)
    supervisors.append(proc)
    kill_one_and_see_it_replaced(proc, log, 30)
    publish(queue_name, 20)
    wait_until(lambda: len(record.refresh().done) == 20, 30, "20 calls", log)
    time.sleep(1.0)  # a replacement that ran the parent's exit (eventlet and fork) would be gone by now
    assert len(consumer_children(proc.pid)) == 2 and proc.poll() is None, tail(log)
    stop_and_check_nothing_left(proc, signal.SIGTERM, log)
    assert set(map(int, background.read_text().split())) == {record.refresh().supervisor}  # in the parent only
    assert "Traceback" not in tail(log), tail(log)


SLOW_TO_STOP = """
import os, signal, sys, time
from funboost_like.concurrency.multiprocess import ProcessSupervisor

def slow_to_stop():
    def stop(*_):
        time.sleep(1.5)
        print('child stopped gracefully', flush=True)
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(0.05)

if __name__ == '__main__':
    supervisor = ProcessSupervisor(slow_to_stop, (), 2, start_method='fork')
    print('ready', flush=True)
    supervisor.run()
    print('supervisor done', flush=True)
"""


@pytest.mark.parametrize("gap, graceful", [(0.1, True), (1.0, False)], ids=["repeat", "second"])
def test_a_signal_repeated_at_once_is_the_same_one_and_a_later_second_one_kills(
        tmp_path: Path, gap: float, graceful: bool) -> None:
    """``timeout -s INT`` signals its command and the command's process group: the supervisor got the signal
    twice, took the repeat for a second Ctrl-C and SIGKILLed children that were stopping gracefully."""
    proc = start_script_with_children(tmp_path, "slow_to_stop.py", SLOW_TO_STOP, 2)
    try:
        time.sleep(0.3)  # the children's own handlers are in place
        proc.send_signal(signal.SIGINT)
        time.sleep(gap)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
        assert out.count("child stopped gracefully") == (2 if graceful else 0), out
        assert "supervisor done" in out
    finally:
        kill_tree(proc)


REPEATED_SIGNAL_CONSUMER = """
import time
from funboost_like import BrokerEnum, task_deco

@task_deco("repeated_signal", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_num=1)
def slow(x):
    print('started', flush=True)
    time.sleep(1.5)
    print('finished', flush=True)

slow.push(1)
slow.consume()
"""


def test_a_consumer_takes_a_signal_repeated_at_once_as_one(tmp_path: Path) -> None:
    """A process that got its SIGINT twice in a row exited at once (``os._exit``), cutting off its running call."""
    script = tmp_path / "consumer.py"
    script.write_text(REPEATED_SIGNAL_CONSUMER)
    proc = subprocess.Popen([sys.executable, str(script)], env=subprocess_env(tmp_path), stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
        assert "finished" in out
    finally:
        if proc.poll() is None:
            proc.kill()
