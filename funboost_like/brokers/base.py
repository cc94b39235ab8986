"""The broker contract, version 2: the base owns the machinery, a broker implements primitives.

A broker moves opaque ``bytes`` bodies between publishers and consumers of named queues. The public
methods (:meth:`Broker.publish`, :meth:`~Broker.publish_many`, :meth:`~Broker.fetch`,
:meth:`~Broker.ack`, :meth:`~Broker.ack_and_fetch`, :meth:`~Broker.nack`, :meth:`~Broker.release`,
:meth:`~Broker.dead_letter`, :meth:`~Broker.purge`, :meth:`~Broker.count`, :meth:`~Broker.close`)
are written once here. The base owns:

* the bounded wait of ``fetch``: the broker's native block (:meth:`Broker._wait`) when it has one,
  else a poll backing off from 2 ms to 50 ms; ``fetch`` never waits past its timeout;
* the tokens this process holds, so a second ack, nack, release or dead-lettering of one delivery
  raises :class:`~funboost_like.core.errors.DoubleAckError` in one place;
* settlements (acks, requeues, dead letters) that failed on a connection error: kept and sent again
  before the next fetch (or at :meth:`~Broker.close`), so a message does not stay held by a live
  consumer until its process ends. Every primitive that settles must therefore be idempotent;
* error translation: an exception in ``connection_errors`` becomes
  :class:`~funboost_like.core.errors.BrokerConnectionError`, one in ``errors`` a
  :class:`~funboost_like.core.errors.BrokerError`, the cause chained;
* fork safety: in a forked child every live broker forgets its parent's held tokens and calls
  :meth:`Broker._after_fork` (drop sockets, connections, identities) before any use;
* a maintenance thread (:mod:`~funboost_like.brokers.maintenance`) for each broker that renews leases
  or beats (:meth:`_renew`) or recovers dead consumers' messages (:meth:`_recover`).

A broker implements the primitives (see ``docs/writing-a-broker.md``):

``_put`` (required), ``_get`` (required, never blocks), ``_ack`` (required), ``_requeue``,
``_purge`` and ``_size`` (required), and optionally ``_wait``, ``_renew`` and ``_recover`` (with
``maintenance_interval``), ``_dead_letter``, ``_heads``, ``_ack_and_get``, ``_interrupt``, ``_stop_fetching``,
``_after_fork`` and ``_close``; where the broker has them, it also overrides the public
``list_dead_letters``, ``purge_dead_letters``, ``remove_dead_letter``, ``list_delayed``,
``configure_queue`` and ``key_value_store``. A settling primitive (``_ack``, ``_requeue``,
``_dead_letter``, the acks of ``_ack_and_get``) always gets deliveries of one queue.

Thread safety: one broker instance serves every publisher and consumer of its kind in a process,
so every primitive must be safe to call from several threads at once.

Delivery guarantee: on a broker whose ``capabilities.redelivery`` is not ``none``, a fetched message
stays owned by the consumer until it is settled; if the consumer dies first, the broker makes it
visible again by itself (native requeue, lease expiry or heartbeat sweep), counting the death in
:attr:`Delivery.crashes` where it can (the poison-message rule of the consumer reads it).
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from itertools import groupby
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from funboost_like.brokers.capabilities import Capabilities as Capabilities  # re-exported: part of the contract
from funboost_like.brokers.dead_letters import DeadLetter as DeadLetter  # re-exported: part of the contract
from funboost_like.brokers.maintenance import maintenance as _maintenance
from funboost_like.brokers.optional import OptionalOperations
from funboost_like.brokers.routing import Routing
from funboost_like.core.errors import BrokerConnectionError, BrokerError, DoubleAckError

if TYPE_CHECKING:
    from funboost_like.core.stores import KeyValueStore

logger = logging.getLogger("funboost_like.broker")
T = TypeVar("T")
S = TypeVar("S", bound="KeyValueStore")

POLL_FIRST, POLL_MAX = 0.002, 0.05  # the idle poll of a broker without a native wait


class Delivery:
    """One fetched message: the body plus the broker's handle on it (never part of the payload).

    ``attempts`` counts deliveries (1 the first time; a nack and a crash count one, a release does
    not). ``crashes`` counts the deliveries that ended with their consumer's death, where the
    broker can tell (0 otherwise).
    """

    __slots__ = ("queue", "body", "token", "attempts", "priority", "crashes")

    def __init__(self, queue: str, body: bytes, token: Any, attempts: int = 1, priority: int = 0,
                 crashes: int = 0) -> None:
        # token: row id, stream id, delivery tag, ...: hashable, unique within the queue
        self.queue, self.body, self.token, self.attempts, self.priority, self.crashes = (
            queue, body, token, attempts, priority, crashes)

    def __repr__(self) -> str:
        return f"Delivery(queue={self.queue!r}, token={self.token!r}, attempts={self.attempts})"


_live: weakref.WeakSet[Broker] = weakref.WeakSet()
_queue_of = operator.attrgetter("queue")


class Broker(Routing, OptionalOperations):
    """Base class of every broker: the public methods and the shared bookkeeping.

    Subclasses set ``kind`` and ``capabilities`` and implement the primitives.
    """

    kind: ClassVar[int]
    capabilities: ClassVar[Capabilities] = Capabilities()
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = ()  # -> BrokerConnectionError
    errors: ClassVar[tuple[type[BaseException], ...]] = ()  # any other error of the client -> BrokerError
    # How many messages a fetch may take while the consumer runs its fast calls on the fetcher thread
    # (its inline runner), when that is more than its free capacity: for brokers whose every fetch is
    # a transaction that costs about the same for 50 rows as for 200. 0: the free capacity only.
    inline_batch: ClassVar[int] = 0
    # How long a consumer's idle fetch waits before its loop looks again at its stop flag and its pace: a
    # stop waits for it. Shorter where an empty fetch costs next to nothing (an in-process or local file
    # queue); a server's broker keeps 1 s, which bounds the queries an idle consumer sends.
    idle_fetch_seconds: ClassVar[float] = 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if (cls._renew is not Broker._renew or cls._recover is not Broker._recover) and \
                cls.maintenance_interval is Broker.maintenance_interval:
            raise TypeError(f"{cls.__name__} defines _renew or _recover but not maintenance_interval(), "
                            "so the maintenance thread would never run them")

    def __init__(self) -> None:
        self._process_state()
        cls = type(self)
        self._client_errors = cls.connection_errors + cls.errors
        self._waits = cls._wait is not Broker._wait
        self._combined = cls._ack_and_get is not Broker._ack_and_get
        self._maintained = cls._renew is not Broker._renew or cls._recover is not Broker._recover
        self._kv_stores: dict[Any, KeyValueStore] = {}
        _live.add(self)

    def _process_state(self) -> None:
        self._held: dict[str, set[Any]] = defaultdict(set)  # queue -> tokens this process holds
        self._held_lock = threading.Lock()
        # settlements to send again after an outage, with their deliveries (renewed meanwhile)
        self._deferred: list[tuple[Callable[[list[Delivery]], object], list[Delivery]]] = []
        self._fetched: set[str] = set()  # queues this process fetched from (recovered by maintenance)

    # -- primitives ------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        """Append ``bodies`` in order, invisible until the UNIX time ``not_before`` when given."""
        raise NotImplementedError

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        """Take up to ``max_n`` ready messages (highest priority first, then oldest). Never blocks."""
        raise NotImplementedError

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove these held messages for good. Idempotent (it may be sent twice after an outage)."""
        raise NotImplementedError

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        """Make held messages visible again: after ``delay`` seconds, at the ``front`` or the back of
        their priority, counting the delivery as an attempt or not. Idempotent."""
        raise NotImplementedError

    def _purge(self, queue: str) -> int:
        """Delete the waiting messages of ``queue`` (not those held); return how many."""
        raise NotImplementedError

    def _size(self, queue: str) -> int:
        """How many messages wait in ``queue`` (ready or delayed, not held by a live consumer)."""
        raise NotImplementedError

    def _wait(self, queue: str, timeout: float) -> None:
        """Optional native block: return when ``queue`` may have a message, or after ``timeout``.
        May return early; must not take a message."""

    def _renew(self, deliveries: Sequence[Delivery]) -> None:
        """Optional: extend the leases of (or beat for) what this process holds; run every
        :meth:`maintenance_interval` seconds by the maintenance thread once the process has fetched."""

    def _recover(self, queue: str) -> int:
        """Optional: make the messages of dead consumers of ``queue`` visible again; return how many."""
        return 0

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        """Optional native dead-letter place: keep ``letter`` and remove the held message, atomically.
        The default publishes a JSON envelope to ``<queue>.dlq`` and then acks."""
        self._put(f"{delivery.queue}.dlq", [letter.envelope()], priority=0, not_before=None)
        self._ack([delivery])

    def _ack_and_get(self, deliveries: Sequence[Delivery], queue: str, max_n: int) -> list[Delivery]:
        """Optional: :meth:`_ack` then :meth:`_get` in one round trip. The acks must be sent even when
        the get fails; an ack failure is logged here, not raised."""
        raise NotImplementedError

    def maintenance_interval(self) -> float:
        """Seconds between two rounds of :meth:`_renew` and :meth:`_recover` (0: no maintenance)."""
        return 0.0

    def _after_fork(self) -> None:
        """In a forked child: drop the parent's sockets, connections and identity (never close them)."""

    def _stop_fetching(self, queue: str) -> None:
        """Optional: this process stops fetching from ``queue``; give back what was prefetched for it."""

    def _stopped_consuming(self, queue: str) -> None:
        """Optional: a consumer's graceful stop on ``queue`` is over (its finished calls all settled): send
        what settling left for a later fetch and let go of the queue's subscription."""

    def _close(self) -> None:
        """Release connections; the broker reconnects lazily when used again."""

    # -- publishing ------------------------------------------------------------------------------
    def publish(self, queue: str, body: bytes, *, priority: int = 0, not_before: float | None = None) -> None:
        """Append one message. ``not_before`` is a UNIX time before which it must not be fetched."""
        try:
            self._put(queue, (body,), priority=priority, not_before=not_before)
        except self._client_errors as exc:
            raise self._translated(exc, f"publishing to queue {queue!r}") from exc

    def publish_many(self, queue: str, bodies: Sequence[bytes], *, priority: int = 0) -> None:
        """Append many messages in order, in as few round trips as the broker allows."""
        if not bodies:
            return
        try:
            self._put(queue, bodies, priority=priority, not_before=None)
        except self._client_errors as exc:
            raise self._translated(exc, f"publishing {len(bodies)} messages to queue {queue!r}") from exc

    # -- consuming -------------------------------------------------------------------------------
    def fetch(self, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        """Take up to ``max_n`` ready messages; block at most ``timeout`` seconds; [] when idle."""
        if max_n <= 0:
            return []
        if self._deferred:
            self._send_deferred(f"fetching from queue {queue!r}")
        return self._take_or_wait(queue, max_n, timeout, None)

    def ack_and_fetch(self, deliveries: Sequence[Delivery], queue: str, max_n: int,
                      timeout: float) -> list[Delivery]:
        """:meth:`ack` ``deliveries``, then :meth:`fetch` (one round trip where the broker can).

        A failed ack never stops the fetch: it is logged (the broker delivers those messages again, or
        the base sends the ack again after an outage); only a fetch failure is raised.
        """
        if not deliveries:
            return self.fetch(queue, max_n, timeout)
        if not self._combined or self._deferred or max_n <= 0:
            self._ack_logged(self.ack, deliveries)
            return self.fetch(queue, max_n, timeout)
        live = self._unhold(deliveries)
        if len(live) != len(deliveries):
            logger.warning("%d of %d message(s) were settled already", len(deliveries) - len(live), len(deliveries))
        if live and (live[0].queue != queue or live[-1].queue != queue):  # acks of other queues: apart
            self._ack_logged(functools.partial(self._send_settlement, self._ack), live)
            live = []
        return self._take_or_wait(queue, max_n, timeout, live or None)

    @staticmethod
    def _ack_logged(send: Callable[[Any], object], deliveries: Sequence[Delivery]) -> None:
        """``send(deliveries)``, an ack that must not stop the fetch after it: a failure is logged only."""
        try:
            send(deliveries)
        except Exception:
            logger.warning("acking %d message(s) failed; they will come back", len(deliveries), exc_info=True)

    def _take(self, queue: str, max_n: int, acks: Sequence[Delivery] | None) -> list[Delivery]:
        try:
            got = self._get(queue, max_n) if acks is None else self._ack_and_get(acks, queue, max_n)
        except self._client_errors as exc:
            if acks and self._retryable(exc):  # the acks may not have arrived: sent
                self._deferred.append((self._ack, list(acks)))  # sent again before the next fetch
            raise self._translated(exc, f"fetching from queue {queue!r}") from exc
        if queue not in self._fetched:  # maintenance starts with the first fetch
            self._fetched.add(queue)
            if self._maintained and self.maintenance_interval() > 0:
                _maintenance.add(self)
        if got:
            with self._held_lock:  # a new queue's entry too: maintain() and held() read the dict under it
                self._held[queue].update([d.token for d in got])
        return got

    def _take_or_wait(self, queue: str, max_n: int, timeout: float, acks: Sequence[Delivery] | None) -> list[Delivery]:
        """:meth:`_take` (with ``acks``); when nothing came, wait and take again until ``timeout``."""
        got = self._take(queue, max_n, acks)
        if got or timeout <= 0:
            return got
        deadline, mark = time.monotonic() + timeout, self._interrupt_mark(queue)
        pause = POLL_FIRST
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._interrupt_mark(queue) != mark:  # interrupt_fetch(): a consumer stops
                return []
            if self._waits:
                try:
                    self._wait(queue, remaining)
                except self._client_errors as exc:
                    raise self._translated(exc, f"waiting on queue {queue!r}") from exc
            else:
                time.sleep(pause if pause < remaining else remaining)
                pause = min(pause * 2, POLL_MAX)
            got = self._take(queue, max_n, None)
            if got:
                return got

    # -- settling --------------------------------------------------------------------------------
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove finished messages for good. Raises DoubleAckError for one settled before, after
        settling the others."""
        if deliveries:
            self._settle(self._ack, deliveries)

    def nack(self, delivery: Delivery, *, requeue: bool = True, delay: float = 0.0) -> None:
        """Give a message back (visible again after ``delay`` seconds, the attempt counted) or, with
        ``requeue=False``, drop it."""
        if not requeue:
            self._settle(self._ack, (delivery,))
        else:
            self._settle(functools.partial(self._requeue, delay=max(0.0, delay), front=False, count_attempt=True),
                         (delivery,))

    def release(self, deliveries: Iterable[Delivery]) -> None:
        """Hand back messages fetched but never started (graceful shutdown): at the front, no attempt
        counted."""
        deliveries = list(deliveries)
        if deliveries:
            self._settle(functools.partial(self._requeue, delay=0.0, front=True, count_attempt=False), deliveries)

    def dead_letter(self, delivery: Delivery, reason: str, exc: BaseException | None = None, *,
                    attempts: int | None = None) -> None:
        """Keep a message the framework gave up on, with ``reason`` and its number of runs
        (``attempts``; the delivery count when not given), and remove it from the queue."""
        letter = DeadLetter(delivery.queue, delivery.body, str(reason), time.time(),
                            delivery.attempts if attempts is None else attempts, exc)
        self._settle(lambda live: self._dead_letter(live[0], letter), (delivery,))

    def _settle(self, send: Callable[[list[Delivery]], object], deliveries: Sequence[Delivery]) -> None:
        """``send(held)`` for the deliveries still held; DoubleAckError for the others, after sending."""
        live = self._unhold(deliveries)
        rejected = len(deliveries) - len(live)
        if live:
            self._send_settlement(send, live)
        if rejected:
            first = next(d for d in deliveries if d not in live)
            raise DoubleAckError(f"{first!r} was already acknowledged or rejected ({rejected} in all)")

    def _send_settlement(self, send: Callable[[list[Delivery]], object], live: list[Delivery]) -> None:
        """``send`` each queue's deliveries (``live`` comes from :meth:`_unhold`: one queue, or sorted by
        queue); one that fails on a retryable error is kept to be sent again before the next fetch."""
        groups = [live] if live[0].queue == live[-1].queue else [list(g) for _, g in groupby(live, _queue_of)]
        failure: BaseException | None = None
        for group in groups:
            try:
                send(group)
            except self._client_errors as exc:
                if self._retryable(exc):
                    self._deferred.append((send, group))
                failure = failure or exc
        if failure is not None:
            raise self._translated(failure, f"settling {len(live)} message(s)") from failure

    def _unhold(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Stop holding these deliveries; return those that were held (the others were settled before),
        sorted by queue when they belong to several."""
        queue = deliveries[0].queue
        tokens = {d.token for d in deliveries if d.queue == queue}
        with self._held_lock:
            held = self._held.get(queue)
            if held is not None and len(tokens) == len(deliveries) and tokens <= held:  # the usual case
                held -= tokens
                return list(deliveries)
        live: list[Delivery] = []
        with self._held_lock:
            held_by_queue = self._held
            for delivery in deliveries:
                held = held_by_queue.get(delivery.queue)
                if held is not None and delivery.token in held:
                    held.remove(delivery.token)
                    live.append(delivery)
        if live and any(d.queue != live[0].queue for d in live):
            live.sort(key=_queue_of)  # stable: each queue's deliveries keep their order
        return live

    def _send_deferred(self, action: str) -> None:
        """Send again, in order, the settlements that failed on a retryable error (:meth:`_retryable`)."""
        while self._deferred:
            send, deliveries = self._deferred[0]
            try:
                send(deliveries)
            except Exception as exc:
                if self._retryable(exc):
                    raise self._translated(exc, action) from exc
                logger.exception("%s refused a settlement sent again after an outage; its message comes back "
                                 "when this process ends", self._where())
            del self._deferred[0]
            logger.info("sent again a settlement that failed while %s was unreachable", self._where())

    # -- inspection ------------------------------------------------------------------------------
    def heads(self, queue: str) -> list[bytes]:
        """The bodies of the ready messages of ``queue`` that have waited longest, read without taking them
        (the head of each FIFO the broker keeps for the queue; empty when none is ready). The oldest
        message's age (Prometheus, ``status``) comes from them. NotImplementedError where a broker
        cannot read a queue's head without taking it."""
        return self._guard(f"reading the head of queue {queue!r}", self._heads, queue)

    def purge(self, queue: str) -> int:
        """Delete every waiting message of ``queue``; return how many were deleted."""
        return self._guard(f"purging queue {queue!r}", self._purge, queue)

    def count(self, queue: str) -> int:
        """How many messages wait in ``queue`` (ready or delayed; not those held by a consumer)."""
        return self._guard(f"counting queue {queue!r}", self._size, queue)

    def in_flight(self, queue: str) -> int:
        """Messages this process fetched from ``queue`` and has not settled yet."""
        return len(self._held.get(queue, ()))

    def held(self) -> list[tuple[str, Any]]:
        """(queue, token) of every message this process holds."""
        with self._held_lock:
            return [(queue, token) for queue, tokens in self._held.items() for token in tokens]

    def _kv_store(self, key: Any, make: Callable[[], S]) -> S:
        """The store this broker keeps under ``key``, made by ``make()`` the first time."""
        with self._held_lock:  # callers keep their store: this runs once per feature and queue
            store = self._kv_stores.get(key)
            if store is None:
                store = self._kv_stores[key] = make()
        return store  # type: ignore[return-value]  # made by this key's make()

    def maintain(self) -> None:
        """One maintenance round (the maintenance thread's job; tests call it directly): renew what
        this process holds, and what it settled during an outage until that settlement is sent again
        (else its lease ran out meanwhile and another consumer ran a finished call again, as a death),
        then recover the messages of dead consumers of the queues it fetches. Raises the first failure
        (client errors translated), after every queue had its turn."""
        with self._held_lock:
            held = [Delivery(queue, b"", token) for queue, tokens in self._held.items() for token in tokens]
        held += [delivery for _, deliveries in list(self._deferred) for delivery in deliveries]
        self._guard("renewing the leases of what this process holds", self._renew, held)
        failure: Exception | None = None  # raised once every queue had its turn
        for queue in list(self._fetched):
            try:
                recovered = self._guard(f"recovering dead consumers' messages of queue {queue!r}", self._recover, queue)
            except Exception as exc:
                failure, recovered = failure or exc, 0
            if recovered:
                logger.info("recovered %d message(s) of dead consumers of queue %r", recovered, queue)
        if failure is not None:
            raise failure

    def stop_fetching(self, queue: str) -> None:
        """This process stops fetching from ``queue`` (a consumer's graceful stop): a broker that prefetched
        messages for it hands them back without counting a delivery."""
        self._guard(f"handing back what was prefetched from queue {queue!r}", self._stop_fetching, queue)

    def stopped_consuming(self, queue: str) -> None:
        """The end of a consumer's graceful stop: every call it finished is settled and it fetches no more
        from ``queue``. A broker that settles with its next fetch (Kafka commits offsets there) sends
        those settlements now and gives up its subscription. Unless a call left running still holds a
        message of the queue, maintenance no longer recovers its dead consumers' messages from this
        process (its next fetch starts that again)."""
        if not self._held.get(queue):
            self._fetched.discard(queue)
        self._guard(f"ending the subscription to queue {queue!r}", self._stopped_consuming, queue)

    def close(self) -> None:
        """Send deferred settlements if possible, stop maintenance and release connections. The broker
        may be used again afterwards (it reconnects lazily)."""
        _maintenance.discard(self)
        self._fetched.clear()  # the next fetch starts maintenance again
        if self._deferred:
            try:
                self._send_deferred("closing")
            except BrokerError as exc:
                logger.warning("could not send again the settlements that failed during an outage (%s); "
                               "those messages come back after their lease or sweep", exc)
        self._close()

    # -- helpers ---------------------------------------------------------------------------------
    def _guard(self, action: str, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` with client errors translated (for what the public methods do not wrap)."""
        try:
            return call(*args)
        except self._client_errors as exc:
            raise self._translated(exc, action) from exc

    def _retryable(self, exc: BaseException) -> bool:
        """Whether a settlement that raised ``exc`` is to be sent again later (an outage), rather than
        given up: a connection error; a broker adds its own transient errors."""
        return isinstance(exc, self.connection_errors)

    def _where(self) -> str:
        """How to name the server in an error message (no password)."""
        return type(self).__name__

    def _translated(self, exc: BaseException, action: str) -> BrokerError:
        """The framework's error for a client error raised while ``action`` (raise it ``from exc``)."""
        detail = " ".join((str(exc) or repr(exc)).split())  # one line; pika's errors say nothing as text
        if isinstance(exc, self.connection_errors):
            return BrokerConnectionError(f"{self._where()} is unreachable while {action}: {detail}")
        return BrokerError(f"{self._where()} failed {action}: {detail}")


def _after_fork_in_child() -> None:
    _maintenance.reset_in_child()
    for broker in list(_live):
        broker._process_state()
        broker._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
