"""One contract suite, run against every broker that is built (DESIGN §8)."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from funboost_like.brokers.base import Broker, Delivery
from funboost_like.brokers.registry import BROKERS, FIXTURES, Fixture, case_id, close, fixture_cases, get_broker
from funboost_like.core.config import patch_frame_config
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError, DoubleAckError, UnroutableError

from .conftest import require_server, subprocess_env

BUILT = [kind for kind, entry in BROKERS.items() if entry is not None]
CASES = fixture_cases()


def test_every_built_kind_declares_its_fixture() -> None:
    assert [kind for kind in BUILT if kind not in FIXTURES] == []


def test_every_built_kind_outside_the_core_has_its_own_extra_in_pyproject_and_in_all() -> None:
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    core = {BrokerEnum.LOCAL_PYTHON_QUEUE, BrokerEnum.PERSISTQUEUE}  # the embedded brokers need no extra
    named = {kind: entry[1] for kind, entry in BROKERS.items() if entry is not None and kind not in core}
    assert {kind: extra for kind, extra in named.items() if extra not in extras} == {}

    def covered(name: str) -> set[str]:  # the extra and those it names (all = [funboost_like[redis,kafka,...]])
        inner = [one for req in extras[name] if req.startswith("funboost_like[")
                 for one in req[len("funboost_like["):-1].split(",")]
        return {name}.union(*(covered(one) for one in inner))

    assert sorted(set(named.values()) - covered("all")) == []


@pytest.fixture(params=CASES, ids=[case_id(*case) for case in CASES])
def case(request: pytest.FixtureRequest) -> tuple[BrokerEnum, Fixture]:
    """The broker kind under test and how to run it."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def broker(case: tuple[BrokerEnum, Fixture], queue_name: str) -> Iterator[Broker]:
    kind, fixture = case
    if fixture.server is not None:
        require_server(*fixture.server)
    if fixture.settings:
        patch_frame_config(**fixture.settings)
    if fixture.variant:
        close(kind)  # the cached instance may belong to another variant's settings
    b = get_broker(kind)
    b.purge(queue_name)
    yield b
    b.purge(queue_name)
    try:
        b.purge_dead_letters(queue_name)
    except NotImplementedError:
        pass


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
    # Back, not on time: the first delay of a queue may wait for its mover to join a group (Kafka on the
    # Tansu stand-in: 2-3 s, more on a loaded machine). This asks that it comes back, not when.
    [again] = fetch_all(broker, queue_name, 1, timeout=10)
    broker.ack([again])


def test_release_does_not_count_an_attempt(broker: Broker, queue_name: str) -> None:
    broker.publish(queue_name, b"{}")
    [d] = fetch_all(broker, queue_name, 1)
    broker.release([d])
    [again] = fetch_all(broker, queue_name, 1)
    assert again.attempts == 1
    broker.ack([again])


def one_at_a_time(broker: Broker, queue: str, n: int) -> list[Delivery]:
    """``n`` messages fetched one per fetch (so a batch's own ordering cannot hide the queue's)."""
    got: list[Delivery] = []
    for _ in range(n):
        got += fetch_all(broker, queue, 1)
    return got


def test_a_nack_goes_to_the_back_and_a_release_to_the_front(broker: Broker, queue_name: str) -> None:
    """SQLite put a nacked message first again (it kept its row id), so a call that asked to be requeued
    ran before the whole queue; its two-file layout put a released message last in a batch."""
    if not broker.capabilities.fifo:
        pytest.skip("not FIFO (capabilities.fifo)")
    a, b, c = b'{"m":"a"}', b'{"m":"b"}', b'{"m":"c"}'
    broker.publish_many(queue_name, [a, b, c])
    [first] = fetch_all(broker, queue_name, 1)
    assert first.body == a
    broker.nack(first)
    got = one_at_a_time(broker, queue_name, 3)
    assert [d.body for d in got] == [b, c, a]
    broker.ack(got)
    broker.publish_many(queue_name, [a, b, c])
    taken = fetch_all(broker, queue_name, 2)
    assert [d.body for d in taken] == [a, b]
    broker.release(taken)
    if not broker.capabilities.release_front:
        got = fetch_all(broker, queue_name, 3)
        assert sorted(d.body for d in got) == [a, b, c]
    else:
        assert [d.body for d in fetch_all(broker, queue_name, 1)] == [a]  # the front, in their order
        got = fetch_all(broker, queue_name, 2)
        assert [d.body for d in got] == [b, c]
        broker.ack(got)
        broker.publish_many(queue_name, [a, b, c])
        taken = fetch_all(broker, queue_name, 2)
        broker.release(taken)
        got = fetch_all(broker, queue_name, 3)
        assert [d.body for d in got] == [a, b, c]  # one batch, in the same order
    broker.ack(got)


