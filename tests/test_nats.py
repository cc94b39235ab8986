"""NATS JetStream (kind NATS): what the contract suite does not cover, on the real server at NATS_URL.

Every test deletes the streams and KV buckets it created (``NatsBroker.delete_queue``).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from funboost_like import BrokerEnum, ConcurrentModeEnum, task_deco
from funboost_like.brokers.async_bridge import bridge
from funboost_like.brokers.maintenance import maintenance
from funboost_like.brokers.nats_broker import NatsBroker
from funboost_like.brokers.nats_queues import ATTEMPTS, CRASHES, MSG_ID, stream_name
from funboost_like.brokers.nats_wire import redact_nats_url
from funboost_like.brokers.registry import get_broker
from funboost_like.core import runtime
from funboost_like.core.config import patch_frame_config, settings
from funboost_like.core.errors import BrokerConnectionError

from .conftest import in_forked_child, open_sockets, require_server
from .standin import port_for_another_process

URL = os.environ.get("FUNBOOST_LIKE_NATS_URL", "nats://127.0.0.1:4222")
# Streams of the queues the test suites name test_<12 hex digits> (the contract suite purges its queues but
# does not delete them): deleted once old enough that no running test session can still use them.
_TEST_STREAM = re.compile(r"^(KV_fl_kv_|fl_)test_[0-9a-f]{12}(_[a-z]+)*$")
_LEFTOVER_AGE = datetime.timedelta(minutes=10)  # no test lasts that long (pytest timeout: 120 s)
NATS_SERVER = shutil.which("nats-server") or next((p for p in ("/usr/sbin/nats-server",) if os.path.exists(p)), None)


@pytest.fixture(scope="module", autouse=True)
def _delete_old_test_streams() -> Iterator[None]:
    yield
    parts = urlsplit(URL)
    from .conftest import server_reachable

    if server_reachable(parts.hostname or "127.0.0.1", parts.port or 4222):
        asyncio.run(_delete_streams_older_than(_LEFTOVER_AGE))


async def _delete_streams_older_than(age: datetime.timedelta) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(URL)
    try:
        js, now = nc.jetstream(), datetime.datetime.now(datetime.timezone.utc)
        infos: list[Any] = []
        while page := await js.streams_info(len(infos)):  # pages of up to 256
            infos += page
        for info in infos:
            name = info.config.name or ""
            if _TEST_STREAM.match(name) and info.created and now - info.created > age:
                try:
                    await js.delete_stream(name)
                except NotFoundError:  # another worker or session deleted it first
                    pass
    finally:
        await nc.close()


@pytest.fixture
def queues(queue_name: str) -> Iterator[list[str]]:
    """Queue names for the test (the first is ``queue_name``; append more); their streams are deleted at the end."""
    parts = urlsplit(URL)
    require_server("NATS", parts.hostname or "127.0.0.1", parts.port or 4222)
    patch_frame_config(NATS_URL=URL, NATS_ACK_WAIT_SECONDS=1.0)
    made = [queue_name]
    yield made
    runtime.stop_all(timeout=10)  # before deleting: a running consumer would create the streams again
    patch_frame_config(NATS_URL=URL)
    broker = get_broker(BrokerEnum.NATS)
    assert isinstance(broker, NatsBroker)
    for queue in made:
        broker.delete_queue(queue)


def broker_of() -> NatsBroker:
    broker = get_broker(BrokerEnum.NATS)
    assert isinstance(broker, NatsBroker)
    return broker


def test_a_long_call_is_not_delivered_again_while_its_process_lives(queues: list[str]) -> None:
    broker, queue = broker_of(), queues[0]
    broker.publish(queue, b'{"x": 1}')
    [held] = broker.fetch(queue, 1, 5.0)
    # 3.5 times ack_wait (1 s) while it is held: the maintenance thread's +WPI keeps it with us.
    assert broker.fetch(queue, 1, 3.5) == []
    broker.ack([held])
    assert broker.count(queue) == 0 and broker.fetch(queue, 1, 0.1) == []


def test_a_lease_lost_in_a_stall_is_not_counted_as_a_death(queues: list[str]) -> None:
    broker, queue = broker_of(), queues[0]
    broker.publish(queue, b'{"x": 3}')
    [held] = broker.fetch(queue, 1, 5.0)
    maintenance.discard(broker)  # a stall: no more renewals, so the server delivers it again after 1 s
    assert broker.fetch(queue, 1, 2.5) == []  # back to the process still running it: left to that call
    broker.ack([held])  # the first delivery's ack settles it
    assert broker.fetch(queue, 1, 1.5) == [] and broker.count(queue) == 0


def test_a_death_between_copy_and_ack_leaves_one_copy(queues: list[str]) -> None:
    """A holder that published the copy of a nacked message and died before acking the original: the
    original comes back, its copy is published again under the same de-duplication id, and only one
    copy runs."""
    broker, queue = broker_of(), queues[0]
    broker.publish(queue, b'{"x": 2}')
    dying = NatsBroker()  # another consumer, with its own connection
    try:
        [held] = dying.fetch(queue, 1, 5.0)
        copy_headers = {ATTEMPTS: "1", CRASHES: "0", MSG_ID: f"fl.{held.token.split('.')[5]}.0"}
        dying._run(dying.jet.publish([(queue, held.body, copy_headers)]))
    finally:
        dying.close()  # dies without acking: the server delivers the original again after ack_wait
    got = broker.fetch(queue, 5, 5.0)
    got += broker.fetch(queue, 5, 2.5)  # the original, once back, is folded into the existing copy
    assert [(d.body, d.attempts, d.crashes) for d in got] == [(b'{"x": 2}', 2, 0)]
    broker.ack(got)
    assert broker.count(queue) == 0


def test_delayed_messages_are_counted_and_held_by_the_server(queues: list[str]) -> None:
    broker, queue = broker_of(), queues[0]
    broker.publish(queue, b'{"late": 1}', not_before=time.time() + 0.5)
    assert broker.count(queue) == 1
    [late] = broker.fetch(queue, 1, 5.0)
    assert late.body == b'{"late": 1}' and late.attempts == 1
    broker.ack([late])
    deadline = time.monotonic() + 2  # the mover acks the delayed original just after publishing its copy
    while broker.count(queue) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broker.count(queue) == 0


def test_records_expire_and_are_swept(queues: list[str]) -> None:
    store = broker_of().key_value_store(queues[0], "sweep")
    store.put("kept", b"1", None)
    store.put("a key with spaces/and:colons", b"2", 0.2)
    assert store.add_if_absent("short", b"3", 0.2) is True
    assert store.get("a key with spaces/and:colons") == b"2"
    time.sleep(0.3)  # the two records with a TTL expire
    assert store.purge_expired() == 2
    assert store.get_many(["kept", "short", "a key with spaces/and:colons"]) == {"kept": b"1"}
    assert store.add_if_absent("short", b"4", None) is True and store.get("short") == b"4"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_loop_and_connection(queues: list[str]) -> None:
    broker, queue = broker_of(), queues[0]
    broker.publish(queue, b'{"x": 1}')
    assert broker.count(queue) == 1  # the parent's loop thread and both its connections are up
    parent_loop = bridge.loop

    def child() -> str:
        broker.publish(queue, b'{"x": 2}')  # the inherited instance, on new connections and a new loop
        return f"{broker.count(queue)} {bridge.loop is not parent_loop} {get_broker(BrokerEnum.NATS) is broker}"

    assert in_forked_child(child) == "2 True False"
    assert broker.count(queue) == 2 and bridge.loop is parent_loop  # the parent's are untouched


def test_a_plain_nats_py_program_publishing_json_reaches_the_consumer(queues: list[str]) -> None:
    import nats

    queue, got, done = queues[0], [], threading.Event()

    @task_deco(queue, broker_kind=BrokerEnum.NATS)
    def f(x: int) -> None:
        got.append(x)
        done.set()

    assert f.get_message_count() == 0  # creates the stream

    async def publish() -> str:
        nc = await nats.connect(URL)
        try:
            ack = await nc.jetstream().publish(queue, json.dumps({"x": 42}).encode())
        finally:
            await nc.close()
        return str(ack.stream)

    assert asyncio.run(publish()) == stream_name(queue)
    f.consume()
    assert done.wait(15) and got == [42]


def test_push_from_a_running_event_loop_and_from_an_async_consumer(queues: list[str]) -> None:
    first, second = queues[0], f"{queues[0]}_next"
    queues.append(second)
    seen, done = [], threading.Event()

    @task_deco(second, broker_kind=BrokerEnum.NATS)
    def g(y: int) -> None:
        seen.append(y)
        done.set()

    @task_deco(first, broker_kind=BrokerEnum.NATS, concurrent_mode=ConcurrentModeEnum.ASYNC)
    async def f(x: int) -> None:
        g.push(x * 10)  # a sync push inside the consumer's own event loop
        await asyncio.sleep(0)

    async def user_code() -> None:  # the user's loop in this thread: blocked during each push, never used
        f.push(4)
        await asyncio.sleep(0)

    asyncio.run(user_code())
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # no loop left set in this thread
    f.consume()
    g.consume()
    assert done.wait(15) and seen == [40]


def test_credentials_never_reach_an_error_or_a_log(queues: list[str], caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-pw"
    patch_frame_config(NATS_URL=f"nats://fluser:{secret}@127.0.0.1:1")  # nothing listens there
    broker = NatsBroker()
    with caplog.at_level(logging.DEBUG), pytest.raises(BrokerConnectionError) as raised:
        broker.publish(queues[0], b"{}")
    assert "fluser:***@127.0.0.1:1" in str(raised.value)
    assert settings.as_dict()["NATS_URL"] == "nats://fluser:***@127.0.0.1:1"
    parts = urlsplit(URL)  # the real server (no authentication configured: user and password are ignored)
    patch_frame_config(NATS_URL=f"nats://fluser:{secret}@{parts.hostname}:{parts.port or 4222}")
    with caplog.at_level(logging.DEBUG):
        broker = NatsBroker()
        broker.publish(queues[0], b'{"x": 1}')
        [d] = broker.fetch(queues[0], 1, 5.0)
        broker.ack([d])
        broker.close()
    assert secret not in str(raised.value) and secret not in caplog.text
    assert redact_nats_url(f"nats://{secret}@h:4222,nats://u:{secret}@g") == "nats://***@h:4222,nats://u:***@g"


def _start_server(port: int, store: str, log: str, children: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    from .conftest import server_reachable

    assert NATS_SERVER is not None
    server = subprocess.Popen([NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store, "-l", log])
    children.append(server)
    deadline = time.monotonic() + 15
    while not server_reachable("127.0.0.1", port):
        assert server.poll() is None and time.monotonic() < deadline, f"nats-server did not start (see {log})"
        time.sleep(0.05)
    return server


@pytest.mark.skipif(NATS_SERVER is None, reason="needs the nats-server binary")
def test_a_killed_and_restarted_server_loses_no_stored_message(
        queue_name: str, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    port, store, log = port_for_another_process(), str(tmp_path / "jetstream"), str(tmp_path / "nats-server.log")
    server = _start_server(port, store, log, children)  # a private server: this test kills it
    patch_frame_config(NATS_URL=f"nats://127.0.0.1:{port}", NATS_ACK_WAIT_SECONDS=1.0)
    broker = NatsBroker()
    try:
        broker.publish_many(queue_name, [b'{"i": %d}' % i for i in range(20)])
        first = broker.fetch(queue_name, 5, 5.0)
        broker.ack(first[:2])  # acked before the kill; the other three held across it
        server.kill()
        server.wait(10)
        _start_server(port, store, log, children)
        broker.publish(queue_name, b'{"i": 20}')  # both connections find the server again
        broker.ack(first[2:])  # held across the restart, acked after it
        seen = [d.body for d in first]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until nothing more comes for longer than the ack wait
            got = broker.fetch(queue_name, 25, 2.5)
            if not got and len(set(seen)) == 21:
                break
            broker.ack(got)
            seen += [d.body for d in got]
        assert sorted(set(seen)) == sorted(b'{"i": %d}' % i for i in range(21))  # nothing stored was lost
        again = sorted(body for body in set(seen) if seen.count(body) > 1)
        # Only acks sent just before the kill may be lost by the server (those messages run again).
        assert set(again) <= {d.body for d in first[:2]} and all(seen.count(body) == 2 for body in again)
        assert broker.count(queue_name) == 0
    finally:
        broker.close()


def test_a_lone_push_polls_for_its_puback_and_a_batch_or_a_shared_moment_does_not(
        queues: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """One-by-one pushes poll the socket for their PubAck (a blocking read alone halves the rate on this
    VM, docs/performance.md); a batch reads its acks blocking, and so does a push while another thread
    of the process is publishing, and for SHARED_QUIET_SECONDS after."""
    from funboost_like.brokers import nats_wire, socket_spin

    spins: list[float] = []
    real = nats_wire.spin

    def spy(ready: Any, budget: float) -> None:
        spins.append(budget)
        real(ready, budget)

    monkeypatch.setattr(nats_wire, "spin", spy)
    fn = task_deco(queues[0], broker_kind=BrokerEnum.NATS)(lambda x: x)
    time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
    for i in range(10):
        fn.push(i)
    assert spins == [nats_wire.SPIN_SECONDS] * 10
    fn.publish_many([{"x": i} for i in range(10, 30)])
    assert len(spins) == 10
    wires = broker_of()._wires
    assert wires is not None
    assert not wires.sharing.alone(2)  # another thread publishes right now
    assert not wires.sharing.alone(1)  # alone now, but threads that share tend to go on sharing
    fn.push(30)
    assert len(spins) == 10
    time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
    fn.push(31)
    assert len(spins) == 11
    assert fn.get_message_count() == 32


def test_a_lone_push_stops_polling_for_its_puback_while_polling_is_the_slower_way(
        queues: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a busy machine polling for the PubAck holds a CPU the server needs: pushes measure both ways in
    turns and keep the faster (socket_spin.PollChoice, as the Redis kinds do; here each poll costs 2 ms)."""
    from funboost_like.brokers import nats_wire, socket_spin

    polled: list[float] = []
    monkeypatch.setattr(nats_wire, "spin", lambda ready, budget: (polled.append(budget), time.sleep(0.002)))
    broker = NatsBroker()  # publishers of its own, not yet measured
    try:
        time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
        trial = socket_spin.PollChoice.TRIAL
        for i in range(2 * trial + 100):
            broker.publish(queues[0], json.dumps({"x": i}).encode())
        assert len(polled) == trial  # the polling trial, then blocking kept
        assert broker.count(queues[0]) == 2 * trial + 100
    finally:
        broker.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's sockets in /proc")
