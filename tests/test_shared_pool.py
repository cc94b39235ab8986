"""``specify_concurrent_pool``: consumers sharing one pool, whose size caps their calls together."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from funboost_like import BrokerEnum, ConcurrentModeEnum, ConfigurationError, ThreadPool, task_deco
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker

from .conftest import subprocess_env

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE


def memory() -> MemoryBroker:
    broker = get_broker(MEMORY)
    assert isinstance(broker, MemoryBroker)
    return broker


class Gauge:
    """How many calls run at once, and the most that ever did."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.done: list[tuple[str, int]] = []

    def run(self, name: str, x: int, seconds: float) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(seconds)
        with self.lock:
            self.now -= 1
            self.done.append((name, x))


@pytest.mark.parametrize("make_pool", [lambda: ThreadPool(4), lambda: concurrent.futures.ThreadPoolExecutor(4)],
                         ids=["ThreadPool", "ThreadPoolExecutor"])
def test_consumers_sharing_a_pool_run_at_most_its_size_at_once(queue_name: str, make_pool: Any) -> None:
    pool = make_pool()
    gauge = Gauge()

    @task_deco(queue_name + "_a", broker_kind=MEMORY, specify_concurrent_pool=pool, concurrent_num=100)
    def a(x: int) -> None:
        gauge.run("a", x, 0.05)

    @task_deco(queue_name + "_b", broker_kind=MEMORY, specify_concurrent_pool=pool)
    def b(x: int) -> None:
        gauge.run("b", x, 0.05)

    assert a.params.concurrent_num == b.params.concurrent_num == 4  # the seed: the pool's size counts
    a.publish_many([{"x": i} for i in range(40)])
    b.publish_many([{"x": i} for i in range(40)])
    started = time.monotonic()
    a.consume()
    b.consume()
    memory().join(queue_name + "_a", timeout=20)
    memory().join(queue_name + "_b", timeout=20)
    elapsed = time.monotonic() - started
    assert sorted(gauge.done) == sorted([("a", i) for i in range(40)] + [("b", i) for i in range(40)])
    assert gauge.peak == 4  # never more than the pool's size across both consumers, and it was used
    assert elapsed >= 80 * 0.05 / 4 * 0.9  # both queues went through four workers


def test_stopping_one_consumer_hands_back_only_its_own_calls_and_leaves_the_pool_serving(queue_name: str) -> None:
    pool = ThreadPool(2)
    release = threading.Event()
    ran: list[tuple[str, int]] = []

    @task_deco(queue_name + "_a", broker_kind=MEMORY, specify_concurrent_pool=pool)
    def a(x: int) -> None:
        ran.append(("a", x))

    @task_deco(queue_name + "_b", broker_kind=MEMORY, specify_concurrent_pool=pool)
    def b(x: int) -> None:
        release.wait(10)
        ran.append(("b", x))

    b.publish_many([{"x": i} for i in range(3)])
    b.consume()
    wait_until(lambda: memory().in_flight(queue_name + "_b") == 2)  # both workers busy with b's calls
    a.publish_many([{"x": i} for i in range(6)])
    a.consume()
    wait_until(lambda: memory().in_flight(queue_name + "_a") == 2)  # a's calls wait for a worker

    a.consumer.stop()
    assert a.consumer.join(10)  # at once: a has no running call to wait for
    assert memory().in_flight(queue_name + "_a") == 0
    assert memory().count(queue_name + "_a") == 6  # its two waiting calls went back to its queue
    release.set()
    memory().join(queue_name + "_b", timeout=10)  # the pool still serves b
    assert sorted(ran) == [("b", 0), ("b", 1), ("b", 2)]  # and never ran a's calls it had been given


def wait_until(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_wrong_pool_raises_at_decoration(queue_name: str) -> None:
    with pytest.raises(ConfigurationError, match="ThreadPool or a concurrent.futures.ThreadPoolExecutor, got int"):
        task_deco(queue_name, broker_kind=MEMORY, specify_concurrent_pool=8)
    with pytest.raises(ConfigurationError, match="not a thread pool"):
        task_deco(queue_name, broker_kind=MEMORY, specify_concurrent_pool=concurrent.futures.ProcessPoolExecutor(2))
    with pytest.raises(ConfigurationError, match="GeventPool, got ThreadPool"):
        task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.GEVENT,
                  specify_concurrent_pool=ThreadPool(2))
    with pytest.raises(ConfigurationError, match="specify_async_loop"):
        task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.ASYNC,
                  specify_concurrent_pool=ThreadPool(2))


