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

:meth:`~RedisListBroker.ack` sends nothing to Redis. Delivery tokens are tracked in the process
only, so acknowledging or rejecting a delivery twice raises
:class:`~funboost_like.core.errors.DoubleAckError` as on every broker.

Settings: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``, environment variable
``FUNBOOST_LIKE_REDIS_URL``), read at first use, never at import (and again after :meth:`close`);
passwords never reach a log. Needs Redis 6.2 or newer (``RPOP`` with a count).

Capabilities: no ack; persistent as far as Redis persists waiting messages (AOF/RDB); delay;
priority 0..9 (higher first); cross-process; cross-host; dead letters. Attempts are counted per
message across nacks (a release does not count one).

Cross-language contract: the ready list of priority 0 is the Redis LIST whose key is exactly the
queue name. Another program publishes by ``LPUSH <queue> <json text>``; consumers pop from the
other end, so the queue is FIFO. Bodies are stored as the raw bytes given. The other keys are the
ones REDIS_ACK_ABLE uses for waiting messages (so either kind may consume what the other
published), all sharing the queue name as a Redis Cluster hash tag:

* ``fl:{<queue>}:p<n>``, n in 1..9: ready lists of priority n, fetched before lower ones;
* ``fl:{<queue>}:delayed``: ZSET of messages not yet due, scored by due time (server clock),
  member ``<unique id>:<priority>:<deliveries so far>:<body>``;
* ``fl:{<queue>}:attempts``: HASH sha1(body) -> deliveries so far, for nacked messages waiting again;
* ``fl:{<queue>}:dead``: LIST of JSON envelopes ``{"body", "reason", "failed_at", "attempts"}``,
  newest first, trimmed to the newest 10,000.

Fetching: one Lua script moves due delayed messages to their lists, pops up to ``max_n`` messages
(``RPOP`` with a count, highest priority first) and reads their attempts. When nothing is ready it
waits with ``BRPOP`` on every priority list, which returns as soon as a message arrives; as Redis
ends blocking waits on its cron tick (up to 100 ms late at the default ``hz``), the last 100 ms of a
wait, and waits shorter than that, poll instead, so a fetch never blocks longer than its timeout.
Order: a nacked message goes to the back of its queue, a released one to the front; a delayed one
joins the back when due.

Limits: attempts of a message waiting again are keyed by its body's SHA1, so two byte-identical
bodies nacked at once may swap counts.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from redis.exceptions import RedisError

from funboost_like.brokers.base import Capabilities, Delivery
from funboost_like.brokers.redis_base import LIST_MAX_PRIORITY, RedisBrokerBase, RedisListPublishing
from funboost_like.brokers.redis_common import (
    DEAD_LETTER_LIMIT,
    LUA_MOVE_DUE,
    LUA_NEXT_DUE,
    LUA_NOW,
    SCHEDULE,
    DirectConnections,
    IdlePoller,
    LuaScript,
    blocking_budget,
    dead_letter_envelope,
    delayed_member,
    key_prefix,
    raise_first_error,
    translate_error,
)
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import DoubleAckError

logger = logging.getLogger("funboost_like.redis")

MAX_PRIORITY = LIST_MAX_PRIORITY
MAX_BATCH = 1000  # messages per fetch and per LPUSH command