def test_the_publishing_connections_of_threads_that_ended_are_closed(queues: list[str]) -> None:
    """Each thread publishes on a connection of its own. A consumer's pool workers come and go (idle ones
    end after THREAD_KEEP_ALIVE_SECONDS) and each that published left its connection open until the process
    ended; one that broke (a restarted server) stayed listed."""
    broker = broker_of()
    broker.publish(queues[0], b"{}")  # this thread's connection
    before = open_sockets()
    for _ in range(10):
        worker = threading.Thread(target=broker.publish, args=(queues[0], b"{}"))
        worker.start()
        worker.join()
    assert open_sockets() <= before + 1  # the last thread's, closed when another one connects
    assert broker.count(queues[0]) == 11
    wires = broker._wires
    assert wires is not None and len(wires._all) == 2


def test_a_late_status_of_an_earlier_pull_does_not_end_the_current_one(queues: list[str]) -> None:
    """The status that ends a lingering pull can come after the answer to the next request (seen on
    nats-server 2.10): the current request must still end on its own status, not wait for its timeout."""
    from collections import deque

    from funboost_like.brokers.nats_pull import WirePuller

    wire = WirePuller(URL, 5.0, f"$JS.API.CONSUMER.MSG.NEXT.{stream_name(queues[0])}.fl", deque())
    try:
        inbox = wire.inbox.encode()
        wire._rid = 12
        wire._buf += (b"HMSG %s.12 1 28 28\r\nNATS/1.0 404 No Messages\r\n\r\n\r\n"
                      b"HMSG %s.11 1 32 32\r\nNATS/1.0 408 Request Timeout\r\n\r\n\r\n"
                      b"MSG %s 1 $JS.ACK.s.fl.1.7.7.1.0 2\r\n{}\r\nHMSG %s 1 $JS.ACK.s.fl.1.8.8.1.0 28 30\r\n"
                      b"NATS/1.0\r\nfl-attempts: 2\r\n\r\n{}\r\nMSG %s 1 $JS.ACK.s.fl.1.9.9.1.0 2\r\n{"
                      % (inbox, inbox, queues[0].encode(), queues[0].encode(), queues[0].encode()))
        wire._parse()
        assert wire._ended == 12
        assert list(wire.stash) == [("$JS.ACK.s.fl.1.7.7.1.0", b"{}", None),
                                    ("$JS.ACK.s.fl.1.8.8.1.0", b"{}", {"fl-attempts": "2"})]
        assert wire._buf.startswith(b"MSG ")  # a partial frame waits for the rest
    finally:
        wire.close()