def test_a_requeued_message_keeps_its_priority(broker: Broker, queue_name: str) -> None:
    if not broker.capabilities.priority:
        pytest.skip("no priority capability")
    queue = f"{queue_name}_prio"
    with_priorities(broker, queue)
    try:
        broker.publish(queue, b'{"p":"high"}', priority=5)
        [high] = fetch_all(broker, queue, 1)
        assert high.priority == 5
        broker.publish(queue, b'{"p":"low"}')
        broker.nack(high)
        [again] = fetch_all(broker, queue, 1)
        assert (again.body, again.priority) == (b'{"p":"high"}', 5)
        broker.ack([again])
    finally:
        broker.purge(queue)


def test_a_delayed_nack_counts_an_attempt(broker: Broker, queue_name: str) -> None:
    if broker.capabilities.delay == "none":
        pytest.skip("no delay capability")
    broker.publish(queue_name, b"{}")
    [d] = fetch_all(broker, queue_name, 1)
    broker.nack(d, delay=0.3)
    [again] = fetch_all(broker, queue_name, 1, timeout=5)
    assert again.attempts == 2
    broker.ack([again])


def test_dead_letters_keep_their_runs_and_are_listed_newest_first(broker: Broker, queue_name: str) -> None:
    if not broker.capabilities.dead_letters:
        pytest.skip("dead letters are not listed (capabilities.dead_letters)")
    broker.publish_many(queue_name, [b'{"n":0}', b'{"n":1}', b'{"n":2}'])
    first, second, third = fetch_all(broker, queue_name, 3)
    broker.dead_letter(first, "r0", attempts=7)
    time.sleep(0.01)  # distinct failure times
    broker.dead_letter(second, "r1")
    time.sleep(0.01)
    broker.dead_letter(third, "r2")
    letters = broker.list_dead_letters(queue_name)
    assert [(letter.body, letter.attempts) for letter in letters] == [(b'{"n":2}', third.attempts),
                                                                       (b'{"n":1}', second.attempts),
                                                                       (b'{"n":0}', 7)]
    assert [letter.body for letter in broker.list_dead_letters(queue_name, 1)] == [b'{"n":2}']


def test_an_idle_fetch_wakes_for_a_publish_and_a_due_message_and_costs_little(broker: Broker,
                                                                              queue_name: str) -> None:
    assert broker.fetch(queue_name, 1, 0.05) == []  # consuming from the queue has started
    cpu = time.process_time()
    assert broker.fetch(queue_name, 1, 1.0) == []
    assert time.process_time() - cpu < 0.2  # no busy loop (the process's other threads count too)
    threading.Timer(0.3, broker.publish, (queue_name, b'{"w":1}')).start()
    started = time.monotonic()
    [woken] = broker.fetch(queue_name, 1, 5.0)
    assert time.monotonic() - started < 2.5  # the Kafka stand-ins take about a second
    broker.ack([woken])
    if broker.capabilities.delay != "none":
        broker.publish(queue_name, b'{"w":2}', not_before=time.time() + 0.5)
        started = time.monotonic()
        [due] = broker.fetch(queue_name, 1, 5.0)
        assert 0.4 <= time.monotonic() - started < 3.0
        broker.ack([due])


def test_delayed_visibility(broker: Broker, queue_name: str) -> None:
    if broker.capabilities.delay == "none":
        pytest.skip("no delay capability")
    broker.publish(queue_name, b'{"late":1}', not_before=time.time() + 0.8)
    broker.publish(queue_name, b'{"now":1}')
    [now] = fetch_all(broker, queue_name, 1)
    assert now.body == b'{"now":1}'
    assert broker.fetch(queue_name, 1, 0.3) == []
    [late] = fetch_all(broker, queue_name, 1, timeout=3)
    assert late.body == b'{"late":1}'
    broker.ack([now, late])


