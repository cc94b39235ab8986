"""REDIS_ACK_ABLE broker against a real Redis server (database 15 by default).

The server URL comes from ``FUNBOOST_LIKE_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``).
An unreachable server skips these tests, or fails them when the ``CI`` environment variable is set.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from funboost_like.brokers import redis_ack_able
from funboost_like.brokers.base import _maintenance
from funboost_like.brokers.redis_ack_able import RedisAckAbleBroker
from funboost_like.brokers.redis_common import describe_url
from funboost_like.core.config import patch_frame_config, settings
from funboost_like.core.errors import BrokerConnectionError, BrokerError, ConfigurationError, DoubleAckError
from tests.conftest import in_forked_child
from tests.private_redis import PrivateRedis

REDIS_URL = os.environ.get("FUNBOOST_LIKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REPO_ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = 0.2
DEAD_AFTER = 1.0


@pytest.fixture
def client():
    plain = redis.Redis.from_url(REDIS_URL)
    try:
        plain.ping()
    except redis.exceptions.RedisError as exc:
        plain.close()
        reason = f"Redis is unreachable at {describe_url(REDIS_URL)}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    yield plain
    plain.close()


@pytest.fixture
def queue(client):
    name = f"test_ra_{uuid.uuid4().hex[:12]}"
    yield name
    keys = [name, *client.scan_iter(match=f"fl:{{{name}}}:*", count=1000)]
    client.delete(*keys)


@pytest.fixture
def make_broker(client):
    patch_frame_config(REDIS_URL=REDIS_URL)
    brokers: list[RedisAckAbleBroker] = []

    def make(**kwargs) -> RedisAckAbleBroker:
        kwargs.setdefault("heartbeat_interval", HEARTBEAT)
        kwargs.setdefault("dead_after", DEAD_AFTER)
        broker = RedisAckAbleBroker(**kwargs)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.close()
    settings.reset()


@pytest.fixture
def broker(make_broker):
    return make_broker()


def fetch_all(broker: RedisAckAbleBroker, queue: str, n: int, timeout: float = 3.0):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += broker.fetch(queue, n - len(got), 0.2)
    return got


def test_publish_fetch_ack_fifo(broker, queue):
    bodies = [b'{"i":%d}' % i for i in range(30)]
    for body in bodies[:10]:
        broker.publish(queue, body)
    broker.publish_many(queue, bodies[10:])
    assert broker.count(queue) == 30
    got = broker.fetch(queue, 12, 1.0) + broker.fetch(queue, 100, 1.0)
    assert [d.body for d in got] == bodies
    assert all(d.attempts == 1 and d.priority == 0 and d.queue == queue for d in got)
    assert broker.count(queue) == 0
    assert broker.in_flight(queue) == 30
    broker.ack(got)
    assert broker.in_flight(queue) == 0
    with pytest.raises(DoubleAckError):
        broker.ack(got[:1])
    with pytest.raises(DoubleAckError):
        broker.nack(got[1])


def test_idle_fetch_waits_at_most_timeout(broker, queue):
    start = time.monotonic()
    assert broker.fetch(queue, 10, 0.3) == []
    assert 0.25 <= time.monotonic() - start < 0.8
    start = time.monotonic()
    assert broker.fetch(queue, 10, 0) == []
    assert time.monotonic() - start < 0.2


def test_fetch_wakes_up_when_a_message_arrives(broker, queue):
    threading.Timer(0.2, broker.publish, args=(queue, b"late")).start()
    start = time.monotonic()
    got = broker.fetch(queue, 5, 3.0)
    assert [d.body for d in got] == [b"late"]
    assert time.monotonic() - start < 0.5
    broker.ack(got)


def test_message_pushed_by_another_program(broker, queue, client):
    client.lpush(queue, '{"x": 1}')
    client.lpush(queue, '{"x": 2}', '{"x": 3}')
    got = broker.fetch(queue, 10, 1.0)
    assert [json.loads(d.body) for d in got] == [{"x": 1}, {"x": 2}, {"x": 3}]
    broker.ack(got)
    # ... and the framework's own messages land on that very key.
    broker.publish(queue, b'{"y": 1}')
    assert client.rpop(queue) == b'{"y": 1}'


def test_nack_requeues_and_counts_attempts(broker, queue):
    broker.publish_many(queue, [b"a", b"b"])
    first = broker.fetch(queue, 1, 1.0)[0]
    assert first.body == b"a"
    broker.nack(first)  # back at the tail: "b" comes first now
    got = broker.fetch(queue, 10, 1.0)
    assert [(d.body, d.attempts) for d in got] == [(b"b", 1), (b"a", 2)]
    broker.nack(got[1])
    again = broker.fetch(queue, 10, 1.0)
    assert [(d.body, d.attempts) for d in again] == [(b"a", 3)]
    broker.nack(again[0], requeue=False)
    broker.ack(got[:1])
    assert broker.count(queue) == 0
    assert broker.in_flight(queue) == 0


def test_release_puts_back_at_the_head_without_counting(broker, queue):
    broker.publish_many(queue, [b"1", b"2", b"3", b"4"])
    got = broker.fetch(queue, 2, 1.0)
    broker.release(got)
    again = broker.fetch(queue, 10, 1.0)
    assert [(d.body, d.attempts) for d in again] == [(b"1", 1), (b"2", 1), (b"3", 1), (b"4", 1)]
    broker.nack(again[0])
    broker.ack(again[1:])
    retried = broker.fetch(queue, 1, 1.0)[0]
    assert retried.attempts == 2
    broker.release([retried])
    assert broker.fetch(queue, 1, 1.0)[0].attempts == 2


def test_dead_letters(broker, queue, client):
    broker.publish_many(queue, [b'{"n":1}', b'{"n":2}'])
    one, two = broker.fetch(queue, 2, 1.0)
    broker.dead_letter(one, "first reason")
    broker.nack(two)
    two = broker.fetch(queue, 1, 1.0)[0]
    broker.dead_letter(two, "second reason", ValueError("boom"))
    letters = broker.list_dead_letters(queue)
    assert [(d.body, d.reason, d.attempts) for d in letters] == [(b'{"n":2}', "second reason", 2),
                                                                  (b'{"n":1}', "first reason", 1)]
    assert all(abs(d.failed_at - time.time()) < 60 for d in letters)
    assert len(broker.list_dead_letters(queue, limit=1)) == 1
    raw = json.loads(client.lindex(f"fl:{{{queue}}}:dead", 0))
    assert set(raw) == {"body", "reason", "failed_at", "attempts"} and raw["body"] == '{"n":2}'
    assert broker.in_flight(queue) == 0 and broker.count(queue) == 0
    with pytest.raises(DoubleAckError):
        broker.ack([two])
    assert broker.purge_dead_letters(queue) == 2
    assert broker.list_dead_letters(queue) == []


def test_delayed_publish_and_nack_with_delay(broker, queue):
    broker.publish(queue, b"later", not_before=time.time() + 0.4)
    broker.publish(queue, b"past", not_before=time.time() - 5)  # already due: ready at once
    assert broker.count(queue) == 2
    got = broker.fetch(queue, 10, 0.1)
    assert [d.body for d in got] == [b"past"]
    broker.ack(got)
    start = time.monotonic()
    got = broker.fetch(queue, 10, 3.0)
    assert [d.body for d in got] == [b"later"]
    assert 0.2 <= time.monotonic() - start < 1.0
    broker.nack(got[0], delay=0.3)
    assert broker.count(queue) == 1
    assert broker.fetch(queue, 10, 0.05) == []
    got = broker.fetch(queue, 10, 3.0)
    assert [(d.body, d.attempts) for d in got] == [(b"later", 2)]
    broker.ack(got)


def test_priority(broker, queue):
    broker.publish(queue, b"p0")
    broker.publish(queue, b"p3-a", priority=3)
    broker.publish(queue, b"p9", priority=9)
    broker.publish_many(queue, [b"p3-b"], priority=3)
    broker.publish(queue, b"p5-delayed", priority=5, not_before=time.time() + 0.2)
    assert broker.count(queue) == 5
    got = broker.fetch(queue, 10, 1.0)
    assert [(d.body, d.priority) for d in got] == [(b"p9", 9), (b"p3-a", 3), (b"p3-b", 3), (b"p0", 0)]
    broker.nack(got[1])  # keeps its priority when requeued
    got2 = broker.fetch(queue, 10, 1.0)
    assert [(d.body, d.priority, d.attempts) for d in got2] == [(b"p3-a", 3, 2)]
    time.sleep(0.25)
    broker.publish(queue, b"p0-b")
    got3 = broker.fetch(queue, 10, 1.0)
    assert [(d.body, d.priority) for d in got3] == [(b"p5-delayed", 5), (b"p0-b", 0)]
    broker.ack([got[0], got[2], got[3], *got2, *got3])  # one batch across priorities
    for bad in (10, -1, 1.5):
        with pytest.raises(ConfigurationError):
            broker.publish(queue, b"x", priority=bad)


def test_purge_and_count(broker, queue):
    broker.publish_many(queue, [b"a", b"b", b"c"])
    broker.publish(queue, b"p", priority=2)
    broker.publish(queue, b"d", not_before=time.time() + 60)
    held = broker.fetch(queue, 1, 1.0)
    assert [d.body for d in held] == [b"p"]
    assert broker.count(queue) == 4  # in-flight messages are not counted
    assert broker.purge(queue) == 4
    assert broker.count(queue) == 0
    assert broker.fetch(queue, 10, 0) == []
    broker.ack(held)
    assert broker.purge(queue) == 0


def test_concurrent_fetchers_lose_and_duplicate_nothing(make_broker, queue):
    producer = make_broker()
    bodies = [b"%d" % i for i in range(3000)]
    producer.publish_many(queue, bodies)
    seen: list[bytes] = []
    lock = threading.Lock()

    def consume(broker: RedisAckAbleBroker) -> None:
        while True:
            got = broker.fetch(queue, 37, 0.2)
            if not got:
                return
            broker.ack(got)
            with lock:
                seen.extend(d.body for d in got)

    consumers = [make_broker() for _ in range(2)]
    threads = [threading.Thread(target=consume, args=(consumers[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(seen) == sorted(bodies)
    assert producer.in_flight(queue) == 0


def test_lost_fetch_reply_is_replayed(broker, queue, client):
    """What a fetch whose reply never arrived took is handed out by the next fetch."""
    broker.publish_many(queue, [b"a", b"b", b"c", b"d"])
    held = broker.fetch(queue, 1, 0)  # registers the consumer
    keys = broker._keys[queue]
    ikey = broker._inflight[queue]
    base = "987000"
    # The script runs on the server but its reply is lost on the way back:
    taken = redis_ack_able.TAKE(client, [keys.ready, keys.delayed, keys.attempts, ikey, keys.consumers],
                                [5, keys.prio_prefix, base, broker.consumer_id])
    assert taken[1:] == [b"b", b"c", b"d"]
    broker._suspect.add(queue)  # what fetch records when the call raised
    got = broker.fetch(queue, 2, 0)  # asks for fewer than the lost call took: the rest comes next time
    assert [(d.body, d.attempts) for d in got] == [(b"b", 1), (b"c", 1)]
    rest = broker.fetch(queue, 5, 0)
    assert [(d.body, d.attempts) for d in rest] == [(b"d", 1)]
    broker.ack([*held, *got, *rest])
    assert broker.in_flight(queue) == 0 and broker.count(queue) == 0


def test_a_failing_fetch_loses_nothing(broker, queue, client):
    """A key of the wrong type makes the script fail half-way; what it took is handed out next time."""
    broker.publish(queue, b"urgent", priority=5)
    client.set(queue, "not a list")  # the priority-0 list, popped after priority 5
    with pytest.raises(BrokerError):
        broker.fetch(queue, 10, 0)
    client.delete(queue)
    got = broker.fetch(queue, 10, 0)
    assert [(d.body, d.priority) for d in got] == [(b"urgent", 5)]
    broker.ack(got)
    assert broker.in_flight(queue) == 0


def test_connection_errors_are_wrapped_and_redacted(make_broker, queue):
    broker = make_broker()
    patch_frame_config(REDIS_URL="redis://user:s3cret@127.0.0.1:1/0")
    with pytest.raises(BrokerConnectionError) as info:
        broker.publish(queue, b"x")
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    with pytest.raises(BrokerConnectionError):
        broker.fetch(queue, 5, 0.1)
    broker.close()


def test_recovered_messages_count_a_crash_and_a_nack_or_release_does_not(make_broker, queue, client):
    first, second, third = make_broker(), make_broker(), make_broker()
    first.publish(queue, b"urgent", priority=4)
    first.publish(queue, b"plain")
    held = first.fetch(queue, 2, 1.0)
    assert [(d.body, d.attempts, d.crashes) for d in held] == [(b"urgent", 1, 0), (b"plain", 1, 0)]
    _maintenance.discard(first)  # its consumer "dies": no more heartbeats
    time.sleep(DEAD_AFTER + HEARTBEAT)
    assert second.recover_dead_consumers(queue) == 2
    got = second.fetch(queue, 2, 1.0)  # back at the front of their levels, priorities kept
    assert [(d.body, d.priority, d.attempts, d.crashes) for d in got] == [(b"urgent", 4, 2, 1), (b"plain", 0, 2, 1)]
    second.nack(got[0])  # an attempt, no crash
    second.release(got[1:])  # neither
    again = second.fetch(queue, 2, 1.0)
    assert [(d.body, d.attempts, d.crashes) for d in again] == [(b"urgent", 3, 1), (b"plain", 2, 1)]
    second.nack(again[0], delay=0.1)
    [late] = fetch_all(second, queue, 1)
    assert (late.body, late.priority, late.attempts, late.crashes) == (b"urgent", 4, 4, 1)
    _maintenance.discard(second)  # a second death while holding both
    time.sleep(DEAD_AFTER + HEARTBEAT)
    assert third.recover_dead_consumers(queue) == 2
    last = third.fetch(queue, 2, 1.0)
    assert [(d.body, d.attempts, d.crashes) for d in last] == [(b"urgent", 5, 2), (b"plain", 3, 2)]
    third.ack(last)
    assert third.count(queue) == 0 and third.in_flight(queue) == 0 and client.hlen(f"fl:{{{queue}}}:attempts") == 0


def test_live_consumer_keeps_its_messages(make_broker, queue):
    holder, other = make_broker(), make_broker()
    holder.publish_many(queue, [b"1", b"2"])
    held = holder.fetch(queue, 2, 1.0)
    assert len(held) == 2
    time.sleep(DEAD_AFTER + 3 * HEARTBEAT)  # the heartbeat thread keeps the holder alive
    assert other.recover_dead_consumers(queue) == 0
    assert other.fetch(queue, 10, 0) == []
    holder.ack(held)


def test_killed_consumer_messages_come_back(make_broker, queue):
    survivor = make_broker()
    bodies = [b'{"k":%d}' % i for i in range(25)]
    survivor.publish_many(queue, bodies)
    code = (
        "import sys, time\n"
        "from funboost_like.brokers.redis_ack_able import RedisAckAbleBroker\n"
        f"b = RedisAckAbleBroker(heartbeat_interval={HEARTBEAT}, dead_after={DEAD_AFTER})\n"
        "got = []\n"
        f"while len(got) < {len(bodies)}:\n"
        f"    got += b.fetch({queue!r}, 10, 1.0)\n"
        "sys.stdout.write('fetched %d\\n' % len(got))\n"
        "sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, FUNBOOST_LIKE_REDIS_URL=REDIS_URL, FUNBOOST_LIKE_NO_USER_CONFIG="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 15)
        assert ready, "the child consumer did not fetch in time"
        assert child.stdout.readline().strip() == b"fetched 25"
        assert survivor.count(queue) == 0
        assert survivor.in_flight(queue) == 25
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    killed_at = time.monotonic()
    got = fetch_all(survivor, queue, len(bodies), timeout=DEAD_AFTER + HEARTBEAT + 3.0)
    elapsed = time.monotonic() - killed_at
    assert [d.body for d in got] == bodies  # all back, in their original order
    assert all(d.attempts == 2 for d in got)
    assert elapsed <= DEAD_AFTER + HEARTBEAT + 0.5
    survivor.ack(got)
    assert survivor.in_flight(queue) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_its_own_consumer_identity(broker, queue):
    broker.publish_many(queue, [b"parent", b"child"])
    parent_got = broker.fetch(queue, 1, 1.0)  # starts the heartbeat thread and the connection
    parent_id = broker.consumer_id

    def in_child() -> str:
        got = broker.fetch(queue, 1, 2.0)
        broker.ack(got)
        return broker.consumer_id + "|" + got[0].body.decode()

    child_id, _, body = in_forked_child(in_child).partition("|")
    assert body == "child" and child_id and child_id != parent_id
    broker.ack(parent_got)
    assert broker.in_flight(queue) == 0


def test_settings_validation():
    with pytest.raises(ConfigurationError):
        RedisAckAbleBroker(heartbeat_interval=5, dead_after=5)
    assert RedisAckAbleBroker.capabilities.ack and RedisAckAbleBroker.capabilities.max_priority == 9


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_server_restart_reconnects_and_never_logs_the_password(make_broker, queue, tmp_path, caplog):
    server = PrivateRedis(tmp_path, password="s3cret")
    port = server.port
    server.start()
    try:
        broker = make_broker()
        patch_frame_config(REDIS_URL=f"redis://:s3cret@127.0.0.1:{port}/0")
        caplog.set_level(logging.DEBUG, logger="funboost_like")
        broker.publish(queue, b"before")
        got = broker.fetch(queue, 5, 1.0)
        assert [d.body for d in got] == [b"before"]
        broker.ack(got)
        server.kill()
        with pytest.raises(BrokerConnectionError) as info:
            broker.publish(queue, b"lost")
        with pytest.raises(BrokerConnectionError):
            broker.fetch(queue, 5, 0.1)
        assert "s3cret" not in str(info.value)
        server.start()  # empty: scripts must be loaded again
        broker.publish(queue, b"after")
        got = broker.fetch(queue, 5, 1.0)
        assert [d.body for d in got] == [b"after"]
        broker.ack(got)
        broker.close()
    finally:
        server.stop()
    assert "s3cret" not in caplog.text
    assert f"redis://:***@127.0.0.1:{port}/0" in caplog.text  # the URL was logged, redacted
