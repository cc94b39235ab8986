"""KAFKA: Kafka through kafka-python; the rules are those of :mod:`.kafka_base`.

Guarantee: at-least-once, unlike the seed's kind 8 (see :mod:`~funboost_like.brokers.kafka_base`
and docs/kafka.md). Settings: ``KAFKA_BOOTSTRAP_SERVERS``, ``KAFKA_SECURITY_PROTOCOL``,
``KAFKA_SASL_MECHANISM``, ``KAFKA_SASL_USERNAME``, ``KAFKA_SASL_PASSWORD`` (never logged),
``KAFKA_SESSION_TIMEOUT_SECONDS``, ``KAFKA_API_VERSION`` (empty: asked from the server; "2.0" for a
server whose version answer kafka-python cannot read, such as librdkafka's mock cluster),
``KAFKA_BOOTSTRAP_TIMEOUT_SECONDS`` (how long a new client waits for its first contact with the cluster:
kafka-python's ``bootstrap_timeout_ms``, 30 s by its default, which a push to a cluster that is down waited
out; a client that has made contact reconnects by itself, without that bound).

kafka-python's consumer is not thread-safe, and moves a group join on only while it polls: the base
uses a queue's group member from the queue's fetching thread only (acks are bookkeeping; commits go
out with the next fetch), its delay group's member from the mover thread only, and the reader used
by ``count`` and dead-letter listing under a lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import kafka.errors
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.protocol.producer import ProduceRequest
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.structs import OffsetAndMetadata

from funboost_like.brokers import client_logs
from funboost_like.brokers.kafka_base import KafkaBroker
from funboost_like.brokers.kafka_client import GroupConsumer, KafkaClient, Listener, Produce, Record, collect, wanted
from funboost_like.brokers.kafka_link import VERSIONS, ProduceLink
from funboost_like.core.config import settings
from funboost_like.core.enums import BrokerEnum

TIMEOUT_MS = 10_000
JOINING_POLL = 0.05  # seconds a poll waits while the group join is under way
BATCH_BYTES = 900_000  # under the 1 MiB a server takes in one record batch by default (message.max.bytes)
BATCH_FROM = 8  # this many records for one partition go out as record batches we build (see produce)


def base_config() -> dict[str, Any]:
    """kafka-python settings shared by every client: servers, security, protocol version."""
    client_logs.quiet("kafka")
    bootstrap = float(settings.get("KAFKA_BOOTSTRAP_TIMEOUT_SECONDS"))  # a new client's wait for the first contact
    config: dict[str, Any] = {"bootstrap_servers": str(settings.get("KAFKA_BOOTSTRAP_SERVERS")).split(","),
                              "security_protocol": str(settings.get("KAFKA_SECURITY_PROTOCOL")),
                              "bootstrap_timeout_ms": int(bootstrap * 1000)}
    if settings.get("KAFKA_SASL_USERNAME"):
        config.update({"sasl_mechanism": settings.get("KAFKA_SASL_MECHANISM"),
                       "sasl_plain_username": settings.get("KAFKA_SASL_USERNAME"),
                       "sasl_plain_password": settings.get("KAFKA_SASL_PASSWORD")})
    version = str(settings.get("KAFKA_API_VERSION"))
    if version:
        config["api_version"] = tuple(int(part) for part in version.split("."))
    return config


def _record(message: Any) -> Record:
    return Record.of(message.partition, message.offset, message.value, message.headers)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_assign: Listener, on_revoke: Listener) -> None:
        self.on_assign, self.on_revoke = on_assign, on_revoke

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.on_revoke([tp.partition for tp in revoked])

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.on_assign([tp.partition for tp in assigned])


class _Member(GroupConsumer):
    def __init__(self, topic: str, group: str, on_assign: Listener, on_revoke: Listener) -> None:
        session = float(settings.get("KAFKA_SESSION_TIMEOUT_SECONDS"))
        self.topic = topic
        self.consumer = KafkaConsumer(
            **base_config(), group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=int(session * 1000), heartbeat_interval_ms=int(min(1000, session * 250)),
            max_poll_interval_ms=3_600_000, fetch_max_wait_ms=100, metrics_enabled=False)
        self.consumer.subscribe([topic], listener=_Listener(on_assign, on_revoke))

    def poll(self, max_n: int, timeout: float) -> list[Record]:
        if not self.consumer.assignment():  # joining: kafka-python moves the join on only while polling
            timeout = max(timeout, JOINING_POLL)
        batches = self.consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_n)
        return [_record(message) for messages in batches.values() for message in messages]

    def commit(self, offsets: dict[int, int]) -> bool:
        try:
            self.consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                                  for p, o in offsets.items()})
        except (kafka.errors.CommitFailedError, kafka.errors.UnknownMemberIdError, kafka.errors.IllegalGenerationError,
                kafka.errors.RebalanceInProgressError):
            return False
        return True

    def committed(self, partitions: list[int]) -> dict[int, int]:
        found = {}
        for partition in partitions:
            offset = self.consumer.committed(TopicPartition(self.topic, partition))
            found[partition] = offset if offset is not None and offset >= 0 else -1
        return found

    def seek(self, partition: int, offset: int) -> None:
        try:
            self.consumer.seek(TopicPartition(self.topic, partition), offset)
        except (AssertionError, kafka.errors.IllegalStateError):  # not assigned any more
            pass

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def _new_batch() -> DefaultRecordBatchBuilder:
    return DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                     producer_epoch=-1, base_sequence=-1, batch_size=BATCH_BYTES)


class KafkaPythonClient(KafkaClient):
    def __init__(self) -> None:
        self.producer = KafkaProducer(**base_config(), linger_ms=2, acks="all", batch_size=1 << 20,
                                      metrics_enabled=False)
        self.admin = KafkaAdminClient(**base_config())
        self.reader = KafkaConsumer(**base_config(), enable_auto_commit=False, fetch_max_wait_ms=100)
        self.reader_lock = threading.Lock()
        self.batches = self.producer.config["api_version"] >= (0, 11)  # record batches need Produce v3
        config = base_config()
        plain = config["security_protocol"] == "PLAINTEXT" and "sasl_mechanism" not in config
        version = self.admin._manager.broker_version_data.api_version(ProduceRequest, *VERSIONS) if self.batches else 0
        self.link = ProduceLink(self.producer._metadata, version, TIMEOUT_MS,
                                self.producer.config["max_request_size"]) if version and plain else None

    def produce(self, topic: str, items: Sequence[Produce]) -> None:
        """Many records for one partition (a ``publish_many`` chunk) go out as record batches built here,
        one ProduceRequest each: ``KafkaProducer.send`` costs about 30 µs per record in Python, which
        caps a publisher near 30,000/s; the batch builder costs 3-4 µs. One record for a partition (a
        ``push``) takes the caller's own connection to the leader when it is free (:mod:`.kafka_link`).
        Anything else, and everything for a server older than Kafka 0.11, goes through the producer."""
        value, headers, one = items[0] if len(items) == 1 else (b"", None, None)
        if one is not None and self.link is not None:
            self.producer.partitions_for(topic)  # the leader's address (metadata cached after the first call)
            if self.link.produce(topic, one, value, [(k, v.encode()) for k, v in headers.items()] if headers else []):
                return
        partition = items[0][2] if len(items) >= BATCH_FROM and self.batches else None
        if partition is not None and all(item[2] == partition for item in items):
            self._produce_batches(topic, partition, items)
            return
        send = self.producer.send
        futures = [send(topic, value, partition=partition,
                        headers=[(k, v.encode()) for k, v in headers.items()] if headers else None)
                   for value, headers, partition in items]
        self.producer.flush(TIMEOUT_MS * 3 / 1000)
        for future in futures:
            future.get(TIMEOUT_MS / 1000)  # raises the error of a failed send

    def _produce_batches(self, topic: str, partition: int, items: Sequence[Produce]) -> None:
        timestamp, batch, offset = int(time.time() * 1000), _new_batch(), 0
        for value, headers, _ in items:
            encoded = [(k, v.encode()) for k, v in headers.items()] if headers else []
            if batch.append(offset, timestamp, None, value, encoded) is None:  # full: send it, start the next
                self._send_batch(topic, partition, batch)
                batch, offset = _new_batch(), 0
                batch.append(offset, timestamp, None, value, encoded)
            offset += 1
        self._send_batch(topic, partition, batch)

    def _send_batch(self, topic: str, partition: int, batch: DefaultRecordBatchBuilder) -> None:
        """One ProduceRequest (acks=all) to the partition's leader; retriable errors (a leader moving, a
        topic not yet known) are tried again with fresh metadata for up to 3 x TIMEOUT_MS."""
        topic_data = ProduceRequest.TopicProduceData
        request = ProduceRequest(transactional_id=None, acks=-1, timeout_ms=TIMEOUT_MS, min_version=3, max_version=9,
                                 topic_data=[topic_data(name=topic, partition_data=[
                                     topic_data.PartitionProduceData(index=partition, records=bytes(batch.build()))])])
        deadline, manager = time.monotonic() + TIMEOUT_MS * 3 / 1000, self.admin._manager
        while True:
            try:
                self.producer.partitions_for(topic)  # metadata of the topic (cached after the first call)
                leader = self.producer._metadata.leader_for_partition(TopicPartition(topic, partition))
                if leader is None or leader < 0:
                    raise kafka.errors.LeaderNotAvailableError(f"no leader for {topic}[{partition}]")
                response = manager.run(manager.send, request, leader)
                codes = [p.error_code for t in response.responses for p in t.partition_responses]
                if codes != [0]:
                    raise kafka.errors.for_code(codes[0] if codes else -1)()
                return
            except kafka.errors.KafkaError as exc:
                if not exc.retriable or time.monotonic() > deadline:
                    raise
                self.producer._metadata.request_update()
                time.sleep(0.1)

    def create_topic(self, topic: str, partitions: int) -> bool:
        try:
            self.admin.create_topics({topic: {"num_partitions": partitions, "replication_factor": 1}},
                                     timeout_ms=3000)
        except kafka.errors.TopicAlreadyExistsError:
            return True
        except (kafka.errors.KafkaTimeoutError, kafka.errors.NotControllerError, kafka.errors.InvalidRequestError,
                kafka.errors.UnknownBrokerIdError):  # no controller to create topics (the mock cluster)
            return False
        return True

    def partitions(self, topic: str) -> list[int]:
        with self.reader_lock:
            return sorted(self.reader.partitions_for_topic(topic) or ())

    def watermarks(self, topic: str, partitions: list[int]) -> dict[int, tuple[int, int]]:
        parts = [TopicPartition(topic, p) for p in partitions]
        if not parts:
            return {}
        with self.reader_lock:
            low, high = self.reader.beginning_offsets(parts), self.reader.end_offsets(parts)
        return {tp.partition: (low[tp], high[tp]) for tp in parts}

    def group_offsets(self, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
        if not partitions:
            return {}
        found = self.admin.list_group_offsets({group: [TopicPartition(topic, p) for p in partitions]})[group]
        return {tp.partition: (meta.offset if meta is not None and meta.offset >= 0 else -1)
                for tp, meta in found.items()}

    def commit_offsets(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        result = self.admin.alter_group_offsets(
            group, {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
        for error in result.values():
            if error is not kafka.errors.NoError:
                raise error()

    def read(self, topic: str, starts: dict[int, int], until: dict[int, int], timeout: float) -> list[Record]:
        reader = self.reader

        def poll(seconds: float) -> list[Record]:
            batches = reader.poll(timeout_ms=int(seconds * 1000), max_records=1000)
            return [_record(message) for messages in batches.values() for message in messages]

        partitions = wanted(starts, until)
        if not partitions:
            return []
        with self.reader_lock:
            reader.assign([TopicPartition(topic, p) for p in partitions])
            for partition in partitions:
                reader.seek(TopicPartition(topic, partition), starts[partition])
            try:
                return collect(poll, starts, until, timeout)
            finally:
                reader.assign([])

    def group_consumer(self, topic: str, group: str, on_assign: Listener, on_revoke: Listener) -> GroupConsumer:
        return _Member(topic, group, on_assign, on_revoke)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.producer.close(TIMEOUT_MS / 1000)
        self.reader.close()
        self.admin.close()


class KafkaPythonBroker(KafkaBroker):
    """KAFKA: at-least-once Kafka through kafka-python; see :mod:`.kafka_base`."""

    kind = BrokerEnum.KAFKA
    connection_errors = (kafka.errors.KafkaConnectionError, kafka.errors.BrokerNotAvailableError,
                         kafka.errors.KafkaTimeoutError, kafka.errors.NodeNotReadyError)
    errors = (kafka.errors.KafkaError,)

    def _new_client(self) -> KafkaClient:
        return KafkaPythonClient()
