"""REDIS_ACK_ABLE: Redis lists with per-consumer in-flight records and heartbeats.

Guarantee: at-least-once. A fetched message is moved, in one Lua script, from the ready list into
the in-flight hash of the fetching consumer, and leaves that hash only through :meth:`ack`,
:meth:`nack`, :meth:`release` or :meth:`dead_letter`. Every broker instance (one per process; a
forked child gets a new identity) is a consumer with a unique id and a daemon thread, started at its
first fetch, that refreshes its heartbeat every ``heartbeat_interval`` seconds (default 5) and sweeps:
the in-flight messages of a consumer whose heartbeat is older than ``dead_after`` seconds (default 15)
go back to the front of their ready list, in their original order, atomically. So the messages of
a consumer killed with SIGKILL are fetchable again at most ``dead_after + heartbeat_interval``
seconds after it died (20 s with the defaults), provided some consumer of the queue runs (a
consumer that starts later sweeps at once). All times are the Redis server's clock (``TIME``), so
hosts with skewed clocks do not reclaim each other's messages early. ``dead_after`` and the sweep
interval are the sweeper's values: give every consumer of a queue the same settings. A consumer
that stalls longer than ``dead_after`` (SIGSTOP, a debugger) loses its messages to the others (they
run again: at-least-once); its later acks then raise :class:`~funboost_like.core.errors.DoubleAckError`
and its nacks, releases and dead-letterings do nothing, so they add no further copies. Durability
across a Redis restart is Redis's own persistence setting (AOF/RDB).

Settings: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``, environment variable
``FUNBOOST_LIKE_REDIS_URL``), read at first use, never at import (after :meth:`close`, read again);
passwords never reach a log. Needs Redis server 6.2 or newer (``RPOP`` with a count).
Tuning: the settings ``REDIS_HEARTBEAT_SECONDS`` (5) and ``REDIS_DEAD_AFTER_SECONDS`` (15), shared
with RedisBrpopLpush, or ``RedisAckAbleBroker(heartbeat_interval=..., dead_after=...)``.

Capabilities: ack, persistent (as far as Redis persists), delay, priority 0..9 (higher first),
cross-process, cross-host, dead letters. Attempts are counted per message: a nack or a crash
recovery counts one, a release does not.

Cross-language contract: the ready list of priority 0 is the Redis LIST whose key is exactly the
queue name. Another program publishes by ``LPUSH <queue> <json text>``; consumers pop from the other
end, so the queue is FIFO. Bodies are stored as the raw bytes given. Other keys, all sharing the
queue name as a Redis Cluster hash tag (the braces are literal, so one queue lives in one slot):

* ``fl:{<queue>}:p<n>``, n in 1..9: ready lists of priority n (fetched before lower ones);
* ``fl:{<queue>}:delayed``: ZSET of messages not yet due, scored by due time; member
  ``<unique id>:<priority>:<attempts>:<body>``;
* ``fl:{<queue>}:inflight:<consumer id>``: HASH delivery token -> body. A token is ``<n>`` for a first
  delivery at priority 0, ``<n>:<priority>:<attempts>`` otherwise; the field ``_last`` makes a fetch
  whose reply was lost replayable;
* ``fl:{<queue>}:consumers``: ZSET consumer id -> last heartbeat (server time);
* ``fl:{<queue>}:attempts``: HASH sha1(body) -> deliveries so far, for messages waiting again after
  a nack or a crash;
* ``fl:{<queue>}:dead``: LIST of JSON envelopes ``{"body", "reason", "failed_at", "attempts"}``,
  newest first, trimmed to the newest 10,000.
* ``fl:{<queue>}:<namespace>:<key>``: records of :meth:`RedisAckAbleBroker.key_value_store` (RPC
  results in namespace ``results``, task filters in ``filter``), Redis strings with PX expiry.

Order: a nacked message goes to the back of its queue, a released or recovered one to the front;
a delayed one joins the back when due (moved by the next fetch). Fetching never blocks Redis: an
idle fetch polls with sleeps backing off from 2 ms to 50 ms, and never waits longer than its
timeout. Connection errors are raised as :class:`~funboost_like.core.errors.BrokerConnectionError`;
the client reconnects by itself, and a fetch whose reply was lost is replayed by the next fetch of
that queue so its messages are not stranded. An ack, nack, release or dead-lettering that failed on
a connection error is sent again by the next fetch (or by :meth:`close`): otherwise its message
would stay in the in-flight hash of a consumer that is alive and heartbeating, until its process ended.

Limits: attempts of a message waiting again are keyed by its body's SHA1, so two byte-identical
bodies waiting again at once may swap counts. A lost fetch reply is replayed only if no other
thread of the process fetched the same queue in between; otherwise its messages wait in the
in-flight hash until the process ends and are then recovered by the sweep.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from redis.exceptions import RedisError

from funboost_like.brokers.base import Capabilities, Delivery
from funboost_like.brokers.redis_base import LIST_MAX_PRIORITY, RedisConsumerBrokerBase, RedisListPublishing
from funboost_like.brokers.redis_common import (
    DEAD_LETTER_LIMIT,
    LUA_NOW,
    DeferredSettlements,
    DirectConnections,
    HeartbeatThread,
    LuaScript,
    Piggyback,
    consumer_timing,
    dead_letter_envelope,
    describe_url,
    is_connection_error,
    key_prefix,
    raise_first_error,
    translate_error,
)
from funboost_like.core.enums import BrokerEnum

logger = logging.getLogger("funboost_like.redis")

MAX_PRIORITY = LIST_MAX_PRIORITY
MAX_BATCH = 1000  # messages per fetch; also the stride of delivery numbers between fetches
_IDLE_SLEEP_FIRST = 0.002
_IDLE_SLEEP_MAX = 0.05

# KEYS: ready0, delayed, inflight, consumers, attempts
# ARGV: max_n, base, consumer id, priority-list prefix ("fl:{q}:p")
_FETCH = LuaScript(LUA_NOW + """
local inflight = KEYS[3]
local want = tonumber(ARGV[1])
local base = tonumber(ARGV[2])
redis.call('ZADD', KEYS[4], now, ARGV[3])
if redis.call('HGET', inflight, '_last') == ARGV[2] then
  -- This very call already ran and its reply was lost: answer with what it took.
  local all = redis.call('HGETALL', inflight)
  local found = {}
  for i = 1, #all, 2 do
    local m = string.match(all[i], '^(%d+)')
    if m then
      local num = tonumber(m)
      if num > base and num <= base + want then found[#found + 1] = {num, all[i], all[i + 1]} end
    end
  end
  table.sort(found, function(x, y) return x[1] < y[1] end)
  local names = {}
  local out = {''}
  for i = 1, #found do
    names[i] = found[i][2]
    out[i + 1] = found[i][3]
  end
  out[1] = '!' .. table.concat(names, ',')
  return out
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
if #due > 0 then
  for i = 1, #due do
    local m = due[i]
    local _, e, p, a = string.find(m, '^[^:]*:(%d):(%d+):')
    local body = m
    if e then body = string.sub(m, e + 1) else p = '0' a = '0' end
    local key = KEYS[1]
    if p ~= '0' then key = ARGV[4] .. p end
    redis.call('LPUSH', key, body)
    if a ~= '0' then redis.call('HSET', KEYS[5], redis.sha1hex(body), a) end
  end
  redis.call('ZREM', KEYS[2], unpack(due))
end
local track = redis.call('HLEN', KEYS[5]) > 0
local out = {''}
local special = {}
local n = 0
for p = 9, 0, -1 do
  local key = KEYS[1]
  if p > 0 then key = ARGV[4] .. p end
  local got = redis.call('RPOP', key, want - n)
  if got then
    -- Recorded level by level: should a later level fail (a key of the wrong type), what was
    -- already popped stays in flight, and the replayed call hands it out.
    local hset = {}
    for i = 1, #got do
      local body = got[i]
      n = n + 1
      local a = 1
      if track then
        local h = redis.sha1hex(body)
        local prev = redis.call('HGET', KEYS[5], h)
        if prev then
          a = tonumber(prev) + 1
          redis.call('HDEL', KEYS[5], h)
        end
      end
      if p == 0 and a == 1 then
        hset[#hset + 1] = tostring(base + n)
      else
        hset[#hset + 1] = (base + n) .. ':' .. p .. ':' .. a
        special[#special + 1] = n .. ':' .. p .. ':' .. a
      end
      hset[#hset + 1] = body
      out[n + 1] = body
    end
    hset[#hset + 1] = '_last'
    hset[#hset + 1] = ARGV[2]
    redis.call('HSET', inflight, unpack(hset))
    if n >= want then break end
  end
end
if n == 0 then return {} end
if #special > 0 then out[1] = table.concat(special, ',') end
return out
""")

# KEYS: inflight, ready0, delayed, attempts, dead
# ARGV: mode (tail|head|delay|drop|dead), priority-list prefix, delay seconds or envelope, unique id, tokens...
_GIVE_BACK = LuaScript(LUA_NOW + """
local mode = ARGV[1]
local done = 0
for i = 5, #ARGV do
  local f = ARGV[i]
  local body = redis.call('HGET', KEYS[1], f)
  if body then
    local _, _, p, a = string.find(f, ':(%d):(%d+)$')
    p = p or '0'
    a = tonumber(a or '1')
    if mode == 'head' then a = a - 1 end
    local key = KEYS[2]
    if p ~= '0' then key = ARGV[2] .. p end
    if mode == 'tail' or mode == 'head' then
      if mode == 'tail' then redis.call('LPUSH', key, body) else redis.call('RPUSH', key, body) end
      if a > 0 then redis.call('HSET', KEYS[4], redis.sha1hex(body), a) end
    elseif mode == 'delay' then
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[4] .. i .. ':' .. p .. ':' .. a .. ':' .. body)
    elseif mode == 'dead' then
      redis.call('LPUSH', KEYS[5], ARGV[3])
      redis.call('LTRIM', KEYS[5], 0, DEAD_LETTER_LAST)
    end
    -- Removed last: should the move fail, the message is still in flight, not lost.
    redis.call('HDEL', KEYS[1], f)
    done = done + 1
  end
end
return done
""".replace("DEAD_LETTER_LAST", str(DEAD_LETTER_LIMIT - 1)))

# KEYS: consumers, ready0, attempts
# ARGV: own consumer id ('' to only sweep), dead_after, key prefix ("fl:{q}:")
_HEARTBEAT = LuaScript(LUA_NOW + """
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[1], now, ARGV[1]) end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 100)
local moved = 0
for _, cid in ipairs(dead) do
  local ikey = ARGV[3] .. 'inflight:' .. cid
  local all = redis.call('HGETALL', ikey)
  local items = {}
  for i = 1, #all, 2 do
    local m = string.match(all[i], '^(%d+)')
    if m then
      local _, _, p, a = string.find(all[i], ':(%d):(%d+)$')
      items[#items + 1] = {tonumber(m), p or '0', a or '1', all[i + 1]}
    end
  end
  -- Newest first, so the oldest ends up nearest the popping end and runs first.
  table.sort(items, function(x, y) return x[1] > y[1] end)
  for _, it in ipairs(items) do
    local key = KEYS[2]
    if it[2] ~= '0' then key = ARGV[3] .. 'p' .. it[2] end
    redis.call('RPUSH', key, it[4])
    redis.call('HSET', KEYS[3], redis.sha1hex(it[4]), it[3])
  end
  moved = moved + #items
  redis.call('DEL', ikey)
  redis.call('ZREM', KEYS[1], cid)
end
return moved
""")

# KEYS: ready0, delayed, attempts; ARGV: priority-list prefix, '1' to delete
_COUNT_OR_PURGE = LuaScript("""
local n = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
for p = 1, 9 do n = n + redis.call('LLEN', ARGV[1] .. p) end
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  for p = 1, 9 do redis.call('DEL', ARGV[1] .. p) end
end
return n
""")

# KEYS: consumers; ARGV: key prefix
_IN_FLIGHT = LuaScript("""
local n = 0
for _, cid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local ikey = ARGV[1] .. 'inflight:' .. cid
  n = n + redis.call('HLEN', ikey) - redis.call('HEXISTS', ikey, '_last')
end
return n
""")

# KEYS: consumers, inflight; ARGV: consumer id
_RETIRE = LuaScript("""
if redis.call('HLEN', KEYS[2]) - redis.call('HEXISTS', KEYS[2], '_last') == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
""")


class _QueueKeys:
    __slots__ = ("ready", "prefix", "prio_prefix", "lists", "delayed", "attempts", "dead", "consumers")

    def __init__(self, queue: str) -> None:
        prefix = key_prefix(queue)
        self.ready = queue
        self.prefix = prefix
        self.prio_prefix = prefix + "p"
        self.lists = [queue] + [f"{prefix}p{n}" for n in range(1, MAX_PRIORITY + 1)]
        self.delayed = prefix + "delayed"
        self.attempts = prefix + "attempts"
        self.dead = prefix + "dead"
        self.consumers = prefix + "consumers"


def _fields_by_hash(deliveries: Sequence[Delivery]) -> dict[str, list[str]]:
    """The in-flight hash fields of ``deliveries``, by hash key."""
    groups: dict[str, list[str]] = {}
    for delivery in deliveries:
        key, field = delivery.token
        fields = groups.get(key)
        if fields is None:
            fields = groups[key] = []
        fields.append(field)
    return groups


class RedisAckAbleBroker(RedisListPublishing[_QueueKeys], RedisConsumerBrokerBase[_QueueKeys]):
    """At-least-once Redis broker; see the module docstring for keys, timing and the wire contract."""

    kind = BrokerEnum.REDIS_ACK_ABLE
    capabilities = Capabilities(ack=True, persistent=True, delay=True, priority=True, cross_process=True,
                                cross_host=True, dead_letters=True, max_priority=MAX_PRIORITY)
    _keys_class = _QueueKeys

    def __init__(self, *, heartbeat_interval: float | None = None, dead_after: float | None = None) -> None:
        self.heartbeat_interval, self.dead_after = consumer_timing(heartbeat_interval, dead_after)
        self._seq = itertools.count(1)
        super().__init__()

    def _reset_process_state(self) -> None:
        """Identity, connection and heartbeat of this process (called again in a forked child)."""
        super()._reset_process_state()
        self._inflight: dict[str, str] = {}  # queue -> this consumer's in-flight hash
        self._pending: dict[str, tuple[str, int]] = {}  # queue -> (base, max_n) of a fetch whose reply was lost
        self._deferred = DeferredSettlements()  # acks and hand-backs that failed on a connection error
        self._heartbeat = HeartbeatThread(self.heartbeat, self.heartbeat_interval, "funboost_like-redis-heartbeat")

    # -- plumbing ----------------------------------------------------------------------------------
    def _register(self, queue: str) -> str:
        with self._lock:
            ikey = self._inflight.get(queue)
            if ikey is None:
                ikey = self._inflight[queue] = f"{self._queue_keys(queue).prefix}inflight:{self._cid}"
                logger.debug("consumer %s fetches queue %r from Redis at %s", self._cid, queue, describe_url())
        self._heartbeat.ensure_running()
        return ikey

    # -- publishing --------------------------------------------------------------------------------
    # -- consuming ---------------------------------------------------------------------------------
    def fetch(self, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        return self._fetch_after(None, queue, max_n, timeout)

    def _fetch_after(self, before: Piggyback | None, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        client = self._conn()
        if max_n <= 0:
            return []
        if max_n > MAX_BATCH:
            max_n = MAX_BATCH
        ikey = self._inflight.get(queue) or self._register(queue)
        if self._deferred:
            self._deferred.flush_before_fetch(queue)
        keys = self._keys[queue]
        key_args = [keys.ready, keys.delayed, ikey, keys.consumers, keys.attempts]
        cid = self._cid
        deadline = time.monotonic() + timeout
        pause = _IDLE_SLEEP_FIRST
        while True:
            pending = self._pending.pop(queue, None) if self._pending else None
            if pending is None:
                base, n = str(next(self._seq) * MAX_BATCH), max_n
            else:
                base, n = pending
            try:
                if before is None:
                    out = _FETCH(client, key_args, [n, base, cid, keys.prio_prefix])
                else:
                    out = _FETCH.after(before, client, key_args, [n, base, cid, keys.prio_prefix])
                    before = None
            except RedisError as exc:
                # The script may have run: the next fetch replays it with the same base, so whatever
                # it moved into our in-flight hash is handed out instead of being stranded there.
                self._pending[queue] = (base, n)
                raise translate_error(exc, f"fetching from queue {queue!r}") from exc
            if out:
                deliveries = self._deliveries(queue, ikey, int(base), out)
                if len(deliveries) > max_n:  # only when replaying a bigger lost fetch
                    self.release(deliveries[max_n:])
                    del deliveries[max_n:]
                return deliveries
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(pause if pause < remaining else remaining)
            pause = min(pause * 2, _IDLE_SLEEP_MAX)

    @staticmethod
    def _deliveries(queue: str, ikey: str, base: int, out: list[bytes]) -> list[Delivery]:
        """Deliveries from the fetch script's reply: ``[meta, body1, body2, ...]``.

        The token of body i is ``base + i`` (first delivery, priority 0) unless ``meta`` lists it as
        ``i:priority:attempts``; a replayed fetch sends ``!`` and every token instead.
        """
        meta = out[0]
        if not meta:
            return [Delivery(queue, body, (ikey, str(number)))
                    for number, body in enumerate(itertools.islice(out, 1, None), base + 1)]
        result: list[Delivery] = []
        if meta[:1] == b"!":
            for field, body in zip(meta[1:].decode().split(","), itertools.islice(out, 1, None), strict=False):
                _, _, rest = field.partition(":")
                level, _, count = rest.partition(":")
                result.append(Delivery(queue, body, (ikey, field), int(count or 1), int(level or 0)))
            return result
        special: dict[int, tuple[int, int]] = {}
        for item in meta.decode().split(","):
            position, level, count = item.split(":")
            special[int(position)] = (int(level), int(count))
        for index, body in enumerate(itertools.islice(out, 1, None), 1):
            number = base + index
            extra = special.get(index)
            if extra is None:
                result.append(Delivery(queue, body, (ikey, str(number))))
            else:
                priority, attempts = extra
                result.append(Delivery(queue, body, (ikey, f"{number}:{priority}:{attempts}"), attempts, priority))
        return result

    def _ack_piggyback(self, deliveries: Sequence[Delivery]) -> Piggyback | None:
        client = self._conn()
        commands = [("HDEL", key, *fields) for key, fields in _fields_by_hash(deliveries).items()]
        return self._piggyback(commands, len(deliveries), sum,
                               functools.partial(self._deferred.add, functools.partial(client.pipeline, commands)))

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        groups = _fields_by_hash(deliveries)
        client = self._conn()
        try:
            if len(groups) == 1:
                ((key, fields),) = groups.items()
                removed = client.execute_command("HDEL", key, *fields)
            else:
                removed = sum(raise_first_error(client.pipeline(
                    [("HDEL", key, *fields) for key, fields in groups.items()])))
        except RedisError as exc:
            if is_connection_error(exc):  # sent again by the next fetch (HDEL twice is harmless)
                self._deferred.add(functools.partial(
                    client.pipeline, [("HDEL", key, *fields) for key, fields in groups.items()]))
            raise translate_error(exc, f"acknowledging {len(deliveries)} message(s)") from exc
        self._check_settled(removed, len(deliveries))

    def nack(self, delivery: Delivery, *, requeue: bool = True, delay: float = 0.0) -> None:
        if not requeue:
            self._give_back([delivery], "drop", "")
        elif delay > 0:
            self._give_back([delivery], "delay", repr(float(delay)))
        else:
            self._give_back([delivery], "tail", "")

    def release(self, deliveries: Iterable[Delivery]) -> None:
        """Put fetched-but-unstarted messages back at the front of their queue; no attempt is counted."""
        deliveries = list(deliveries)
        if deliveries:
            # Reversed: the first delivery is pushed last, so it is the next one popped.
            self._give_back(deliveries[::-1], "head", "")

    def dead_letter(self, delivery: Delivery, reason: str, exc: BaseException | None = None) -> None:
        self._give_back([delivery], "dead", dead_letter_envelope(delivery.body, reason, delivery.attempts))

    def _give_back(self, deliveries: Sequence[Delivery], mode: str, arg: Any) -> None:
        groups: dict[tuple[str, str], list[str]] = {}
        for delivery in deliveries:
            key, field = delivery.token
            groups.setdefault((delivery.queue, key), []).append(field)
        client = self._conn()
        done = 0
        calls = []
        for (queue, ikey), fields in groups.items():
            keys = self._queue_keys(queue)
            calls.append((queue, len(fields), functools.partial(
                _GIVE_BACK, client, [ikey, keys.ready, keys.delayed, keys.attempts, keys.dead],
                [mode, keys.prio_prefix, arg, uuid.uuid4().hex, *fields])))
        for index, (queue, n, call) in enumerate(calls):
            try:
                done += call()
            except RedisError as exc:
                if is_connection_error(exc):  # sent again by the next fetch; the script skips what it moved
                    for _, _, unsent in calls[index:]:
                        self._deferred.add(unsent)
                raise translate_error(exc, f"handing back {n} message(s) of queue {queue!r}") from exc
        self._check_settled(done, len(deliveries))

    # -- heartbeat and recovery --------------------------------------------------------------------
    def heartbeat(self) -> int:
        """Refresh this consumer's heartbeat on the queues it fetched from and sweep dead consumers there.

        Runs by itself in the heartbeat thread; returns how many messages were recovered.
        """
        client = self._conn()
        cid = self._cid
        total = 0
        for queue in list(self._inflight):
            keys = self._keys[queue]
            try:
                moved = _HEARTBEAT(client, [keys.consumers, keys.ready, keys.attempts],
                                   [cid, repr(self.dead_after), keys.prefix])
            except RedisError as exc:
                raise translate_error(exc, f"sending the heartbeat of queue {queue!r}") from exc
            if moved:
                logger.warning("queue %r: recovered %d in-flight message(s) of consumers silent for over %.1fs",
                               queue, moved, self.dead_after)
                total += moved
        return total

    def recover_dead_consumers(self, queue: str) -> int:
        """Sweep ``queue`` once now (without registering as a consumer); return messages recovered."""
        keys = self._queue_keys(queue)
        try:
            moved = int(_HEARTBEAT(self._conn(), [keys.consumers, keys.ready, keys.attempts],
                                   ["", repr(self.dead_after), keys.prefix]))
        except RedisError as exc:
            raise translate_error(exc, f"sweeping queue {queue!r}") from exc
        if moved:
            logger.warning("queue %r: recovered %d in-flight message(s) of consumers silent for over %.1fs",
                           queue, moved, self.dead_after)
        return moved

    def in_flight(self, queue: str) -> int:
        """Messages of ``queue`` fetched by any consumer and not yet acked, nacked or dead-lettered."""
        keys = self._queue_keys(queue)
        try:
            return int(_IN_FLIGHT(self._conn(), [keys.consumers], [keys.prefix]))
        except RedisError as exc:
            raise translate_error(exc, f"counting in-flight messages of queue {queue!r}") from exc

    # -- queue maintenance -------------------------------------------------------------------------
    def _run_count_or_purge(self, conn: DirectConnections, queue: str, purge: bool) -> Any:
        keys = self._queue_keys(queue)
        return _COUNT_OR_PURGE(conn, [keys.ready, keys.delayed, keys.attempts],
                               [keys.prio_prefix, "1" if purge else "0"])

    def close(self) -> None:
        """Stop the heartbeat and drop this consumer's records where nothing is in flight.

        Messages still in flight stay with this consumer id and are recovered by the sweep of
        another consumer ``dead_after`` seconds later. Fetching again restarts the heartbeat.
        """
        if self._pid != os.getpid():
            self._reset_process_state()
            return
        self._heartbeat.stop()
        with self._lock:
            registered = dict(self._inflight)
            self._inflight.clear()
        client = self._redis
        if client is not None:
            self._deferred.flush_on_close()
            for queue, ikey in registered.items():
                try:
                    _RETIRE(client, [self._keys[queue].consumers, ikey], [self._cid])
                except RedisError as exc:
                    logger.debug("could not retire consumer %s of queue %r: %s", self._cid, queue, exc)
        self._redis = None
