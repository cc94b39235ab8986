"""RabbitMQ specifics beyond the contract suite, on every RabbitMQ kind built (issue 11).

On the shared server: plain-AMQP interoperation both ways, a queue that exists with other
properties, fair dispatch (prefetch following capacity), long delays held by the server rather
than a consumer, dead letters. On a private node (tests/private_rabbitmq.py): a restart with
``stop_app``/``start_app`` and a killed node are survived without a process restart and lose nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from funboost_like import PriorityConsumingControlConfig, patch_frame_config, task_deco
from funboost_like.brokers import registry
from funboost_like.brokers.amqp import AmqpBroker
from funboost_like.brokers.registry import broker_class
from funboost_like.core.errors import BrokerConnectionError

from .conftest import open_sockets, require_server, subprocess_env
from .private_rabbitmq import PrivateRabbitMQ, available

pika = pytest.importorskip("pika")

SHARED_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
KINDS = [kind for kind, fixture in registry.fixture_cases()
         if fixture.server is not None and fixture.server[0] == "RabbitMQ" and fixture.variant in ("", "amqp")]


def amqp_kind(kind: registry.BrokerEnum) -> bool:
    return issubclass(broker_class(kind), AmqpBroker)


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request: pytest.FixtureRequest) -> Iterator[registry.BrokerEnum]:
    require_server("RabbitMQ", "127.0.0.1", 5672)
    patch_frame_config(RABBITMQ_URL=SHARED_URL)
    yield request.param
    registry.close_all()


@pytest.fixture
def plain() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(SHARED_URL))
    yield connection.channel()
    connection.close()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def test_a_plain_pika_program_and_the_framework_understand_each_other(kind, plain) -> None:  # type: ignore[no-untyped-def]
    queue = unique("interop")
    seen: list[int] = []
    done = threading.Event()

    @task_deco(queue, broker_kind=kind, log_level=logging.WARNING)
    def add(x: int, y: int) -> int:
        seen.append(x + y)
        if len(seen) == 2:
            done.set()
        return x + y

    add.push(1, 2)  # declares the queue
    plain.basic_publish("", queue, json.dumps({"x": 10, "y": 20}).encode(),  # another program, no framework
                        pika.BasicProperties(delivery_mode=2, content_type="application/json"))
    add.consume()
    assert done.wait(10)
    assert sorted(seen) == [3, 30]
    add.stop()

    other = unique("interop_out")
    plain.queue_declare(other, durable=True, arguments={"x-max-priority": 9})
    task_deco(other, broker_kind=kind)(lambda a: a).push(a=5)
    method, properties, body = plain.basic_get(other, auto_ack=True)
    assert method is not None and json.loads(body)["a"] == 5 and properties.delivery_mode == 2
    plain.queue_delete(queue)
    plain.queue_delete(other)


def test_a_queue_declared_with_other_properties_is_used_as_it_is(kind, plain, caplog) -> None:  # type: ignore[no-untyped-def]
    queue = unique("hello")
    plain.queue_declare(queue)  # as the tutorial's send.py does: not durable, no priority
    broker = broker_class(kind)()
    try:
        with caplog.at_level(logging.WARNING):
            broker.publish(queue, b'{"n":1}')
        assert "exists with other properties" in caplog.text
        [delivery] = broker.fetch(queue, 1, 5.0)
        assert delivery.body == b'{"n":1}'
        broker.ack([delivery])
    finally:
        broker.close()
        plain.queue_delete(queue)


def test_prefetch_follows_the_consumers_capacity(kind, plain) -> None:  # type: ignore[no-untyped-def]
    queue = unique("fair")
    broker = broker_class(kind)()
    try:
        broker.publish_many(queue, [b"{}"] * 10)
        held = broker.fetch(queue, 2, 5.0)
        while len(held) < 2:
            held += broker.fetch(queue, 2 - len(held), 1.0)
        time.sleep(0.3)  # room for the server to push more, if it would
        assert plain.queue_declare(queue, passive=True).method.message_count == 8  # nothing hoarded
        broker.ack(held)
        more = broker.fetch(queue, 3, 5.0)
        assert 1 <= len(more) <= 3
        broker.ack(more)
    finally:
        broker.close()
        plain.queue_delete(queue)


def test_changing_the_prefetch_while_messages_flow_counts_no_crash(kind, plain) -> None:  # type: ignore[no-untyped-def]
    """A prefetch change restarts the consumer; a message the server pushed to the old one just before
    its cancel arrived stays ours (pika's own channel would reject it: back to the queue marked
    redelivered, which reads as a consumer's death and would count a crash against a healthy message)."""
    queue = unique("reprefetch")
    broker = broker_class(kind)()
    total = 300
    try:
        broker.publish_many(queue, [json.dumps({"i": i}).encode() for i in range(total)])
        seen: list = []
        sizes = [1, 9, 2, 17, 1, 5, 30, 3]
        deadline = time.monotonic() + 30
        while len(seen) < total and time.monotonic() < deadline:
            got = broker.fetch(queue, sizes[len(seen) % len(sizes)], 1.0)
            broker.ack(got)
            seen += got
        assert sorted(json.loads(d.body)["i"] for d in seen) == list(range(total))
        assert [(d.attempts, d.crashes) for d in seen if (d.attempts, d.crashes) != (1, 0)] == []
    finally:
        broker.close()
        plain.queue_delete(queue)


def test_a_long_countdown_waits_in_the_server_not_in_a_consumer(kind, plain) -> None:  # type: ignore[no-untyped-def]
    queue = unique("later")
    broker = broker_class(kind)()
    try:
        broker.publish(queue, b'{"late":1}', not_before=time.time() + 3600)
        assert broker.fetch(queue, 10, 0.3) == []
        assert broker.in_flight(queue) == 0
        # 3,600,000 ms: its highest bit is 2**21, so it waits its first 2**21 ms in level 21.
        assert plain.queue_declare("fl.delay.q21", passive=True).method.message_count >= 1
    finally:
        broker.close()
        plain.queue_delete(queue)


def test_dead_letters_go_to_a_durable_queue_with_their_reason(kind, plain) -> None:  # type: ignore[no-untyped-def]
    queue = unique("dead")
    broker = broker_class(kind)()
    try:
        broker.publish(queue, b'{"bad":1}')
        [delivery] = broker.fetch(queue, 1, 5.0)
        broker.dead_letter(delivery, "it failed for good", attempts=3)
        [letter] = broker.list_dead_letters(queue)
        assert (letter.body, letter.reason, letter.attempts) == (b'{"bad":1}', "it failed for good", 3)
        method, _properties, body = plain.basic_get(f"{queue}.dlq", auto_ack=False)
        assert method is not None and json.loads(body)["reason"] == "it failed for good"
        plain.basic_nack(method.delivery_tag, requeue=True)
        assert broker.count(queue) == 0
    finally:
        broker.close()
        plain.queue_delete(queue)
        plain.queue_delete(f"{queue}.dlq")


def test_reading_a_queue_that_does_not_exist_leaves_nothing_on_the_server(kind, plain) -> None:  # type: ignore[no-untyped-def]
    queue = unique("typo")  # what `funboost_like status typo --broker ...` does
    broker = broker_class(kind)()
    try:
        assert broker.count(queue) == 0 and broker.purge(queue) == 0
        assert broker.list_dead_letters(queue) == [] and broker.purge_dead_letters(queue) == 0
        for name in (queue, f"{queue}.dlq"):
            with pytest.raises(pika.exceptions.ChannelClosedByBroker):
                plain.connection.channel().queue_declare(name, passive=True)  # 404: never declared
        broker.publish(queue, b'{"x":1}')  # the same broker goes on after the server's 404s
        assert broker.count(queue) == 1
    finally:
        broker.close()
        plain.queue_delete(queue)
        plain.queue_delete(f"{queue}.dlq")  # made by an older version


# -- a private node: restarts and crashes -----------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbitMQ]:
    if not available():
        pytest.skip("rabbitmq-server is not installed")
    private = PrivateRabbitMQ(Path(tmp_path_factory.mktemp("rabbitmq")))
    private.start()
    yield private
    private.stop()


@pytest.mark.xdist_group("rabbitmq_node")  # one private node, in one worker
def test_a_restart_is_survived_without_a_process_restart(kind, node) -> None:  # type: ignore[no-untyped-def]
    patch_frame_config(RABBITMQ_URL=node.url)
    registry.close_all()
    queue = unique("restart")
    seen: set[int] = set()

    @task_deco(queue, broker_kind=kind, concurrent_num=4, log_level=logging.WARNING)
    def work(i: int) -> None:
        seen.add(i)
        time.sleep(0.01)

    for i in range(30):
        work.push(i)
    work.consume()
    try:
        wait_for(lambda: len(seen) >= 5, 20, "the first calls")
        node.stop_app()
        with pytest.raises(BrokerConnectionError):
            work.push(-1)  # a clear error during the outage, never a silent loss
        time.sleep(1.0)
        node.start_app()
        for i in range(30, 60):
            work.push(i)
        wait_for(lambda: seen >= set(range(60)), 60, "every call, the consumer having reconnected by itself")
        assert -1 not in seen
    finally:
        work.stop()  # else it retries the private node, stopped at the module's end, until the session ends


@pytest.mark.xdist_group("rabbitmq_node")  # one private node, in one worker
def test_a_killed_node_keeps_confirmed_messages(kind, node) -> None:  # type: ignore[no-untyped-def]
    patch_frame_config(RABBITMQ_URL=node.url)
    registry.close_all()
    queue = unique("crash")
    broker = broker_class(kind)()
    try:
        # The queue exists a while before the kill: once (in one CI run of KOMBU) a node killed within a
        # second of declaring a queue restarted without it. RabbitMQ keeps queue declarations in Mnesia,
        # whose log is written with a delay; the confirmed messages of an older queue are what is promised.
        assert broker.fetch(queue, 1, 0.05) == []  # subscribing declares the queue (counting does not)
        broker.stop_fetching(queue)
        time.sleep(2.0)
        broker.publish_many(queue, [b'{"i":%d}' % i for i in range(10)])  # returns once confirmed
        node.kill()
        node.start()
        got: list = []
        deadline = time.monotonic() + 30
        while len(got) < 10 and time.monotonic() < deadline:
            try:
                got += broker.fetch(queue, 10, 1.0)
            except BrokerConnectionError:
                time.sleep(0.2)
        assert sorted(d.body for d in got) == sorted(b'{"i":%d}' % i for i in range(10))
        broker.ack(got)
    finally:
        broker.close()


@pytest.mark.xdist_group("rabbitmq_node")  # one private node, in one worker
def test_a_delayed_routed_message_no_binding_matches_when_due_is_kept(kind, node) -> None:  # type: ignore[no-untyped-def]
    """Routed when due (it waits in the delay levels first): matching no binding then, it is kept and
    reaches a queue bound later (the node retries every 0.5 s, tests/private_rabbitmq.py), never dropped."""
    patch_frame_config(RABBITMQ_URL=node.url)
    registry.close_all()
    exchange = unique("later")
    got = threading.Event()

    def config(key: str) -> dict[str, str]:
        return {"exchange_name": exchange, "exchange_type": "direct", "routing_key_for_bind": key}

    @task_deco(unique("first"), broker_kind=kind, log_level=logging.WARNING, broker_exclusive_config=config("a"))
    def first(n: int) -> None: ...

    @task_deco(unique("late"), broker_kind=kind, log_level=logging.WARNING, broker_exclusive_config=config("b"))
    def late(n: int) -> None:
        got.set()

    connection = pika.BlockingConnection(pika.URLParameters(node.url))
    plain = connection.channel()

    def in_delay_levels() -> int:
        return sum(plain.queue_declare(f"fl.delay.q{k}", passive=True).method.message_count for k in range(8))

    try:
        first.publish({"n": 1}, PriorityConsumingControlConfig(routing_key="b", countdown=0.2))  # no "b" yet
        wait_for(lambda: in_delay_levels() == 0, 10, "the message to be due")
        late.consume()  # binds "b" now
        assert got.wait(15), "the message due while no binding matched was dropped"
    finally:
        late.stop()
        connection.close()


def test_a_channel_closed_by_the_server_is_opened_again(kind, caplog) -> None:  # type: ignore[no-untyped-def]
    """What RabbitMQ does to a delivery held past its consumer_timeout (close the channel, requeue its
    messages), provoked here with an ack of an unknown delivery tag: the queue is subscribed again on
    a new channel, consumption goes on, and the message comes back. It comes back to the live process
    that held it, so it is not counted as a crash (it was, and three channel losses made a healthy
    message poison)."""
    queue = unique("closed")
    broker = broker_class(kind)()
    try:
        broker.publish(queue, b'{"n":1}')
        [first] = broker.fetch(queue, 1, 5.0)
        broker._subs[queue].acks.append(987654)  # the server answers PRECONDITION_FAILED and closes the channel
        with caplog.at_level(logging.WARNING):
            broker._wake()
            again: list = []
            deadline = time.monotonic() + 10
            while not again and time.monotonic() < deadline:
                again = broker.fetch(queue, 1, 0.5)
        assert [d.body for d in again] == [b'{"n":1}'] and again[0].crashes == 0
        assert "closed the channel" in caplog.text
        broker.ack(again)
        broker.publish(queue, b'{"n":2}')
        [later] = broker.fetch(queue, 1, 5.0)
        assert later.body == b'{"n":2}'
        broker.ack([later])
        broker.ack([first])  # its channel is gone: nothing is sent, nothing raises
    finally:
        broker.close()


def test_rpc_results_and_task_filters_live_on_rabbitmq(kind, plain) -> None:  # type: ignore[no-untyped-def]
    queue = unique("rpc")
    runs: list[int] = []

    @task_deco(queue, broker_kind=kind, is_using_rpc_mode=True, log_level=logging.WARNING)
    def add(x: int, y: int) -> int:
        return x + y

    # One call at a time: a filter skips identical calls that already succeeded, so two running at once
    # would both run (tests/test_filtering.py does the same).
    @task_deco(f"{queue}_once", broker_kind=kind, do_task_filtering=True, task_filtering_expire_seconds=60,
               concurrent_num=1, log_level=logging.WARNING)
    def once(x: int) -> None:
        runs.append(x)

    add.consume()
    once.consume()
    results = [add.push(i, i) for i in range(5)]
    assert [r.get(timeout=20) for r in results] == [0, 2, 4, 6, 8]
    for _ in range(3):
        once.push(7)
    wait_for(lambda: runs == [7], 20, "the first call")
    time.sleep(0.5)
    assert runs == [7]  # the two others were filtered


def test_add_if_absent_holds_while_a_reader_has_the_record_in_hand(kind, plain) -> None:  # type: ignore[no-untyped-def]
    """A ``basic.get`` leaves the value's queue empty of *ready* messages until its message goes back;
    a claim taken in that moment would add the record twice (a CI failure: get_many, then
    add_if_absent, on one thread)."""
    queue = unique("kv")
    broker = broker_class(kind)()
    store = broker.key_value_store(queue, "contract")
    try:
        assert store.add_if_absent("a", b"1", None) is True
        method, _properties, body = plain.basic_get(f"fl.kv.{queue}.contract.a", auto_ack=False)
        assert body == b"1"  # held by a reader, unacked: the value's queue has no ready message now
        assert store.add_if_absent("a", b"other", None) is False
        plain.basic_nack(method.delivery_tag, requeue=True)
        assert store.get("a") == b"1"
        store.delete("a")
        assert store.get("a") is None and store.add_if_absent("a", b"2", None) is True
    finally:
        store.delete("a")
        broker.close()


def test_acks_sent_just_before_close_are_not_lost(kind) -> None:  # type: ignore[no-untyped-def]
    queue = unique("ackclose")
    for _ in range(3):
        broker = broker_class(kind)()
        broker.publish(queue, b"{}")
        [delivery] = broker.fetch(queue, 1, 5.0)
        broker.ack([delivery])
        broker.close()  # the I/O thread sends what is queued before it stops
        time.sleep(0.1)
        checker = broker_class(kind)()
        try:
            assert checker.count(queue) == 0
        finally:
            checker.purge(queue)
            checker.close()


def test_a_plain_pika_program_and_the_framework_share_an_exchange(kind, plain) -> None:  # type: ignore[no-untyped-def]
    """The interop contract of docs/rabbitmq.md through a topic exchange, both ways."""
    queue, exchange = unique("exin"), unique("exchange")
    got: list[dict] = []
    done = threading.Event()

    @task_deco(queue, broker_kind=kind, log_level=logging.WARNING,
               broker_exclusive_config={"exchange_name": exchange, "exchange_type": "topic",
                                        "routing_key_for_bind": "orders.*"})
    def on_order(n: int) -> None:
        got.append({"n": n})
        done.set()

    try:
        on_order.consume()  # binds its queue to the exchange
        deadline = time.monotonic() + 10
        while True:  # the consumer binds when it starts
            try:
                plain.exchange_declare(exchange, passive=True)
                break
            except pika.exceptions.ChannelClosedByBroker:
                assert time.monotonic() < deadline, "the framework did not declare its exchange"
                plain = plain.connection.channel()
                time.sleep(0.05)
        plain.basic_publish(exchange, "orders.new", json.dumps({"n": 7}).encode(),
                            pika.BasicProperties(delivery_mode=2, content_type="application/json"))
        assert done.wait(10) and got == [{"n": 7}]

        outside = plain.queue_declare("", exclusive=True).method.queue  # a plain consumer's own queue
        plain.queue_bind(outside, exchange, "orders.#")
        on_order.publish({"n": 8}, routing_key="orders.old.eu")  # reaches the plain queue only
        deadline = time.monotonic() + 5
        method = None
        while method is None and time.monotonic() < deadline:
            method, _properties, body = plain.basic_get(outside, auto_ack=True)
        assert method is not None and json.loads(body)["n"] == 8
    finally:
        on_order.stop()
        plain.queue_delete(queue)
        plain.exchange_delete(exchange)


def test_an_exchange_declared_with_other_properties_is_used_with_a_warning(kind, plain, caplog) -> None:  # type: ignore[no-untyped-def]
    queue, exchange = unique("exold"), unique("exchange")
    plain.exchange_declare(exchange, "fanout")  # as the tutorial's emit_log.py does: not durable
    broker = broker_class(kind)()
    try:
        with caplog.at_level(logging.WARNING):
            broker.bind(queue, exchange, "fanout", [""])
        assert "exists with other properties" in caplog.text
        assert broker.publish_routed(exchange, "", [b'{"n":1}']) != 0  # -1: routed, count unknown
        [delivery] = broker.fetch(queue, 1, 5.0)
        assert delivery.body == b'{"n":1}'
        broker.ack([delivery])
    finally:
        broker.close()
        plain.queue_delete(queue)
        plain.exchange_delete(exchange)


@pytest.mark.timeout(60)
def test_heartbeats_go_on_during_a_long_call(kind, plain, caplog) -> None:  # type: ignore[no-untyped-def]
    """A one-second heartbeat and a call of four: the server would close a connection silent for two
    beats, so the call's message is acked once, never redelivered, with no reconnection."""
    if kind == registry.BrokerEnum.KOMBU:
        pytest.skip("kombu's heartbeat is the module's HEARTBEAT, not the URL's")
    patch_frame_config(RABBITMQ_URL=SHARED_URL + "?heartbeat=1")
    queue = unique("beat")
    runs: list[float] = []
    done = threading.Event()

    @task_deco(queue, broker_kind=kind, log_level=logging.WARNING, concurrent_num=2)
    def long_call(seconds: float) -> None:
        runs.append(seconds)
        time.sleep(seconds)
        done.set()

    try:
        long_call.push(4.0)
        with caplog.at_level(logging.WARNING, logger="funboost_like"):
            long_call.consume()
            assert done.wait(20)
            deadline = time.monotonic() + 5
            while plain.queue_declare(queue, passive=True).method.message_count or long_call.get_message_count():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(0.5)  # an ack lost with a dropped connection would bring the message back now
        assert runs == [4.0]
        # Other tests' consumers in this process may still report their deleted queues or their stopped
        # private servers: not this one's trouble. A consumer's messages name the URL it connected to.
        trouble = [record.getMessage() for record in caplog.records
                   if ("reconnecting" in record.getMessage() or "closed the channel" in record.getMessage())
                   and "?heartbeat=1" in record.getMessage()
                   and ("NOT_FOUND - no queue" not in record.getMessage() or queue in record.getMessage())]
        assert not trouble
    finally:
        long_call.stop()
        plain.queue_delete(queue)


@pytest.mark.timeout(60)
def test_qps_is_exact_on_rabbitmq(kind, plain) -> None:  # type: ignore[no-untyped-def]
    queue = unique("qps")
    starts: list[float] = []

    @task_deco(queue, broker_kind=kind, log_level=logging.WARNING, qps=20, concurrent_num=20)
    def tick(i: int) -> None:
        starts.append(time.monotonic())

    try:
        tick.publish_many([{"i": i} for i in range(120)])
        tick.consume()
        deadline = time.monotonic() + 20
        while len(starts) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = starts[0] + 0.5  # past the start
        time.sleep(3.0)
        rate = len([t for t in starts if t0 <= t < t0 + 2.5]) / 2.5
        assert 17 <= rate <= 23, rate
    finally:
        tick.stop()
        plain.queue_delete(queue)


def test_priorities_are_a_queues_option_as_in_funboost(kind, plain) -> None:  # type: ignore[no-untyped-def]
    """broker_exclusive_config={"x-max-priority": n} declares a priority queue (publisher and consumer
    alike); a task without it has a plain queue, where a priority raises instead of being ignored."""
    from funboost_like import PriorityConsumingControlConfig
    from funboost_like.core.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="x-max-priority"):
        task_deco(unique("badprio"), broker_kind=kind, broker_exclusive_config={"x-max-priority": 0})(print)
    queue, plain_queue = unique("prio"), unique("noprio")
    order: list[int] = []

    @task_deco(queue, broker_kind=kind, concurrent_num=1, broker_exclusive_config={"x-max-priority": 5},
               log_level=logging.WARNING)
    def ranked(n: int) -> None:
        order.append(n)

    @task_deco(plain_queue, broker_kind=kind, log_level=logging.WARNING)
    def unranked(n: int) -> None:
        return None

    try:
        for n, priority in ((0, 0), (5, 5), (1, 1), (6, 0)):
            ranked.publish({"n": n}, priority_control_config=PriorityConsumingControlConfig(priority=priority))
        declared = plain.queue_declare(queue, durable=True, passive=True)
        assert declared.method.message_count == 4
        with pytest.raises(ConfigurationError, match="x-max-priority"):
            ranked.publish({"n": 9}, priority_control_config=PriorityConsumingControlConfig(priority=6))
        with pytest.raises(ConfigurationError, match="x-max-priority"):
            unranked.publish({"n": 1}, priority_control_config=PriorityConsumingControlConfig(priority=1))
        unranked.push(1)  # priority 0 is fine on a plain queue
        # A plain program declaring the queue with the same arguments agrees: it is a priority queue.
        plain.queue_declare(queue, durable=True, arguments={"x-queue-version": 2, "x-max-priority": 5})
        ranked.consume()
        wait_for(lambda: len(order) == 4, 15, "the four calls")
        assert order == [5, 1, 0, 6]
    finally:
        ranked.stop()
        plain.queue_delete(queue)
        plain.queue_delete(plain_queue)


