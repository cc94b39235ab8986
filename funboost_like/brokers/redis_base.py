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
* Routing (exchanges and routing keys, emulated the same way on the four kinds; see
  docs/routing.md): the bindings of an exchange are the HASH ``fl:exchange:{<name>}``: the field
  ``type`` holds the exchange type (set by the first bind: an exchange keeps its first type, a bind
  asking for another one logs a warning), and each binding is a field ``["<queue>",
  "<binding key>"]`` (JSON). A bind is one Lua script, so concurrent binds never mix types
  (``_BIND``); the string ``fl:exchange:{<name>}:layout`` (``list`` or ``stream``) is set by the
  first bind, and a bind of a queue of the other layout is refused. A routed publish reads the HASH,
  picks the matching queues in Python, then one Lua script writes the messages to every matching
  queue in the kind's own layout (the ready key of their priority, ``XADD`` for streams, the delayed
  ZSET for ``not_before``). Atomic: the script runs alone on the server, so no client ever sees the
  message in some of the queues and not in the others; it checks the type of every key before
  writing, so a key of another type fails the publish with nothing written; and Redis persists a
  script's writes as one transaction (AOF, replicas) or not at all (an RDB snapshot is taken between
  commands). Redis never rolls a script back, so only a server refusing a write midway (out of
  memory under ``maxmemory`` with ``noeviction``) could leave some queues without the message. As
  for every publish, a reply lost on a broken connection makes the client send the script again,
  which may publish the messages twice. Not Redis-Cluster-safe: the keys of different queues and the
  exchange's HASH are in different hash slots.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from funboost_like.brokers.base import Broker, DeadLetter, Delivery
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
from funboost_like.brokers.redis_store import RedisKeyValueStore
from funboost_like.brokers.routing import Binding
from funboost_like.brokers.routing import logger as routing_logger
from funboost_like.core import codec
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

# KEYS: a list; returns its length and deletes it.
PURGE_LIST = LuaScript("local n = redis.call('LLEN', KEYS[1]) redis.call('DEL', KEYS[1]) return n")

