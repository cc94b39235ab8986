"""The consumer registry of the at-least-once Redis kinds (REDIS_ACK_ABLE, RedisBrpopLpush, REDIS_STREAM).

Every broker instance (one per process; a forked child gets a new identity) is a consumer with a
unique id, in a ZSET of each queue it fetches, scored by its last heartbeat (server clock). The base's
maintenance thread beats every ``REDIS_HEARTBEAT_SECONDS`` (5) and sweeps, in one Lua script per
queue: what a consumer silent for ``REDIS_DEAD_AFTER_SECONDS`` (15) held goes back to the queue, each
message counting a delivery and a crash (:attr:`~funboost_like.brokers.base.Delivery.crashes`). So a
consumer killed with SIGKILL has its messages fetchable again at most 20 s after its death with the
defaults, provided some consumer of the queue runs (one that starts later sweeps at once). All times
are the Redis server's, so hosts with skewed clocks do not reclaim each other's messages early;
``dead_after`` is the sweeper's: give every consumer of a queue the same settings. A consumer that
stalls longer than ``dead_after`` (SIGSTOP, a debugger) loses its messages to the others (they run
again: at-least-once); its later settlements of them raise
:class:`~funboost_like.core.errors.DoubleAckError` and change nothing.

Also shared by those kinds: acks (one pipeline, or sent ahead of the next fetch in the same write) and
the messages of a fetch whose reply was lost (a connection broke, or the fetch failed half way): they
are in the consumer's in-flight record without the process holding them, and the next fetch of that
queue hands them out, if no other thread of the process is fetching it at that moment (otherwise
they come back when the process ends).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

from redis.exceptions import RedisError

from funboost_like.brokers.base import DeadLetter, Delivery
from funboost_like.brokers.redis_base import LUA_COUNTS, LUA_NOW, RedisBroker
from funboost_like.brokers.redis_common import LuaScript, Piggyback, raise_first_error
from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError, DoubleAckError

logger = logging.getLogger("funboost_like.redis")

_DEAD_CONSUMERS = """
local function dead_consumers(before)
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', before, 'LIMIT', 0, 100)
end
"""


def consumer_scripts(functions: str) -> tuple[LuaScript, LuaScript, LuaScript]:
    """The sweep, retire and in-flight scripts of a kind, from its Lua ``functions``: ``held(cid)`` (how
    many messages consumer ``cid`` holds), ``recover(cid)`` (put them back, counting a delivery and a
    crash each; return how many) and ``forget(cid)`` (drop its records); ``dead_consumers(before)`` may
    be redefined. Every script gets KEYS consumers ZSET, queue key, attempts HASH and ARGV key prefix,
    consumer id ('' for none), dead-after seconds."""
    prologue = LUA_NOW + LUA_COUNTS + _DEAD_CONSUMERS + functions
    sweep = LuaScript(prologue + """
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[1], now, ARGV[2]) end
local moved = 0
for _, cid in ipairs(dead_consumers(now - tonumber(ARGV[3]))) do
  moved = moved + recover(cid)
  forget(cid)
  redis.call('ZREM', KEYS[1], cid)
end
return moved
""")
    retire = LuaScript(prologue + """
if held(ARGV[2]) > 0 then return 0 end
forget(ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[2])
return 1
""")
    in_flight = LuaScript(prologue + """