def test_delayed_messages_are_listed_soonest_first(broker: Broker, queue_name: str) -> None:
    if broker.capabilities.delay == "none" or type(broker).list_delayed is Broker.list_delayed:
        pytest.skip(f"{type(broker).__name__} cannot list its delayed messages")
    with_priorities(broker, queue_name)
    now = time.time()
    broker.publish(queue_name, b'{"later":1}', not_before=now + 60)
    broker.publish(queue_name, b'{"sooner":1}', not_before=now + 30, priority=1 if broker.capabilities.priority else 0)
    broker.publish(queue_name, b'{"ready":1}')
    listed = broker.list_delayed(queue_name)
    assert [body for _, body in listed] == [b'{"sooner":1}', b'{"later":1}']
    assert abs(listed[0][0] - (now + 30)) < 2 and abs(listed[1][0] - (now + 60)) < 2  # server clocks may differ a bit
    assert [body for _, body in broker.list_delayed(queue_name, 1)] == [b'{"sooner":1}']
    broker.purge(queue_name)


def test_heads_are_the_ready_messages_that_waited_longest(broker: Broker, queue_name: str) -> None:
    """heads(): read without taking, the oldest ready message of each FIFO; not a delayed or a held one."""
    if type(broker)._heads is Broker._heads:
        pytest.skip(f"{type(broker).__name__} cannot read the head of a queue without taking it")
    with_priorities(broker, queue_name)
    assert broker.heads(queue_name) == []
    if broker.capabilities.delay != "none":
        broker.publish(queue_name, b'{"delayed":1}', not_before=time.time() + 60)
        assert broker.heads(queue_name) == []
    broker.publish_many(queue_name, [b'{"first":1}', b'{"second":1}', b'{"third":1}'])
    top = 1 if broker.capabilities.priority else 0
    broker.publish(queue_name, b'{"urgent":1}', priority=top)
    heads = broker.heads(queue_name)
    assert b'{"first":1}' in heads and not {b'{"second":1}', b'{"third":1}', b'{"delayed":1}'} & set(heads)
    assert set(heads) <= {b'{"first":1}', b'{"urgent":1}'}
    taken = fetch_all(broker, queue_name, 2)  # "urgent" and "first" (or, without priority, "first" and "second")
    assert b'{"first":1}' in [d.body for d in taken]
    assert b'{"first":1}' not in broker.heads(queue_name)  # held now: not waiting
    assert broker.heads(queue_name) in ([b'{"second":1}'], [b'{"third":1}'])
    broker.ack(taken)
    broker.purge(queue_name)


def with_priorities(broker: Broker, queue: str) -> None:
    """Where priorities are a queue's option (RabbitMQ's x-max-priority), ask for them before the queue's first use."""
    if broker.capabilities.priority and broker.capabilities.priority_option:
        broker.configure_queue(queue, {broker.capabilities.priority_option: min(9, broker.capabilities.max_priority)})


def test_priority_higher_first(broker: Broker, queue_name: str) -> None:
    if not broker.capabilities.priority:
        pytest.skip("no priority capability")
    queue = f"{queue_name}_prio"  # a queue not used yet (the fixture's may be declared already)
    with_priorities(broker, queue)
    broker.publish(queue, b'{"p":0}')
    broker.publish(queue, b'{"p":5}', priority=5)
    broker.publish(queue, b'{"p":1}', priority=1)
    got = fetch_all(broker, queue, 3)
    assert [d.body for d in got] == [b'{"p":5}', b'{"p":1}', b'{"p":0}']
    broker.release(got)
    got = one_at_a_time(broker, queue, 3)  # each fetch takes the highest priority waiting, not just any row
    assert [(d.body, d.priority) for d in got] == [(b'{"p":5}', 5), (b'{"p":1}', 1), (b'{"p":0}', 0)]
    broker.ack(got)
    broker.purge(queue)
    if broker.capabilities.priority_option:  # priorities are asked for: a queue that did not ask has none
        with pytest.raises(ConfigurationError, match=broker.capabilities.priority_option):
            broker.publish(f"{queue_name}_plain", b'{"p":1}', priority=1)


