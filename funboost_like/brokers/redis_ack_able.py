"""REDIS_ACK_ABLE: Redis lists with per-consumer in-flight records and heartbeats.

Guarantee: at-least-once. A fetched message is moved, in one Lua script, from the ready list into
the in-flight hash of the fetching consumer, and leaves that hash only when acked, nacked, released
or dead-lettered. Consumers heartbeat and sweep as described in
:mod:`funboost_like.brokers.redis_consumers`: the in-flight messages of a consumer silent for
``dead_after`` seconds (15) go back to the front of their ready list, in their original order,
atomically, each counting an attempt and a crash; so a consumer killed with SIGKILL has its
messages fetchable again at most 20 s after its death with the defaults. Durability across a Redis
restart is Redis's own persistence setting (AOF/RDB).

Settings: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``, environment variable
``FUNBOOST_LIKE_REDIS_URL``), read at first use, never at import; passwords never reach a log.
``REDIS_HEARTBEAT_SECONDS`` (5) and ``REDIS_DEAD_AFTER_SECONDS`` (15), or
``RedisAckAbleBroker(heartbeat_interval=..., dead_after=...)``: give every consumer of a queue the
same values. Needs Redis 6.2 or newer (``RPOP`` with a count, ``BLMOVE``).

Capabilities: sweep redelivery, persistent (as far as Redis persists), delay, priority 0..9 (higher
first), cross-process, cross-host, dead letters, emulated routing (exchanges and routing keys, see
:mod:`funboost_like.brokers.redis_base`). Attempts are counted per message: a nack or a
crash recovery counts one, a release does not; crashes count the recoveries.

Cross-language contract: the list layout of :mod:`funboost_like.brokers.redis_base` (another program
publishes by ``LPUSH <queue> <json text>``; consumers pop from the other end, so the queue is FIFO;
bodies are the raw bytes given), plus:

* ``fl:{<queue>}:inflight:<consumer id>``: HASH delivery token -> body. A token is ``<n>`` for a
  first delivery at priority 0, ``<n>:<priority>:<counts>`` otherwise;
* ``fl:{<queue>}:consumers``: ZSET consumer id -> last heartbeat (server time);
* ``fl:{<queue>}:<namespace>:<key>``: key-value records (RPC results, task filters), Redis strings
  with PX expiry.

Order: a nacked message goes to the back of its queue, a released or recovered one to the front; a
delayed one joins the back when due (moved by the next fetch). An idle fetch waits with ``BLMOVE``
on the priority-0 list (see :class:`~funboost_like.brokers.redis_base.RedisListLayout`). The messages
of a fetch whose reply was lost are handed out by the next one (see
:mod:`funboost_like.brokers.redis_consumers`).

Limits: attempts of a message waiting again are keyed by its body's SHA1, so two byte-identical
bodies waiting again at once may swap counts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from funboost_like.brokers.base import Capabilities, Delivery
from funboost_like.brokers.redis_base import (
    LIST_MAX_PRIORITY,
    LUA_BURY,
    LUA_COUNTS,
    LUA_NOW,
    RedisListLayout,
    check_queue_name,
    parse_counts,
)
from funboost_like.brokers.redis_common import LuaScript, Piggyback
from funboost_like.brokers.redis_consumers import RedisConsumers, consumer_scripts
from funboost_like.brokers.redis_list import TAKE
from funboost_like.core.enums import BrokerEnum

MAX_BATCH = 1000  # messages per fetch; also the stride of delivery numbers between fetches

# The give-back script (see RedisConsumers._give_back); the items are in-flight hash fields. Each message
# still in flight is moved first and removed from the in-flight hash last, so a failing command leaves
# it in flight rather than nowhere.
_GIVE_BACK = LuaScript(LUA_NOW + LUA_COUNTS + LUA_BURY + """
local mode = ARGV[1]
local done = 0
for i = 7, #ARGV do
  local f = ARGV[i]
  local body = redis.call('HGET', KEYS[1], f)
  if body then
    local _, _, p, seen = string.find(f, ':(%d):([%d.]+)$')
    p = p or '0'
    local a, c = counts(seen or '1')
    if mode == 'head' then a = a - 1 end
    local key = KEYS[2]
    if p ~= '0' then key = ARGV[2] .. 'p' .. p end
    if mode == 'tail' or mode == 'head' then
      if mode == 'tail' then redis.call('LPUSH', key, body) else redis.call('RPUSH', key, body) end
      if a > 0 or c > 0 then redis.call('HSET', KEYS[4], redis.sha1hex(body), fmt(a, c)) end
    elseif mode == 'delay' then
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4] .. i .. ':' .. p .. ':' .. fmt(a, c) .. ':' .. body)
    elseif mode == 'dead' then
      bury(KEYS[5], ARGV[6])
    end
    redis.call('HDEL', KEYS[1], f)
    done = done + 1
  end
