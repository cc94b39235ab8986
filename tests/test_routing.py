"""Exchanges and routing keys through the public API (seed 003, DESIGN §9): publish/subscribe, routing
and topics with ``broker_exclusive_config`` and ``publish(routing_key=...)``, the checks made at
decoration time, the matching rules, and what the emulating brokers promise about a routed publish.

The pattern tests run on the memory broker, PERSISTQUEUE and REDIS_ACK_ABLE (which skips without a
Redis server at 127.0.0.1:6379, and fails then when the ``CI`` environment variable is set).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, patch_frame_config, task_deco
from funboost_like.brokers.base import Broker
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.brokers.routing import Binding, matching_queues, routing_config, topic_matches
from funboost_like.brokers.sqlite import SqliteBroker
from funboost_like.core.config import settings
from funboost_like.core.errors import BrokerError, ConfigurationError, UnroutableError

from .conftest import require_server

REDIS_URL = "redis://127.0.0.1:6379/15"
KINDS = [BrokerEnum.LOCAL_PYTHON_QUEUE, BrokerEnum.PERSISTQUEUE, BrokerEnum.REDIS_ACK_ABLE]


class Names:
    """Queue and exchange names unique to one test (tests share servers)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.queues: list[str] = []

    def queue(self, suffix: str) -> str:
        self.queues.append(f"{self.prefix}_{suffix}")
        return self.queues[-1]

    @property
    def exchange(self) -> str:
        return f"{self.prefix}_exchange"


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request: pytest.FixtureRequest) -> BrokerEnum:
    if request.param == BrokerEnum.REDIS_ACK_ABLE:
        require_server("Redis", "127.0.0.1", 6379)
        patch_frame_config(REDIS_URL=REDIS_URL)
    return BrokerEnum(request.param)


@pytest.fixture
def names(queue_name: str) -> Iterator[Names]:
    made = Names(queue_name)
    yield made
    if made.queues and settings.get("REDIS_URL") == REDIS_URL:  # a Redis test: its keys are deleted
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for queue in made.queues:
            client.delete(queue, *client.scan_iter(match=f"fl:{{{queue}}}:*", count=1000))
        client.delete(f"fl:exchange:{{{made.exchange}}}", f"fl:exchange:{{{made.exchange}}}:layout")
        client.close()


class Received:
    """What each function ran, with a wait for a number of calls."""

    def __init__(self) -> None:
        self.calls: dict[str, list[str]] = {}
        self.cond = threading.Condition()

    def add(self, who: str, what: str) -> None:
        with self.cond:
            self.calls.setdefault(who, []).append(what)
            self.cond.notify_all()

    def wait(self, counts: dict[str, int], timeout: float = 10.0) -> dict[str, list[str]]:
        with self.cond:
            self.cond.wait_for(lambda: all(len(self.calls.get(w, [])) >= n for w, n in counts.items()), timeout)
            return {who: sorted(self.calls.get(who, [])) for who in counts}


def wait_bound(broker: Broker, exchange: str, queues: list[str], timeout: float = 5.0) -> None:
    """Wait until the consumers (which bind when they start) have bound ``queues`` to ``exchange``."""
    deadline = time.monotonic() + timeout
    while not set(queues) <= {binding.queue for binding in broker._bindings(exchange)}:
        assert time.monotonic() < deadline, f"queues {queues} were not bound to {exchange!r}"
        time.sleep(0.005)


# -- the seed-003 patterns through task_deco, publish and consume --------------------------------------------


def test_fanout_publish_subscribe_reaches_both_functions(kind: BrokerEnum, names: Names) -> None:
    received = Received()
    config = {"exchange_name": names.exchange, "exchange_type": "fanout"}

    @task_deco(names.queue("disk"), broker_kind=kind, broker_exclusive_config=config)
    def to_disk(line: str) -> None:
        received.add("disk", line)

    @task_deco(names.queue("screen"), broker_kind=kind, broker_exclusive_config=config)
    def to_screen(line: str) -> None:
        received.add("screen", line)

    to_disk.consume()
    to_screen.consume()
    wait_bound(to_disk.broker, names.exchange, names.queues)
    for i in range(3):
        to_disk.push(f"log {i}")  # a fanout exchange ignores keys: every bound queue gets every message
    to_screen.publish({"line": "log 3"}, routing_key="anything")
    expected = ["log 0", "log 1", "log 2", "log 3"]
    assert received.wait({"disk": 4, "screen": 4}) == {"disk": expected, "screen": expected}


