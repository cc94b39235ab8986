"""PERSISTQUEUE consumers that crash, run side by side, or are stopped by a signal.

The child consumer is test_frame/crash/sqlite_worker.py: its function appends ``s <id> <pid>`` when a
call starts and ``d <id> <pid>`` when it ends to a record file (O_APPEND, one write per line).
"""

from __future__ import annotations

import collections
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers.registry import get_broker
from tests.conftest import REPO, subprocess_env

WORKER = REPO / "test_frame" / "crash" / "sqlite_worker.py"
GRACE = 5.0  # GRACEFUL_STOP_SECONDS given to the children

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not hasattr(signal, "SIGKILL"),
                                reason="needs POSIX signals")


@dataclass
class Record:
    """What the children wrote to the record file."""

    started: collections.Counter[int] = field(default_factory=collections.Counter)
    done: collections.Counter[int] = field(default_factory=collections.Counter)
    done_by_pid: collections.Counter[int] = field(default_factory=collections.Counter)


class RecordFile:
    """Reads the record file incrementally (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.record = Record()
        self._offset = 0

    def refresh(self) -> Record:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.record
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].decode().splitlines():
            kind, ident, pid = line.split()
            if kind == "s":
                self.record.started[int(ident)] += 1
            else:
                self.record.done[int(ident)] += 1
                self.record.done_by_pid[int(pid)] += 1
        return self.record


def publish(queue: str, total: int) -> None:
    @task_deco(queue, broker_kind=BrokerEnum.PERSISTQUEUE)
    def record(i: int) -> None:  # the same signature as the worker's function
        raise AssertionError("never run here")

    record.publish_many([{"i": i} for i in range(total)])


def start_worker(queue: str, record_path: Path, queues: Path, tmp_path: Path, *worker_args: str,
                 lease: float | None = None) -> subprocess.Popen[bytes]:
    extra = {"FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS": str(GRACE)}
    if lease is not None:
        extra["FUNBOOST_LIKE_SQLITE_LEASE_SECONDS"] = str(lease)
    log = open(tmp_path / f"worker-{time.monotonic_ns()}.log", "wb")  # a file: a full pipe never blocks it
    with log:
        return subprocess.Popen(
            [sys.executable, str(WORKER), queue, str(record_path), *worker_args],
            env=subprocess_env(queues, **extra), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        )


def worker_logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text("utf-8", "replace")[-3000:] for p in sorted(tmp_path.glob("worker-*.log")))


def wait_until(condition: Callable[[], bool], timeout: float, what: str, tmp_path: Path,
               interval: float = 0.005) -> float:
    started = time.monotonic()
    deadline = started + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\nworker logs:\n{worker_logs(tmp_path)}")
        time.sleep(interval)
    return time.monotonic() - started


def stop(child: subprocess.Popen[bytes], sig: int, tmp_path: Path) -> tuple[int, float]:
    """Send ``sig`` to a child we started; return its exit code and how long it took to exit."""
    child.send_signal(sig)
    sent = time.monotonic()
    try:
        code = child.wait(GRACE + 5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(5)
        pytest.fail(f"worker {child.pid} did not exit within {GRACE + 5:.0f}s of signal {sig}\n{worker_logs(tmp_path)}")
    return code, time.monotonic() - sent


def rows(queue: str) -> int:
    """Every row of the queue's file, leased ones included (count() leaves those out)."""
    path = get_broker(BrokerEnum.PERSISTQUEUE).path(queue)  # type: ignore[attr-defined]
    if not path.exists():
        return 0
    with closing(sqlite3.connect(path)) as conn, conn:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


def waiting(queue: str) -> int:
    return get_broker(BrokerEnum.PERSISTQUEUE).count(queue)