FORKED = """
import os, sys, threading, time
from funboost_like import task_deco, ThreadPool

POOL = ThreadPool(3)

@task_deco(sys.argv[1], specify_concurrent_pool=POOL, log_level=30)
def job(x):
    with open(sys.argv[2], "a") as f:
        f.write(f"{{x}} {{os.getpid()}}\\n")

if __name__ == "__main__":
    gate = threading.Barrier(4)
    for _ in range(3):
        POOL.submit(lambda _: gate.wait(5), None)
    while POOL.worker_count < 3:  # what a consumer's fetcher does while calls wait
        POOL.grow_if_stalled()
        time.sleep(0.01)
    gate.wait(5)
    time.sleep(0.1)  # the parent's pool has all its threads, idle, at the fork: none of them exists in a child
    job.publish_many([{{"x": i}} for i in range(200)])
    job.multi_process_consume(2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = open(sys.argv[2]).read().splitlines() if os.path.exists(sys.argv[2]) else []
        if len(lines) >= 200:
            break
        time.sleep(0.05)
    os._exit(0)
"""


def test_a_pool_made_at_module_level_serves_forked_children(isolated_settings: Path, tmp_path: Path,
                                                            queue_name: str) -> None:
    script = tmp_path / "forked.py"
    script.write_text(textwrap.dedent(FORKED.format()))
    log = tmp_path / "done.log"
    proc = subprocess.run([sys.executable, str(script), queue_name, str(log)], capture_output=True, text=True,
                          timeout=60, env=subprocess_env(isolated_settings,
                                                         FUNBOOST_LIKE_MULTI_PROCESS_START_METHOD="fork"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = log.read_text().splitlines() if log.exists() else []
    assert sorted(int(line.split()[0]) for line in lines) == list(range(200)), proc.stderr[-2000:]


GREEN = """
{patch}
import time
from funboost_like import task_deco, BrokerEnum, ConcurrentModeEnum, {pool}
from funboost_like.brokers.registry import get_broker

POOL = {pool}(5)
now = peak = 0

def body(x):
    global now, peak
    now += 1
    peak = max(peak, now)
    time.sleep(0.05)  # patched: cooperative
    now -= 1

@task_deco("green_a", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_mode=ConcurrentModeEnum.{mode},
           specify_concurrent_pool=POOL)
def a(x):
    body(x)

@task_deco("green_b", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_mode=ConcurrentModeEnum.{mode},
           specify_concurrent_pool=POOL)
def b(x):
    body(x)

a.publish_many([{{"x": i}} for i in range(50)])
b.publish_many([{{"x": i}} for i in range(50)])
a.consume()
b.consume()
broker = get_broker(BrokerEnum.LOCAL_PYTHON_QUEUE)
broker.join("green_a", timeout=20)
broker.join("green_b", timeout=20)
print("PEAK", peak)
a.stop()
b.stop()
"""


@pytest.mark.parametrize("mode, patch, pool", [
    ("GEVENT", "from gevent import monkey; monkey.patch_all()", "GeventPool"),
    ("EVENTLET", "import eventlet; eventlet.monkey_patch()", "EventletPool"),
])
def test_green_consumers_sharing_a_pool_run_at_most_its_size_at_once(isolated_settings: Path, tmp_path: Path,
                                                                     mode: str, patch: str, pool: str) -> None:
    pytest.importorskip(mode.lower())
    script = tmp_path / "green.py"
    script.write_text(textwrap.dedent(GREEN.format(patch=patch, mode=mode, pool=pool)))
    proc = subprocess.run([sys.executable, "-W", "ignore", str(script)], env=subprocess_env(isolated_settings),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PEAK 5" in proc.stdout, proc.stdout + proc.stderr
