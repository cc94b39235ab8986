"""Run every seed example of test_frame/seed_examples/ as a script and check what it prints.

Each script is the seed's code with only the import changed and time scaled down (see each
script's docstring). A test starts the script in a child process that sees the test's SQLite
folder, reads its stdout until every expected line appeared, checks the printed calls are exactly
those the example must produce (each as often as published), checks the rate where the example
sets ``qps``, then sends SIGTERM and checks the process exits in time and leaves nothing behind.
"""

from __future__ import annotations

import ast
import collections
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, BrokerNotAvailable, patch_frame_config
from funboost_like.brokers.base import Broker
from funboost_like.brokers.registry import get_broker
from tests.conftest import CI, REPO, subprocess_env
from tests.private_redis import PrivateRedis

EXAMPLES = REPO / "test_frame" / "seed_examples"
GRACE = 5.0  # GRACEFUL_STOP_SECONDS given to the children
Expected = dict[re.Pattern[str], collections.Counter[tuple[str, ...]]]  # pattern -> how often each match must appear

# One worker runs them all, in turn. The Redis seeds (2.2, 2.3) use a redis-server of their own: their fixed
# queue name would be shared with any other test session using the shared server at the same time.
pytestmark = [pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32",
                                 reason="needs POSIX signals"),
              pytest.mark.xdist_group("seed_examples")]


# Runs a script as ``__main__`` (as ``python script.py`` would) with print made atomic: print writes its
# text and its end separately, so lines printed by concurrent calls could otherwise mix on one line.
BOOTSTRAP = """
import builtins, os, runpy, sys, threading
_lock = threading.Lock()
_print = builtins.print
def _atomic_print(*args, **kwargs):
    with _lock:
        _print(*args, **kwargs)
builtins.print = _atomic_print
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(script)
runpy.run_path(script, run_name="__main__")
"""


