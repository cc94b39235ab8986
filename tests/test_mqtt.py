"""MQTT (kind MQTT): what the contract suite does not cover, on the real Mosquitto at MQTT_URL.

Shared subscriptions across slots, draining a parked slot, the RPC result topic a plain MQTT client
reads, credentials kept out of errors, and options MQTT cannot honour refused early.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import pytest

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco
from funboost_like.brokers.base import Delivery
from funboost_like.brokers.mqtt_broker import HEARTBEAT, MqttBroker
from funboost_like.brokers.mqtt_client import topic_part
from funboost_like.core.config import patch_frame_config, settings
from funboost_like.core.errors import BrokerConnectionError, ConfigurationError

from .conftest import require_server, sockets_after_ended_publishers, until

URL = os.environ.get("FUNBOOST_LIKE_MQTT_URL", "mqtt://127.0.0.1:1883")
HOST, PORT = urlsplit(URL).hostname or "127.0.0.1", urlsplit(URL).port or 1883


@pytest.fixture
def brokers(queue_name: str) -> Iterator[list[MqttBroker]]:
    """Brokers of this test (each one is what one consumer process would have); purged and closed after."""
    require_server("Mosquitto", HOST, PORT)
    patch_frame_config(MQTT_SESSION_EXPIRY_SECONDS=600.0)
    made: list[MqttBroker] = []
    yield made
    for broker in made:
        broker.purge(queue_name)
        broker.close()


def take(broker: MqttBroker, queue: str, expected: int, timeout: float = 5.0) -> list[bytes]:
    bodies: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(bodies) < expected and time.monotonic() < deadline:
        got = broker.fetch(queue, expected - len(bodies), 0.1)
        broker.ack(got)
        bodies += [d.body for d in got]
    return bodies


def test_consumers_share_a_queue_and_never_run_a_message_twice(brokers: list[MqttBroker], queue_name: str) -> None:
    a, b = MqttBroker(), MqttBroker()
    brokers += [a, b]
    assert a.fetch(queue_name, 1, 0) == [] and b.fetch(queue_name, 1, 0) == []  # slots 0 and 1
    assert {a._slots[queue_name].index, b._slots[queue_name].index} == {0, 1}
    sent = [f'{{"i":{i}}}'.encode() for i in range(200)]
    a.publish_many(queue_name, sent)
    got: dict[MqttBroker, list[bytes]] = {a: [], b: []}
    deadline = time.monotonic() + 10
    while sum(map(len, got.values())) < len(sent) and time.monotonic() < deadline:
        for broker in (a, b):
            deliveries = broker.fetch(queue_name, 50, 0.05)
            broker.ack(deliveries)
            got[broker] += [d.body for d in deliveries]
    assert sorted(got[a] + got[b]) == sorted(sent)  # each exactly once
    assert got[a] and got[b]  # both consumers had a share
    assert a.count(queue_name) == 0


def test_a_queue_whose_sessions_expired_keeps_what_is_published_next(brokers: list[MqttBroker],
                                                                       queue_name: str) -> None:
    """Once no process has used a queue for MQTT_SESSION_EXPIRY_SECONDS, the server drops its sessions. Its
    parked record used to live on, so the next publisher saw a slot, made no session, and the server
    dropped every message (nobody subscribed) while acknowledging them: the records now go first."""
    patch_frame_config(MQTT_SESSION_EXPIRY_SECONDS=2.0)
    first = MqttBroker()
    brokers.append(first)
    first.publish(queue_name, b'{"i": 0}')
    assert take(first, queue_name, 1) == [b'{"i": 0}']
    first.close()  # parks its slot: the session and the record now expire on their own
    time.sleep(3.5)  # past the session's expiry (Mosquitto counts whole seconds)
    publisher, consumer = MqttBroker(), MqttBroker()
    brokers += [publisher, consumer]
    publisher.publish_many(queue_name, [b'{"i": %d}' % i for i in range(1, 6)])
    assert sorted(take(consumer, queue_name, 5)) == [b'{"i": %d}' % i for i in range(1, 6)]


def test_a_long_running_publisher_keeps_an_unconsumed_queue_alive(brokers: list[MqttBroker],
                                                                  queue_name: str) -> None:
    """A publisher that outlives the queue's session expiry (no consumer meanwhile) makes slot 0's session
    again before it expires: it looks every anchor_seconds, and the parked record ends before the session."""
    from funboost_like.brokers.mqtt_sessions import anchor_seconds, parked_seconds

    patch_frame_config(MQTT_SESSION_EXPIRY_SECONDS=4.0)
    assert (parked_seconds(4.0), anchor_seconds()) == (2, 1.0)
    publisher = MqttBroker()
    brokers.append(publisher)
    sent = [b'{"i": %d}' % i for i in range(30)]
    for body in sent:  # 9 s: more than twice the session expiry
        publisher.publish(queue_name, body)
        time.sleep(0.3)
    consumer = MqttBroker()
    brokers.append(consumer)
    assert sorted(take(consumer, queue_name, len(sent))) == sorted(sent)


def test_the_held_record_shrinks_to_what_is_still_held(brokers: list[MqttBroker], queue_name: str) -> None:
    """A slot's held record lists what its holder runs, for its next holder to count crashes; once settled,
    the maintenance round writes it again without them, so a stale list cannot make a redelivery after a
    reconnection count as a crash."""
    broker = MqttBroker()
    brokers.append(broker)
    broker.publish_many(queue_name, [b'{"i": %d}' % i for i in range(3)])
    got: list[Delivery] = []
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        got += broker.fetch(queue_name, 3 - len(got), 0.1)
    slot = broker._slots[queue_name]
    assert broker.sessions.inherited(queue_name, slot.index) == {d.token[1] for d in got}
    broker.ack(got[:2])
    deadline = time.monotonic() + 3 * HEARTBEAT
    while broker.sessions.inherited(queue_name, slot.index) != {got[2].token[1]} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert broker.sessions.inherited(queue_name, slot.index) == {got[2].token[1]}
    broker.ack(got[2:])


def test_a_parked_slot_is_drained_by_the_live_consumer(brokers: list[MqttBroker], queue_name: str) -> None:
    a, b = MqttBroker(), MqttBroker()
    brokers += [a, b]
    a.fetch(queue_name, 1, 0)
    b.fetch(queue_name, 1, 0)
    b.close()  # slot 1 is parked: its session stays a member of the shared subscription
    sent = [f'{{"i":{i}}}'.encode() for i in range(20)]
    a.publish_many(queue_name, sent)
    first = take(a, queue_name, len(sent), timeout=0.5)
    assert 0 < len(first) < len(sent)  # the parked session got its share
    a.maintain()  # the lowest live slot's holder notes the parked slot (a new consumer may claim it meanwhile),
    a.maintain()  # and at its next round re-publishes what the slot holds
    rest = take(a, queue_name, len(sent) - len(first))
    assert sorted(first + rest) == sorted(sent)
    slots = a.control.snapshot(f"funboost_like/slots/{topic_part(queue_name)}/+")
    assert [m.topic.rsplit("/", 1)[1] for m in slots] == ["0"]  # slot 1's session and record ended


def test_delayed_messages_move_after_their_records_were_read(brokers: list[MqttBroker], queue_name: str) -> None:
    broker = MqttBroker()
    brokers.append(broker)
    assert broker.fetch(queue_name, 1, 0) == []  # a consumer: it follows the queue's delayed records
    assert broker.list_delayed(queue_name) == []  # a read of those records leaves the consumer following them
    broker.publish(queue_name, b'{"late":1}', not_before=time.time() + 0.5)
    [(due, body)] = broker.list_delayed(queue_name)
    assert body == b'{"late":1}' and due > time.time()
    assert take(broker, queue_name, 1, timeout=5) == [b'{"late":1}']
    # the mover deletes the record after the moved message is published, so a consumer can take the message
    # a moment before the deletion reaches the server (docs/mqtt.md): the listing empties right after
    deadline = time.monotonic() + 3
    while broker.list_delayed(queue_name) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert broker.list_delayed(queue_name) == [] and broker.count(queue_name) == 0


def test_rpc_result_is_published_to_a_topic_plain_clients_subscribe_to(brokers: list[MqttBroker],
                                                                        queue_name: str) -> None:
    received: list[paho.MQTTMessage] = []
    arrived = threading.Event()
    listener = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)  # what a browser does

    def on_message(_c: object, _u: object, message: paho.MQTTMessage) -> None:
        received.append(message)
        arrived.set()

    listener.on_message = on_message
    listener.connect(HOST, PORT)
    listener.subscribe(f"funboost_like/kv/{queue_name}/results/+", qos=1)
    listener.loop_start()

    @task_deco(queue_name, broker_kind=BrokerEnum.MQTT, is_using_rpc_mode=True, log_level=logging.WARNING)
    def add(a: int, b: int) -> int:
        return a + b

    try:
        add.consume()
        result = add.push(1, 2)
        assert result.get(timeout=15) == 3
        assert arrived.wait(5)
    finally:
        listener.disconnect()
        listener.loop_stop()
    [message] = received
    record = json.loads(message.payload)
    assert message.topic == f"funboost_like/kv/{queue_name}/results/{result.task_id}"
    assert record["task_id"] == result.task_id and record["result"] == 3 and record["status"] == "finished"


def test_credentials_never_reach_an_error(brokers: list[MqttBroker], queue_name: str) -> None:
    patch_frame_config(MQTT_URL="mqtt://fluser:s3cret-pw@127.0.0.1:1")  # nothing listens there
    with pytest.raises(BrokerConnectionError) as raised:
        MqttBroker().publish(queue_name, b"{}")
    assert "s3cret" not in str(raised.value) and "fluser:***@127.0.0.1:1" in str(raised.value)
    assert settings.as_dict()["MQTT_URL"] == "mqtt://fluser:***@127.0.0.1:1"


def test_what_mqtt_cannot_do_is_refused_early(brokers: list[MqttBroker], queue_name: str) -> None:
    with pytest.raises(ConfigurationError, match="routing"):
        @task_deco(queue_name, broker_kind=BrokerEnum.MQTT,
                   broker_exclusive_config={"exchange_name": "logs", "exchange_type": "fanout"})
        def routed(x: int) -> None: ...

    @task_deco(queue_name, broker_kind=BrokerEnum.MQTT)
    def plain(x: int) -> None: ...

    with pytest.raises(ConfigurationError, match="priority"):
        plain.publish({"x": 1}, PriorityConsumingControlConfig(priority=3))


def test_a_queue_name_that_cannot_be_in_a_client_id_is_refused_at_decoration(queue_name: str) -> None:
    """A consuming slot's client id holds the queue's name; MQTT forbids NUL in it, and the server closed
    the connection: the push failed as "unreachable" and a consumer retried for ever."""
    for bad in (f"{queue_name}\x00x", "q" * 70_000):
        with pytest.raises(ConfigurationError, match="MQTT queue names"):
            task_deco(bad, broker_kind=BrokerEnum.MQTT)(lambda x: x)


def test_a_lone_push_polls_for_its_puback_and_a_batch_or_a_shared_moment_does_not(
        brokers: list[MqttBroker], queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One-by-one pushes poll the socket for their PUBACK (a blocking read alone cost 40% of the rate on
    this VM, docs/performance.md); a batch reads its acks blocking, and so does a push while another
    thread of the process publishes, and for SHARED_QUIET_SECONDS after."""
    from funboost_like.brokers import mqtt_wire, socket_spin

    spins: list[float] = []
    real = mqtt_wire.spin
    monkeypatch.setattr(mqtt_wire, "spin", lambda ready, budget: (spins.append(budget), real(ready, budget))[-1])
    broker = MqttBroker()
    brokers.append(broker)
    time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
    for i in range(10):
        broker.publish(queue_name, json.dumps({"x": i}).encode())
    assert spins == [mqtt_wire.SPIN_SECONDS] * 10
    broker.publish_many(queue_name, [json.dumps({"x": i}).encode() for i in range(10, 30)])
    assert len(spins) == 10
    wires = broker._wires
    assert wires is not None
    assert not wires.sharing.alone(2)  # another thread publishes right now
    broker.publish(queue_name, b'{"x": 30}')
    assert len(spins) == 10
    time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
    broker.publish(queue_name, b'{"x": 31}')
    assert len(spins) == 11
    assert sorted(json.loads(body)["x"] for body in take(broker, queue_name, 32)) == list(range(32))


