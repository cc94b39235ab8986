"""The consuming side of the Pulsar broker: a feed per queue, the delay mover, and draining.

* :class:`Feed`: a zero-queue consumer (``receiver_queue_size=0``) on the queue's Shared
  subscription and one receiver thread. The client then holds no prefetched message the
  application did not ask for: the thread calls ``receive()`` (one permit, one message) only while
  the fetcher waits for work (:meth:`Feed.ask`), so what a process holds is what it runs. That
  matters because Pulsar counts a message's redelivery after its holder died (``redelivery_count``)
  whether or not the message had started, and the poison-message rule reads that count. A message
  that arrives while the feed refuses (a call runs alone, the fetcher stopped) is handed to
  ``on_refused`` (the broker puts a copy back, counts unchanged).
* :class:`Mover`: holds the queue's delayed messages (topic ``<queue>-fl-delayed``, subscription
  ``fl-delay``) unacknowledged in memory, ordered by their due time (property ``fl-due``), and
  publishes each one to the ready topic when due, then acks it. A mover that dies leaves its held
  messages to the server, which delivers them to another process's mover.
* :func:`drain`: take every message a subscription can dispatch now (count, purge, dead letters).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import pulsar

logger = logging.getLogger("funboost_like.pulsar")

ATTEMPTS, CRASHES, DUE = "fl-attempts", "fl-crashes", "fl-due"


def token_of(message: pulsar.Message) -> tuple[int, int]:
    """A message's (ledger, entry): its id within the topic (batching is off)."""
    mid = message.message_id()
    return mid.ledger_id(), mid.entry_id()


def counts_of(message: pulsar.Message) -> tuple[int, int]:
    """(deliveries before this one, crashes): the counts carried in the properties of a copy, plus the
    redeliveries the server made after holders died (``redelivery_count``; no nack is ever sent on a
    ready topic, so each one is a death)."""
    properties = message.properties()
    again = message.redelivery_count()
    return int(properties.get(ATTEMPTS, 0)) + again, int(properties.get(CRASHES, 0)) + again


Received = tuple[pulsar.Consumer, pulsar.Message]  # a message and the consumer that must settle it


class Feed:
    """The messages of one queue this process asked for; see the module docstring. Each of its
    zero-queue consumers has a receiver thread, so up to that many receives run at once."""

    def __init__(self, consumers: Sequence[pulsar.Consumer], on_refused: Callable[[Received], None]) -> None:
        self.consumers = list(consumers)
        self._on_refused = on_refused
        self._buffer: deque[Received] = deque()
        self._cond = threading.Condition()
        self._want = 0
        self._refusing = False
        self._receiving = 0  # receive() calls pending (a permit out for each)
        self._receive_began = 0.0
        self._closed = False
        self.held: dict[tuple[int, int], Received] = {}  # handed to the fetcher, not settled yet
        self._threads = [threading.Thread(target=self._receive_loop, args=(consumer,), daemon=True,
                                          name="funboost_like-pulsar-feed") for consumer in self.consumers]
        for thread in self._threads:
            thread.start()

    def take(self, max_n: int) -> list[Received]:
        """Up to ``max_n`` received messages, without waiting."""
        with self._cond:
            got = [self._buffer.popleft() for _ in range(min(max_n, len(self._buffer)))]
        for received in got:
            self.held[token_of(received[1])] = received
        return got

    def ask(self, n: int) -> None:
        """Receive up to ``n`` messages (the fetcher found none and waits)."""
        with self._cond:
            self._want, self._refusing = max(0, n), False
            self._cond.notify_all()

    def pause(self, settle: float) -> None:
        """Receive no more (the fetcher took messages and runs them). A receive that began less than
        ``settle`` seconds ago is likely answered at once: wait for its message (kept for the next
        fetch), so no message is unread in this process's socket while its calls start (see
        :meth:`refuse`)."""
        self._stop_asking(settle, refusing=False)

    def refuse(self, settle: float = 0.0) -> list[Received]:
        """Stop receiving; return the received messages nobody took (the caller hands them back).
        A message already on its way is handed to ``on_refused`` when it arrives: wait up to
        ``settle`` seconds for it while the pending receive began less than that long ago, so a call
        that kills its process right after does not find an unread message in its socket
        (pulsar-lite never forgets a consumer whose connection ends by a reset: see docs/pulsar.md)."""
        return self._stop_asking(settle, refusing=True)

    def _stop_asking(self, settle: float, refusing: bool) -> list[Received]:
        with self._cond:
            self._want, self._refusing = 0, refusing
            left: list[Received] = []
            if refusing:
                left, self._buffer = list(self._buffer), deque()
            deadline = self._receive_began + settle
            while self._receiving and not self._closed and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
        return left

    def wait(self, timeout: float) -> None:
        """Return when a message was received, or after ``timeout`` seconds."""
        with self._cond:
            if not self._buffer and not self._closed:
                self._cond.wait(timeout)

    def buffered(self) -> int:
        return len(self._buffer)

    def _receive_loop(self, consumer: pulsar.Consumer) -> None:
        cond = self._cond
        while True:
            with cond:
                while self._want <= self._receiving and not self._closed:  # enough receives pending
                    cond.wait()
                if self._closed:
                    return
                self._receiving += 1
                self._receive_began = time.monotonic()
            try:
                message = consumer.receive()  # one permit: one message
            except pulsar.AlreadyClosed:
                return
            except Exception as exc:  # noqa: BLE001 - the client reconnects by itself; try again
                self._done_receiving()
                if self._closed:
                    return
                logger.warning("receiving from Pulsar failed (%s); retrying", exc)
                time.sleep(0.5)
                continue
            with cond:
                refused = self._refusing or self._closed
                if not refused:
                    self._buffer.append((consumer, message))
                    self._want -= 1
                    self._receiving -= 1
                    cond.notify_all()
            if refused:
                self._on_refused((consumer, message))
                self._done_receiving()

    def _done_receiving(self) -> None:
        with self._cond:
            self._receiving -= 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for consumer in self.consumers:
            try:
                consumer.close()
            except pulsar.PulsarException:
                logger.debug("closing a Pulsar consumer failed", exc_info=True)
        for thread in self._threads:
            thread.join(5)


