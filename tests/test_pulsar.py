"""Pulsar (kind PULSAR): what the contract suite does not cover, on pulsar-lite (tests/pulsar_server.py)
or the server at FUNBOOST_LIKE_PULSAR_URL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pulsar
import pytest

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco
from funboost_like.brokers.base import Broker, Delivery
from funboost_like.brokers.pulsar_broker import PulsarBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.core.config import patch_frame_config, settings
from funboost_like.core.errors import ConfigurationError

from .conftest import in_forked_child, require_server, subprocess_env
from .pulsar_server import (
    PulsarLiteServer,
    _pulsar_server,  # noqa: F401 - starts pulsar-lite when these tests run alone
    program,
)
from .standin import free_port

URL = os.environ.get("FUNBOOST_LIKE_PULSAR_URL", "pulsar://127.0.0.1:6650")


@pytest.fixture
def queue(queue_name: str) -> Iterator[str]:
    parts = urlsplit(URL)
    require_server("Pulsar", parts.hostname or "127.0.0.1", parts.port or 6650)
    patch_frame_config(PULSAR_URL=URL)
    yield queue_name
    broker = get_broker(BrokerEnum.PULSAR)
    broker.purge(queue_name)
    broker.purge_dead_letters(queue_name)


def test_a_plain_pulsar_client_publishing_json_reaches_the_consumer(queue: str) -> None:
    got, done = [], threading.Event()

    @task_deco(queue, broker_kind=BrokerEnum.PULSAR)
    def f(x: int) -> None:
        got.append(x)
        done.set()

    assert f.get_message_count() == 0  # makes the subscription: the server keeps what is published from now on
    client = pulsar.Client(URL, logger=logging.getLogger("test.pulsar"))
    try:
        client.create_producer(f"persistent://public/default/{queue}").send(json.dumps({"x": 42}).encode())
    finally:
        client.close()
    f.consume()
    assert done.wait(15) and got == [42]


def test_countdown_and_retry_backoff_wait_in_the_delayed_topic(queue: str) -> None:
    runs: list[tuple[str, float]] = []
    done = threading.Event()

    @task_deco(queue, broker_kind=BrokerEnum.PULSAR, max_retry_times=2, retry_backoff=0.3, retry_backoff_max=0.3,
               retry_jitter=False)
    def f(kind: str) -> None:
        runs.append((kind, time.time()))
        if kind == "flaky" and sum(1 for k, _ in runs if k == "flaky") < 3:
            raise ValueError("not yet")
        if kind == "flaky":
            done.set()

    pushed = time.time()
    f.publish({"kind": "late"}, priority_control_config=PriorityConsumingControlConfig(countdown=1.0))
    f.push("flaky")
    f.consume()
    assert done.wait(20)
    deadline = time.monotonic() + 10
    while not any(k == "late" for k, _ in runs) and time.monotonic() < deadline:
        time.sleep(0.05)
    late = [t for k, t in runs if k == "late"]
    flaky = [t for k, t in runs if k == "flaky"]
    assert len(late) == 1 and late[0] - pushed >= 0.95
    assert len(flaky) == 3 and flaky[1] - flaky[0] >= 0.28 and flaky[2] - flaky[1] >= 0.28  # each retry waited


def test_a_retried_message_is_not_taken_for_a_poison_message(queue: str) -> None:
    """Retries publish a copy with the counts in properties: Pulsar's redelivery count (deaths) stays 0."""
    broker = get_broker(BrokerEnum.PULSAR)
    broker.publish(queue, b"{}")
    [first] = fetch(broker, queue, 1)
    for attempt in (2, 3, 4):
        broker.nack(first, requeue=True)
        [first] = fetch(broker, queue, 1)
        assert (first.attempts, first.crashes) == (attempt, 0)
    broker.ack([first])


def test_a_dead_consumers_messages_count_as_crashes(queue: str) -> None:
    """A consumer that goes without settling: the server delivers its messages again, counted as a crash.
    (The holder closes before the taker starts: pulsar-lite refuses two live consumers with one consumer id,
    and every client numbers its consumers from 0; see docs/pulsar.md.)"""
    holder, taker = PulsarBroker(), get_broker(BrokerEnum.PULSAR)
    holder.publish_many(queue, [b'{"n":1}', b'{"n":2}'])
    assert len(fetch(holder, queue, 2)) == 2
    holder.close()  # its connection ends: the server dispatches them again
    again = fetch(taker, queue, 2)
    assert sorted(d.body for d in again) == [b'{"n":1}', b'{"n":2}']
    assert all((d.attempts, d.crashes) == (2, 1) for d in again)
    taker.ack(again)


