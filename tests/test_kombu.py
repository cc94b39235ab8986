"""KOMBU beyond the contract suite: the URLs it takes and the class each transport gets, what it says
about wrong ones, passwords kept out of its errors, and plain kombu and pika programs on the same queues.

The behaviour every transport shares with the other kinds is tested in test_broker_contract.py (KOMBU
runs there once per transport: amqp, redis, memory, sqlite, postgresql) and, for AMQP, test_rabbitmq.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import kombu
import pytest

from funboost_like import PriorityConsumingControlConfig, task_deco
from funboost_like.brokers.base import Delivery
from funboost_like.brokers.kombu_broker import KombuBroker, check_url
from funboost_like.brokers.kombu_virtual import (
    KombuMemoryBroker,
    KombuRedisBroker,
    KombuSqlBroker,
    KombuSqliteBroker,
    KombuVirtualBroker,
    split_options,
)
from funboost_like.brokers.registry import broker_class, get_broker
from funboost_like.core.config import patch_frame_config
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import BrokerConnectionError, BrokerError, ConfigurationError

from .conftest import require_server

URL = "pyamqp://guest:guest@127.0.0.1:5672//"
REDIS_URL = "redis://127.0.0.1:6379/15"
UNREACHABLE = "amqp://me:s3cret@127.0.0.1:1//"  # nothing listens on port 1: refused at once


def fetch_n(broker: KombuBroker | KombuVirtualBroker, queue: str, n: int, timeout: float = 5.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got.extend(broker.fetch(queue, n - len(got), 0.2))
    return got


# -- URLs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["amqp://guest:guest@127.0.0.1:5672//", "pyamqp://u:p@host/vhost",
                                 "amqps://u:p@host:5671//", "AMQP://host//", "amqp://a//;pyamqp://b//"])
def test_amqp_urls_are_accepted(url: str) -> None:
    assert check_url(url) == url
    patch_frame_config(KOMBU_URL=url)
    assert broker_class(BrokerEnum.KOMBU) is KombuBroker


@pytest.mark.parametrize("url, cls", [
    ("redis://:s3cret@127.0.0.1:6379/0", KombuRedisBroker),
    ("rediss://127.0.0.1:6380/0", KombuRedisBroker),
    ("memory://", KombuMemoryBroker),
    ("sqla+postgresql+psycopg://user:s3cret@host/db", KombuSqlBroker),
    ("sqlalchemy+mysql+pymysql://user@host/db", KombuSqlBroker),
    ("sqla+sqlite:////tmp/queues.sqlite", KombuSqliteBroker),
    ("filesystem://", KombuVirtualBroker),  # any other kombu transport: the least promises
])
def test_every_kombu_transport_gets_the_class_of_its_guarantees(url: str, cls: type) -> None:
    patch_frame_config(KOMBU_URL=url)
    assert broker_class(BrokerEnum.KOMBU) is cls
    assert broker_class("KOMBU").capabilities == cls.capabilities


def test_capabilities_state_each_transports_promises() -> None:
    amqp, redis, memory = KombuBroker.capabilities, KombuRedisBroker.capabilities, KombuMemoryBroker.capabilities
    sql, sqlite, other = KombuSqlBroker.capabilities, KombuSqliteBroker.capabilities, KombuVirtualBroker.capabilities
    assert (amqp.redelivery, amqp.delay, amqp.routing, amqp.max_priority) == ("native", "native", "native", 255)
    assert amqp.priority_option == "x-max-priority"  # per queue, asked for (docs/rabbitmq.md)
    assert (redis.redelivery, redis.delay, redis.max_priority, redis.key_value) == ("lease", "emulated", 9, True)
    assert redis.cross_host and not memory.cross_process and memory.ack and memory.key_value
    assert not sql.ack and sql.cross_host and not sqlite.cross_host and not sql.key_value and sql.dead_letters
    assert not other.ack and not other.dead_letters and not other.priority
    assert all(c.routing == "none" for c in (redis, memory, sql, sqlite, other))


@pytest.mark.parametrize("url, wrong", [
    ("redsi://:s3cret@127.0.0.1:6379/0", "did you mean 'redis'"),
    ("localhost", "no scheme"),
    ("amqp://host//;redis://:s3cret@host/0", "a failover list must stay on one kombu transport"),
])
def test_a_url_no_transport_understands_is_refused_without_its_password(url: str, wrong: str) -> None:
    patch_frame_config(KOMBU_URL=url)
    with pytest.raises(ConfigurationError) as info:
        broker_class(BrokerEnum.KOMBU)
    assert wrong in str(info.value) and "s3cret" not in str(info.value)


def identity(x: int) -> int:
    return x


def test_decoration_checks_the_capabilities_of_the_transport_configured_then() -> None:
    patch_frame_config(KOMBU_URL="sqla+sqlite:////tmp/unused.sqlite")
    with pytest.raises(ConfigurationError, match="key-value records"):
        task_deco(f"kombu_{uuid.uuid4().hex[:8]}", broker_kind=BrokerEnum.KOMBU, is_using_rpc_mode=True)(identity)
    patch_frame_config(KOMBU_URL="memory://")  # read again at the next decoration
    task_deco(f"kombu_{uuid.uuid4().hex[:8]}", broker_kind=BrokerEnum.KOMBU, is_using_rpc_mode=True)(identity)
    with pytest.raises(ConfigurationError, match="routing|exchange"):
        task_deco(f"kombu_{uuid.uuid4().hex[:8]}", broker_kind=BrokerEnum.KOMBU,
                  broker_exclusive_config={"exchange_name": "logs", "exchange_type": "fanout"})(identity)
    f = task_deco(f"kombu_{uuid.uuid4().hex[:8]}", broker_kind=BrokerEnum.KOMBU)(identity)

    with pytest.raises(ConfigurationError, match="priority"):  # memory:// has no priorities
        f.publish({"x": 1}, priority_control_config=PriorityConsumingControlConfig(priority=3))


def test_transport_options_come_from_the_urls_query() -> None:
    url, options = split_options("redis://:s3cret@127.0.0.1:6379/15?visibility_timeout=7.5&health_check_interval=5"
                                 "&priority_steps=[0,5]&custom=x")
    assert options == {"visibility_timeout": 7.5, "health_check_interval": 5, "priority_steps": [0, 5]}
    assert url == "redis://:s3cret@127.0.0.1:6379/15?custom=x"
    assert split_options("memory://") == ("memory://", {})


def test_the_url_is_read_at_use_so_a_later_setting_counts() -> None:
    broker = KombuBroker()  # the default: RABBITMQ_URL
    patch_frame_config(KOMBU_URL="memory://")
    with pytest.raises(ConfigurationError, match="(?i)close it"):  # built for AMQP: it says how to switch
        broker.publish("q", b"{}")
    assert broker_class(BrokerEnum.KOMBU) is KombuMemoryBroker
    memory = get_broker(BrokerEnum.KOMBU)
    patch_frame_config(KOMBU_URL="sqla+sqlite:////tmp/unused.sqlite")
    with pytest.raises(ConfigurationError, match="close it"):  # an instance keeps its transport
        memory.close()
        memory.count("q")


# -- passwords in errors ------------------------------------------------------------------------------


def test_an_unreachable_server_names_the_url_without_its_password() -> None:
    patch_frame_config(KOMBU_URL=UNREACHABLE)
    broker = KombuBroker()
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        broker.publish("q", b"{}")
    assert time.monotonic() - started < 3.0  # one try, no reconnect loop
    assert "me:***@127.0.0.1:1" in str(info.value) and "s3cret" not in str(info.value)


def test_an_empty_kombu_url_means_rabbitmq_url() -> None:
    patch_frame_config(KOMBU_URL="", RABBITMQ_URL=UNREACHABLE)
    with pytest.raises(BrokerConnectionError) as info:
        KombuBroker().count("q")
    assert "me:***@127.0.0.1:1" in str(info.value) and "s3cret" not in str(info.value)


def test_the_environment_sets_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUNBOOST_LIKE_KOMBU_URL", "memory://")
    patch_frame_config()  # read the settings again
    assert broker_class(BrokerEnum.KOMBU) is KombuMemoryBroker
    with pytest.raises(ConfigurationError, match="'memory'"):
        KombuBroker()


def test_an_unreachable_redis_names_the_url_without_its_password() -> None:
    patch_frame_config(KOMBU_URL="redis://:s3cret@127.0.0.1:1/0")
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        get_broker(BrokerEnum.KOMBU).publish("q", b"{}")
    assert time.monotonic() - started < 3.0
    assert ":***@127.0.0.1:1" in str(info.value) and "s3cret" not in str(info.value)


def test_every_password_of_a_failover_list_is_hidden() -> None:
    patch_frame_config(KOMBU_URL="amqp://a:s3cret@127.0.0.1:1//;amqp://b:t0psecret@127.0.0.1:2//")
    with pytest.raises(BrokerConnectionError) as info:
        KombuBroker().publish("q", b"{}")
    message = str(info.value)
    assert "a:***@127.0.0.1:1" in message and "b:***@127.0.0.1:2" in message
    assert "s3cret" not in message and "t0psecret" not in message


# -- on the real server ---------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[str]:
    require_server("RabbitMQ", "127.0.0.1", 5672)
    patch_frame_config(KOMBU_URL=URL)
    yield URL


@pytest.fixture
def queue(server: str) -> Iterator[str]:
    name = f"kombu_{uuid.uuid4().hex[:10]}"
    yield name
    with kombu.Connection(server) as connection:
        channel = connection.channel()
        for doomed in (name, f"{name}.dlq"):
            channel.queue_delete(doomed)


@pytest.fixture
def brokers(queue: str) -> Iterator[Callable[[], KombuBroker]]:
    """Makes brokers, closed before their queue is deleted (a live consumer would resubscribe)."""
    made: list[KombuBroker] = []

    def make() -> KombuBroker:
        made.append(KombuBroker())
        return made[-1]

    yield make
    for broker in made:
        broker.close()


def test_a_wrong_password_is_refused_without_showing_it(server: str) -> None:
    patch_frame_config(KOMBU_URL="amqp://guest:wr0ng-pass@127.0.0.1:5672//")
    with pytest.raises(BrokerError) as info:
        KombuBroker().publish("q", b"{}")
    assert "guest:***@127.0.0.1:5672" in str(info.value) and "wr0ng-pass" not in str(info.value)


def test_a_plain_kombu_program_and_the_framework_understand_each_other(queue: str) -> None:
    seen: list[int] = []
    done = threading.Event()

    @task_deco(queue, broker_kind=BrokerEnum.KOMBU)
    def f(x: int) -> None:
        seen.append(x)
        done.set()

    f.push(1)  # declares the queue as the framework wants it
    with kombu.Connection(URL) as connection:  # a kombu program decodes the framework's messages
        message = kombu.Queue(queue, no_declare=True)(connection.channel()).get()
        assert message is not None and message.content_type == "application/json"
        assert message.decode()["x"] == 1
        message.ack()
        # and a Celery-style publisher (kombu's JSON serializer) reaches the framework's function
        kombu.Producer(connection.channel()).publish({"x": 2}, routing_key=queue, serializer="json")
    f.consume()
    assert done.wait(10) and seen == [2]
    f.stop()


def test_bodies_stay_bytes_whatever_encoding_the_publisher_declared(queue: str,
                                                                   brokers: Callable[[], KombuBroker]) -> None:
    broker = brokers()
    assert broker.fetch(queue, 1, 0.05) == []  # subscribing declares the queue the plain producer publishes to
    with kombu.Connection(URL) as connection:
        producer = kombu.Producer(connection.channel())
        producer.publish('{"text": "caf\u00e9"}', routing_key=queue, content_type="application/json",
                         content_encoding="utf-8")
        producer.publish(b"\xff\xfe not utf-8", routing_key=queue, content_type="application/octet-stream",
                         content_encoding="binary")
    got = fetch_n(broker, queue, 2)
    assert [d.body for d in got] == ['{"text": "caf\u00e9"}'.encode(), b"\xff\xfe not utf-8"]
    broker.ack(got)


def test_kombu_and_pika_share_queues_and_attempt_counts(queue: str, brokers: Callable[[], KombuBroker]) -> None:
    pytest.importorskip("pika")
    patch_frame_config(RABBITMQ_URL="amqp://guest:guest@127.0.0.1:5672/%2F")
    via_kombu, via_pika = brokers(), broker_class(BrokerEnum.RABBITMQ_PIKA)()
    try:
        for broker in (via_kombu, via_pika):
            broker.configure_queue(queue, {"x-max-priority": 5})
        via_kombu.publish(queue, b'{"n":1}', priority=3)
        [first] = fetch_n(via_kombu, queue, 1)
        via_kombu.nack(first)
        via_kombu.close()  # its consumer goes; the re-published message waits for pika
        [again] = fetch_n(via_pika, queue, 1)
        assert (again.body, again.attempts, again.priority) == (b'{"n":1}', 2, 3)
        via_pika.dead_letter(again, "checked")
        [letter] = brokers().list_dead_letters(queue)
        assert (json.loads(letter.body), letter.reason, letter.attempts) == ({"n": 1}, "checked", 2)
    finally:
        via_pika.close()


def test_a_waiting_fetch_wakes_when_a_message_arrives(queue: str, brokers: Callable[[], KombuBroker]) -> None:
    broker, publisher = brokers(), brokers()
    assert broker.fetch(queue, 1, 0.05) == []  # subscribed: the I/O thread now waits in select
    threading.Timer(0.3, lambda: publisher.publish(queue, b"{}")).start()
    started = time.monotonic()
    got = broker.fetch(queue, 1, 5.0)
    waited = time.monotonic() - started
    assert len(got) == 1 and 0.25 < waited < 1.0
    broker.ack(got)


# -- kombu's virtual transports -----------------------------------------------------------------------


@pytest.fixture
def redis_queue(queue_name: str) -> Iterator[str]:
    require_server("Redis", "127.0.0.1", 6379)
    patch_frame_config(KOMBU_URL=REDIS_URL)
    yield queue_name
    with kombu.Connection(REDIS_URL) as connection:
        channel = connection.channel()
        for doomed in (queue_name, f"{queue_name}.dlq"):
            channel.queue_purge(doomed)


def test_a_plain_kombu_program_on_redis_and_the_framework_understand_each_other(redis_queue: str) -> None:
    seen: list[int] = []
    done = threading.Event()

    @task_deco(redis_queue, broker_kind=BrokerEnum.KOMBU, is_using_rpc_mode=True)
    def f(x: int) -> int:
        seen.append(x)
        done.set()
        return x * 10

    f.push(1)
    with kombu.Connection(REDIS_URL) as connection:
        queue = connection.SimpleQueue(redis_queue)
        message = queue.get(timeout=5)  # a kombu program decodes the framework's messages
        assert message.content_type == "application/json" and message.decode()["x"] == 1
        message.ack()
        queue.put({"x": 2}, serializer="json")  # and a Celery-style publisher reaches the framework
        queue.close()
    result = f.push(3)  # RPC results are records in the same Redis
    f.consume()
    assert result.get(timeout=10) == 30
    deadline = time.monotonic() + 10
    while sorted(seen) != [2, 3] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(seen) == [2, 3]
    f.stop()


def test_on_redis_a_priority_and_a_countdown_are_honoured(redis_queue: str) -> None:
    broker = get_broker(BrokerEnum.KOMBU)
    assert isinstance(broker, KombuRedisBroker)
    broker.publish(redis_queue, b'{"late":1}', not_before=time.time() + 0.5)
    for priority in (0, 2, 8, 5):
        broker.publish(redis_queue, json.dumps({"p": priority}).encode(), priority=priority)
    got = fetch_n(broker, redis_queue, 4)
    assert [json.loads(d.body)["p"] for d in got] == [8, 5, 2, 0]  # kombu's steps: 7-9, 4-6, 1-3, 0
    assert [d.priority for d in got] == [8, 5, 2, 0]  # kept exactly in the message (a nack keeps it)
    assert broker.count(redis_queue) == 1  # the delayed one, held by this process until due
    [late] = fetch_n(broker, redis_queue, 1)
    assert late.body == b'{"late":1}'
    broker.ack([*got, late])


def test_on_redis_a_held_message_is_renewed_and_a_dead_holders_comes_back(redis_queue: str) -> None:
    patch_frame_config(KOMBU_URL=f"{REDIS_URL}?visibility_timeout=1")
    holder = get_broker(BrokerEnum.KOMBU)
    holder.publish(redis_queue, b'{"n":1}')
    [held] = fetch_n(holder, redis_queue, 1)
    assert holder.maintenance_interval() == 0.25  # renewed by the maintenance thread meanwhile
    time.sleep(1.5)  # longer than the visibility timeout
    holder.maintain()
    assert holder.fetch(redis_queue, 1, 0.1) == []
    holder._after_fork()  # as if its process had died: nothing renews the message any more
    time.sleep(1.2)
    holder.maintain()  # any live consumer restores it (kombu's restore_visible)
    [again] = fetch_n(holder, redis_queue, 1)
    assert (again.body, again.crashes, again.attempts) == (held.body, 1, 2)
    holder.ack([again])


def test_a_plain_kombu_program_on_memory_shares_the_queues_of_this_process(queue_name: str) -> None:
    patch_frame_config(KOMBU_URL="memory://")
    broker = get_broker(BrokerEnum.KOMBU)
    with kombu.Connection("memory://") as connection:
        connection.SimpleQueue(queue_name).put({"x": 1}, serializer="json")
        [delivery] = fetch_n(broker, queue_name, 1)
        assert json.loads(delivery.body) == {"x": 1}
        broker.nack(delivery)  # comes back, counted
        [again] = fetch_n(broker, queue_name, 1)
        assert again.attempts == 2
        broker.close()  # what the broker holds goes back, uncounted
        message = connection.SimpleQueue(queue_name).get(timeout=1)
        assert message.decode() == {"x": 1} and message.headers["fl-attempts"] == 1


def test_a_function_runs_on_a_sqlite_database_through_kombu(tmp_path: Path, queue_name: str) -> None:
    patch_frame_config(KOMBU_URL=f"sqla+sqlite:///{tmp_path / 'kombu.sqlite'}")
    seen: list[int] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.KOMBU, max_retry_times=0)
    def f(x: int) -> None:
        if x < 0:
            raise ValueError("negative")
        seen.append(x)

    f.publish_many([{"x": i} for i in range(-1, 5)])
    f.consume()
    deadline = time.monotonic() + 10
    while (len(seen) < 5 or not f.broker.list_dead_letters(queue_name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    f.stop()
    assert sorted(seen) == [0, 1, 2, 3, 4]
    [letter] = f.broker.list_dead_letters(queue_name)
    assert json.loads(letter.body)["x"] == -1 and "negative" in letter.reason
