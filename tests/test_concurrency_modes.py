"""GEVENT, EVENTLET and ASYNC modes: the same decorated function, the same behaviour."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, ConcurrentModeEnum, ConfigurationError, ThreadPool, task_deco
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.core.errors import FunctionTimeoutError

from .conftest import require_server, subprocess_env

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE
GREEN_MODES = [
    pytest.param("GEVENT", "from gevent import monkey; monkey.patch_all()", id="GEVENT"),
    pytest.param("EVENTLET", "import eventlet; eventlet.monkey_patch()", id="EVENTLET"),
]


def memory() -> MemoryBroker:
    broker = get_broker(MEMORY)
    assert isinstance(broker, MemoryBroker)
    return broker


def test_async_calls_share_one_loop_and_run_concurrently(queue_name: str) -> None:
    loops: set[int] = set()
    done: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.ASYNC, concurrent_num=200)
    async def fetch(x: int) -> int:
        loops.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(0.5)
        done.append(x)
        return x

    fetch.publish_many([{"x": i} for i in range(400)])
    started = time.monotonic()
    fetch.consume()
    memory().join(queue_name, timeout=10)
    assert sorted(done) == list(range(400))
    assert len(loops) == 1  # one loop for every call, never a temporary loop per call
    assert time.monotonic() - started < 3.0  # 400 x 0.5 s with 200 in flight: about 1 s


def test_async_retries_timeouts_and_qps(queue_name: str) -> None:
    attempts: list[int] = []
    starts: list[float] = []

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.ASYNC, function_timeout=0.2,
               max_retry_times=1, qps=20, is_print_detail_exception=False)
    async def job(x: int) -> None:
        starts.append(time.monotonic())
        if x == 0:
            attempts.append(x)
            await asyncio.sleep(5)  # cancelled at the timeout

    job.publish_many([{"x": i} for i in range(20)])
    job.consume()
    with pytest.raises(FunctionTimeoutError):
        memory().join(queue_name, timeout=10)
    memory().join(queue_name, timeout=10, fail_fast=False)
    assert attempts == [0, 0]
    assert len(starts) == 21
    assert 19 / 20 * 0.85 <= max(starts) - min(starts) <= 19 / 20 * 1.5


def test_async_on_a_loop_the_user_runs(queue_name: str) -> None:
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    seen: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.ASYNC, specify_async_loop=loop)
    async def f(x: int) -> None:
        assert asyncio.get_running_loop() is loop
        seen.append(x)

    for i in range(5):
        f.push(i)
    f.consume()
    memory().join(queue_name, timeout=5)
    assert sorted(seen) == list(range(5))
    f.stop()
    f.consumer.join(5)
    assert loop.is_running()  # the user's loop is left running
    loop.call_soon_threadsafe(loop.stop)


def test_a_stopped_async_consumer_closes_the_loop_it_made_and_only_that_one(queue_name: str) -> None:
    """Each consume() and stop() of an ASYNC consumer left the event loop it had made open (its epoll
    descriptor and self-pipe until the garbage collector found it, with "ResourceWarning: unclosed event
    loop"). A loop of the user's (``specify_async_loop``) that the framework ran is stopped, never closed."""
    loops: list[asyncio.AbstractEventLoop] = []

    async def record(x: int) -> None:
        loops.append(asyncio.get_running_loop())

    f = task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.ASYNC)(record)
    for i in range(2):
        f.push(i)
        f.consume()
        memory().join(queue_name, timeout=5)
        f.stop()
        assert f.consumer.join(5)
    assert len(loops) == 2 and loops[0] is not loops[1]
    assert all(loop.is_closed() for loop in loops)

    users = asyncio.new_event_loop()
    g = task_deco(f"{queue_name}_user_loop", broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.ASYNC,
                  specify_async_loop=users)(record)
    g.push(2)
    g.consume()
    memory().join(g.queue_name, timeout=5)
    g.stop()
    assert g.consumer.join(5)
    assert loops[-1] is users and not users.is_running() and not users.is_closed()
    users.close()


def test_single_thread_runs_one_call_at_a_time_and_takes_one_message_at_a_time(queue_name: str) -> None:
    """funboost's SINGLE_THREAD (alias SOLO): one call at a time, in order, and no message taken from the
    broker while the one before it runs. ConcurrentModeEnum had no such member: funboost code with it
    raised AttributeError."""
    running: list[int] = []
    taken: list[int] = []
    order: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.SINGLE_THREAD, concurrent_num=50)
    def f(x: int) -> None:
        running.append(x)
        taken.append(memory().in_flight(queue_name))
        time.sleep(0.002)
        order.append(len(running))
        running.remove(x)

    f.publish_many([{"x": i} for i in range(30)])
    f.consume()
    memory().join(queue_name, timeout=10)
    assert order == [1] * 30 and taken == [1] * 30
    assert ConcurrentModeEnum.SOLO is ConcurrentModeEnum.SINGLE_THREAD == 5
    with pytest.raises(ConfigurationError, match="SINGLE_THREAD"):
        task_deco(f"{queue_name}_pool", broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.SINGLE_THREAD,
                  specify_concurrent_pool=ThreadPool(4))(print)


