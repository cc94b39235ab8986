"""REDIS_STREAM: a Redis stream read through a consumer group, with XACK and reclaiming of stale entries.

Guarantee: at-least-once. Consumers read with ``XREADGROUP`` in the group ``funboost_like``
(created at id 0 with ``MKSTREAM`` on first use, so entries added before it are delivered too);
Redis keeps each delivered entry in the group's pending list (PEL) under the reading consumer
until :meth:`ack` (``XACK`` + ``XDEL``), :meth:`nack`, :meth:`release` or :meth:`dead_letter`.
Every broker instance (one per process; a forked child gets a new identity) is a consumer with a
unique name. A daemon thread renews the entries the process holds every ``min_idle / 4`` seconds
(``XCLAIM ... JUSTID`` to itself, which resets their idle time without counting a delivery), so a
call may run far longer than ``min_idle``. Fetches reclaim (``XAUTOCLAIM``) entries idle for
``min_idle`` seconds, at most every ``min_idle / 4`` seconds per queue. So the entries of a
consumer killed with SIGKILL are delivered again at most ``1.25 * min_idle`` seconds after it died
(75 s with the default 60 s), provided some consumer of the queue runs. A consumer that stalls
longer than ``min_idle`` (SIGSTOP, a debugger) loses its entries to the others (they run again:
at-least-once); its later nacks, releases and dead-letterings do nothing and raise
:class:`~funboost_like.core.errors.DoubleAckError` (they check the entry is still its own); a late
ack still acknowledges the entry for the group. Durability across a Redis restart is Redis's own
persistence setting (AOF/RDB).

Acked entries are deleted (``XDEL``), so the stream holds only waiting and in-flight entries and
does not grow without bound. ``MAXLEN`` trimming is not used: it drops the oldest entries whether
or not the group has read or acknowledged them, which would lose messages. So the stream belongs to
this group: another consumer group on the same key would miss the entries deleted on ack.

Settings: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``, environment variable
``FUNBOOST_LIKE_REDIS_URL``), read at first use, never at import; passwords never reach a log.
``REDIS_STREAM_MIN_IDLE_SECONDS`` (default 60; or ``RedisStreamBroker(min_idle=...)``): give every
consumer of a queue the same value. Needs Redis 6.2 or newer (``XAUTOCLAIM``); Redis 7 also drops
deleted entries from the pending list during ``XAUTOCLAIM``.

Capabilities: ack, persistent (as far as Redis persists), delay, cross-process, cross-host, dead
letters. No priority: a stream is one ordered log, and reading several streams at once would not
give a strict order between levels (use REDIS_ACK_ABLE for priorities). Attempts: an entry's
delivery count (``XPENDING``, read only for reclaimed entries; 1 for a first read) plus the field
``delivered`` that a nack writes into the entry it re-adds.

Cross-language contract: the stream's key is exactly the queue name and the body is the field
``data``: another program publishes by ``XADD <queue> * data <json text>``. An entry without a
``data`` field is moved to the dead letters at once (with its fields as the body). The other keys
share the queue name as a Redis Cluster hash tag:

* ``fl:{<queue>}:delayed``: ZSET of messages not yet due, scored by due time (server clock), member
  ``<unique id>:0:<deliveries so far>:<body>``; a fetch appends the due ones to the stream;
* ``fl:{<queue>}:dead``: LIST of JSON envelopes ``{"body", "reason", "failed_at", "attempts"}``,
  newest first, trimmed to the newest 10,000.

Fetching: reclaimed entries first, then one pipeline of ``TIME``, ``ZRANGE <delayed> 0 0 WITHSCORES``
and ``XREADGROUP COUNT max_n`` (a consumer's acks ride ahead of it in the same write: one round trip
per batch); a small Lua script moves delayed messages into the stream only when the first one is
due. When idle, ``XREADGROUP ... BLOCK`` waits for new entries (Redis ends blocking waits on its
cron tick, up to 100 ms late at the default ``hz``, so the last 100 ms of a wait, and shorter waits,
poll instead: a fetch never blocks past its timeout). A fetch whose reply was lost leaves its entries
pending under this consumer without being renewed: they are reclaimed ``min_idle`` later like a dead
consumer's. Acks and hand-backs that fail on a connection error are sent again by the next fetch
(both only act on entries still pending under this consumer, so sending twice is harmless).

Order: FIFO; a nacked or released message is re-added at the end (a stream cannot be prepended to),
a delayed one when due.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from redis.exceptions import RedisError, ResponseError

from funboost_like.brokers.base import Capabilities, Delivery
from funboost_like.brokers.redis_base import RedisConsumerBrokerBase
from funboost_like.brokers.redis_common import (
    DEAD_LETTER_LIMIT,
    LUA_NEXT_DUE,
    LUA_NOW,
    SCHEDULE,
    DeferredSettlements,
    DirectConnections,
    HeartbeatThread,
    IdlePoller,
    LuaScript,
    Piggyback,
    blocking_budget,
    dead_letter_envelope,
    delayed_member,
    describe_url,
    is_connection_error,
    key_prefix,
    pack_command,
    raise_first_error,
    translate_error,
)
from funboost_like.core import codec
from funboost_like.core.config import settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.redis")

GROUP = "funboost_like"
MAX_BATCH = 1000  # entries per fetch and per renewal
PUBLISH_CHUNK = 10_000  # XADDs per round trip in publish_many...
PACK_CHUNK = 500  # ... written this many at a time, so Redis works while the rest is packed
STALE_CONSUMER_SECONDS = 3600.0  # consumer records idle this long with nothing pending are removed
_DATA = b"data"
_DELIVERED = b"delivered"

# KEYS: stream, delayed. Appends the due delayed messages to the stream (with their deliveries so
# far in the field 'delivered') and returns the milliseconds until the next one is due (-1: none).
# A fetch runs it only when the first delayed message is due, which it learns from a plain ZRANGE.
_MOVE_DUE = LuaScript(LUA_NOW + LUA_NEXT_DUE + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
if #due > 0 then
  for i = 1, #due do
    local member = due[i]
    local _, stop, seen = string.find(member, '^[^:]*:%d:(%d+):')
    local body = member
    if stop then body = string.sub(member, stop + 1) else seen = '0' end
    if seen == '0' then
      redis.call('XADD', KEYS[1], '*', 'data', body)
    else
      redis.call('XADD', KEYS[1], '*', 'data', body, 'delivered', seen)
    end
  end
  redis.call('ZREM', KEYS[2], unpack(due))
end
return next_due_ms(KEYS[2], now)
""")

