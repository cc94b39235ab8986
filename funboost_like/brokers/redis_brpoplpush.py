"""RedisBrpopLpush: a Redis list whose messages move, by Redis's own LMOVE, into per-consumer lists.

Guarantee: at-least-once. A fetch moves each message with ``LMOVE <queue> <in-flight list> RIGHT
LEFT`` (the successor of ``RPOPLPUSH``), so a message is always in the queue or in exactly one
consumer's in-flight list, never in neither. It leaves the in-flight list only when acked
(``LREM``), nacked, released or dead-lettered. Consumers heartbeat (also with every fetch) and
sweep as described in :mod:`funboost_like.brokers.redis_consumers`: the in-flight list of a consumer
silent for ``dead_after`` seconds (15) goes back to the front of the queue, oldest message first,
in one Lua script, each message counting an attempt and a crash; so a consumer killed with SIGKILL
has its messages fetchable again at most 20 s after its death with the defaults. This is the design of
REDIS_ACK_ABLE with a plain list for the in-flight messages and no Lua script on the fetch path;
durability across a Redis restart is Redis's own persistence setting (AOF/RDB).

Settings: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``, environment variable
``FUNBOOST_LIKE_REDIS_URL``), read at first use, never at import; passwords never reach a log.
``REDIS_HEARTBEAT_SECONDS`` and ``REDIS_DEAD_AFTER_SECONDS`` (or ``RedisBrpopLpushBroker(
heartbeat_interval=..., dead_after=...)``): give every consumer of a queue the same values. Needs
Redis 6.2 or newer (``LMOVE``).

Capabilities: sweep redelivery, persistent (as far as Redis persists), delay, cross-process,
cross-host, dead letters, emulated routing (exchanges and routing keys, see
:mod:`funboost_like.brokers.redis_base`). No priority: one list per queue is what makes the fetch a plain pipeline
of ``LMOVE`` (REDIS_ACK_ABLE has priorities). Attempts are counted per message: a nack or a crash
recovery counts one, a release does not; crashes count the recoveries.

Cross-language contract: the queue is the Redis LIST whose key is exactly the queue name. Another
program publishes by ``LPUSH <queue> <json text>``; consumers take from the other end, so the queue
is FIFO. Bodies are stored as the raw bytes given. The other keys share the queue name as a Redis
Cluster hash tag (see :mod:`funboost_like.brokers.redis_base` for delayed messages and dead letters):

* ``fl:{<queue>}:unack:<consumer id>``: LIST of the bodies a consumer holds, newest at the head;
* ``fl:{<queue>}:unack-consumers``: ZSET consumer id -> last heartbeat (server time);
* ``fl:{<queue>}:attempts``: HASH sha1(body) -> counts, for messages delivered more than once (kept
  while such a message is in flight, so a crash recovery counts on from it).

Fetching: one pipeline (not a transaction) of a small Lua script (heartbeat, due delayed messages)
and ``max_n`` ``LMOVE`` commands, so a batch costs one round trip; a second one reads attempts only
while some message is on a later delivery. An idle fetch waits with ``BLMOVE <queue> <queue> RIGHT
RIGHT`` on its own connection, which returns when a message arrives without taking it. A fetch whose
reply was lost on a broken connection left its messages in this consumer's in-flight list: the next
fetch of that queue hands them out, if no other thread of the process is fetching the same queue at
that moment (otherwise they come back when the process ends).

Order: a nacked message goes to the back of the queue, a released or recovered one to the front.

Limits: acks remove by value (``LREM``), so byte-identical bodies in flight at once are
interchangeable (each ack removes one copy), and their attempt counts are shared.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from funboost_like.brokers.base import Capabilities, Delivery
from funboost_like.brokers.redis_base import (
    LUA_BURY,
    LUA_MOVE_DUE,
    LUA_NEXT_DUE,
    LUA_NOW,
    ListKeys,
    RedisListLayout,
    check_queue_name,
    counts,
    parse_counts,
)
from funboost_like.brokers.redis_common import DirectConnections, LuaScript, Piggyback, pack_command, sha1_hex
from funboost_like.brokers.redis_consumers import RedisConsumers, consumer_scripts
from funboost_like.core.enums import BrokerEnum

MAX_BATCH = 500  # LMOVE commands per fetch

# KEYS: consumers, delayed, queue, attempts; ARGV: consumer id, priority-list prefix
# Heartbeat with every fetch (so a consumer swept while stalled is registered again before it takes
# more), and move due delayed messages. Returns milliseconds until the next one is due, or -1.
_PREPARE = LuaScript(LUA_NOW + LUA_MOVE_DUE + LUA_NEXT_DUE + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
move_due(KEYS[2], KEYS[3], ARGV[2], KEYS[4], now)
return next_due_ms(KEYS[2], now)
""")