def test_a_message_whose_holders_died_three_times_is_dead_lettered_without_running(queue: str) -> None:
    """The poison-message rule on Pulsar without the contract test's SIGKILLs (skipped on pulsar-lite, whose
    reset bug they hit, see the registry): three holders end with the message unsettled, each counted as a
    death by the server's redelivery count, and the consumer dead-letters it without running it."""
    broker = get_broker(BrokerEnum.PULSAR)
    broker.publish(queue, b'{"x": 1}')
    for crashes in range(3):
        holder = PulsarBroker()
        [held] = fetch(holder, queue, 1)
        assert held.crashes == crashes
        holder.close()
    runs: list[int] = []
    fn = task_deco(queue, broker_kind=BrokerEnum.PULSAR, max_crash_redeliveries=3)(lambda x: runs.append(x))
    fn.consume()
    deadline = time.monotonic() + 15
    while not (letters := broker.list_dead_letters(queue)) and time.monotonic() < deadline:
        time.sleep(0.05)
    [letter] = letters
    assert "poison" in letter.reason and "died 3 time(s)" in letter.reason and json.loads(letter.body) == {"x": 1}
    assert runs == [] and broker.count(queue) == 0


def test_a_fetch_takes_what_the_receiver_queue_holds(queue: str) -> None:
    """The ready topic is read through a receiver queue (the first fetch's size): a fetch takes every
    message that arrived, in order. The zero-queue consumer before it took one message per fetch, a
    round trip to the server each (2.2k calls/s against 14k/s now)."""
    broker = get_broker(BrokerEnum.PULSAR)
    bodies = [f'{{"n":{i}}}'.encode() for i in range(50)]
    broker.publish_many(queue, bodies)
    got: list[Delivery] = []
    fetches = 0
    deadline = time.monotonic() + 10
    while len(got) < 50 and time.monotonic() < deadline:
        got += broker.fetch(queue, 50 - len(got), 0.5)
        fetches += 1
    assert [d.body for d in got] == bodies
    assert fetches <= 10, fetches  # one burst of 50 messages: a few fetches, not 50
    broker.ack(got)


