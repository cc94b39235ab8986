"""What the four Redis brokers share, on the broker contract of :mod:`funboost_like.brokers.base`.

* :class:`RedisBroker`: connections (:func:`~funboost_like.brokers.redis_common.direct_connections`;
  the ``REDIS_URL`` setting is read at first use and again after ``close()``), error translation
  (redis-py's connection and timeout errors are the base's ``connection_errors``), per-queue key
  names, dead letters, key-value records, and the bounded blocking wait of an idle fetch.
* Key naming: every key of a queue other than the queue's own key starts with ``fl:{<queue>}:`` (a
  Redis Cluster hash tag, so one queue lives in one slot). Dead letters: the LIST ``fl:{<queue>}:dead``
  of JSON envelopes ``{"body", "reason", "failed_at", "attempts"}``, newest first, trimmed to the
  newest 10,000. Delayed messages: the ZSET ``fl:{<queue>}:delayed`` scored by due time (server
  clock), member ``<unique id>:<priority>:<counts>:<body>``.
* Counts: a message's deliveries so far and the deliveries that ended with its consumer's death are
  written ``<deliveries>`` or ``<deliveries>.<crashes>`` wherever they are kept beside a body (the
  ``attempts`` hashes, delayed members, in-flight tokens).
* :class:`RedisListLayout`: the layout REDIS and REDIS_ACK_ABLE share (either kind may consume what
  the other published): the ready list of priority 0 is the LIST named exactly like the queue,
  priority n (1..9) is ``fl:{<queue>}:p<n>``, fetched first; ``fl:{<queue>}:attempts`` is a HASH
  sha1(body) -> counts of messages waiting again. An idle fetch waits with ``BLMOVE <queue> <queue>
  RIGHT RIGHT`` (which leaves the list as it was) and looks at the other lists every 0.2 s.
* :class:`~funboost_like.brokers.redis_consumers.RedisConsumers` (in its own module): the consumer
  registry of the at-least-once kinds.
* Routing (exchanges and routing keys, emulated the same way on the four kinds; see docs/routing.md):
  the bindings of an exchange are the HASH ``fl:exchange:{<name>}``: the field ``type`` holds the
  exchange type (set by the first bind: an exchange keeps its first type, a bind asking for another
  one logs a warning), and each binding is a field ``["<queue>", "<binding key>"]`` (JSON). A bind is
  one Lua script, so concurrent binds never mix types (:mod:`.redis_bindings`). A routed publish
  reads the HASH, picks the matching queues in Python, then one Lua script writes the messages to
  every matching queue in the kind's own layout (the ready key of their priority, ``XADD`` for
  streams, the delayed ZSET for ``not_before``). Atomic: the script runs alone on the server, so no
  client ever sees the message in some of the queues and not in the others; it checks the type of
  every key before writing, so a key of another type fails the publish with nothing written; and
  Redis persists a script's writes as one transaction (AOF, replicas) or not at all (an RDB snapshot
  is taken between commands). Redis never rolls a script back, so only a server refusing a write
  midway (out of memory under ``maxmemory`` with ``noeviction``) could leave some queues without the
  message. As for every publish, a reply lost on a broken connection makes the client send the script
  again, which may publish the messages twice. Not Redis-Cluster-safe: the keys of different queues
  and the exchange's HASH are in different hash slots.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from funboost_like.brokers.base import Broker, DeadLetter
from funboost_like.brokers.redis_bindings import bind, bindings_of
from funboost_like.brokers.redis_common import (
    BlockingWaits,
    DirectConnections,
    LuaScript,
    describe_url,
    direct_connections,
    key_prefix,
    pack_command,
    raise_first_error,
)
from funboost_like.brokers.redis_store import RedisStoresMixin
from funboost_like.brokers.routing import Binding
from funboost_like.core.errors import ConfigurationError

DEAD_LETTER_LIMIT = 10_000  # dead letters kept per queue (the newest)
BLOCK_SECONDS = 5  # server timeout of a blocking wait's command (it may outlive the wait, see BlockingWaits)

# Lua prologue: the server's clock as a float, in ``now``; and the counts of a message (see above).
LUA_NOW = "local _t = redis.call('TIME') local now = tonumber(_t[1]) + tonumber(_t[2]) / 1000000\n"
LUA_COUNTS = """
local function counts(s)
  local a, c = string.match(s or '0', '^(%d+)%.?(%d*)$')
  return tonumber(a) or 0, tonumber(c) or 0