def test_a_routed_priority_a_queue_does_not_keep_is_named_once(kind, plain, caplog) -> None:  # type: ignore[no-untyped-def]
    """A routed publish cannot know which queues it reaches: the consumer of a queue without
    x-max-priority says once that it receives priorities it ignores, and how to keep them."""
    queue, exchange = unique("routedprio"), unique("exchange")
    broker = broker_class(kind)()
    try:
        broker.bind(queue, exchange, "fanout", [""])
        broker.publish_routed(exchange, "", [b'{"n":1}', b'{"n":2}'], priority=3)
        with caplog.at_level(logging.WARNING, logger="funboost_like.rabbitmq"):
            got = broker.fetch(queue, 2, 5.0)
            got += broker.fetch(queue, 2, 5.0) if len(got) < 2 else []
        assert sorted(d.body for d in got) == [b'{"n":1}', b'{"n":2}']
        broker.ack(got)
        warned = [r.getMessage() for r in caplog.records if "priority 3" in r.getMessage()]
        assert len(warned) == 1 and repr(queue) in warned[0] and "x-max-priority" in warned[0], caplog.text
    finally:
        broker.close()
        plain.queue_delete(queue)
        plain.exchange_delete(exchange)


def test_a_message_held_when_the_connection_dropped_is_no_crash_when_it_comes_back(kind) -> None:  # type: ignore[no-untyped-def]
    """A live process whose connection dropped three times while a call held its message dead-lettered that
    healthy message as poison: each redelivery was counted as a death. The push adapter now notes what a
    lost channel of this process held, and such a message coming back here is not counted."""
    from .tcp_cut import CuttableLink

    link = CuttableLink(5672)
    patch_frame_config(RABBITMQ_URL=SHARED_URL.replace(":5672/", f":{link.port}/"),
                       KOMBU_URL=SHARED_URL.replace(":5672/", f":{link.port}/"))
    queue = unique("dropped")
    broker = broker_class(kind)()
    try:
        broker.publish(queue, b'{"n":1}')
        [held] = broker.fetch(queue, 1, 10.0)
        for _ in range(3):
            link.cut()  # the process stays alive and still holds the message
            time.sleep(0.3)
            link.restore()
            again: list = []
            deadline = time.monotonic() + 20
            while not again and time.monotonic() < deadline:
                try:
                    again = broker.fetch(queue, 1, 0.5)
                except BrokerConnectionError:
                    time.sleep(0.2)
            assert [(d.body, d.crashes) for d in again] == [(b'{"n":1}', 0)]
            held = again[0]
        broker.ack([held])
        assert broker.list_dead_letters(queue) == []
    finally:
        broker.close()
        link.close()