end
return done
""")

# The registry's functions (see redis_consumers.consumer_scripts): a dead consumer's in-flight messages go
# back to the popping end of their lists, newest first so the oldest runs first, one crash counted.
_SCRIPTS = consumer_scripts("""
local function inflight_key(cid) return ARGV[1] .. 'inflight:' .. cid end
local function held(cid)
  local key = inflight_key(cid)
  return redis.call('HLEN', key) - redis.call('HEXISTS', key, '_last')
end
local function recover(cid)
  local all = redis.call('HGETALL', inflight_key(cid))
  local items = {}
  for i = 1, #all, 2 do
    local m = string.match(all[i], '^(%d+)')
    if m then
      local _, _, p, seen = string.find(all[i], ':(%d):([%d.]+)$')
      items[#items + 1] = {tonumber(m), p or '0', seen or '1', all[i + 1]}
    end
  end
  table.sort(items, function(x, y) return x[1] > y[1] end)
  for _, it in ipairs(items) do
    local key = KEYS[2]
    if it[2] ~= '0' then key = ARGV[1] .. 'p' .. it[2] end
    redis.call('RPUSH', key, it[4])
    local a, c = counts(it[3])
    redis.call('HSET', KEYS[3], redis.sha1hex(it[4]), fmt(a, c + 1))
  end
  return #items
end
local function forget(cid) redis.call('DEL', inflight_key(cid)) end
""")


class RedisAckAbleBroker(RedisConsumers, RedisListLayout):
    """At-least-once Redis broker; see the module docstring for keys, timing and the wire contract."""

    kind = BrokerEnum.REDIS_ACK_ABLE
    capabilities = Capabilities(redelivery="sweep", delay="native", max_priority=LIST_MAX_PRIORITY, dead_letters=True,
                                key_value=True, routing="emulated", persistent=True, cross_process=True,
                                cross_host=True, queue_names=check_queue_name)
    _scripts = _SCRIPTS
    _give_back_script = _GIVE_BACK

    def _after_fork(self) -> None:
        super()._after_fork()
        self._inflight: dict[str, str] = {}  # queue -> this consumer's in-flight hash
        self._seq = itertools.count(1)  # fetches of this consumer (a forked child is a new one)

    def _open(self, queue: str) -> None:
        self._inflight[queue] = f"{self._queue_keys(queue).prefix}inflight:{self._cid}"

    # -- consuming ---------------------------------------------------------------------------------
    def _fetch(self, before: Piggyback | None, queue: str, max_n: int) -> list[Delivery]:
        keys = self._queue_keys(queue)
        ikey = self._inflight[queue]
        base = next(self._seq) * MAX_BATCH
        out = TAKE(self._conn(), [keys.ready, keys.delayed, keys.attempts, ikey, keys.consumers],
                   [min(max_n, MAX_BATCH), keys.prio_prefix, base, self._cid], before)
        got, special = self._taken(queue, out, zip(itertools.repeat(ikey), map(str, itertools.count(base + 1))))
        for index, rest in special.items():  # their in-flight fields say so
            got[index - 1].token = (ikey, f"{base + index}:{rest}")
        return got

    def _adopt(self, before: Piggyback | None, queue: str, held: set[Any]) -> list[Delivery]:
        ikey = self._inflight[queue]
        stored = self._conn().execute_command("HGETALL", ikey, before=before)  # a map in RESP3, pairs in RESP2
        pairs = stored.items() if isinstance(stored, dict) else zip(stored[::2], stored[1::2], strict=True)
        items = sorted((int(field.split(b":")[0]), field.decode(), body) for field, body in pairs
                       if field[:1].isdigit() and (ikey, field.decode()) not in held)
        result = []
        for _, field, body in items:
            _, _, rest = field.partition(":")
            level, _, seen = rest.partition(":")
            attempts, crashes = parse_counts(seen or "1")
            result.append(Delivery(queue, body, (ikey, field), attempts, int(level or 0), crashes))
        return result

    def _ack_commands(self, deliveries: Sequence[Delivery]) -> list[tuple[Any, ...]]:
        fields: dict[str, list[str]] = {}  # the in-flight hash fields of ``deliveries``, by hash key
        for delivery in deliveries:
            key, field = delivery.token
            fields.setdefault(key, []).append(field)
        return [("HDEL", key, *group) for key, group in fields.items()]

    def _acked(self, replies: list[Any], total: int) -> int:
        return sum(replies)

    def _in_flight_item(self, delivery: Delivery) -> tuple[Any, ...]:
        return delivery.token
