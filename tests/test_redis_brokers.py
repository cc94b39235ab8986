"""REDIS (list), RedisBrpopLpush and REDIS_STREAM against a real Redis server (database 14 by default).

The server URL comes from ``FUNBOOST_LIKE_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/14``).
An unreachable server skips these tests, or fails them when the ``CI`` environment variable is set.
Crash tests run real consumer processes (test_frame/crash/redis_worker.py) and SIGKILL them by the
PID the test started.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from funboost_like import BrokerEnum, patch_frame_config, task_deco
from funboost_like.brokers.base import Broker, _maintenance
from funboost_like.brokers.redis_ack_able import RedisAckAbleBroker
from funboost_like.brokers.redis_brpoplpush import RedisBrpopLpushBroker
from funboost_like.brokers.redis_common import describe_url
from funboost_like.brokers.redis_list import RedisListBroker
from funboost_like.brokers.redis_stream import GROUP, RedisStreamBroker
from funboost_like.core.errors import BrokerConnectionError, ConfigurationError, DoubleAckError
from tests.conftest import REPO, in_forked_child, open_sockets
from tests.private_redis import PrivateRedis

REDIS_URL = os.environ.get("FUNBOOST_LIKE_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
WORKER = REPO / "test_frame" / "crash" / "redis_worker.py"
KINDS = [BrokerEnum.REDIS, BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM]
HEARTBEAT, DEAD_AFTER = 0.2, 1.0  # short recovery times for the tests

posix_only = pytest.mark.skipif(sys.platform == "win32" or not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    plain = redis.Redis.from_url(REDIS_URL)
    try:
        plain.ping()
    except redis.exceptions.RedisError as exc:
        plain.close()
        reason = f"Redis is unreachable at {describe_url(REDIS_URL)}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    patch_frame_config(REDIS_URL=REDIS_URL)
    yield plain
    plain.close()


@pytest.fixture
def queue(client: redis.Redis) -> Iterator[str]:
    name = f"test_rb_{uuid.uuid4().hex[:12]}"
    yield name
    client.delete(name, *client.scan_iter(match=f"fl:{{{name}}}:*", count=1000))


@pytest.fixture
def brokers(client: redis.Redis) -> Iterator[list[Broker]]:
    """Brokers a test makes itself (closed at the end); get_broker's are closed by conftest."""
    made: list[Broker] = []
    yield made
    for broker in made:
        broker.close()


def fetch_all(broker: Broker, queue: str, n: int, timeout: float = 3.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += broker.fetch(queue, n - len(got), 0.2)
    return got


def raw_publish(client: redis.Redis, kind: BrokerEnum, queue: str, body: bytes | str) -> None:
    """What another program does: the documented cross-language contract, with a plain client."""
    if kind == BrokerEnum.REDIS_STREAM:
        client.xadd(queue, {"data": body})
    else:
        client.lpush(queue, body)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# -- every kind, through the public API ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_cross_language_publishing_and_a_body_that_is_not_json(client: redis.Redis, queue: str,
                                                               kind: BrokerEnum) -> None:
    results: list[int] = []

    @task_deco(queue, broker_kind=kind, concurrent_num=5)
    def add(x: int, y: int) -> None:
        results.append(x + y)

    add.push(5, y=6)  # the framework's own messages land on the documented key, as JSON text
    if kind == BrokerEnum.REDIS_STREAM:
        [(_, fields)] = client.xrange(queue)
        assert client.type(queue) == b"stream" and set(fields) == {b"data"}
        own = json.loads(fields[b"data"])
    else:
        assert client.type(queue) == b"list"
        own = json.loads(client.lindex(queue, 0))
    assert own["x"] == 5 and own["y"] == 6 and "task_id" in own["extra"]

    raw_publish(client, kind, queue, b"not json")
    raw_publish(client, kind, queue, json.dumps({"x": 1, "y": 2}))  # no "extra": valid and runs
    add.consume()
    raw_publish(client, kind, queue, '{"x": 10, "y": 20}')  # while consuming
    wait_for(lambda: len(results) >= 3, 10, "three calls")
    assert sorted(results) == [3, 11, 30]
    wait_for(lambda: bool(add.broker.list_dead_letters(queue)), 5, "the dead letter")
    [letter] = add.broker.list_dead_letters(queue)
    assert letter.body == b"not json" and "JSON" in letter.reason
    add.stop()
    assert add.consumer.join(10)
    assert add.broker.count(queue) == 0
    in_flight = getattr(add.broker, "in_flight")  # noqa: B009 - not part of the base contract
    assert in_flight(queue) == 0


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_connection_errors_are_wrapped_and_redacted(client: redis.Redis, queue: str, kind: BrokerEnum) -> None:
    broker = {BrokerEnum.REDIS: RedisListBroker, BrokerEnum.RedisBrpopLpush: RedisBrpopLpushBroker,
              BrokerEnum.REDIS_STREAM: RedisStreamBroker}[kind]()
    patch_frame_config(REDIS_URL="redis://user:s3cret@127.0.0.1:1/0")
    try:
        for operation in (lambda: broker.publish(queue, b"{}"), lambda: broker.fetch(queue, 5, 0.1),
                          lambda: broker.count(queue)):
            with pytest.raises(BrokerConnectionError) as info:
                operation()
            assert "s3cret" not in str(info.value) and "***" in str(info.value)
            assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    finally:
        broker.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
