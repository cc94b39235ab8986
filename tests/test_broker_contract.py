"""One contract suite, run against every broker that is built (DESIGN §8)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from funboost_like.brokers.base import Broker
from funboost_like.brokers.registry import BROKERS, get_broker
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import DoubleAckError

from .conftest import require_server

REDIS = ("Redis", "127.0.0.1", 6379)
REDIS_KINDS = {BrokerEnum.REDIS, BrokerEnum.REDIS_ACK_ABLE, BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM}
REDIS_URL = "redis://127.0.0.1:6379/15"  # every Redis kind runs the suite on this database
SERVERS = {kind: REDIS for kind in REDIS_KINDS}
BUILT = [kind for kind, entry in BROKERS.items() if entry is not None]


@pytest.fixture(params=BUILT, ids=[k.name for k in BUILT])
def broker(request: pytest.FixtureRequest, queue_name: str) -> Iterator[Broker]:
    kind = request.param
    if kind in SERVERS:
        require_server(*SERVERS[kind])
        if kind in REDIS_KINDS:
            from funboost_like.core.config import patch_frame_config

            patch_frame_config(REDIS_URL=REDIS_URL)
    b = get_broker(kind)
    b.purge(queue_name)
    yield b
    b.purge(queue_name)
    try:
        b.purge_dead_letters(queue_name)
    except NotImplementedError:
        pass
    if kind in REDIS_KINDS:  # also the keys purge keeps (a stream and its group, consumer records)
        from funboost_like.brokers.redis_common import redis_client

        client = redis_client()
        client.delete(queue_name, *client.scan_iter(match=f"fl:{{{queue_name}}}:*", count=1000))


def fetch_all(broker: Broker, queue: str, expected: int, timeout: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        got.extend(broker.fetch(queue, expected - len(got), 0.2))
    return got


def test_publish_fetch_ack(broker: Broker, queue_name: str) -> None:
    for i in range(5):
        broker.publish(queue_name, f'{{"i":{i}}}'.encode())
    assert broker.count(queue_name) == 5
    got = fetch_all(broker, queue_name, 5)
    assert [d.body for d in got] == [f'{{"i":{i}}}'.encode() for i in range(5)]  # FIFO at equal priority
    assert all(d.attempts == 1 for d in got)
    assert broker.count(queue_name) == 0
    broker.ack(got)
    assert broker.fetch(queue_name, 10, 0.05) == []


def test_fetch_respects_max_n_and_timeout(broker: Broker, queue_name: str) -> None:
    broker.publish_many(queue_name, [b"{}"] * 7)
    first = fetch_all(broker, queue_name, 3)
    assert len(first) == 3
    broker.ack(first)
    rest = fetch_all(broker, queue_name, 4)
    broker.ack(rest)
    started = time.monotonic()
    assert broker.fetch(queue_name, 5, 0.3) == []
    assert 0.2 <= time.monotonic() - started < 2.0


def test_nack_requeue_and_drop(broker: Broker, queue_name: str) -> None:
    broker.publish(queue_name, b'{"a":1}')
    [d] = fetch_all(broker, queue_name, 1)
    broker.nack(d, requeue=True)
    [again] = fetch_all(broker, queue_name, 1)
    assert again.body == b'{"a":1}'
    assert again.attempts == 2
    broker.nack(again, requeue=False)
    assert broker.fetch(queue_name, 1, 0.1) == []
    assert broker.count(queue_name) == 0


def test_nack_with_delay(broker: Broker, queue_name: str) -> None:
    broker.publish(queue_name, b"{}")
    [d] = fetch_all(broker, queue_name, 1)
    broker.nack(d, requeue=True, delay=0.6)
    assert broker.fetch(queue_name, 1, 0.2) == []
    [again] = fetch_all(broker, queue_name, 1, timeout=3)
    broker.ack([again])


def test_release_does_not_count_an_attempt(broker: Broker, queue_name: str) -> None:
    broker.publish(queue_name, b"{}")
    [d] = fetch_all(broker, queue_name, 1)
    broker.release([d])
    [again] = fetch_all(broker, queue_name, 1)
    assert again.attempts == 1
    broker.ack([again])


def test_delayed_visibility(broker: Broker, queue_name: str) -> None:
    if not broker.capabilities.delay:
        pytest.skip("no delay capability")
    broker.publish(queue_name, b'{"late":1}', not_before=time.time() + 0.8)
    broker.publish(queue_name, b'{"now":1}')
    [now] = fetch_all(broker, queue_name, 1)
    assert now.body == b'{"now":1}'
    assert broker.fetch(queue_name, 1, 0.3) == []
    [late] = fetch_all(broker, queue_name, 1, timeout=3)
    assert late.body == b'{"late":1}'
    broker.ack([now, late])


def test_priority_higher_first(broker: Broker, queue_name: str) -> None:
    if not broker.capabilities.priority:
        pytest.skip("no priority capability")
    broker.publish(queue_name, b'{"p":0}')
    broker.publish(queue_name, b'{"p":5}', priority=5)
    broker.publish(queue_name, b'{"p":1}', priority=1)
    got = fetch_all(broker, queue_name, 3)
    assert [d.body for d in got] == [b'{"p":5}', b'{"p":1}', b'{"p":0}']
    broker.ack(got)


def test_purge_and_count(broker: Broker, queue_name: str) -> None:
    broker.publish_many(queue_name, [b"{}"] * 25)
    assert broker.count(queue_name) == 25
    assert broker.purge(queue_name) == 25
    assert broker.count(queue_name) == 0
    assert broker.fetch(queue_name, 5, 0.05) == []


def test_double_ack_raises(broker: Broker, queue_name: str) -> None:
    broker.publish(queue_name, b"{}")
    [d] = fetch_all(broker, queue_name, 1)
    broker.ack([d])
    with pytest.raises(DoubleAckError):
        broker.ack([d])


def test_dead_letter_kept_with_reason(broker: Broker, queue_name: str) -> None:
    broker.publish(queue_name, b"not json")
    [d] = fetch_all(broker, queue_name, 1)
    broker.dead_letter(d, "body is not valid JSON")
    assert broker.fetch(queue_name, 1, 0.1) == []
    [letter] = broker.list_dead_letters(queue_name)
    assert letter.body == b"not json"
    assert letter.reason == "body is not valid JSON"
    assert broker.purge_dead_letters(queue_name) == 1
    assert broker.list_dead_letters(queue_name) == []


def test_publish_many_keeps_order(broker: Broker, queue_name: str) -> None:
    bodies = [f'{{"n":{i}}}'.encode() for i in range(300)]
    broker.publish_many(queue_name, bodies)
    got = fetch_all(broker, queue_name, 300)
    assert [d.body for d in got] == bodies
    broker.ack(got)


def test_ack_and_fetch_acks_then_fetches(broker: Broker, queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    bodies = [f'{{"n":{i}}}'.encode() for i in range(7)]
    broker.publish_many(queue_name, bodies[:6])
    first = fetch_all(broker, queue_name, 3)
    second = broker.ack_and_fetch(first, queue_name, 3, 1.0)
    second += fetch_all(broker, queue_name, 3 - len(second))
    assert [d.body for d in second] == bodies[3:6]
    with pytest.raises(DoubleAckError):  # the first three were acknowledged on the way
        broker.ack(first[:1])
    # An ack that fails (here: a double ack) is logged and does not stop the fetch.
    broker.publish(queue_name, bodies[6])
    with caplog.at_level("WARNING", logger="funboost_like"):
        third = broker.ack_and_fetch([*second, first[1]], queue_name, 1, 1.0)
    third += fetch_all(broker, queue_name, 1 - len(third))
    assert [d.body for d in third] == bodies[6:]
    assert any(record.levelname in ("WARNING", "ERROR") for record in caplog.records)
    with pytest.raises(DoubleAckError):
        broker.ack(second[-1:])
    broker.ack(third)
    assert broker.fetch(queue_name, 10, 0.05) == [] and broker.count(queue_name) == 0