def test_a_graceful_stop_with_prefetched_messages_counts_no_crash(kind, plain) -> None:  # type: ignore[no-untyped-def]
    """A consumer stopped gracefully while the server had pushed it more than it ran hands those back
    uncounted: the next consumer gets every message left with no crash counted (RabbitMQ would mark
    them redelivered had the stop left them unacked, which reads as a death)."""
    queue = unique("stopped")
    holder, taker = broker_class(kind)(), broker_class(kind)()
    try:
        bodies = [json.dumps({"i": i}).encode() for i in range(60)]
        holder.publish_many(queue, bodies)
        ran: list = []
        while len(ran) < 10:
            ran += holder.fetch(queue, 10 - len(ran), 2.0)
        ran += holder.fetch(queue, 10, 0)  # room for 10 more: the server pushes them (not taken yet)
        wait_for(lambda: plain.queue_declare(queue, passive=True).method.message_count <= 40, 5,
                 "the server to push the holder more than it runs")
        holder.ack(ran)
        holder.stop_fetching(queue)
        holder.stopped_consuming(queue)
        holder.close()
        left: list = []
        deadline = time.monotonic() + 10
        while len(left) < 50 and time.monotonic() < deadline:
            got = taker.fetch(queue, 50, 0.5)
            taker.ack(got)
            left += got
        assert sorted(d.body for d in ran + left) == sorted(bodies)
        assert [d.body for d in left if d.crashes] == []
    finally:
        taker.close()
        plain.queue_delete(queue)