# KEYS: stream, delayed, dead letters
# ARGV: group, consumer, mode (tail|delay|drop|dead), delay seconds, unique id, then triples
# (entry id, body, value): value is the deliveries so far (tail, delay) or the envelope (dead).
# Only entries still pending under this consumer are settled; the entry is acked and deleted last,
# so a failing command leaves it pending rather than nowhere. Returns how many were settled.
_SETTLE = LuaScript(LUA_NOW + """
local group, me, mode = ARGV[1], ARGV[2], ARGV[3]
local done = 0
for i = 6, #ARGV, 3 do
  local id, body, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local entry = redis.call('XPENDING', KEYS[1], group, id, id, 1)[1]
  if entry and entry[2] == me then
    if mode == 'tail' then
      if value == '0' then
        redis.call('XADD', KEYS[1], '*', 'data', body)
      else
        redis.call('XADD', KEYS[1], '*', 'data', body, 'delivered', value)
      end
    elseif mode == 'delay' then
      redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[5] .. i .. ':0:' .. value .. ':' .. body)
    elseif mode == 'dead' then
      redis.call('LPUSH', KEYS[3], value)
      redis.call('LTRIM', KEYS[3], 0, DEAD_LETTER_LAST)
    end
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
    done = done + 1
  end
end
return done
""".replace("DEAD_LETTER_LAST", str(DEAD_LETTER_LIMIT - 1)))

# KEYS: stream; ARGV: group, consumer, how many pending entries to look at, entry ids...
# Resets the idle time of the given entries still pending under this consumer (JUSTID: the
# delivery count stays). Returns how many were renewed.
_RENEW = LuaScript("""
local mine = {}
for _, entry in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[3]), ARGV[2])) do
  mine[entry[1]] = true
end
local args = {KEYS[1], ARGV[1], ARGV[2], 0}
for i = 4, #ARGV do
  if mine[ARGV[i]] then args[#args + 1] = ARGV[i] end
end
if #args == 4 then return 0 end
local n = #args - 4
args[#args + 1] = 'JUSTID'
redis.call('XCLAIM', unpack(args))
return n
""")

