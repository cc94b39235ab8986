"""The base classes of the Redis brokers: what REDIS, REDIS_ACK_ABLE, RedisBrpopLpush and REDIS_STREAM share.

:class:`RedisBrokerBase` holds the per-process plumbing and the operations that are the same for
every kind:

* per-process state: :meth:`~RedisBrokerBase._reset_process_state` sets up what belongs to one
  process (its connections, plus whatever a kind adds) and runs again, by :meth:`_conn`, in a
  forked child, whose parent's sockets and deliveries are not its own;
* connections: :meth:`_conn` returns the process-wide
  :func:`~funboost_like.brokers.redis_common.direct_connections` (the ``REDIS_URL`` setting is read
  at first use, and again after :meth:`close`);
* a cache of each queue's key names (and whatever else the kind keeps per queue), made once by
  :meth:`_queue_keys` from the kind's ``_keys_class``;
* dead letters: the LIST ``fl:{<queue>}:dead`` read by :meth:`list_dead_letters` and deleted by
  :meth:`purge_dead_letters`;
* :meth:`purge` and :meth:`count`, each running the kind's own script through
  :meth:`_run_count_or_purge`;
* ``key_value_store()`` from :class:`~funboost_like.brokers.redis_store.RedisStoresMixin`.

:class:`RedisConsumerBrokerBase` adds what the at-least-once kinds (each broker instance a consumer
with its own id, registered on the queues it fetches from) share: the consumer id, renewed in a
forked child, a lock for registration, and the check that every delivery settled was still its own
(:class:`~funboost_like.core.errors.DoubleAckError` otherwise). Each kind keeps its own scripts, keys and fetch logic in
its own module; redis-py errors are raised as the framework's (see
:func:`~funboost_like.brokers.redis_common.translate_error`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

from redis.exceptions import RedisError

from funboost_like.brokers.base import Broker, DeadLetter, Delivery
from funboost_like.brokers.redis_common import (
    PURGE_LIST,
    SCHEDULE,
    DirectConnections,
    Piggyback,
    delayed_member,
    describe_url,
    direct_connections,
    lpush_many,
    new_consumer_id,
    read_dead_letters,
    translate_error,
)
from funboost_like.brokers.redis_store import RedisStoresMixin
from funboost_like.core.errors import ConfigurationError, DoubleAckError

logger = logging.getLogger("funboost_like.redis")


class QueueKeys(Protocol):
    """What every kind's per-queue record names: the dead-letter list of the queue."""

    dead: str


KeysT = TypeVar("KeysT", bound=QueueKeys)


class RedisBrokerBase(RedisStoresMixin, Broker, Generic[KeysT]):
    """Per-process connections, per-queue keys, dead letters, count and purge of a Redis broker."""

    _keys_class: Callable[[str], KeysT]  # built from the queue name: the kind's key names for that queue

    def __init__(self) -> None:
        self._keys: dict[str, KeysT] = {}
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """What belongs to this process (called again in a forked child); kinds extend it."""
        self._pid = os.getpid()
        self._redis: DirectConnections | None = None

    # -- plumbing ----------------------------------------------------------------------------------
    def _conn(self) -> DirectConnections:
        if self._pid != os.getpid():  # a forked child: its parent's deliveries and sockets are not its own
            self._reset_process_state()
        conn = self._redis
        if conn is None:
            conn = self._redis = direct_connections()
        return conn

    def _queue_keys(self, queue: str) -> KeysT:
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = self._keys_class(queue)
        return keys

    # -- dead letters ------------------------------------------------------------------------------
    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        try:
            return read_dead_letters(self._conn(), queue, limit)
        except RedisError as exc:
            raise translate_error(exc, f"listing dead letters of queue {queue!r}") from exc

    def purge_dead_letters(self, queue: str) -> int:
        try:
            return int(PURGE_LIST(self._conn(), [self._queue_keys(queue).dead], []))
        except RedisError as exc:
            raise translate_error(exc, f"purging dead letters of queue {queue!r}") from exc

    # -- queue maintenance -------------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        return self._count_or_purge(queue, purge=True)

    def count(self, queue: str) -> int:
        return self._count_or_purge(queue, purge=False)

    def _count_or_purge(self, queue: str, *, purge: bool) -> int:
        try:
            return int(self._run_count_or_purge(self._conn(), queue, purge))
        except RedisError as exc:
            raise translate_error(exc, f"{'purging' if purge else 'counting'} queue {queue!r}") from exc

    @abstractmethod
    def _run_count_or_purge(self, conn: DirectConnections, queue: str, purge: bool) -> Any:
        """Run the kind's script that counts the waiting messages of ``queue`` (and, with ``purge``,
        deletes them); return its reply. Raises redis-py errors (the caller translates them)."""

    def close(self) -> None:
        """Forget the connections (shared per process, closed by ``close_clients``); reconnects on next use."""
        self._redis = None


