"""RabbitMQ (AMQP 0-9-1) for every client library: one broker class, a small session per client.

The RabbitMQ kinds (``RABBITMQ_PIKA``, ``RABBITMQ_AMQPSTORM``, ``RABBITMQ_RABBITPY``) and ``KOMBU``
differ only in their client library. Each supplies a :class:`Session` (synchronous work on the
calling thread: declare, bind, publish with confirms, count, purge, peek) and a :class:`Consumer`
(its I/O thread: subscriptions, deliveries, acks); :class:`AmqpBroker` holds everything else.

Guarantees and layout (docs/rabbitmq.md says the same for users):

* Queues are durable classic queues (version 2), with priorities only when a task asks for them
  (``broker_exclusive_config={"x-max-priority": n}``); messages are persistent (delivery mode 2), JSON
  bodies (``content_type`` ``application/json``). ``publish`` returns once the server confirmed
  (publisher confirms, ``mandatory``): an unroutable or refused message raises, never vanishes.
* Consumption: one channel per queue per process, ``basic.qos`` prefetch set to the consumer's
  capacity (its first fetch's ``max_n``), deliveries buffered in a :class:`PushBuffer` by the
  client's I/O thread; acks go back through that thread (contiguous ones as one ``multiple`` ack).
  A call thread never runs client I/O, so heartbeats keep flowing during long calls.
* Redelivery is native: the server requeues the unacked messages of a closed channel (a killed
  process's socket closes at once). Deliveries are counted in headers: ``fl-attempts`` (deliveries
  before this one) and ``fl-crashes`` (deliveries that ended with the consumer's death). A nack,
  a release or a delay re-publishes the message with its counts and acks the original; so a
  message the server marks ``redelivered`` was held by a consumer that died or lost its channel,
  and the next fetch re-publishes it with one more crash before anyone runs it: the
  poison-message rule (DESIGN §3.3) reads the counts. A message this live process held when its
  own channel or connection dropped is not counted when it comes back here (the push adapter
  notes them); delivered to another process first, it is (RabbitMQ does not say who held it).
  Re-published messages join the back of their queue.
* Delays without plugins and without a held message: 32 levels of durable queues
  ``fl.delay.q<k>`` whose ``x-message-ttl`` is 2**k ms, each behind a headers exchange
  ``fl.delay.x<k>``. A delayed message carries one header per bit of its delay (``fl-delay-<k>``)
  and enters at the level of its highest bit; each level either holds it 2**k ms (bit set) or
  passes it down, and the last level dead-letters it to ``fl.delay.deliver``, a headers exchange
  bound to each target queue by ``fl-queue``. A routed message's target is ``fl.routed.<exchange>``,
  a quorum queue that dead-letters it at once (``x-message-ttl`` 0) into the routing exchange with
  its routing key, *at least once*: one that no binding matches stays there and the server tries
  again (every 3 minutes by default; RabbitMQ logs a warning naming that queue), so nothing due is
  dropped however the bindings changed meanwhile. Every message of one level waits the same time, so the
  server expires them in order: a delay is exact to a few ms per set bit, never early, for any
  value up to 2**32 - 1 ms (49.7 days), with 32 queues in all.
* Dead letters: a JSON envelope ``{"body", "reason", "failed_at", "attempts"}`` in the durable
  queue ``<queue>.dlq``.
* Routing (DESIGN §9): exchanges are the server's own (durable); a routed publish is ``mandatory``.
* An exchange or queue that already exists with other properties (declared by another program,
  say not durable) is used as it is, with a warning.
* Key-value records (RPC results, task filters) are one-message queues on the same server
  (:mod:`~funboost_like.brokers.amqp_records`).
* ``count`` is the server's count of ready messages: delayed messages (in the delay levels) and
  messages held by consumers are not in it.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

from funboost_like.brokers.amqp_records import AmqpRecords
from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.per_thread import PerThread
from funboost_like.brokers.push_buffer import ACK_WRITE_SECONDS, PushConsuming, Subscription
from funboost_like.brokers.push_buffer import Consumer as Consumer  # re-exported for the clients
from funboost_like.brokers.push_buffer import Deliver as Deliver
from funboost_like.brokers.routing import Binding
from funboost_like.core.config import redact_url, settings
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.rabbitmq")

MAX_PRIORITY = 255  # RabbitMQ's bound of x-max-priority (its docs advise at most 10 levels)
PRIORITY_OPTION = "x-max-priority"  # broker_exclusive_config key: this queue keeps priorities 0..n
QUEUE_ARGUMENTS = {"x-queue-version": 2}  # CQv2: ~35% faster persistent publishing
ATTEMPTS, CRASHES = "fl-attempts", "fl-crashes"
DELAY_LEVELS = 32
DELIVER_EXCHANGE = "fl.delay.deliver"
DEAD_SCAN = 10_000  # dead letters read to list the newest
# A publisher's connection that brings no answer this long (a frozen server, a black hole on the way: no
# reset ever comes) is dropped as broken, so a publish fails instead of waiting forever.
ANSWER_TIMEOUT = 30.0
MAX_DELAY_MS = 2**DELAY_LEVELS - 1
ROUTED_PREFIX = "fl.routed."  # + exchange: where a delayed routed message is routed from when due


class Session(Protocol):
    """Synchronous AMQP work on one thread's connection, publisher confirms on (one per thread)."""

    def declare_queue(self, name: str, arguments: dict[str, Any] | None) -> bool:
        """Declare a durable queue; False when it exists with other properties (then used as it is)."""

    def declare_exchange(self, name: str, exchange_type: str) -> bool:
        """Declare a durable exchange; False when it exists with other properties."""

    def bind_queue(self, queue: str, exchange: str, key: str, arguments: dict[str, Any] | None = None) -> None: ...

    def bind_exchange(self, destination: str, source: str, key: str,
                      arguments: dict[str, Any] | None = None) -> None: ...

    def publish(self, exchange: str, routing_key: str, bodies: Sequence[bytes], priority: int,
                headers: dict[str, Any] | None) -> bool:
        """Publish persistent messages (``mandatory``) and wait for their confirms; False if returned unroutable."""

    def message_count(self, queue: str) -> int: ...

    def purge(self, queue: str) -> int: ...

    def peek(self, queue: str, limit: int, take: bytes | None = None) -> list[bytes]:
        """Up to ``limit`` bodies from the head of ``queue``, left in place ([] when there is no such queue);
        except the first equal to ``take``, which is removed, and the scan stops there."""

    def offer(self, queue: str, body: bytes, expiration_ms: int | None) -> bool:
        """Publish one persistent message to ``queue`` (default exchange), expiring after ``expiration_ms``;
        False when the server refused it (nack: a full ``reject-publish`` queue)."""

    def delete_queue(self, queue: str) -> None: ...

    def close(self) -> None: ...


