"""NSQ (kind NSQ): what the contract suite does not cover, against the protocol fixture tests/nsqd_server.py.

No real nsqd runs here (docs/nsq.md): the first tests pin the fixture to nsqd's protocol as its
spec and source describe it, the others the broker's counting, renewing and delays.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers import nsq_broker
from funboost_like.brokers.nsq_broker import NsqBroker, wrap
from funboost_like.brokers.nsq_wire import ERROR, HEARTBEAT, MESSAGE, RESPONSE, Connection, Message, Publisher
from funboost_like.brokers.registry import get_broker
from funboost_like.core.config import patch_frame_config
from funboost_like.core.errors import ConfigurationError

from .conftest import require_server, sockets_after_ended_publishers
from .nsqd_server import HOST, TCP_PORT, _nsqd_server  # noqa: F401 - starts the fixture when these tests run alone

ADDRESS = (HOST, TCP_PORT)


@pytest.fixture
def broker(queue_name: str) -> Iterator[NsqBroker]:
    require_server("nsqd fixture", HOST, TCP_PORT)
    patch_frame_config(NSQ_MSG_TIMEOUT_SECONDS=1.0)
    b = get_broker(BrokerEnum.NSQ)
    assert isinstance(b, NsqBroker)
    yield b
    b.purge(queue_name)
    b.purge_dead_letters(queue_name)


def consumer(topic: str, msg_timeout_ms: int = 1000, heartbeat_ms: int = 1000) -> Connection:
    conn = Connection(ADDRESS, 5.0, {"msg_timeout": msg_timeout_ms, "heartbeat_interval": heartbeat_ms})
    conn.write(b"SUB %s fl\n" % topic.encode())
    assert conn.response() == b"OK"
    return conn


def next_message(conn: Connection) -> Message:
    while True:
        kind, data = conn.read_frame()
        if kind == MESSAGE:
            return Message(data)
        assert kind == RESPONSE and data == HEARTBEAT, (kind, data)
        conn.write(b"NOP\n")


def test_protocol_frames_attempts_and_errors(broker: NsqBroker, queue_name: str) -> None:
    with socket.create_connection(ADDRESS, timeout=5) as sock:  # IDENTIFY without feature negotiation: OK
        sock.sendall(b"  V2IDENTIFY\n" + struct.pack(">i", 2) + b"{}")
        size, kind = struct.unpack(">ii", sock.recv(8))
        assert (kind, sock.recv(size - 4)) == (RESPONSE, b"OK")

    conn = consumer(queue_name)
    assert conn.server["max_rdy_count"] == 2500 and conn.server["msg_timeout"] == 1000  # negotiated JSON
    Publisher(ADDRESS, 5.0).publish(queue_name, [b"one", b"two"])
    conn.write(b"RDY 1\n")
    first = next_message(conn)
    assert (first.body, first.attempts, len(first.id)) == (b"one", 1, 16)
    assert abs(first.timestamp / 1e9 - time.time()) < 5
    conn.write(b"REQ %s 0\n" % first.id)  # back to the queue: delivered again, attempts counted
    again = next_message(conn)
    assert again.body == b"two"
    conn.write(b"FIN %s\n" % again.id + b"RDY 1\n")
    third = next_message(conn)
    assert (third.id, third.body, third.attempts) == (first.id, b"one", 2)
    conn.write(b"TOUCH %s\nFIN %s\nFIN %s\n" % (third.id, third.id, third.id))  # the second FIN fails, not fatally
    kind, data = conn.read_frame()
    while data == HEARTBEAT:
        kind, data = conn.read_frame()
    assert kind == ERROR and data.startswith(b"E_FIN_FAILED")
    conn.write(b"CLS\n")
    assert conn.response() == b"CLOSE_WAIT"
    conn.close()

    bad = Connection(ADDRESS, 5.0, {})
    bad.write(b"PUB bad*topic\n")  # fatal: answered, then the connection is closed
    kind, data = bad.read_frame()
    assert kind == ERROR and data.startswith(b"E_BAD_TOPIC")
    with pytest.raises(OSError):
        bad.read_frame()
    bad.close()


def test_a_dead_consumers_message_comes_back_as_a_crash(broker: NsqBroker, queue_name: str) -> None:
    """A message another consumer took and never finished is delivered again after msg_timeout; the
    broker counts that as a crash (in a copy) before anyone runs it, and releases keep the counts."""
    broker.publish(queue_name, b'{"x": 1}')
    dead = consumer(queue_name)
    dead.write(b"RDY 1\n")
    assert next_message(dead).attempts == 1
    dead.close()  # as nsqd does, the fixture puts it back only when its timeout passes
    [d] = broker.fetch(queue_name, 1, 5.0)
    assert (d.body, d.attempts, d.crashes) == (b'{"x": 1}', 2, 1)
    broker.release([d])
    [d] = broker.fetch(queue_name, 1, 5.0)
    assert (d.body, d.attempts, d.crashes) == (b'{"x": 1}', 2, 1)
    broker.nack(d)
    [d] = broker.fetch(queue_name, 1, 5.0)
    assert (d.attempts, d.crashes) == (3, 1)
    broker.ack([d])
    assert broker.count(queue_name) == 0


def test_touch_keeps_a_long_call_and_a_delay_past_the_servers_limit(broker: NsqBroker, queue_name: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    broker.publish(queue_name, b"{}")
    [held] = broker.fetch(queue_name, 1, 5.0)
    other = consumer(queue_name)
    other.write(b"RDY 1\n")
    got: list[Message] = []

    def read() -> None:
        try:
            got.append(next_message(other))
        except OSError:
            pass  # closed below

    threading.Thread(target=read, daemon=True).start()
    for _ in range(10):  # 2.5 s, more than twice msg_timeout: the maintenance round's TOUCH keeps it
        broker.maintain()
        time.sleep(0.25)
    assert got == []
    broker.ack([held])
    other.close()

    monkeypatch.setattr(nsq_broker, "MAX_DEFER_MS", 100)  # as if nsqd deferred 0.1 s at most
    late = f"{queue_name}_late"
    broker.publish(late, b"late", not_before=time.time() + 0.6)
    start = time.monotonic()
    [d] = broker.fetch(late, 1, 5.0)
    assert d.body == b"late" and time.monotonic() - start >= 0.5 and (d.attempts, d.crashes) == (1, 0)
    broker.ack([d])
    assert broker.count(late) == 0


def test_unsupported_parameters_are_refused_at_decoration(queue_name: str) -> None:
    with pytest.raises(ConfigurationError, match="NSQ queue names"):
        task_deco("no spaces here", broker_kind=BrokerEnum.NSQ)(lambda: None)
    with pytest.raises(ConfigurationError):
        task_deco(queue_name, broker_kind=BrokerEnum.NSQ, is_using_rpc_mode=True)(lambda: None)
    assert json.loads(wrap(b"{}", 2, 1, 0.0).split(b"\n", 1)[1]) == {}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's sockets in /proc")
def test_the_publishing_connections_of_threads_that_ended_are_closed(queue_name: str) -> None:
    """Each thread publishes on a connection of its own. A consumer's pool workers come and go (idle ones
    end after THREAD_KEEP_ALIVE_SECONDS) and each that published left its connection open until the process
    ended."""
    require_server("nsqd fixture", HOST, TCP_PORT)
    broker = NsqBroker()
    try:
        before, after = sockets_after_ended_publishers(broker, queue_name)
        assert after <= before + 1  # the last thread's, closed when another one connects
        assert broker.count(queue_name) == 11
    finally:
        broker.purge(queue_name)
        broker.close()