def test_due_delayed_messages_move_in_batches(queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``count`` puts what waits back through the delayed topic, due at once (docs/pulsar.md): the mover
    moved it back one send (one round trip) at a time, so a consumer started after a ``count`` of a
    backlog ran at the mover's pace, about 1k calls/s (benchmarks/throughput.py counts before it
    consumes). It now moves what its receiver queue holds in batches, in order."""
    broker = PulsarBroker()
    sends: list[int] = []
    send = broker._send

    def counted(topic: str, items: list[tuple[bytes, dict[str, str] | None]]) -> None:
        if topic.endswith(f"/{queue}"):
            sends.append(len(items))
        send(topic, items)

    try:
        bodies = [f'{{"n":{i}}}'.encode() for i in range(300)]
        broker.publish_many(queue, bodies)
        assert broker.count(queue) == 300
        monkeypatch.setattr(broker, "_send", counted)
        got = fetch(broker, queue, 300)
        assert [d.body for d in got] == bodies
        assert sum(sends) == 300 and len(sends) <= 30, sends
        broker.ack(got)
    finally:
        broker.close()


def test_a_message_left_in_departed_holders_receiver_queues_counts_one_crash(queue: str) -> None:
    """Two plain consumers receive the message and close without settling it: the server counts two
    redeliveries. A holder of the ready topic may have held a message without running it (waiting in its
    receiver queue), so there they count one crash, not two: the message is a suspect that runs alone,
    not a step from the poison rule for having waited."""
    broker = get_broker(BrokerEnum.PULSAR)
    broker.publish(queue, b'{"x": 1}')
    client = pulsar.Client(URL, logger=logging.getLogger("test.pulsar"))
    try:
        for _ in range(2):
            holder = client.subscribe(f"persistent://public/default/{queue}", "fl",
                                      consumer_type=pulsar.ConsumerType.Shared,
                                      initial_position=pulsar.InitialPosition.Earliest)
            holder.receive(10_000)
            holder.close()
    finally:
        client.close()
    [again] = fetch(broker, queue, 1)
    assert (again.body, again.attempts, again.crashes) == (b'{"x": 1}', 2, 1)
    broker.ack([again])
    assert broker.count(queue) == 0


def test_a_suspect_is_taken_alone(queue: str) -> None:
    """A message whose holder went is taken alone (the consumer runs it alone); nacked with a delay, it
    comes back a suspect again (its crash kept), alone."""
    broker = get_broker(BrokerEnum.PULSAR)
    broker.publish(queue, b'{"s": 1}')
    holder = PulsarBroker()
    fetch(holder, queue, 1)
    broker.publish_many(queue, [b'{"r": 1}', b'{"r": 2}'])
    holder.close()  # the server delivers it again, counted
    batches = fetch_batches(broker, queue, 3)
    assert [b'{"s": 1}'] in [[d.body for d in batch] for batch in batches]
    got = {d.body: d for batch in batches for d in batch}
    assert sorted(got) == [b'{"r": 1}', b'{"r": 2}', b'{"s": 1}']
    assert (got[b'{"s": 1}'].attempts, got[b'{"s": 1}'].crashes) == (2, 1)
    broker.nack(got[b'{"s": 1}'], requeue=True, delay=0.3)
    broker.ack([got[b'{"r": 1}'], got[b'{"r": 2}']])
    broker.publish(queue, b'{"r": 3}')
    batches = fetch_batches(broker, queue, 2)
    assert [b'{"s": 1}'] in [[d.body for d in batch] for batch in batches]
    again = next(d for batch in batches for d in batch if d.body == b'{"s": 1}')
    assert (again.attempts, again.crashes) == (3, 1)
    broker.ack([d for batch in batches for d in batch])


def fetch_batches(broker: Broker, queue: str, n: int) -> list[list[Delivery]]:
    """Fetches until ``n`` messages came, each fetch's messages apart."""
    batches: list[list[Delivery]] = []
    deadline = time.monotonic() + 10
    while sum(map(len, batches)) < n and time.monotonic() < deadline:
        if got := broker.fetch(queue, n - sum(map(len, batches)), 0.5):
            batches.append(got)
    return batches


def test_stopping_hands_back_the_receiver_queue_uncounted(queue: str) -> None:
    """What the ready consumer had received and not handed out goes back as a copy, counts unchanged."""
    holder, taker = PulsarBroker(), get_broker(BrokerEnum.PULSAR)
    holder.publish_many(queue, [b'{"n":0}', b'{"n":1}'])
    first = fetch(holder, queue, 1)  # a receiver queue of one message: the second one waits there
    time.sleep(0.3)
    holder.ack(first)
    holder.stop_fetching(queue)
    holder.close()
    [rest] = fetch(taker, queue, 1)
    assert (rest.body, rest.attempts, rest.crashes) == (b'{"n":1}', 1, 0)
    taker.ack([rest])


def test_a_graceful_stop_with_a_backlog_leaves_nothing_counted(queue: str) -> None:
    """A stop with a backlog: every message the server sent the stopping consumer and nobody ran goes
    back uncounted, none lost. Before, handing back the receiver queue made the client grant new
    permits, and what the server sent for them came back counted one crash (46-50 of a 50-message
    prefetch, benchmarks/pulsar_stop_counts.py), each then run alone as a suspect."""
    holder, taker = PulsarBroker(), get_broker(BrokerEnum.PULSAR)
    bodies = [f'{{"n":{i}}}'.encode() for i in range(60)]
    holder.publish_many(queue, bodies)
    ran = fetch(holder, queue, 10)  # the first fetch's size sets the prefetch: 10
    holder.ack(ran)
    holder.stop_fetching(queue)
    holder.stopped_consuming(queue)
    holder.close()
    left = fetch(taker, queue, 50)
    taker.ack(left)
    assert sorted(d.body for d in ran + left) == sorted(bodies)
    assert [d.body for d in left if d.crashes or d.attempts != 1] == []


