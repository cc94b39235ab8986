"""Broker kind -> implementing class, imported lazily.

Adding a broker is one module, one line in ``BROKERS`` and one in ``FIXTURES`` (how the contract
suite runs it). A kind whose module is not built yet
maps to ``None``; choosing it raises :class:`BrokerNotAvailable` naming the missing piece. An entry
may name a function instead of a class when the kind's class depends on its settings (KOMBU: AMQP or
one of kombu's virtual transports, by ``KOMBU_URL``): it is called at each resolution and returns the
class, so capabilities are checked against the transport configured then.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

from funboost_like.brokers.base import Broker
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import BrokerNotAvailable

# kind -> ("module:Class", pip extra that provides its client library) or None when not built yet.
BROKERS: dict[BrokerEnum, tuple[str, str] | None] = {
    BrokerEnum.RABBITMQ_AMQPSTORM: ("funboost_like.brokers.rabbitmq_amqpstorm:AmqpStormBroker", "rabbitmq"),
    BrokerEnum.RABBITMQ_RABBITPY: ("funboost_like.brokers.rabbitmq_rabbitpy:RabbitpyBroker", "rabbitmq"),
    BrokerEnum.REDIS: ("funboost_like.brokers.redis_list:RedisListBroker", "redis"),
    BrokerEnum.LOCAL_PYTHON_QUEUE: ("funboost_like.brokers.memory:MemoryBroker", ""),
    BrokerEnum.RABBITMQ_PIKA: ("funboost_like.brokers.rabbitmq_pika:PikaBroker", "rabbitmq"),
    BrokerEnum.MONGOMQ: ("funboost_like.brokers.mongo:MongoBroker", "mongo"),
    BrokerEnum.PERSISTQUEUE: ("funboost_like.brokers.sqlite:SqliteBroker", ""),
    BrokerEnum.NSQ: ("funboost_like.brokers.nsq_broker:NsqBroker", "nsq"),  # standard library only (nsq_wire.py)
    BrokerEnum.KAFKA: ("funboost_like.brokers.kafka_python:KafkaPythonBroker", "kafka-python"),
    BrokerEnum.REDIS_ACK_ABLE: ("funboost_like.brokers.redis_ack_able:RedisAckAbleBroker", "redis"),
    BrokerEnum.SQLACHEMY: ("funboost_like.brokers.sqlalchemy_broker:SqlAlchemyBroker", "sql"),
    BrokerEnum.ROCKETMQ: None,
    BrokerEnum.REDIS_STREAM: ("funboost_like.brokers.redis_stream:RedisStreamBroker", "redis"),
    BrokerEnum.ZEROMQ: ("funboost_like.brokers.zeromq_broker:ZeroMqBroker", "zeromq"),
    BrokerEnum.RedisBrpopLpush: ("funboost_like.brokers.redis_brpoplpush:RedisBrpopLpushBroker", "redis"),
    BrokerEnum.KOMBU: ("funboost_like.brokers.kombu_virtual:kombu_broker_class", "kombu"),  # a class per KOMBU_URL
    BrokerEnum.CONFLUENT_KAFKA: ("funboost_like.brokers.kafka_confluent:ConfluentKafkaBroker", "confluent-kafka"),
    BrokerEnum.MQTT: ("funboost_like.brokers.mqtt_broker:MqttBroker", "mqtt"),
    BrokerEnum.HTTPSQS: ("funboost_like.brokers.httpsqs_broker:HttpsqsBroker", "httpsqs"),  # standard library only
    BrokerEnum.PULSAR: ("funboost_like.brokers.pulsar_broker:PulsarBroker", "pulsar"),
    BrokerEnum.NATS: ("funboost_like.brokers.nats_broker:NatsBroker", "nats"),
    BrokerEnum.DJANGO_ORM: ("funboost_like.brokers.django_orm:DjangoOrmBroker", "django"),
}

# kind -> the oldest Python its client library installs on, when newer than funboost_like's own 3.10.
NEEDS_PYTHON: dict[BrokerEnum, tuple[int, int]] = {
    BrokerEnum.RABBITMQ_AMQPSTORM: (3, 11),  # amqpstorm 3
    BrokerEnum.RABBITMQ_RABBITPY: (3, 11),  # rabbitpy 3
}


@dataclass(frozen=True)
class Fixture:
    """How the contract suite (tests/test_broker_contract.py) runs a broker kind.

    ``server``: (name, host, port) that must accept connections (the suite skips on a laptop without
    it and fails in CI). ``settings``: settings for the suite (a test database, ...). ``fast_recovery``:
    settings under which a dead consumer's messages come back within about two seconds (crash tests).
    ``stand_in_flaw``: a known fault of the stand-in server (not of the broker) that makes the repeated
    kills of the poison-message test fail at random; that test is skipped with it as the reason.
    """

    server: tuple[str, str, int] | None = None
    settings: Mapping[str, object] = field(default_factory=dict)
    fast_recovery: Mapping[str, object] = field(default_factory=dict)
    variant: str = ""  # when a kind runs the suite several ways (one URL per database, say): this way's name
    stand_in_flaw: str = ""


_REDIS = Fixture(("Redis", "127.0.0.1", 6379), {"REDIS_URL": "redis://127.0.0.1:6379/15"},
                 {"REDIS_HEARTBEAT_SECONDS": 0.3, "REDIS_DEAD_AFTER_SECONDS": 1.0})

_RABBITMQ = Fixture(("RabbitMQ", "127.0.0.1", 5672))
# one file per pytest-xdist worker: two workers creating kombu's tables in one file at once would collide
_KOMBU_SQLITE = os.path.join(tempfile.gettempdir(),
                             f"funboost_like_kombu{os.environ.get('PYTEST_XDIST_WORKER', '')}.sqlite")

_SQL_FAST = {"SQLALCHEMY_LEASE_SECONDS": 1.0}
_SQLALCHEMY = (  # "" is a SQLite file in SQLITE_QUEUES_PATH (a temporary folder per test)
    Fixture(("PostgreSQL", "127.0.0.1", 5432), {"SQLALCHEMY_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/test"},
            _SQL_FAST, variant="postgresql"),
    Fixture(("MariaDB", "127.0.0.1", 3306), {"SQLALCHEMY_URL": "mysql+pymysql://root@127.0.0.1:3306/test"},
            _SQL_FAST, variant="mariadb"),
    Fixture(None, {"SQLALCHEMY_URL": ""}, _SQL_FAST, variant="sqlite"),
)

# The test project's settings module defines one database alias per server; the child processes of the
# crash tests get these settings as environment variables and set Django up the same way.
_DJANGO = {"DJANGO_SETTINGS_MODULE": "tests.django_project.settings", "DJANGO_MIGRATE_ON_FIRST_USE": True}
_DJANGO_FAST = {"DJANGO_LEASE_SECONDS": 1.0}
_DJANGO_ORM = (
    Fixture(None, {**_DJANGO, "DJANGO_DATABASE_ALIAS": "default"}, _DJANGO_FAST, variant="sqlite"),
    Fixture(("PostgreSQL", "127.0.0.1", 5432), {**_DJANGO, "DJANGO_DATABASE_ALIAS": "postgresql"}, _DJANGO_FAST,
            variant="postgresql"),
    Fixture(("MariaDB", "127.0.0.1", 3306), {**_DJANGO, "DJANGO_DATABASE_ALIAS": "mariadb"}, _DJANGO_FAST,
            variant="mariadb"),
)

# Kafka's stand-ins (tests/kafka_server.py): Tansu, and librdkafka's mock cluster behind a fixed port. One
# partition, so the suite's order checks hold; a group's first join takes half the session timeout there.
_KAFKA_FAST = {"KAFKA_SESSION_TIMEOUT_SECONDS": 1.5}
_KAFKA = tuple(Fixture((name, "127.0.0.1", port), {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
                                                   "KAFKA_PARTITIONS": 1, "KAFKA_SESSION_TIMEOUT_SECONDS": 3.0,
                                                   "KAFKA_API_VERSION": version},
                       _KAFKA_FAST, variant=variant)  # kafka-python cannot read the mock's version answer: told it
               for name, port, variant, version in (("Tansu", 9092, "tansu", ""),
                                                    ("librdkafka mock cluster", 9192, "mock", "2.0")))

# kind -> its fixture, or a tuple of named variants (each runs the whole suite): a built kind without
# a line here is not in the contract suite (and must be).
FIXTURES: dict[BrokerEnum, Fixture | tuple[Fixture, ...]] = {
    BrokerEnum.RABBITMQ_PIKA: _RABBITMQ,
    BrokerEnum.KOMBU: (
        Fixture(_RABBITMQ.server, {"KOMBU_URL": "pyamqp://guest:guest@127.0.0.1:5672//"}, variant="amqp"),
        Fixture(_REDIS.server, {"KOMBU_URL": "redis://127.0.0.1:6379/15"},
                {"KOMBU_URL": "redis://127.0.0.1:6379/15?visibility_timeout=1"}, variant="redis"),
        Fixture(settings={"KOMBU_URL": "memory://"}, variant="memory"),
        Fixture(None, {"KOMBU_URL": f"sqla+sqlite:///{_KOMBU_SQLITE}"},
                variant="sqlite"),
        Fixture(("PostgreSQL", "127.0.0.1", 5432),
                {"KOMBU_URL": "sqla+postgresql+psycopg://postgres@127.0.0.1:5432/test"}, variant="postgresql"),
    ),
    BrokerEnum.RABBITMQ_AMQPSTORM: _RABBITMQ,
    BrokerEnum.RABBITMQ_RABBITPY: _RABBITMQ,
    BrokerEnum.REDIS: _REDIS,
    BrokerEnum.LOCAL_PYTHON_QUEUE: Fixture(),
    BrokerEnum.PERSISTQUEUE: (Fixture(fast_recovery={"SQLITE_LEASE_SECONDS": 1.0}),
                              Fixture(None, {"SQLITE_FILES_PER_QUEUE": 2}, {"SQLITE_LEASE_SECONDS": 1.0}, "2files")),
    BrokerEnum.REDIS_ACK_ABLE: _REDIS,
    BrokerEnum.REDIS_STREAM: _REDIS,
    BrokerEnum.RedisBrpopLpush: _REDIS,
    BrokerEnum.SQLACHEMY: _SQLALCHEMY,
    BrokerEnum.DJANGO_ORM: _DJANGO_ORM,
    BrokerEnum.NATS: Fixture(("NATS", "127.0.0.1", 4222), fast_recovery={"NATS_ACK_WAIT_SECONDS": 1.5}),
    # a killed consumer's slot is parked by its will at once; test sessions end ten minutes after their last use
    BrokerEnum.MQTT: Fixture(("Mosquitto", "127.0.0.1", 1883), {"MQTT_SESSION_EXPIRY_SECONDS": 600.0}),
    # no server: the broker starts the hub of the port (the suite's queues are named, so all share one hub)
    BrokerEnum.ZEROMQ: Fixture(None, {"ZEROMQ_PORT": 29517, "ZEROMQ_HUB_IDLE_SECONDS": 60.0}),
    # SecantusDB, the stand-in (tests/mongo_server.py); no retryable writes: each one slows its later writes there
    BrokerEnum.KAFKA: _KAFKA,
    BrokerEnum.CONFLUENT_KAFKA: _KAFKA,
    BrokerEnum.MONGOMQ: Fixture(("MongoDB", "127.0.0.1", 27117),
                                {"MONGO_URL": "mongodb://127.0.0.1:27117/funboost_like_test?retryWrites=false"},
                                {"MONGO_LEASE_SECONDS": 1.0}),
    # pulsar-lite, the stand-in (tests/pulsar_server.py); a dead consumer's messages come back when its connection drops
    BrokerEnum.PULSAR: Fixture(("Pulsar", "127.0.0.1", 6650), stand_in_flaw=(
        "pulsar-lite 0.2.0 never releases the messages of a consumer killed with an unread frame in its socket "
        "(docs/pulsar.md); the poison test's three kills hit it about one run in three")),
    # no httpsqs can be had here: the fixture server (tests/httpsqs_server.py, httpsqs 1.7's protocol), with a password
    BrokerEnum.HTTPSQS: Fixture(("HTTPSQS fixture", "127.0.0.1", 1218),
                                {"HTTPSQS_URL": "http://127.0.0.1:1218/?auth=fixture-secret"}),
    # no nsqd can be had here: the protocol fixture (tests/nsqd_server.py); nsqd's msg_timeout is 1 s at least
    BrokerEnum.NSQ: Fixture(("nsqd fixture", "127.0.0.1", 4150), fast_recovery={"NSQ_MSG_TIMEOUT_SECONDS": 1.0}),
}



def fixture_cases() -> list[tuple[BrokerEnum, Fixture]]:
    """Every (kind, fixture) the contract suite runs, variants apart, in registry order."""
    cases: list[tuple[BrokerEnum, Fixture]] = []
    for kind, entry in BROKERS.items():
        fixture = FIXTURES.get(kind)
        if entry is not None and fixture is not None:
            cases += [(kind, f) for f in (fixture if isinstance(fixture, tuple) else (fixture,))]
    return cases


def case_id(kind: BrokerEnum, fixture: Fixture) -> str:
    return f"{kind.name}-{fixture.variant}" if fixture.variant else kind.name


BrokerKind = Union[BrokerEnum, int, str]  # noqa: UP007 - a runtime alias must work on 3.10 too

_instances: dict[tuple[BrokerEnum, int], Broker] = {}
_lock = threading.Lock()
generation = 0  # bumped by close_all(): holders of a cached broker fetch it again


def resolve_kind(kind: BrokerKind) -> BrokerEnum:
    """Accept a BrokerEnum, its number or its name; raise a helpful error otherwise."""
    if isinstance(kind, BrokerEnum):
        return kind
    if isinstance(kind, bool) or not isinstance(kind, int | str):
        raise BrokerNotAvailable(f"broker_kind must be a BrokerEnum, int or name, not {kind!r}")
    if isinstance(kind, str) and kind.strip().isdigit():  # a number given as text (--broker 6)
        kind = int(kind)
    if isinstance(kind, int):
        try:
            return BrokerEnum(kind)
        except ValueError:
            known = ", ".join(f"{k.name}={k.value}" for k in BROKERS)
            raise BrokerNotAvailable(f"there is no broker kind number {kind}; known kinds: {known}") from None
    upper = {name.upper(): member for name, member in BrokerEnum.__members__.items()}
    if kind.upper() in upper:
        return upper[kind.upper()]
    guess = difflib.get_close_matches(kind.upper(), list(upper), n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    raise BrokerNotAvailable(f"unknown broker kind {kind!r}{hint}")


def broker_class(kind: BrokerKind) -> type[Broker]:
    member = resolve_kind(kind)
    entry = BROKERS.get(member)
    if entry is None:
        built = ", ".join(k.name for k, v in BROKERS.items() if v is not None)
        raise BrokerNotAvailable(
            f"broker kind {member.name} ({member.value}) is not built yet in this version of funboost_like: "
            f"its module funboost_like.brokers.{member.name.lower()} does not exist. Brokers available now: {built}"
        )
    path, extra = entry
    module_name, _, class_name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
        cls: type[Broker] = found if isinstance(found, type) else found()  # a function picks it by the settings
    except ImportError as exc:
        needs = NEEDS_PYTHON.get(member)
        if needs is not None and sys.version_info[:2] < needs:
            raise BrokerNotAvailable(
                f"broker kind {member.name} needs Python {needs[0]}.{needs[1]} or later (its client library does; "
                f"this is Python {sys.version_info[0]}.{sys.version_info[1]}): choose another kind here"
            ) from exc
        install = f"pip install 'funboost_like[{extra}]'" if extra else "reinstall funboost_like"
        raise BrokerNotAvailable(
            f"broker kind {member.name} needs a client library that is not installed ({exc}); run: {install}"
        ) from exc
    return cls


def get_broker(kind: BrokerKind) -> Broker:
    """The process-wide broker instance for ``kind`` (one per process; a forked child gets its own)."""
    member = resolve_kind(kind)
    key = (member, os.getpid())
    broker = _instances.get(key)
    if broker is None:
        cls = broker_class(member)
        with _lock:
            broker = _instances.get(key)
            if broker is None:
                broker = cls()
                _instances[key] = broker
    return broker


def close(kind: BrokerKind) -> None:
    """Close this process's instance of ``kind``, if any (the next :func:`get_broker` makes a new one)."""
    with _lock:
        broker = _instances.pop((resolve_kind(kind), os.getpid()), None)
    if broker is not None:
        broker.close()


def close_all() -> None:
    """Close every broker this process opened (tests, shutdown)."""
    global generation
    with _lock:
        brokers = [b for (_, pid), b in _instances.items() if pid == os.getpid()]
        _instances.clear()
        generation += 1
    for broker in brokers:
        broker.close()