end
local function fmt(a, c)
  if c > 0 then return a .. '.' .. c end
  return tostring(a)
end
"""
# Lua function: keep a dead letter's envelope in the ``dead`` LIST, newest first, the newest DEAD_LETTER_LIMIT.
LUA_BURY = f"""
local function bury(dead, envelope)
  redis.call('LPUSH', dead, envelope)
  redis.call('LTRIM', dead, 0, {DEAD_LETTER_LIMIT - 1})
end
"""

# A delayed member is the body, or ``<uid>:<priority level>:<counts>:<body>`` (see LUA_MOVE_DUE).
_DELAYED_MEMBER = re.compile(rb"^[^:]*:\d:[\d.]+:")

# Lua function: move the due members of a delayed ZSET to the back of their ready list (``ready`` for
# priority 0, ``prio_prefix .. n`` otherwise), keeping their counts in the ``attempts`` HASH.
LUA_MOVE_DUE = """
local function move_due(delayed, ready, prio_prefix, attempts, now)
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
  if #due == 0 then return 0 end
  for i = 1, #due do
    local member = due[i]
    local _, stop, level, seen = string.find(member, '^[^:]*:(%d):([%d.]+):')
    local body = member
    if stop then body = string.sub(member, stop + 1) else level = '0' seen = '0' end
    local key = ready
    if level ~= '0' then key = prio_prefix .. level end
    redis.call('LPUSH', key, body)
    if seen ~= '0' then redis.call('HSET', attempts, redis.sha1hex(body), seen) end
  end
  redis.call('ZREM', delayed, unpack(due))
  return #due
end
"""

# Lua function: milliseconds until the first member of a delayed ZSET is due (at least 1), or -1.
LUA_NEXT_DUE = """
local function next_due_ms(delayed, now)
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if #first == 0 then return -1 end
  local ms = math.ceil((tonumber(first[2]) - now) * 1000)
  if ms < 1 then ms = 1 end
  return ms
end
"""

# KEYS: delayed ZSET; ARGV: delay in seconds (from now, server clock), members...
SCHEDULE = LuaScript(LUA_NOW + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
return 1
""")

# KEYS: a list; returns its length and deletes it.
PURGE_LIST = LuaScript("local n = redis.call('LLEN', KEYS[1]) redis.call('DEL', KEYS[1]) return n")

# KEYS: the key each matching queue gets the messages in; ARGV: delay seconds, the keys' type ('list':
# LPUSH, 'stream': XADD with the field 'data', 'zset': the delayed ZSET, scored now + delay), then the
# bodies (or delayed members). Every key's type is checked first: a key of another type changes nothing.
_PUT_MANY = LuaScript(LUA_NOW + """
for i = 1, #KEYS do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= ARGV[2] then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. t .. ', not a ' .. ARGV[2])
  end
end
for i = 1, #KEYS do
  for j = 3, #ARGV do
    if ARGV[2] == 'list' then redis.call('LPUSH', KEYS[i], ARGV[j])
    elseif ARGV[2] == 'stream' then redis.call('XADD', KEYS[i], '*', 'data', ARGV[j])
    else redis.call('ZADD', KEYS[i], now + tonumber(ARGV[1]), ARGV[j]) end
  end
end
return #KEYS
""")


def counts(attempts: int, crashes: int) -> str:
    """``<deliveries>`` or ``<deliveries>.<crashes>``: a message's counts as the Redis brokers keep them."""
    return f"{attempts}.{crashes}" if crashes else str(attempts)