@pytest.mark.timeout(60)
def test_consumers_reconnect_after_a_redis_restart(client: redis.Redis, tmp_path: Path, caplog) -> None:
    """A running consumer of each kind survives a restart of an empty server (scripts and groups gone)."""
    server = PrivateRedis(tmp_path)
    server.start()
    patch_frame_config(REDIS_URL=server.url)
    caplog.set_level(logging.ERROR, logger="funboost_like")
    ran: dict[BrokerEnum, list[int]] = collections.defaultdict(list)
    boosters = []
    try:
        for kind in KINDS:
            def record(i: int, kind: BrokerEnum = kind) -> None:
                ran[kind].append(i)

            booster = task_deco(f"restart_{kind.name}", broker_kind=kind, concurrent_num=3)(record)
            booster.push(1)
            booster.consume()
            boosters.append((kind, booster))
        wait_for(lambda: all(ran[k] == [1] for k in KINDS), 10, "the first calls")
        server.kill()
        time.sleep(0.3)  # every consumer meets the dead server at least once
        server.start()
        for _, booster in boosters:
            wait_for(lambda b=booster: _push_ok(b, 2), 15, "publishing after the restart")
        wait_for(lambda: all(ran[k] == [1, 2] for k in KINDS), 20, "the calls after the restart")
    finally:
        for _, booster in boosters:
            booster.stop()
        for _, booster in boosters:
            booster.consumer.join(10)
        server.stop()
    assert "fetching from queue" in caplog.text  # the loop saw the outage, backed off and went on


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
@pytest.mark.timeout(60)
def test_an_outage_is_logged_once_and_the_consumer_is_back_soon_after_the_server(tmp_path: Path, queue: str,
                                                                                  caplog) -> None:
    """While Redis was down, every failed fetch logged an ERROR with two chained tracebacks, and the retries
    backed off to 30 s apart: after an 8 s outage the consumer came back 7 s after the server. Now: one line
    when the outage starts, one when it ends, and retries at most 5 s apart."""
    server = PrivateRedis(tmp_path)
    server.start()
    patch_frame_config(REDIS_URL=server.url)
    ran: list[int] = []

    def record(i: int) -> None:
        ran.append(i)

    booster = task_deco(queue, broker_kind=BrokerEnum.REDIS_ACK_ABLE)(record)
    caplog.set_level(logging.DEBUG, logger=f"funboost_like.{queue}")
    try:
        booster.push(1)
        booster.consume()
        wait_for(lambda: ran == [1], 10, "the first call")
        server.kill()
        time.sleep(8)
        server.start()
        back = time.monotonic()
        wait_for(lambda: _push_ok(booster, 2), 10, "publishing after the restart")
        wait_for(lambda: ran == [1, 2], 10, "the call after the restart")
        assert time.monotonic() - back < 6.5
    finally:
        booster.stop()
        booster.consumer.join(10)
        server.stop()
    fetching = [r for r in caplog.records if r.getMessage().startswith(f"fetching from queue {queue!r}")]
    failed = [r for r in fetching if r.levelno >= logging.ERROR]
    assert len(failed) == 1 and not failed[0].exc_info, [r.getMessage() for r in failed]
    assert "unreachable" in failed[0].getMessage() and "trying again in" in failed[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in fetching) >= 3  # the tries in between
    assert any(r.levelno == logging.INFO and "works again" in r.getMessage() for r in fetching)


def _push_ok(booster, value: int) -> bool:
    try:
        booster.push(value)
        return True
    except BrokerConnectionError:
        return False


# -- REDIS (plain list) --------------------------------------------------------------------------