# The give-back script (see RedisConsumers._give_back); the items are pairs (body, counts so far). Each
# body still in flight is handed over first and removed from the in-flight list last, so a failing
# command leaves it in flight rather than nowhere.
_GIVE_BACK = LuaScript(LUA_NOW + LUA_BURY + """
local mode = ARGV[1]
local done = 0
for i = 7, #ARGV, 2 do
  local body = ARGV[i]
  if redis.call('LPOS', KEYS[1], body) then
    local h = redis.sha1hex(body)
    if mode == 'tail' then
      redis.call('HSET', KEYS[4], h, ARGV[i + 1])
      redis.call('LPUSH', KEYS[2], body)
    elseif mode == 'head' then
      redis.call('RPUSH', KEYS[2], body)
    elseif mode == 'delay' then
      redis.call('HDEL', KEYS[4], h)
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4] .. i .. ':0:' .. ARGV[i + 1] .. ':' .. body)
    else
      redis.call('HDEL', KEYS[4], h)
      if mode == 'dead' then bury(KEYS[5], ARGV[6]) end
    end
    redis.call('LREM', KEYS[1], -1, body)
    done = done + 1
  end
end
return done
""")

# The registry's functions (see redis_consumers.consumer_scripts): a dead consumer's in-flight list goes
# back to the popping end of the queue, newest moved first so the oldest is taken first.
_SCRIPTS = consumer_scripts("""
local function held(cid) return redis.call('LLEN', ARGV[1] .. 'unack:' .. cid) end
local function recover(cid)
  local key = ARGV[1] .. 'unack:' .. cid
  local moved = 0
  while true do
    local body = redis.call('LMOVE', key, KEYS[2], 'LEFT', 'RIGHT')
    if not body then break end
    local h = redis.sha1hex(body)
    local a, c = counts(redis.call('HGET', KEYS[3], h))
    redis.call('HSET', KEYS[3], h, fmt(a + 1, c + 1))
    moved = moved + 1
  end
  return moved
end
local function forget(cid) end
""")


class _Keys(ListKeys):
    __slots__ = ("unack_prefix",)

    def __init__(self, queue: str) -> None:
        super().__init__(queue)
        self.unack_prefix = self.prefix + "unack:"
        self.consumers = self.prefix + "unack-consumers"