def test_count_waits_out_a_pause_of_the_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``count`` receives what waits until its marker comes back: a server that stops sending for a
    while (here: stopped for 1 s once a count received 100 messages) does not end it early. Before, it
    ended after five round trips without a message (at least 50 ms), and under heavy load a count of
    50,000 read 48,300."""
    if program() is None:
        pytest.skip("pulsar-lite is not installed")
    server = PulsarLiteServer(tmp_path / "server", free_port())
    server.start()
    assert server.process is not None
    pid = server.process.pid
    receive = pulsar.Consumer.receive
    received = [0]

    def receive_then_pause(self: pulsar.Consumer, timeout_millis: int | None = None) -> pulsar.Message:
        message = receive(self, timeout_millis)
        received[0] += 1
        if received[0] == 100:
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(1.0, os.kill, (pid, signal.SIGCONT)).start()
        return message

    broker = None
    try:
        patch_frame_config(PULSAR_URL=f"pulsar://127.0.0.1:{server.port}")
        broker = PulsarBroker()
        broker.publish_many("paused", [b"{}"] * 3000)
        monkeypatch.setattr(pulsar.Consumer, "receive", receive_then_pause)
        assert broker.count("paused") == 3000
    finally:
        os.kill(pid, signal.SIGCONT)
        if broker is not None:
            broker.close()
        server.stop()


def test_count_and_purge_read_past_the_servers_unacked_limit(queue: str) -> None:
    """The server sends a consumer at most 50,000 unacked messages (Pulsar's maxUnackedMessagesPerConsumer
    default; pulsar-lite the same): ``count`` and ``purge`` now ack what they received every 10,000
    messages (count after putting copies back). Before, both stopped at 50,000."""
    broker = get_broker(BrokerEnum.PULSAR)
    for _ in range(6):
        broker.publish_many(queue, [b"{}"] * 10_000)
    assert broker.count(queue) == 60_000
    assert broker.purge(queue) == 60_000


def test_a_drains_marker_is_never_run_and_is_noted_where_it_lands(queue: str) -> None:
    """``count`` and ``purge`` publish a marker and receive until it comes back. The server may give it
    to this process's ready consumer instead: the fetcher acks it without running it, and the drain,
    polling that consumer's receiver queue, learns the marker was dispatched (everything before it was)."""
    from funboost_like.brokers import pulsar_feed

    broker = get_broker(BrokerEnum.PULSAR)
    broker.publish(queue, b"{}")
    broker.ack(fetch(broker, queue, 1))  # this process's ready consumer exists, with permits out
    topic = f"persistent://public/default/{queue}"
    client = pulsar.Client(URL, logger=pulsar.FileLogger(pulsar.LoggerLevel.Error, os.devnull))
    try:
        producer = client.create_producer(topic)
        for n in (1, 2):
            producer.send(pulsar_feed.MARK + b"test-%d" % n)
    finally:
        client.close()
    _, poll = pulsar_feed.pollers[topic]
    deadline = time.monotonic() + 10
    while (pulsar_feed.MARK + b"test-1") not in pulsar_feed._marks and time.monotonic() < deadline:
        poll()
    assert pulsar_feed.MARK + b"test-1" in pulsar_feed._marks
    assert broker.fetch(queue, 10, 0.5) == []  # the second (noted by the poll or the fetcher): acked, not run
    assert pulsar_feed.MARK + b"test-2" in pulsar_feed._marks
    assert broker.count(queue) == 0


_PUBLISH_FETCH_EXIT = """
import sys
from funboost_like import BrokerEnum
from funboost_like.brokers.registry import get_broker
broker = get_broker(BrokerEnum.PULSAR)
broker.publish(sys.argv[1], b"{}")
got = []
while not got:
    got = broker.fetch(sys.argv[1], 1, 2.0)
broker.ack(got)
broker.close()
"""


def test_a_program_that_used_pulsar_exits_cleanly(queue: str, tmp_path: Path) -> None:
    """With a Python logger handed to pulsar-client, about one such exit in three aborted (exit code 134,
    ``terminate called without an active exception``: pulsar-client-python#256); the broker gives the
    client its own console logger instead. Twelve exits: all would pass with the old logger 0.4% of the time."""
    env = subprocess_env(tmp_path, FUNBOOST_LIKE_PULSAR_URL=URL)
    for run in range(12):
        done = subprocess.run([sys.executable, "-c", _PUBLISH_FETCH_EXIT, queue], env=env, capture_output=True,
                              timeout=60)
        assert done.returncode == 0, f"run {run}: exit code {done.returncode}: {done.stderr.decode()[-500:]}"


