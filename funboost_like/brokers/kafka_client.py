"""What a Kafka client library supplies to :mod:`.kafka_base`, and what is read from the log through it.

:class:`KafkaClient` and :class:`GroupConsumer` are the whole interface: ``kafka_python.py`` and
``kafka_confluent.py`` implement them, the rules live in :class:`~.kafka_base.KafkaBroker`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

Produce = tuple[bytes, dict[str, str] | None, int | None]  # (value, headers, partition)
END = -1  # in the ``until`` of :meth:`KafkaClient.read`: as far as the log goes


class Record(NamedTuple):
    partition: int
    offset: int
    value: bytes
    headers: Mapping[str, str]

    @classmethod
    def of(cls, partition: int, offset: int, value: bytes | None, pairs: Any) -> Record:
        """A record from a client's message: header values decoded (a missing one as ""); a record
        without headers shares one read-only mapping (most records: no dict made per record)."""
        headers = {key: data.decode() if isinstance(data, bytes) else "" for key, data in pairs} if pairs else _NONE
        return cls(partition, offset, value or b"", headers)


_NONE: Mapping[str, str] = MappingProxyType({})


class GroupConsumer:
    """A consumer group member subscribed to one topic. Used by one thread at a time (the fetcher)."""

    def poll(self, max_n: int, timeout: float) -> list[Record]:
        raise NotImplementedError

    def commit(self, offsets: dict[int, int]) -> bool:
        """Commit as a member of the group, synchronously; False when the group fenced this member off
        (a rebalance it missed: unknown member, old generation), so nothing was committed and the next
        poll joins the group again."""
        raise NotImplementedError

    def committed(self, partitions: list[int]) -> dict[int, int]:
        """The group's committed offsets (-1: none)."""
        raise NotImplementedError

    def seek(self, partition: int, offset: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


Listener = Callable[[list[int]], None]


class KafkaClient:
    """What a Kafka client library must supply; every method may be called from any thread."""

    def produce(self, topic: str, items: Sequence[Produce]) -> None:
        """Append ``items``; return once the server acknowledged every one."""
        raise NotImplementedError

    def create_topic(self, topic: str, partitions: int) -> bool:
        """Create ``topic`` (an existing one is fine); False when the server cannot create topics."""
        raise NotImplementedError

    def partitions(self, topic: str) -> list[int]:
        raise NotImplementedError

    def watermarks(self, topic: str, partitions: list[int]) -> dict[int, tuple[int, int]]:
        raise NotImplementedError

    def group_offsets(self, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
        """A group's committed offsets (-1: none), read from outside the group."""
        raise NotImplementedError

    def commit_offsets(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        """Commit for a group this process is no member of (a mark, or a purge)."""
        raise NotImplementedError

    def read(self, topic: str, starts: dict[int, int], until: dict[int, int], timeout: float) -> list[Record]:
        """Records from ``starts`` until each partition reached ``until`` (exclusive; :data:`END`: until a
        poll finds nothing more), or ``timeout``: :func:`collect` over the client's own poll."""
        raise NotImplementedError

    def group_consumer(self, topic: str, group: str, on_assign: Listener, on_revoke: Listener) -> GroupConsumer:
        """A member of ``group`` on ``topic``; ``on_revoke`` runs inside ``poll`` before partitions move."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def wanted(starts: dict[int, int], until: dict[int, int]) -> list[int]:
    """The partitions a :meth:`KafkaClient.read` must assign."""
    return [p for p, start in starts.items() if until.get(p, 0) == END or until.get(p, 0) > start]


def collect(poll: Callable[[float], list[Record]], starts: dict[int, int], until: dict[int, int],
            timeout: float) -> list[Record]:
    """What :meth:`KafkaClient.read` returns, from a client's ``poll(seconds)`` of assigned partitions."""
    records: list[Record] = []
    missing, seen = set(wanted(starts, until)), set()
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        got = poll(0.1)
        for record in got:
            records.append(record)
            seen.add(record.partition)
            end = until.get(record.partition, 0)
            if end != END and record.offset + 1 >= end:
                missing.discard(record.partition)
        if not got:  # nothing more came: the partitions read to their end are there
            missing -= {p for p in seen if until.get(p, 0) == END}
    return records


def log_ends(client: KafkaClient, topic: str) -> dict[int, tuple[int, int]]:
    """{partition: (low, end)}. A server may report less than the end (Tansu: an older batch's base
    offset): the log is read on from the reported end, so records past it count."""
    marks = client.watermarks(topic, client.partitions(topic))
    peek = {p: high - 1 for p, (low, high) in marks.items() if high > low}
    for record in client.read(topic, peek, dict.fromkeys(peek, END), 5.0) if peek else []:
        low, high = marks[record.partition]
        marks[record.partition] = (low, max(high, record.offset + 1))
    return marks


def log_span(client: KafkaClient, topic: str, group: str) -> tuple[dict[int, int], dict[int, int]]:
    """(first offset not consumed by ``group``, end) of every non-empty partition of ``topic``."""
    marks = log_ends(client, topic)
    committed = client.group_offsets(group, topic, list(marks))
    starts = {p: max(committed.get(p, -1), low) for p, (low, _) in marks.items()}
    return starts, {p: high for p, (_, high) in marks.items() if high > starts[p]}