def test_mode_must_fit_the_function(queue_name: str) -> None:
    async def coroutine_function(x: int) -> None:
        pass

    def plain(x: int) -> None:
        pass

    with pytest.raises(ConfigurationError, match="use concurrent_mode=ASYNC"):
        task_deco(queue_name, broker_kind=MEMORY)(coroutine_function)
    with pytest.raises(ConfigurationError, match="is not one"):
        task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.ASYNC)(plain)


def test_gevent_without_the_monkey_patch_refuses_to_start(queue_name: str) -> None:
    pytest.importorskip("gevent")

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.GEVENT)
    def f(x: int) -> None:
        pass

    with pytest.raises(ConfigurationError, match="monkey.patch_all"):
        f.consume()


GREEN_SCRIPT = """
{patch}
import time
from funboost_like import task_deco, BrokerEnum, ConcurrentModeEnum
from funboost_like.brokers.registry import get_broker
from funboost_like.core.errors import FunctionTimeoutError

done = []

@task_deco("green_q", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_mode=ConcurrentModeEnum.{mode},
           concurrent_num=300, function_timeout=1, max_retry_times=0, is_print_detail_exception=False)
def f(x):
    time.sleep(5 if x < 0 else 0.5)  # patched sleep: cooperative; x < 0 is stopped by the timeout
    done.append(x)

f.publish_many([{{"x": i}} for i in range(300)])
f.push(-1)
started = time.monotonic()
f.consume()
broker = get_broker(BrokerEnum.LOCAL_PYTHON_QUEUE)
try:
    broker.join("green_q", timeout=20)
except FunctionTimeoutError:
    broker.join("green_q", timeout=20, fail_fast=False)
    print("TIMEOUT_STOPPED")
print("DONE", len(done), -1 in done, round(time.monotonic() - started, 2))
f.stop()
"""


def run_script(script: Path, source: str, settings_dir: Path) -> subprocess.CompletedProcess[str]:
    """Runs ``source`` as a script (warnings off) and checks that it ended well."""
    script.write_text(textwrap.dedent(source))
    proc = subprocess.run([sys.executable, "-W", "ignore", str(script)], env=subprocess_env(settings_dir),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("mode, patch", GREEN_MODES)
def test_green_modes_run_blocking_calls_concurrently(isolated_settings: Path, tmp_path: Path, mode: str,
                                                     patch: str) -> None:
    pytest.importorskip(mode.lower())
    proc = run_script(tmp_path / "green.py", GREEN_SCRIPT.format(patch=patch, mode=mode), isolated_settings)
    assert "TIMEOUT_STOPPED" in proc.stdout, proc.stdout + proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("DONE")][0]
    _, count, stuck_finished, seconds = line.split()
    assert count == "300" and stuck_finished == "False"  # the timed-out greenlet really stopped
    assert float(seconds) < 4.0  # 300 x 0.5 s sleeps at once, not one after another


GREEN_POOL_SCRIPT = """
{patch}
import time
from funboost_like import task_deco, BrokerEnum, ConcurrentModeEnum
from funboost_like.brokers.registry import get_broker

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE
fast_seen, slow_seen = [], []

@task_deco("green_fast", broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.{mode}, concurrent_num=50)
def fast(x):
    fast_seen.append(fast.consumer.worker_count)

@task_deco("green_slow", broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.{mode}, concurrent_num=100)
def slow(x):
    time.sleep(0.3)  # patched: yields
    slow_seen.append(slow.consumer.worker_count)

broker = get_broker(MEMORY)
fast.publish_many([{{"x": i}} for i in range(500)])
fast.consume()
broker.join("green_fast", timeout=20)
slow.publish_many([{{"x": i}} for i in range(100)])
started = time.monotonic()
slow.consume()
broker.join("green_slow", timeout=20)
print("FAST", len(fast_seen), max(fast_seen))
print("SLOW", len(slow_seen), max(slow_seen), round(time.monotonic() - started, 2))
fast.stop()
slow.stop()
"""


