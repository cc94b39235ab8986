"""RPC mode (seed 2.7): results kept by the consumer, read through AsyncResult; result callbacks.

Most tests run on the memory broker; one runs a consumer in another process on SQLite, and one
runs on Redis (skipped when Redis is unreachable, failing when ``CI`` is set).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from funboost_like import (
    AsyncResult,
    BrokerEnum,
    ExceptionForRequeue,
    PriorityConsumingControlConfig,
    patch_frame_config,
    task_deco,
)
from funboost_like.brokers.registry import get_broker
from funboost_like.core.errors import FunctionFailedError, ResultNotAvailable, TaskSkippedError
from funboost_like.core.results import RESULTS_NAMESPACE
from tests.conftest import REPO, require_server, subprocess_env

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE
REDIS_URL = "redis://127.0.0.1:6379/15"


def test_push_returns_an_async_result_whose_result_is_the_return_value(queue_name: str) -> None:
    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    add.consume()
    async_result = add.push(1, 2)
    assert isinstance(async_result, AsyncResult)
    assert async_result.result == 3
    assert add.push(a=10, b=20).get(timeout=10) == 30
    record = add.push(5, b=6).status_and_result
    assert record["status"] == "finished"
    assert record["result"] == 11
    assert record["result_is_repr"] is False
    assert record["exception"] is None
    assert record["attempts"] == 1
    assert record["pid"] == os.getpid()
    assert record["host"]
    assert record["duration"] >= 0
    assert abs(record["finished_at"] - time.time()) < 10
    assert record["task_id"]


def test_a_task_id_given_in_a_hand_written_extra_is_the_one_the_result_is_read_by(queue_name: str) -> None:
    """The body carried the caller's task id, but publish() returned a handle for a generated one, so
    the result was never found."""
    from funboost_like import PublishError

    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    add.consume()
    result = add.publish({"a": 1, "b": 2, "extra": {"task_id": "my-own-id-1"}})
    assert result.task_id == "my-own-id-1" and result.get(timeout=10) == 3
    [task_id] = add.publish_many([{"a": 2, "b": 2, "extra": {"task_id": "my-own-id-2"}}])
    assert task_id == "my-own-id-2" and AsyncResult(task_id, add.publisher.results_store()).get(timeout=10) == 4
    for bad in (7, ""):
        with pytest.raises(PublishError, match="task_id"):
            add.publish({"a": 1, "b": 2, "extra": {"task_id": bad}})


def test_msg_expire_seconds_is_accepted_per_message_too() -> None:
    assert PriorityConsumingControlConfig(msg_expire_seconds=3).msg_expire_senconds == 3
    with pytest.raises(ValueError, match="one option"):
        PriorityConsumingControlConfig(msg_expire_seconds=3, msg_expire_senconds=4)


def test_a_failed_call_raises_with_the_remote_exception_type(queue_name: str) -> None:
    @task_deco(queue_name, is_using_rpc_mode=True, max_retry_times=2, broker_kind=MEMORY,
               is_print_detail_exception=False)
    def divide(a: float, b: float) -> float:
        return a / b

    divide.consume()
    async_result = divide.push(1, 0)
    with pytest.raises(FunctionFailedError) as caught:
        async_result.get(timeout=10)
    assert caught.value.exception_type == "ZeroDivisionError"
    assert caught.value.exception_message == "division by zero"
    assert caught.value.task_id == async_result.task_id
    assert "ZeroDivisionError: division by zero" in str(caught.value)
    record = async_result.status_and_result  # kept on the handle; no second wait
    assert record["status"] == "failed"
    assert record["attempts"] == 3
    assert record["result"] is None
    assert record["exception"] == {"type": "ZeroDivisionError", "message": "division by zero"}
    with pytest.raises(FunctionFailedError):
        _ = async_result.result
    get_broker(MEMORY).purge_dead_letters(queue_name)


def test_rpc_mode_per_publish(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    add.consume()
    with_rpc = add.publish({"a": 10, "b": 20}, priority_control_config=PriorityConsumingControlConfig(
        is_using_rpc_mode=True))
    assert with_rpc.status_and_result["result"] == 30
    assert with_rpc.result == 30
    without = add.push(1, 2)
    started = time.monotonic()
    with pytest.raises(ResultNotAvailable):
        _ = without.result
    assert time.monotonic() - started < 0.1  # at once, not after a timeout
    # A hand-written extra asks for RPC too.
    assert add.publish({"a": 1, "b": 1, "extra": {"is_using_rpc_mode": True}}).get(timeout=10) == 2


def test_rpc_mode_can_be_turned_off_per_publish(queue_name: str) -> None:
    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    add.consume()
    off = add.publish({"a": 1, "b": 2}, PriorityConsumingControlConfig(is_using_rpc_mode=False))
    with pytest.raises(ResultNotAvailable):
        off.get()
    assert add.push(2, 2).result == 4  # processed after the first one
    assert get_broker(MEMORY).key_value_store(queue_name, RESULTS_NAMESPACE).get(off.task_id) is None


def test_non_rpc_results_raise_at_once(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    async_result = add.push(1, 2)
    started = time.monotonic()
    for action in (lambda: async_result.result, lambda: async_result.status_and_result, async_result.get,
                   async_result.is_ready, lambda: async_result.set_callback(print)):
        with pytest.raises(ResultNotAvailable, match="RPC mode"):
            action()
    assert time.monotonic() - started < 0.1
    with pytest.raises(ResultNotAvailable):
        AsyncResult("no-publisher").get()


def test_timeout(queue_name: str) -> None:
    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    async_result = add.push(1, 2)  # nobody consumes
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=async_result.task_id):
        async_result.get(timeout=0.3)
    assert 0.28 <= time.monotonic() - started < 2
    patch_frame_config(RPC_TIMEOUT_SECONDS=0.2)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        _ = async_result.result  # the default timeout is the setting
    assert 0.18 <= time.monotonic() - started < 2
    assert not async_result.is_ready()
    add.consume()
    assert async_result.get(timeout=10) == 3
    assert async_result.is_ready()


def test_results_expire_after_the_setting(queue_name: str) -> None:
    patch_frame_config(RPC_RESULT_EXPIRE_SECONDS=0.3)

    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    add.consume()
    kept = add.push(1, 2)
    kept.get(timeout=10)
    late = add.push(3, 4)
    get_broker(MEMORY).join(queue_name, timeout=10)
    time.sleep(0.4)
    with pytest.raises(TimeoutError):
        late.get(timeout=0.1)  # expired before anyone asked
    assert kept.result == 3  # a handle keeps the record it read


def test_a_result_json_cannot_hold_is_stored_as_its_repr(queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    class Point:
        def __repr__(self) -> str:
            return "Point(1, 2)"

    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY)
    def make() -> Point:
        return Point()

    make.consume()
    with caplog.at_level(logging.WARNING, logger=f"funboost_like.{queue_name}"):
        record = make.push().status_and_result
    assert record["result"] == "Point(1, 2)"
    assert record["result_is_repr"] is True
    assert record["status"] == "finished"
    assert any("repr" in r.getMessage() for r in caplog.records)


def test_a_requeued_call_stores_its_final_result_only(queue_name: str) -> None:
    runs: list[int] = []

    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY)
    def flaky(x: int) -> int:
        runs.append(x)
        if len(runs) == 1:
            raise ExceptionForRequeue()
        return x * 2

    flaky.consume()
    async_result = flaky.push(21)
    assert async_result.get(timeout=10) == 42
    assert len(runs) == 2


def test_a_skipped_call_raises_task_skipped(queue_name: str) -> None:
    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    add.consume()
    stale = add.publish({"a": 1, "b": 2, "extra": {"publish_time": time.time() - 100, "msg_expire_senconds": 5}})
    with pytest.raises(TaskSkippedError, match="expired") as caught:
        stale.get(timeout=10)
    assert caught.value.record["status"] == "skipped"
    assert "expired" in caught.value.reason


def test_set_callback_receives_the_record(queue_name: str, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    status = pytest.importorskip("funboost_like.middleware.status")
    callbacked: list[str] = []
    monkeypatch.setattr(status, "record_callbacked", lambda publisher, task_id: callbacked.append(task_id))
    records: list[dict[str, Any]] = []
    threads: list[str] = []
    done = threading.Event()

    def callback(record: dict[str, Any]) -> None:
        records.append(record)
        threads.append(threading.current_thread().name)
        if len(records) == 3:
            done.set()

    def broken(record: dict[str, Any]) -> None:
        raise RuntimeError("callback bug")

    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY, max_retry_times=0,
               is_print_detail_exception=False)
    def divide(a: int, b: int) -> float:
        return a / b

    first = divide.push(6, 3)
    first.set_callback(callback)  # before the result exists
    failing = divide.push(1, 0)
    failing.set_callback(callback)
    failing.set_callback(broken)
    divide.consume()
    assert first.get(timeout=10) == 2
    first.set_callback(callback)  # after: runs too
    with caplog.at_level(logging.ERROR, logger="funboost_like.results"):
        assert done.wait(10)
        time.sleep(0.2)
    by_task = sorted((r["task_id"], r["status"]) for r in records)
    assert by_task == sorted([(first.task_id, "finished"), (first.task_id, "finished"), (failing.task_id, "failed")])
    assert all(name.startswith("funboost_like-callback") for name in threads)
    assert any("callback bug" in (r.exc_text or "") or "failed" in r.getMessage() for r in caplog.records)
    assert sorted(callbacked) == sorted([first.task_id, first.task_id, failing.task_id])  # not after `broken`
    get_broker(MEMORY).purge_dead_letters(queue_name)


def test_a_callback_whose_result_never_comes_is_given_up(queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=MEMORY)
    def add(a: int, b: int) -> int:
        return a + b

    called: list[dict[str, Any]] = []
    with caplog.at_level(logging.WARNING, logger="funboost_like.results"):
        add.push(1, 2).set_callback(called.append, timeout=0.2)
        deadline = time.monotonic() + 5
        while not any("will not run" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert any("will not run" in r.getMessage() for r in caplog.records)
    assert called == []


_CONSUMER_SCRIPT = """
import os, sys
from funboost_like import task_deco, BrokerEnum

