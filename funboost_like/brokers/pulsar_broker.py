"""Apache Pulsar through pulsar-client, tested on pulsar-lite (DESIGN §8).

Guarantee: at-least-once, persistent, cross-host. docs/pulsar.md says the same for users, and
which of these behaviours were tested on pulsar-lite only.

Layout, per queue ``q`` (topic names ``persistent://<PULSAR_NAMESPACE>/...``, made by
:mod:`.pulsar_topics`):

* topic ``q``, Shared subscription ``fl``, shared by every consumer process: the ready messages.
  Another program publishes a JSON body to ``q`` and it runs. Each consuming process receives
  through a consumer whose receiver queue holds two batches of its capacity (the first fetch's
  size, at most 50), and acks a message after its call (:mod:`.pulsar_intake`). When a consumer process dies (or its
  connection does), the server dispatches the messages it held to the other consumers at once; a
  process that hangs keeps its messages until the server's keep-alive drops its connection.
* topic ``q-fl-suspect``, subscription ``fl-suspect``: messages whose holder went while they were
  held, each received alone through a zero-queue consumer
  (:class:`~funboost_like.brokers.pulsar_feed.Feed`) and run alone.
* topic ``q-fl-delayed``, subscription ``fl-delay``: delayed messages, property ``fl-due`` (UNIX
  seconds). pulsar-lite ignores ``deliver_after``, so delays are emulated: every consuming process
  runs a :class:`~funboost_like.brokers.pulsar_feed.Mover` that holds delayed messages until due and
  then publishes them to ``q``. Delayed messages move only while some process consumes the queue.
* topic ``q-DLQ``, subscription ``fl-dlq``: dead letters as JSON envelopes ``{"body", "reason",
  "failed_at", "attempts"}``.

Counting (DESIGN §3.3): no negative ack is ever sent, because Pulsar's ``redelivery_count`` counts
nacks and consumer deaths alike and the poison-message rule must see deaths only. A nack, a release
or a retry publishes a copy with the properties ``fl-attempts`` (deliveries before it) and
``fl-crashes``, then acks the original; so a message the server delivers again (``redelivery_count``
> 0) was held by a process that went. On ``q`` that counts one crash (the message may only have
waited in that process's receiver queue) and sends the message to the suspect topic, where each
redelivery counts one (its holder ran it alone): :mod:`.pulsar_intake`. Copies join the back of
their topic. Acks are sent by the client in groups (every 100 ms): a process killed just after a
call may see that call run again.

``count`` and ``purge``: Pulsar's client protocol reports no backlog (pulsar-lite has no admin API,
and its metrics lag 5 s), so ``purge`` receives every message the subscription can dispatch (up to
a marker it publishes, :func:`~funboost_like.brokers.pulsar_feed.drain`) and acks it, and
``count`` receives them and puts copies back (counts unchanged), which costs a round trip per
message and moves them behind messages published meanwhile; messages held by consuming processes
are not counted (delayed ones held by this process's mover are).

Capabilities: native redelivery, emulated delay, no priority, dead letters, no key-value records
(so no RPC results or task filtering on this kind), no routing.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pulsar

from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.pulsar_feed import ATTEMPTS, CRASHES, DUE, Feed, Mover, Received, ack_all, counts_of, drain
from funboost_like.brokers.pulsar_intake import ACK_GROUPING, MAX_PREFETCH, Intake
from funboost_like.brokers.pulsar_topics import (
    DELAY_SUBSCRIPTION,
    DLQ_SUBSCRIPTION,
    READY_SUBSCRIPTION,
    SUSPECT_SUBSCRIPTION,
    QueueTopics,
    check_queue_name,
)
from funboost_like.core.config import redact_url, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.pulsar")

HAND_BACK_DELAY = 1.0  # seconds what a stopping consumer hands back waits in the delayed topic
_ABANDONED: list[Any] = []  # clients inherited from a parent process: kept referenced, never closed here


def _counted(message: pulsar.Message, every_redelivery: bool) -> dict[str, str]:
    """The properties of a copy of ``message`` that keeps its counts."""
    attempts, crashes = counts_of(message, every_redelivery)
    return {ATTEMPTS: str(attempts), CRASHES: str(crashes)}


def _client_logger() -> pulsar.ConsoleLogger | pulsar.FileLogger:
    """The C++ client's own logger: none (its lines go to ``os.devnull``) unless a level is set on the
    ``funboost_like.pulsar.client`` logger, then the client's console logger at that level. Its console
    is standard output, where it wrote an ERROR line per failed connection attempt (for ``funboost_like
    queues --json`` too); the broker reports an outage itself. Not a Python logger: the client's threads
    then log into Python as the process exits, which aborts it about one exit in three (``terminate called
    without an active exception``, pulsar-client-python#256; tests/test_pulsar.py)."""
    level = logging.getLogger("funboost_like.pulsar.client").level
    if not level:
        return pulsar.FileLogger(pulsar.LoggerLevel.Error, os.devnull)
    for at_least, name in ((logging.ERROR, "Error"), (logging.WARNING, "Warn"), (logging.INFO, "Info")):
        if level >= at_least:
            return pulsar.ConsoleLogger(getattr(pulsar.LoggerLevel, name))
    return pulsar.ConsoleLogger(pulsar.LoggerLevel.Debug)


class PulsarBroker(Broker):
    """At-least-once Pulsar broker; see the module docstring for the layout and counting."""

    kind = BrokerEnum.PULSAR
    capabilities = Capabilities(redelivery="native", delay="emulated", max_priority=0, dead_letters=True,
                                key_value=False, routing="none", persistent=True, cross_process=True,
                                cross_host=True, queue_names=check_queue_name, release_front=False,
                                counts_delayed=False,  # not those in a mover's receiver queue
                                settle_delay=ACK_GROUPING)  # the client sends acks in groups
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
                    for topic, subscription in self._kept(q):
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

    def _send_to(self, items: Sequence[tuple[str, bytes, dict[str, str]]]) -> None:
        """Publish (topic, body, properties) items, in order per topic; return once the server stored them all."""
        by_topic: dict[str, list[tuple[bytes, dict[str, str] | None]]] = {}
        for topic, body, properties in items:
            by_topic.setdefault(topic, []).append((body, properties))
        for topic, grouped in by_topic.items():
            self._send(topic, grouped)

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

    @staticmethod
    def _kept(q: QueueTopics) -> tuple[tuple[str, str], ...]:
        """The topics and subscriptions that keep a queue's waiting messages, delayed ones first."""
        return (q.delayed, DELAY_SUBSCRIPTION), (q.ready, READY_SUBSCRIPTION), (q.suspects, SUSPECT_SUBSCRIPTION)

    # -- consuming -----------------------------------------------------------------------------------
    def _intake(self, queue: str, prefetch: int) -> Intake:
        q = self._queue(queue)
        if q.intake is None:
            with self._lock:
                if q.intake is None:
                    prefetch = min(max(prefetch, 1), MAX_PREFETCH)
                    shared, earliest = pulsar.ConsumerType.Shared, pulsar.InitialPosition.Earliest
                    ready = functools.partial(self.client.subscribe, q.ready, READY_SUBSCRIPTION, consumer_type=shared,
                                              receiver_queue_size=2 * prefetch, initial_position=earliest)
                    suspects = Feed(self.client.subscribe(q.suspects, SUSPECT_SUBSCRIPTION, consumer_type=shared,
                                                          receiver_queue_size=0, initial_position=earliest),
                                    lambda received: self._hand_back(queue, [received]))
                    q.intake = Intake(queue, ready, suspects, prefetch, functools.partial(self._hand_back, queue))
                    delayed = self.client.subscribe(q.delayed, DELAY_SUBSCRIPTION, consumer_type=shared,
                                                    initial_position=earliest)
                    q.mover = Mover(delayed, functools.partial(self._move, q))
        return q.intake

    def _move(self, q: QueueTopics, due: Sequence[tuple[pulsar.Message, dict[str, str]]]) -> None:
        """The mover's due messages to the ready topic, in order; those that count crashes to the suspect topic."""
        self._send_to([(q.suspects if int(props.get(CRASHES, 0)) else q.ready, m.data(), props) for m, props in due])

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        return self._intake(queue, max_n).take(max_n)

    def _wait(self, queue: str, timeout: float) -> None:
        self._intake(queue, 1).wait(timeout)

    def _hand_back(self, queue: str, received: Sequence[Received]) -> None:
        """Put copies of messages this process received but will not run back, counts unchanged."""
        try:
            self._copy(queue, received, 0.0)
        except Exception:  # noqa: BLE001 - the server delivers them again when this consumer goes
            logger.warning("handing back %d message(s) of queue %r failed", len(received), queue, exc_info=True)

    # -- settling ------------------------------------------------------------------------------------
    def _originals(self, deliveries: Sequence[Delivery]) -> list[Received]:
        """The held messages of these deliveries, each with its consumer (forgotten here: being settled)."""
        q = self._queues.get(deliveries[0].queue)
        return [] if q is None or q.intake is None else q.intake.settle(deliveries)

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        for consumer, message, _, _ in self._originals(deliveries):
            consumer.acknowledge(message)
        self._acked(deliveries[0].queue)

    def _acked(self, queue: str) -> None:
        q = self._queues.get(queue)
        if q is not None and q.intake is not None:
            q.intake.acked()

    def _copy(self, queue: str, copies: Sequence[Received], delay: float) -> None:
        """Publish each copy with its counts, then ack the originals: a delayed one to the delayed
        topic, one that counts crashes to the suspect topic, the others to the ready topic."""
        q = self._queue(queue)
        items = []
        for _, message, attempts, crashes in copies:
            properties = {ATTEMPTS: str(attempts), CRASHES: str(crashes)}
            if delay > 0:
                properties[DUE] = repr(time.time() + delay)
            items.append((q.delayed if delay > 0 else q.suspects if crashes else q.ready, message.data(), properties))
        self._send_to(items)
        for consumer, message, _, _ in copies:
            consumer.acknowledge(message)
        self._acked(queue)

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        originals = self._originals(deliveries)
        copies = [r._replace(attempts=r.attempts + 1) for r in originals] if count_attempt else originals
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
        """Receive what the subscriptions can dispatch now and put it back through the delayed topic,
        due at once (a copy put back on the ready topic could reach the draining consumer, whose
        closing would count a redelivery against it), a batch at a time."""
        q = self._queue(queue)
        total = 0
        for topic, subscription in self._kept(q):  # delayed first: the others put back into it
            total += self._drain_away(topic, subscription, functools.partial(self._put_back, q, topic))
        intake, mover = q.intake, q.mover
        return total + (intake.buffered() if intake else 0) + (mover.held() if mover else 0)

    def _put_back(self, q: QueueTopics, topic: str, consumer: pulsar.Consumer, messages: list[pulsar.Message]) -> None:
        if messages and topic != q.delayed:
            now, every = repr(time.time()), topic == q.suspects
            self._send(q.delayed, [(m.data(), {**_counted(m, every), DUE: now}) for m in messages])
        elif messages:  # delayed ones keep their properties (their counts do not change there)
            self._send(q.delayed, [(m.data(), dict(m.properties())) for m in messages])
        ack_all(consumer, messages)

    def _purge(self, queue: str) -> int:
        q = self._queue(queue)
        total = q.intake.purge() if q.intake is not None else 0
        if q.mover is not None:
            taken = q.mover.take_all()
            ack_all(q.mover.consumer, taken)
            total += len(taken)
        for topic, subscription in self._kept(q):
            total += self._drain_away(topic, subscription)
        return total

    def _drain_away(self, topic: str, subscription: str,
                    settle: Callable[[pulsar.Consumer, list[pulsar.Message]], None] = ack_all) -> int:
        """Receive what ``subscription`` can dispatch now and ``settle`` it (ack it, by default) a batch at a time."""
        consumer, messages, settled = drain(self.client, topic, subscription, self._producer, settle)
        try:
            settle(consumer, messages)
        finally:
            consumer.close()
        return settled + len(messages)

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The newest dead letters of ``queue`` (received and left unacknowledged: they stay)."""
        try:
            consumer, messages, _ = drain(self.client, self._queue(queue).dlq, DLQ_SUBSCRIPTION, self._producer)
            consumer.close()
        except self._client_errors as exc:
            raise self._translated(exc, f"listing dead letters of queue {queue!r}") from exc
        messages.sort(key=lambda m: (m.message_id().ledger_id(), m.message_id().entry_id()), reverse=True)
        return [DeadLetter.from_envelope(queue, m.data()) for m in messages[:limit]]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        """Ack the first dead letter equal to ``letter``; the others are left unacknowledged (they stay)."""
        try:
            consumer, messages, _ = drain(self.client, self._queue(queue).dlq, DLQ_SUBSCRIPTION, self._producer)
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
            consumer, messages, _ = drain(self.client, q.delayed, DELAY_SUBSCRIPTION, self._producer)
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
        """Stop receiving and hand back what was received and not taken; once nothing is held either,
        close the queue's consumers and its mover."""
        q = self._queues.get(queue)
        if q is None or q.intake is None:
            return
        intake, mover = q.intake, q.mover
        left = intake.stop()
        if left:  # through the delayed topic: a copy this process's ready consumer received would count a crash
            try:  # when that consumer closes; by the time the copies are due, it has (unless calls still run)
                self._copy(queue, left, HAND_BACK_DELAY)
            except Exception:  # noqa: BLE001 - the server delivers them again when this consumer goes
                logger.warning("handing back %d message(s) of queue %r failed", len(left), queue, exc_info=True)
        if not intake.held:
            q.intake, q.mover = None, None
            intake.close()
            if mover is not None:
                mover.close()

    _stopped_consuming = _stop_fetching  # the graceful stop is over: what was held then is settled now

    def _close(self) -> None:
        for queue in list(self._queues):
            try:
                self._stop_fetching(queue)
            except Exception:  # noqa: BLE001 - closing anyway; the server delivers them again
                logger.warning("handing back the received messages of queue %r failed", queue, exc_info=True)
        client = self._client
        for q in self._queues.values():
            for part in (q.intake, q.mover):
                if part is not None:
                    part.close()
        try:
            if client is not None:
                client.close()
        except Exception:  # noqa: BLE001 - closing anyway
            logger.debug("closing the Pulsar client failed", exc_info=True)
        self._client = None
        self._after_fork()
