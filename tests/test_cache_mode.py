"""Cache mode (seed 002's ``use_cache``): arguments JSON cannot carry reach a consumer in the same process
by reference; elsewhere the message is dead-lettered with the reason, and nothing is lost."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import pytest

from funboost_like import BrokerEnum, ExceptionForRequeue, PriorityConsumingControlConfig, PublishError, task_deco
from funboost_like.brokers.registry import get_broker
from funboost_like.core import arg_cache

from .conftest import in_forked_child

KINDS = pytest.mark.parametrize("kind", [BrokerEnum.LOCAL_PYTHON_QUEUE, BrokerEnum.PERSISTQUEUE],
                                ids=["memory", "sqlite"])


class Received:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.event = threading.Event()

    def add(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        self.event.set()

    def wait(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            assert time.monotonic() < deadline, f"{len(self.calls)} of {n} calls ran"
            self.event.wait(0.05)
            self.event.clear()
        return self.calls


@KINDS
def test_the_function_gets_the_very_objects_pushed(kind: BrokerEnum, queue_name: str) -> None:
    got = Received()

    @task_deco(queue_name, broker_kind=kind, use_cache=True)
    def handle(lock: Any, n: int) -> None:
        got.add(lock=lock, n=n)

    lock = threading.Lock()
    handle.push(lock, 5)
    [body] = [d.body for d in get_broker(kind).fetch(queue_name, 1, 1.0)]  # what travelled: n, not the lock
    message = json.loads(body)
    assert message["n"] == 5 and "lock" not in message and message["extra"]["cached"]["names"] == ["lock"]
    handle.push(lock, 6)
    handle.publish_many([{"lock": lock, "n": 7}])
    handle.consume()
    calls = got.wait(2)
    assert sorted(c["n"] for c in calls) == [6, 7] and all(c["lock"] is lock for c in calls)
    handle.stop()


def test_one_message_in_cache_mode_on_a_function_without_it(queue_name: str) -> None:
    got = Received()

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def handle(conn: Any) -> None:
        got.add(conn=conn)

    conn = object()
    cached_before = arg_cache.size()
    with pytest.raises(PublishError, match="use_cache=True"):
        handle.push(conn)  # a clear error at once, saying what would work
    handle.publish({"conn": conn}, PriorityConsumingControlConfig(use_cache=True))
    handle.consume()
    assert got.wait(1)[0]["conn"] is conn
    handle.stop()
    assert arg_cache.size() == cached_before  # taken out by the run


def test_a_requeued_message_gets_its_objects_again(queue_name: str) -> None:
    got = Received()
    runs: list[int] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE, use_cache=True)
    def handle(conn: Any) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise ExceptionForRequeue("not yet")
        got.add(conn=conn)

    conn = object()
    handle.push(conn)
    handle.consume()
    assert got.wait(1)[0]["conn"] is conn and len(runs) == 2
    handle.stop()


def test_a_consumer_in_another_process_dead_letters_it_saying_why(queue_name: str) -> None:
    ran = Received()

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def handle(conn: Any = None, n: int = 0) -> None:
        ran.add(n=n)

    # What another process published in cache mode: its key names that process.
    foreign = {"n": 1, "extra": {"task_id": "t1", "cached": {"key": "elsewhere:123:abcd#0", "names": ["conn"]}}}
    handle.publish(foreign)
    handle.push(n=2)  # the consumer keeps running after the bad one
    handle.consume()
    assert ran.wait(1) == [{"n": 2}]
    broker = get_broker(BrokerEnum.PERSISTQUEUE)
    deadline = time.monotonic() + 5
    while not broker.list_dead_letters(queue_name):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    [letter] = broker.list_dead_letters(queue_name)
    assert "exist only there" in letter.reason and "elsewhere:123" in letter.reason
    assert json.loads(letter.body)["n"] == 1  # kept, not lost
    handle.stop()


def test_a_forked_child_starts_with_an_empty_cache() -> None:
    arg_cache.stash({"x": object()})
    assert arg_cache.size() >= 1
    assert in_forked_child(lambda: str(arg_cache.size())) == "0"
    arg_cache.clear()
    assert os.getpid()  # the parent keeps its own


def test_use_cache_must_be_a_bool(queue_name: str) -> None:
    with pytest.raises(ValueError, match="use_cache"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, use_cache="yes")(lambda: None)


def test_a_datetime_or_dataclass_argument_is_refused_not_turned_into_a_string_and_cached_in_cache_mode(
        queue_name: str) -> None:
    import dataclasses
    import datetime

    @dataclasses.dataclass
    class Point:
        x: int

    got = Received()

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def plain(when: Any) -> None:
        pass

    @task_deco(queue_name + "_cached", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, use_cache=True)
    def cached(when: Any, where: Any) -> None:
        got.add(when=when, where=where)

    now = datetime.datetime.now()
    for value in (now, now.date(), now.time(), Point(1)):  # the function would get a str or a dict instead
        with pytest.raises(PublishError, match="is not JSON serializable"):
            plain.push(value)
        with pytest.raises(PublishError, match="is not JSON serializable"):
            plain.publish_many([{"when": value}])
    cached.push(now, Point(2))
    cached.consume()
    [call] = got.wait(1)
    assert call["when"] is now and call["where"] == Point(2)  # by reference, the very objects
    cached.stop()