def test_purge_and_count(broker: Broker, queue_name: str) -> None:
    broker.publish_many(queue_name, [b"{}"] * 25)
    assert broker.count(queue_name) == 25
    assert broker.purge(queue_name) == 25
    assert broker.count(queue_name) == 0
    assert broker.fetch(queue_name, 5, 0.05) == []


def test_count_and_purge_take_in_delayed_messages_and_leave_held_ones(broker: Broker, queue_name: str) -> None:
    """DESIGN §3 (Broker.count, Broker.purge): a queue's waiting messages are the ready and the delayed
    ones; a message held by a consumer is neither counted nor purged (its ack still settles it). Where a
    broker cannot, its capabilities say so (docs/operations.md has the table)."""
    caps = broker.capabilities
    if caps.delay == "none":
        pytest.skip("no delay capability")
    broker.publish_many(queue_name, [b'{"n":1}', b'{"n":2}'])
    [held] = fetch_all(broker, queue_name, 1)
    broker.publish(queue_name, b'{"n":3}', not_before=time.time() + 60)
    assert broker.count(queue_name) in ((2,) if caps.counts_delayed else (1, 2))  # one ready, one delayed
    purged = broker.purge(queue_name)
    assert purged in {1 + delayed + held for delayed in ((1,) if caps.purges_delayed else (0, 1))
                      for held in ((0,) if caps.purge_spares_held else (0, 1))}
    assert broker.count(queue_name) in ((0,) if caps.purges_delayed or not caps.counts_delayed else (0, 1))
    broker.ack([held])
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
    if not broker.capabilities.dead_letters:
        pytest.skip("the message left its queue; dead letters are not listed (capabilities.dead_letters)")
    [letter] = broker.list_dead_letters(queue_name)
    assert letter.body == b"not json"
    assert letter.reason == "body is not valid JSON"
    assert broker.purge_dead_letters(queue_name) == 1
    assert broker.list_dead_letters(queue_name) == []


def test_one_dead_letter_is_removed_and_the_others_stay(broker: Broker, queue_name: str) -> None:
    if not broker.capabilities.dead_letters or type(broker).remove_dead_letter is Broker.remove_dead_letter:
        pytest.skip(f"{type(broker).__name__} cannot remove a single dead letter")
    for n in range(3):
        broker.publish(queue_name, b"bad %d" % n)
    for d in fetch_all(broker, queue_name, 3):
        broker.dead_letter(d, "reason of " + d.body.decode())
    letters = broker.list_dead_letters(queue_name)
    assert sorted(letter.body for letter in letters) == [b"bad 0", b"bad 1", b"bad 2"]
    [middle] = [letter for letter in letters if letter.body == b"bad 1"]
    assert broker.remove_dead_letter(queue_name, middle) is True
    assert broker.remove_dead_letter(queue_name, middle) is False  # gone already
    rest = broker.list_dead_letters(queue_name)
    assert sorted((letter.body, letter.reason) for letter in rest) == [(b"bad 0", "reason of bad 0"),
                                                                       (b"bad 2", "reason of bad 2")]
    assert broker.purge_dead_letters(queue_name) == 2


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


def test_one_settlement_may_hold_deliveries_of_several_queues(broker: Broker, queue_name: str) -> None:
    """``ack`` and ``release`` take deliveries of several queues at once; each goes back to, or leaves, its
    own queue (a primitive gets one queue's deliveries: the memory broker put the other queue's
    released message into the first queue, and its in-flight count never came down)."""
    other = f"{queue_name}_other"
    broker.purge(other)
    try:
        broker.publish_many(queue_name, [b'{"a":1}', b'{"a":2}'])
        broker.publish_many(other, [b'{"b":1}', b'{"b":2}'])
        a, b = fetch_all(broker, queue_name, 2), fetch_all(broker, other, 2)
        assert len(a) == len(b) == 2
        broker.release([a[0], b[0]])
        broker.ack([a[1], b[1]])
        assert broker.in_flight(queue_name) == 0 and broker.in_flight(other) == 0
        again_a, again_b = fetch_all(broker, queue_name, 1), fetch_all(broker, other, 1)
        assert [d.body for d in again_a] == [a[0].body] and [d.body for d in again_b] == [b[0].body]
        assert broker.ack_and_fetch([*again_a, *again_b], queue_name, 5, 0.05) == []
        assert broker.fetch(other, 5, 0.05) == [] and broker.in_flight(other) == 0
        assert broker.count(queue_name) == 0 and broker.count(other) == 0
    finally:
        broker.purge(other)


