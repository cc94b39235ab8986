"""Task filtering (seed 1.0.1): identical calls that already succeeded are skipped.

Consumers here run one call at a time (``concurrent_num=1``), so each call's filter decision sees
every earlier call's outcome and the tests are deterministic.
"""

from __future__ import annotations

import inspect
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from funboost_like import Booster, BrokerEnum, PriorityConsumingControlConfig, patch_frame_config, task_deco
from funboost_like.brokers.registry import get_broker
from funboost_like.core.errors import TaskSkippedError
from funboost_like.middleware.filtering import FILTER_NAMESPACE, SKIP_REASON, filter_key
from tests.conftest import REPO, require_server, subprocess_env

EMBEDDED = pytest.mark.parametrize("broker_kind", [BrokerEnum.LOCAL_PYTHON_QUEUE, BrokerEnum.PERSISTQUEUE],
                                   ids=["memory", "sqlite"])
REDIS_URL = "redis://127.0.0.1:6379/15"


def settle(booster: Booster[Any, Any], total: int, timeout: float = 20) -> dict[str, Any]:
    """Wait until ``total`` messages reached their outcome; return the consumer's counts."""
    stats = booster.consumer.stats
    deadline = time.monotonic() + timeout
    while sum(stats.counts) < total:
        assert time.monotonic() < deadline, f"only {stats.as_dict()} of {total} settled"
        time.sleep(0.02)
    return stats.as_dict()


# -- the key -------------------------------------------------------------------------------------------


def test_filter_key_ignores_how_arguments_are_written() -> None:
    def f(a: int, b: int = 2, *, c: str = "x", **more: Any) -> None: ...

    signature = inspect.signature(f)

    def key(**kwargs: Any) -> str:
        return filter_key(signature, kwargs)

    same = key(a=1)
    assert key(a=1, b=2) == same
    assert key(b=2, a=1, c="x") == same
    assert key(c="x", a=1) == same
    assert key(a=1, b=3) != same
    assert key(a="1") != same
    assert key(a=1, z=1, y=2) == key(y=2, a=1, z=1)
    assert key(a=1, z=1) != same
    assert key(a={"p": 1, "q": [1, 2]}) == key(a={"q": [1, 2], "p": 1})
    assert len(same) == 40  # sha1 hex


def test_filter_key_of_a_single_dict_message() -> None:
    assert filter_key(None, {"x": 1, "y": 2}) == filter_key(None, {"y": 2, "x": 1})
    assert filter_key(None, {"x": 1}) != filter_key(None, {"x": 1, "y": None})


# -- behaviour on the embedded brokers -------------------------------------------------------------------


@EMBEDDED
def test_identical_calls_are_filtered(queue_name: str, broker_kind: int) -> None:
    runs: list[tuple[int, int, str]] = []

    @task_deco(queue_name, do_task_filtering=True, concurrent_num=1, broker_kind=broker_kind)
    def f(a: int, b: int = 2, c: str = "x") -> None:
        runs.append((a, b, c))

    f.consume()
    f.push(1)
    f.push(a=1)
    f.push(1, 2)
    f.push(b=2, a=1)
    f.push(1, c="x", b=2)
    f.pub({"c": "x", "a": 1})
    f.push(2)  # different: runs
    f.push(1, 3)  # different: runs
    f.push(1, c="y")  # different: runs
    stats = settle(f, 9)
    assert runs == [(1, 2, "x"), (2, 2, "x"), (1, 3, "x"), (1, 2, "y")]
    assert stats["succeeded"] == 4
    assert stats["skipped"] == 5
    f.push(2)
    assert settle(f, 10)["skipped"] == 6


@EMBEDDED
def test_a_failed_call_is_not_recorded_so_it_runs_again(queue_name: str, broker_kind: int) -> None:
    runs: list[int] = []

    @task_deco(queue_name, do_task_filtering=True, concurrent_num=1, max_retry_times=0, broker_kind=broker_kind,
               is_print_detail_exception=False)
    def f(x: int) -> None:
        runs.append(x)
        if len(runs) == 1:
            raise RuntimeError("first run fails")

    f.consume()
    f.push(7)  # fails: not recorded
    f.push(7)  # runs, succeeds: recorded
    f.push(7)  # filtered
    stats = settle(f, 3)
    assert runs == [7, 7]
    assert (stats["failed"], stats["succeeded"], stats["skipped"]) == (1, 1, 1)
    get_broker(broker_kind).purge_dead_letters(queue_name)