local n = 0
for _, cid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do n = n + held(cid) end
return n
""")
    return sweep, retire, in_flight


class RedisConsumers(RedisBroker):
    """The registry and the shared consumer side (see the module docstring), driven by the base's
    maintenance thread: :meth:`_recover` beats for this consumer on the queue and sweeps the dead
    ones, every ``heartbeat_interval`` seconds. Kinds set ``_scripts`` (from :func:`consumer_scripts`) and
    ``_give_back_script`` (see :meth:`_give_back`), and implement ``_fetch``, ``_adopt``, ``_ack_commands``,
    ``_acked`` and ``_in_flight_item``."""

    _scripts: ClassVar[tuple[LuaScript, LuaScript, LuaScript]]
    _give_back_script: ClassVar[LuaScript]
    _taken_over = "were settled before, or recovered by another consumer after this one missed its heartbeats"

    def __init__(self, *, heartbeat_interval: float | None = None, dead_after: float | None = None) -> None:
        """``heartbeat_interval`` and ``dead_after``: else the ``REDIS_HEARTBEAT_SECONDS`` and
        ``REDIS_DEAD_AFTER_SECONDS`` settings; ConfigurationError unless 0 < interval < dead_after."""
        interval = float(settings.get("REDIS_HEARTBEAT_SECONDS") if heartbeat_interval is None else heartbeat_interval)
        dead = float(settings.get("REDIS_DEAD_AFTER_SECONDS") if dead_after is None else dead_after)
        if not 0 < interval < dead:
            raise ConfigurationError(
                f"need 0 < heartbeat interval < dead-after time, got {interval} and {dead} seconds")
        self.heartbeat_interval, self.dead_after = interval, dead
        super().__init__()

    def _after_fork(self) -> None:
        super()._after_fork()
        host = socket.gethostname().replace(":", "_").replace("{", "_").replace("}", "_") or "host"
        self._cid = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # unique across hosts and processes; no ":{}"
        self._registered: set[str] = set()  # queues this consumer fetched from (and beats on)
        self._lock = threading.Lock()
        self._fetching: collections.Counter[str] = collections.Counter()  # queue -> fetches running now
        self._suspect: set[str] = set()  # queues where a fetch reply was lost

    @property
    def consumer_id(self) -> str:
        """This consumer's id (also its name in the group, for REDIS_STREAM)."""
        return self._cid

    # -- fetching and acknowledging ----------------------------------------------------------------
    def _fetch(self, before: Piggyback | None, queue: str, max_n: int) -> list[Delivery]:
        """Take up to ``max_n`` messages, ``before`` sent ahead of the first command."""
        raise NotImplementedError

    def _adopt(self, before: Piggyback | None, queue: str, held: set[Any]) -> list[Delivery]:
        """The messages in this consumer's in-flight record whose token is not in ``held``, oldest first."""
        raise NotImplementedError

    def _ack_commands(self, deliveries: Sequence[Delivery]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _acked(self, replies: list[Any], total: int) -> int:
        """How many of ``total`` deliveries the replies of :meth:`_ack_commands` found still in flight."""
        raise NotImplementedError

    def _open(self, queue: str) -> None:
        """Before the first fetch of ``queue`` in this process (and after a close)."""

    def _ack_and_get(self, deliveries: Sequence[Delivery], queue: str, max_n: int) -> list[Delivery]:
        before = Piggyback(self._ack_commands(deliveries))
        got = self._get(queue, max_n, before)
        replies = before.replies or []
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors:
            logger.error("%s refused acknowledging %d message(s): %s; they will be delivered again", self._where(),
                         len(deliveries), errors[0])
        elif self._acked(replies, len(deliveries)) != len(deliveries):
            logger.warning("some of %d deliveries %s", len(deliveries), self._taken_over)
        return got

    def _get(self, queue: str, max_n: int, before: Piggyback | None = None) -> list[Delivery]:
        """A fetch (``before``: acks sent ahead in the same write), or the messages of a lost fetch reply."""
        if queue not in self._registered:
            self._open(queue)
            self._registered.add(queue)
        with self._lock:
            self._fetching[queue] += 1
            alone = self._fetching[queue] == 1
        try:
            if alone and queue in self._suspect:
                self._suspect.discard(queue)
                with self._held_lock:
                    held = set(self._held.get(queue, ()))
                adopted = self._adopt(before, queue, held)
                before = None
                if len(adopted) > max_n:
                    self._suspect.add(queue)  # the rest next time
                    del adopted[max_n:]
                if adopted:
                    logger.warning("queue %r: handing out %d message(s) whose fetch reply was lost", queue,
                                   len(adopted))
                    return adopted
            return self._fetch(before, queue, max_n)
        except RedisError:
            self._suspect.add(queue)  # the fetch may have taken messages: adopted by the next one
            raise
        finally:
            with self._lock:
                self._fetching[queue] -= 1

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        replies = raise_first_error(self._conn().pipeline(self._ack_commands(deliveries)))
        self._check_settled(self._acked(replies, len(deliveries)), len(deliveries))

    def _check_settled(self, done: int, total: int) -> None:
        if done != total:
            raise DoubleAckError(f"{total - done} of {total} deliveries {self._taken_over}")

    # -- settling otherwise ------------------------------------------------------------------------
    def _in_flight_item(self, delivery: Delivery) -> tuple[Any, ...]:
        """The key of ``delivery``'s in-flight record, then what the give-back script reads of it."""
        raise NotImplementedError

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        mode = "delay" if delay > 0 else "head" if front else "tail"
        if mode == "head" and self.capabilities.release_front:  # the first one pushed last: the next one popped
            deliveries = deliveries[::-1]
        self._check_settled(self._give_back(deliveries, mode, delay), len(deliveries))

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        self._check_settled(self._give_back([delivery], "dead", 0.0, letter.envelope()), 1)

    def _give_back(self, deliveries: Sequence[Delivery], mode: str, delay: float = 0.0, envelope: bytes = b"") -> int:
        """Run the kind's ``_give_back_script`` once per queue and in-flight record; return how many of
        ``deliveries`` were still in flight (only those are settled).

        The script gets KEYS the in-flight record, the queue, its delayed ZSET, attempts HASH and dead
        letters; ARGV ``mode`` (``tail``: nacked, to the back; ``head``: released, to the front where the
        kind has one, no attempt counted; ``delay``; ``dead``), the key prefix, the consumer id, a unique
        id, ``delay`` seconds, the dead letter's ``envelope``, then each delivery's items (see
        :meth:`_in_flight_item`), in order."""
        groups: dict[tuple[str, Any], list[Any]] = {}
        for delivery in deliveries:
            record, *items = self._in_flight_item(delivery)
            groups.setdefault((delivery.queue, record), []).extend(items)
        done = 0
        for (queue, record), items in groups.items():
            keys = self._queue_keys(queue)
            done += int(self._give_back_script(self._conn(), [record, queue, keys.delayed, keys.attempts, keys.dead],
                                               [mode, keys.prefix, self._cid, uuid.uuid4().hex, repr(float(delay)),
                                                envelope, *items]))
        return done

    # -- the registry ------------------------------------------------------------------------------
    def maintenance_interval(self) -> float:
        return self.heartbeat_interval

    def _registry_call(self, script: LuaScript, queue: str, cid: str) -> int:
        keys = self._queue_keys(queue)
        return int(script(self._conn(), [keys.consumers, queue, keys.attempts],
                          [keys.prefix, cid, repr(self.dead_after)]))

    def _recover(self, queue: str) -> int:
        """Beat for this consumer on ``queue`` (if it fetched there) and put back what dead ones held."""
        return self._registry_call(self._scripts[0], queue, self._cid if queue in self._registered else "")

    def recover_dead_consumers(self, queue: str) -> int:
        """Sweep ``queue`` once now; return how many messages of dead consumers were put back."""
        return int(self._guard(f"sweeping queue {queue!r}", self._recover, queue))

    def in_flight(self, queue: str) -> int:
        """Messages of ``queue`` fetched by any consumer and not settled yet."""
        return int(self._guard(f"counting in-flight messages of queue {queue!r}", self._registry_call,
                             self._scripts[2], queue, ""))

    def _stopped_consuming(self, queue: str) -> None:
        """Retire from the registry of ``queue`` if this consumer holds nothing there, so the maintenance
        thread stops beating on a queue no longer consumed here (a later fetch registers again)."""
        super()._stopped_consuming(queue)
        if queue in self._registered and self._registry_call(self._scripts[1], queue, self._cid):
            self._registered.discard(queue)

    def _close(self) -> None:
        """Retire from the queues where this consumer holds nothing; what it still holds is recovered by
        another consumer's sweep ``dead_after`` seconds later."""
        if self._redis is not None:
            for queue in list(self._registered):
                try:
                    self._registry_call(self._scripts[1], queue, self._cid)
                except RedisError:
                    pass  # swept like a dead consumer's record later
        self._registered.clear()
        super()._close()