def test_a_queue_name_rabbitmq_refuses_is_refused_at_decoration() -> None:
    """The server refuses 'amq.' names and names over 255 bytes (the queue's '.dlq' too); a consumer of one
    retried its first fetch forever."""
    from funboost_like.core.errors import ConfigurationError

    for kind in KINDS:
        for bad in ("amq.orders", "q" * 252, "é" * 126):
            with pytest.raises(ConfigurationError, match="RabbitMQ queue names"):
                task_deco(bad, broker_kind=kind)(lambda: None)
        task_deco("q" * 251, broker_kind=kind)(lambda: None)


def test_a_refused_connection_fails_at_once_and_says_why(kind, caplog) -> None:  # type: ignore[no-untyped-def]
    """rabbitpy waited out its whole open timeout (6 s) for a refused connection, then blamed a timeout;
    pika's error read as nothing after the colon, and pika logged nine ERROR records and a traceback
    of each attempt (a consumer retrying through an outage filled its log with them)."""
    from .standin import free_port

    patch_frame_config(RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    broker = broker_class(kind)()
    try:
        started = time.monotonic()
        with caplog.at_level(logging.INFO), pytest.raises(BrokerConnectionError) as caught:
            broker.publish(unique("refused"), b"{}")
        assert time.monotonic() - started < 2.0
        detail = str(caught.value).partition("is unreachable while publishing to queue")[2].partition(": ")[2]
        assert detail and "Timeout" not in detail, str(caught.value)
        assert [r.getMessage() for r in caplog.records if not r.name.startswith("funboost_like")] == []
    finally:
        broker.close()


def test_pikas_records_show_again_when_its_logger_is_set_to_debug(caplog) -> None:  # type: ignore[no-untyped-def]
    """The client's records are dropped (the broker reports what they say); a user debugging the client sets
    its logger to DEBUG and sees them all."""
    from .standin import free_port

    patch_frame_config(RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    broker = broker_class(registry.BrokerEnum.RABBITMQ_PIKA)()
    logging.getLogger("pika").setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(BrokerConnectionError):
            broker.publish(unique("refused"), b"{}")
        assert any(r.name.startswith("pika.") and r.levelno == logging.ERROR for r in caplog.records)
    finally:
        logging.getLogger("pika").setLevel(logging.NOTSET)
        broker.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's sockets in /proc")
def test_the_connections_of_threads_that_ended_are_closed(kind) -> None:  # type: ignore[no-untyped-def]
    """Each thread publishes on a connection of its own. A consumer's pool workers come and go (idle ones
    end after THREAD_KEEP_ALIVE_SECONDS) and each that published, or stored an RPC result, left its
    connection open until the process ended: one more connection to RabbitMQ per worker ever started."""
    if not amqp_kind(kind):
        pytest.skip("kombu keeps its own connections")
    queue = unique("threads")
    broker = broker_class(kind)()
    try:
        at_start = open_sockets()
        broker.publish(queue, b"{}")  # this thread's connection
        before = open_sockets()
        per_connection = before - at_start  # its socket, and the client's own socket pairs
        for _ in range(10):
            worker = threading.Thread(target=broker.publish, args=(queue, b"{}"))
            worker.start()
            worker.join()
        # the last thread's, closed when another one connects (rabbitpy's I/O thread closes its socket a moment later)
        wait_for(lambda: open_sockets() <= before + per_connection, 5, "the sockets of the threads that ended closed")
        assert broker.count(queue) == 11
    finally:
        broker.purge(queue)
        broker.close()


EVENTLET_CLOSE = """
import eventlet; eventlet.monkey_patch()
import os, sys, threading, time
from funboost_like import BrokerEnum, ConcurrentModeEnum, patch_frame_config, task_deco
from funboost_like.brokers.registry import get_broker

patch_frame_config(RABBITMQ_URL=sys.argv[2])
done = threading.Event()

@task_deco(sys.argv[1], broker_kind=BrokerEnum.RABBITMQ_AMQPSTORM, concurrent_mode=ConcurrentModeEnum.EVENTLET,
           log_level=30)
def job(x):
    if x == 3:
        done.set()

fds = len(os.listdir("/proc/self/fd"))
publishers = [threading.Thread(target=job.push, args=(x,)) for x in range(4)]  # a connection each
for thread in publishers:
    thread.start()
for thread in publishers:
    thread.join()
job.consume()
assert done.wait(20)
began = time.monotonic()
job.stop()
assert job.consumer.join(10)
stopped = time.monotonic()
get_broker(BrokerEnum.RABBITMQ_AMQPSTORM).purge(sys.argv[1])
get_broker(BrokerEnum.RABBITMQ_AMQPSTORM).close()
print(f"stop {stopped - began:.3f} close {time.monotonic() - stopped:.3f} fds {len(os.listdir('/proc/self/fd')) - fds}",
      flush=True)
os._exit(0)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's descriptors in /proc")
def test_amqpstorm_connections_close_at_once_under_eventlet(isolated_settings: Path, tmp_path: Path) -> None:
    """amqpstorm's reader waits for its socket in a one-second select, which eventlet does not wake when
    the socket is closed: each connection took a second to close (a consumer and four publishing green
    threads: 5 s). The reader now also waits on a pipe that the close writes to."""
    pytest.importorskip("eventlet")
    pytest.importorskip("amqpstorm")
    require_server("RabbitMQ", "127.0.0.1", 5672)
    script = tmp_path / "eventlet_close.py"
    script.write_text(EVENTLET_CLOSE)
    queue = unique("eventlet_close")
    try:
        proc = subprocess.run([sys.executable, "-W", "ignore", str(script), queue, SHARED_URL],
                              env=subprocess_env(isolated_settings), capture_output=True, text=True, timeout=60)
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(SHARED_URL))
        connection.channel().queue_delete(queue)
        connection.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, stop, _, close, _, fds = proc.stdout.split()
    assert float(close) < 0.5, proc.stdout  # five connections
    assert int(fds) <= 0, proc.stdout  # the wake-up pipes are closed with their connections


def test_a_server_that_accepts_and_never_answers_is_a_connection_error() -> None:
    """pika's connector gave up with its own AMQPConnectorStackTimeout, which escaped push as is (code
    catching BrokerConnectionError crashed); it is a BrokerConnectionError like every other kind's."""
    import socket

    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never says a word
    try:
        port = silent.getsockname()[1]
        patch_frame_config(RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{port}/%2F?stack_timeout=1")
        broker = broker_class(registry.BrokerEnum.RABBITMQ_PIKA)()
        try:
            with pytest.raises(BrokerConnectionError):
                broker.publish(unique("silent"), b"{}")
        finally:
            broker.close()
    finally:
        silent.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind_name, open_timeout", [("RABBITMQ_PIKA", "stack_timeout=2"),
                                                     ("RABBITMQ_AMQPSTORM", "timeout=2")])