@EMBEDDED
def test_the_filter_expires(queue_name: str, broker_kind: int) -> None:
    runs: list[int] = []

    @task_deco(queue_name, do_task_filtering=True, task_filtering_expire_seconds=0.5, concurrent_num=1,
               broker_kind=broker_kind)
    def f(x: int) -> None:
        runs.append(x)

    f.consume()
    f.push(1)
    f.push(1)
    settle(f, 2)
    assert runs == [1]
    time.sleep(0.7)
    f.push(1)
    settle(f, 3)
    assert runs == [1, 1]


def test_expire_seconds_zero_keeps_the_filter_forever(queue_name: str, isolated_settings: Path) -> None:
    @task_deco(queue_name, do_task_filtering=True, broker_kind=BrokerEnum.PERSISTQUEUE)
    def forever(x: int) -> None: ...

    @task_deco(queue_name + "_brief", do_task_filtering=True, task_filtering_expire_seconds=60,
               broker_kind=BrokerEnum.PERSISTQUEUE)
    def brief(x: int) -> None: ...

    for booster in (forever, brief):
        booster.consume()
        booster.push(1)
        settle(booster, 1)
    key = filter_key(inspect.signature(forever.consuming_function), {"x": 1})
    for booster, expected in ((forever, None), (brief, pytest.approx(time.time() + 60, abs=10))):
        path = isolated_settings / f"{booster.queue_name}@{FILTER_NAMESPACE}.sqlite3"
        with closing(sqlite3.connect(path)) as conn, conn:
            assert conn.execute("SELECT expires_at FROM kv WHERE key = ?", (key,)).fetchall() == [(expected,)]


_CONSUMER = """
import sys
from funboost_like import task_deco, BrokerEnum

@task_deco(sys.argv[1], do_task_filtering=True, concurrent_num=1, log_level="WARNING")
def f(x):
    print("ran", x, flush=True)

f.consume()
f.push(1)
f.push(1)
f.push(2)
import time
deadline = time.time() + 20
while sum(f.consumer.stats.counts) < 3 and time.time() < deadline:
    time.sleep(0.02)
f.stop()
"""


def test_the_filter_is_shared_by_processes_on_sqlite(queue_name: str, isolated_settings: Path) -> None:
    env = subprocess_env(isolated_settings)
    outputs = [subprocess.run([sys.executable, "-c", _CONSUMER, queue_name], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60) for _ in range(2)]
    assert [o.returncode for o in outputs] == [0, 0], outputs[0].stderr[-2000:]
    assert outputs[0].stdout.split("\n")[:2] == ["ran 1", "ran 2"]
    assert "ran" not in outputs[1].stdout  # the second process finds both filtered


def test_a_filtered_rpc_call_raises_task_skipped(queue_name: str) -> None:
    @task_deco(queue_name, do_task_filtering=True, concurrent_num=1, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def f(x: int) -> int:
        return x + 1

    f.consume()
    rpc = PriorityConsumingControlConfig(is_using_rpc_mode=True)
    assert f.publish({"x": 1}, rpc).get(timeout=10) == 2
    with pytest.raises(TaskSkippedError) as caught:
        f.publish({"x": 1}, rpc).get(timeout=10)
    assert caught.value.reason == SKIP_REASON


def test_filtering_on_redis() -> None:
    require_server("Redis", "127.0.0.1", 6379)
    pytest.importorskip("redis")
    import redis

    patch_frame_config(REDIS_URL=REDIS_URL)
    queue = f"test_filter_{uuid.uuid4().hex[:8]}"
    runs: list[int] = []

    @task_deco(queue, do_task_filtering=True, task_filtering_expire_seconds=30, concurrent_num=1,
               broker_kind=BrokerEnum.REDIS_ACK_ABLE)
    def f(x: int) -> None:
        runs.append(x)

    client = redis.Redis.from_url(REDIS_URL)
    try:
        f.consume()
        f.push(1)
        f.push(x=1)
        f.push(2)
        settle(f, 3)
        assert runs == [1, 2]
        key = filter_key(inspect.signature(f.consuming_function), {"x": 1})
        assert 0 < client.pttl(f"fl:{{{queue}}}:{FILTER_NAMESPACE}:{key}") <= 30_000
    finally:
        f.stop()
        f.consumer.join(10)
        client.delete(queue, *client.scan_iter(match=f"fl:{{{queue}}}:*", count=1000))
        client.close()


def test_filtering_demo_runs(isolated_settings: Path) -> None:
    demo = REPO / "test_frame" / "test_filtering" / "demo.py"
    proc = subprocess.run([sys.executable, str(demo)], env=subprocess_env(isolated_settings), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("querying the weather of shenzhen tomorrow") == 2
    assert "ran 3 queries, filtered 3" in proc.stdout
