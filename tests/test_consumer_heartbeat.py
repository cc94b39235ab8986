"""``is_send_consumer_hearbeat_to_redis``: live consumers of a queue, on any broker, listed from Redis."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from funboost_like import BrokerEnum, ConfigurationError, active_consumers, task_deco
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.core.config import patch_frame_config

from .conftest import require_server, subprocess_env

REDIS_URL = "redis://127.0.0.1:6379/13"
MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE


@pytest.fixture(autouse=True)
def fast_beats() -> None:
    patch_frame_config(REDIS_URL=REDIS_URL, CONSUMER_HEARTBEAT_SECONDS=0.2)


def wait_for(condition: Any, seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_consuming_function_is_listed_by_queue_and_host_until_it_stops(queue_name: str) -> None:
    require_server("Redis", "127.0.0.1", 6379)

    @task_deco(queue_name, broker_kind=MEMORY, is_send_consumer_hearbeat_to_redis=True)
    def f(x: int) -> None:
        pass

    assert active_consumers(queue_name) == []
    f.consume()
    [record] = wait_for(lambda: active_consumers(queue_name))
    assert record["queue"] == queue_name and record["pid"] == os.getpid() and record["broker"] == "LOCAL_PYTHON_QUEUE"
    assert record["host"] == socket.gethostname() and record["interval"] == 0.2
    first_beat = record["beat_at"]
    assert any(r["id"] == record["id"] for r in active_consumers(host=socket.gethostname()))
    wait_for(lambda: active_consumers(queue_name)[0]["beat_at"] > first_beat)  # it keeps beating
    f.push(1)
    memory = get_broker(MEMORY)
    assert isinstance(memory, MemoryBroker)
    memory.join(queue_name, timeout=5)
    f.consumer.stop()
    assert f.consumer.join(10)
    assert active_consumers(queue_name) == []  # a graceful stop removes the record at once
    assert all(r["id"] != record["id"] for r in active_consumers(host=socket.gethostname()))


WORKER = """
import sys
from funboost_like import task_deco, BrokerEnum

@task_deco(sys.argv[1], broker_kind=BrokerEnum.PERSISTQUEUE, is_send_consumer_hearbeat_to_redis=True, log_level=30)
def job(x):
    pass

job.consume()
"""


def test_a_killed_consumer_drops_out_after_three_missed_beats(isolated_settings: Path, tmp_path: Path,
                                                              queue_name: str,
                                                              children: list[subprocess.Popen[bytes]]) -> None:
    require_server("Redis", "127.0.0.1", 6379)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = subprocess_env(isolated_settings, FUNBOOST_LIKE_REDIS_URL=REDIS_URL,
                         FUNBOOST_LIKE_CONSUMER_HEARTBEAT_SECONDS="0.2")
    for _ in range(2):
        children.append(subprocess.Popen([sys.executable, str(script), queue_name], env=env))
    records = wait_for(lambda: (lambda found: found if len(found) == 2 else None)(active_consumers(queue_name)))
    assert sorted(r["pid"] for r in records) == sorted(c.pid for c in children)
    assert {r["broker"] for r in records} == {"PERSISTQUEUE"}
    os.kill(children[0].pid, signal.SIGKILL)
    children[0].wait(10)
    killed_at = time.monotonic()
    [alive] = wait_for(lambda: (lambda found: found if len(found) == 1 else None)(active_consumers(queue_name)))
    assert alive["pid"] == children[1].pid
    assert time.monotonic() - killed_at < 3.0  # dead after 3 x 0.2 s without a beat, plus a reader's margin


def test_consuming_goes_on_while_redis_is_unreachable(queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    patch_frame_config(REDIS_URL=f"redis://127.0.0.1:{port}/0")
    done: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, is_send_consumer_hearbeat_to_redis=True)
    def f(x: int) -> None:
        done.append(x)

    with caplog.at_level(logging.WARNING, logger="funboost_like.heartbeat"):
        f.publish_many([{"x": i} for i in range(20)])
        f.consume()
        memory = get_broker(MEMORY)
        assert isinstance(memory, MemoryBroker)
        memory.join(queue_name, timeout=10)
        wait_for(lambda: [r for r in caplog.records if "heartbeats to Redis" in r.getMessage()])
        time.sleep(0.5)  # more failed beats: still one warning per outage
    assert sorted(done) == list(range(20))
    warnings = [r for r in caplog.records if "heartbeats to Redis" in r.getMessage()]
    assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0].getMessage()


def test_a_wrong_flag_raises_at_decoration(queue_name: str) -> None:
    with pytest.raises(ConfigurationError, match="must be True or False"):
        task_deco(queue_name, broker_kind=MEMORY, is_send_consumer_hearbeat_to_redis="yes")
    with pytest.raises(ValueError, match="either queue_name or host"):
        active_consumers()


def test_each_consumer_is_judged_by_the_interval_it_beats_at(queue_name: str) -> None:
    """A consumer beating every 20 s (another process's setting), read by a process whose setting says
    0.2 s, was taken for dead and its record deleted between its beats; and a faster consumer's beat cut
    the life of the keys they share to six of its own beats."""
    require_server("Redis", "127.0.0.1", 6379)
    from funboost_like.core.redis_connection import redis_client
    from funboost_like.middleware.heartbeat import _BEAT, queue_keys

    client = redis_client()
    beat = client.register_script(_BEAT)
    keys = queue_keys(queue_name)
    try:
        beat(keys, ["slow-host:1:a", json.dumps({"id": "slow-host:1:a", "interval": 20.0}), 120_000])
        beat(keys, ["fast-host:2:b", json.dumps({"id": "fast-host:2:b", "interval": 0.2}), 1_200])
        assert client.pttl(keys[0]) > 100_000 and client.pttl(keys[1]) > 100_000  # not cut to 1.2 s
        time.sleep(1.0)  # five of the reader's (and the fast consumer's) intervals: the fast one is dead
        assert [r["id"] for r in active_consumers(queue_name)] == ["slow-host:1:a"]
        assert client.hexists(keys[1], "slow-host:1:a") and not client.hexists(keys[1], "fast-host:2:b")
    finally:
        client.delete(*keys)