def test_direct_routing_by_severity(kind: BrokerEnum, names: Names) -> None:
    received = Received()
    exchange = {"exchange_name": names.exchange, "exchange_type": "direct"}

    @task_deco(names.queue("errors"), broker_kind=kind,
               broker_exclusive_config={**exchange, "routing_key_for_bind": "error",
                                        "routing_key_for_publish": "error"})
    def save_error(message: str) -> None:
        received.add("errors", message)

    @task_deco(names.queue("console"), broker_kind=kind,
               broker_exclusive_config={**exchange, "routing_key_for_bind": ["info", "warning", "error"]})
    def show(message: str) -> None:
        received.add("console", message)

    save_error.consume()
    show.consume()
    wait_bound(save_error.broker, names.exchange, names.queues)
    for severity in ("info", "warning", "error"):
        show.publish({"message": severity}, routing_key=severity)
    save_error.push("pushed")  # push uses routing_key_for_publish ("error")
    with pytest.raises(UnroutableError):
        show.publish({"message": "debug"}, routing_key="debug")
    with pytest.raises(UnroutableError):
        show.push("console")  # routing_key_for_publish defaults to the queue name, bound by no queue here
    assert received.wait({"errors": 2, "console": 4}) == {"errors": ["error", "pushed"],
                                                         "console": ["error", "info", "pushed", "warning"]}


def test_topic_routing_as_in_the_rabbitmq_tutorial(kind: BrokerEnum, names: Names) -> None:
    received = Received()
    exchange = {"exchange_name": names.exchange, "exchange_type": "topic"}

    @task_deco(names.queue("orange"), broker_kind=kind,
               broker_exclusive_config={**exchange, "routing_key_for_bind": "*.orange.*"})
    def orange(animal: str) -> None:
        received.add("orange", animal)

    @task_deco(names.queue("lazy"), broker_kind=kind,
               broker_exclusive_config={**exchange, "routing_key_for_bind": ["*.*.rabbit", "lazy.#"]})
    def lazy(animal: str) -> None:
        received.add("lazy", animal)

    orange.consume()
    lazy.consume()
    wait_bound(orange.broker, names.exchange, names.queues)
    for key in ("quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox", "lazy.brown.fox",
                "lazy.pink.rabbit", "lazy.orange.male.rabbit"):
        orange.publish({"animal": key}, routing_key=key)
    for key in ("quick.brown.fox", "orange", "quick.orange.male.rabbit"):
        with pytest.raises(UnroutableError):
            orange.publish({"animal": key}, routing_key=key)
    assert received.wait({"orange": 3, "lazy": 5}) == {
        "orange": ["lazy.orange.elephant", "quick.orange.fox", "quick.orange.rabbit"],
        "lazy": ["lazy.brown.fox", "lazy.orange.elephant", "lazy.orange.male.rabbit", "lazy.pink.rabbit",
                 "quick.orange.rabbit"],
    }
    time.sleep(0.05)
    assert len(received.calls["lazy"]) == 5  # lazy.pink.rabbit matches both of its keys: delivered once


def test_routing_key_and_countdown_in_the_control_config(kind: BrokerEnum, names: Names) -> None:
    received = Received()
    config = {"exchange_name": names.exchange, "exchange_type": "topic", "routing_key_for_bind": "jobs.#"}

    @task_deco(names.queue("a"), broker_kind=kind, broker_exclusive_config=config)
    def a(n: int) -> None:
        received.add("a", str(n))

    @task_deco(names.queue("b"), broker_kind=kind, broker_exclusive_config=config)
    def b(n: int) -> None:
        received.add("b", str(n))

    a.consume()
    b.consume()
    wait_bound(a.broker, names.exchange, names.queues)
    published = time.monotonic()
    a.publish({"n": 1}, PriorityConsumingControlConfig(routing_key="jobs.later", countdown=0.4))
    a.publish({"n": 2}, PriorityConsumingControlConfig(routing_key="jobs.now"))
    assert received.wait({"a": 1, "b": 1}) == {"a": ["2"], "b": ["2"]}
    assert received.wait({"a": 2, "b": 2}) == {"a": ["1", "2"], "b": ["1", "2"]}
    assert time.monotonic() - published >= 0.35


# -- checks made at decoration and publish time ------------------------------------------------------------