def test_key_value_records(broker: Broker, queue_name: str) -> None:
    if not broker.capabilities.key_value:
        pytest.skip("no key-value records")
    store = broker.key_value_store(queue_name, "contract")
    assert store is broker.key_value_store(queue_name, "contract")
    store.put("a", b"1", None)
    store.put("short", b"2", 0.3)
    assert store.get("a") == b"1" and store.exists("short")
    assert store.get_many(["a", "short", "missing"]) == {"a": b"1", "short": b"2"}
    assert store.add_if_absent("a", b"other", None) is False and store.get("a") == b"1"
    assert store.add_if_absent("b", b"3", None) is True
    time.sleep(0.5)
    assert store.get("short") is None and not store.exists("short")
    store.delete("a")
    store.delete("b")
    assert store.get("a") is None and broker.key_value_store(queue_name, "other").get("b") is None


# -- routing: exchanges and routing keys (DESIGN §9), native or emulated ----------------------------


@pytest.fixture
def routes(broker: Broker, queue_name: str) -> Iterator[Callable[[str], str]]:
    """Queue (and exchange) names unique to this test run (tests share servers), purged afterwards."""
    if broker.capabilities.routing == "none":
        pytest.skip("no routing")
    made: list[str] = []

    def name(suffix: str) -> str:
        made.append(f"{queue_name}_{suffix}")
        return made[-1]

    yield name
    for queue in made:
        broker.purge(queue)


def bodies_of(broker: Broker, queue: str, expected: int) -> list[bytes]:
    """The bodies of the ``expected`` messages of ``queue``, acknowledged, after checking no more are there."""
    got = fetch_all(broker, queue, expected)
    broker.ack(got)
    assert broker.fetch(queue, 10, 0.05) == []
    return sorted(d.body for d in got)


def test_routing_topic_exchange_as_in_the_rabbitmq_tutorial(broker: Broker, routes: Callable[[str], str]) -> None:
    exchange, q1, q2 = routes("topic"), routes("q1"), routes("q2")
    broker.bind(q1, exchange, "topic", ["*.orange.*"])
    broker.bind(q2, exchange, "topic", ["*.*.rabbit", "lazy.#"])
    reaching = {"quick.orange.rabbit": 2, "lazy.orange.elephant": 2, "quick.orange.fox": 1, "lazy.brown.fox": 1,
                "lazy.pink.rabbit": 1, "lazy.orange.male.rabbit": 1}
    for key, queues in reaching.items():
        assert broker.publish_routed(exchange, key, [key.encode()]) in (queues, -1)
    for key in ("quick.brown.fox", "orange", "quick.orange.male.rabbit"):
        with pytest.raises(UnroutableError):
            broker.publish_routed(exchange, key, [key.encode()])
    assert bodies_of(broker, q1, 3) == [b"lazy.orange.elephant", b"quick.orange.fox", b"quick.orange.rabbit"]
    assert bodies_of(broker, q2, 5) == [b"lazy.brown.fox", b"lazy.orange.elephant", b"lazy.orange.male.rabbit",
                                        b"lazy.pink.rabbit", b"quick.orange.rabbit"]  # lazy.pink.rabbit once


def test_routing_fanout_reaches_every_bound_queue(broker: Broker, routes: Callable[[str], str]) -> None:
    exchange, queues = routes("fanout"), [routes(f"q{i}") for i in range(3)]
    for queue in queues:
        broker.bind(queue, exchange, "fanout")
    assert broker.publish_routed(exchange, "", [b'{"n":1}', b'{"n":2}']) in (3, -1)
    assert broker.publish_routed(exchange, "any.key", [b'{"n":3}']) in (3, -1)  # keys are ignored
    for queue in queues:
        assert bodies_of(broker, queue, 3) == [b'{"n":1}', b'{"n":2}', b'{"n":3}']