def parse_counts(value: bytes | str | None) -> tuple[int, int]:
    if not value:
        return 0, 0
    text = value.decode() if isinstance(value, bytes) else value
    attempts, _, crashes = text.partition(".")
    return int(attempts), int(crashes or 0)


def parse_meta(meta: bytes) -> dict[int, tuple[int, int, int]]:
    """``index:level:counts,...`` (a fetch script's list of the messages not at priority 0 or not on their
    first delivery) as index -> (level, attempts, crashes)."""
    special = {}
    for item in meta.decode().split(","):
        index, level, seen = item.split(":")
        special[int(index)] = (int(level), *parse_counts(seen))
    return special


def delayed_member(priority: int, seen: str, body: bytes) -> bytes:
    """The member of a delayed ZSET for ``body``: unique, carrying its priority and counts so far."""
    return b"%s:%d:%s:" % (uuid.uuid4().hex.encode(), priority, seen.encode()) + bytes(body)


class QueueKeys:
    """The names of a queue's keys that every Redis kind has, and its fetch commands packed once."""

    __slots__ = ("prefix", "delayed", "attempts", "dead", "consumers", "packets")

    def __init__(self, queue: str) -> None:
        prefix = self.prefix = key_prefix(queue)
        self.delayed = prefix + "delayed"
        self.attempts = prefix + "attempts"  # not used by streams (the registry's scripts take it)
        self.dead = prefix + "dead"
        self.consumers = prefix + "consumers"
        self.packets: dict[tuple[str, int], bytes] = {}  # (consumer, n) -> the fetch pipeline of n messages