def test_bad_exchange_type_and_unknown_options_raise_at_decoration(queue_name: str) -> None:
    def decorate(config: dict[str, object]) -> None:
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, broker_exclusive_config=config)(
            lambda x: None)

    with pytest.raises(ConfigurationError, match="exchange_type"):
        decorate({"exchange_name": "logs", "exchange_type": "headers"})
    with pytest.raises(ConfigurationError, match="exchnage_type"):
        decorate({"exchange_name": "logs", "exchnage_type": "topic"})
    with pytest.raises(ConfigurationError, match="exchange_name"):
        decorate({"exchange_type": "topic"})
    with pytest.raises(ConfigurationError, match="exchange_name"):
        decorate({"exchange_name": ""})
    with pytest.raises(ConfigurationError, match="routing_key_for_bind"):
        decorate({"exchange_name": "logs", "routing_key_for_bind": ["a", 3]})
    with pytest.raises(ConfigurationError, match=r"unknown broker_exclusive_config option\(s\) \['ordered'\]"):
        decorate({"ordered": True})  # a Kafka option (Capabilities.queue_options): not the memory broker's
    with pytest.raises(ConfigurationError, match="routing_key_for_bind must be a string or a list of strings, got 5"):
        decorate({"exchange_name": "logs", "exchange_type": "direct", "routing_key_for_bind": 5})


def test_a_routing_key_that_is_not_a_string_raises_at_publish(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
               broker_exclusive_config={"exchange_name": f"{queue_name}_x", "exchange_type": "fanout"})
    def f(x: int) -> None:
        pass

    with pytest.raises(ConfigurationError, match="routing_key must be a string, got 5"):
        f.publish({"x": 1}, routing_key=5)  # type: ignore[arg-type]
    assert f.get_message_count() == 0


def test_an_exchange_on_a_broker_without_routing_raises_at_decoration(queue_name: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MemoryBroker, "capabilities", dataclasses.replace(MemoryBroker.capabilities, routing="none"))
    with pytest.raises(ConfigurationError, match="no exchanges or routing keys"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
                  broker_exclusive_config={"exchange_name": "logs"})(lambda x: None)
    task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)(lambda x: None)  # no exchange: fine