def test_list_fetch_blocks_until_a_message_arrives_and_never_past_its_timeout(client: redis.Redis,
                                                                              queue: str) -> None:
    broker = RedisListBroker()
    for timeout in (0.05, 0.5):
        started = time.monotonic()
        assert broker.fetch(queue, 10, timeout) == []
        assert timeout * 0.8 <= time.monotonic() - started < timeout + 0.1
    threading.Timer(0.3, client.lpush, args=(queue, b"late")).start()
    started = time.monotonic()
    got = broker.fetch(queue, 10, 3.0)
    assert [d.body for d in got] == [b"late"]
    assert time.monotonic() - started < 0.6  # BRPOP returns when the message arrives
    broker.ack(got)


def test_list_priorities_delays_attempts_and_order(client: redis.Redis, queue: str) -> None:
    broker = RedisListBroker()
    broker.publish_many(queue, [b"a", b"b"])
    broker.publish(queue, b"urgent", priority=7)
    broker.publish(queue, b"later", not_before=time.time() + 0.3)
    assert broker.count(queue) == 4
    [first] = broker.fetch(queue, 1, 0)
    assert (first.body, first.priority) == (b"urgent", 7)
    broker.release([first])  # back at the front, no attempt counted
    got = broker.fetch(queue, 10, 0)
    assert [(d.body, d.attempts, d.priority) for d in got] == [(b"urgent", 1, 7), (b"a", 1, 0), (b"b", 1, 0)]
    assert broker.count(queue) == 1 and broker.in_flight(queue) == 0  # fetched messages left Redis
    broker.nack(got[1])  # to the back of the queue, one attempt counted
    broker.ack([got[0], got[2]])
    with pytest.raises(DoubleAckError):
        broker.ack([got[0]])
    got = fetch_all(broker, queue, 2)
    assert [(d.body, d.attempts) for d in got] == [(b"a", 2), (b"later", 1)]
    broker.nack(got[0], delay=0.2)
    assert broker.fetch(queue, 10, 0) == []
    [again] = broker.fetch(queue, 10, 2.0)
    assert (again.body, again.attempts) == (b"a", 3)
    broker.dead_letter(again, "enough")
    broker.ack(got[1:])
    assert [(d.body, d.reason, d.attempts) for d in broker.list_dead_letters(queue)] == [(b"a", "enough", 3)]
    assert client.hlen(f"fl:{{{queue}}}:attempts") == 0


# -- RedisBrpopLpush -----------------------------------------------------------------------------


def test_brpoplpush_in_flight_list_and_ack_by_value(client: redis.Redis, queue: str, brokers: list[Broker]) -> None:
    broker = RedisBrpopLpushBroker(heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER)
    brokers.append(broker)
    client.lpush(queue, b"same", b"same", b"other")  # byte-identical bodies are interchangeable
    got = broker.fetch(queue, 10, 1.0)
    assert [d.body for d in got] == [b"same", b"same", b"other"]
    unack = f"fl:{{{queue}}}:unack:{broker.consumer_id}"
    assert client.lrange(unack, 0, -1) == [b"other", b"same", b"same"]  # newest at the head
    assert client.zscore(f"fl:{{{queue}}}:unack-consumers", broker.consumer_id) is not None
    broker.ack(got[:2])
    assert client.lrange(unack, 0, -1) == [b"other"]
    with pytest.raises(DoubleAckError):
        broker.ack(got[:1])
    assert broker.in_flight(queue) == 1 and broker.count(queue) == 0
    broker.nack(got[2])
    [again] = broker.fetch(queue, 10, 1.0)
    assert (again.body, again.attempts) == (b"other", 2)
    broker.ack([again])
    assert broker.in_flight(queue) == 0 and client.hlen(f"fl:{{{queue}}}:attempts") == 0
    broker.close()
    assert client.zcard(f"fl:{{{queue}}}:unack-consumers") == 0  # retired: nothing was in flight


def test_brpoplpush_hands_out_what_a_lost_fetch_reply_moved(client: redis.Redis, queue: str,
                                                             brokers: list[Broker]) -> None:
    broker = RedisBrpopLpushBroker(heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER)
    brokers.append(broker)
    client.lpush(queue, b"a", b"b", b"c", b"d")
    held = broker.fetch(queue, 1, 1.0)
    unack = f"fl:{{{queue}}}:unack:{broker.consumer_id}"
    for _ in range(2):  # a fetch whose moves ran on the server but whose reply was lost
        client.lmove(queue, unack, "RIGHT", "LEFT")
    broker._suspect.add(queue)  # what fetch records when its pipeline raised
    got = broker.fetch(queue, 10, 0)
    assert [(d.body, d.attempts) for d in got] == [(b"b", 1), (b"c", 1)]  # only the unknown ones, oldest first
    rest = broker.fetch(queue, 10, 0)
    assert [d.body for d in rest] == [b"d"]
    broker.ack([*held, *got, *rest])
    assert broker.in_flight(queue) == 0