@pytest.mark.parametrize("mode, patch", GREEN_MODES)
def test_green_modes_run_calls_that_never_yield_without_a_greenlet_each(isolated_settings: Path, tmp_path: Path,
                                                                        mode: str, patch: str) -> None:
    """A greenlet was spawned for every call: trivial calls ran at a quarter of the threads mode's rate
    (memory broker: 32k/s against 128k/s). Calls that never yield now run one after another in one
    greenlet, while calls that wait still all run at once."""
    pytest.importorskip(mode.lower())
    proc = run_script(tmp_path / "green_pool.py", GREEN_POOL_SCRIPT.format(patch=patch, mode=mode), isolated_settings)
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line[:4] in ("FAST", "SLOW")}
    calls, most = lines["FAST"]
    assert calls == "500" and int(most) <= 2  # a greenlet per call made 50 of them for each batch
    calls, most, seconds = lines["SLOW"]
    assert calls == "100" and most == "100" and float(seconds) < 2.0  # 100 waits of 0.3 s at once


GREEN_STOP_SCRIPT = """
{patch}
import time
from funboost_like import task_deco, BrokerEnum, ConcurrentModeEnum

done = []

@task_deco("{queue}", broker_kind=BrokerEnum.{kind}, concurrent_mode=ConcurrentModeEnum.{mode})
def f(x):
    done.append(x)

f.consume()
f.publish_many([{{"x": i}} for i in range(5)])
deadline = time.monotonic() + 20
while len(done) < 5 and time.monotonic() < deadline:
    time.sleep(0.02)
started = time.monotonic()
f.stop()
f.consumer.join(30)
print("STOPPED", len(done), round(time.monotonic() - started, 2))
"""


@pytest.mark.parametrize("kind", ["RABBITMQ_PIKA", "RABBITMQ_AMQPSTORM"])
@pytest.mark.parametrize("mode, patch", GREEN_MODES)
def test_green_modes_stop_a_rabbitmq_consumer_at_once(isolated_settings: Path, tmp_path: Path, queue_name: str,
                                                      mode: str, patch: str, kind: str) -> None:
    """A stop pauses the consumer: it waits for the I/O greenlet to stop the server's consumer, and that wait
    must let the greenlet run (it spun until its 5 s deadline)."""
    pytest.importorskip(mode.lower())
    pytest.importorskip("amqpstorm" if kind == "RABBITMQ_AMQPSTORM" else "pika")
    pika = pytest.importorskip("pika")  # to delete the queue
    require_server("RabbitMQ", "127.0.0.1", 5672)
    script = tmp_path / "green_stop.py"
    script.write_text(textwrap.dedent(GREEN_STOP_SCRIPT.format(patch=patch, queue=queue_name, kind=kind, mode=mode)))
    try:
        proc = subprocess.run([sys.executable, "-W", "ignore", str(script)], env=subprocess_env(isolated_settings),
                              capture_output=True, text=True, timeout=60)
    finally:
        connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F"))
        connection.channel().queue_delete(queue_name)
        connection.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("STOPPED")][0]
    _, count, seconds = line.split()
    assert count == "5"
    assert float(seconds) < 3.0  # an idle fetch ends within 1 s; the pause itself takes milliseconds


REFUSED_SCRIPT = """
{patch}
from funboost_like import ConfigurationError, task_deco, BrokerEnum

try:
    task_deco("q", broker_kind=BrokerEnum.RABBITMQ_RABBITPY)(print)
except ConfigurationError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("mode, patch", GREEN_MODES)
def test_a_client_that_cannot_run_on_greenlets_is_refused_at_decoration(isolated_settings: Path, tmp_path: Path,
                                                                         mode: str, patch: str) -> None:
    """rabbitpy's I/O thread runs asyncio.run(): as greenlets of one OS thread, its second connection failed
    and the consumer reconnected forever. Refused for the green modes, and for threads the script patched."""
    pytest.importorskip(mode.lower())
    pytest.importorskip("rabbitpy")
    with pytest.raises(ConfigurationError, match="RABBITMQ_RABBITPY does not work under gevent or eventlet"):
        task_deco("q", broker_kind=BrokerEnum.RABBITMQ_RABBITPY, concurrent_mode=ConcurrentModeEnum[mode])(print)
    script = tmp_path / "refused.py"
    script.write_text(textwrap.dedent(REFUSED_SCRIPT.format(patch=patch)))
    proc = subprocess.run([sys.executable, "-W", "ignore", str(script)], env=subprocess_env(isolated_settings),
                          capture_output=True, text=True, timeout=60)
    assert "REFUSED RABBITMQ_RABBITPY does not work" in proc.stdout, proc.stdout + proc.stderr


def test_async_mode_with_rpc_and_filtering(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, concurrent_mode=ConcurrentModeEnum.ASYNC, is_using_rpc_mode=True,
               do_task_filtering=True)
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0.01)
        return a + b

    add.consume()
    assert add.push(2, 3).get(timeout=10) == 5
    assert add.push(a=2, b=3).status_and_result["status"] == "skipped"