def test_routing_direct_exchange_needs_the_exact_key(broker: Broker, routes: Callable[[str], str]) -> None:
    exchange, errors, everything, own = routes("direct"), routes("errors"), routes("all"), routes("own")
    broker.bind(errors, exchange, "direct", "error")
    broker.bind(everything, exchange, "direct", ["info", "warning", "error"])
    broker.bind(own, exchange, "direct")  # the binding key defaults to the queue's name
    assert broker.publish_routed(exchange, "error", [b"e"]) in (2, -1)
    assert broker.publish_routed(exchange, "info", [b"i"]) in (1, -1)
    assert broker.publish_routed(exchange, own, [b"o"]) in (1, -1)
    for key in ("err", "error.disk", "*", "#", ""):
        with pytest.raises(UnroutableError):
            broker.publish_routed(exchange, key, [b"lost"])
    assert bodies_of(broker, errors, 1) == [b"e"]
    assert bodies_of(broker, everything, 2) == [b"e", b"i"]
    assert bodies_of(broker, own, 1) == [b"o"]


def test_routing_binding_twice_is_idempotent(broker: Broker, routes: Callable[[str], str]) -> None:
    exchange, queue = routes("again"), routes("q")
    broker.bind(queue, exchange, "topic", ["a.*", "#.b"])
    broker.bind(queue, exchange, "topic", ["a.*", "#.b"])
    broker.bind(queue, exchange, "topic", "a.*")
    assert broker.publish_routed(exchange, "a.b", [b"x"]) in (1, -1)  # matches both keys: one copy
    assert bodies_of(broker, queue, 1) == [b"x"]