class RedisConsumerBrokerBase(RedisBrokerBase[KeysT]):
    """A Redis broker whose instance is a consumer: a unique id per process, renewed in a forked child."""

    # How a delivery this consumer fetched may have passed to another one (for DoubleAckError).
    _taken_over: ClassVar[str] = "recovered by another consumer after this one missed its heartbeats"

    def _reset_process_state(self) -> None:
        super()._reset_process_state()
        self._cid = new_consumer_id()
        self._lock = threading.Lock()

    @property
    def consumer_id(self) -> str:
        """This consumer's id (its name in the group, for REDIS_STREAM)."""
        if self._pid != os.getpid():
            self._reset_process_state()
        return self._cid

    def _check_settled(self, settled: int, total: int) -> None:
        """Raise DoubleAckError unless all ``total`` deliveries were still this consumer's to settle."""
        if settled != total:
            raise DoubleAckError(self._unsettled_message(settled, total))

    def _unsettled_message(self, settled: int, total: int) -> str:
        return (f"{total - settled} of {total} deliveries were already acknowledged or rejected, "
                f"or were {self._taken_over}")

    # -- acks sent with the next fetch -------------------------------------------------------------
    def ack_and_fetch(self, deliveries: Sequence[Delivery], queue: str, max_n: int,
                      timeout: float) -> list[Delivery]:
        """The acks and the fetch's first command in one write, so one round trip instead of two."""
        before = self._ack_piggyback(deliveries) if deliveries else None
        if before is None:
            return self.fetch(queue, max_n, timeout)
        try:
            return self._fetch_after(before, queue, max_n, timeout)
        finally:
            if not before.done:  # the fetch sent nothing (or failed first): send the acks on their own
                try:
                    self._conn().send_packed(b"", 0, before)
                except RedisError as exc:
                    logger.error("acknowledging %d message(s) failed (%s); they will be delivered again",
                                 len(deliveries), translate_error(exc, "acknowledging"))

    @abstractmethod
    def _ack_piggyback(self, deliveries: Sequence[Delivery]) -> Piggyback | None:
        """The ack of ``deliveries`` as commands to send ahead of a fetch (None: nothing to send)."""

    @abstractmethod
    def _fetch_after(self, before: Piggyback | None, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        """:meth:`fetch` with ``before`` (if any) sent ahead of its first command."""

    def _piggyback(self, commands: list[tuple[Any, ...]], total: int, count_settled: Callable[[list[Any]], int],
                   on_lost: Callable[[], object]) -> Piggyback:
        """A :class:`Piggyback` of ack ``commands`` for ``total`` deliveries; ``count_settled`` reads how
        many were still this consumer's from the replies (a shortfall is logged, as no caller is left to
        raise DoubleAckError to)."""

        def settle(replies: list[Any]) -> None:
            errors = [reply for reply in replies if isinstance(reply, Exception)]
            if errors:
                logger.error("Redis at %s refused acknowledging %d message(s): %s; they will be delivered again",
                             describe_url(), total, errors[0])
                return
            settled = count_settled(replies)
            if settled != total:
                logger.warning("%s", self._unsettled_message(settled, total))

        return Piggyback(commands, settle, on_lost)


LIST_MAX_PRIORITY = 9  # list kinds: level 0 is the list named after the queue, levels 1..9 beside it
LIST_PUSH_BATCH = 1000  # values per LPUSH command in publish_many


class ListKeys(Protocol):
    lists: list[str]  # ready list of each priority level (index = level)
    delayed: str  # ZSET of messages not due yet


class RedisListPublishing(RedisBrokerBase[KeysT]):
    """``publish`` and ``publish_many`` of the list kinds (REDIS, REDIS_ACK_ABLE), which share one layout:
    ``LPUSH`` onto the ready list of the message's priority, or into the delayed ZSET until due."""

    def _list_keys(self, queue: str) -> ListKeys:
        return cast(ListKeys, self._queue_keys(queue))

    def publish(self, queue: str, body: bytes, *, priority: int = 0, not_before: float | None = None) -> None:
        conn = self._conn()
        try:
            if not_before is not None:
                delay = not_before - time.time()
                if delay > 0:
                    SCHEDULE(conn, [self._list_keys(queue).delayed],
                             [repr(delay), delayed_member(list_priority_level(priority), 0, body)])
                    return
            key = self._list_keys(queue).lists[list_priority_level(priority)] if priority else queue
            conn.execute_command("LPUSH", key, body, spin=True)
        except RedisError as exc:
            raise translate_error(exc, f"publishing to queue {queue!r}") from exc

    def publish_many(self, queue: str, bodies: Sequence[bytes], *, priority: int = 0) -> None:
        if not bodies:
            return
        key = self._list_keys(queue).lists[list_priority_level(priority)] if priority else queue
        conn = self._conn()
        try:
            lpush_many(conn, key, bodies, LIST_PUSH_BATCH)
        except RedisError as exc:
            raise translate_error(exc, f"publishing {len(bodies)} messages to queue {queue!r}") from exc


def list_priority_level(priority: int) -> int:
    """Check a priority of the list kinds (an int 0..9) and return it as the level."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= LIST_MAX_PRIORITY:
        raise ConfigurationError(f"Redis list priorities are integers 0..{LIST_MAX_PRIORITY}, not {priority!r}")
    return priority
