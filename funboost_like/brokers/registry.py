"""Broker kind -> implementing class, imported lazily.

Adding a broker is one module, one line in ``BROKERS`` and one in ``FIXTURES`` (how the contract
suite runs it). A kind whose module is not built yet
maps to ``None``; choosing it raises :class:`BrokerNotAvailable` naming the missing piece.
"""

from __future__ import annotations

import difflib
import importlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

from funboost_like.brokers.base import Broker
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import BrokerNotAvailable

# kind -> ("module:Class", pip extra that provides its client library) or None when not built yet.
BROKERS: dict[BrokerEnum, tuple[str, str] | None] = {
    BrokerEnum.RABBITMQ_AMQPSTORM: None,
    BrokerEnum.RABBITMQ_RABBITPY: None,
    BrokerEnum.REDIS: ("funboost_like.brokers.redis_list:RedisListBroker", "redis"),
    BrokerEnum.LOCAL_PYTHON_QUEUE: ("funboost_like.brokers.memory:MemoryBroker", ""),
    BrokerEnum.RABBITMQ_PIKA: None,
    BrokerEnum.MONGOMQ: None,
    BrokerEnum.PERSISTQUEUE: ("funboost_like.brokers.sqlite:SqliteBroker", ""),
    BrokerEnum.NSQ: None,
    BrokerEnum.KAFKA: None,
    BrokerEnum.REDIS_ACK_ABLE: ("funboost_like.brokers.redis_ack_able:RedisAckAbleBroker", "redis"),
    BrokerEnum.SQLACHEMY: None,
    BrokerEnum.ROCKETMQ: None,
    BrokerEnum.REDIS_STREAM: ("funboost_like.brokers.redis_stream:RedisStreamBroker", "redis"),
    BrokerEnum.ZEROMQ: None,
    BrokerEnum.RedisBrpopLpush: ("funboost_like.brokers.redis_brpoplpush:RedisBrpopLpushBroker", "redis"),
    BrokerEnum.KOMBU: None,
    BrokerEnum.CONFLUENT_KAFKA: None,
    BrokerEnum.MQTT: None,
    BrokerEnum.HTTPSQS: None,
    BrokerEnum.PULSAR: None,
    BrokerEnum.NATS: None,
    BrokerEnum.DJANGO_ORM: None,
}



@dataclass(frozen=True)
class Fixture:
    """How the contract suite (tests/test_broker_contract.py) runs a broker kind.

    ``server``: (name, host, port) that must accept connections (the suite skips on a laptop without
    it and fails in CI). ``settings``: settings for the suite (a test database, ...). ``fast_recovery``:
    settings under which a dead consumer's messages come back within about two seconds (crash tests).
    """

    server: tuple[str, str, int] | None = None
    settings: Mapping[str, object] = field(default_factory=dict)
    fast_recovery: Mapping[str, object] = field(default_factory=dict)


_REDIS = Fixture(("Redis", "127.0.0.1", 6379), {"REDIS_URL": "redis://127.0.0.1:6379/15"},
                 {"REDIS_HEARTBEAT_SECONDS": 0.3, "REDIS_DEAD_AFTER_SECONDS": 1.0})

# kind -> its fixture: a built kind without a line here is not in the contract suite (and must be).
FIXTURES: dict[BrokerEnum, Fixture] = {
    BrokerEnum.REDIS: _REDIS,
    BrokerEnum.LOCAL_PYTHON_QUEUE: Fixture(),
    BrokerEnum.PERSISTQUEUE: Fixture(fast_recovery={"SQLITE_LEASE_SECONDS": 1.0}),
    BrokerEnum.REDIS_ACK_ABLE: _REDIS,
    BrokerEnum.REDIS_STREAM: _REDIS,
    BrokerEnum.RedisBrpopLpush: _REDIS,
}

BrokerKind = Union[BrokerEnum, int, str]  # noqa: UP007 - a runtime alias must work on 3.10 too

_instances: dict[tuple[BrokerEnum, int], Broker] = {}
_lock = threading.Lock()
generation = 0  # bumped by close_all(): holders of a cached broker fetch it again


def resolve_kind(kind: BrokerKind) -> BrokerEnum:
    """Accept a BrokerEnum, its number or its name; raise a helpful error otherwise."""
    if isinstance(kind, BrokerEnum):
        return kind
    if isinstance(kind, bool):
        raise BrokerNotAvailable(f"broker_kind must be a BrokerEnum, int or name, not {kind!r}")
    if isinstance(kind, int):
        try:
            return BrokerEnum(kind)
        except ValueError:
            known = ", ".join(f"{k.name}={k.value}" for k in BROKERS)
            raise BrokerNotAvailable(f"there is no broker kind number {kind}; known kinds: {known}") from None
    if isinstance(kind, str):
        members = BrokerEnum.__members__
        if kind in members:
            return members[kind]
        upper = {name.upper(): member for name, member in members.items()}
        if kind.upper() in upper:
            return upper[kind.upper()]
        guess = difflib.get_close_matches(kind.upper(), list(upper), n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise BrokerNotAvailable(f"unknown broker kind {kind!r}{hint}")
    raise BrokerNotAvailable(f"broker_kind must be a BrokerEnum, int or name, not {type(kind).__name__}")


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
        module = importlib.import_module(module_name)
    except ImportError as exc:
        install = f"pip install 'funboost_like[{extra}]'" if extra else "reinstall funboost_like"
        raise BrokerNotAvailable(
            f"broker kind {member.name} needs a client library that is not installed ({exc}); run: {install}"
        ) from exc
    cls: type[Broker] = getattr(module, class_name)
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


def close_all() -> None:
    """Close every broker this process opened (tests, shutdown)."""
    global generation
    with _lock:
        brokers = [b for (_, pid), b in _instances.items() if pid == os.getpid()]
        _instances.clear()
        generation += 1
    for broker in brokers:
        broker.close()
