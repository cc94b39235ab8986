"""RedisBrpopLpush: a Redis list whose messages move, by Redis's own LMOVE, into per-consumer lists.

Guarantee: at-least-once. A fetch moves each message with ``LMOVE <queue> <in-flight list> RIGHT
LEFT`` (the successor of ``RPOPLPUSH``; ``BLMOVE`` when it waits), so a message is always in the
queue or in exactly one consumer's in-flight list, never in neither. It leaves the in-flight list
only through :meth:`ack` (``LREM``), :meth:`nack`, :meth:`release` or :meth:`dead_letter`. Every
broker instance (one per process; a forked child gets a new identity) is a consumer with a unique
id. It heartbeats every ``REDIS_HEARTBEAT_SECONDS`` (default 5) from a daemon thread and with every
fetch, and sweeps: the in-flight list of a consumer whose heartbeat is older than
``REDIS_DEAD_AFTER_SECONDS`` (default 15) goes back to the front of the queue, oldest message first,
in one Lua script. So the messages of a consumer killed with SIGKILL are fetchable again at most
``dead_after + heartbeat interval`` seconds after it died (20 s with the defaults), provided some
consumer of the queue runs (one that starts later sweeps at once). All times are the Redis server's
clock. A consumer that stalls longer than ``dead_after`` (SIGSTOP, a debugger) loses its messages to
the others (they run again: at-least-once); its later acks raise
:class:`~funboost_like.core.errors.DoubleAckError` and its nacks, releases and dead-letterings do
nothing. This is the same design as REDIS_ACK_ABLE with a plain list for the in-flight messages
and no Lua script on the fetch path; durability across a Redis restart is Redis's own persistence
setting (AOF/RDB).

Settings: ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``, environment variable
``FUNBOOST_LIKE_REDIS_URL``), read at first use, never at import; passwords never reach a log.
``REDIS_HEARTBEAT_SECONDS`` and ``REDIS_DEAD_AFTER_SECONDS`` (or ``RedisBrpopLpushBroker(
heartbeat_interval=..., dead_after=...)``): give every consumer of a queue the same values. Needs
Redis 6.2 or newer (``LMOVE``).

Capabilities: ack, persistent (as far as Redis persists), delay, cross-process, cross-host, dead
letters. No priority: one list per queue is what makes the fetch a plain pipeline of ``LMOVE``
(REDIS_ACK_ABLE has priorities). Attempts are counted per message: a nack or a crash recovery counts
one, a release does not.

Cross-language contract: the queue is the Redis LIST whose key is exactly the queue name. Another
program publishes by ``LPUSH <queue> <json text>``; consumers take from the other end, so the queue
is FIFO. Bodies are stored as the raw bytes given. The other keys share the queue name as a Redis
Cluster hash tag:

* ``fl:{<queue>}:unack:<consumer id>``: LIST of the bodies a consumer holds, newest at the head;
* ``fl:{<queue>}:unack-consumers``: ZSET consumer id -> last heartbeat (server time);
* ``fl:{<queue>}:delayed``: ZSET of messages not yet due (as in REDIS_ACK_ABLE), moved to the queue
  by the next fetch once due;
* ``fl:{<queue>}:attempts``: HASH sha1(body) -> deliveries so far, for messages delivered more than
  once (kept while such a message is in flight, so a crash recovery counts on from it);
* ``fl:{<queue>}:dead``: LIST of JSON envelopes ``{"body", "reason", "failed_at", "attempts"}``,
  newest first, trimmed to the newest 10,000.

Fetching: one pipeline (not a transaction) of a small Lua script (heartbeat, due delayed messages)
and ``max_n`` ``LMOVE`` commands, so a batch costs one round trip; a second one reads attempts only
while some message is on a later delivery. When the queue is empty, one ``BLMOVE`` waits for the
next message (Redis ends blocking waits on its cron tick, up to 100 ms late at the default ``hz``,
so the last 100 ms of a wait, and shorter waits, poll instead: a fetch never blocks past its
timeout). A fetch whose reply was lost on a broken connection left its messages in this consumer's
in-flight list: the next fetch of that queue hands them out, if no other thread of the process is
fetching the same queue at that moment (otherwise they come back when the process ends).

An ack, nack, release or dead-lettering that failed on a connection error is sent again by the next
fetch (or by :meth:`close`): otherwise its message would stay in the in-flight list of a consumer
that is alive and heartbeating, until its process ended.

Order: a nacked message goes to the back of the queue, a released or recovered one to the front.

Limits: acks remove by value (``LREM``), so byte-identical bodies in flight at once are
interchangeable (each ack removes one copy), and their attempt counts are shared.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.exceptions import NoScriptError, RedisError, ResponseError

from funboost_like.brokers.base import Capabilities, Delivery
from funboost_like.brokers.redis_base import RedisConsumerBrokerBase
from funboost_like.brokers.redis_common import (
    DEAD_LETTER_LIMIT,
    LUA_MOVE_DUE,
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
    consumer_timing,
    dead_letter_envelope,
    delayed_member,
    describe_url,
    is_connection_error,
    key_prefix,
    lpush_many,
    pack_command,
    raise_first_error,
    translate_error,
)
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.redis")

MAX_BATCH = 500  # LMOVE commands per fetch
PUBLISH_CHUNK = 1000  # bodies per LPUSH command

# KEYS: consumers, delayed, queue, attempts; ARGV: consumer id, priority-list prefix
# Heartbeat with every fetch (so a consumer swept while stalled is registered again before it takes
# more), and move due delayed messages. Returns milliseconds until the next one is due, or -1.
_PREPARE = LuaScript(LUA_NOW + LUA_MOVE_DUE + LUA_NEXT_DUE + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
move_due(KEYS[2], KEYS[3], ARGV[2], KEYS[4], now)
return next_due_ms(KEYS[2], now)
""")