def test_brpoplpush_live_consumer_keeps_its_messages_and_a_stalled_one_loses_them(
        client: redis.Redis, queue: str, brokers: list[Broker]) -> None:
    holder = RedisBrpopLpushBroker(heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER)
    other = RedisBrpopLpushBroker(heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER)
    brokers.extend([holder, other])
    holder.publish_many(queue, [b"1", b"2"])
    held = holder.fetch(queue, 2, 1.0)
    time.sleep(DEAD_AFTER + 2 * HEARTBEAT)  # the heartbeat thread keeps the holder alive
    assert other.recover_dead_consumers(queue) == 0
    _maintenance.discard(holder)  # a stall: no more heartbeats
    time.sleep(DEAD_AFTER + HEARTBEAT)
    assert other.recover_dead_consumers(queue) == 2
    got = other.fetch(queue, 10, 1.0)
    assert [(d.body, d.attempts) for d in got] == [(b"1", 2), (b"2", 2)]  # in order, one attempt counted
    with pytest.raises(DoubleAckError):
        holder.ack(held)
    with pytest.raises(DoubleAckError):
        holder.nack(held[0])
    other.ack(got)
    assert other.in_flight(queue) == 0 and other.count(queue) == 0


# -- REDIS_STREAM --------------------------------------------------------------------------------


def test_stream_group_ack_deletes_and_entries_without_data(client: redis.Redis, queue: str,
                                                           brokers: list[Broker]) -> None:
    broker = RedisStreamBroker(heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER)
    brokers.append(broker)
    client.xadd(queue, {"data": '{"x": 1}'})
    client.xadd(queue, {"payload": "no data field"})
    client.xadd(queue, {"data": '{"x": 2}', "note": "extra fields are ignored"})
    got = broker.fetch(queue, 10, 1.0)
    assert [json.loads(d.body) for d in got] == [{"x": 1}, {"x": 2}]
    [group] = client.xinfo_groups(queue)
    assert group["name"] == GROUP.encode() and group["pending"] == 2
    [letter] = broker.list_dead_letters(queue)
    assert json.loads(letter.body) == {"payload": "no data field"} and "'data'" in letter.reason
    broker.ack(got)
    assert client.xlen(queue) == 0 and broker.in_flight(queue) == 0  # acked entries are deleted
    with pytest.raises(DoubleAckError):
        broker.ack(got[:1])


def test_stream_nack_release_delay_and_purge(client: redis.Redis, queue: str, brokers: list[Broker]) -> None:
    broker = RedisStreamBroker(heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER)
    brokers.append(broker)
    broker.publish_many(queue, [b"a", b"b", b"c"])
    [a] = broker.fetch(queue, 1, 1.0)
    broker.nack(a)  # re-added at the end with delivered=1
    got = broker.fetch(queue, 10, 1.0)
    assert [(d.body, d.attempts) for d in got] == [(b"b", 1), (b"c", 1), (b"a", 2)]
    broker.release(got[2:])  # no attempt counted
    broker.nack(got[1], delay=0.3)
    assert broker.count(queue) == 2  # one waiting in the stream, one delayed
    got2 = fetch_all(broker, queue, 2, timeout=3)
    assert [(d.body, d.attempts) for d in got2] == [(b"a", 2), (b"c", 2)]
    broker.publish_many(queue, [b"x", b"y"])
    broker.publish(queue, b"z", not_before=time.time() + 60)
    assert broker.purge(queue) == 3  # waiting and delayed; the three in flight stay
    assert broker.count(queue) == 0 and broker.in_flight(queue) == 3
    broker.ack([got[0], *got2])
    assert client.xlen(queue) == 0 and broker.in_flight(queue) == 0


