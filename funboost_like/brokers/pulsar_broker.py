"""Apache Pulsar through pulsar-client, tested on pulsar-lite (DESIGN §8).

Guarantee: at-least-once, persistent, cross-host. docs/pulsar.md says the same for users, and
which of these behaviours were tested on pulsar-lite only.

Layout, per queue ``q`` (topic names ``persistent://<PULSAR_NAMESPACE>/...``, made by
:mod:`.pulsar_topics`):

* topic ``q``, Shared subscription ``fl``, shared by every consumer process: the ready messages.
  Another program publishes a JSON body to ``q`` and it runs. Each consuming process receives
  through a zero-queue consumer (:class:`~funboost_like.brokers.pulsar_feed.Feed`): it holds only
  what it asked for. A message is acked after its call. When a consumer process dies (or its
  connection does), the server dispatches the messages it held to the other consumers at once; a
  process that hangs keeps its messages until the server's keep-alive drops its connection.
* topic ``q-fl-delayed``, subscription ``fl-delay``: delayed messages, property ``fl-due`` (UNIX
  seconds). pulsar-lite ignores ``deliver_after``, so delays are emulated: every consuming process
  runs a :class:`~funboost_like.brokers.pulsar_feed.Mover` that holds delayed messages until due and
  then publishes them to ``q``. Delayed messages move only while some process consumes the queue.
* topic ``q-DLQ``, subscription ``fl-dlq``: dead letters as JSON envelopes ``{"body", "reason",
  "failed_at", "attempts"}``.

Counting (DESIGN §3.3): no negative ack is ever sent on ``q``, because Pulsar's ``redelivery_count``
counts nacks and consumer deaths alike and the poison-message rule must see deaths only. A nack, a
release or a retry publishes a copy with the properties ``fl-attempts`` (deliveries before it) and
``fl-crashes``, then acks the original; so a message the server delivers again (``redelivery_count``
> 0) was held by a process that died, and its crashes are ``fl-crashes + redelivery_count``.
Copies join the back of the queue. Acks are sent by the client in groups (every 100 ms): a
process killed just after a call may see that call run again.

``count`` and ``purge``: Pulsar's client protocol reports no backlog (pulsar-lite has no admin API,
and its metrics lag 5 s), so ``purge`` receives every message the subscription can dispatch and
acks it, and ``count`` receives them and puts copies back (counts unchanged), which costs a
round trip per message and moves them behind messages published meanwhile; messages held by
consuming processes are not counted (delayed ones held by this process's mover are).

Capabilities: native redelivery, emulated delay, no priority, dead letters, no key-value records
(so no RPC results or task filtering on this kind), no routing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import pulsar

from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.pulsar_feed import (
    ATTEMPTS,
    CRASHES,
    DUE,
    Feed,
    Mover,
    Received,
    ack_all,
    counts_of,
    drain,
    token_of,
)
from funboost_like.brokers.pulsar_topics import (
    DELAY_SUBSCRIPTION,
    DLQ_SUBSCRIPTION,
    READY_SUBSCRIPTION,
    QueueTopics,
    check_queue_name,
)
from funboost_like.core.config import redact_url, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.pulsar")

RECEIVERS = 1  # zero-queue consumers per queue and process (several receive at once, out of order)
SETTLE = 0.01  # seconds a fetch waits for a message a receive that just began brings (see Feed.pause)
ACK_GROUPING = 0.15  # the client sends acks in groups, every 100 ms (a process killed sooner loses them)
_ABANDONED: list[Any] = []  # clients inherited from a parent process: kept referenced, never closed here

Copy = tuple[Any, pulsar.Message, int, int]  # (consumer that holds the original, original, attempts before, crashes)


def _counted(message: pulsar.Message) -> dict[str, str]:
    """The properties of a copy of ``message`` that keeps its counts."""
    attempts, crashes = counts_of(message)
    return {ATTEMPTS: str(attempts), CRASHES: str(crashes)}


def _client_logger() -> pulsar.ConsoleLogger:
    """The C++ client's own console logger, at the level set on the ``funboost_like.pulsar.client`` logger
    (WARNING unless set). Not a Python logger: the client's threads then log into Python as the process
    exits, which aborts it about one exit in three (``terminate called without an active exception``,
    pulsar-client-python#256; tests/test_pulsar.py)."""
    level = logging.getLogger("funboost_like.pulsar.client").level or logging.WARNING
    for at_least, name in ((logging.ERROR, "Error"), (logging.WARNING, "Warn"), (logging.INFO, "Info")):
        if level >= at_least:
            return pulsar.ConsoleLogger(getattr(pulsar.LoggerLevel, name))
    return pulsar.ConsoleLogger(pulsar.LoggerLevel.Debug)


class PulsarBroker(Broker):
    """At-least-once Pulsar broker; see the module docstring for the layout and counting."""

    kind = BrokerEnum.PULSAR
    capabilities = Capabilities(redelivery="native", delay="emulated", max_priority=0, dead_letters=True,
                                key_value=False, routing="none", persistent=True, cross_process=True,
                                cross_host=True, queue_names=check_queue_name, release_front=False)
    connection_errors = (pulsar.ConnectError, pulsar.Timeout, pulsar.NotConnected, pulsar.AlreadyClosed,
                         pulsar.ServiceUnitNotReady, pulsar.LookupError)
    errors = (pulsar.PulsarException,)

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._after_fork()

    def _after_fork(self) -> None:  # the parent's client threads do not exist here: dropped, never closed
        client = getattr(self, "_client", None)
        if client is not None:
            _ABANDONED.append(client)
        self._client: pulsar.Client | None = None
        self._queues: dict[str, QueueTopics] = {}
        self._producers: dict[str, pulsar.Producer] = {}

    # -- connection, topics, producers ---------------------------------------------------------------
    def _where(self) -> str:
        return f"Pulsar at {redact_url(str(settings.get('PULSAR_URL')))}"

    @property
    def client(self) -> pulsar.Client:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    url = str(settings.get("PULSAR_URL"))
                    try:
                        self._client = pulsar.Client(url, operation_timeout_seconds=10, connection_timeout_ms=5000,
                                                     logger=_client_logger())
                    except ValueError:  # its message shows the URL whole (user info included): not chained
                        raise ConfigurationError(f"PULSAR_URL {redact_url(url)!r} is refused by pulsar-client: "
                                                 "use pulsar://host:port or pulsar+ssl://host:port") from None
        return self._client

    def _queue(self, queue: str) -> QueueTopics:
        q = self._queues.get(queue)
        if q is None:
            with self._lock:
                q = self._queues.get(queue)
                if q is None:
                    q = QueueTopics(queue, str(settings.get("PULSAR_NAMESPACE")))
                    for topic, subscription in ((q.ready, READY_SUBSCRIPTION), (q.delayed, DELAY_SUBSCRIPTION)):
                        self._subscription(topic, subscription)  # kept by the server from now on
                    self._queues[queue] = q
        return q

    def _subscription(self, topic: str, subscription: str) -> None:
        """Make the durable subscription exist (Pulsar keeps messages only for subscriptions)."""
        self.client.subscribe(topic, subscription, consumer_type=pulsar.ConsumerType.Shared, receiver_queue_size=0,
                              initial_position=pulsar.InitialPosition.Earliest).close()

    def _producer(self, topic: str) -> pulsar.Producer:
        producer = self._producers.get(topic)
        if producer is None:
            with self._lock:
                producer = self._producers.get(topic)
                if producer is None:
                    producer = self.client.create_producer(topic, batching_enabled=False, block_if_queue_full=True,
                                                           max_pending_messages=5000, send_timeout_millis=15000)
                    self._producers[topic] = producer
        return producer

    def _send(self, topic: str, items: Sequence[tuple[bytes, dict[str, str] | None]]) -> None:
        """Publish in order; return once the server stored them all (raise the first error)."""
        producer = self._producer(topic)
        if len(items) == 1:
            body, properties = items[0]
            producer.send(body, properties=properties)
            return
        failures: list[pulsar.Result] = []

        def sent(result: pulsar.Result, _: Any) -> None:
            if result != pulsar.Result.Ok:
                failures.append(result)

        for body, properties in items:
            producer.send_async(body, sent, properties=properties)
        producer.flush()
        if failures:
            raise pulsar.PulsarException(f"{len(failures)} of {len(items)} messages were refused: {failures[0]}")

    # -- publishing ----------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        if priority:
            raise ConfigurationError("Pulsar has no priorities")
        q = self._queue(queue)
        if not_before is not None and not_before > time.time():
            due = {DUE: repr(float(not_before))}
            self._send(q.delayed, [(body, due) for body in bodies])
        else:
            self._send(q.ready, [(body, None) for body in bodies])

    # -- consuming -----------------------------------------------------------------------------------
    def _feed(self, queue: str) -> Feed:
        q = self._queue(queue)
        if q.feed is None:
            with self._lock:
                if q.feed is None:
                    consumers = [self.client.subscribe(
                        q.ready, READY_SUBSCRIPTION, consumer_type=pulsar.ConsumerType.Shared, receiver_queue_size=0,
                        initial_position=pulsar.InitialPosition.Earliest) for _ in range(RECEIVERS)]
                    q.feed = Feed(consumers, lambda received: self._hand_back(queue, [received]))
                    delayed = self.client.subscribe(
                        q.delayed, DELAY_SUBSCRIPTION, consumer_type=pulsar.ConsumerType.Shared,
                        initial_position=pulsar.InitialPosition.Earliest)
                    q.mover = Mover(delayed, lambda message, props: self._send(q.ready, [(message.data(), props)]))
        return q.feed

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        feed = self._feed(queue)
        got = []
        for _, message in feed.take(max_n):
            attempts, crashes = counts_of(message)
            got.append(Delivery(queue, message.data(), token_of(message), attempts + 1, 0, crashes))
        if not got:
            # one receive at a time (a zero-queue receive is one round trip anyway): no receive is left
            # pending when the fetcher hands a message out, so none arrives unread while calls start
            feed.ask(min(max_n, RECEIVERS))
        elif any(d.crashes for d in got):  # it runs alone: nothing else is held here meanwhile
            left = feed.refuse(SETTLE)
            if left:
                self._hand_back(queue, left)
            time.sleep(ACK_GROUPING)  # the acks of what was handed back reach the server before it runs
        else:
            feed.pause(SETTLE)
        return got

    def _wait(self, queue: str, timeout: float) -> None:
        self._feed(queue).wait(timeout)

    def _hand_back(self, queue: str, received: Sequence[Received]) -> None:
        """Put copies of messages this process received but will not run back, counts unchanged."""
        try:
            self._copy(queue, [(consumer, m, *counts_of(m)) for consumer, m in received], 0.0)
        except Exception:  # noqa: BLE001 - the server delivers them again when this consumer goes
            logger.warning("handing back %d message(s) of queue %r failed", len(received), queue, exc_info=True)

    # -- settling ------------------------------------------------------------------------------------
    def _originals(self, deliveries: Sequence[Delivery]) -> list[Received]:
        """The held messages of these deliveries, each with its consumer (forgotten here: being settled)."""
        held = self._feed(deliveries[0].queue).held
        return [r for r in (held.pop(d.token, None) for d in deliveries) if r is not None]

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        for consumer, message in self._originals(deliveries):
            consumer.acknowledge(message)

    def _copy(self, queue: str, copies: Sequence[Copy], delay: float) -> None:
        """Publish each copy with its counts (delayed: to the delayed topic), then ack the originals."""
        q = self._queue(queue)
        items: list[tuple[bytes, dict[str, str] | None]] = []
        for _, message, attempts, crashes in copies:
            properties = {ATTEMPTS: str(attempts), CRASHES: str(crashes)}
            if delay > 0:
                properties[DUE] = repr(time.time() + delay)
            items.append((message.data(), properties))
        self._send(q.delayed if delay > 0 else q.ready, items)
        for consumer, message, _, _ in copies:
            consumer.acknowledge(message)

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        by_token = {d.token: d for d in deliveries}
        copies = []
        for consumer, message in self._originals(deliveries):
            d = by_token[token_of(message)]
            copies.append((consumer, message, d.attempts if count_attempt else d.attempts - 1, d.crashes))
        if copies:
            self._copy(deliveries[0].queue, copies, delay)

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        q = self._queue(delivery.queue)
        if not q.dlq_made:
            self._subscription(q.dlq, DLQ_SUBSCRIPTION)
            q.dlq_made = True
        self._send(q.dlq, [(letter.envelope(), None)])
        self._ack([delivery])

    # -- counting, purging, dead letters -------------------------------------------------------------
    def _size(self, queue: str) -> int:
        """Receive what both subscriptions can dispatch now and put it back through the delayed topic,
        due at once (a copy put back on the ready topic could reach the draining consumer, whose
        closing would count a redelivery against it)."""
        q = self._queue(queue)
        total = 0
        for topic, subscription in ((q.delayed, DELAY_SUBSCRIPTION), (q.ready, READY_SUBSCRIPTION)):  # in this order:
            consumer, messages = drain(self.client, topic, subscription)  # the second puts back into the first
            try:
                if messages and topic == q.ready:
                    now = repr(time.time())
                    self._send(q.delayed, [(m.data(), {**_counted(m), DUE: now}) for m in messages])
                elif messages:  # delayed ones keep their properties (their counts do not change there)
                    self._send(q.delayed, [(m.data(), dict(m.properties())) for m in messages])
                ack_all(consumer, messages)
            finally:
                consumer.close()
            total += len(messages)
        feed, mover = q.feed, q.mover
        return total + (feed.buffered() if feed else 0) + (mover.held() if mover else 0)

    def _purge(self, queue: str) -> int:
        q = self._queue(queue)
        total = 0
        if q.feed is not None:
            left = q.feed.refuse()
            for consumer, message in left:
                consumer.acknowledge(message)
            total += len(left)
        if q.mover is not None:
            taken = q.mover.take_all()
            ack_all(q.mover.consumer, taken)
            total += len(taken)
        for topic, subscription in ((q.ready, READY_SUBSCRIPTION), (q.delayed, DELAY_SUBSCRIPTION)):
            total += self._drain_away(topic, subscription)
        return total

    def _drain_away(self, topic: str, subscription: str) -> int:
        consumer, messages = drain(self.client, topic, subscription)
        try:
            ack_all(consumer, messages)
        finally:
            consumer.close()
        return len(messages)

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The newest dead letters of ``queue`` (received and left unacknowledged: they stay)."""
        try:
            consumer, messages = drain(self.client, self._queue(queue).dlq, DLQ_SUBSCRIPTION)
            consumer.close()
        except self._client_errors as exc:
            raise self._translated(exc, f"listing dead letters of queue {queue!r}") from exc
        messages.sort(key=lambda m: (m.message_id().ledger_id(), m.message_id().entry_id()), reverse=True)
        return [DeadLetter.from_envelope(queue, m.data()) for m in messages[:limit]]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        """Ack the first dead letter equal to ``letter``; the others are left unacknowledged (they stay)."""
        try:
            consumer, messages = drain(self.client, self._queue(queue).dlq, DLQ_SUBSCRIPTION)
            try:
                found = next((m for m in messages if DeadLetter.from_envelope(queue, m.data()) == letter), None)
                if found is not None:
                    consumer.acknowledge(found)
            finally:
                consumer.close()
        except self._client_errors as exc:
            raise self._translated(exc, f"removing a dead letter of queue {queue!r}") from exc
        return found is not None

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        """(due time, body) of the delayed messages, soonest first: those the delayed subscription can
        dispatch now (received and left unacknowledged) and those this process's mover holds."""
        q = self._queue(queue)
        try:
            consumer, messages = drain(self.client, q.delayed, DELAY_SUBSCRIPTION)
            consumer.close()
        except self._client_errors as exc:
            raise self._translated(exc, f"listing delayed messages of queue {queue!r}") from exc
        if q.mover is not None:
            messages += q.mover.peek()
        delayed = [(float(m.properties().get(DUE, 0)), m.data()) for m in messages]
        return sorted(delayed, key=lambda item: item[0])[:limit]

    def purge_dead_letters(self, queue: str) -> int:
        return self._guard(f"purging dead letters of queue {queue!r}",
                           lambda: self._drain_away(self._queue(queue).dlq, DLQ_SUBSCRIPTION))

    # -- stopping ------------------------------------------------------------------------------------
    def _stop_fetching(self, queue: str) -> None:
        """Stop receiving and moving delayed messages; hand back what was received and not taken."""
        q = self._queues.get(queue)
        if q is None or q.feed is None:
            return
        feed, mover = q.feed, q.mover
        left = feed.refuse()
        if left:
            self._hand_back(queue, left)
        if not feed.held:
            q.feed, q.mover = None, None
            feed.close()
            if mover is not None:
                mover.close()

    def _close(self) -> None:
        for queue in list(self._queues):
            try:
                self._stop_fetching(queue)
            except Exception:  # noqa: BLE001 - closing anyway; the server delivers them again
                logger.warning("handing back the received messages of queue %r failed", queue, exc_info=True)
        client = self._client
        for q in self._queues.values():
            for part in (q.feed, q.mover):
                if part is not None:
                    part.close()
        try:
            if client is not None:
                client.close()
        except Exception:  # noqa: BLE001 - closing anyway
            logger.debug("closing the Pulsar client failed", exc_info=True)
        self._client = None
        self._after_fork()