class Script:
    """A seed example running in a child process; a thread collects its stdout with arrival times."""

    def __init__(self, name: str, env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.stderr_path = cwd / f"{name}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", BOOTSTRAP, str(EXAMPLES / name)],
                stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=cwd,
            )
        self.started = time.monotonic()
        self._text = ""
        self._ends: list[tuple[int, float]] = []  # (end offset of a chunk, when it arrived)
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            now = time.monotonic()
            with self._lock:
                self._text += chunk.decode("utf-8", "replace")
                self._ends.append((len(self._text), now))

    @property
    def text(self) -> str:
        with self._lock:
            return self._text

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace")

    def matches(self, pattern: re.Pattern[str]) -> list[tuple[tuple[str, ...], float]]:
        """Every match of ``pattern`` so far with the time its last character arrived."""
        with self._lock:
            text, ends = self._text, list(self._ends)
        found = []
        i = 0
        for m in pattern.finditer(text):
            while ends[i][0] < m.end():
                i += 1
            found.append((m.groups(), ends[i][1]))
        return found

    def wait_for(self, expected: Expected, timeout: float) -> None:
        """Until every expected match appeared (at least as often as expected), or fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            missing = {
                pattern.pattern: expected_counts - collections.Counter(g for g, _ in self.matches(pattern))
                for pattern, expected_counts in expected.items()
            }
            missing = {p: m for p, m in missing.items() if m}
            if not missing:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name}: still missing after {time.monotonic() - self.started:.1f}s "
                    f"(exit code {self.proc.returncode}): {missing}\nstdout:\n{self.text[-2000:]}\n"
                    f"stderr:\n{self.stderr[-3000:]}"
                )
            time.sleep(0.02)

    def terminate_and_wait(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        self.proc.send_signal(sig)
        sent = time.monotonic()
        try:
            code = self.proc.wait(GRACE + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            pytest.fail(f"{self.name} did not exit within {GRACE + 5:.0f}s of signal {sig}\n"
                        f"stderr:\n{self.stderr[-3000:]}")
        self._reader.join(5)
        return code, time.monotonic() - sent

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def run(name: str, queues: Path, tmp_path: Path, **extra_env: str) -> Script:
    env = subprocess_env(queues, FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS=str(GRACE), **extra_env)
    return Script(name, env, tmp_path)


def check_exact_output(script: Script, expected: Expected) -> None:
    """The printed calls are exactly the expected ones, and nothing else was printed."""
    text = script.text
    for pattern, counts in expected.items():
        got = collections.Counter(g for g, _ in script.matches(pattern))
        assert got == counts, f"{script.name}: {pattern.pattern}: unexpected {got - counts}, missing {counts - got}"
        text = pattern.sub("", text)
    assert text.strip() == "", f"{script.name} printed something unexpected: {text.strip()[:500]!r}"


def check_rate(times: Iterable[float], qps: float, name: str, *, even: bool = True) -> float:
    """Starts must be spread by the rate limit: n starts take at least about (n - 1) / qps.

    With ``even``, no two consecutive starts may come closer than 0.3 / qps either (ratelimit.py: "a
    backlog never produces a burst above the rate"). Times are when the print reached this process,
    so only slow rates (gaps of 50 ms and more) are checked this way.
    """
    ordered = sorted(times)
    span = ordered[-1] - ordered[0]
    minimum = (len(ordered) - 1) / qps
    assert span >= 0.9 * minimum, f"{name}: {len(ordered)} calls in {span:.2f}s, faster than qps={qps:g}"
    assert span <= 3 * minimum + 2.0, f"{name}: {len(ordered)} calls took {span:.2f}s, far slower than qps={qps:g}"
    if even:
        gaps = [round((b - a) * 1000, 1) for a, b in zip(ordered[:-1], ordered[1:], strict=True)]
        assert min(gaps) >= 300 / qps, (
            f"{name}: at qps={qps:g} starts should be {1000 / qps:.0f} ms apart, but two came {min(gaps)} ms apart; "
            f"gaps in ms: {gaps}"
        )
    return span


def check_graceful_exit(script: Script, sig: int = signal.SIGTERM) -> float:
    code, took = script.terminate_and_wait(sig)
    assert code in (0, -sig), f"{script.name} exited with {code} after signal {sig}\nstderr:\n{script.stderr[-3000:]}"
    assert took <= GRACE + 2, f"{script.name} took {took:.1f}s to stop"
    assert "Traceback" not in script.stderr, script.stderr[-3000:]
    return took


def sqlite_rows(broker: Broker, queue: str) -> int:
    """Every row of the queue file, including leased ones (count() leaves those out)."""
    path = broker.path(queue)  # type: ignore[attr-defined]
    with closing(sqlite3.connect(path)) as conn, conn:
        return int(conn.execute("SELECT count(*) FROM messages").fetchone()[0])


def stopped_stats(stderr: str, queue: str) -> dict[str, object]:
    """The stats dict of the consumer's ``stopped consuming queue`` log line."""
    m = re.search(rf"stopped consuming queue '{re.escape(queue)}': (\{{.*?\}})", stderr)
    assert m, f"no 'stopped consuming' line for {queue!r} in stderr:\n{stderr[-3000:]}"
    stats: dict[str, object] = ast.literal_eval(m.group(1))
    return stats


# -- 1.0.0.1 -------------------------------------------------------------------------------------

SUM = re.compile(r"(\d+) \+ (\d+) = (\d+)")


@pytest.mark.timeout(60)
def test_1_0_0_1_simple_example(isolated_settings: Path, tmp_path: Path) -> None:
    n, qps = 20, 20.0
    expected: Expected = {SUM: collections.Counter((str(i), str(2 * i), str(3 * i)) for i in range(n))}
    script = run("ex_1_0_0_1_simple.py", isolated_settings, tmp_path)
    try:
        script.wait_for(expected, timeout=20)
        time.sleep(0.3)  # a duplicate would show up now
        span = check_rate((t for _, t in script.matches(SUM)), qps, script.name)
        took = check_graceful_exit(script)
    finally:
        script.kill()
    check_exact_output(script, expected)
    broker = get_broker(BrokerEnum.PERSISTQUEUE)
    assert broker.count("task_queue_name1") == 0
    assert sqlite_rows(broker, "task_queue_name1") == 0
    print(f"1.0.0.1: {n} calls in {span:.2f}s at qps={qps:g}; stopped in {took:.2f}s")


# -- 2.1 -----------------------------------------------------------------------------------------

CONSUMING = re.compile(r"consuming this message (\d+) \+ (\d+) \.\.\.\.\.\.")
RESULT = re.compile(r"the result of computing (\d+) \+ (\d+) is (\d+)")


@pytest.mark.timeout(60)
def test_2_1_get_consumer_example(isolated_settings: Path, tmp_path: Path) -> None:
    # Something left in the queue beforehand must be cleared by the script's publisher_of_same_queue.clear().
    broker = get_broker(BrokerEnum.PERSISTQUEUE)
    broker.publish("queue_test2", b'{"a": -1, "b": -1}')
    broker.close()
    expected: Expected = {
        CONSUMING: collections.Counter((str(i), str(2 * i)) for i in range(100)),
        RESULT: collections.Counter((str(i), str(2 * i), str(3 * i)) for i in range(100)),
    }
    script = run("ex_2_1_get_consumer.py", isolated_settings, tmp_path)
    try:
        script.wait_for(expected, timeout=20)
        time.sleep(0.3)
        took = check_graceful_exit(script)
    finally:
        script.kill()
    check_exact_output(script, expected)
    assert broker.count("queue_test2") == 0
    assert sqlite_rows(broker, "queue_test2") == 0
    print(f"2.1: 100 calls; stopped in {took:.2f}s")


# -- 2.2 and 2.3 (REDIS_ACK_ABLE) ------------------------------------------------------------------

NUMBER = re.compile(r"(\d+)")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """The URL of a redis-server of this test only, stopped by its PID at the end.

    Not the shared server: the seeds' queue ``queue_test_f01`` is a fixed name, so a test session running
    these tests there at the same time (another checkout, a CI run) would purge the messages of this one
    and consume some of the rest, and both would stall.
    """
    if shutil.which("redis-server") is None:
        if CI:
            pytest.fail("the redis-server binary is not installed")
        pytest.skip("needs the redis-server binary")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = PrivateRedis(folder)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


def redis_ack_able_broker(url: str) -> Broker:
    patch_frame_config(REDIS_URL=url)
    try:
        return get_broker(BrokerEnum.REDIS_ACK_ABLE)
    except BrokerNotAvailable as exc:
        pytest.fail(f"the REDIS_ACK_ABLE broker is not available: {exc}")


# Serial: in the parallel run both stalled after a few calls in 2 CI runs of 2, most likely because another
# session ran them on the shared server at the same time (see redis_url); scripts/test.sh runs them last.
@pytest.mark.serial
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "copies"), [("ex_2_2_decorator.py", 2), ("ex_2_3_manual.py", 1)])
def test_2_2_and_2_3_redis_ack_able_examples(isolated_settings: Path, tmp_path: Path, redis_url: str, name: str,
                                             copies: int) -> None:
    broker = redis_ack_able_broker(redis_url)
    qps = 10.0
    # 2.2 publishes every call twice (add.pub and add.push), 2.3 once.
    expected: Expected = {NUMBER: collections.Counter({(str(3 * i),): copies for i in range(10, 20)})}
    script = run(name, isolated_settings, tmp_path, FUNBOOST_LIKE_REDIS_URL=redis_url)
    try:
        script.wait_for(expected, timeout=20)
        time.sleep(0.3)
        span = check_rate((t for _, t in script.matches(NUMBER)), qps, name)
        took = check_graceful_exit(script)
    finally:
        script.kill()
    check_exact_output(script, expected)
    assert broker.count("queue_test_f01") == 0
    print(f"{name}: {10 * copies} calls in {span:.2f}s at qps={qps:g}; stopped in {took:.2f}s")


