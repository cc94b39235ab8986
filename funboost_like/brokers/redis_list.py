"""REDIS: a plain Redis list; at-most-once, and the fastest Redis kind.

Guarantee: at-most-once. A fetch pops messages off the list; from then on they exist only in the
consuming process, and the server forgets them. A consumer process killed with SIGKILL (or losing
power) loses every message it held: those fetched but not started plus those running. The consume
loop never fetches more than its free capacity, so that is at most ``concurrent_num`` messages per
consumer process and kill. Measured by ``tests/test_redis_brokers.py``: with ``concurrent_num=20``
and 20 ms calls, one SIGKILL lost 19 to 20 messages (docs/guarantees.md). A fetch whose reply is
lost on a broken connection loses what it popped as well. Use REDIS_ACK_ABLE,
RedisBrpopLpush or REDIS_STREAM when messages must survive a crash. A graceful stop (SIGINT,
SIGTERM) loses nothing: unstarted messages are pushed back and running calls finish.

An ack sends nothing to Redis; acknowledging or rejecting a delivery twice raises
:class:`~funboost_like.core.errors.DoubleAckError` as on every broker.

Settings: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``, environment variable
``FUNBOOST_LIKE_REDIS_URL``), read at first use, never at import (and again after ``close()``);
passwords never reach a log. Needs Redis 6.2 or newer (``RPOP`` with a count, ``BLMOVE``).

Capabilities: no redelivery; persistent as far as Redis persists waiting messages (AOF/RDB); delay;
priority 0..9 (higher first); cross-process; cross-host; dead letters; emulated routing (exchanges and
routing keys, see :mod:`funboost_like.brokers.redis_base`). Attempts are counted per
message across nacks (a release does not count one).

Cross-language contract: the ready list of priority 0 is the Redis LIST whose key is exactly the
queue name. Another program publishes by ``LPUSH <queue> <json text>``; consumers pop from the
other end, so the queue is FIFO. Bodies are stored as the raw bytes given. The other keys are the
ones REDIS_ACK_ABLE uses for waiting messages (so either kind may consume what the other
published; see :mod:`funboost_like.brokers.redis_base`): ``fl:{<queue>}:p<n>`` (priority n),
``fl:{<queue>}:delayed``, ``fl:{<queue>}:attempts`` and ``fl:{<queue>}:dead``.

Fetching: one Lua script moves due delayed messages to their lists, pops up to ``max_n`` messages
(``RPOP`` with a count, highest priority first) and reads their attempts. An idle fetch waits with
``BLMOVE <queue> <queue> RIGHT RIGHT`` on its own connection (returning as soon as a message
arrives, without taking it) and looks at the priority lists every 0.2 s. Order: a nacked message
goes to the back of its queue, a released one to the front; a delayed one joins the back when due.

Limits: attempts of a message waiting again are keyed by its body's SHA1, so two byte-identical
bodies nacked at once may swap counts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from funboost_like.brokers.base import Capabilities, DeadLetter, Delivery
from funboost_like.brokers.redis_base import (
    DEAD_LETTER_LIMIT,
    LIST_MAX_PRIORITY,
    LUA_COUNTS,
    LUA_MOVE_DUE,
    LUA_NEXT_DUE,
    LUA_NOW,
    PUT_MANY,
    RedisListLayout,
    check_queue_name,
    counts,
    delayed_member,
)
from funboost_like.brokers.redis_common import LuaScript, raise_first_error, sha1_hex
from funboost_like.core.enums import BrokerEnum

MAX_BATCH = 1000  # messages per fetch

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

# KEYS: ready0, delayed, attempts, then (at-least-once kinds) the consumer's in-flight HASH and the
# consumers ZSET; ARGV: max_n, priority-list prefix, then the first delivery number and the consumer id.
# Heartbeat (with a consumer), move due delayed messages, then take ready ones (into the in-flight hash,
# level by level). Reply: see take_ready; or, when nothing is ready, the milliseconds until the next
# delayed message is due (-1: none).
TAKE = LuaScript(LUA_NOW + LUA_TAKE_READY + LUA_MOVE_DUE + LUA_NEXT_DUE + """
if KEYS[4] then redis.call('ZADD', KEYS[5], now, ARGV[4]) end
move_due(KEYS[2], KEYS[1], ARGV[2], KEYS[3], now)
local out, n = take_ready(tonumber(ARGV[1]), KEYS[1], ARGV[2], KEYS[3], KEYS[4], tonumber(ARGV[3] or 0))
if n == 0 then return next_due_ms(KEYS[2], now) end
return out
""")


class RedisListBroker(RedisListLayout):
    """At-most-once Redis list broker; see the module docstring for keys, timing and the wire contract."""

    kind = BrokerEnum.REDIS
    capabilities = Capabilities(redelivery="none", delay="native", max_priority=LIST_MAX_PRIORITY, dead_letters=True,
                                key_value=True, routing="emulated", persistent=True, cross_process=True,
                                cross_host=True, queue_names=check_queue_name)

    def __init__(self) -> None:
        self._tokens = itertools.count(1)
        super().__init__()

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        keys = self._queue_keys(queue)
        out = TAKE(self._conn(), [queue, keys.delayed, keys.attempts], [min(max_n, MAX_BATCH), keys.prio_prefix])
        return self._taken(queue, out, self._tokens)[0]

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        """Nothing to tell Redis: the messages left it when fetched."""

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        keys = self._queue_keys(deliveries[0].queue)
        conn = self._conn()
        seen = [counts(d.attempts if count_attempt else d.attempts - 1, d.crashes) for d in deliveries]
        if delay > 0:
            members = [delayed_member(d.priority, s, d.body) for d, s in zip(deliveries, seen, strict=True)]
            PUT_MANY(conn, [keys.delayed], [repr(float(delay)), "zset", *members])
            return
        # Counts first: whoever pops the message next finds them.
        commands: list[tuple[Any, ...]] = [("HSET", keys.attempts, sha1_hex(d.body), s)
                                           for d, s in zip(deliveries, seen, strict=True) if s != "0"]
        # A nack joins the back of the queue; released messages go to the front (the popping end),
        # the first one pushed last so that it is popped first.
        verb, order = ("RPUSH", deliveries[::-1]) if front else ("LPUSH", deliveries)
        commands.extend((verb, keys.lists[d.priority], d.body) for d in order)
        raise_first_error(conn.pipeline(commands))

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        dead = self._queue_keys(delivery.queue).dead
        raise_first_error(self._conn().pipeline([("LPUSH", dead, letter.envelope()),
                                                 ("LTRIM", dead, 0, DEAD_LETTER_LIMIT - 1)]))

    def in_flight(self, queue: str) -> int:
        """Always 0: fetched messages are no longer in Redis (they live in the consumer only)."""
        return 0