# KEYS: stream; ARGV: group, idle threshold ms, own consumer name ('' for none).
# Removes consumer records with nothing pending that have been idle past the threshold (consumers
# killed without a chance to retire); a live one is recreated by its next read.
_PRUNE = LuaScript("""
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
""")

# KEYS: stream; ARGV: group, consumer. Removes the consumer's record when nothing is pending under it.
_RETIRE = LuaScript("""
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
""")

# KEYS: stream, delayed; ARGV: group. Waiting = delayed + stream entries not pending in the group.
_COUNT = LuaScript("""
local n = redis.call('ZCARD', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return n end
n = n + redis.call('XLEN', KEYS[1])
local ok, summary = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
if ok then n = n - summary[1] end
return n
""")

# KEYS: stream, delayed; ARGV: group. Deletes the delayed messages and the entries the group has
# not read yet (those after its last-delivered id); pending entries stay with their consumers.
_PURGE = LuaScript("""
local n = redis.call('ZCARD', KEYS[2])
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return n end
local last = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
end
if not last then
  n = n + redis.call('XLEN', KEYS[1])
  redis.call('DEL', KEYS[1])
  return n
end
local start = '(' .. last
while true do
  local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1000)
  if #batch == 0 then break end
  local ids = {}
  for i, entry in ipairs(batch) do ids[i] = entry[1] end
  redis.call('XDEL', KEYS[1], unpack(ids))
  n = n + #ids
  start = '(' .. ids[#ids]
end
return n
""")


class _QueueState:
    """Per queue: keys, and this consumer's reclaim schedule and XAUTOCLAIM cursor."""

    __slots__ = ("delayed", "dead", "next_reclaim", "cursor", "next_prune", "read_packets")

    def __init__(self, queue: str) -> None:
        prefix = key_prefix(queue)
        self.delayed = prefix + "delayed"
        self.dead = prefix + "dead"
        self.next_reclaim = 0.0
        self.cursor: bytes | str = "0-0"
        self.next_prune = 0.0
        self.read_packets: dict[int, bytes] = {}  # count -> the packed read pipeline (see RedisStreamBroker._read)


def _entries(read: Any) -> list[Any]:
    """The entries of an XREADGROUP reply on one stream: a map in RESP3, ``[[stream, entries]]`` in RESP2."""
    if isinstance(read, dict):
        return next(iter(read.values()))
    return list(read[0][1])


def _score(first: Any) -> float:
    """The score of a ``ZRANGE ... 0 0 WITHSCORES`` reply: ``[member, score]`` (RESP2) or ``[[member, score]]``."""
    if isinstance(first[0], list):
        return float(first[0][1])
    return float(first[1])


def _is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP")