def test_a_lone_push_stops_polling_for_its_puback_while_polling_is_the_slower_way(
        brokers: list[MqttBroker], queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pushes measure polling and blocking in turns and keep the faster (socket_spin.PollChoice, as the
    Redis kinds do; here each poll costs 2 ms)."""
    from funboost_like.brokers import mqtt_wire, socket_spin

    polled: list[float] = []
    monkeypatch.setattr(mqtt_wire, "spin", lambda ready, budget: (polled.append(budget), time.sleep(0.002)))
    broker = MqttBroker()
    brokers.append(broker)
    time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
    trial = socket_spin.PollChoice.TRIAL
    for i in range(2 * trial + 100):
        broker.publish(queue_name, json.dumps({"x": i}).encode())
    assert len(polled) == trial  # the polling trial, then blocking kept
    assert sorted(json.loads(body)["x"] for body in take(broker, queue_name, 2 * trial + 100)) == list(
        range(2 * trial + 100))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's sockets in /proc")
def test_the_publishing_connections_of_threads_that_ended_are_closed(brokers: list[MqttBroker],
                                                                     queue_name: str) -> None:
    """Each thread publishes on a connection of its own. A consumer's pool workers come and go (idle ones
    end after THREAD_KEEP_ALIVE_SECONDS) and each that published left its connection open until the process
    ended; one that broke (a restarted server) stayed listed."""
    broker = MqttBroker()
    brokers.append(broker)
    before, after = sockets_after_ended_publishers(broker, queue_name)
    assert after <= before + 1  # the last thread's, closed when another one connects
    assert broker.count(queue_name) == 11


def test_a_script_that_pushes_and_ends_leaves_the_count_right(brokers: list[MqttBroker], queue_name: str) -> None:
    """A publisher writes its totals 0.1 s after a publish, on a daemon timer: a script that pushed and
    ended at once never wrote them, so ``count`` said 0 for messages waiting (and stayed low for good)."""
    import subprocess
    import sys

    reader = MqttBroker()
    brokers.append(reader)
    assert reader.count(queue_name) == 0  # subscribes the queue, so what is published next waits
    script = ("import sys\nfrom funboost_like.brokers.mqtt_broker import MqttBroker\n"
              "broker = MqttBroker()\nfor i in range(10):\n    broker.publish(sys.argv[1], b'{\"i\": %d}' % i)\n")
    env = {**os.environ, "FUNBOOST_LIKE_MQTT_URL": URL, "FUNBOOST_LIKE_MQTT_SESSION_EXPIRY_SECONDS": "600"}
    done = subprocess.run([sys.executable, "-c", script, queue_name], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert reader.count(queue_name) == 10
    assert len(take(reader, queue_name, 10)) == 10


@pytest.mark.ops_registry
def test_a_consumer_started_while_the_server_is_down_registers_once_it_is_up(queue_name: str) -> None:
    """The operations thread made its store (an MQTT connection) outside its error handling: a consumer
    started while Mosquitto was down killed that thread for good, so it could never be listed, paused or
    resumed once the server was back."""
    from funboost_like.ops.service import OpsService

    from .standin import free_port
    from .tcp_cut import CuttableLink

    require_server("Mosquitto", HOST, PORT)
    down = free_port()  # nothing listens there until the relay starts
    patch_frame_config(MQTT_URL=f"mqtt://127.0.0.1:{down}", OPS_HEARTBEAT_SECONDS=0.2,
                       MQTT_SESSION_EXPIRY_SECONDS=600.0)

    @task_deco(queue_name, broker_kind=BrokerEnum.MQTT, log_level=logging.CRITICAL)
    def f(x: int) -> None:
        return None

    link = None
    try:
        f.consume()
        time.sleep(3.0)  # the operations thread's first rounds fail: connection refused
        link = CuttableLink(PORT, HOST, listen_port=down)  # the server is up
        service = OpsService(kinds=[BrokerEnum.MQTT])
        deadline = time.monotonic() + 20
        while not service.workers(queue_name):
            assert time.monotonic() < deadline, "the consumer never registered once the server was up"
            time.sleep(0.1)
        assert any(t.name == "funboost_like-ops" for t in threading.enumerate())
    finally:
        f.consumer.stop()
        f.consumer.join(10)
        if link is not None:
            f.broker.purge(queue_name)
            link.close()


def test_messages_the_server_drops_from_a_full_queue_are_reported(queue_name: str, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Mosquitto acknowledges a publish to a session whose queue is full (max_queued_messages) and drops
    it: nothing told the user, the messages were simply gone. The server's $SYS total of dropped
    messages is now watched and every growth is logged as an error."""
    from .standin import free_port

    require_server("Mosquitto", HOST, PORT)  # the same binary, started here with a queue of 3 messages
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 3\nsys_interval 1\n")
    server = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    consumer = publisher = None
    try:
        assert until(lambda: _listening(port), 10)
        patch_frame_config(MQTT_URL=f"mqtt://127.0.0.1:{port}", MQTT_RECEIVE_MAXIMUM=1,
                           MQTT_SESSION_EXPIRY_SECONDS=600.0)
        consumer, publisher = MqttBroker(), MqttBroker()
        assert consumer.fetch(queue_name, 1, 0) == []  # its session subscribes; it then reads nothing
        with caplog.at_level(logging.WARNING, logger="funboost_like.mqtt"):
            publisher.publish_many(queue_name, [b'{"i": %d}' % i for i in range(20)])  # told: all delivered
            assert until(lambda: any("LOST" in r.getMessage() for r in caplog.records), 10)
        error = next(r for r in caplog.records if "LOST" in r.getMessage())
        assert error.levelno == logging.ERROR and "max_queued_messages" in error.getMessage()
        assert f"127.0.0.1:{port}" in error.getMessage()
    finally:
        for broker in (consumer, publisher):
            if broker is not None:
                broker.close()
        server.terminate()
        server.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True