# -- a. SIGKILL at random moments ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sigkilled_consumers_lose_nothing(isolated_settings: Path, tmp_path: Path, queue_name: str,
                                          children: list[subprocess.Popen[bytes]]) -> None:
    total, concurrent_num, kills, lease = 3000, 20, 4, 1.0
    publish(queue_name, total)
    record_file = RecordFile(tmp_path / "record.txt")
    rng = random.Random()
    # Kill k happens once at least `threshold` calls are done: random, increasing, well before the end.
    thresholds = [300 + 450 * k + rng.randrange(0, 300) for k in range(kills)]
    progress_at_kills = []
    began = time.monotonic()
    for threshold in thresholds:
        child = start_worker(queue_name, record_file.path, isolated_settings, tmp_path,
                             "--concurrent-num", str(concurrent_num), "--sleep", "0.001", lease=lease)
        children.append(child)

        def reached(n: int = threshold, c: subprocess.Popen[bytes] = child) -> bool:
            return len(record_file.refresh().done) >= n or c.poll() is not None

        wait_until(reached, 60, f"{threshold} calls done", tmp_path, interval=0.002)
        assert child.poll() is None, f"worker exited with {child.returncode}\n{worker_logs(tmp_path)}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(5) == -signal.SIGKILL
        progress_at_kills.append(len(record_file.refresh().done))
    assert all(p < total for p in progress_at_kills), progress_at_kills  # every kill hit a running consumer

    last = start_worker(queue_name, record_file.path, isolated_settings, tmp_path,
                        "--concurrent-num", str(concurrent_num), "--sleep", "0.001", lease=lease)
    children.append(last)
    wait_until(lambda: len(record_file.refresh().done) >= total and rows(queue_name) == 0, 60,
               "every message done and acknowledged", tmp_path, interval=0.02)
    elapsed = time.monotonic() - began
    code, _ = stop(last, signal.SIGTERM, tmp_path)
    assert code in (0, -signal.SIGTERM), worker_logs(tmp_path)

    record = record_file.refresh()
    lost = set(range(total)) - set(record.done)
    executions = sum(record.done.values())
    duplicates = executions - len(record.done)
    interrupted = sum(record.started.values()) - executions  # calls killed between their two writes
    print(f"\ncrash test: {kills} SIGKILLs at {progress_at_kills} calls done; {executions} executions of {total} "
          f"messages: {duplicates} duplicate(s), {len(lost)} lost, {interrupted} call(s) cut short by a kill; "
          f"{elapsed:.1f}s")
    assert not lost, f"{len(lost)} message(s) never executed: {sorted(lost)[:20]}"
    assert set(record.done) == set(range(total))
    assert waiting(queue_name) == 0 and rows(queue_name) == 0
    # Only calls in flight at a kill (at most concurrent_num per kill: fetched, not acknowledged) may run twice;
    # each of those either had finished (a duplicate later) or was cut short (run again later, once).
    assert duplicates <= kills * concurrent_num, f"{duplicates} duplicates for {kills} kills"
    assert duplicates + interrupted <= kills * concurrent_num, (duplicates, interrupted)
    assert max(record.done.values()) <= kills + 1


# -- b. eight processes on one queue ---------------------------------------------------------------


@pytest.mark.timeout(150)
def test_eight_processes_run_each_message_exactly_once(isolated_settings: Path, tmp_path: Path, queue_name: str,
                                                       children: list[subprocess.Popen[bytes]]) -> None:
    total, processes = 20_000, 8
    began = time.monotonic()
    publish(queue_name, total)
    published = time.monotonic() - began
    record_file = RecordFile(tmp_path / "record.txt")
    for _ in range(processes):
        children.append(start_worker(queue_name, record_file.path, isolated_settings, tmp_path,
                                     "--concurrent-num", "10", "--sleep", "0"))
    consume_began = time.monotonic()
    wait_until(lambda: sum(record_file.refresh().done.values()) >= total
               or any(c.poll() is not None for c in children), 100, f"{total} calls done", tmp_path, interval=0.1)
    consumed = time.monotonic() - consume_began
    assert all(c.poll() is None for c in children), f"a worker died\n{worker_logs(tmp_path)}"
    time.sleep(0.3)  # a duplicate would show up now
    codes = []
    for child in children:
        child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            codes.append(child.wait(GRACE + 5))
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {child.pid} did not exit after SIGTERM\n{worker_logs(tmp_path)}")
    record = record_file.refresh()
    print(f"\neight processes: published {total} in {published:.1f}s, consumed in {consumed:.1f}s "
          f"({total / consumed:,.0f}/s); calls per process: {sorted(record.done_by_pid.values())}")
    assert all(code in (0, -signal.SIGTERM) for code in codes), codes
    assert set(record.done) == set(range(total))
    repeated = {i: n for i, n in record.done.items() if n != 1}
    assert not repeated, f"{len(repeated)} message(s) ran more than once: {list(repeated.items())[:20]}"
    assert len(record.done_by_pid) >= 2, "the processes did not really share the queue"
    assert waiting(queue_name) == 0 and rows(queue_name) == 0