def test_routing_an_exchange_keeps_its_first_type(broker: Broker, routes: Callable[[str], str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    exchange, first, second = routes("typed"), routes("first"), routes("second")
    broker.bind(first, exchange, "topic", "a.*")
    with caplog.at_level("WARNING", logger="funboost_like"):
        broker.bind(second, exchange, "direct", "a.b")
    assert any(record.levelname == "WARNING" and exchange in record.getMessage() for record in caplog.records)
    broker.publish_routed(exchange, "a.c", [b"c"])  # still a topic exchange
    assert bodies_of(broker, first, 1) == [b"c"]
    assert broker.fetch(second, 1, 0.05) == []


def test_routing_with_priority(broker: Broker, routes: Callable[[str], str]) -> None:
    if not broker.capabilities.priority:
        pytest.skip("no priority capability")
    exchange, queues = routes("prio"), [routes("q1"), routes("q2")]
    for queue in queues:
        with_priorities(broker, queue)
        broker.bind(queue, exchange, "direct", "k")
    high = min(5, broker.capabilities.max_priority)
    broker.publish_routed(exchange, "k", [b"low"])
    broker.publish_routed(exchange, "k", [b"high"], priority=high)
    for queue in queues:
        got = fetch_all(broker, queue, 2)
        assert [d.body for d in got] == [b"high", b"low"]
        broker.ack(got)


def test_routing_with_not_before(broker: Broker, routes: Callable[[str], str]) -> None:
    if broker.capabilities.delay == "none":
        pytest.skip("no delay capability")
    exchange, queues = routes("later"), [routes("q1"), routes("q2")]
    for queue in queues:
        broker.bind(queue, exchange, "fanout")
    broker.publish_routed(exchange, "", [b"late"], not_before=time.time() + 0.6)
    assert broker.fetch(queues[0], 1, 0.2) == []
    for queue in queues:
        [late] = fetch_all(broker, queue, 1, timeout=3)
        assert late.body == b"late"
        broker.ack([late])


# -- real consumer processes: SIGKILL recovery and poison messages ----------------------------------

WORKER = Path(__file__).with_name("contract_worker.py")


def crash_setup(broker: Broker, case: tuple[BrokerEnum, Fixture], tmp_path: Path) -> dict[str, str]:
    capabilities = broker.capabilities
    if not (capabilities.ack and capabilities.cross_process):
        pytest.skip("no redelivery of a dead consumer's messages to other processes")
    fixture = case[1]
    env = {f"FUNBOOST_LIKE_{name}": str(value) for name, value in {**fixture.settings, **fixture.fast_recovery}.items()}
    env["FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS"] = "2"
    return subprocess_env(tmp_path / "sqlite_queues", **env)


def test_acknowledged_messages_stay_gone_when_their_holder_stops_renewing(
        broker: Broker, case: tuple[BrokerEnum, Fixture], queue_name: str) -> None:
    """Two consumers in one process (two broker instances): the holder acks three of four messages in one
    batch, then stops renewing its leases or beating, as a dead process does; the other consumer gets the
    fourth back, counted as one crash, and never the three acknowledged ones (an ack that deleted nothing,
    or a skipped renewal, was caught before only by the slow poison-message test)."""
    if broker.capabilities.redelivery not in ("lease", "sweep"):
        pytest.skip("redelivery is not by lease or heartbeat (a real death is the SIGKILL tests')")
    from funboost_like.brokers.maintenance import maintenance

    patch_frame_config(**case[1].fast_recovery)
    holder, taker = type(broker)(), type(broker)()
    try:
        bodies = [f'{{"n":{i}}}'.encode() for i in range(4)]
        broker.publish_many(queue_name, bodies)
        got = fetch_all(holder, queue_name, 4)
        assert [d.body for d in got] == bodies
        holder.ack(got[:3])
        holder.fetch(queue_name, 1, 0)  # acks some brokers send with the next fetch go out now
        holder.stop_fetching(queue_name)  # a push broker's server sends it nothing more (NSQ: RDY 0)
        maintenance.discard(holder)  # no more renewals or beats: dead, as far as the others can tell
        back: list[Delivery] = []
        deadline = time.monotonic() + 20
        while not back and time.monotonic() < deadline:
            taker.maintain()
            back = taker.fetch(queue_name, 10, 0.2)
        assert [(d.body, d.crashes) for d in back] == [(bodies[3], 1)]
        taker.ack(back)
        taker.maintain()
        assert taker.fetch(queue_name, 10, 1.0) == [] and broker.count(queue_name) == 0
    finally:
        maintenance.discard(holder)
        taker.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_acknowledged_messages_stay_gone_when_their_holder_dies(
        broker: Broker, case: tuple[BrokerEnum, Fixture], queue_name: str, tmp_path: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    """The same on brokers whose server redelivers: a real process acks three of four messages, stops
    fetching and is killed holding the fourth, which alone comes back, counted as one crash."""
    env = crash_setup(broker, case, tmp_path)
    if broker.capabilities.redelivery != "native":
        pytest.skip("redelivery by lease or heartbeat: the test above")
    record = tmp_path / "record"
    bodies = [f'{{"n":{i}}}'.encode() for i in range(4)]
    broker.publish_many(queue_name, bodies)
    holder = start(queue_name, broker.kind, record, "hold", env, tmp_path, children)
    assert holder.wait(60) == -signal.SIGKILL
    assert record.read_text() == "held 4\n"
    taker = type(broker)()
    try:
        back: list[Delivery] = []
        deadline = time.monotonic() + 30
        while not back and time.monotonic() < deadline:
            back = taker.fetch(queue_name, 10, 0.5)
        assert [(d.body, d.crashes) for d in back] == [(bodies[3], 1)]
        taker.ack(back)
        assert taker.fetch(queue_name, 10, 1.0) == [] and broker.count(queue_name) == 0
    finally:
        taker.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_settled_messages_stay_settled_when_their_consumer_is_then_killed(
        broker: Broker, case: tuple[BrokerEnum, Fixture], queue_name: str, tmp_path: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    """A consumer process runs calls that end (acked) and one that fails (dead-lettered), and holds a last
    call; it is SIGKILLed once those settlements returned and ``settle_delay`` passed (DESIGN §3.3: a
    message is removed once its call finished). A second consumer runs the held call again and no other:
    the killed process's settlements were not lost with it (acks that a client sends later, in groups or
    in the background, and a kill that resets the connection before they leave)."""
    env = crash_setup(broker, case, tmp_path)
    record, total = tmp_path / "record", 6
    acks, held = Path(f"{record}.acks"), total + 1
    publish_calls(broker, queue_name, [{"i": i} for i in range(total)] + [{"i": total, "fail": True}]
                  + [{"i": held, "hold": True}])  # last: Kafka commits up to the first unfinished record

    def settled() -> bool:
        lines = acks.read_text().split("\n") if acks.exists() else []
        return {int(line.split()[1]) for line in lines if line} == set(range(held)) and records(record)[0][held] > 0

    first = start(queue_name, broker.kind, record, "settle", env, tmp_path, children)
    second = start(queue_name, broker.kind, record, "standby", env, tmp_path, children)
    eventually(settled, 30, "the calls to be settled and the last one to start", tmp_path)
    time.sleep(broker.capabilities.settle_delay)  # the broker's documented bound, not a wait for an event
    first.kill()
    first.wait(10)
    Path(f"{record}.go").touch()  # the held call ends at once from now on
    Path(f"{record}.start").touch()
    eventually(lambda: records(record)[1][held] == 1, 30, "the held call to run again", tmp_path)
    second.send_signal(signal.SIGTERM)
    second.wait(30)
    started, done = records(record)
    assert started == collections.Counter({**dict.fromkeys(range(held), 1), held: 2})
    assert done == collections.Counter(dict.fromkeys([*range(total), held], 1))
    if broker.capabilities.dead_letters:
        assert [json.loads(letter.body)["i"] for letter in broker.list_dead_letters(queue_name)] == [total]
    assert broker.count(queue_name) == 0


def records(path: Path) -> tuple[collections.Counter[int], collections.Counter[int]]:
    started: collections.Counter[int] = collections.Counter()
    done: collections.Counter[int] = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            kind, ident, _ = line.split()
            (started if kind == "s" else done)[int(ident)] += 1
    return started, done


def start(queue: str, kind: int, record: Path, mode: str, env: dict[str, str], tmp_path: Path,
          children: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    log = open(tmp_path / f"worker-{len(children)}.log", "wb")
    with log:
        child = subprocess.Popen([sys.executable, str(WORKER), queue, str(kind), str(record), mode], env=env,
                                 stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    children.append(child)
    return child


def eventually(condition: Callable[[], bool], timeout: float, what: str, tmp_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text("utf-8", "replace")[-2000:] for p in sorted(tmp_path.glob("worker-*.log")))
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")
        time.sleep(0.02)


def publish_calls(broker: Broker, queue: str, calls: list[dict[str, object]]) -> None:
    broker.publish_many(queue, [json.dumps(call).encode() for call in calls])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkilled_consumer_loses_nothing(broker: Broker, case: tuple[BrokerEnum, Fixture], queue_name: str,
                                          tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    env = crash_setup(broker, case, tmp_path)
    record = tmp_path / "record"
    total = 12
    publish_calls(broker, queue_name, [{"i": i, "seconds": 0.3} for i in range(total)])
    first = start(queue_name, broker.kind, record, "plain", env, tmp_path, children)
    eventually(lambda: sum(records(record)[0].values()) >= 4, 30, "the first calls to start", tmp_path)
    first.kill()
    first.wait(10)
    start(queue_name, broker.kind, record, "plain", env, tmp_path, children)
    eventually(lambda: len(records(record)[1]) == total, 30, "every call to finish", tmp_path)
    started, done = records(record)
    assert set(done) == set(range(total))
    assert any(count > 1 for count in started.values())  # the killed consumer's calls ran again


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_poison_message_is_dead_lettered_after_max_crash_redeliveries(
        broker: Broker, case: tuple[BrokerEnum, Fixture], queue_name: str, tmp_path: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    env = crash_setup(broker, case, tmp_path)
    if case[1].stand_in_flaw:
        pytest.skip(case[1].stand_in_flaw)
    if not broker.capabilities.dead_letters:
        pytest.skip("dead letters are not listed (capabilities.dead_letters)")
    record = tmp_path / "record"
    neighbours = 6
    publish_calls(broker, queue_name, [{"i": 0, "poison": True}]
                  + [{"i": i, "seconds": 0.5} for i in range(1, neighbours + 1)])
    supervisor = start(queue_name, broker.kind, record, "supervised", env, tmp_path, children)

    def settled() -> bool:
        return len(records(record)[1]) == neighbours and len(broker.list_dead_letters(queue_name)) == 1

    eventually(settled, 90, "the neighbours to finish and the poison message to be dead-lettered", tmp_path)
    supervisor.send_signal(signal.SIGTERM)
    supervisor.wait(30)
    started, done = records(record)
    assert started[0] == 3  # max_crash_redeliveries: three deaths while running it, then no more runs
    [letter] = broker.list_dead_letters(queue_name)
    assert "poison" in letter.reason and "died 3 time(s)" in letter.reason
    assert json.loads(letter.body)["i"] == 0
    assert set(done) == set(range(1, neighbours + 1))
    assert all(started[i] <= 3 for i in range(1, neighbours + 1))  # not re-run more often than the poison
    assert broker.count(queue_name) == 0
