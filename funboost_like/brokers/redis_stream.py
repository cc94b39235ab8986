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
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from redis.connection import AbstractConnection
from redis.exceptions import ResponseError

from funboost_like.brokers.base import Capabilities, DeadLetter, Delivery
from funboost_like.brokers.redis_base import (
    BLOCK_SECONDS,
    DEAD_LETTER_LIMIT,
    LUA_COUNTS,
    LUA_NEXT_DUE,
    LUA_NOW,
    SCHEDULE,
    dead_letter_envelope,
    delayed_member,
)
from funboost_like.brokers.redis_common import (
    DirectConnections,
    LuaScript,
    Piggyback,
    key_prefix,
    pack_command,
    raise_first_error,
)
from funboost_like.brokers.redis_consumers import RedisConsumers, consumer_scripts
from funboost_like.core import codec
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.redis")

GROUP = "funboost_like"
MAX_BATCH = 1000  # entries per fetch
PUBLISH_CHUNK = 10_000  # XADDs per round trip in publish_many...
PACK_CHUNK = 500  # ... written this many at a time, so Redis works while the rest is packed
_DATA = b"data"

# Lua: re-add the message of entry ``id`` at the end of ``stream`` (or, given ``due``, into the
# ``delayed`` ZSET) with ``more`` deliveries and ``crash`` crashes counted; then ack and delete the entry.
LUA_READD = LUA_COUNTS + f"local G = '{GROUP}'\n" + """
local function xadd(stream, body, d, c)
  local args = {'data', body}
  if d > 0 then args[3] = 'delivered' args[4] = d end
  if c > 0 then args[#args + 1] = 'crashes' args[#args + 1] = c end
  redis.call('XADD', stream, '*', unpack(args))
end
local function readd(stream, id, more, crash, delayed, due, uid)
  local entry = redis.call('XRANGE', stream, id, id)[1]
  if entry then
    local fields, body, d, c = entry[2], nil, 0, 0
    for i = 1, #fields, 2 do
      local k, v = fields[i], fields[i + 1]
      if k == 'data' then body = v elseif k == 'delivered' then d = tonumber(v) or 0
      elseif k == 'crashes' then c = tonumber(v) or 0 end
    end
    if body == nil then
      redis.call('XADD', stream, '*', unpack(fields))
    elseif due then
      redis.call('ZADD', delayed, due, uid .. ':0:' .. fmt(d + more, c + crash) .. ':' .. body)
    else
      xadd(stream, body, d + more, c + crash)
    end
  end
  redis.call('XACK', stream, G, id)
  redis.call('XDEL', stream, id)
end
"""

# KEYS: stream, delayed. Appends the due delayed messages to the stream (with their counts in the
# fields 'delivered' and 'crashes') and returns the milliseconds until the next one is due (-1: none).
_MOVE_DUE = LuaScript(LUA_NOW + LUA_READD + LUA_NEXT_DUE + """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for i = 1, #due do
  local _, stop, seen = string.find(due[i], '^[^:]*:%d:([%d.]+):')
  local d, c = counts(seen)
  xadd(KEYS[1], string.sub(due[i], (stop or 0) + 1), d, c)
end
if #due > 0 then redis.call('ZREM', KEYS[2], unpack(due)) end
return next_due_ms(KEYS[2], now)
""")

# KEYS: stream, delayed, dead letters
# ARGV: consumer, mode (tail|delay|drop|dead), deliveries to count (tail, delay) or envelope (dead),
# delay seconds, unique id, entry ids... Only entries still pending under this consumer are settled.
_SETTLE = LuaScript(LUA_NOW + LUA_READD + """
local done = 0
for i = 6, #ARGV do
  local id = ARGV[i]
  local entry = redis.call('XPENDING', KEYS[1], G, id, id, 1)[1]
  if entry and entry[2] == ARGV[1] then
    if ARGV[2] == 'tail' then
      readd(KEYS[1], id, tonumber(ARGV[3]), 0)
    elseif ARGV[2] == 'delay' then
      readd(KEYS[1], id, tonumber(ARGV[3]), 0, KEYS[2], now + tonumber(ARGV[4]), ARGV[5] .. i)
    else
      if ARGV[2] == 'dead' then
        redis.call('LPUSH', KEYS[3], ARGV[3])
        redis.call('LTRIM', KEYS[3], 0, DEAD_LETTER_LAST)
      end
      redis.call('XACK', KEYS[1], G, id)
      redis.call('XDEL', KEYS[1], id)
    end
    done = done + 1
  end
end
return done
""".replace("DEAD_LETTER_LAST", str(DEAD_LETTER_LIMIT - 1)))