def test_stream_renewal_keeps_long_calls_and_stalled_entries_are_reclaimed(
        client: redis.Redis, queue: str, brokers: list[Broker]) -> None:
    min_idle = 0.6
    holder, other = (RedisStreamBroker(heartbeat_interval=min_idle / 4, dead_after=min_idle) for _ in range(2))
    brokers.extend([holder, other])
    holder.publish(queue, b'{"n": 1}')
    held = holder.fetch(queue, 1, 1.0)
    deadline = time.monotonic() + 3 * min_idle  # a call running five times min_idle...
    while time.monotonic() < deadline:
        assert other.fetch(queue, 10, 0.2) == []  # ...is never reclaimed while its process renews it
    _maintenance.discard(holder)  # a stall: no more renewals
    got = fetch_all(other, queue, 1, timeout=3 * min_idle)
    assert [(d.body, d.attempts) for d in got] == [(b'{"n": 1}', 2)]  # the delivery count says 2
    with pytest.raises(DoubleAckError):
        holder.nack(held[0])  # no longer its own: a stalled consumer adds no copy
    other.ack(got)
    assert client.xlen(queue) == 0 and other.in_flight(queue) == 0


def test_stream_group_is_created_again_when_the_stream_is_deleted(client: redis.Redis, queue: str,
                                                                  brokers: list[Broker]) -> None:
    broker = RedisStreamBroker(heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER)
    brokers.append(broker)
    broker.publish(queue, b"1")
    broker.ack(broker.fetch(queue, 1, 1.0))
    client.delete(queue)
    client.xadd(queue, {"data": "2"})
    got = broker.fetch(queue, 5, 1.0)
    assert [d.body for d in got] == [b"2"]
    broker.ack(got)


# -- RedisBrpopLpush and REDIS_STREAM: crashes counted for the poison-message rule ----------------


@pytest.mark.parametrize("kind", [BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM],
                         ids=["RedisBrpopLpush", "REDIS_STREAM"])
def test_recovered_messages_count_a_crash_and_a_nack_or_release_does_not(
        client: redis.Redis, queue: str, brokers: list[Broker], kind: BrokerEnum) -> None:
    cls = {BrokerEnum.RedisBrpopLpush: RedisBrpopLpushBroker, BrokerEnum.REDIS_STREAM: RedisStreamBroker}[kind]
    first, second, third = (cls(heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER) for _ in range(3))
    brokers.extend([first, second, third])
    first.publish_many(queue, [b"1", b"2"])
    held = fetch_all(first, queue, 2)
    assert [(d.body, d.attempts, d.crashes) for d in held] == [(b"1", 1, 0), (b"2", 1, 0)]
    _maintenance.discard(first)  # its consumer "dies": no more heartbeats
    time.sleep(DEAD_AFTER + HEARTBEAT)
    assert second.recover_dead_consumers(queue) == 2
    got = sorted(fetch_all(second, queue, 2), key=lambda d: d.body)
    assert [(d.body, d.attempts, d.crashes) for d in got] == [(b"1", 2, 1), (b"2", 2, 1)]
    second.nack(got[0])  # an attempt, no crash
    second.release(got[1:])  # neither
    again = sorted(fetch_all(second, queue, 2), key=lambda d: d.body)
    assert [(d.body, d.attempts, d.crashes) for d in again] == [(b"1", 3, 1), (b"2", 2, 1)]
    second.nack(again[0], delay=0.1)
    [late] = fetch_all(second, queue, 1)
    assert (late.body, late.attempts, late.crashes) == (b"1", 4, 1)
    _maintenance.discard(second)  # a second death while holding both
    time.sleep(DEAD_AFTER + HEARTBEAT)
    assert third.recover_dead_consumers(queue) == 2
    last = sorted(fetch_all(third, queue, 2), key=lambda d: d.body)
    assert [(d.body, d.attempts, d.crashes) for d in last] == [(b"1", 5, 2), (b"2", 3, 2)]
    third.ack(last)
    assert third.count(queue) == 0 and third.in_flight(queue) == 0


@posix_only
@pytest.mark.parametrize("kind", [BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM],
                         ids=["RedisBrpopLpush", "REDIS_STREAM"])
