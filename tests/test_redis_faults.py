"""Redis killed (SIGKILL) and restarted while a real consumer process works through thousands of messages.

Each test starts its own password-protected ``redis-server`` on a free port with persistence on
(``--appendonly yes --appendfsync always``), never touching the shared server on 6379, and stops it
by its PID at teardown, whatever happened. The consumer is ``test_frame/crash/redis_worker.py``,
recording every call it starts and finishes with O_APPEND lines. In the middle of consumption the
test SIGKILLs the server, waits about two seconds and starts it again on the same port and folder,
so the append-only file replays. Then:

* the consumer process is still alive and finishes the queue by itself (its fetch loop backs off and
  reconnects);
* on the ack-able kinds (REDIS_ACK_ABLE, RedisBrpopLpush, REDIS_STREAM) every message ran at least
  once, nothing waits or stays in flight at the end, and duplicates stay within what the consumer
  held around the outage;
* on plain REDIS (at-most-once) no message ran twice, and the messages lost are counted and bounded;
* the password never appears in the worker's log.

Then, for every kind and without a worker process: while the server is down every broker operation
raises ``BrokerConnectionError`` (password redacted), and once it is back the same broker object works
again, sending first the acks and nacks that failed meanwhile (REDIS_ACK_ABLE, RedisBrpopLpush).
The last tests run the seed examples of sections 6.14 (REDIS_STREAM) and 6.15 (RedisBrpopLpush)
against a private server: they publish, consume, and exit on SIGTERM.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from funboost_like import BrokerEnum, patch_frame_config, task_deco
from funboost_like.brokers.base import Broker, Delivery
from funboost_like.brokers.redis_ack_able import RedisAckAbleBroker
from funboost_like.brokers.redis_brpoplpush import RedisBrpopLpushBroker
from funboost_like.brokers.redis_list import RedisListBroker
from funboost_like.brokers.redis_stream import RedisStreamBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.core.errors import BrokerConnectionError
from tests.conftest import REPO
from tests.private_redis import PrivateRedis
from tests.test_seed_examples import SUM, Expected, check_exact_output, check_graceful_exit, run

WORKER = REPO / "test_frame" / "crash" / "redis_worker.py"
PASSWORD = "s3cret-fault"
TOTAL, CONCURRENT_NUM, PAUSE = 3000, 20, 0.01
KILL_AT = 900  # calls finished when the server is killed
DOWN_SECONDS = 2.0

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
    pytest.mark.skipif(sys.platform == "win32" or not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"),
]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[PrivateRedis]]:
    """Private servers a test starts; every one is stopped by its PID at the end, even on failure."""
    started: list[PrivateRedis] = []
    yield started
    for server in started:
        server.stop()


def private_redis(servers: list[PrivateRedis], folder: Path, *, persistent: bool = True) -> PrivateRedis:
    folder.mkdir(parents=True, exist_ok=True)
    server = PrivateRedis(folder, password=PASSWORD, persistent=persistent)
    servers.append(server)
    server.start()
    return server


class Records:
    """Lines ``s <i> <pid>`` (call started) and ``d <i> <pid>`` (call done) written by the worker."""

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

    def lines(self) -> int:
        try:
            return self.path.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0


def wait_until(condition: Callable[[], bool], timeout: float, what: str, log: Path,
               state: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text("utf-8", "replace")[-3000:] if log.exists() else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what} ({state()})\nworker log:\n{text}")
        time.sleep(0.01)


def fetch_all(broker: Broker, queue: str, n: int, timeout: float = 3.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += broker.fetch(queue, n - len(got), 0.2)
    return got


def outage(kind: BrokerEnum, tmp_path: Path, servers: list[PrivateRedis],
           children: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    """Publish TOTAL calls, consume them in a worker process, kill and restart Redis in the middle.

    Returns the figures; asserts the worker survived and finished by itself, and nothing is left.
    """
    server = private_redis(servers, tmp_path / "redis")
    patch_frame_config(REDIS_URL=server.url)
    queue = f"fault_{kind.name}"

    @task_deco(queue, broker_kind=kind)
    def record(i: int) -> None:  # the worker's signature
        raise AssertionError("never run here")

    record.publish_many([{"i": i} for i in range(TOTAL)])
    broker = get_broker(kind)
    assert broker.count(queue) == TOTAL

    records = Records(tmp_path / "records.txt")
    log = tmp_path / "worker.log"
    env = dict(os.environ, FUNBOOST_LIKE_REDIS_URL=server.url, FUNBOOST_LIKE_NO_USER_CONFIG="1",
               FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, str(WORKER), queue, str(records.path), "--broker", kind.name,
                                   "--concurrent-num", str(CONCURRENT_NUM), "--sleep", str(PAUSE)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    children.append(worker)
    began = time.monotonic()
    wait_until(lambda: len(records.read()[1]) >= KILL_AT or worker.poll() is not None, 30, f"{KILL_AT} calls", log)
    assert worker.poll() is None, log.read_text("utf-8", "replace")[-3000:]

    server.kill()
    done_at_kill = len(records.read()[1])
    time.sleep(DOWN_SECONDS)
    assert worker.poll() is None, "the consumer died while Redis was down"
    settled = records.lines()  # the calls running at the kill have finished by now
    replay = server.start()
    restarted = time.monotonic()
    wait_until(lambda: records.lines() > settled or worker.poll() is not None, 40, "a call after the restart", log)
    reconnect = time.monotonic() - restarted
    assert worker.poll() is None, log.read_text("utf-8", "replace")[-3000:]

    lost_for_good = kind == BrokerEnum.REDIS

    def finished() -> bool:
        if broker.count(queue) or getattr(broker, "in_flight")(queue):  # noqa: B009
            return False
        started, done = records.read()
        return len(done) >= TOTAL or (lost_for_good and len(started) == len(done))

    wait_until(finished, 40, "every message done and acknowledged", log,
               lambda: f"waiting {broker.count(queue)}, in flight {getattr(broker, 'in_flight')(queue)}, "  # noqa: B009
                       f"done {len(records.read()[1])}")
    time.sleep(0.3)  # a late duplicate would show up now
    elapsed = time.monotonic() - began
    assert worker.poll() is None, "the consumer exited before it was asked to"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) in (0, -signal.SIGTERM), log.read_text("utf-8", "replace")[-3000:]
    assert broker.count(queue) == 0 and getattr(broker, "in_flight")(queue) == 0  # noqa: B009 - nothing handed back

    started, done = records.read()
    text = log.read_text("utf-8", "replace")
    assert PASSWORD not in text
    assert "fetching from queue" in text  # the fetch loop met the outage and went on
    executions = sum(done.values())
    figures = {
        "lost": TOTAL - len(done),
        "duplicates": executions - len(done),
        "cut_short": sum(started.values()) - executions,
        "done_at_kill": done_at_kill,
        "replay": replay,
        "reconnect": reconnect,
        "elapsed": elapsed,
        "max_runs": max(done.values()),
    }
    print(f"\n{kind.name}: Redis killed at {done_at_kill}/{TOTAL} calls done, down {DOWN_SECONDS:.0f}s, "
          f"AOF replayed in {replay:.2f}s; consuming again {reconnect:.2f}s after the restart; "
          f"{figures['lost']} lost, {figures['duplicates']} duplicate(s), {figures['cut_short']} cut short; "
          f"{elapsed:.1f}s in all")
    return figures


ACK_ABLE = [BrokerEnum.REDIS_ACK_ABLE, BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ACK_ABLE, ids=[k.name for k in ACK_ABLE])
def test_ack_able_kinds_lose_nothing_when_redis_is_killed_and_restarted(
        kind: BrokerEnum, tmp_path: Path, servers: list[PrivateRedis],
        children: list[subprocess.Popen[bytes]]) -> None:
    figures = outage(kind, tmp_path, servers, children)
    assert figures["lost"] == 0
    # What the consumer held around the outage may run again: the calls running when Redis died
    # (their acks failed) and a fetch whose reply was lost. Each is at most concurrent_num.
    assert figures["duplicates"] <= 2 * CONCURRENT_NUM, figures
    assert figures["cut_short"] == 0  # the consumer itself was never killed


@pytest.mark.timeout(60)
def test_plain_list_consumer_reconnects_and_loses_at_most_one_fetch(
        tmp_path: Path, servers: list[PrivateRedis], children: list[subprocess.Popen[bytes]]) -> None:
    figures = outage(BrokerEnum.REDIS, tmp_path, servers, children)
    assert figures["max_runs"] == 1  # at-most-once: nothing ran twice
    # Only a fetch whose reply was lost can lose messages (the process keeps what it fetched).
    assert figures["lost"] <= CONCURRENT_NUM, figures


# -- every operation while the server is down, and afterwards ------------------------------------------

ALL_KINDS = [BrokerEnum.REDIS, *ACK_ABLE]


def make_broker(kind: BrokerEnum) -> Broker:
    if kind == BrokerEnum.REDIS:
        return RedisListBroker()
    if kind == BrokerEnum.REDIS_STREAM:
        return RedisStreamBroker(heartbeat_interval=0.2, dead_after=1.0)
    cls = RedisAckAbleBroker if kind == BrokerEnum.REDIS_ACK_ABLE else RedisBrpopLpushBroker
    return cls(heartbeat_interval=0.2, dead_after=1.0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ALL_KINDS, ids=[k.name for k in ALL_KINDS])
def test_every_operation_raises_broker_connection_error_while_down_and_works_again(
        kind: BrokerEnum, tmp_path: Path, servers: list[PrivateRedis], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="funboost_like")
    server = private_redis(servers, tmp_path / "redis")
    patch_frame_config(REDIS_URL=server.url)
    queue = f"down_{kind.name}"
    broker = make_broker(kind)
    try:
        broker.publish_many(queue, [b"a", b"b", b"c"])
        got = fetch_all(broker, queue, 3)
        assert [d.body for d in got] == [b"a", b"b", b"c"]
        server.kill()
        in_flight = getattr(broker, "in_flight")  # noqa: B009 - not part of the base contract
        store = broker.key_value_store(queue, "results")
        operations: list[Callable[[], object]] = [
            lambda: broker.publish(queue, b"x"), lambda: broker.publish_many(queue, [b"x", b"y"]),
            lambda: broker.publish(queue, b"x", not_before=time.time() + 5), lambda: broker.fetch(queue, 5, 0.1),
            lambda: broker.count(queue), lambda: broker.purge(queue), lambda: broker.list_dead_letters(queue),
            lambda: store.put("k", b"v", 10), lambda: store.get("k")]
        if kind != BrokerEnum.REDIS:  # plain REDIS keeps nothing in flight in Redis, so it sends nothing on ack
            operations += [lambda: in_flight(queue), lambda: broker.ack(got[:1]), lambda: broker.nack(got[1])]
        for number, operation in enumerate(operations):
            with pytest.raises(BrokerConnectionError) as info:
                operation()
                pytest.fail(f"operation {number} did not raise")
            assert PASSWORD not in str(info.value) and "***" in str(info.value)
        server.start()  # the AOF replays; the connections and scripts come back by themselves
        broker.publish(queue, b"d")
        if kind == BrokerEnum.REDIS:
            again = fetch_all(broker, queue, 1)
            assert [d.body for d in again] == [b"d"]
            broker.ack([*got, *again])
        else:
            # The fetch first resent the ack of "a" and the nack of "b" (b back at the tail, one attempt more).
            again = fetch_all(broker, queue, 2)
            assert [(d.body, d.attempts) for d in again] == [(b"d", 1), (b"b", 2)]
            assert in_flight(queue) == 3  # c, d and b: a's ack went through
            broker.ack([got[2], *again])
        assert broker.count(queue) == 0 and in_flight(queue) == 0
        assert store.get("k") is None
    finally:
        broker.close()
    assert PASSWORD not in caplog.text


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ACK_ABLE, ids=[k.name for k in ACK_ABLE])
def test_acks_sent_with_a_fetch_that_meets_a_dead_server_are_sent_again(
        kind: BrokerEnum, tmp_path: Path, servers: list[PrivateRedis]) -> None:
    server = private_redis(servers, tmp_path / "redis")
    patch_frame_config(REDIS_URL=server.url)
    queue = f"piggyback_{kind.name}"
    broker = make_broker(kind)
    in_flight = getattr(broker, "in_flight")  # noqa: B009 - not part of the base contract
    try:
        broker.publish_many(queue, [b"a", b"b", b"c"])
        got = fetch_all(broker, queue, 3)
        server.kill()
        with pytest.raises(BrokerConnectionError):
            broker.ack_and_fetch(got[:2], queue, 1, 0.1)
        server.start()
        assert in_flight(queue) == 3  # the acks did not reach Redis
        assert fetch_all(broker, queue, 1, timeout=0.5) == []  # this fetch sent them first
        assert in_flight(queue) == 1
        broker.ack(got[2:])
        assert broker.count(queue) == 0 and in_flight(queue) == 0
    finally:
        broker.close()


@pytest.mark.timeout(30)
def test_stream_consumer_fetches_again_after_redis_restarted_empty_during_a_fetch(
        tmp_path: Path, servers: list[PrivateRedis]) -> None:
    # A fetch that failed on the dead server leaves the queue suspect (its reply may have been lost), so
    # the next fetch first reads this consumer's pending entries: with the group gone (the server came
    # back without its data) that read met NOGROUP, the queue stayed suspect and every fetch failed for good.
    server = private_redis(servers, tmp_path / "redis", persistent=False)
    patch_frame_config(REDIS_URL=server.url)
    queue = "restarted_empty_stream"
    broker = make_broker(BrokerEnum.REDIS_STREAM)
    try:
        broker.publish(queue, b"a")
        broker.ack(fetch_all(broker, queue, 1))
        server.kill()
        with pytest.raises(BrokerConnectionError):
            broker.fetch(queue, 1, 0.1)
        server.start()
        broker.publish(queue, b"b")
        got = fetch_all(broker, queue, 1)
        assert [d.body for d in got] == [b"b"]
        broker.ack(got)
    finally:
        broker.close()


def test_a_pipeline_after_a_restart_never_meets_a_connection_the_server_closed(
        tmp_path: Path, servers: list[PrivateRedis]) -> None:
    from funboost_like.brokers.redis_common import DirectConnections

    server = private_redis(servers, tmp_path / "redis", persistent=False)
    conn = DirectConnections(redis.Redis.from_url(server.url))
    idle = [conn._new() for _ in range(3)]  # idle connections, as several threads leave them
    for connection in idle:
        connection.connect()
    conn._idle.extend(idle)
    server.kill()
    server.start()
    for _ in range(3):
        replies = conn.pipeline([("SET", "k", "v"), ("GET", "k")])
        assert not any(isinstance(reply, Exception) for reply in replies) and replies[1] == b"v"
    conn.close()


def test_deferred_settlements_keep_what_met_a_dead_server_and_drop_what_redis_refused() -> None:
    broker = RedisAckAbleBroker(heartbeat_interval=0.2, dead_after=1.0)  # the base keeps them (never connects here)
    sent: list[str] = []
    down = [True]

    def send(name: str) -> None:
        if name == "refused":
            raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        if name == "second" and down[0]:
            raise redis.exceptions.ConnectionError("Connection refused")
        sent.append(name)

    for name in ("first", "refused", "second", "third"):  # (send, its deliveries): these need none
        broker._deferred.append((lambda _deliveries, name=name: send(name), []))
    with pytest.raises(BrokerConnectionError):
        broker._send_deferred("fetching")
    assert sent == ["first"] and broker._deferred  # "second" and "third" wait for the next fetch
    down[0] = False
    broker._send_deferred("fetching")
    assert sent == ["first", "second", "third"] and not broker._deferred


# -- seed examples 6.14 and 6.15 --------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["ex_6_14_redis_stream.py", "ex_6_15_brpoplpush.py"])
def test_seed_redis_stream_and_brpoplpush_examples(isolated_settings: Path, tmp_path: Path, name: str,
                                                   servers: list[PrivateRedis]) -> None:
    server = private_redis(servers, tmp_path / "redis", persistent=False)
    expected: Expected = {SUM: collections.Counter((str(i), str(2 * i), str(3 * i)) for i in range(100))}
    script = run(name, isolated_settings, tmp_path, FUNBOOST_LIKE_REDIS_URL=server.url)
    try:
        script.wait_for(expected, timeout=20)
        time.sleep(0.3)  # a duplicate would show up now
        took = check_graceful_exit(script)
    finally:
        script.kill()
    check_exact_output(script, expected)
    assert PASSWORD not in script.stderr
    kind = BrokerEnum.REDIS_STREAM if "stream" in name else BrokerEnum.RedisBrpopLpush
    patch_frame_config(REDIS_URL=server.url)
    broker = get_broker(kind)
    assert broker.count("queue_test_f01") == 0
    assert getattr(broker, "in_flight")("queue_test_f01") == 0  # noqa: B009
    print(f"{name}: 100 calls; stopped in {took:.2f}s")
