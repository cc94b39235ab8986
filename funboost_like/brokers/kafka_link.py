"""One acknowledged record on the caller's thread: the fast path of a ``push`` on KAFKA (kafka-python).

kafka-python's ``KafkaProducer.send(...).get()`` hands every record to the producer's I/O thread and
back: two thread hand-offs per record on top of the server's round trip, which held a one-by-one push
near 900/s on the 2-core VM of docs/performance.md where the round trip alone allows 2,000-3,000/s.
A :class:`ProduceLink` writes the ProduceRequest (acks=all, one record batch of one record, encoded with
kafka-python's own protocol classes) to the partition leader's socket from the calling thread and reads
the response there, polling the socket for up to ``SPIN_SECONDS`` first (:mod:`.socket_spin`; not while
other threads want the link). What ``push``
guarantees stays the same: it returns once the server acknowledged the record, and an error of the
server raises from that push.

It is a fast path only; the producer stays the way for everything else. :meth:`ProduceLink.produce`
returns False, having sent nothing, when another thread is on the link (threads publishing together
get the producer, which batches them), when the leader is not known yet, when the connection cannot
be made, or for a record the producer refuses (``max_request_size``: it raises its error); then the
caller sends the record through the producer. It returns False too when the
answer is a retriable error (a leader that moved: the metadata is refreshed) or the connection broke
after the request went out: the record is then sent again through the producer, so in that rare
case it may be stored twice, as a retried send of ``publish_many``'s batches may (at-least-once).
Only plain TCP connections (``KAFKA_SECURITY_PROTOCOL`` PLAINTEXT, no SASL) take the link.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import kafka.errors
from kafka import TopicPartition
from kafka.protocol.parser import KafkaProtocol
from kafka.protocol.producer import ProduceRequest
from kafka.record.default_records import DefaultRecordBatchBuilder

from funboost_like.brokers.socket_spin import Sharing, spin_until_readable

SPIN_SECONDS = 0.001
"""How long a push polls the leader's socket for its answer before a blocking read (0: block at once)."""
_DATA = ProduceRequest.TopicProduceData


class ProduceLink:
    """Plain-TCP connections to partition leaders, each used by one thread at a time (see the module)."""

    def __init__(self, metadata: Any, version: int, timeout_ms: int, max_bytes: int) -> None:
        self._metadata = metadata  # the producer's ClusterMetadata: leaders and their addresses
        self._version, self._timeout_ms, self._max_bytes = version, timeout_ms, max_bytes
        self._lock = threading.Lock()
        self._sharing = Sharing()  # polls for the answer only while no other thread wanted the link lately
        self._sockets: dict[int, tuple[socket.socket, KafkaProtocol]] = {}  # leader id -> its connection

    def produce(self, topic: str, partition: int, value: bytes, headers: list[tuple[str, bytes]]) -> bool:
        """Append one record to ``topic[partition]`` and wait for its acknowledgement: True once stored;
        False when the producer must send it instead (see the module). Raises a non-retriable error the
        server answered with."""
        if len(value) >= self._max_bytes:  # the producer's limit: it raises its error
            return False
        if not self._lock.acquire(blocking=False):
            self._sharing.alone(2)
            return False
        try:
            leader = self._metadata.leader_for_partition(TopicPartition(topic, partition))
            link = self._connection(leader) if leader is not None and leader >= 0 else None
            if link is None:
                return False
            batch = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                              producer_epoch=-1, base_sequence=-1, batch_size=0)  # one record
            batch.append(0, int(time.time() * 1000), None, value, headers)
            request = ProduceRequest[self._version](
                transactional_id=None, acks=-1, timeout_ms=self._timeout_ms,
                topic_data=[_DATA(name=topic, partition_data=[_DATA.PartitionProduceData(
                    index=partition, records=bytes(batch.build()))])])
            code = self._exchange(leader, link, request)
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

    def _connection(self, leader: int) -> tuple[socket.socket, KafkaProtocol] | None:
        link = self._sockets.get(leader)
        if link is None:
            broker = self._metadata.broker_metadata(leader)
            if broker is None:
                return None
            try:
                sock = socket.create_connection((broker.host, broker.port), self._timeout_ms / 1000 + 5)
            except OSError:
                return None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = self._sockets[leader] = (sock, KafkaProtocol(client_id="funboost_like"))
        return link

    def _exchange(self, leader: int, link: tuple[socket.socket, KafkaProtocol], request: Any) -> int | None:
        """Send ``request`` and read its response: the partition's error code, None on a broken connection."""
        sock, protocol = link
        try:
            protocol.send_request(request)
            sock.sendall(protocol.send_bytes())
            if self._sharing.alone(1):
                spin_until_readable(sock, SPIN_SECONDS)
            while True:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                responses = protocol.receive_bytes(data)
                if responses:
                    break
        except (OSError, kafka.errors.KafkaError):
            self._drop(leader)
            return None
        codes = [part.error_code for answer in responses[0][1].responses for part in answer.partition_responses]
        return codes[0] if len(codes) == 1 else -1

    def _drop(self, leader: int) -> None:
        link = self._sockets.pop(leader, None)
        if link is not None:
            link[0].close()

    def close(self) -> None:
        with self._lock:
            for leader in list(self._sockets):
                self._drop(leader)