# -- 2.4 -----------------------------------------------------------------------------------------

STEP1 = re.compile(r"the value of x is (\d+)")
STEP2 = re.compile(r"the value of y is (\d+)")


@pytest.mark.timeout(60)
def test_2_4_two_steps_example(isolated_settings: Path, tmp_path: Path) -> None:
    xs = [0, *range(1, 5)]  # step1(0) publishes step1(0 + i) for i in range(1, 5)
    ys = [x * 100 + j for x in xs for j in range(10)]  # every step1(x) pushes step2(x * 100 + j)
    expected: Expected = {
        STEP1: collections.Counter((str(x),) for x in xs),
        STEP2: collections.Counter((str(y),) for y in ys),
    }
    script = run("ex_2_4_two_steps.py", isolated_settings, tmp_path)
    try:
        script.wait_for(expected, timeout=20)
        time.sleep(0.3)
        span1 = check_rate((t for _, t in script.matches(STEP1)), 10.0, "step1")
        span2 = check_rate((t for _, t in script.matches(STEP2)), 60.0, "step2", even=False)
        took = check_graceful_exit(script)
    finally:
        script.kill()
    check_exact_output(script, expected)
    # LOCAL_PYTHON_QUEUE lives in the child's memory: what it left behind is read from its final stats.
    stderr = script.stderr
    step1_stats, step2_stats = stopped_stats(stderr, "queue_test_step1"), stopped_stats(stderr, "queue_test_step2")
    assert (step1_stats["succeeded"], step1_stats["failed"], step1_stats["released"]) == (len(xs), 0, 0)
    assert (step2_stats["succeeded"], step2_stats["failed"], step2_stats["released"]) == (len(ys), 0, 0)
    print(f"2.4: step1 {len(xs)} calls in {span1:.2f}s, step2 {len(ys)} calls in {span2:.2f}s; stopped in {took:.2f}s")
