"""REDIS_STREAM: a Redis stream read through a consumer group, with XACK and heartbeats.

Guarantee: at-least-once. Consumers read with ``XREADGROUP`` in the group ``funboost_like``
(created at id 0 with ``MKSTREAM`` on first use, so entries added before it are delivered too);
Redis keeps each delivered entry in the group's pending list (PEL) under the reading consumer until
it is acked (``XACK`` + ``XDEL``), nacked, released or dead-lettered. Consumers heartbeat and sweep
as described in :mod:`funboost_like.brokers.redis_consumers`: the pending entries of a consumer
silent for ``dead_after`` seconds (15), or of a group consumer that is in no heartbeat record and
idle that long, are added again at the end of the stream (counting an attempt and a crash) and
acked; so a consumer killed with SIGKILL has its messages delivered again at most 20 s after its
death with the defaults. A call may run far longer: the heartbeat is per consumer, not per
entry. Durability across a Redis restart is Redis's own persistence setting (AOF/RDB).

Acked entries are deleted (``XDEL``), so the stream holds only waiting and in-flight entries and
does not grow without bound. ``MAXLEN`` trimming is not used: it drops the oldest entries whether
or not the group has read or acknowledged them, which would lose messages. So the stream belongs to
this group: another consumer group on the same key would miss the entries deleted on ack.

Settings: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``, environment variable
``FUNBOOST_LIKE_REDIS_URL``), read at first use, never at import; passwords never reach a log.
``REDIS_HEARTBEAT_SECONDS`` and ``REDIS_DEAD_AFTER_SECONDS`` (or ``RedisStreamBroker(
heartbeat_interval=..., dead_after=...)``): give every consumer of a queue the same values. Needs
Redis 6.2 or newer.

Capabilities: sweep redelivery, persistent (as far as Redis persists), delay, cross-process,
cross-host, dead letters, emulated routing (exchanges and routing keys: a routed publish ``XADD``s to
every matching stream in one Lua script, see :mod:`funboost_like.brokers.redis_base`). No priority:
a stream is one ordered log (use REDIS_ACK_ABLE for priorities). Attempts: 1 for a first read plus
the field ``delivered`` that a nack, a release or a crash recovery writes into the entry it adds
again; crashes: its field ``crashes``.

Cross-language contract: the stream's key is exactly the queue name and the body is the field
``data``: another program publishes by ``XADD <queue> * data <json text>``. An entry without a
``data`` field is moved to the dead letters at once (with its fields as the body). The other keys
share the queue name as a Redis Cluster hash tag: ``fl:{<queue>}:consumers`` (ZSET consumer name ->
last heartbeat, server time), ``fl:{<queue>}:delayed`` (moved into the stream by a fetch once due)
and ``fl:{<queue>}:dead`` (see :mod:`funboost_like.brokers.redis_base`).

Fetching: one pipeline of ``TIME``, ``ZRANGE <delayed> 0 0 WITHSCORES`` and ``XREADGROUP COUNT
max_n`` (a consumer's acks ride ahead of it in the same write: one round trip per batch); a small
Lua script moves delayed messages into the stream only when the first one is due. An idle fetch
waits with ``XREAD BLOCK`` from the group's last delivered id on its own connection, which returns
when an undelivered entry arrives without taking it. The entries of a fetch whose reply was lost
are read again from this consumer's own pending list by the next fetch.

Order: FIFO; a nacked, released or recovered message is added again at the end (a stream cannot be
prepended to), a delayed one when due.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

from redis.connection import AbstractConnection
from redis.exceptions import ResponseError

from funboost_like.brokers.base import Capabilities, DeadLetter, Delivery
from funboost_like.brokers.redis_base import BLOCK_SECONDS, check_queue_name
from funboost_like.brokers.redis_common import (
    DirectConnections,
    Piggyback,
    pack_command,
    raise_first_error,
)
from funboost_like.brokers.redis_consumers import RedisConsumers
from funboost_like.brokers.redis_stream_scripts import (
    COUNT,
    GROUP,
    HEAD,
    IN_FLIGHT,
    MOVE_DUE,
    PURGE,
    SCRIPTS,
    SETTLE,
)
from funboost_like.core import codec
from funboost_like.core.enums import BrokerEnum

logger = logging.getLogger("funboost_like.redis")

MAX_BATCH = 1000  # entries per fetch
PUBLISH_CHUNK = 10_000  # XADDs per round trip in publish_many...
PACK_CHUNK = 500  # ... written this many at a time, so Redis works while the rest is packed
_DATA = b"data"


def _entries(read: Any) -> list[Any]:
    """The entries of an XREADGROUP reply on one stream: a map in RESP3, ``[[stream, entries]]`` in RESP2."""
    return list(next(iter(read.values()))) if isinstance(read, dict) else list(read[0][1])


def _fields(item: Any) -> dict[Any, Any]:
    return item if isinstance(item, dict) else dict(zip(item[::2], item[1::2], strict=True))


class RedisStreamBroker(RedisConsumers):
    """At-least-once Redis stream broker; see the module docstring for keys, timing and the wire contract."""

    kind = BrokerEnum.REDIS_STREAM
    capabilities = Capabilities(redelivery="sweep", delay="native", dead_letters=True, key_value=True,
                                routing="emulated", persistent=True, cross_process=True, cross_host=True,
                                release_front=False, queue_names=check_queue_name)
    _scripts = SCRIPTS
    _give_back_script = SETTLE
    _ready_type = "stream"

    def _open(self, queue: str) -> None:
        """Create the group (and the stream) unless it exists."""
        try:
            self._conn().execute_command("XGROUP", "CREATE", queue, GROUP, "0", "MKSTREAM")
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    # -- publishing --------------------------------------------------------------------------------
    def _push(self, queue: str, bodies: Sequence[bytes], level: int) -> None:
        conn = self._conn()
        if len(bodies) == 1:
            conn.execute_command("XADD", queue, "*", _DATA, bodies[0], spin=True)
        else:  # plain XADDs packed by hand: a Lua script adding a batch costs Redis 2.5 times as much
            name = queue.encode("utf-8")
            head = b"*5\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n*\r\n$4\r\ndata\r\n" % (len(name), name)

            def packets(chunk: Sequence[bytes]) -> Iterator[bytes]:
                for start in range(0, len(chunk), PACK_CHUNK):
                    yield b"".join([b"%s$%d\r\n%s\r\n" % (head, len(body), body)
                                    for body in chunk[start:start + PACK_CHUNK]])

            for start in range(0, len(bodies), PUBLISH_CHUNK):
                chunk = bodies[start:start + PUBLISH_CHUNK]
                raise_first_error(conn.send_packets(packets(chunk), len(chunk)))

    # -- consuming ---------------------------------------------------------------------------------
    def _fetch(self, before: Piggyback | None, queue: str, max_n: int) -> list[Delivery]:
        conn = self._conn()
        n = min(max_n, MAX_BATCH)
        try:
            got, due_ms = self._read(conn, queue, n, before)
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            self._open(queue)  # the stream was deleted (or the server restarted empty): create the group again
            got, due_ms = self._read(conn, queue, n, None)
        if not got:
            self._due_in(queue, due_ms)
        return got

    def _read(self, conn: DirectConnections, queue: str, n: int,
              before: Piggyback | None) -> tuple[list[Delivery], int]:
        """One round trip (``before`` rides along): the server's clock, the first delayed message and
        ``XREADGROUP``; a second one only when a delayed message is due. Returns the deliveries and
        the milliseconds until the next delayed message is due (-1: none)."""
        keys = self._queue_keys(queue)
        packet = keys.packets.get((self._cid, n))
        if packet is None:  # the same bytes for every read of n entries: packed once
            packet = keys.packets[(self._cid, n)] = b"".join([
                pack_command("TIME"), pack_command("ZRANGE", keys.delayed, 0, 0, "WITHSCORES"),
                pack_command("XREADGROUP", "GROUP", GROUP, self._cid, "COUNT", n, "STREAMS", queue, ">")])
        now, first, read = raise_first_error(conn.send_packets((packet,), 3, before))
        got = self._deliveries(queue, _entries(read)) if read else []
        if not first:
            return got, -1
        score = float(first[0][1] if isinstance(first[0], list) else first[1])  # RESP3 nests the pair
        due_ms = math.ceil((score - (int(now[0]) + int(now[1]) / 1e6)) * 1000)
        if due_ms > 0:
            return got, due_ms
        due_ms = int(MOVE_DUE(conn, [queue, keys.delayed], []))
        if len(got) < n:
            read = conn.execute_command("XREADGROUP", "GROUP", GROUP, self._cid, "COUNT", n - len(got),
                                        "STREAMS", queue, ">")
            if read:
                got.extend(self._deliveries(queue, _entries(read)))
        return got, due_ms

    def _adopt(self, before: Piggyback | None, queue: str, held: set[Any]) -> list[Delivery]:
        """This consumer's own pending entries (``XREADGROUP ... 0``) that this process does not hold."""
        try:
            read = self._conn().execute_command("XREADGROUP", "GROUP", GROUP, self._cid, "STREAMS", queue, "0",
                                                before=before)
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            self._open(queue)  # the server restarted empty: nothing is pending, the group is made again
            return []
        entries = [entry for entry in _entries(read) if entry[1] is not None and entry[0] not in held] if read else []
        return self._deliveries(queue, entries)

    def _deliveries(self, queue: str, entries: list[Any]) -> list[Delivery]:
        plain = [Delivery(queue, fields[1], entry_id) for entry_id, fields in entries
                 if len(fields) == 2 and fields[0] == _DATA]
        if len(plain) == len(entries):  # the usual case: entries that each hold just the field 'data'
            return plain
        result = []
        for entry_id, fields in entries:
            values = _fields(fields)
            if _DATA not in values:
                text = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in values.items()}
                letter = DeadLetter(queue, codec.dumps(text), "stream entry has no 'data' field", time.time(), 1)
                self._give_back([Delivery(queue, b"", entry_id)], "dead", 0.0, letter.envelope())
                logger.warning("queue %r: dead-lettered stream entry %r without a 'data' field", queue, entry_id)
                continue
            result.append(Delivery(queue, values[_DATA], entry_id, int(values.get(b"delivered", 0)) + 1, 0,
                                   int(values.get(b"crashes", 0))))
        return result

    def _wait(self, queue: str, timeout: float) -> None:
        """``XREAD BLOCK`` from the group's last delivered id: it returns when an entry arrives that no
        consumer has read yet (there is none now: the fetch before found nothing), taking nothing."""
        def command(connection: AbstractConnection) -> bytes:
            connection.send_packed_command([pack_command("XINFO", "GROUPS", queue)], check_health=False)
            last = next((info[b"last-delivered-id"] for info in map(_fields, connection.read_response())
                         if info.get(b"name") == GROUP.encode()), b"$")
            return pack_command("XREAD", "COUNT", 1, "BLOCK", BLOCK_SECONDS * 1000, "STREAMS", queue, last)

        self._wait_for(queue, timeout, command)

    # -- settling ----------------------------------------------------------------------------------
    def _ack_commands(self, deliveries: Sequence[Delivery]) -> list[tuple[Any, ...]]:
        ids: dict[str, list[Any]] = {}
        for delivery in deliveries:
            ids.setdefault(delivery.queue, []).append(delivery.token)
        return [command for queue, group in ids.items() for command in (("XACK", queue, GROUP, *group),
                                                                        ("XDEL", queue, *group))]

    def _acked(self, replies: list[Any], total: int) -> int:
        return sum(replies[::2])

    def _in_flight_item(self, delivery: Delivery) -> tuple[Any, ...]:
        return delivery.queue, delivery.token

    # -- inspection --------------------------------------------------------------------------------
    def in_flight(self, queue: str) -> int:
        """Entries of ``queue`` delivered to any consumer of the group and not yet acked."""
        return int(self._guard(f"counting in-flight entries of {queue!r}", IN_FLIGHT, self._conn(), [queue], [GROUP]))

    def _size(self, queue: str) -> int:
        return int(COUNT(self._conn(), [queue, self._queue_keys(queue).delayed], [GROUP]))

    def _heads(self, queue: str) -> list[bytes]:
        return [bytes(data) for data in HEAD(self._conn(), [queue], [GROUP])]

    def _purge(self, queue: str) -> int:
        """Delete the delayed messages and the entries no consumer has read yet; in-flight ones stay."""
        return int(PURGE(self._conn(), [queue, self._queue_keys(queue).delayed], [GROUP]))