def test_a_routing_key_without_an_exchange_raises(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def f(x: int) -> None:
        pass

    with pytest.raises(ConfigurationError, match="needs an exchange"):
        f.publish({"x": 1}, routing_key="a.b")
    with pytest.raises(ConfigurationError, match="needs an exchange"):
        f.publish({"x": 1}, PriorityConsumingControlConfig(routing_key="a.b"))
    assert f.get_message_count() == 0


def test_an_exchange_declared_again_with_another_type_keeps_its_first_type(
        queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    exchange = f"{queue_name}_exchange"

    @task_deco(f"{queue_name}_t", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
               broker_exclusive_config={"exchange_name": exchange, "exchange_type": "topic",
                                        "routing_key_for_bind": "a.*"})
    def as_topic(x: int) -> None:
        pass

    @task_deco(f"{queue_name}_d", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
               broker_exclusive_config={"exchange_name": exchange, "exchange_type": "direct",
                                        "routing_key_for_bind": "a.b"})
    def as_direct(x: int) -> None:
        pass

    as_topic.publish({"x": 1}, routing_key="a.z")  # declares the exchange as topic, binding its own queue
    with caplog.at_level("WARNING", logger="funboost_like"):
        as_direct.publish({"x": 2}, routing_key="a.b")
    assert any("exists as topic" in record.getMessage() for record in caplog.records)
    as_direct.publish({"x": 3}, routing_key="a.c")  # topic matching: reaches as_topic only
    assert as_topic.get_message_count() == 3 and as_direct.get_message_count() == 1


# -- the matching rules and the defaults ---------------------------------------------------------------------


@pytest.mark.parametrize(("binding", "key", "expected"), [
    ("#", "", True), ("#", "a", True), ("#", "a.b.c", True),
    ("a.#", "a", True), ("a.#", "a.b", True), ("a.#", "a.b.c", True), ("a.#", "b", False), ("a.#", "ab", False),
    ("#.b", "b", True), ("#.b", "a.x.b", True), ("#.b", "b.a", False),
    ("a.#.b", "a.b", True), ("a.#.b", "a.x.y.b", True), ("a.#.b", "a.x.y", False),
    ("*", "a", True), ("*", "a.b", False), ("*.*", "a", False), ("a.*", "a", False), ("a.*", "a.b", True),
    ("*.orange.*", "quick.orange.rabbit", True), ("*.orange.*", "quick.orange.male.rabbit", False),
    ("lazy.#", "lazy", True), ("a.b", "a.b", True), ("a.b", "a.c", False),
    # the empty key has no word at all, as on RabbitMQ (compared there: *, *.# and #.* took it for one)
    ("*", "", False), ("*.#", "", False), ("#.*", "", False), ("", "", True), ("", "a", False), ("#.#", "", True),
])
def test_topic_matches(binding: str, key: str, expected: bool) -> None:
    assert topic_matches(binding, key) is expected


def test_matching_queues_lists_each_queue_once_in_binding_order() -> None:
    bindings = [Binding("x", "topic", "q2", "*.*.rabbit"), Binding("x", "topic", "q1", "*.orange.*"),
                Binding("x", "topic", "q2", "lazy.#")]
    assert matching_queues(bindings, "lazy.orange.rabbit") == ["q2", "q1"]
    assert matching_queues(bindings, "quick.brown.fox") == []


def test_routing_config_defaults() -> None:
    assert routing_config(None, "q") is None and routing_config({}, "q") is None
    direct = routing_config({"exchange_name": "x"}, "q")
    assert direct is not None
    assert (direct.exchange_type, direct.bind_keys, direct.publish_key) == ("direct", ("q",), "q")
    fanout = routing_config({"exchange_name": "x", "exchange_type": "fanout", "routing_key_for_bind": "k"}, "q")
    assert fanout is not None and (fanout.bind_keys, fanout.publish_key) == (("",), "")
    topic = routing_config({"exchange_name": "x", "exchange_type": "topic", "routing_key_for_bind": "a.*",
                            "routing_key_for_publish": "a.b"}, "q")
    assert topic is not None and (topic.bind_keys, topic.publish_key) == (("a.*",), "a.b")


# -- PERSISTQUEUE: where bindings live, all-or-nothing across files, wake-ups ------------------------------------


@pytest.fixture
def sqlite_broker(isolated_settings: Path) -> Iterator[SqliteBroker]:
    broker = SqliteBroker()
    yield broker
    broker.close()


def test_sqlite_bindings_live_in_one_file_made_by_the_first_bind(sqlite_broker: SqliteBroker,
                                                                  isolated_settings: Path) -> None:
    assert not isolated_settings.exists()
    sqlite_broker.bind("q1", "logs", "fanout")
    assert sorted(p.name for p in isolated_settings.glob("*.sqlite3")) == ["@exchanges.sqlite3"]
    sqlite_broker.bind("q2", "logs", "fanout")
    other = SqliteBroker()  # as another process sees them
    assert other._bindings("logs") == [Binding("logs", "fanout", "q1", ""), Binding("logs", "fanout", "q2", "")]
    other.close()


def test_sqlite_routed_publish_writes_every_file_or_none(sqlite_broker: SqliteBroker, isolated_settings: Path) -> None:
    sqlite_broker.bind("a_ok", "logs", "fanout")
    sqlite_broker.bind("b_broken", "logs", "fanout")
    sqlite_broker.path("b_broken").write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(BrokerError):
        sqlite_broker.publish_routed("logs", "", [b"1", b"2"])
    assert sqlite_broker.count("a_ok") == 0  # its insert was rolled back
    sqlite_broker.path("b_broken").unlink()
    assert sqlite_broker.publish_routed("logs", "", [b"1", b"2"]) == 2
    assert sqlite_broker.count("a_ok") == 2 and sqlite_broker.count("b_broken") == 2


def test_sqlite_delayed_routed_messages_wait_in_the_delayed_table(sqlite_broker: SqliteBroker) -> None:
    for queue in ("q1", "q2"):
        sqlite_broker.bind(queue, "later", "direct", "k")
    sqlite_broker.publish_routed("later", "k", [b"x"], not_before=time.time() + 0.3)
    for queue in ("q1", "q2"):
        with closing(sqlite3.connect(sqlite_broker.path(queue))) as conn, conn:
            assert conn.execute("SELECT count(*) FROM delayed").fetchone()[0] == 1
        assert sqlite_broker.fetch(queue, 1, 0) == []
    [got] = sqlite_broker.fetch("q2", 1, 2.0)
    assert got.body == b"x"
    sqlite_broker.ack([got])


def test_sqlite_a_waiting_consumer_of_a_routed_queue_starts_at_once(sqlite_broker: SqliteBroker) -> None:
    sqlite_broker.bind("waiting", "logs", "topic", "#")
    sqlite_broker.bind("other", "logs", "topic", "#")
    woke: list[float] = []

    def consume() -> None:
        fetcher = SqliteBroker()  # another connection, as in another process
        got = fetcher.fetch("waiting", 1, 5.0)
        woke.append(time.monotonic())
        fetcher.ack(got)
        fetcher.close()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.3)  # the fetch now waits on the WAL file's watch (or its slow poll)
    published = time.monotonic()
    sqlite_broker.publish_routed("logs", "a.b", [b"now"])
    thread.join(5)
    assert woke and woke[0] - published < 0.2


def test_sqlite_concurrent_routed_publishes_to_overlapping_queues(sqlite_broker: SqliteBroker) -> None:
    for queue in ("q1", "q2", "q3"):
        sqlite_broker.bind(queue, "logs", "topic", "#")
    sqlite_broker.bind("q1", "other", "fanout")
    sqlite_broker.bind("q3", "other", "fanout")
    errors: list[BaseException] = []

    def publish(exchange: str) -> None:
        try:
            for i in range(40):
                sqlite_broker.publish_routed(exchange, "k", [f"{exchange} {i}".encode()])
        except BaseException as exc:  # recorded for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(exchange,)) for exchange in ("logs", "other", "logs")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert [sqlite_broker.count(q) for q in ("q1", "q2", "q3")] == [120, 80, 120]


# -- Redis: one HASH per exchange, one script per routed publish ----------------------------------------------


@pytest.fixture
def redis_broker() -> Iterator[Broker]:
    require_server("Redis", "127.0.0.1", 6379)
    patch_frame_config(REDIS_URL=REDIS_URL)
    yield get_broker(BrokerEnum.REDIS_ACK_ABLE)


def test_redis_queues_of_another_layout_are_refused_on_one_exchange(redis_broker: Broker, names: Names) -> None:
    """A stream kind's publish wrote XADD into an empty list queue's key (no key, so no type to check): that
    queue failed with WRONGTYPE from then on, and its copy of the message never ran."""
    from funboost_like.core.errors import ConfigurationError

    lists, stream = names.queue("list"), names.queue("stream")
    redis_broker.bind(lists, names.exchange, "fanout")
    get_broker(BrokerEnum.RedisBrpopLpush).bind(names.queue("list2"), names.exchange, "fanout")  # a list too
    with pytest.raises(ConfigurationError, match="kinds of one layout"):
        get_broker(BrokerEnum.REDIS_STREAM).bind(stream, names.exchange, "fanout")
    assert redis_broker.publish_routed(names.exchange, "", [b"x"]) == 2
    assert redis_broker.count(lists) == 1


def test_redis_bindings_hash_and_a_key_of_another_type_changes_nothing(redis_broker: Broker, names: Names) -> None:
    import redis

    good, wrong = names.queue("good"), names.queue("wrong")
    redis_broker.bind(good, names.exchange, "topic", ["a.*", "#"])
    redis_broker.bind(wrong, names.exchange, "topic", "a.*")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        stored = client.hgetall(f"fl:exchange:{{{names.exchange}}}")
        assert stored[b"type"] == b"topic" and len(stored) == 4
        client.set(wrong, "not a list")
        with pytest.raises(BrokerError, match="WRONGTYPE"):
            redis_broker.publish_routed(names.exchange, "a.b", [b"x"])
        assert redis_broker.count(good) == 0
        client.delete(wrong)
        assert redis_broker.publish_routed(names.exchange, "a.b", [b"x"]) == 2
        assert redis_broker.publish_routed(names.exchange, "b", [b"y"]) == 1
        assert redis_broker.count(good) == 2 and redis_broker.count(wrong) == 1
    finally:
        client.close()


def test_redis_routed_priority_out_of_range_raises(redis_broker: Broker, names: Names) -> None:
    queue = names.queue("q")
    redis_broker.bind(queue, names.exchange, "direct", "k")
    with pytest.raises(ConfigurationError, match="priorities"):
        redis_broker.publish_routed(names.exchange, "k", [b"x"], priority=10)
    assert redis_broker.count(queue) == 0


def test_cache_mode_and_an_exchange_are_refused_together(queue_name: str) -> None:
    """A routed copy ran from the cache and took the objects out: every other queue's copy of a fanout
    message was dead-lettered as "no longer in this process" (lost work)."""
    from funboost_like.core.errors import ConfigurationError

    exchange = {"exchange_name": f"{queue_name}_x", "exchange_type": "fanout"}
    with pytest.raises(ConfigurationError, match="use_cache"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, use_cache=True,
                  broker_exclusive_config=exchange)(lambda x: x)
    f = task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, broker_exclusive_config=exchange)(
        lambda x: x)
    with pytest.raises(ConfigurationError, match="use_cache"):
        f.publish({"x": 1}, PriorityConsumingControlConfig(use_cache=True))
    assert f.get_message_count() == 0