# KEYS: consumers, queue, attempts; ARGV: own consumer id ('' to only sweep), dead_after, in-flight prefix
# The in-flight lists of consumers silent for dead_after seconds go back to the popping end of the
# queue, newest moved first so that the oldest is taken first; each counts one delivery more.
_SWEEP = LuaScript(LUA_NOW + """
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[1], now, ARGV[1]) end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 100)
local moved = 0
for _, cid in ipairs(dead) do
  local key = ARGV[3] .. cid
  while true do
    local body = redis.call('LMOVE', key, KEYS[2], 'LEFT', 'RIGHT')
    if not body then break end
    redis.call('HINCRBY', KEYS[3], redis.sha1hex(body), 1)
    moved = moved + 1
  end
  redis.call('ZREM', KEYS[1], cid)
end
return moved
""")

# KEYS: in-flight list, queue, delayed, attempts, dead letters
# ARGV: mode (tail|head|delay|drop|dead), delay seconds, unique id, then pairs (body, value) where
# value is the deliveries so far (tail, delay) or the dead-letter envelope (dead).
# Each body still in flight is handed over first and removed from the in-flight list last, so a
# failing command leaves it in flight rather than nowhere. Returns how many were in flight.
_GIVE_BACK = LuaScript(LUA_NOW + """
local mode = ARGV[1]
local done = 0
for i = 4, #ARGV, 2 do
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
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[3] .. i .. ':0:' .. ARGV[i + 1] .. ':' .. body)
    else
      redis.call('HDEL', KEYS[4], h)
      if mode == 'dead' then
        redis.call('LPUSH', KEYS[5], ARGV[i + 1])
        redis.call('LTRIM', KEYS[5], 0, DEAD_LETTER_LAST)
      end
    end
    redis.call('LREM', KEYS[1], -1, body)
    done = done + 1
  end
end
return done
""".replace("DEAD_LETTER_LAST", str(DEAD_LETTER_LIMIT - 1)))

# KEYS: consumers; ARGV: in-flight prefix
_IN_FLIGHT = LuaScript("""
local n = 0
for _, cid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do n = n + redis.call('LLEN', ARGV[1] .. cid) end
return n
""")

# KEYS: consumers, in-flight list; ARGV: consumer id
_RETIRE = LuaScript("""
if redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
""")