class RedisStreamBroker(RedisConsumerBrokerBase[_QueueState]):
    """At-least-once Redis stream broker; see the module docstring for keys, timing and the wire contract."""

    kind = BrokerEnum.REDIS_STREAM
    capabilities = Capabilities(ack=True, persistent=True, delay=True, priority=False, cross_process=True,
                                cross_host=True, dead_letters=True)
    _keys_class = _QueueState
    _taken_over = "reclaimed by another consumer after this one stalled"

    def __init__(self, *, min_idle: float | None = None) -> None:
        self.min_idle = float(settings.get("REDIS_STREAM_MIN_IDLE_SECONDS") if min_idle is None else min_idle)
        if not self.min_idle > 0:
            raise ConfigurationError(f"the stream min-idle time must be positive, got {self.min_idle}")
        self.renew_interval = self.min_idle / 4
        super().__init__()

    def _reset_process_state(self) -> None:
        """Identity, connections, deliveries and renewal thread of this process (again in a forked child)."""
        super()._reset_process_state()
        self._registered: set[str] = set()  # queues read since start (or since close)
        self._held: dict[str, dict[bytes, None]] = {}  # queue -> entry ids fetched and not settled
        self._deferred = DeferredSettlements()  # acks that failed on a connection error, sent by the next fetch
        for state in self._keys.values():
            state.read_packets.clear()  # they name the consumer
        self._renewer = HeartbeatThread(self.renew, self.renew_interval, "funboost_like-redis-stream-renewal")

    # -- plumbing ----------------------------------------------------------------------------------
    def _ensure_group(self, conn: DirectConnections, queue: str) -> None:
        try:
            conn.execute_command("XGROUP", "CREATE", queue, GROUP, "0", "MKSTREAM")
            logger.debug("created consumer group %r on stream %r in Redis at %s", GROUP, queue, describe_url())
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    def _register(self, conn: DirectConnections, queue: str) -> None:
        with self._lock:
            if queue not in self._registered:
                self._ensure_group(conn, queue)
                self._held.setdefault(queue, {})
                self._registered.add(queue)
                logger.debug("consumer %s reads stream %r from Redis at %s", self._cid, queue, describe_url())
        self._renewer.ensure_running()

    # -- publishing --------------------------------------------------------------------------------
    def publish(self, queue: str, body: bytes, *, priority: int = 0, not_before: float | None = None) -> None:
        if priority:
            raise ConfigurationError("REDIS_STREAM has no priorities (REDIS_ACK_ABLE has)")
        conn = self._conn()
        try:
            if not_before is not None:
                delay = not_before - time.time()
                if delay > 0:
                    SCHEDULE(conn, [self._queue_keys(queue).delayed], [repr(delay), delayed_member(0, 0, body)])
                    return
            conn.execute_command("XADD", queue, "*", _DATA, body, spin=True)
        except RedisError as exc:
            raise translate_error(exc, f"publishing to queue {queue!r}") from exc

    def publish_many(self, queue: str, bodies: Sequence[bytes], *, priority: int = 0) -> None:
        """Plain XADDs, packed by hand: one round trip per PUBLISH_CHUNK, written PACK_CHUNK at a time.

        A Lua script adding a batch cost Redis 2.4 microseconds per entry against 0.9 for a plain
        XADD (measured with INFO commandstats), and with hiredis the replies cost little to read.
        """
        if priority:
            raise ConfigurationError("REDIS_STREAM has no priorities (REDIS_ACK_ABLE has)")
        if not bodies:
            return
        conn = self._conn()
        name = queue.encode("utf-8")
        head = b"*5\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n*\r\n$4\r\ndata\r\n" % (len(name), name)
        def packets(chunk: Sequence[bytes]) -> Iterator[bytes]:
            for start in range(0, len(chunk), PACK_CHUNK):
                yield b"".join([b"%s$%d\r\n%s\r\n" % (head, len(body), body)
                                for body in chunk[start:start + PACK_CHUNK]])

        try:
            for start in range(0, len(bodies), PUBLISH_CHUNK):
                chunk = bodies[start:start + PUBLISH_CHUNK]
                raise_first_error(conn.send_packets(packets(chunk), len(chunk)))
        except RedisError as exc:
            raise translate_error(exc, f"publishing {len(bodies)} messages to queue {queue!r}") from exc

    # -- consuming ---------------------------------------------------------------------------------
    def fetch(self, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        return self._fetch_after(None, queue, max_n, timeout)

    def _fetch_after(self, before: Piggyback | None, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        if max_n <= 0:
            return []
        n = min(max_n, MAX_BATCH)
        conn = self._conn()
        try:
            if queue not in self._registered:
                self._register(conn, queue)
            if self._deferred:
                self._deferred.flush()
            try:
                return self._fetch(conn, queue, n, timeout, before)
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise
                # The stream was deleted (or the server restarted empty): create the group again.
                self._ensure_group(conn, queue)
                return self._fetch(conn, queue, n, timeout, None)
        except RedisError as exc:
            raise translate_error(exc, f"fetching from queue {queue!r}") from exc

    def _fetch(self, conn: DirectConnections, queue: str, n: int, timeout: float,
               before: Piggyback | None) -> list[Delivery]:
        state = self._queue_keys(queue)
        poller: IdlePoller | None = None
        while True:
            got, due_ms = self._read(conn, queue, state, n, before)
            before = None
            if got:
                return got
            if poller is None:
                poller = IdlePoller(timeout)
            remaining = poller.remaining()
            if remaining <= 0:
                return []
            # Wake up for the next due delayed message and the next reclaim scan as well.
            wake = state.next_reclaim - time.monotonic()
            if due_ms > 0:
                wake = min(wake, due_ms / 1000)
            wait = blocking_budget(remaining, wake)
            if not wait:
                poller.sleep(remaining)
                continue
            read = conn.execute_command("XREADGROUP", "GROUP", GROUP, self._cid, "COUNT", n, "BLOCK",
                                        int(wait * 1000), "STREAMS", queue, ">")
            if read:
                got = self._deliveries(conn, queue, _entries(read), None)
                if got:
                    return got

    def _read(self, conn: DirectConnections, queue: str, state: _QueueState, n: int,
              before: Piggyback | None) -> tuple[list[Delivery], int]:
        """Without blocking: reclaimed entries (when a scan is due), new entries, due delayed messages.

        One round trip (``before`` rides along): the server's clock, the first delayed message and
        ``XREADGROUP``; a second one only when a delayed message is due. Returns the deliveries and
        the milliseconds until the next delayed message is due (-1: none).
        """
        got: list[Delivery] = []
        if time.monotonic() >= state.next_reclaim:
            got = self._reclaim(conn, queue, state, n)
            if len(got) >= n:
                return got, -1
        count = n - len(got)
        packet = state.read_packets.get(count)
        if packet is None:  # the same bytes for every read of count entries: packed once
            packet = state.read_packets[count] = b"".join([
                pack_command("TIME"), pack_command("ZRANGE", state.delayed, 0, 0, "WITHSCORES"),
                pack_command("XREADGROUP", "GROUP", GROUP, self._cid, "COUNT", count, "STREAMS", queue, ">")])
        now, first, read = raise_first_error(conn.send_packed(packet, 3, before))
        if read:
            got.extend(self._deliveries(conn, queue, _entries(read), None))
        if not first:
            return got, -1
        due_ms = math.ceil((_score(first) - (int(now[0]) + int(now[1]) / 1e6)) * 1000)
        if due_ms > 0:
            return got, due_ms
        due_ms = int(_MOVE_DUE(conn, [queue, state.delayed], []))
        if len(got) < n:
            read = conn.execute_command("XREADGROUP", "GROUP", GROUP, self._cid, "COUNT", n - len(got),
                                        "STREAMS", queue, ">")
            if read:
                got.extend(self._deliveries(conn, queue, _entries(read), None))
        return got, due_ms

    def _reclaim(self, conn: DirectConnections, queue: str, state: _QueueState, n: int) -> list[Delivery]:
        """Claim entries idle for ``min_idle`` (a dead consumer's, or ours whose fetch reply was lost)."""
        reply = conn.execute_command("XAUTOCLAIM", queue, GROUP, self._cid, int(self.min_idle * 1000),
                                     state.cursor, "COUNT", n)
        cursor, entries = reply[0], reply[1]
        state.cursor = cursor
        # A scan that did not reach the end goes on with the next fetch; otherwise wait an interval.
        state.next_reclaim = time.monotonic() + (0.0 if cursor not in (b"0-0", "0-0") else self.renew_interval)
        entries = [entry for entry in entries if entry is not None and entry[1] is not None]
        if not entries:
            return []
        pending = conn.pipeline([("XPENDING", queue, GROUP, entry[0], entry[0], 1) for entry in entries])
        counts = {}
        for reply_item in pending:
            if isinstance(reply_item, list) and reply_item:
                counts[reply_item[0][0]] = int(reply_item[0][3])
        logger.warning("queue %r: reclaimed %d entr%s idle for over %.1fs (a consumer died or stalled)", queue,
                       len(entries), "y" if len(entries) == 1 else "ies", self.min_idle)
        return self._deliveries(conn, queue, entries, counts)

    def _deliveries(self, conn: DirectConnections, queue: str, entries: list[Any],
                    counts: dict[bytes, int] | None) -> list[Delivery]:
        held = self._held[queue]
        if counts is None:  # the usual case: new entries that each hold just the field 'data'
            plain = [Delivery(queue, fields[1], entry_id) for entry_id, fields in entries
                     if len(fields) == 2 and fields[0] == _DATA]
            if len(plain) == len(entries):
                held.update(dict.fromkeys([delivery.token for delivery in plain]))
                return plain
        result = []
        malformed: list[tuple[bytes, bytes]] = []
        for entry_id, fields in entries:
            if len(fields) == 2 and fields[0] == _DATA:
                body, prior = fields[1], 0
            else:
                values = dict(zip(itertools.islice(fields, 0, None, 2), itertools.islice(fields, 1, None, 2),
                                  strict=True))
                data = values.get(_DATA)
                if data is None:
                    malformed.append((entry_id, codec.dumps({k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                                                             for k, v in values.items()})))
                    continue
                body = data
                try:
                    prior = int(values.get(_DELIVERED, 0))
                except ValueError:
                    prior = 0
            held[entry_id] = None
            count = 1 if counts is None else counts.get(entry_id, 1)
            result.append(Delivery(queue, body, entry_id, prior + count))
        if malformed:
            self._dead_letter_malformed(conn, queue, malformed)
        return result

    def _dead_letter_malformed(self, conn: DirectConnections, queue: str, entries: list[tuple[bytes, bytes]]) -> None:
        """Dead-letter entries without a 'data' field at once; ``entries`` are (id, JSON of the fields)."""
        state = self._queue_keys(queue)
        args: list[Any] = [GROUP, self._cid, "dead", "0", ""]
        for entry_id, fields_json in entries:
            args.extend((entry_id, b"", dead_letter_envelope(fields_json, "stream entry has no 'data' field", 1)))
        _SETTLE(conn, [queue, state.delayed, state.dead], args)
        logger.warning("queue %r: dead-lettered %d stream entr%s without a 'data' field", queue, len(entries),
                       "y" if len(entries) == 1 else "ies")

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        commands = self._ack_commands(deliveries)
        acked = 0
        if commands:
            conn = self._conn()
            try:
                replies = raise_first_error(conn.pipeline(commands))
            except RedisError as exc:
                if is_connection_error(exc):  # sent again by the next fetch (XACK and XDEL twice are harmless)
                    self._deferred.add(functools.partial(conn.pipeline, commands))
                raise translate_error(exc, f"acknowledging {len(deliveries)} message(s)") from exc
            acked = sum(replies[::2])
        self._check_settled(acked, len(deliveries))

    def _ack_piggyback(self, deliveries: Sequence[Delivery]) -> Piggyback | None:
        commands = self._ack_commands(deliveries)
        if not commands:
            logger.warning("%s", self._unsettled_message(0, len(deliveries)))
            return None
        conn = self._conn()
        return self._piggyback(commands, len(deliveries), lambda replies: sum(replies[::2]),
                               functools.partial(self._deferred.add, functools.partial(conn.pipeline, commands)))

    def _ack_commands(self, deliveries: Sequence[Delivery]) -> list[tuple[Any, ...]]:
        """``XACK`` and ``XDEL`` per queue for the deliveries this process still holds (forgotten here)."""
        groups: dict[str, list[bytes]] = {}
        held_by_queue = self._held
        for delivery in deliveries:
            held = held_by_queue.get(delivery.queue)
            if held is None or delivery.token not in held:
                continue  # settled before: counted as a double ack by the caller
            del held[delivery.token]
            ids = groups.get(delivery.queue)
            if ids is None:
                ids = groups[delivery.queue] = []
            ids.append(delivery.token)
        commands: list[tuple[Any, ...]] = []
        for queue, ids in groups.items():
            commands.append(("XACK", queue, GROUP, *ids))
            commands.append(("XDEL", queue, *ids))
        return commands

    def nack(self, delivery: Delivery, *, requeue: bool = True, delay: float = 0.0) -> None:
        if not requeue:
            self._settle([delivery], "drop", 0.0, [""])
        elif delay > 0:
            self._settle([delivery], "delay", float(delay), [str(delivery.attempts)])
        else:
            self._settle([delivery], "tail", 0.0, [str(delivery.attempts)])

    def release(self, deliveries: Iterable[Delivery]) -> None:
        """Re-add fetched-but-unstarted messages at the end of the stream; no attempt is counted."""
        deliveries = list(deliveries)
        if deliveries:
            self._settle(deliveries, "tail", 0.0, [str(d.attempts - 1) for d in deliveries])

    def dead_letter(self, delivery: Delivery, reason: str, exc: BaseException | None = None) -> None:
        self._settle([delivery], "dead", 0.0, [dead_letter_envelope(delivery.body, reason, delivery.attempts)])

    def _settle(self, deliveries: Sequence[Delivery], mode: str, delay: float, values: Sequence[Any]) -> None:
        groups: dict[str, list[Any]] = {}
        for delivery, value in zip(deliveries, values, strict=True):
            held = self._held.get(delivery.queue)
            if held is None or delivery.token not in held:
                continue
            del held[delivery.token]
            groups.setdefault(delivery.queue, []).extend((delivery.token, delivery.body, value))
        conn = self._conn()
        done = 0
        calls = [(queue, len(triples) // 3, functools.partial(
            _SETTLE, conn, [queue, self._queue_keys(queue).delayed, self._queue_keys(queue).dead],
            [GROUP, self._cid, mode, repr(delay), uuid.uuid4().hex, *triples])) for queue, triples in groups.items()]
        for index, (queue, n, call) in enumerate(calls):
            try:
                done += int(call())
            except RedisError as exc:
                if is_connection_error(exc):  # sent again by the next fetch; the script skips what it settled
                    for _, _, unsent in calls[index:]:
                        self._deferred.add(unsent)
                raise translate_error(exc, f"handing back {n} message(s) of queue {queue!r}") from exc
        self._check_settled(done, len(deliveries))

    # -- renewal and recovery ----------------------------------------------------------------------
    def renew(self) -> int:
        """Reset the idle time of every entry this process holds, so no other consumer reclaims it.

        Runs by itself in the renewal thread every ``min_idle / 4`` seconds; also removes the records
        of consumers that died long ago with nothing pending. Returns how many entries were renewed.
        """
        conn = self._conn()
        renewed = 0
        for queue, held in list(self._held.items()):
            ids = list(held)
            try:
                for start in range(0, len(ids), MAX_BATCH):
                    chunk = ids[start:start + MAX_BATCH]
                    renewed += int(_RENEW(conn, [queue], [GROUP, self._cid, len(chunk) + MAX_BATCH, *chunk]))
                state = self._queue_keys(queue)
                if time.monotonic() >= state.next_prune:
                    state.next_prune = time.monotonic() + max(self.min_idle, 60.0)
                    pruned = int(_PRUNE(conn, [queue], [GROUP, int(STALE_CONSUMER_SECONDS * 1000), self._cid]))
                    if pruned:
                        logger.info("queue %r: removed %d consumer record(s) idle for over %.0fs with nothing "
                                    "pending", queue, pruned, STALE_CONSUMER_SECONDS)
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise translate_error(exc, f"renewing the entries of queue {queue!r}") from exc
            except RedisError as exc:
                raise translate_error(exc, f"renewing the entries of queue {queue!r}") from exc
        return renewed

    def in_flight(self, queue: str) -> int:
        """Entries of ``queue`` delivered to any consumer of the group and not yet acked."""
        try:
            summary = self._conn().execute_command("XPENDING", queue, GROUP)
        except ResponseError as exc:
            if _is_nogroup(exc):
                return 0
            raise translate_error(exc, f"counting in-flight messages of queue {queue!r}") from exc
        except RedisError as exc:
            raise translate_error(exc, f"counting in-flight messages of queue {queue!r}") from exc
        return int(summary[0])

    # -- queue maintenance -------------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        """Delete the delayed messages and the entries no consumer has read yet; in-flight ones stay."""
        return super().purge(queue)

    def _run_count_or_purge(self, conn: DirectConnections, queue: str, purge: bool) -> Any:
        return (_PURGE if purge else _COUNT)(conn, [queue, self._queue_keys(queue).delayed], [GROUP])

    def close(self) -> None:
        """Stop renewing and remove this consumer's record from groups where nothing is pending under it.

        Entries still pending stay with this consumer and are reclaimed by another one ``min_idle``
        seconds later. Fetching again registers again.
        """
        if self._pid != os.getpid():
            self._reset_process_state()
            return
        self._renewer.stop()
        with self._lock:
            queues = list(self._registered)
            self._registered.clear()
        conn = self._redis
        if conn is not None:
            self._deferred.flush_on_close()
            for queue in queues:
                try:
                    _RETIRE(conn, [queue], [GROUP, self._cid])
                except RedisError as exc:
                    logger.debug("could not retire consumer %s of queue %r: %s", self._cid, queue, exc)
        self._redis = None