def check_queue_options(options: dict[str, object]) -> None:
    """``broker_exclusive_config={"x-max-priority": n}``, n in 1..255: checked when a task is decorated."""
    if PRIORITY_OPTION in options:
        n = options[PRIORITY_OPTION]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PRIORITY:
            raise ConfigurationError(f"{PRIORITY_OPTION} must be an integer 1..{MAX_PRIORITY} (RabbitMQ advises "
                                     f"at most 10), not {n!r}")


def check_queue_name(queue: str) -> None:
    """A name RabbitMQ accepts for the queue and its ``.dlq`` (checked at decoration: the server's refusal
    would otherwise come at the first fetch, retried forever)."""
    if not queue or queue.startswith("amq.") or len(f"{queue}.dlq".encode()) > 255:
        raise ConfigurationError(f"RabbitMQ queue names must be non-empty, not start with 'amq.' (reserved) and "
                                 f"take at most 251 bytes in UTF-8, not {queue[:80]!r}")


def url_setting(name: str = "RABBITMQ_URL") -> str:
    return str(settings.get(name) or settings.get("RABBITMQ_URL"))


class AmqpBroker(PushConsuming, Broker):
    """RabbitMQ semantics on a client's :class:`Session` and :class:`Consumer` (see the module docstring)."""

    capabilities = Capabilities(redelivery="native", delay="native", max_priority=MAX_PRIORITY, dead_letters=True,
                                key_value=True, routing="native", persistent=True, cross_process=True,
                                cross_host=True, queue_options=frozenset({PRIORITY_OPTION}),
                                check_queue_options=check_queue_options, priority_option=PRIORITY_OPTION,
                                queue_names=check_queue_name, release_front=False,
                                counts_delayed=False, purges_delayed=False,  # delays share fl.delay.q<k>
                                settle_delay=ACK_WRITE_SECONDS)
    url_setting: ClassVar[str] = "RABBITMQ_URL"

    def __init__(self) -> None:
        super().__init__()
        self._after_fork()

    def _after_fork(self) -> None:
        self._local = threading.local()
        self._sessions: PerThread[Session] = PerThread(operator.methodcaller("close"))  # every thread's
        self._declared: set[tuple[str, ...]] = set()
        self._priorities: dict[str, int] = {}  # queue -> its x-max-priority (configure_queue)
        self._unprioritised: set[str] = set()  # queues warned about priorities they do not keep
        self._records: dict[tuple[str, str], AmqpRecords] = {}
        self._lock = threading.Lock()
        self._push_state()

    # -- the client's part -----------------------------------------------------------------------
    def _open_session(self, url: str) -> Session:
        raise NotImplementedError

    # -- sessions ----------------------------------------------------------------------------------
    def _url(self) -> str:
        return url_setting(self.url_setting)

    def _where(self) -> str:
        return f"RabbitMQ at {redact_url(self._url())}"

    def _session(self) -> Session:
        session: Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._open_session(self._url())
            self._sessions.add(session)
        return session

    def _with_session(self, action: Callable[[Session], Any]) -> Any:
        """``action(session)``; on a connection error the session is replaced and the action tried once more
        (a restarted server; a publish may then reach it twice)."""
        try:
            return action(self._session())
        except self.connection_errors:
            self._drop_session()
        return action(self._session())

    def _drop_session(self) -> None:
        session = getattr(self._local, "session", None)
        self._local.session = None
        self._declared.clear()  # a restarted server may have lost what was declared
        if session is not None:
            self._sessions.forget(session)
            self._sessions.close_all([session])  # it is broken already

    def configure_queue(self, queue: str, options: Mapping[str, object]) -> None:
        """``broker_exclusive_config={"x-max-priority": n}``: the queue is declared with priorities 0..n.
        Without it a queue has none (a priority queue costs RabbitMQ about 40% of its consume rate)."""
        options = dict(options)
        check_queue_options(options)
        if PRIORITY_OPTION in options:
            self._priorities[queue] = int(options[PRIORITY_OPTION])  # type: ignore[call-overload]

    def _declare(self, queue: str) -> None:
        if ("q", queue) not in self._declared:
            levels = self._priorities.get(queue)
            arguments = QUEUE_ARGUMENTS if levels is None else {**QUEUE_ARGUMENTS, PRIORITY_OPTION: levels}
            if not self._with_session(lambda s: s.declare_queue(queue, arguments)):
                logger.warning("queue %r exists with other properties on %s (x-max-priority, durability, ...); "
                               "using it as it is", queue, self._where())
                self._unprioritised.add(queue)  # its priorities are unknown here: nothing to say about them
            self._declared.add(("q", queue))

    # -- publishing --------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        levels = self._priorities.get(queue, 0)
        if priority and priority > levels:
            raise ConfigurationError(
                f"queue {queue!r} takes priorities 0..{levels} on RabbitMQ; a queue has "
                f"priorities when its task says so: broker_exclusive_config={{'x-max-priority': n}} (n <= 10 advised)")
        self._declare(queue)
        self._send("", queue, bodies, priority, None, not_before, target=("fl-queue", queue))

    def _send(self, exchange: str, key: str, bodies: Sequence[bytes], priority: int, headers: dict[str, Any] | None,
              not_before: float | None, target: tuple[str, str]) -> bool:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
            raise ConfigurationError(f"RabbitMQ takes priorities 0..{MAX_PRIORITY} (integers), not {priority!r}")
        delay_ms = 0 if not_before is None else int((not_before - time.time()) * 1000 + 0.999)
        if delay_ms > 0:
            exchange, headers = self._through_delay(delay_ms, target, headers)
        return bool(self._with_session(lambda s: s.publish(exchange, key, bodies, priority, headers)))

    def _through_delay(self, delay_ms: int, target: tuple[str, str], headers: dict[str, Any] | None
                       ) -> tuple[str, dict[str, Any]]:
        """The exchange and headers that hold a message ``delay_ms`` in the delay levels, then deliver it to
        ``target`` (("fl-queue", queue))."""
        if delay_ms > MAX_DELAY_MS:
            raise ConfigurationError(f"RabbitMQ delays at most {MAX_DELAY_MS / 86_400_000:.1f} days, not "
                                     f"{delay_ms / 86_400_000:.1f}")
        self._declare_delay_levels()
        kind, name = target
        if (kind, name) not in self._declared:
            arguments = {"x-match": "all", kind: name}
            self._with_session(lambda s: s.bind_queue(name, DELIVER_EXCHANGE, "", arguments))
            self._declared.add((kind, name))
        top = delay_ms.bit_length() - 1
        marked = dict(headers or {})
        marked[kind] = name
        for level in range(top + 1):
            marked[f"fl-delay-{level}"] = "1" if delay_ms >> level & 1 else "0"
        return f"fl.delay.x{top}", marked

    def _declare_delay_levels(self) -> None:
        if ("delay",) in self._declared:
            return

        def declare(s: Session) -> None:
            s.declare_exchange(DELIVER_EXCHANGE, "headers")
            for level in range(DELAY_LEVELS):
                s.declare_exchange(f"fl.delay.x{level}", "headers")
            for level in range(DELAY_LEVELS):
                below = f"fl.delay.x{level - 1}" if level else DELIVER_EXCHANGE
                s.declare_queue(f"fl.delay.q{level}", {"x-message-ttl": 2**level, "x-dead-letter-exchange": below})
                bit = f"fl-delay-{level}"
                s.bind_queue(f"fl.delay.q{level}", f"fl.delay.x{level}", "", {"x-match": "all", bit: "1"})
                s.bind_exchange(below, f"fl.delay.x{level}", "", {"x-match": "all", bit: "0"})

        self._with_session(declare)
        self._declared.add(("delay",))

    # -- routing -----------------------------------------------------------------------------------
    def _bind(self, bindings: Sequence[Binding]) -> None:
        first = bindings[0]
        if not self._with_session(lambda s: s.declare_exchange(first.exchange, first.exchange_type)):
            logger.warning("exchange %r exists with other properties on %s; using it as it is", first.exchange,
                           self._where())
        self._declare(first.queue)
        def bind_all(session: Session) -> None:
            for binding in bindings:
                session.bind_queue(binding.queue, binding.exchange, binding.key)

        self._with_session(bind_all)

    def _put_routed(self, exchange: str, routing_key: str, bodies: Sequence[bytes], *, priority: int,
                    not_before: float | None) -> int:
        target = ("fl-queue", self._routed_queue(exchange)) if not_before is not None else ("", "")
        routed = self._send(exchange, routing_key, bodies, priority, None, not_before, target=target)
        return -1 if routed else 0

    def _routed_queue(self, exchange: str) -> str:
        """The quorum queue that routes the delayed messages of ``exchange`` when they are due: it hands them
        to the exchange at once (TTL 0) and keeps those no binding matches, retried by the server
        (``at-least-once`` dead-lettering); a dead-lettered message keeps its routing key."""
        queue = ROUTED_PREFIX + exchange
        if len(queue.encode()) > 255:  # RabbitMQ's bound of a name
            queue = ROUTED_PREFIX + hashlib.sha256(exchange.encode()).hexdigest()
        if ("q", queue) not in self._declared:
            arguments = {"x-queue-type": "quorum", "x-message-ttl": 0, "x-overflow": "reject-publish",
                         "x-dead-letter-exchange": exchange, "x-dead-letter-strategy": "at-least-once"}
            if not self._with_session(lambda s: s.declare_queue(queue, arguments)):
                logger.warning("queue %r exists with other properties on %s; using it as it is", queue, self._where())
            self._declared.add(("q", queue))
        return queue

    # -- consuming ---------------------------------------------------------------------------------
    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        got: list[Delivery] = []
        crashed: list[Delivery] = []
        for epoch, tag, body, headers, priority, redelivered in self._take_pushed(queue, max_n):
            if priority and priority > self._priorities.get(queue, 0) and queue not in self._unprioritised:
                self._warn_unprioritised(queue, priority)
            delivery = Delivery(queue, body, (epoch, queue, tag), int(headers.get(ATTEMPTS, 0)) + 1, priority,
                                int(headers.get(CRASHES, 0)))
            (crashed if redelivered and not self._given_back.take(queue, body) else got).append(delivery)
        if crashed:
            self._count_crashes(crashed)
        if any(d.crashes for d in got):
            self._flush_acks()  # the neighbours' acks just queued: written before a suspect can kill us
            self._hold_only_suspects(queue)
        return got

    def _warn_unprioritised(self, queue: str, priority: int) -> None:
        """Once per queue and process: messages come with a priority the queue does not keep (routed ones:
        their publisher cannot tell which queues a routing key reaches, so it could not refuse them)."""
        self._unprioritised.add(queue)
        levels = self._priorities.get(queue)
        logger.warning("queue %r takes %s on %s but receives messages of priority %d (published through an "
                       "exchange): RabbitMQ takes a priority above a queue's as its highest (no priorities: "
                       "arrival order). Give its task broker_exclusive_config={'x-max-priority': n} and delete "
                       "the queue so it is declared again (docs/rabbitmq.md)", queue,
                       "no priorities" if levels is None else f"priorities 0..{levels}", self._where(), priority)

    def _hold_only_suspects(self, queue: str) -> None:
        """The consumer runs a message whose consumer died alone (DESIGN §3.3), so nothing else may wait
        in this process meanwhile, or a death during it would count against those too: consuming
        pauses (the next fetch resumes it) and what arrived before the server stopped sending goes
        back to the queue, uncounted."""
        back = [Delivery(queue, body, (epoch, queue, tag), int(headers.get(ATTEMPTS, 0)) + 1, priority,
                         int(headers.get(CRASHES, 0)) + (redelivered and not self._given_back.take(queue, body)))
                for epoch, tag, body, headers, priority, redelivered in self._pause(queue)]
        if back:
            self._requeue(back, delay=0.0, front=True, count_attempt=False)

    def _count_crashes(self, deliveries: list[Delivery]) -> None:
        """Messages the server delivered again because their consumer died: re-published with one more
        crash (and attempt) counted, then acked, before anyone runs them."""
        for delivery in deliveries:
            self._republish(delivery, delivery.attempts, delivery.crashes + 1, 0.0)
        self._ack(deliveries)
        self._flush_acks()

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        for delivery in deliveries:
            attempts = delivery.attempts if count_attempt else delivery.attempts - 1
            self._republish(delivery, attempts, delivery.crashes, delay)
        self._ack(deliveries)
        self._flush_acks()  # the copy exists: the original must be gone before anything else runs

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        super()._dead_letter(delivery, letter)
        self._flush_acks()

    def _republish(self, delivery: Delivery, attempts: int, crashes: int, delay: float) -> None:
        headers = {ATTEMPTS: attempts}
        if crashes:
            headers[CRASHES] = crashes
        not_before = time.time() + delay if delay > 0 else None
        self._send("", delivery.queue, [delivery.body], delivery.priority, headers, not_before,
                   target=("fl-queue", delivery.queue))

    # -- counting, purging, dead letters -----------------------------------------------------------
    # Reading, purging and dead letters never declare: a mistyped queue name (``funboost_like status typo``)
    # leaves nothing on the server. A queue that does not exist holds nothing (AMQP's 404; ``peek`` gives []).
    def _size(self, queue: str) -> int:
        return int(self._unless_missing(lambda s: s.message_count(queue)))

    def _purge(self, queue: str) -> int:
        return int(self._unless_missing(lambda s: s.purge(queue)))

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` letters, newest first, of the first :data:`DEAD_SCAN` in the dead-letter queue
        (a queue is read from its head, the oldest)."""
        bodies = self._run(lambda s: s.peek(f"{queue}.dlq", max(limit, DEAD_SCAN)),
                           f"listing dead letters of queue {queue!r}")
        return [DeadLetter.from_envelope(queue, raw) for raw in reversed(bodies[-limit:] if limit > 0 else [])]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        """Scans the dead-letter queue from its head for the letter's stored bytes (see :meth:`Session.peek`)."""
        seen = self._run(lambda s: s.peek(f"{queue}.dlq", 1_000_000, take=letter.ref),
                         f"removing a dead letter of queue {queue!r}")
        return bool(seen) and seen[-1] == letter.ref

    def purge_dead_letters(self, queue: str) -> int:
        try:
            return int(self._unless_missing(lambda s: s.purge(f"{queue}.dlq")))
        except self._client_errors as exc:
            raise self._translated(exc, f"purging dead letters of queue {queue!r}") from exc

    def _unless_missing(self, action: Callable[[Session], Any]) -> Any:
        """``action(session)`` on a queue that may not exist: 0 when the server says it does not."""
        try:
            return self._with_session(action)
        except Exception as exc:
            if getattr(exc, "reply_code", None) == 404 or getattr(exc, "error_code", None) == 404 \
                    or type(exc).__name__ == "AMQPNotFound":  # pika, amqpstorm, rabbitpy
                return 0
            raise

    def key_value_store(self, queue: str, namespace: str) -> AmqpRecords:
        """Records kept on RabbitMQ itself, one small queue each (see :mod:`~funboost_like.brokers.amqp_records`)."""
        store = self._records.get((queue, namespace))
        if store is None:
            store = self._records.setdefault((queue, namespace), AmqpRecords(self, queue, namespace))
        return store

    def _run(self, action: Callable[[Session], Any], what: str) -> Any:
        try:
            return self._with_session(action)
        except self._client_errors as exc:
            raise self._translated(exc, what) from exc

    def _subscribe(self, queue: str, prefetch: int) -> Subscription:
        self._declare(queue)
        return super()._subscribe(queue, prefetch)

    def _channel_closed(self, queue: str, error: str) -> None:
        if "timed out" in error or "consumer_timeout" in error:
            self._given_back.forget(queue)  # a call held its message too long: counted, so it cannot loop forever
            logger.error("RabbitMQ closed the channel of queue %r: a call held its message longer than the server's "
                         "consumer_timeout (%s). Its messages go back to the queue and run again (each counted as "
                         "a crash). Raise consumer_timeout in rabbitmq.conf above "
                         "your longest call, or bound calls with function_timeout (docs/rabbitmq.md).", queue, error)
        else:
            super()._channel_closed(queue, error)

    def _stop_fetching(self, queue: str) -> None:
        """Stop consuming ``queue`` and hand back, uncounted, what the server pushed that nobody fetched
        (left unacked, RabbitMQ would deliver it again marked as redelivered: a crash, wrongly)."""
        if queue in self._subs and self._consumer is not None:
            self._hold_only_suspects(queue)

    def _close(self) -> None:
        for queue in list(self._subs):
            try:
                self._stop_fetching(queue)
            except Exception:  # noqa: BLE001 - closing anyway; the server delivers them again
                logger.warning("handing back the prefetched messages of queue %r failed", queue, exc_info=True)
        self._stop_pushing()
        self._sessions.close_all(self._sessions.take_all())
        self._local = threading.local()
        self._declared.clear()