# KEYS: ready0, delayed, attempts
# ARGV: max_n, priority-list prefix, level of a message already popped by BRPOP ('' for none), its body
# Reply: {meta, next due in ms ('' unless empty), body1, body2, ...}; meta lists "index:level:attempts"
# for each message not at level 0 or not on its first delivery, comma-separated.
_POP = LuaScript(LUA_NOW + LUA_MOVE_DUE + LUA_NEXT_DUE + """
local want = tonumber(ARGV[1])
move_due(KEYS[2], KEYS[1], ARGV[2], KEYS[3], now)
local track = redis.call('HLEN', KEYS[3]) > 0
local out = {'', ''}
local meta = {}
local n = 0
local function take(body, level)
  n = n + 1
  out[n + 2] = body
  local seen = 0
  if track then
    local h = redis.sha1hex(body)
    local prev = redis.call('HGET', KEYS[3], h)
    if prev then
      seen = tonumber(prev)
      redis.call('HDEL', KEYS[3], h)
    end
  end
  if level ~= 0 or seen ~= 0 then meta[#meta + 1] = n .. ':' .. level .. ':' .. (seen + 1) end
end
if ARGV[3] ~= '' then
  take(ARGV[4], tonumber(ARGV[3]))
  want = want + 1
end
for level = 9, 0, -1 do
  if n >= want then break end
  local key = KEYS[1]
  if level > 0 then key = ARGV[2] .. level end
  local got = redis.call('RPOP', key, want - n)
  if got then
    for i = 1, #got do take(got[i], level) end
  end
end
out[1] = table.concat(meta, ',')
if n == 0 then out[2] = tostring(next_due_ms(KEYS[2], now)) end
return out
""")

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


class _Keys:
    __slots__ = ("lists", "prio_prefix", "delayed", "attempts", "dead", "by_level", "level_of")

    def __init__(self, queue: str) -> None:
        prefix = key_prefix(queue)
        self.prio_prefix = prefix + "p"
        self.lists = [queue] + [f"{prefix}p{n}" for n in range(1, MAX_PRIORITY + 1)]  # index = level
        self.by_level = self.lists[::-1]  # highest priority first, for BRPOP
        self.level_of = {key.encode(): level for level, key in enumerate(self.lists)}
        self.delayed = prefix + "delayed"
        self.attempts = prefix + "attempts"
        self.dead = prefix + "dead"


def _sha1(body: bytes) -> str:
    return hashlib.sha1(body).hexdigest()


