"""Per-message priority at publish time (``PriorityConsumingControlConfig(priority=n)``): higher runs first.

Run through the public API on every built broker that declares the capability, with
``concurrent_num=1`` so the order of the calls is the order of delivery.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, patch_frame_config, task_deco
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.core.errors import ConfigurationError

from .conftest import require_server

KINDS = [BrokerEnum.LOCAL_PYTHON_QUEUE, BrokerEnum.PERSISTQUEUE, BrokerEnum.REDIS_ACK_ABLE]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request: pytest.FixtureRequest, queue_name: str) -> Iterator[BrokerEnum]:
    kind = request.param
    if kind == BrokerEnum.REDIS_ACK_ABLE:
        require_server("Redis", "127.0.0.1", 6379)
        patch_frame_config(REDIS_URL="redis://127.0.0.1:6379/15")
    yield kind
    if kind == BrokerEnum.REDIS_ACK_ABLE:
        from funboost_like.brokers.registry import get_broker

        get_broker(kind).purge(queue_name)


def test_higher_priority_runs_first(kind: BrokerEnum, queue_name: str) -> None:
    order: list[str] = []

    @task_deco(queue_name, broker_kind=kind, concurrent_num=1)
    def f(name: str) -> None:
        order.append(name)

    f.clear()
    published = [("low-a", 0), ("high-a", 9), ("mid", 5), ("low-b", 0), ("high-b", 9), ("one", 1)]
    for name, priority in published:
        f.publish({"name": name}, priority_control_config=PriorityConsumingControlConfig(priority=priority))
    f.push("plain")  # push publishes at priority 0
    f.consume()
    deadline = time.monotonic() + 10
    while len(order) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Higher first; equal priorities keep their publish order.
    assert order == ["high-a", "high-b", "mid", "one", "low-a", "low-b", "plain"]


def test_a_message_published_later_with_a_higher_priority_overtakes_the_backlog(kind: BrokerEnum,
                                                                                  queue_name: str) -> None:
    order: list[int] = []

    @task_deco(queue_name, broker_kind=kind, concurrent_num=1, qps=20)
    def f(i: int) -> None:
        order.append(i)

    f.clear()
    f.publish_many([{"i": i} for i in range(30)])
    f.consume()
    deadline = time.monotonic() + 5
    while len(order) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    ran_before = len(order)
    f.publish({"i": 99}, priority_control_config=PriorityConsumingControlConfig(priority=3))
    while 99 not in order and time.monotonic() < deadline:
        time.sleep(0.01)
    f.stop()
    # Next after the call running and the one fetched when it was published (prefetch is one call here).
    assert 99 in order and order.index(99) <= ran_before + 2, (ran_before, order)


def test_priority_needs_the_capability(queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MemoryBroker, "capabilities", dataclasses.replace(MemoryBroker.capabilities, max_priority=0))

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def f(x: int) -> None:
        pass

    with pytest.raises(ConfigurationError, match="priority"):
        f.publish({"x": 1}, priority_control_config=PriorityConsumingControlConfig(priority=1))
    f.publish({"x": 1}, priority_control_config=PriorityConsumingControlConfig(priority=0))  # the default is fine
    assert f.get_message_count() == 1


def test_priority_out_of_the_brokers_range_raises(queue_name: str) -> None:
    require_server("Redis", "127.0.0.1", 6379)
    patch_frame_config(REDIS_URL="redis://127.0.0.1:6379/15")

    @task_deco(queue_name, broker_kind=BrokerEnum.REDIS_ACK_ABLE)
    def f(x: int) -> None:
        pass

    with pytest.raises(ConfigurationError, match="between 0 and 9"):
        f.publish({"x": 1}, priority_control_config=PriorityConsumingControlConfig(priority=10))