# KEYS: the key each matching queue gets the messages in; ARGV: delay seconds, the keys' type ('list':
# LPUSH, 'stream': XADD with the field 'data', 'zset': the delayed ZSET, scored now + delay), then the
# bodies (or delayed members). Every key's type is checked first: a key of another type changes nothing.
PUT_MANY = LuaScript(LUA_NOW + """
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


# KEYS: an exchange's HASH (see the module docstring); ARGV: exchange type, then the fields of the
# bindings. Returns the type the exchange was first declared with.
_BIND = LuaScript("""
local layout = redis.call('GET', KEYS[2])
if layout and layout ~= ARGV[2] then return redis.error_reply('FL_LAYOUT ' .. layout) end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('HSETNX', KEYS[1], 'type', ARGV[1])
for i = 3, #ARGV do redis.call('HSETNX', KEYS[1], ARGV[i], '') end
return redis.call('HGET', KEYS[1], 'type')
""")


def check_queue_name(queue: str) -> None:
    """Refuse a queue name starting with ``fl:``: a queue's own key is its name, and the framework's keys
    (``fl:{<queue>}:dead``, ``fl:{<queue>}:p1``, ``fl:exchange:...``) start so; a queue named like one
    of them would share that key with the queue it belongs to."""
    if queue.startswith("fl:"):
        raise ConfigurationError(f"Redis queue names must not start with 'fl:' (the prefix of the framework's own "
                                 f"keys, such as fl:{{<queue>}}:dead), not {queue!r}")


def _exchange_key(exchange: str) -> str:
    return f"fl:exchange:{{{exchange}}}"


def counts(attempts: int, crashes: int) -> str:
    """``<deliveries>`` or ``<deliveries>.<crashes>``: a message's counts as the Redis brokers keep them."""
    return f"{attempts}.{crashes}" if crashes else str(attempts)


def parse_counts(value: bytes | str | None) -> tuple[int, int]:
    if not value:
        return 0, 0
    text = value.decode() if isinstance(value, bytes) else value
    attempts, _, crashes = text.partition(".")
    return int(attempts), int(crashes or 0)


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


class RedisBroker(Broker):
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

    def _due_in(self, queue: str, due_ms: int) -> None:
        """Note when the first delayed message of ``queue`` is due (``due_ms`` from now; -1: none)."""
        self._next_due[queue] = time.monotonic() + due_ms / 1000 if due_ms >= 0 else float("inf")

    def _wait_for(self, queue: str, timeout: float, command: Callable[[AbstractConnection], bytes],
                  look: float = 1.0) -> None:
        """The blocking wait of an idle fetch, cut short when a delayed message is due and after ``look``
        seconds (to look at what the blocking command does not watch)."""
        wait = min(timeout, look, self._next_due.get(queue, float("inf")) - time.monotonic())
        if wait > 0:
            self._blocking.wait(self._conn(), queue, wait, command)

    def key_value_store(self, queue: str, namespace: str) -> RedisKeyValueStore:
        """Records as Redis strings ``fl:{<queue>}:<namespace>:<key>`` with PX expiry."""
        return self._kv_store((queue, namespace), lambda: RedisKeyValueStore(queue, namespace, self))

    def _check_priority(self, priority: int) -> int:
        top = self.capabilities.max_priority
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= top:
            raise ConfigurationError(f"{type(self).__name__} takes priorities 0..{top} (integers), not {priority!r}")
        return priority

    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        if not_before is not None and not_before > time.time():  # into the delayed ZSET, as a routed publish does
            return self._put_many((queue,), bodies, priority=priority, not_before=not_before)
        self._push(queue, bodies, self._check_priority(priority))

    def _push(self, queue: str, bodies: Sequence[bytes], level: int) -> None:
        """Append ``bodies`` to the ready messages of priority ``level`` of ``queue``."""
        raise NotImplementedError

    # -- routing (emulated; see the module docstring) ------------------------------------------------
    def _ready_key(self, queue: str, priority: int) -> str:
        """The key a message of ``priority`` waits in: the queue's own key (the list kinds override)."""
        return queue

    def _bind(self, bindings: Sequence[Binding]) -> None:
        """Add ``bindings`` (all of one exchange and queue) to their exchange's HASH."""
        first = bindings[0]
        fields = [codec.dumps([binding.queue, binding.key]) for binding in bindings]
        try:
            key = _exchange_key(first.exchange)
            declared = _BIND(self._conn(), [key, key + ":layout"], [first.exchange_type, self._ready_type, *fields]
                             ).decode()
        except ResponseError as exc:  # a list kind's queue would get a stream's XADD (or the other way round)
            if not str(exc).startswith("FL_LAYOUT"):
                raise
            kept = str(exc).split()[1]
            raise ConfigurationError(f"exchange {first.exchange!r} routes to Redis queues kept as {kept}s; queue "
                                     f"{first.queue!r} of {type(self).__name__} is a {self._ready_type}: bind the "
                                     "queues of one exchange in kinds of one layout") from None
        if declared != first.exchange_type:
            routing_logger.warning("exchange %r exists as %s; binding queue %r with keys %r to it as it is, not as %s",
                                   first.exchange, declared, first.queue, [b.key for b in bindings],
                                   first.exchange_type)

    def _bindings(self, exchange: str) -> list[Binding]:
        """Every binding of ``exchange``, with the type it was first declared with ([] when it has none)."""
        stored = self._conn().execute_command("HGETALL", _exchange_key(exchange))  # a map in RESP3
        fields = dict(stored.items() if isinstance(stored, dict) else zip(stored[::2], stored[1::2], strict=True))
        declared = fields.pop(b"type", b"").decode()
        return [Binding(exchange, declared, *codec.loads(field)) for field in fields]

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
        PUT_MANY(self._conn(), keys, [repr(max(delay, 0.0)), kind, *bodies])
        for queue in queues if delay > 0 else ():  # an idle fetch of these queues wakes when it is due
            self._next_due[queue] = min(self._next_due.get(queue, float("inf")), time.monotonic() + delay)

    # -- dead letters ------------------------------------------------------------------------------
    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        items = self._guard(f"listing dead letters of queue {queue!r}", self._conn().execute_command, "LRANGE",
                          key_prefix(queue) + "dead", 0, limit - 1)
        return [DeadLetter.from_envelope(queue, item) for item in items]

    def purge_dead_letters(self, queue: str) -> int:
        return int(self._guard(f"purging dead letters of queue {queue!r}", PURGE_LIST, self._conn(),
                             [key_prefix(queue) + "dead"], []))

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        if limit <= 0:
            return []
        found = self._guard(f"listing delayed messages of queue {queue!r}", self._conn().execute_command, "ZRANGE",
                            key_prefix(queue) + "delayed", 0, limit - 1, "WITHSCORES")
        pairs = found if found and isinstance(found[0], list | tuple) else zip(found[::2], found[1::2], strict=True)
        return [(float(score), _DELAYED_MEMBER.sub(b"", member, count=1)) for member, score in pairs]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        return bool(self._guard(f"removing a dead letter of queue {queue!r}", self._conn().execute_command, "LREM",
                                key_prefix(queue) + "dead", 1, letter.ref))

    def _stopped_consuming(self, queue: str) -> None:
        """Close the connection the idle fetches of ``queue`` waited on: a process consuming queue after
        queue kept one open per queue it had ever consumed."""
        self._blocking.close_queue(queue)

    def _close(self) -> None:
        """Forget the connections (shared per process) and close the blocking waits' own."""
        self._redis = None
        self._blocking.close()


# -- the list layout of REDIS and REDIS_ACK_ABLE ------------------------------------------------------

LIST_MAX_PRIORITY = 9
LIST_PUSH_BATCH = 1000  # values per LPUSH command of publish_many
PRIORITY_LOOK = 0.2  # an idle fetch waits on the priority-0 list and looks at the others this often

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

    def _taken(self, queue: str, out: Any, tokens: Iterator[Any]) -> tuple[list[Delivery], dict[int, str]]:
        """The deliveries of a reply of ``redis_list.TAKE`` (named in order by ``tokens``) and its special
        ones: those not at priority 0 or not on their first delivery, listed ``index:level:counts,...``,
        as index -> ``level:counts``. None when nothing was ready (then the next due time is noted)."""
        if isinstance(out, int):
            self._due_in(queue, out)
            return [], {}
        got = [Delivery(queue, body, token) for body, token in zip(out[1:], tokens, strict=False)]
        special: dict[int, str] = {}
        for item in out[0].decode().split(",") if out[0] else ():
            index, level, seen = item.split(":")
            delivery = got[int(index) - 1]
            delivery.priority, (delivery.attempts, delivery.crashes) = int(level), parse_counts(seen)
            special[int(index)] = f"{level}:{seen}"
        return got, special

    def _heads(self, queue: str) -> list[bytes]:
        lists = self._queue_keys(queue).lists[:self.capabilities.max_priority + 1]
        found = raise_first_error(self._conn().pipeline([("LINDEX", key, -1) for key in lists]))  # the popping end
        return [bytes(body) for body in found if body is not None]

    def _push(self, queue: str, bodies: Sequence[bytes], level: int) -> None:
        keys = self._queue_keys(queue)
        conn = self._conn()
        if len(bodies) == 1:
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