def test_without_the_wire_publishing_and_pulling_go_through_nats_py(
        queues: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A server the wire cannot speak to (TLS, nkeys): every operation goes through nats-py instead."""
    from funboost_like.brokers import nats_broker, nats_wire

    def refuse(*args: Any) -> None:
        raise nats_wire.Unsupported("the server requires TLS or nkeys")

    monkeypatch.setattr(nats_wire.WireConnection, "__init__", refuse)
    broker, queue = NatsBroker(), queues[0]
    try:
        broker.publish_many(queue, [b'{"i": %d}' % i for i in range(5)])
        broker.publish(queue, b'{"i": 5}')
        got = broker.fetch(queue, 4, 5.0)
        got += broker.fetch(queue, 10, 5.0)
        assert sorted(d.body for d in got) == sorted(b'{"i": %d}' % i for i in range(6))
        broker.nack(got[0])
        broker.ack(got[1:])
        [again] = broker.fetch(queue, 10, 5.0)
        assert (again.body, again.attempts) == (got[0].body, 2)
        broker.ack([again])
        assert broker.count(queue) == 0 and broker.fetch(queue, 1, 0.2) == []
        assert all(q.wire is None for q in broker._queues.values()) and nats_broker.WirePuller is not None
    finally:
        broker.close()


def test_a_queue_name_nats_cannot_use_is_refused_at_decoration() -> None:
    """It raised at push, but a consumer of it retried its fetch forever ("failed; retrying")."""
    from funboost_like.core.errors import ConfigurationError

    for bad in ("two words", "a.*", "end.", "a..b"):
        with pytest.raises(ConfigurationError, match="NATS queue names"):
            task_deco(bad, broker_kind=BrokerEnum.NATS)(lambda: None)
    task_deco("orders.eu-1_x", broker_kind=BrokerEnum.NATS)(lambda: None)  # a valid subject is fine


def test_a_queue_named_like_another_queues_dead_letter_stream_is_refused_at_decoration() -> None:
    """Queue ``q_dlq``'s stream ``fl_q_dlq`` is the dead-letter stream of queue ``q``: whichever was made
    first was used by the other "as it is", and its publishes were refused (503) forever."""
    from funboost_like.core.errors import ConfigurationError

    for bad in ("orders_dlq", "a_b_69f6642c_dlq"):  # the second: the dead letters of queue "a.b"
        with pytest.raises(ConfigurationError, match="dead-letter stream"):
            task_deco(bad, broker_kind=BrokerEnum.NATS)(lambda: None)
    task_deco("orders_dlq.eu", broker_kind=BrokerEnum.NATS)(lambda: None)  # stream fl_orders_dlq_eu_<hash>
