"""One acknowledged record on the caller's thread: the fast path of a ``push`` on KAFKA (kafka-python).

kafka-python's ``KafkaProducer.send(...).get()`` hands every record to the producer's I/O thread and
back: two thread hand-offs per record on top of the server's round trip, which held a one-by-one push
near 900/s on the 2-core VM of docs/performance.md where the round trip alone allows 2,000-3,000/s.
A :class:`ProduceLink` writes the ProduceRequest (acks=all, one record batch of one record) to the
partition leader's socket from the calling thread and reads the response there with a blocking read.
(Polling the socket first, as a Redis push does, lost more than it won: Tansu answers in about 300 µs,
and on 2 cores the polling CPU is one that Tansu's threads need.) The request is packed here with
``struct`` (:func:`produce_frame`, versions 3-8): kafka-python's protocol classes take about 60 µs to
build and encode one, a fifth of a loopback round trip to Tansu; the record batch is kafka-python's
own (``DefaultRecordBatchBuilder``, CRC32C included). What ``push`` guarantees stays the same: it
returns once the server acknowledged the record, and an error of the server raises from that push.

It is a fast path only; the producer stays the way for everything else. :meth:`ProduceLink.produce`
returns False, having sent nothing, when another thread is on the link (threads publishing together
get the producer, which batches them), when the leader is not known yet, when the connection cannot
be made, or for a record the producer refuses (``max_request_size``: it raises its error); then the
caller sends the record through the producer. It returns False too when the answer is a retriable
error (a leader that moved: the metadata is refreshed) or the connection broke after the request
went out: the record is then sent again through the producer, so in that rare case it may be stored
twice, as a retried send of ``publish_many``'s batches may (at-least-once). Only plain TCP
connections (``KAFKA_SECURITY_PROTOCOL`` PLAINTEXT, no SASL) take the link.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from typing import Any

import kafka.errors
from kafka import TopicPartition
from kafka.record.default_records import DefaultRecordBatchBuilder

VERSIONS = (3, 8)  # ProduceRequest versions packed here: record batches (3+), not the flexible encoding (9+)
CLIENT_ID = b"funboost_like"
_HEAD = struct.Struct(">ihhih")  # size, api key 0 (Produce), version, correlation id, client id length
_BODY = struct.Struct(">hhiih")  # transactional id (null), acks -1, timeout, 1 topic, topic name length
_PART = struct.Struct(">iii")  # 1 partition, its index, its records' length
_SIZE, _ANSWER, _CODE = struct.Struct(">i"), struct.Struct(">iih"), struct.Struct(">iih")


def produce_frame(version: int, correlation: int, topic: bytes, partition: int, records: bytes,
                  timeout_ms: int) -> bytes:
    """A ProduceRequest (acks=all) of ``records`` for ``topic[partition]``, framed (its size first)."""
    size = (_HEAD.size - 4 + len(CLIENT_ID) + _BODY.size + len(topic) + _PART.size + len(records))
    return b"".join((_HEAD.pack(size, 0, version, correlation, len(CLIENT_ID)), CLIENT_ID,
                     _BODY.pack(-1, -1, timeout_ms, 1, len(topic)), topic, _PART.pack(1, partition, len(records)),
                     records))


def answer_code(frame: bytes | bytearray, correlation: int) -> int:
    """The error code of the one partition a ProduceResponse (versions 3-8, size removed) answers for."""
    got, topics, name = _ANSWER.unpack_from(frame, 0)
    if got != correlation or topics != 1:
        raise kafka.errors.CorrelationIdError(f"answer {got} to request {correlation} ({topics} topics)")
    partitions, _, code = _CODE.unpack_from(frame, _ANSWER.size + name)
    if partitions != 1:
        raise kafka.errors.KafkaProtocolError(f"a ProduceResponse for {partitions} partitions")
    return int(code)


class ProduceLink:
    """Plain-TCP connections to partition leaders, each used by one thread at a time (see the module)."""

    def __init__(self, metadata: Any, version: int, timeout_ms: int, max_bytes: int) -> None:
        self._metadata = metadata  # the producer's ClusterMetadata: leaders and their addresses
        self._version, self._timeout_ms, self._max_bytes = version, timeout_ms, max_bytes
        self._lock = threading.Lock()
        self._sockets: dict[int, socket.socket] = {}  # leader id -> its connection
        self._correlation = itertools.count(1)

    def produce(self, topic: str, partition: int, value: bytes, headers: list[tuple[str, bytes]]) -> bool:
        """Append one record to ``topic[partition]`` and wait for its acknowledgement: True once stored;
        False when the producer must send it instead (see the module). Raises a non-retriable error the
        server answered with."""
        if len(value) >= self._max_bytes:  # the producer's limit: it raises its error
            return False
        if not self._lock.acquire(blocking=False):
            return False
        try:
            leader = self._metadata.leader_for_partition(TopicPartition(topic, partition))
            sock = self._connection(leader) if leader is not None and leader >= 0 else None
            if sock is None:
                return False
            batch = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                              producer_epoch=-1, base_sequence=-1, batch_size=0)  # one record
            batch.append(0, int(time.time() * 1000), None, value, headers)
            correlation = next(self._correlation) & 0x7FFFFFFF
            frame = produce_frame(self._version, correlation, topic.encode(), partition, bytes(batch.build()),
                                  self._timeout_ms)
            code = self._exchange(leader, sock, frame, correlation)
        finally:
            self._lock.release()
        if code is None:
            return False
        if code:
            error = kafka.errors.for_code(code)
            if error.retriable:
                self._metadata.request_update()
                return False
            raise error(f"publishing to {topic}[{partition}]")
        return True

    def _connection(self, leader: int) -> socket.socket | None:
        sock = self._sockets.get(leader)
        if sock is None:
            broker = self._metadata.broker_metadata(leader)
            if broker is None:
                return None
            try:
                sock = socket.create_connection((broker.host, broker.port), self._timeout_ms / 1000 + 5)
            except OSError:
                return None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets[leader] = sock
        return sock

    def _exchange(self, leader: int, sock: socket.socket, frame: bytes, correlation: int) -> int | None:
        """Send ``frame`` and read its answer: the partition's error code, None on a broken connection."""
        try:
            sock.sendall(frame)
            data = bytearray()
            while len(data) < 4 or len(data) < 4 + _SIZE.unpack_from(data)[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                data += chunk
            if len(data) != 4 + _SIZE.unpack_from(data)[0]:
                raise kafka.errors.KafkaProtocolError("more bytes than one answer")
            return answer_code(data[4:], correlation)
        except (OSError, struct.error, kafka.errors.KafkaError):
            self._drop(leader)
            return None

    def _drop(self, leader: int) -> None:
        sock = self._sockets.pop(leader, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        with self._lock:
            for leader in list(self._sockets):
                self._drop(leader)