class RedisBroker(RedisStoresMixin, Broker):
    """Connections, error translation, per-queue keys, dead letters and the idle wait of a Redis kind."""

    connection_errors = (RedisConnectionError, RedisTimeoutError)
    errors = (RedisError,)
    _keys_class: ClassVar[type[Any]] = QueueKeys  # the kind's key names of a queue (built from its name)
    _ready_type: ClassVar[str]  # the Redis type of a queue's ready keys: "list" or "stream"

    def __init__(self) -> None:
        self._keys: dict[str, Any] = {}
        super().__init__()
        self._after_fork()

    def _after_fork(self) -> None:
        """The parent's connections are dropped, never closed (they are the parent's)."""
        self._redis: DirectConnections | None = None
        self._blocking = BlockingWaits()
        self._next_due: dict[str, float] = {}  # queue -> when (monotonic) its first delayed message is due

    def _conn(self) -> DirectConnections:
        conn = self._redis
        if conn is None:
            conn = self._redis = direct_connections()
        return conn

    def _where(self) -> str:
        return f"Redis at {describe_url()}"

    def _queue_keys(self, queue: str) -> Any:
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = self._keys_class(queue)
        return keys

    def _run(self, action: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` with redis-py errors translated (for the methods the base does not wrap)."""
        try:
            return call(*args)
        except self._client_errors as exc:
            raise self._translated(exc, action) from exc

    def _due_in(self, queue: str, due_ms: int) -> None:
        """Note when the first delayed message of ``queue`` is due (``due_ms`` from now; -1: none)."""
        self._next_due[queue] = time.monotonic() + due_ms / 1000 if due_ms >= 0 else float("inf")

    def _expect_due(self, queue: str, delay: float) -> None:
        """This process delayed a message of ``queue`` by ``delay`` seconds."""
        self._next_due[queue] = min(self._next_due.get(queue, float("inf")), time.monotonic() + delay)

    def _wait_for(self, queue: str, timeout: float, command: Callable[[AbstractConnection], bytes | None],
                  look: float = 1.0) -> None:
        """The blocking wait of an idle fetch, cut short when a delayed message is due and after ``look``
        seconds (to look at what the blocking command does not watch)."""
        wait = min(timeout, look, self._next_due.get(queue, float("inf")) - time.monotonic())
        if wait > 0:
            self._blocking.wait(self._conn(), queue, wait, command)

    def _check_priority(self, priority: int) -> int:
        top = self.capabilities.max_priority
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= top:
            raise ConfigurationError(f"{type(self).__name__} takes priorities 0..{top} (integers), not {priority!r}")
        return priority

    # -- routing (emulated; see the module docstring) ------------------------------------------------
    def _ready_key(self, queue: str, priority: int) -> str:
        """The key a message of ``priority`` waits in: the queue's own key (the list kinds override)."""
        return queue

    def _bind(self, bindings: Sequence[Binding]) -> None:
        bind(self._conn(), bindings)

    def _bindings(self, exchange: str) -> list[Binding]:
        return bindings_of(self._conn(), exchange)

    def _put_many(self, queues: Sequence[str], bodies: Sequence[bytes], *, priority: int,
                  not_before: float | None) -> None:
        """One Lua script writes to every queue (see the module docstring): all or none."""
        self._check_priority(priority)
        delay = 0.0 if not_before is None else not_before - time.time()
        if delay > 0:
            keys, kind = [self._queue_keys(queue).delayed for queue in queues], "zset"
            bodies = [delayed_member(priority, "0", body) for body in bodies]
        else:
            keys, kind = [self._ready_key(queue, priority) for queue in queues], self._ready_type
        _PUT_MANY(self._conn(), keys, [repr(max(delay, 0.0)), kind, *bodies])
        for queue in queues if delay > 0 else ():
            self._expect_due(queue, delay)

    # -- dead letters ------------------------------------------------------------------------------
    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        items = self._run(f"listing dead letters of queue {queue!r}", self._conn().execute_command, "LRANGE",
                          key_prefix(queue) + "dead", 0, limit - 1)
        return [DeadLetter.from_envelope(queue, item) for item in items]

    def purge_dead_letters(self, queue: str) -> int:
        return int(self._run(f"purging dead letters of queue {queue!r}", PURGE_LIST, self._conn(),
                             [key_prefix(queue) + "dead"], []))

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        if limit <= 0:
            return []
        found = self._run(f"listing delayed messages of queue {queue!r}", self._conn().execute_command, "ZRANGE",
                          key_prefix(queue) + "delayed", 0, limit - 1, "WITHSCORES")
        pairs = found if found and isinstance(found[0], list | tuple) else zip(found[::2], found[1::2], strict=True)
        return [(float(score), _DELAYED_MEMBER.sub(b"", member, count=1)) for member, score in pairs]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        return bool(self._run(f"removing a dead letter of queue {queue!r}", self._conn().execute_command, "LREM",
                              key_prefix(queue) + "dead", 1, letter.ref))

    def _close(self) -> None:
        """Forget the connections (shared per process) and close the blocking waits' own."""
        self._redis = None
        self._blocking.close()


# -- the list layout of REDIS and REDIS_ACK_ABLE ------------------------------------------------------

LIST_MAX_PRIORITY = 9
LIST_PUSH_BATCH = 1000  # values per LPUSH command of publish_many
PRIORITY_LOOK = 0.2  # an idle fetch waits on the priority-0 list and looks at the others this often

# Lua function of the fetch scripts: pop up to ``want`` ready messages, highest priority first, with
# their counts (taken out of the ``attempts`` HASH). With an ``inflight`` HASH, each level's messages
# are recorded there as soon as they are popped, under the field ``<base + index>[:level:counts]``
# (so a failure at a later level leaves them recorded). Returns ``{meta, body1, body2, ...}`` and how
# many: meta lists "index:level:counts" for each message not at level 0 or not on its first delivery.
LUA_TAKE_READY = LUA_COUNTS + """
local function take_ready(want, ready, prio_prefix, attempts, inflight, base)
  local track = redis.call('HLEN', attempts) > 0
  local out, meta, n = {''}, {}, 0
  for level = 9, 0, -1 do
    local key = ready
    if level > 0 then key = prio_prefix .. level end
    local got = redis.call('RPOP', key, want - n)
    if got then
      local hset = {}
      for i = 1, #got do
        local body, a, c = got[i], 1, 0
        if track then
          local h = redis.sha1hex(body)
          local prev = redis.call('HGET', attempts, h)
          if prev then
            a, c = counts(prev)
            a = a + 1
            redis.call('HDEL', attempts, h)
          end
        end
        n = n + 1
        out[n + 1] = body
        local suffix = ''
        if level ~= 0 or a ~= 1 or c ~= 0 then
          suffix = ':' .. level .. ':' .. fmt(a, c)
          meta[#meta + 1] = n .. suffix
        end
        if inflight then
          hset[i * 2 - 1] = (base + n) .. suffix
          hset[i * 2] = body
        end
      end
      -- Level by level: should a later level fail, what was popped already stays in flight.
      if inflight then redis.call('HSET', inflight, unpack(hset)) end
      if n >= want then break end
    end
  end
  out[1] = table.concat(meta, ',')
  return out, n
end
"""

# KEYS: ready0, delayed, attempts; ARGV: priority-list prefix, '1' to delete
_COUNT_OR_PURGE = LuaScript("""
local n = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
for level = 1, 9 do n = n + redis.call('LLEN', ARGV[1] .. level) end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  for level = 1, 9 do redis.call('DEL', ARGV[1] .. level) end
end
return n
""")


class ListKeys(QueueKeys):
    __slots__ = ("ready", "prio_prefix", "lists", "wait")

    def __init__(self, queue: str) -> None:
        super().__init__(queue)
        self.ready = queue
        self.prio_prefix = self.prefix + "p"
        self.lists = [queue] + [f"{self.prefix}p{n}" for n in range(1, LIST_MAX_PRIORITY + 1)]  # index = level
        self.wait = pack_command("BLMOVE", queue, queue, "RIGHT", "RIGHT", BLOCK_SECONDS)


class RedisListLayout(RedisBroker):
    """Publishing, waiting, counting and purging on the list layout (see the module docstring); priorities
    up to the kind's ``capabilities.max_priority``."""

    _keys_class = ListKeys
    _ready_type = "list"

    def _ready_key(self, queue: str, priority: int) -> str:
        return self._queue_keys(queue).lists[priority]

    def _heads(self, queue: str) -> list[bytes]:
        lists = self._queue_keys(queue).lists[:self.capabilities.max_priority + 1]
        found = raise_first_error(self._conn().pipeline([("LINDEX", key, -1) for key in lists]))  # the popping end
        return [bytes(body) for body in found if body is not None]

    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        keys = self._queue_keys(queue)
        level = self._check_priority(priority)
        conn = self._conn()
        delay = 0.0 if not_before is None else not_before - time.time()
        if delay > 0:
            SCHEDULE(conn, [keys.delayed], [repr(delay), *[delayed_member(level, "0", body) for body in bodies]])
            self._expect_due(queue, delay)
        elif len(bodies) == 1:
            conn.execute_command("LPUSH", keys.lists[level], bodies[0], spin=True)
        elif len(bodies) <= LIST_PUSH_BATCH:
            conn.execute_command("LPUSH", keys.lists[level], *bodies)
        else:
            raise_first_error(conn.pipeline([("LPUSH", keys.lists[level], *bodies[start:start + LIST_PUSH_BATCH])
                                             for start in range(0, len(bodies), LIST_PUSH_BATCH)]))

    def _wait(self, queue: str, timeout: float) -> None:
        packet = self._queue_keys(queue).wait
        look = PRIORITY_LOOK if self.capabilities.max_priority else 1.0
        self._wait_for(queue, timeout, lambda connection: packet, look)

    def _count_or_purge(self, queue: str, purge: bool) -> int:
        keys = self._queue_keys(queue)
        return int(_COUNT_OR_PURGE(self._conn(), [keys.ready, keys.delayed, keys.attempts],
                                   [keys.prio_prefix, "1" if purge else "0"]))

    def _size(self, queue: str) -> int:
        return self._count_or_purge(queue, False)

    def _purge(self, queue: str) -> int:
        return self._count_or_purge(queue, True)