# The registry's functions (see redis_consumers.consumer_scripts). Dead are also the group's consumers in
# no heartbeat record and idle for dead_after (killed before their first heartbeat, or records of
# consumers of older versions); their pending entries go back to the stream.
_SCRIPTS = consumer_scripts(LUA_READD + """
local function dead_consumers(before)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', before, 'LIMIT', 0, 100)
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[2], G)
  if ok then
    for _, c in ipairs(consumers) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      if info['idle'] > (now - before) * 1000 and not redis.call('ZSCORE', KEYS[1], info['name']) then
        dead[#dead + 1] = info['name']
      end
    end
  end
  return dead
end
local function pending(cid, n)
  local ok, entries = pcall(redis.call, 'XPENDING', KEYS[2], G, '-', '+', n, cid)
  if ok then return entries end
  return {}
end
local function held(cid) return #pending(cid, 1) end
local function recover(cid)
  local moved = 0
  while true do
    local entries = pending(cid, 100)
    if #entries == 0 then return moved end
    for _, entry in ipairs(entries) do readd(KEYS[2], entry[1], 1, 1) end
    moved = moved + #entries
  end
end
local function forget(cid) pcall(redis.call, 'XGROUP', 'DELCONSUMER', KEYS[2], G, cid) end
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

# KEYS: stream; ARGV: group. Entries delivered and not acked yet.
_IN_FLIGHT = LuaScript("local ok, s = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1]) return ok and s[1] or 0")

# Lua function: the XRANGE start of the entries ``group`` has not read yet (after its last-delivered id).
_LUA_UNREAD_START = """
local function unread_start(stream, group)
  local start = '-'
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  for _, g in ipairs(ok and groups or {}) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then start = '(' .. info['last-delivered-id'] end
  end
  return start
end
"""

# KEYS: stream, delayed; ARGV: group. Deletes the delayed messages and the entries the group has
# not read yet (those after its last-delivered id); pending entries stay with their consumers.
_PURGE = LuaScript(_LUA_UNREAD_START + """
local n = redis.call('ZCARD', KEYS[2])
redis.call('DEL', KEYS[2])
local start = unread_start(KEYS[1], ARGV[1])
while true do
  local batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1000)
  if #batch == 0 then return n end
  for _, entry in ipairs(batch) do redis.call('XDEL', KEYS[1], entry[1]) end
  n = n + #batch
  start = '(' .. batch[#batch][1]
end
""")


# KEYS: stream; ARGV: group. The data of the first entry the group has not read yet (none: {}).
_HEAD = LuaScript(_LUA_UNREAD_START + """
local entry = redis.call('XRANGE', KEYS[1], unread_start(KEYS[1], ARGV[1]), '+', 'COUNT', 1)[1]
if not entry then return {} end
for i = 1, #entry[2], 2 do
  if entry[2][i] == 'data' then return {entry[2][i + 1]} end
end
return {}
""")


class _Keys:
    __slots__ = ("prefix", "delayed", "dead", "consumers", "attempts", "read_packets")

    def __init__(self, queue: str) -> None:
        prefix = self.prefix = key_prefix(queue)
        self.delayed = prefix + "delayed"
        self.dead = prefix + "dead"
        self.consumers = prefix + "consumers"
        self.attempts = prefix + "attempts"  # not used by streams (the registry's scripts take it)
        self.read_packets: dict[tuple[str, int], bytes] = {}  # (consumer, count) -> the packed read pipeline


def _entries(read: Any) -> list[Any]:
    """The entries of an XREADGROUP reply on one stream: a map in RESP3, ``[[stream, entries]]`` in RESP2."""
    return list(next(iter(read.values()))) if isinstance(read, dict) else list(read[0][1])


def _fields(item: Any) -> dict[Any, Any]:
    return item if isinstance(item, dict) else dict(zip(item[::2], item[1::2], strict=True))


class RedisStreamBroker(RedisConsumers):
    """At-least-once Redis stream broker; see the module docstring for keys, timing and the wire contract."""

    kind = BrokerEnum.REDIS_STREAM
    capabilities = Capabilities(redelivery="sweep", delay="native", dead_letters=True, key_value=True,
                                routing="emulated", persistent=True, cross_process=True, cross_host=True)
    _scripts = _SCRIPTS
    _keys_class = _Keys
    _ready_type = "stream"

    def _open(self, queue: str) -> None:
        """Create the group (and the stream) unless it exists."""
        try:
            self._conn().execute_command("XGROUP", "CREATE", queue, GROUP, "0", "MKSTREAM")
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    # -- publishing --------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        if priority:
            raise ConfigurationError("REDIS_STREAM has no priorities (REDIS_ACK_ABLE has)")
        conn = self._conn()
        delay = 0.0 if not_before is None else not_before - time.time()
        if delay > 0:
            members = [delayed_member(0, "0", body) for body in bodies]
            SCHEDULE(conn, [self._queue_keys(queue).delayed], [repr(delay), *members])
            self._expect_due(queue, delay)
        elif len(bodies) == 1:
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
        packet = keys.read_packets.get((self._cid, n))
        if packet is None:  # the same bytes for every read of n entries: packed once
            packet = keys.read_packets[(self._cid, n)] = b"".join([
                pack_command("TIME"), pack_command("ZRANGE", keys.delayed, 0, 0, "WITHSCORES"),
                pack_command("XREADGROUP", "GROUP", GROUP, self._cid, "COUNT", n, "STREAMS", queue, ">")])
        now, first, read = raise_first_error(conn.send_packed(packet, 3, before))
        got = self._deliveries(queue, _entries(read)) if read else []
        if not first:
            return got, -1
        score = float(first[0][1] if isinstance(first[0], list) else first[1])  # RESP3 nests the pair
        due_ms = math.ceil((score - (int(now[0]) + int(now[1]) / 1e6)) * 1000)
        if due_ms > 0:
            return got, due_ms
        due_ms = int(_MOVE_DUE(conn, [queue, keys.delayed], []))
        if len(got) < n:
            read = conn.execute_command("XREADGROUP", "GROUP", GROUP, self._cid, "COUNT", n - len(got),
                                        "STREAMS", queue, ">")
            if read:
                got.extend(self._deliveries(queue, _entries(read)))
        return got, due_ms

    def _adopt(self, before: Piggyback | None, queue: str, max_n: int, held: set[Any]) -> list[Delivery]:
        """This consumer's own pending entries (``XREADGROUP ... 0``) that this process does not hold."""
        read = self._conn().execute_command("XREADGROUP", "GROUP", GROUP, self._cid, "STREAMS", queue, "0",
                                            before=before)
        entries = [entry for entry in _entries(read) if entry[1] is not None and entry[0] not in held] if read else []
        if len(entries) > max_n:
            self._suspect.add(queue)  # the rest next time
        return self._deliveries(queue, entries[:max_n])

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
                self._settle_entries(queue, [entry_id], "dead", dead_letter_envelope(letter))
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

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        """Added again at the end of the stream (or to the delayed messages): a stream has no front."""
        by_queue: dict[str, list[Any]] = {}
        for delivery in deliveries:
            by_queue.setdefault(delivery.queue, []).append(delivery.token)
        done = sum(self._settle_entries(queue, ids, "delay" if delay > 0 else "tail", int(count_attempt), delay)
                   for queue, ids in by_queue.items())
        self._check_settled(done, len(deliveries))

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        done = self._settle_entries(delivery.queue, [delivery.token], "dead", dead_letter_envelope(letter))
        self._check_settled(done, 1)

    def _settle_entries(self, queue: str, ids: list[Any], mode: str, value: Any, delay: float = 0.0) -> int:
        keys = self._queue_keys(queue)
        return int(_SETTLE(self._conn(), [queue, keys.delayed, keys.dead],
                           [self._cid, mode, value, repr(delay), uuid.uuid4().hex, *ids]))

    # -- inspection --------------------------------------------------------------------------------
    def in_flight(self, queue: str) -> int:
        """Entries of ``queue`` delivered to any consumer of the group and not yet acked."""
        return int(self._run(f"counting in-flight entries of {queue!r}", _IN_FLIGHT, self._conn(), [queue], [GROUP]))

    def _size(self, queue: str) -> int:
        return int(_COUNT(self._conn(), [queue, self._queue_keys(queue).delayed], [GROUP]))

    def _heads(self, queue: str) -> list[bytes]:
        return [bytes(data) for data in _HEAD(self._conn(), [queue], [GROUP])]

    def _purge(self, queue: str) -> int:
        """Delete the delayed messages and the entries no consumer has read yet; in-flight ones stay."""
        return int(_PURGE(self._conn(), [queue, self._queue_keys(queue).delayed], [GROUP]))