_PUSH_TO_A_CLOSED_PORT = """
import logging, os, sys, threading, time
from funboost_like import BrokerEnum, task_deco
if sys.argv[1] == "asked":
    logging.getLogger("funboost_like.pulsar.client").setLevel(logging.ERROR)

@task_deco("closed_port", broker_kind=BrokerEnum.PULSAR)
def f(x):
    pass

threading.Thread(target=f.push, args=(1,), daemon=True).start()
time.sleep(1.5)
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.parametrize("asked", [False, True], ids=["default", "asked"])
def test_the_clients_own_lines_stay_off_standard_output_unless_asked_for(tmp_path: Path, asked: bool) -> None:
    """The C++ client wrote an ERROR line to standard output for each failed connection attempt (ten a
    second at first, in a program's or ``funboost_like queues --json``'s output); the broker reports it."""
    from .standin import free_port

    env = subprocess_env(tmp_path, FUNBOOST_LIKE_PULSAR_URL=f"pulsar://127.0.0.1:{free_port()}")
    done = subprocess.run([sys.executable, "-c", _PUSH_TO_A_CLOSED_PORT, "asked" if asked else "default"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]
    assert ("Failed to establish connection" in done.stdout) is asked, done.stdout[-500:]


def fetch(broker: Broker, queue: str, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        got += broker.fetch(queue, n - len(got), 0.5)
    return got


def test_a_malformed_message_is_dead_lettered_with_its_reason(queue: str) -> None:
    done = threading.Event()

    @task_deco(queue, broker_kind=BrokerEnum.PULSAR)
    def f(x: int) -> None:
        done.set()

    broker = get_broker(BrokerEnum.PULSAR)
    broker.publish(queue, b"not json")
    broker.publish(queue, json.dumps({"x": 1}).encode())
    f.consume()
    assert done.wait(15)
    deadline = time.monotonic() + 10
    while not broker.list_dead_letters(queue) and time.monotonic() < deadline:
        time.sleep(0.1)
    [letter] = broker.list_dead_letters(queue)
    assert letter.body == b"not json" and "JSON" in letter.reason


def test_bad_queue_names_and_unsupported_features_fail_early(queue: str) -> None:
    with pytest.raises(ConfigurationError, match="Pulsar queue names"):  # at decoration time
        task_deco("bad name/with slash", broker_kind=BrokerEnum.PULSAR)(lambda: None)
    with pytest.raises(ConfigurationError, match="Pulsar queue names"):
        get_broker(BrokerEnum.PULSAR).publish("bad name/with slash", b"{}")
    with pytest.raises(ValueError):
        task_deco(f"{queue}_rpc", broker_kind=BrokerEnum.PULSAR, is_using_rpc_mode=True)(lambda: None)


def test_the_url_is_redacted_in_settings_and_errors() -> None:
    patch_frame_config(PULSAR_URL="pulsar+ssl://user:s3cret@pulsar.example:6651")
    assert "s3cret" not in settings.as_dict()["PULSAR_URL"]
    assert "s3cret" not in PulsarBroker()._where()


def test_a_url_the_client_refuses_fails_without_showing_its_password(queue_name: str) -> None:
    """pulsar-client refuses a URL with user info with ``ValueError: invalid hostname: user:s3cret@...``."""
    patch_frame_config(PULSAR_URL="pulsar://user:s3cret@127.0.0.1:6650")
    f = task_deco(queue_name, broker_kind=BrokerEnum.PULSAR)(lambda x: x)
    with pytest.raises(ConfigurationError, match="PULSAR_URL") as info:
        f.push(1)
    assert "s3cret" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # the client's message is not shown


def test_a_forked_child_gets_its_own_client(queue: str) -> None:
    broker = get_broker(BrokerEnum.PULSAR)
    broker.publish(queue, b'{"from":"parent"}')  # the parent's client is connected before the fork

    def child() -> str:
        get_broker(BrokerEnum.PULSAR).publish(queue, b'{"from":"child"}')
        return "published"

    assert in_forked_child(child) == "published"
    got = fetch(broker, queue, 2)
    assert sorted(d.body for d in got) == [b'{"from":"child"}', b'{"from":"parent"}']
    broker.ack(got)
