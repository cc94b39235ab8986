"""The bodies ``push`` and ``publish_many`` put on the wire (DESIGN.md's wire format), read back raw from the broker.

``publish_many`` encodes plain dicts with a batch encoder of its own (one publish time per call of
``publish_many``); these tests hold it to the layout ``push`` writes: the call's keyword arguments,
then ``extra`` with ``task_id``, ``publish_time`` and ``publish_time_format``.
"""

from __future__ import annotations

import collections
import json
import math
import time
from collections.abc import Iterator

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.core import codec
from funboost_like.core.errors import PublishError

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE


def raw_bodies(fn, n: int) -> list[bytes]:  # noqa: ANN001
    deliveries = fn.broker.fetch(fn.queue_name, n, 1.0)
    fn.broker.ack(deliveries)
    return [delivery.body for delivery in deliveries]


@pytest.fixture
def two_args(queue_name: str) -> Iterator[object]:
    @task_deco(queue_name, broker_kind=MEMORY)
    def f(x: int, y: object = None) -> None:
        pass

    yield f
    f.clear()


def check_layout(body: bytes, task_id: str, kwargs: dict[str, object]) -> dict[str, object]:
    message = json.loads(body)  # plain JSON: any other language can read it
    assert list(message) == [*kwargs, "extra"]
    assert {key: message[key] for key in kwargs} == kwargs
    extra = message["extra"]
    assert list(extra) == ["task_id", "publish_time", "publish_time_format"]
    assert extra["task_id"] == task_id
    assert abs(extra["publish_time"] - time.time()) < 60
    published = time.localtime(int(extra["publish_time"]))
    assert extra["publish_time_format"] == time.strftime("%Y-%m-%d %H:%M:%S", published)
    return extra


def test_push_and_publish_many_write_the_same_layout(two_args) -> None:  # noqa: ANN001
    pushed = two_args.push(1, y="é")
    check_layout(raw_bodies(two_args, 1)[0], pushed.task_id, {"x": 1, "y": "é"})

    calls = [{"x": i, "y": [i, None, {"z": 2**64 - 1}]} for i in range(5)] + [{"x": 9}]
    before = [dict(call) for call in calls]
    started = time.time()
    task_ids = two_args.publish_many(calls)
    assert calls == before  # the caller's dicts are not changed
    bodies = raw_bodies(two_args, 10)
    assert len(bodies) == len(task_ids) == 6 and len(set(task_ids)) == 6
    times = {check_layout(body, task_id, call)["publish_time"]
             for body, task_id, call in zip(bodies, task_ids, before, strict=True)}
    assert len(times) == 1 and started - 0.001 <= times.pop() <= time.time()  # one publish time per batch


def test_a_function_without_arguments_gets_a_body_of_extra_only(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY)
    def tick() -> None:
        pass

    [task_id] = tick.publish_many([{}])
    check_layout(raw_bodies(tick, 1)[0], task_id, {})


def test_a_message_with_its_own_extra_keeps_it(two_args) -> None:  # noqa: ANN001
    [task_id] = two_args.publish_many([{"x": 1, "extra": {"max_retry_times": 3}}])
    extra = codec.loads(raw_bodies(two_args, 1)[0])["extra"]
    assert extra["task_id"] == task_id and extra["max_retry_times"] == 3


@pytest.mark.parametrize("bad", [{"x": 1, "y": math.nan}, {"x": 1, "y": [math.inf]}, {"x": 1, "y": object()},
                                 {"y": 2}, {"x": 1, "w": 2}, {"x": 1, "y": [2**64]}, {"x": 1, "y": {1: "a"}}],
                         ids=["nan", "nested-infinity", "not-json", "missing-argument", "unknown-argument",
                              "int-beyond-64-bits", "int-dict-key"])
def test_a_bad_message_in_a_batch_raises_and_publishes_nothing(two_args, bad: dict[str, object]) -> None:  # noqa: ANN001
    with pytest.raises(PublishError):
        two_args.publish_many([{"x": 0}, bad, {"x": 2}])
    assert two_args.get_message_count() == 0


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, {"k": [{5: 1}]}], ids=["wide", "wide-negative", "int-key"])
def test_an_argument_that_would_arrive_changed_is_refused_at_push(two_args, value: object) -> None:  # noqa: ANN001
    """orjson reads an integer beyond 64 bits back as a float, and JSON makes an int key a string: the
    function got 1.2e+21 or {"5": 1} in place of what was pushed, with nothing said."""
    with pytest.raises(PublishError, match="64 bits|keys must be strings"):
        two_args.push(1, y=value)
    two_args.push(1, y=[2**64 - 1, -(2**63)])  # the widest that arrive unchanged
    assert codec.loads(raw_bodies(two_args, 1)[0])["y"] == [2**64 - 1, -(2**63)]


@pytest.mark.parametrize(("option", "value"), [("max_retry_times", "2"), ("max_retry_times", None),
                                               ("max_retry_times", -1), ("function_timeout", "abc"),
                                               ("msg_expire_senconds", "abc"), ("misfire_grace_time", "x"),
                                               ("is_using_rpc_mode", "yes"), ("run_at", "x")])
def test_a_hand_written_option_of_the_wrong_type_is_dead_lettered(queue_name: str, option: str,
                                                                  value: object) -> None:
    """A "max_retry_times": "2" made every failure raise TypeError inside the consumer, which handed the
    message back: it ran about 45 times a second, forever. Other bad options made the consumer log a
    traceback and run the call with the option ignored."""
    runs: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, log_level=50)
    def g(x: int) -> None:
        runs.append(x)
        raise ValueError("boom")

    g.broker.publish(queue_name, codec.dumps({"x": 1, "extra": {option: value}}))
    g.broker.publish(queue_name, codec.dumps({"x": 2, "extra": {"max_retry_times": 0}}))  # a good one after it
    g.consume()
    try:
        g.broker.join(queue_name, 10, fail_fast=False)
        assert runs == [2]
        letters = {json.loads(letter.body)["x"]: letter.reason for letter in g.broker.list_dead_letters(queue_name)}
        assert set(letters) == {1, 2} and option in letters[1] and "boom" in letters[2]
    finally:
        g.consumer.stop()
        g.clear()


def test_a_message_without_task_id_has_a_name_in_the_log(queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A hand-written body (no ``extra``) was logged as "task None": now ``body:`` and a hash of its body,
    the same at each delivery, so its failures can be told apart and followed."""
    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=1)
    def g(x: int) -> None:
        raise ValueError("boom")

    g.broker.publish(queue_name, codec.dumps({"x": 1}))
    g.broker.publish(queue_name, codec.dumps({"x": 2}))
    with caplog.at_level("WARNING", logger=f"funboost_like.{queue_name}"):
        g.consume()
        try:
            g.broker.join(queue_name, 10, fail_fast=False)
        finally:
            g.consumer.stop()
            g.clear()
    lines = [record.getMessage() for record in caplog.records if "boom" in record.getMessage()]
    assert len(lines) == 4 and not any("task None" in line for line in lines), lines
    names = [line.split()[1] for line in lines]
    assert all(name.startswith("body:") for name in names)
    assert sorted(collections.Counter(names).values()) == [2, 2]  # one name per message, the same on its retry