class RedisListBroker(RedisListPublishing[_Keys], RedisBrokerBase[_Keys]):
    """At-most-once Redis list broker; see the module docstring for keys, timing and the wire contract."""

    kind = BrokerEnum.REDIS
    capabilities = Capabilities(ack=False, persistent=True, delay=True, priority=True, cross_process=True,
                                cross_host=True, dead_letters=True, max_priority=MAX_PRIORITY)
    _keys_class = _Keys

    def __init__(self) -> None:
        self._tokens = itertools.count(1)
        super().__init__()

    def _reset_process_state(self) -> None:
        super()._reset_process_state()
        self._held: dict[int, None] = {}  # tokens fetched and not yet settled, in this process

    # -- publishing --------------------------------------------------------------------------------
    # -- consuming ---------------------------------------------------------------------------------
    def fetch(self, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        if max_n <= 0:
            return []
        n = min(max_n, MAX_BATCH)
        conn = self._conn()
        keys = self._queue_keys(queue)
        key_args = [queue, keys.delayed, keys.attempts]
        poller: IdlePoller | None = None
        try:
            while True:
                out = _POP(conn, key_args, [n, keys.prio_prefix, "", ""])
                if len(out) > 2:
                    return self._deliveries(queue, out)
                if poller is None:
                    poller = IdlePoller(timeout)
                remaining = poller.remaining()
                if remaining <= 0:
                    return []
                due_ms = int(out[1])
                wait = blocking_budget(remaining, due_ms / 1000 if due_ms > 0 else None)
                if not wait:
                    poller.sleep(remaining)
                    continue
                popped = conn.execute_command("BRPOP", *keys.by_level, f"{wait:.3f}")
                if popped:
                    key, body = popped
                    out = _POP(conn, key_args, [n - 1, keys.prio_prefix, keys.level_of[key], body])
                    return self._deliveries(queue, out)
        except RedisError as exc:
            raise translate_error(exc, f"fetching from queue {queue!r}") from exc

    def _deliveries(self, queue: str, out: list[bytes]) -> list[Delivery]:
        """Deliveries from the pop script's reply ``[meta, hint, body1, body2, ...]``."""
        tokens = self._tokens
        held = self._held
        meta = out[0]
        result = []
        if not meta:
            for body in itertools.islice(out, 2, None):
                token = next(tokens)
                held[token] = None
                result.append(Delivery(queue, body, token))
            return result
        special: dict[int, tuple[int, int]] = {}
        for item in meta.decode().split(","):
            position, level_text, count_text = item.split(":")
            special[int(position)] = (int(level_text), int(count_text))
        for index, body in enumerate(itertools.islice(out, 2, None), 1):
            token = next(tokens)
            held[token] = None
            level, attempts = special.get(index, (0, 1))
            result.append(Delivery(queue, body, token, attempts, level))
        return result

    def _settle(self, deliveries: Iterable[Delivery]) -> None:
        """Forget deliveries as settled; raise DoubleAckError for any settled before."""
        held = self._held
        missing = 0
        total = 0
        for delivery in deliveries:
            total += 1
            try:
                del held[delivery.token]
            except KeyError:
                missing += 1
        if missing:
            raise DoubleAckError(f"{missing} of {total} deliveries were already acknowledged or rejected")

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Nothing to tell Redis: the messages left it when fetched."""
        self._settle(deliveries)

    def nack(self, delivery: Delivery, *, requeue: bool = True, delay: float = 0.0) -> None:
        self._settle((delivery,))
        if not requeue:
            return
        self._push_back([delivery], counted=True, delay=delay)

    def release(self, deliveries: Iterable[Delivery]) -> None:
        """Push fetched-but-unstarted messages back to the front of their queue; no attempt is counted."""
        deliveries = list(deliveries)
        if deliveries:
            self._settle(deliveries)
            self._push_back(deliveries, counted=False, delay=0.0)

    def _push_back(self, deliveries: list[Delivery], *, counted: bool, delay: float) -> None:
        queue = deliveries[0].queue
        keys = self._queue_keys(queue)
        conn = self._conn()
        try:
            if delay > 0:
                for delivery in deliveries:
                    member = delayed_member(delivery.priority, delivery.attempts, delivery.body)
                    SCHEDULE(conn, [keys.delayed], [repr(float(delay)), member])
                return
            commands: list[tuple[Any, ...]] = []
            # Attempts first: whoever pops the message next finds its count.
            for delivery in deliveries:
                seen = delivery.attempts if counted else delivery.attempts - 1
                if seen > 0:
                    commands.append(("HSET", keys.attempts, _sha1(delivery.body), seen))
            # A nack joins the back of the queue; released messages go to the front (the popping
            # end), the first one pushed last so that it is popped first.
            verb, order = ("LPUSH", deliveries) if counted else ("RPUSH", deliveries[::-1])
            for delivery in order:
                commands.append((verb, keys.lists[delivery.priority if 0 < delivery.priority <= MAX_PRIORITY else 0],
                                 delivery.body))
            raise_first_error(conn.pipeline(commands))
        except RedisError as exc:
            raise translate_error(exc, f"handing back {len(deliveries)} message(s) of queue {queue!r}") from exc

    def dead_letter(self, delivery: Delivery, reason: str, exc: BaseException | None = None) -> None:
        self._settle((delivery,))
        dead = self._queue_keys(delivery.queue).dead
        envelope = dead_letter_envelope(delivery.body, reason, delivery.attempts)
        try:
            raise_first_error(self._conn().pipeline([("LPUSH", dead, envelope),
                                                     ("LTRIM", dead, 0, DEAD_LETTER_LIMIT - 1)]))
        except RedisError as exc2:
            raise translate_error(exc2, f"dead-lettering a message of queue {delivery.queue!r}") from exc2

    def in_flight(self, queue: str) -> int:
        """Always 0: fetched messages are no longer in Redis (they live in the consumer only)."""
        return 0

    # -- queue maintenance -------------------------------------------------------------------------
    def _run_count_or_purge(self, conn: DirectConnections, queue: str, purge: bool) -> Any:
        keys = self._queue_keys(queue)
        return _COUNT_OR_PURGE(conn, [queue, keys.delayed, keys.attempts], [keys.prio_prefix, "1" if purge else "0"])
