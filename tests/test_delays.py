"""Delayed messages (seed 2.9): countdown, eta, misfire_grace_time and the TIMEZONE setting.

The broker holds a delayed message invisible until due (no worker thread sleeps on it), and on
SQLite it survives a consumer restart. Timing bounds are loose: two cores shared with other runs.
"""

from __future__ import annotations

import datetime
import signal
import subprocess
import sys
import time
import zoneinfo
from pathlib import Path
from typing import Any

import pytest

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, patch_frame_config, task_deco
from funboost_like.core.calls import SKIPPED
from funboost_like.core.errors import ConfigurationError
from tests.conftest import REPO, subprocess_env

EMBEDDED = [BrokerEnum.LOCAL_PYTHON_QUEUE, BrokerEnum.PERSISTQUEUE]
WORKER = REPO / "test_frame" / "crash" / "sqlite_worker.py"


def wait_for(condition: Any, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def recorder(queue: str, kind: BrokerEnum, **params: Any) -> tuple[Any, dict[int, float]]:
    """A consuming function that records when each call started (UNIX time), by its argument."""
    ran: dict[int, float] = {}

    @task_deco(queue, broker_kind=kind, **params)
    def f(x: int) -> None:
        ran[x] = time.time()

    return f, ran


# -- countdown and eta ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", EMBEDDED, ids=lambda k: k.name)
def test_countdown_runs_when_due(kind: BrokerEnum, queue_name: str) -> None:
    f, ran = recorder(queue_name, kind)
    f.consume()
    published = time.time()
    f.publish({"x": 1}, priority_control_config=PriorityConsumingControlConfig(countdown=1.0))
    time.sleep(0.4)
    assert not ran
    assert f.get_message_count() == 1  # waiting in the broker, not prefetched by the consumer
    assert wait_for(lambda: 1 in ran, 5)
    assert 0.95 <= ran[1] - published < 3.5


@pytest.mark.parametrize("kind", EMBEDDED, ids=lambda k: k.name)
def test_naive_eta_is_local_time_by_default(kind: BrokerEnum, queue_name: str) -> None:
    f, ran = recorder(queue_name, kind)
    f.consume()
    eta = datetime.datetime.now() + datetime.timedelta(seconds=1)
    f.publish({"x": 1}, priority_control_config=PriorityConsumingControlConfig(eta=eta))
    assert wait_for(lambda: 1 in ran, 5)
    assert eta.timestamp() - 0.05 <= ran[1] < eta.timestamp() + 2.5


@pytest.mark.parametrize("kind", EMBEDDED, ids=lambda k: k.name)
def test_no_worker_sleeps_on_a_delayed_message(kind: BrokerEnum, queue_name: str) -> None:
    """With a single worker, an immediate message runs while a delayed one, published first, waits."""
    f, ran = recorder(queue_name, kind, concurrent_num=1)
    before = time.time()  # the countdown runs from its own publish, at or after this
    f.publish({"x": 1}, priority_control_config=PriorityConsumingControlConfig(countdown=2.0))
    f.push(2)
    published = time.time()
    f.consume()
    assert wait_for(lambda: 2 in ran, 3)
    assert ran[2] - published < 1.0
    assert 1 not in ran and f.get_message_count() == 1
    assert wait_for(lambda: 1 in ran, 6)
    assert ran[1] - before >= 1.95
    assert f.consumer.worker_count <= 1


# -- survival across a consumer restart (SQLite) --------------------------------------------------------


def start_worker(queue: str, record: Path, queues: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, str(WORKER), queue, str(record), "--concurrent-num", "2"],
                                env=subprocess_env(queues, FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS="5"),
                                stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
def test_delayed_message_survives_a_consumer_restart(isolated_settings: Path, tmp_path: Path, queue_name: str,
                                                      children: list[subprocess.Popen[bytes]]) -> None:
    record, first_log, second_log = tmp_path / "record.txt", tmp_path / "first.log", tmp_path / "second.log"

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def record_call(i: int) -> None:  # the worker's signature; runs only in the worker processes
        raise AssertionError("never run here")

    first = start_worker(queue_name, record, isolated_settings, first_log)
    children.append(first)
    assert wait_for(lambda: b"ready" in first_log.read_bytes(), 20), first_log.read_text()
    due = time.time() + 5.0
    record_call.publish({"i": 7}, priority_control_config=PriorityConsumingControlConfig(countdown=5.0))
    time.sleep(0.5)  # the first consumer is fetching, and must leave the delayed message alone
    first.send_signal(signal.SIGTERM)
    assert first.wait(15) in (0, -signal.SIGTERM), first_log.read_text()
    assert time.time() < due, "the first consumer took too long to stop; the test proves nothing"
    assert lines(record) == []
    assert record_call.get_message_count() == 1  # still in the queue file, still delayed

    second = start_worker(queue_name, record, isolated_settings, second_log)
    children.append(second)
    assert wait_for(lambda: len(lines(record)) >= 2, 20, interval=0.02), second_log.read_text()
    seen = time.time()
    assert seen >= due - 0.05
    assert lines(record) == [["s", "7", str(second.pid)], ["d", "7", str(second.pid)]]
    second.send_signal(signal.SIGTERM)
    assert second.wait(15) in (0, -signal.SIGTERM)
    assert record_call.get_message_count() == 0


# -- TIMEZONE ---------------------------------------------------------------------------------------


def a_zone_far_from_local() -> str:
    """A zone whose offset now differs from the machine's by several hours."""
    local = datetime.datetime.now().astimezone().utcoffset() or datetime.timedelta(0)
    for name in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14, UTC-11, no daylight saving
        offset = datetime.datetime.now(zoneinfo.ZoneInfo(name)).utcoffset() or datetime.timedelta(0)
        if abs(offset - local) >= datetime.timedelta(hours=5):
            return name
    raise AssertionError("unreachable: the two zones are 25 hours apart")


def test_naive_eta_is_read_in_the_timezone_setting() -> None:
    eta = datetime.datetime(2030, 1, 2, 3, 4, 5)
    config = PriorityConsumingControlConfig(eta=eta)
    assert config.not_before(0.0) == eta.timestamp()  # TIMEZONE "" : the machine's local time
    patch_frame_config(TIMEZONE="Asia/Shanghai")
    assert config.not_before(0.0) == datetime.datetime(2030, 1, 1, 19, 4, 5, tzinfo=datetime.timezone.utc).timestamp()
    aware = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    assert PriorityConsumingControlConfig(eta=aware).not_before(0.0) == aware.timestamp()  # taken as is
    patch_frame_config(TIMEZONE="Mars/Olympus_Mons")
    with pytest.raises(ConfigurationError, match="TIMEZONE"):
        config.not_before(0.0)


def test_naive_eta_in_a_far_timezone_runs_on_time(queue_name: str) -> None:
    zone = a_zone_far_from_local()
    patch_frame_config(TIMEZONE=zone)
    f, ran = recorder(queue_name, BrokerEnum.LOCAL_PYTHON_QUEUE)
    f.consume()
    eta = datetime.datetime.now(zoneinfo.ZoneInfo(zone)).replace(tzinfo=None) + datetime.timedelta(seconds=1)
    published = time.time()
    f.publish({"x": 1}, priority_control_config=PriorityConsumingControlConfig(eta=eta))
    assert wait_for(lambda: 1 in ran, 5)  # read as local time, it would be hours early or late
    assert 0.9 <= ran[1] - published < 3.0


# -- misfire_grace_time ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", EMBEDDED, ids=lambda k: k.name)
def test_misfire_grace_time_drops_a_late_message_and_runs_an_on_time_one(kind: BrokerEnum, queue_name: str) -> None:
    f, ran = recorder(queue_name, kind)
    now = datetime.datetime.now()
    late = PriorityConsumingControlConfig(eta=now - datetime.timedelta(seconds=5), misfire_grace_time=1)
    in_grace = PriorityConsumingControlConfig(eta=now - datetime.timedelta(seconds=5), misfire_grace_time=30)
    on_time = PriorityConsumingControlConfig(countdown=0.5, misfire_grace_time=1)
    f.publish({"x": 1}, priority_control_config=late)
    f.publish({"x": 2}, priority_control_config=in_grace)
    f.publish({"x": 3}, priority_control_config=on_time)
    f.consume()
    assert wait_for(lambda: 2 in ran and 3 in ran, 5)
    assert wait_for(lambda: f.consumer.stats.counts[SKIPPED] == 1, 2)
    assert 1 not in ran
    assert f.get_message_count() == 0  # the dropped message is gone, not waiting


def test_seed_2_9_publish_patterns(queue_name: str) -> None:
    """The five publish calls of seed 2.9, with its 2021 date replaced by "now + seconds"."""
    f, ran = recorder(queue_name, BrokerEnum.LOCAL_PYTHON_QUEUE)
    f.consume()
    start = datetime.datetime.now() + datetime.timedelta(seconds=1)
    published = time.time()
    for i in range(1, 3):
        f.publish({"x": i}, priority_control_config=PriorityConsumingControlConfig(countdown=1))
        f.publish({"x": i * 10}, priority_control_config=PriorityConsumingControlConfig(
            eta=start + datetime.timedelta(seconds=i)))
        f.publish({"x": i * 100}, priority_control_config=PriorityConsumingControlConfig(
            countdown=1, misfire_grace_time=30))
        f.publish({"x": i * 1000}, priority_control_config=PriorityConsumingControlConfig(
            eta=start + datetime.timedelta(seconds=i), misfire_grace_time=30))
        f.publish({"x": i * 10000}, priority_control_config=PriorityConsumingControlConfig(
            eta=start + datetime.timedelta(seconds=i), misfire_grace_time=100000000))
    expected = {i * m for i in range(1, 3) for m in (1, 10, 100, 1000, 10000)}
    assert wait_for(lambda: set(ran) == expected, 8), sorted(ran)
    for x, at in ran.items():
        i = x // 10 ** (len(str(x)) - 1)
        due = published + 1 if x in (i, i * 100) else (start + datetime.timedelta(seconds=i)).timestamp()
        assert at >= due - 0.05, (x, at - due)


def test_countdown_and_eta_are_exclusive() -> None:
    with pytest.raises(ConfigurationError):
        PriorityConsumingControlConfig(countdown=1, eta=datetime.datetime.now())
    with pytest.raises(ConfigurationError):
        PriorityConsumingControlConfig(countdown=1, misfire_grace_time=0.5)