@task_deco(sys.argv[1], is_using_rpc_mode=True, broker_kind=BrokerEnum.PERSISTQUEUE, log_level="WARNING",
           max_retry_times=0, is_print_detail_exception=False)
def multiply(a, b):
    if b == 0:
        raise ValueError("b must not be 0")
    return {"product": a * b, "pid": os.getpid()}

multiply.consume()
print("consuming", flush=True)
"""


@pytest.mark.timeout(90)
def test_results_across_processes_on_sqlite(queue_name: str, isolated_settings: Path, tmp_path: Path) -> None:
    script = tmp_path / "rpc_consumer.py"
    script.write_text(_CONSUMER_SCRIPT)

    @task_deco(queue_name, is_using_rpc_mode=True, broker_kind=BrokerEnum.PERSISTQUEUE)
    def multiply(a: int, b: int) -> dict[str, int]:
        raise AssertionError("runs in the consumer process only")

    child = subprocess.Popen([sys.executable, str(script), queue_name], env=subprocess_env(isolated_settings),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        results = [multiply.push(n, 3) for n in range(50)]
        failed = multiply.push(1, 0)
        values = [r.get(timeout=30) for r in results]
        assert [v["product"] for v in values] == [n * 3 for n in range(50)]
        assert {v["pid"] for v in values} == {child.pid}
        with pytest.raises(FunctionFailedError, match="ValueError: b must not be 0"):
            failed.get(timeout=30)
        assert failed.status_and_result["pid"] == child.pid
        store_file = isolated_settings / f"{queue_name}@{RESULTS_NAMESPACE}.sqlite3"
        assert store_file.exists()
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
    assert child.returncode is not None


def test_rpc_on_redis() -> None:
    require_server("Redis", "127.0.0.1", 6379)
    pytest.importorskip("redis")
    patch_frame_config(REDIS_URL=REDIS_URL)
    queue = f"test_rpc_{uuid.uuid4().hex[:8]}"

    @task_deco(queue, is_using_rpc_mode=True, broker_kind=BrokerEnum.REDIS_ACK_ABLE)
    def add(a: int, b: int) -> int:
        return a + b

    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        add.consume()
        async_result = add.push(20, 22)
        assert async_result.get(timeout=20) == 42
        assert client.exists(f"fl:{{{queue}}}:results:{async_result.task_id}")
        assert client.pttl(f"fl:{{{queue}}}:results:{async_result.task_id}") > 0
        assert add.publish({"a": 1, "b": 2}, PriorityConsumingControlConfig(is_using_rpc_mode=True)).result == 3
    finally:
        add.stop()
        add.consumer.join(10)
        keys = [queue, *client.scan_iter(match=f"fl:{{{queue}}}:*", count=1000)]
        client.delete(*keys)
        client.close()


@pytest.mark.timeout(120)
def test_seed_rpc_example_runs(isolated_settings: Path) -> None:
    """test_frame/test_rpc: the seed 2.7 scripts, consumer and publisher in two processes on Redis."""
    require_server("Redis", "127.0.0.1", 6379)
    pytest.importorskip("redis")
    import redis

    env = subprocess_env(isolated_settings, FUNBOOST_LIKE_REDIS_URL=REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL)
    queue = "test_rpc_queue"
    client.delete(queue, *client.scan_iter(match=f"fl:{{{queue}}}:*", count=1000))
    consumer = subprocess.Popen([sys.executable, "-m", "test_frame.test_rpc.test_consume"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        publisher = subprocess.run([sys.executable, "-m", "test_frame.test_rpc.test_publish"], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=100)
        assert publisher.returncode == 0, publisher.stderr[-2000:]
        lines = publisher.stdout.splitlines()
        sums = [line for line in lines if not line.startswith("{")]
        records = [line for line in lines if line.startswith("{")]
        assert sums == [str(i + i * 2) for i in range(100)]
        assert len(records) == 100
        assert all("'status': 'finished'" in line for line in records)
        assert f"'result': {99 * 10 + 99 * 20}" in records[-1]
    finally:
        consumer.send_signal(signal.SIGTERM)
        try:
            consumer.wait(20)
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.wait()
        client.delete(queue, *client.scan_iter(match=f"fl:{{{queue}}}:*", count=1000))
        client.close()