def test_a_killed_consumers_messages_come_back_within_dead_after_and_a_heartbeat(
        client: redis.Redis, queue: str, brokers: list[Broker], kind: BrokerEnum) -> None:
    cls = {BrokerEnum.RedisBrpopLpush: RedisBrpopLpushBroker, BrokerEnum.REDIS_STREAM: RedisStreamBroker}[kind]
    survivor = cls(heartbeat_interval=HEARTBEAT, dead_after=DEAD_AFTER)
    brokers.append(survivor)
    bodies = [b'{"k":%d}' % i for i in range(25)]
    survivor.publish_many(queue, bodies)
    code = (
        "import sys, time\n"
        f"from {cls.__module__} import {cls.__name__} as Broker\n"
        f"b = Broker(heartbeat_interval={HEARTBEAT}, dead_after={DEAD_AFTER})\n"
        "got = []\n"
        f"while len(got) < {len(bodies)}:\n"
        f"    got += b.fetch({queue!r}, 10, 1.0)\n"
        "sys.stdout.write('fetched %d\\n' % len(got))\n"
        "sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, FUNBOOST_LIKE_REDIS_URL=REDIS_URL, FUNBOOST_LIKE_NO_USER_CONFIG="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"fetched 25"
        assert survivor.count(queue) == 0 and survivor.in_flight(queue) == 25
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    killed_at = time.monotonic()
    got = fetch_all(survivor, queue, len(bodies), timeout=DEAD_AFTER + HEARTBEAT + 3.0)
    elapsed = time.monotonic() - killed_at
    assert sorted(d.body for d in got) == sorted(bodies)
    assert all((d.attempts, d.crashes) == (2, 1) for d in got)
    assert elapsed <= DEAD_AFTER + HEARTBEAT + 0.5, elapsed
    survivor.ack(got)
    assert survivor.in_flight(queue) == 0


# -- crash tests: real consumer processes killed with SIGKILL -------------------------------------


class Records:
    """What the workers wrote to the record file (``s <i> <pid>`` on start, ``d <i> <pid>`` on end)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[collections.Counter[int], collections.Counter[int]]:
        started: collections.Counter[int] = collections.Counter()
        done: collections.Counter[int] = collections.Counter()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return started, done
        for line in data[:data.rfind(b"\n") + 1].decode().splitlines():
            kind, ident, _ = line.split()
            (started if kind == "s" else done)[int(ident)] += 1
        return started, done


def start_worker(kind: BrokerEnum, queue: str, records: Records, tmp_path: Path, concurrent_num: int,
                 pause: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ, FUNBOOST_LIKE_REDIS_URL=REDIS_URL, FUNBOOST_LIKE_NO_USER_CONFIG="1",
               FUNBOOST_LIKE_REDIS_HEARTBEAT_SECONDS=str(HEARTBEAT),
               FUNBOOST_LIKE_REDIS_DEAD_AFTER_SECONDS=str(DEAD_AFTER),
               FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(tmp_path / f"worker-{time.monotonic_ns()}.log", "wb") as log:
        return subprocess.Popen([sys.executable, str(WORKER), queue, str(records.path), "--broker", kind.name,
                                 "--concurrent-num", str(concurrent_num), "--sleep", str(pause)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)


def worker_logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text("utf-8", "replace")[-2000:] for p in sorted(tmp_path.glob("worker-*.log")))


def wait_records(condition: Callable[[], bool], timeout: float, what: str, tmp_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\nworker logs:\n{worker_logs(tmp_path)}")
        time.sleep(0.005)


def publish_calls(kind: BrokerEnum, queue: str, total: int) -> None:
    @task_deco(queue, broker_kind=kind)
    def record(i: int) -> None:  # the worker's signature
        raise AssertionError("never run here")

    record.publish_many([{"i": i} for i in range(total)])


@posix_only
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", [BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM],
                         ids=["RedisBrpopLpush", "REDIS_STREAM"])
def test_sigkilled_consumers_lose_nothing(client: redis.Redis, queue: str, tmp_path: Path, kind: BrokerEnum,
                                          children: list[subprocess.Popen[bytes]]) -> None:
    total, concurrent_num, kills = 3000, 20, 3
    publish_calls(kind, queue, total)
    records = Records(tmp_path / "records.txt")
    progress_at_kills = []
    began = time.monotonic()
    for k in range(kills):
        threshold = 400 + 700 * k
        child = start_worker(kind, queue, records, tmp_path, concurrent_num, 0.001)
        children.append(child)
        wait_records(lambda n=threshold, c=child: len(records.read()[1]) >= n or c.poll() is not None, 60,
                     f"{threshold} calls done", tmp_path)
        assert child.poll() is None, f"worker exited with {child.returncode}\n{worker_logs(tmp_path)}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(5) == -signal.SIGKILL
        progress_at_kills.append(len(records.read()[1]))
    assert all(p < total for p in progress_at_kills), progress_at_kills  # every kill hit a busy consumer

    broker = {BrokerEnum.RedisBrpopLpush: RedisBrpopLpushBroker, BrokerEnum.REDIS_STREAM: RedisStreamBroker}[kind]()
    try:
        last = start_worker(kind, queue, records, tmp_path, concurrent_num, 0.001)
        children.append(last)
        wait_records(lambda: len(records.read()[1]) >= total and broker.count(queue) == 0
                     and broker.in_flight(queue) == 0, 60, "every message done and acknowledged", tmp_path)
        elapsed = time.monotonic() - began
        last.send_signal(signal.SIGTERM)
        assert last.wait(15) in (0, -signal.SIGTERM), worker_logs(tmp_path)
        started, done = records.read()
        lost = set(range(total)) - set(done)
        executions = sum(done.values())
        duplicates = executions - len(done)
        cut_short = sum(started.values()) - executions
        print(f"\n{kind.name}: {kills} SIGKILLs at {progress_at_kills} calls done; {executions} executions of "
              f"{total} messages: {len(lost)} lost, {duplicates} duplicate(s), {cut_short} call(s) cut short; "
              f"{elapsed:.1f}s")
        assert not lost, f"{len(lost)} message(s) never ran: {sorted(lost)[:20]}"
        # Only what a killed process held (at most concurrent_num each) may run again.
        assert duplicates + cut_short <= kills * concurrent_num, (duplicates, cut_short)
        assert broker.count(queue) == 0 and broker.in_flight(queue) == 0
        if kind == BrokerEnum.REDIS_STREAM:
            assert client.xlen(queue) == 0  # everything acked was deleted
        else:
            assert client.llen(queue) == 0
    finally:
        broker.close()


@posix_only
@pytest.mark.timeout(60)
def test_plain_list_loses_at_most_what_a_killed_consumer_held(client: redis.Redis, queue: str, tmp_path: Path,
                                                              children: list[subprocess.Popen[bytes]]) -> None:
    """REDIS is at-most-once: a SIGKILL loses the messages the process held, never more than concurrent_num."""
    total, concurrent_num = 1500, 20
    publish_calls(BrokerEnum.REDIS, queue, total)
    records = Records(tmp_path / "records.txt")
    child = start_worker(BrokerEnum.REDIS, queue, records, tmp_path, concurrent_num, 0.02)
    children.append(child)
    wait_records(lambda: len(records.read()[1]) >= 200 or child.poll() is not None, 30, "200 calls done", tmp_path)
    child.send_signal(signal.SIGKILL)
    assert child.wait(5) == -signal.SIGKILL
    started, done = records.read()
    running_at_kill = len(started) - len(done)
    waiting = RedisListBroker().count(queue)
    held = total - len(done) - waiting  # fetched by the killed process and never finished
    last = start_worker(BrokerEnum.REDIS, queue, records, tmp_path, concurrent_num, 0)
    children.append(last)
    wait_records(lambda: RedisListBroker().count(queue) == 0 and len(records.read()[1]) >= total - held, 30,
                 "the rest of the queue", tmp_path)
    time.sleep(0.2)
    last.send_signal(signal.SIGTERM)
    assert last.wait(15) in (0, -signal.SIGTERM), worker_logs(tmp_path)
    _, done = records.read()
    lost = total - len(done)
    print(f"\nREDIS: one SIGKILL with concurrent_num={concurrent_num}: {lost} message(s) lost "
          f"({running_at_kill} running, {lost - running_at_kill} fetched but not started)")
    assert lost == held
    assert 0 < lost <= concurrent_num
    assert max(done.values()) == 1  # at-most-once: nothing ran twice


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_stream_consumer_reads_under_its_own_name(client: redis.Redis, queue: str,
                                                           brokers: list[Broker]) -> None:
    broker = RedisStreamBroker()
    brokers.append(broker)
    broker.publish_many(queue, [b"parent", b"child"])
    parent_got = broker.fetch(queue, 1, 1.0)  # also caches the read pipeline, which names the consumer
    parent_name = broker.consumer_id

    def in_child() -> str:
        got = broker.fetch(queue, 1, 2.0)
        pending = redis.Redis.from_url(REDIS_URL).xpending_range(queue, GROUP, "-", "+", 10)
        owner = next(p["consumer"].decode() for p in pending if p["message_id"] == got[0].token)
        broker.ack(got)
        return f"{broker.consumer_id}|{owner}|{got[0].body.decode()}"

    child_name, owner, body = in_forked_child(in_child).split("|")
    assert body == "child" and child_name != parent_name and owner == child_name
    broker.ack(parent_got)


def test_stream_publish_many_onto_a_key_of_another_type_raises(client: redis.Redis, queue: str,
                                                                brokers: list[Broker]) -> None:
    from funboost_like.core.errors import BrokerError

    broker = RedisStreamBroker()
    brokers.append(broker)
    client.set(queue, "not a stream")
    with pytest.raises(BrokerError, match="WRONGTYPE"):
        broker.publish_many(queue, [b"{}"] * 1200)  # more than one packed write
    client.delete(queue)
    broker.publish_many(queue, [b"{}"] * 1200)  # the connection stayed in step
    assert broker.count(queue) == 1200


@pytest.mark.parametrize("kind", [*KINDS, BrokerEnum.REDIS_ACK_ABLE])
def test_a_queue_name_of_the_frameworks_own_keys_is_refused_at_decoration(client: redis.Redis, queue: str,
                                                                          kind: BrokerEnum) -> None:
    """A queue's own key is its name, so a queue named ``fl:{q}:p1`` (``fl:{q}:dead``, ...) was queue
    ``q``'s priority-1 list (dead letters, ...): two queues silently sharing storage."""
    for name in (f"fl:{{{queue}}}:p1", f"fl:{{{queue}}}:dead", "fl:scheduler:jobs"):
        with pytest.raises(ConfigurationError, match="'fl:'"):
            task_deco(name, broker_kind=kind)(lambda x: x)
    task_deco(f"{queue}fl:", broker_kind=kind)(lambda x: x)  # only the prefix is the framework's


@pytest.mark.parametrize("kind", [BrokerEnum.REDIS_ACK_ABLE, BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM],
                         ids=["REDIS_ACK_ABLE", "RedisBrpopLpush", "REDIS_STREAM"])
def test_a_consumers_graceful_stop_removes_its_registry_entry(client: redis.Redis, queue: str,
                                                              kind: BrokerEnum) -> None:
    """Through the consumer (not the broker alone): its stop settles what it ran, then retires from the
    queue's registry at once, not a sweep ``dead_after`` seconds later."""
    done = threading.Event()

    @task_deco(queue, broker_kind=kind, log_level=logging.WARNING, concurrent_num=4)
    def work(i: int) -> None:
        if i == 19:
            done.set()

    work.publish_many([{"i": i} for i in range(20)])
    work.consume()
    assert done.wait(10)
    registry = f"fl:{{{queue}}}:{'unack-consumers' if kind == BrokerEnum.RedisBrpopLpush else 'consumers'}"
    assert client.zcard(registry) == 1  # this consumer, beating
    work.consumer.stop()
    assert work.consumer.join(10)
    assert client.zcard(registry) == 0 and work.broker.count(queue) == 0


WAITING_KINDS = [BrokerEnum.REDIS, BrokerEnum.REDIS_ACK_ABLE, BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's sockets in /proc")
@pytest.mark.parametrize("kind", WAITING_KINDS, ids=[k.name for k in WAITING_KINDS])
def test_a_stopped_consumer_leaves_no_wait_connection_and_no_heartbeat_behind(
        client: redis.Redis, brokers: list[Broker], kind: BrokerEnum) -> None:
    """A process consuming queue after queue (consumers started and stopped) kept open, for every queue it
    had ever consumed, the connection its idle fetches waited on, and its maintenance went on beating in
    the queue's registry, one more script per queue every heartbeat."""
    broker: Broker = (RedisListBroker() if kind == BrokerEnum.REDIS else
                      {BrokerEnum.REDIS_ACK_ABLE: RedisAckAbleBroker, BrokerEnum.RedisBrpopLpush: RedisBrpopLpushBroker,
                       BrokerEnum.REDIS_STREAM: RedisStreamBroker}[kind](heartbeat_interval=5.0, dead_after=15.0))
    brokers.append(broker)
    queues = [f"test_rb_{uuid.uuid4().hex[:12]}" for _ in range(5)]
    try:
        broker.publish(queues[0], b"{}")
        broker.ack(fetch_all(broker, queues[0], 1))  # the shared connections are open
        before = open_sockets()
        for queue in queues:
            assert broker.fetch(queue, 1, 0.05) == []  # an idle fetch waits on a connection of its own
            broker.maintain()  # a heartbeat
            broker.stop_fetching(queue)
            broker.stopped_consuming(queue)
        assert open_sockets() <= before
        broker.maintain()
        if kind != BrokerEnum.REDIS:
            consumer = getattr(broker, "consumer_id")  # noqa: B009 - not part of the base contract
            assert [client.zscore(f"fl:{{{queue}}}:consumers", consumer) for queue in queues] == [None] * 5
        broker.publish(queues[0], b"{}")  # consuming again
        got = fetch_all(broker, queues[0], 1)
        assert len(got) == 1
        broker.ack(got)
    finally:
        client.delete(*queues, *[key for queue in queues for key in client.scan_iter(match=f"fl:{{{queue}}}:*")])