# KEYS: queue, delayed, attempts; ARGV: '1' to delete
_COUNT_OR_PURGE = LuaScript("""
local n = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if ARGV[1] == '1' then redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) end
return n
""")


class _Keys:
    __slots__ = ("prefix", "unack_prefix", "consumers", "delayed", "attempts", "dead", "prio_prefix", "packets")

    def __init__(self, queue: str) -> None:
        prefix = key_prefix(queue)
        self.prefix = prefix
        self.unack_prefix = prefix + "unack:"
        self.consumers = prefix + "unack-consumers"
        self.delayed = prefix + "delayed"
        self.attempts = prefix + "attempts"
        self.dead = prefix + "dead"
        self.prio_prefix = prefix + "p"
        self.packets: dict[int, bytes] = {}  # n -> the fetch pipeline of n moves, for this process's consumer


def _sha1(body: bytes) -> str:
    return hashlib.sha1(body).hexdigest()


class RedisBrpopLpushBroker(RedisConsumerBrokerBase[_Keys]):
    """At-least-once Redis broker on LMOVE; see the module docstring for keys, timing and the wire contract."""

    kind = BrokerEnum.RedisBrpopLpush
    capabilities = Capabilities(ack=True, persistent=True, delay=True, priority=False, cross_process=True,
                                cross_host=True, dead_letters=True)
    _keys_class = _Keys

    def __init__(self, *, heartbeat_interval: float | None = None, dead_after: float | None = None) -> None:
        self.heartbeat_interval, self.dead_after = consumer_timing(heartbeat_interval, dead_after)
        super().__init__()

    def _reset_process_state(self) -> None:
        """Identity, connections, deliveries and heartbeat of this process (again in a forked child)."""
        super()._reset_process_state()
        self._unack: dict[str, str] = {}  # queue -> this consumer's in-flight list (registered queues)
        self._held: dict[tuple[str, int], bytes] = {}  # token (in-flight list, n) -> body, until settled
        self._tokens = itertools.count(1)
        self._fetching: collections.Counter[str] = collections.Counter()  # queue -> fetches running now
        for keys in self._keys.values():
            keys.packets.clear()  # they name the consumer id
        self._suspect: set[str] = set()  # queues where a fetch reply was lost
        self._deferred = DeferredSettlements()  # acks and hand-backs that failed on a connection error
        self._heartbeat = HeartbeatThread(self.heartbeat, self.heartbeat_interval,
                                          "funboost_like-redis-brpoplpush-heartbeat")

    # -- plumbing ----------------------------------------------------------------------------------
    def _register(self, queue: str) -> str:
        """Heartbeat on ``queue`` (and sweep it) before the first fetch; start the heartbeat thread."""
        keys = self._queue_keys(queue)
        with self._lock:
            unack = self._unack.get(queue)
            if unack is None:
                unack = keys.unack_prefix + self._cid
                self._sweep(queue, self._cid)
                self._unack[queue] = unack
                logger.debug("consumer %s fetches queue %r from Redis at %s", self._cid, queue, describe_url())
        self._heartbeat.ensure_running()
        return unack

    # -- publishing --------------------------------------------------------------------------------
    def publish(self, queue: str, body: bytes, *, priority: int = 0, not_before: float | None = None) -> None:
        if priority:
            raise ConfigurationError("RedisBrpopLpush has no priorities (REDIS_ACK_ABLE has)")
        conn = self._conn()
        try:
            if not_before is not None:
                delay = not_before - time.time()
                if delay > 0:
                    SCHEDULE(conn, [self._queue_keys(queue).delayed], [repr(delay), delayed_member(0, 0, body)])
                    return
            conn.execute_command("LPUSH", queue, body, spin=True)
        except RedisError as exc:
            raise translate_error(exc, f"publishing to queue {queue!r}") from exc

    def publish_many(self, queue: str, bodies: Sequence[bytes], *, priority: int = 0) -> None:
        if priority:
            raise ConfigurationError("RedisBrpopLpush has no priorities (REDIS_ACK_ABLE has)")
        if not bodies:
            return
        conn = self._conn()
        try:
            lpush_many(conn, queue, bodies, PUBLISH_CHUNK)
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
        unack = self._unack.get(queue)
        if unack is None:
            try:
                unack = self._register(queue)
            except RedisError as exc:
                raise translate_error(exc, f"registering consumer {self._cid} on queue {queue!r}") from exc
        if self._deferred:
            self._deferred.flush_before_fetch(queue)
        with self._lock:
            self._fetching[queue] += 1
            alone = self._fetching[queue] == 1
        try:
            if alone and self._suspect and queue in self._suspect:
                adopted = self._adopt(conn, queue, unack, n)
                if adopted:
                    return adopted
            return self._fetch(conn, queue, unack, n, timeout, before)
        except RedisError as exc:
            # The commands may have run: what they moved is in our in-flight list, adopted next time.
            self._suspect.add(queue)
            raise translate_error(exc, f"fetching from queue {queue!r}") from exc
        finally:
            with self._lock:
                self._fetching[queue] -= 1

    def _fetch(self, conn: DirectConnections, queue: str, unack: str, n: int, timeout: float,
               before: Piggyback | None) -> list[Delivery]:
        keys = self._keys[queue]
        poller: IdlePoller | None = None
        while True:
            bodies, due_ms, tracked = self._take(conn, queue, keys, unack, n, before)
            before = None
            if bodies:
                return self._deliveries(conn, queue, keys, unack, bodies, tracked)
            if poller is None:
                poller = IdlePoller(timeout)
            remaining = poller.remaining()
            if remaining <= 0:
                return []
            wait = blocking_budget(remaining, due_ms / 1000 if due_ms > 0 else None)
            if not wait:
                poller.sleep(remaining)
                continue
            body = conn.execute_command("BLMOVE", queue, unack, "RIGHT", "LEFT", f"{wait:.3f}")
            if body is not None:
                more, _, tracked = self._take(conn, queue, keys, unack, n - 1) if n > 1 else ([], 0, True)
                return self._deliveries(conn, queue, keys, unack, [body, *more], tracked)

    def _take(self, conn: DirectConnections, queue: str, keys: _Keys, unack: str,
              n: int, before: Piggyback | None = None) -> tuple[list[bytes], int, bool]:
        """One pipeline: heartbeat and due messages, ``n`` LMOVEs, HLEN of attempts.

        Returns the bodies moved, milliseconds until the next delayed message is due (-1: none) and
        whether any message is on a later delivery (then attempts must be read).
        """
        packet = keys.packets.get(n)
        if packet is None:  # the same bytes for every fetch of n messages: packed once
            move = pack_command("LMOVE", queue, unack, "RIGHT", "LEFT")
            packet = keys.packets[n] = b"".join([
                pack_command("EVALSHA", _PREPARE.sha, 4, keys.consumers, keys.delayed, queue, keys.attempts,
                             self._cid, keys.prio_prefix),
                move * n,
                pack_command("HLEN", keys.attempts)])
        replies = conn.send_packed(packet, n + 2, before)
        prepared = replies[0]
        bodies = []
        error = None
        for reply in itertools.islice(replies, 1, n + 1):
            if reply is None:
                continue  # empty at that moment; a later move may still find one pushed meanwhile
            if isinstance(reply, ResponseError):
                error = reply
            else:
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
        held = self._held
        tokens = self._tokens
        if not tracked:
            result = []
            for body in bodies:
                token = (unack, next(tokens))
                held[token] = body
                result.append(Delivery(queue, body, token))
            return result
        # Some message is on a later delivery: its count is in the attempts hash (kept until it ends).
        seen = conn.execute_command("HMGET", keys.attempts, *[_sha1(body) for body in bodies])
        result = []
        for body, count in zip(bodies, seen, strict=True):
            token = (unack, next(tokens))
            held[token] = body
            result.append(Delivery(queue, body, token, int(count) + 1 if count else 1))
        return result

    def _adopt(self, conn: DirectConnections, queue: str, unack: str, n: int) -> list[Delivery]:
        """Hand out what our in-flight list holds beyond the deliveries this process knows of.

        Settling removes a delivery from ``_held`` only after Redis removed its body, so a body
        being settled right now is never taken for an unknown one.
        """
        self._suspect.discard(queue)
        stored = conn.execute_command("LRANGE", unack, 0, -1)
        known = collections.Counter(body for (key, _), body in list(self._held.items()) if key == unack)
        extra: list[bytes] = []
        for body in reversed(stored):  # oldest first
            if known[body]:
                known[body] -= 1
            else:
                extra.append(body)
        if not extra:
            return []
        logger.warning("queue %r: handing out %d message(s) whose fetch reply was lost", queue, len(extra))
        if len(extra) > n:
            self._suspect.add(queue)  # the rest next time
            del extra[n:]
        return self._deliveries(conn, queue, self._keys[queue], unack, extra, True)

    def _ack_commands(self, live: list[Delivery]) -> list[tuple[Any, ...]]:
        """One ``LREM`` per delivery from its in-flight list, then the ``HDEL`` of retried ones' counts."""
        commands: list[tuple[Any, ...]] = []
        retried: dict[str, list[str]] = {}
        for delivery in live:
            commands.append(("LREM", delivery.token[0], -1, delivery.body))
            if delivery.attempts > 1:
                retried.setdefault(self._queue_keys(delivery.queue).attempts, []).append(_sha1(delivery.body))
        commands.extend(("HDEL", key, *hashes) for key, hashes in retried.items())
        return commands

    def _ack_piggyback(self, deliveries: Sequence[Delivery]) -> Piggyback | None:
        held = self._held
        live = [delivery for delivery in deliveries if delivery.token in held]  # others: settled before
        if not live:
            logger.warning("%s", self._unsettled_message(0, len(deliveries)))
            return None
        commands = self._ack_commands(live)
        conn = self._conn()

        def count_settled(replies: list[Any]) -> int:
            for delivery in live:
                held.pop(delivery.token, None)
            return int(sum(replies[:len(live)]))

        resend = functools.partial(conn.pipeline, commands)
        return self._piggyback(commands, len(deliveries), count_settled,
                               functools.partial(self._deferred.add, functools.partial(self._resend, resend, live)))

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        held = self._held
        live = [delivery for delivery in deliveries if delivery.token in held]  # others: settled before
        removed = 0
        if live:
            commands = self._ack_commands(live)
            try:
                replies = raise_first_error(self._conn().pipeline(commands))
            except RedisError as exc:
                if is_connection_error(exc):  # sent again by the next fetch; the deliveries stay held till then
                    resend = functools.partial(self._conn().pipeline, commands)
                    self._deferred.add(functools.partial(self._resend, resend, live))
                raise translate_error(exc, f"acknowledging {len(live)} message(s)") from exc
            for delivery in live:
                held.pop(delivery.token, None)
            removed = sum(replies[:len(live)])
        self._check_settled(removed, len(deliveries))

    def nack(self, delivery: Delivery, *, requeue: bool = True, delay: float = 0.0) -> None:
        if not requeue:
            self._give_back([delivery], "drop", 0.0, [""])
        elif delay > 0:
            self._give_back([delivery], "delay", float(delay), [str(delivery.attempts)])
        else:
            self._give_back([delivery], "tail", 0.0, [str(delivery.attempts)])

    def release(self, deliveries: Iterable[Delivery]) -> None:
        """Put fetched-but-unstarted messages back at the front of the queue; no attempt is counted."""
        deliveries = list(deliveries)[::-1]  # the first one pushed last, so it is taken first
        if deliveries:
            self._give_back(deliveries, "head", 0.0, [""] * len(deliveries))

    def dead_letter(self, delivery: Delivery, reason: str, exc: BaseException | None = None) -> None:
        self._give_back([delivery], "dead", 0.0, [dead_letter_envelope(delivery.body, reason, delivery.attempts)])

    def _give_back(self, deliveries: Sequence[Delivery], mode: str, delay: float, values: Sequence[Any]) -> None:
        held = self._held
        groups: dict[tuple[str, str], list[Delivery]] = {}
        pairs_of: dict[tuple[str, str], list[Any]] = {}
        for delivery, value in zip(deliveries, values, strict=True):
            if delivery.token not in held:
                continue  # settled before: counted as a double ack below
            group = (delivery.queue, delivery.token[0])
            groups.setdefault(group, []).append(delivery)
            pairs_of.setdefault(group, []).extend((delivery.body, value))
        conn = self._conn()
        done = 0
        calls = []
        for (queue, unack), settled in groups.items():
            keys = self._queue_keys(queue)
            calls.append((queue, settled, functools.partial(
                _GIVE_BACK, conn, [unack, queue, keys.delayed, keys.attempts, keys.dead],
                [mode, repr(delay), uuid.uuid4().hex, *pairs_of[(queue, unack)]])))
        for index, (queue, settled, call) in enumerate(calls):
            try:
                done += int(call())
            except RedisError as exc:
                if is_connection_error(exc):  # sent again by the next fetch; the script skips what it moved
                    for _, unsent, unsent_call in calls[index:]:
                        self._deferred.add(functools.partial(self._resend, unsent_call, unsent))
                raise translate_error(exc, f"handing back {len(settled)} message(s) of queue {queue!r}") from exc
            for delivery in settled:
                held.pop(delivery.token, None)
        self._check_settled(done, len(deliveries))

    def _resend(self, send: Callable[[], object], deliveries: list[Delivery]) -> None:
        """A deferred ack or hand-back: send it again, then forget its deliveries."""
        send()
        for delivery in deliveries:
            self._held.pop(delivery.token, None)

    # -- heartbeat and recovery --------------------------------------------------------------------
    def heartbeat(self) -> int:
        """Refresh this consumer's heartbeat on the queues it fetched from and sweep dead consumers there.

        Runs by itself in the heartbeat thread; returns how many messages were recovered.
        """
        total = 0
        for queue in list(self._unack):
            try:
                total += self._sweep(queue, self._cid)
            except RedisError as exc:
                raise translate_error(exc, f"sending the heartbeat of queue {queue!r}") from exc
        return total

    def recover_dead_consumers(self, queue: str) -> int:
        """Sweep ``queue`` once now (without registering as a consumer); return messages recovered."""
        try:
            return self._sweep(queue, "")
        except RedisError as exc:
            raise translate_error(exc, f"sweeping queue {queue!r}") from exc

    def _sweep(self, queue: str, cid: str) -> int:
        keys = self._queue_keys(queue)
        moved = int(_SWEEP(self._conn(), [keys.consumers, queue, keys.attempts],
                           [cid, repr(self.dead_after), keys.unack_prefix]))
        if moved:
            logger.warning("queue %r: recovered %d in-flight message(s) of consumers silent for over %.1fs",
                           queue, moved, self.dead_after)
        return moved

    def in_flight(self, queue: str) -> int:
        """Messages of ``queue`` fetched by any consumer and not yet acked, nacked or dead-lettered."""
        keys = self._queue_keys(queue)
        try:
            return int(_IN_FLIGHT(self._conn(), [keys.consumers], [keys.unack_prefix]))
        except RedisError as exc:
            raise translate_error(exc, f"counting in-flight messages of queue {queue!r}") from exc

    # -- queue maintenance -------------------------------------------------------------------------
    def _run_count_or_purge(self, conn: DirectConnections, queue: str, purge: bool) -> Any:
        keys = self._queue_keys(queue)
        return _COUNT_OR_PURGE(conn, [queue, keys.delayed, keys.attempts], ["1" if purge else "0"])

    def close(self) -> None:
        """Stop the heartbeat and unregister from queues where nothing is in flight.

        Messages still in flight stay in this consumer's list and are recovered by the sweep of
        another consumer ``dead_after`` seconds later. Fetching again registers again.
        """
        if self._pid != os.getpid():
            self._reset_process_state()
            return
        self._heartbeat.stop()
        with self._lock:
            registered = dict(self._unack)
            self._unack.clear()
        conn = self._redis
        if conn is not None:
            self._deferred.flush_on_close()
            for queue, unack in registered.items():
                try:
                    _RETIRE(conn, [self._keys[queue].consumers, unack], [self._cid])
                except RedisError as exc:
                    logger.debug("could not retire consumer %s of queue %r: %s", self._cid, queue, exc)
        self._redis = None
