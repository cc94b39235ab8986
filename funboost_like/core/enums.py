"""Broker kinds and concurrency modes, with the seed's numbers (plain ints are accepted too)."""

from __future__ import annotations

from enum import IntEnum


# ``str()`` of a member is its number on every Python, as since 3.11 (format() always gave it): on 3.10
# it was "BrokerEnum.REDIS", in ``%s`` log lines and in a kind passed as text to another process, which
# ``int()`` then refused.
class BrokerEnum(IntEnum):
    __str__ = int.__repr__

    RABBITMQ_AMQPSTORM = 0
    RABBITMQ_RABBITPY = 1
    REDIS = 2
    LOCAL_PYTHON_QUEUE = 3
    RABBITMQ_PIKA = 4
    MONGOMQ = 5
    PERSISTQUEUE = 6
    NSQ = 7
    KAFKA = 8
    REDIS_ACK_ABLE = 9
    SQLACHEMY = 10
    ROCKETMQ = 11
    REDIS_STREAM = 12
    ZEROMQ = 13
    RedisBrpopLpush = 14
    KOMBU = 15
    CONFLUENT_KAFKA = 16
    MQTT = 17
    HTTPSQS = 18
    PULSAR = 19
    NATS = 20
    DJANGO_ORM = 21
    MEMORY = LOCAL_PYTHON_QUEUE
    SQLITE = PERSISTQUEUE


class ConcurrentModeEnum(IntEnum):
    __str__ = int.__repr__

    THREADING = 1
    GEVENT = 2
    EVENTLET = 3
    ASYNC = 4
    SINGLE_THREAD = 5  # funboost's: one call at a time, one message taken at a time (concurrent_num 1)
    SOLO = SINGLE_THREAD