class Mover:
    """Moves due delayed messages of one queue to its ready topic; see the module docstring."""

    def __init__(self, consumer: pulsar.Consumer, move: Callable[[pulsar.Message, dict[str, str]], None]) -> None:
        self.consumer = consumer
        self._move = move  # publishes the body with these properties to the ready topic
        self._due: list[tuple[float, int, pulsar.Message]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="funboost_like-pulsar-mover", daemon=True)
        self._thread.start()

    def held(self) -> int:
        return len(self._due)

    def peek(self) -> list[pulsar.Message]:
        """The delayed messages held now."""
        with self._lock:
            return [message for _, _, message in self._due]

    def take_all(self) -> list[pulsar.Message]:
        """Forget every held delayed message (purge); the caller acks them."""
        with self._lock:
            taken = [message for _, _, message in self._due]
            self._due.clear()
        return taken

    def _run(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                first = self._due[0][0] if self._due else None
            wait = 0.2 if first is None else min(0.2, max(0.0, first - time.time()))
            try:
                message = self.consumer.receive(max(1, int(wait * 1000)))
                with self._lock:
                    heapq.heappush(self._due, (float(message.properties().get(DUE, 0)), next(self._order), message))
            except pulsar.Timeout:
                pass
            except pulsar.AlreadyClosed:
                return
            except Exception as exc:  # noqa: BLE001 - logged; tried again
                logger.warning("receiving delayed messages failed (%s); retrying", exc)
                self._closed.wait(0.5)
            self._move_due()

    def _move_due(self) -> None:
        now = time.time()
        while True:
            with self._lock:
                if not self._due or self._due[0][0] > now:
                    return
                due, order, message = heapq.heappop(self._due)
            properties = {k: v for k, v in message.properties().items() if k != DUE}
            try:
                self._move(message, properties)
                self.consumer.acknowledge(message)
            except Exception as exc:  # noqa: BLE001 - kept, moved again later
                logger.warning("moving a due delayed message failed (%s); retrying", exc)
                with self._lock:
                    heapq.heappush(self._due, (now + 1.0, order, message))
                return

    def close(self) -> None:
        self._closed.set()
        try:
            self.consumer.close()  # what it held goes back to the server, for another mover
        except pulsar.PulsarException:
            logger.debug("closing a Pulsar consumer failed", exc_info=True)
        self._thread.join(5)


def drain(client: pulsar.Client, topic: str, subscription: str) -> tuple[pulsar.Consumer, list[pulsar.Message]]:
    """Every message ``subscription`` of ``topic`` can dispatch now, received by a new consumer, which
    is returned open: the caller acks what it keeps away and hands the rest back before closing it.

    "Now" is when no message came for five round trips to the server (at least 50 ms).
    """
    started = time.monotonic()
    consumer = client.subscribe(topic, subscription, consumer_type=pulsar.ConsumerType.Shared,
                                initial_position=pulsar.InitialPosition.Earliest, receiver_queue_size=1000)
    idle = max(0.05, 5 * (time.monotonic() - started))  # subscribing took about one round trip
    got: list[pulsar.Message] = []
    while True:
        try:
            got.append(consumer.receive(int(idle * 1000)))
        except pulsar.Timeout:
            return consumer, got


def ack_all(consumer: pulsar.Consumer, messages: Sequence[pulsar.Message]) -> None:
    for message in messages:
        consumer.acknowledge(message)
