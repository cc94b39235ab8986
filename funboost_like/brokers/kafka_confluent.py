"""CONFLUENT_KAFKA: Kafka through confluent-kafka (librdkafka); the rules are those of :mod:`.kafka_base`.

Guarantee: at-least-once (see :mod:`~funboost_like.brokers.kafka_base` and docs/kafka.md). Settings:
``KAFKA_BOOTSTRAP_SERVERS``, ``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_MECHANISM``,
``KAFKA_SASL_USERNAME``, ``KAFKA_SASL_PASSWORD`` (never logged), ``KAFKA_SESSION_TIMEOUT_SECONDS``.
librdkafka's own log lines go to the logger ``funboost_like.kafka.librdkafka``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

try:
    from confluent_kafka import ConsumerGroupTopicPartitions
except ImportError:  # older releases keep it in confluent_kafka.admin
    from confluent_kafka.admin import ConsumerGroupTopicPartitions  # type: ignore[attr-defined,no-redef]

from funboost_like.brokers.kafka_base import KafkaBroker
from funboost_like.brokers.kafka_client import GroupConsumer, KafkaClient, Listener, Produce, Record, collect, wanted
from funboost_like.core.config import settings
from funboost_like.core.enums import BrokerEnum

_log = logging.getLogger("funboost_like.kafka.librdkafka")
_FENCED = (KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS,
           KafkaError.FENCED_INSTANCE_ID)
TIMEOUT = 10.0


def base_config() -> dict[str, Any]:
    """librdkafka settings shared by every client: servers, security, logging."""
    config: dict[str, Any] = {"bootstrap.servers": str(settings.get("KAFKA_BOOTSTRAP_SERVERS")), "logger": _log,
                              "security.protocol": str(settings.get("KAFKA_SECURITY_PROTOCOL")).lower()}
    if settings.get("KAFKA_SASL_USERNAME"):
        config.update({"sasl.mechanism": settings.get("KAFKA_SASL_MECHANISM"),
                       "sasl.username": settings.get("KAFKA_SASL_USERNAME"),
                       "sasl.password": settings.get("KAFKA_SASL_PASSWORD")})
    return config


def _record(message: Message) -> Record:
    return Record.of(message.partition() or 0, message.offset() or 0, message.value(), message.headers())


class _Member(GroupConsumer):
    def __init__(self, topic: str, group: str, on_assign: Listener, on_revoke: Listener) -> None:
        session = float(settings.get("KAFKA_SESSION_TIMEOUT_SECONDS"))
        self.topic = topic
        self.consumer = Consumer({
            **base_config(), "group.id": group, "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "session.timeout.ms": int(session * 1000), "heartbeat.interval.ms": int(min(1000, session * 250)),
            "max.poll.interval.ms": 3_600_000, "fetch.wait.max.ms": 100, "enable.partition.eof": False,
            "allow.auto.create.topics": True})  # where the server cannot create them (the mock cluster)
        self.consumer.subscribe([topic], on_assign=lambda _, parts: on_assign([p.partition for p in parts]),
                                on_revoke=lambda _, parts: on_revoke([p.partition for p in parts]),
                                on_lost=lambda _, parts: on_revoke([p.partition for p in parts]))

    def poll(self, max_n: int, timeout: float) -> list[Record]:
        records = []
        for message in self.consumer.consume(max_n, timeout):
            error = message.error()
            if error is None:
                records.append(_record(message))
            elif error.code() != KafkaError._PARTITION_EOF:
                _log.warning("consuming %s: %s", self.topic, error.str())
        return records

    def commit(self, offsets: dict[int, int]) -> bool:
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()],
                                 asynchronous=False)
        except KafkaException as exc:
            code = exc.args[0].code()
            if code in _FENCED:
                return False
            if code != KafkaError._NO_OFFSET:
                raise
        return True

    def committed(self, partitions: list[int]) -> dict[int, int]:
        found = self.consumer.committed([TopicPartition(self.topic, p) for p in partitions], timeout=TIMEOUT)
        return {tp.partition: tp.offset if tp.offset >= 0 else -1 for tp in found}

    def seek(self, partition: int, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(self.topic, partition, offset))
        except KafkaException as exc:  # not fetching yet: the committed offset is used then
            _log.debug("seek on %s[%d] skipped: %s", self.topic, partition, exc)

    def close(self) -> None:
        self.consumer.close()


class ConfluentClient(KafkaClient):
    def __init__(self) -> None:
        self.producer = Producer({**base_config(), "linger.ms": 2, "acks": "all"})
        self.admin = AdminClient(base_config())
        self.reader = Consumer({**base_config(), "group.id": "funboost_like.reader", "enable.auto.commit": False,
                                "fetch.wait.max.ms": 10,
                                "enable.partition.eof": False})
        self.reader_lock = threading.Lock()

    def produce(self, topic: str, items: Sequence[Produce]) -> None:
        failures: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failures.append(error)

        producer = self.producer
        for value, headers, partition in items:
            extra: dict[str, Any] = {} if partition is None else {"partition": partition}
            while True:
                try:
                    producer.produce(topic, value, headers=dict(headers) if headers else None, on_delivery=delivered,
                                     **extra)
                    break
                except BufferError:  # the local queue is full: let it drain
                    producer.poll(0.05)
        if producer.flush(TIMEOUT * 3):
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "publishing timed out"))
        if failures:
            raise KafkaException(failures[0])

    def create_topic(self, topic: str, partitions: int) -> bool:
        found = self.admin.list_topics(timeout=TIMEOUT)
        if found.controller_id not in found.brokers:  # no controller to create topics (the mock cluster)
            return False
        future = self.admin.create_topics([NewTopic(topic, partitions, 1)], request_timeout=3.0)[topic]
        try:
            future.result(TIMEOUT)
        except KafkaException as exc:
            code = exc.args[0].code()
            if code == KafkaError.TOPIC_ALREADY_EXISTS:
                return True
            if code in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError.INVALID_REQUEST):
                return False
            raise
        return True

    def partitions(self, topic: str) -> list[int]:
        found = self.admin.list_topics(topic, timeout=TIMEOUT).topics.get(topic)
        if found is None or found.error is not None:
            return []
        return list(found.partitions)

    def watermarks(self, topic: str, partitions: list[int]) -> dict[int, tuple[int, int]]:
        with self.reader_lock:
            return {p: self.reader.get_watermark_offsets(TopicPartition(topic, p), timeout=TIMEOUT, cached=False)
                    for p in partitions}

    def group_offsets(self, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
        if not partitions:
            return {}
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
        result = self.admin.list_consumer_group_offsets([request], request_timeout=TIMEOUT)[group].result(TIMEOUT)
        return {tp.partition: tp.offset if tp.offset >= 0 else -1 for tp in result.topic_partitions}

    def commit_offsets(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p, o) for p, o in offsets.items()])
        result = self.admin.alter_consumer_group_offsets([request], request_timeout=TIMEOUT)[group].result(TIMEOUT)
        for tp in result.topic_partitions:
            if tp.error is not None:
                raise KafkaException(tp.error)

    def read(self, topic: str, starts: dict[int, int], until: dict[int, int], timeout: float) -> list[Record]:
        def poll(seconds: float) -> list[Record]:
            return [_record(m) for m in self.reader.consume(1000, seconds) if m.error() is None]

        partitions = wanted(starts, until)
        if not partitions:
            return []
        with self.reader_lock:
            self.reader.assign([TopicPartition(topic, p, starts[p]) for p in partitions])
            try:
                return collect(poll, starts, until, timeout)
            finally:
                self.reader.unassign()

    def group_consumer(self, topic: str, group: str, on_assign: Listener, on_revoke: Listener) -> GroupConsumer:
        return _Member(topic, group, on_assign, on_revoke)

    def close(self) -> None:
        self.producer.flush(TIMEOUT)
        self.reader.close()


class ConfluentKafkaBroker(KafkaBroker):
    """CONFLUENT_KAFKA: at-least-once Kafka through confluent-kafka; see :mod:`.kafka_base`."""

    kind = BrokerEnum.CONFLUENT_KAFKA
    connection_errors = (KafkaException,)

    def _new_client(self) -> KafkaClient:
        return ConfluentClient()