def test_a_publisher_whose_server_goes_silent_fails_instead_of_waiting_forever(
        kind_name: str, open_timeout: str, monkeypatch: pytest.MonkeyPatch, plain) -> None:  # type: ignore[no-untyped-def]
    """A frozen server or a black hole on the way sends no reset: a push waited for its confirm forever
    (publishers run without heartbeats). Now a connection silent for ANSWER_TIMEOUT (30 s; 1 s here) is
    dropped and the push fails with BrokerConnectionError (after one try on a new connection)."""
    from funboost_like.brokers import amqp

    from .tcp_cut import CuttableLink

    require_server("RabbitMQ", "127.0.0.1", 5672)
    monkeypatch.setattr(amqp, "ANSWER_TIMEOUT", 1.0)
    link = CuttableLink(5672)
    patch_frame_config(RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{link.port}/%2F?{open_timeout}")
    broker = broker_class(getattr(registry.BrokerEnum, kind_name))()
    queue = unique("silent")
    try:
        broker.publish(queue, b'{"x": 1}')
        link.freeze()
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            broker.publish(queue, b'{"x": 2}')
        assert time.monotonic() - started < 30
    finally:
        link.close()
        broker.close()
        plain.queue_delete(queue)


@pytest.mark.parametrize("mode", [1, 4], ids=["THREADING", "ASYNC"])
def test_an_idle_consumer_stops_at_once(kind, mode: int) -> None:  # type: ignore[no-untyped-def]
    """stop() waited for the idle fetch's 1 s timeout (0.55 s on average, in every concurrency mode): the
    wait on the push buffer was not woken; stop() now interrupts it (Broker.interrupt_fetch)."""
    queue = unique("idle_stop")

    async def afn(x: int) -> None:
        return None

    booster = task_deco(queue, broker_kind=kind, concurrent_mode=mode)(afn if mode == 4 else (lambda x: None))
    broker = registry.get_broker(kind)
    try:
        booster.consume()
        wait_for(lambda: queue in broker._subs, 10, "the consumer to subscribe")  # type: ignore[attr-defined]
        time.sleep(0.1)  # into its idle wait (a stop before it is prompt anyway)
        began = time.monotonic()
        booster.stop()
        assert booster.consumer.join(5)
        assert time.monotonic() - began < 0.25
    finally:
        booster.clear()