def test_consumers_that_claim_at_the_same_moment_get_slots_of_their_own(brokers: list[MqttBroker],
                                                                        queue_name: str) -> None:
    """Processes started together (multi_process_consume) all saw slot 0 free and took it from each other
    all run long: Mosquitto 2.0 closes the taken connection without the reason code the broker waited
    for, so paho reconnected and took it back, and every takeover sent the messages in flight again."""
    consumers = [MqttBroker() for _ in range(3)]
    brokers += consumers
    threads = [threading.Thread(target=c.fetch, args=(queue_name, 1, 0)) for c in consumers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(c._slots[queue_name].index for c in consumers) == [0, 1, 2]
    sent = [f'{{"i":{i}}}'.encode() for i in range(150)]
    consumers[0].publish_many(queue_name, sent)
    got: list[bytes] = []
    deadline = time.monotonic() + 15
    while len(got) < len(sent) and time.monotonic() < deadline:
        for consumer in consumers:
            deliveries = consumer.fetch(queue_name, 50, 0.05)
            consumer.ack(deliveries)
            got += [d.body for d in deliveries]
    time.sleep(2.0)  # a takeover would send what was in flight again
    for consumer in consumers:
        got += [d.body for d in consumer.fetch(queue_name, 50, 0.2)]
    assert sorted(got) == sorted(sent)  # each exactly once
    assert not any(c._slots[queue_name].lost for c in consumers)


def test_a_slot_taken_by_another_connection_is_given_up_without_a_reconnection_war(brokers: list[MqttBroker],
                                                                                    queue_name: str) -> None:
    from funboost_like.brokers.mqtt_client import connect, parse_url

    holder = MqttBroker()
    brokers.append(holder)
    assert holder.fetch(queue_name, 1, 0) == []
    slot = holder._slots[queue_name]
    sessions = holder.sessions
    sessions.beat(queue_name, slot.index, "another-process")  # what the taker's claim writes
    taker, _ = connect(parse_url(URL), f"funboost_like:{queue_name}:{slot.index}", clean_start=False,
                       session_expiry=600)
    try:
        assert until(lambda: slot.lost, 5)  # Mosquitto closed the holder's socket: its record names another owner
        time.sleep(3.0)  # past paho's reconnection delay: the holder must not take the slot back
        assert taker.is_connected()
    finally:
        taker.disconnect()
        taker.loop_stop()


def test_a_failing_count_record_is_logged_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    """A publisher writes its message counts 0.1 s after a publish; while the server was unreachable every
    try printed a warning with a traceback (about eight per drop). Now one line per outage."""
    from funboost_like.brokers.mqtt_client import Control, parse_url
    from funboost_like.brokers.mqtt_counts import Counts

    from .tcp_cut import CuttableLink

    require_server("Mosquitto", HOST, PORT)
    link = CuttableLink(PORT, HOST)
    control = Control(parse_url(f"mqtt://127.0.0.1:{link.port}"))
    try:
        counts = Counts(control)
        counts.published("fl_counts_outage", 1)
        link.cut()
        assert until(lambda: not control.client.is_connected(), 5)
        with caplog.at_level(logging.WARNING, logger="funboost_like"):
            for _ in range(3):
                counts.published("fl_counts_outage", 1)
                counts.write()
        failures = [r for r in caplog.records if "writing the message counts" in r.getMessage()]
        assert len(failures) == 1 and failures[0].exc_info is None
    finally:
        link.close()
        control.client.disconnect()
        control.client.loop_stop()