class RedisBrpopLpushBroker(RedisConsumers, RedisListLayout):
    """At-least-once Redis broker on LMOVE; see the module docstring for keys, timing and the wire contract.

    A delivery's token is (in-flight list, number, body)."""

    kind = BrokerEnum.RedisBrpopLpush
    capabilities = Capabilities(redelivery="sweep", delay="native", dead_letters=True, key_value=True,
                                routing="emulated", persistent=True, cross_process=True, cross_host=True,
                                queue_names=check_queue_name)
    _scripts = _SCRIPTS
    _give_back_script = _GIVE_BACK
    _keys_class = _Keys

    def _after_fork(self) -> None:
        super()._after_fork()
        self._unack: dict[str, str] = {}  # queue -> this consumer's in-flight list
        self._tokens = itertools.count(1)

    def _open(self, queue: str) -> None:
        self._unack[queue] = self._queue_keys(queue).unack_prefix + self._cid

    # -- consuming ---------------------------------------------------------------------------------
    def _fetch(self, before: Piggyback | None, queue: str, max_n: int) -> list[Delivery]:
        keys = self._queue_keys(queue)
        conn = self._conn()
        bodies, due_ms, tracked = self._move(conn, queue, keys, self._unack[queue], min(max_n, MAX_BATCH), before)
        if not bodies:
            self._due_in(queue, due_ms)
            return []
        return self._deliveries(conn, queue, keys, self._unack[queue], bodies, tracked)

    def _move(self, conn: DirectConnections, queue: str, keys: _Keys, unack: str,
              n: int, before: Piggyback | None) -> tuple[list[bytes], int, bool]:
        """One pipeline: heartbeat and due messages, ``n`` LMOVEs, HLEN of attempts.

        Returns the bodies moved, milliseconds until the next delayed message is due (-1: none) and
        whether any message is on a later delivery (then attempts must be read).
        """
        packet = keys.packets.get((self._cid, n))
        if packet is None:  # the same bytes for every fetch of n messages: packed once
            packet = keys.packets[(self._cid, n)] = b"".join([
                pack_command("EVALSHA", _PREPARE.sha, 4, keys.consumers, keys.delayed, queue, keys.attempts,
                             self._cid, keys.prio_prefix),
                pack_command("LMOVE", queue, unack, "RIGHT", "LEFT") * n,
                pack_command("HLEN", keys.attempts)])
        replies = conn.send_packets((packet,), n + 2, before)
        prepared = replies[0]
        bodies = []
        error = None
        for reply in itertools.islice(replies, 1, n + 1):
            if isinstance(reply, ResponseError):
                error = reply
            elif reply is not None:  # None: empty at that moment; a later move may still find one
                bodies.append(reply)
        if error is not None and not bodies:
            raise error
        if isinstance(prepared, NoScriptError):  # a restarted server: load the script and run it now
            prepared = _PREPARE(conn, [keys.consumers, keys.delayed, queue, keys.attempts],
                                [self._cid, keys.prio_prefix])
        elif isinstance(prepared, ResponseError):
            raise prepared
        tracked = replies[-1]
        return bodies, int(prepared), not isinstance(tracked, int) or tracked > 0

    def _deliveries(self, conn: DirectConnections, queue: str, keys: _Keys, unack: str, bodies: list[bytes],
                    tracked: bool) -> list[Delivery]:
        tokens = self._tokens
        if not tracked:
            return [Delivery(queue, body, (unack, next(tokens), body)) for body in bodies]
        # Some message is on a later delivery: its counts are in the attempts hash (kept until it ends).
        seen = conn.execute_command("HMGET", keys.attempts, *[sha1_hex(body) for body in bodies])
        result = []
        for body, value in zip(bodies, seen, strict=True):
            attempts, crashes = parse_counts(value)
            result.append(Delivery(queue, body, (unack, next(tokens), body), attempts + 1, 0, crashes))
        return result

    def _adopt(self, before: Piggyback | None, queue: str, held: set[Any]) -> list[Delivery]:
        unack = self._unack[queue]
        conn = self._conn()
        stored = conn.execute_command("LRANGE", unack, 0, -1, before=before)
        known = collections.Counter(token[2] for token in held)
        extra: list[bytes] = []
        for body in reversed(stored):  # oldest first
            if known[body]:
                known[body] -= 1
            else:
                extra.append(body)
        return self._deliveries(conn, queue, self._queue_keys(queue), unack, extra, True) if extra else []

    # -- settling ----------------------------------------------------------------------------------
    def _ack_commands(self, deliveries: Sequence[Delivery]) -> list[tuple[Any, ...]]:
        """One ``LREM`` per delivery from its in-flight list, then the ``HDEL`` of retried ones' counts."""
        commands: list[tuple[Any, ...]] = [("LREM", d.token[0], -1, d.body) for d in deliveries]
        retried: dict[str, list[str]] = {}
        for delivery in deliveries:
            if delivery.attempts > 1:
                retried.setdefault(self._queue_keys(delivery.queue).attempts, []).append(sha1_hex(delivery.body))
        commands.extend(("HDEL", key, *hashes) for key, hashes in retried.items())
        return commands

    def _acked(self, replies: list[Any], total: int) -> int:
        return sum(replies[:total])

    def _in_flight_item(self, delivery: Delivery) -> tuple[Any, ...]:
        return delivery.token[0], delivery.body, counts(delivery.attempts, delivery.crashes)