# -- c and d. graceful stop by SIGTERM / SIGINT --------------------------------------------------------


def graceful_stop_case(sig: int, tmp_path: Path, queues: Path, queue_name: str,
                       children: list[subprocess.Popen[bytes]], *, push_in_script: bool) -> None:
    total, concurrent_num, pause = 30, 5, 0.5
    if not push_in_script:
        publish(queue_name, total)
    record_file = RecordFile(tmp_path / "record.txt")
    args = ["--concurrent-num", str(concurrent_num), "--sleep", str(pause)]
    if push_in_script:  # the seed's pattern: push, then consume() as the script's last statement
        args += ["--push", str(total)]
    child = start_worker(queue_name, record_file.path, queues, tmp_path, *args)
    children.append(child)

    def mid_run() -> bool:
        record = record_file.refresh()
        return len(record.done) >= concurrent_num and len(record.started) > len(record.done)

    wait_until(mid_run, 30, "the second wave of calls to run", tmp_path)
    running = len(record_file.refresh().started) - len(record_file.record.done)
    code, took = stop(child, sig, tmp_path)
    logs = worker_logs(tmp_path)
    assert code in (0, -sig), f"exit code {code} after signal {sig}\n{logs}"
    assert took <= pause + 2.0, f"took {took:.2f}s to stop after signal {sig}"
    assert "Traceback" not in logs and "KeyboardInterrupt" not in logs, logs

    record = record_file.refresh()
    assert record.started == record.done, "a started call did not finish"
    assert set(record.done.values()) == {1}
    remaining = waiting(queue_name)
    print(f"\nsignal {signal.Signals(sig).name}: {running} call(s) running when sent; exit code {code} after "
          f"{took:.2f}s; {len(record.done)} done + {remaining} back in the queue = {total}")
    assert len(record.done) + remaining == total
    assert rows(queue_name) == remaining  # nothing still leased to the dead process

    # The messages given back are exactly the others: a new consumer runs each of them once.
    again = start_worker(queue_name, record_file.path, queues, tmp_path, "--concurrent-num", "20", "--sleep", "0")
    children.append(again)
    wait_until(lambda: len(record_file.refresh().done) >= total and rows(queue_name) == 0, 30,
               "the remaining messages to run", tmp_path)
    code, _ = stop(again, signal.SIGTERM, tmp_path)
    assert code in (0, -signal.SIGTERM)
    record = record_file.refresh()
    assert set(record.done) == set(range(total)) and set(record.done.values()) == {1}


@pytest.mark.timeout(60)
def test_sigterm_lets_running_calls_finish_and_gives_the_rest_back(
        isolated_settings: Path, tmp_path: Path, queue_name: str, children: list[subprocess.Popen[bytes]]) -> None:
    graceful_stop_case(signal.SIGTERM, tmp_path, isolated_settings, queue_name, children, push_in_script=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_after_the_main_thread_ended(
        isolated_settings: Path, tmp_path: Path, queue_name: str, children: list[subprocess.Popen[bytes]],
        sig: int) -> None:
    """The seed's pattern (push, then consume() last): SIGINT stops it exactly as SIGTERM does."""
    graceful_stop_case(sig, tmp_path, isolated_settings, queue_name, children, push_in_script=True)
