"""The consuming side of the Pulsar broker: the suspects' feed, the delay mover, and draining.

* :class:`Feed`: a zero-queue consumer (``receiver_queue_size=0``) on a queue's suspect topic
  (:mod:`.pulsar_intake`) and one receiver thread. The client then holds no message the application
  did not ask for: the thread calls ``receive()`` (one permit, one message) only while the fetcher
  asks (:meth:`Feed.ask`), so what a process holds there is the suspect it runs alone, and a
  redelivery on that topic is a death while running it. A message that arrives while the feed
  refuses (the fetcher stopped) is handed to ``on_refused`` (the broker puts a copy back, counts
  unchanged).
* :class:`Mover`: holds the queue's delayed messages (topic ``<queue>-fl-delayed``, subscription
  ``fl-delay``) unacknowledged in memory, ordered by their due time (property ``fl-due``), and
  publishes each one to the ready topic when due, then acks it. A mover that dies leaves its held
  messages to the server, which delivers them to another process's mover.
* :func:`drain`: take every message a subscription can dispatch now (count, purge, dead letters):
  it publishes a *marker* (a body starting with :data:`MARK`, never valid JSON) and receives until
  the marker comes back, so everything published before it was dispatched. The server may dispatch
  the marker to another consumer of the subscription: this process's consumers (:class:`Feed`,
  :class:`Mover`, the ready intake) ack markers and note them (:func:`noted`), and a drain whose
  marker a consumer of another process took ends after :data:`MARK_WAIT` seconds without a message.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pulsar

logger = logging.getLogger("funboost_like.pulsar")

ATTEMPTS, CRASHES, DUE = "fl-attempts", "fl-crashes", "fl-due"
MOVE_BATCH = 1000  # delayed messages a mover receives, or moves, at once
MARK = b"\x00fl-mark "  # the start of a drain's marker body (then its id)
MARK_WAIT = 5.0  # seconds without a message that end a drain whose marker went to another process
DRAIN_BATCH = 10_000  # messages a settling drain (count, purge) acks at once
_marks: dict[bytes, float] = {}  # markers this process's consumers took: body -> monotonic time
_marks_lock = threading.Lock()
# topic -> (pid, a function that takes the markers out of what a consumer of that process holds unread
# there): the ready intake, whose receiver queue waits for the fetcher (a count may run on the fetcher's
# thread). A forked child never calls its parent's (their client threads are not in the child).
pollers: dict[str, tuple[int, Callable[[], None]]] = {}


def noted(consumer: pulsar.Consumer, message: pulsar.Message, body: bytes) -> bool:
    """Whether ``message`` (of ``body``) is a drain's marker; if so, ack it and note it for the drain
    (see :func:`drain`)."""
    if not body.startswith(MARK):
        return False
    consumer.acknowledge(message)
    with _marks_lock:
        now = time.monotonic()
        for old in [mark for mark, when in _marks.items() if when < now - 60]:
            del _marks[old]
        _marks[body] = now
    return True


def counts_of(message: pulsar.Message, every_redelivery: bool) -> tuple[int, int]:
    """(deliveries before this one, crashes): the counts carried in the properties of a copy, plus the
    redeliveries the server made after holders died or closed (``redelivery_count``; no nack is ever
    sent, so each one is a holder that went). ``every_redelivery`` counts each of them (a zero-queue
    consumer's topic, where a holder held only what it ran); else they count one at most (a
    prefetching consumer's topic, where a holder may have held the message without running it)."""
    properties = message.properties()
    again = message.redelivery_count()
    if again > 1 and not every_redelivery:
        again = 1
    return int(properties.get(ATTEMPTS, 0)) + again, int(properties.get(CRASHES, 0)) + again


class Received(NamedTuple):
    """A received message, the consumer that must settle it, and its counts (:func:`counts_of`)."""

    consumer: pulsar.Consumer
    message: pulsar.Message
    attempts: int  # deliveries before this one
    crashes: int


class Feed:
    """The messages of one zero-queue consumer this process asked for; see the module docstring."""

    def __init__(self, consumer: pulsar.Consumer, on_refused: Callable[[Received], None]) -> None:
        self.consumer = consumer
        self._on_refused = on_refused
        self._buffer: deque[Received] = deque()
        self._cond = threading.Condition()
        self._want = 0
        self._refusing = False
        self._receiving = False  # a receive() call is pending (a permit is out)
        self._receive_began = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._receive_loop, daemon=True, name="funboost_like-pulsar-feed")
        self._thread.start()

    def take(self, max_n: int) -> list[Received]:
        """Up to ``max_n`` received messages, without waiting."""
        with self._cond:
            return [self._buffer.popleft() for _ in range(min(max_n, len(self._buffer)))]

    def ask(self, n: int) -> None:
        """Have ``n`` messages received, counting those received and not taken yet."""
        with self._cond:
            want = max(0, n - len(self._buffer))
            if want != self._want or self._refusing:
                self._want, self._refusing = want, False
                self._cond.notify_all()

    def refuse(self, settle: float = 0.0) -> list[Received]:
        """Stop receiving; return the received messages nobody took (the caller hands them back).
        A message already on its way is handed to ``on_refused`` when it arrives: wait up to
        ``settle`` seconds for it while the pending receive began less than that long ago."""
        with self._cond:
            self._want, self._refusing = 0, True
            left, self._buffer = list(self._buffer), deque()
            deadline = self._receive_began + settle
            while self._receiving and not self._closed and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
        return left

    def buffered(self) -> int:
        return len(self._buffer)

    def _receive_loop(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while self._want <= 0 and not self._closed:
                    cond.wait()
                if self._closed:
                    return
                self._receiving = True
                self._receive_began = time.monotonic()
            try:
                message = self.consumer.receive()  # one permit: one message
            except pulsar.AlreadyClosed:
                return
            except Exception as exc:  # noqa: BLE001 - the client reconnects by itself; try again
                with cond:
                    self._receiving = False
                    cond.notify_all()
                if self._closed:
                    return
                logger.warning("receiving from Pulsar failed (%s); retrying", exc)
                time.sleep(0.5)
                continue
            if noted(self.consumer, message, message.data()):
                with cond:
                    self._receiving = False
                    cond.notify_all()
                continue
            received = Received(self.consumer, message, *counts_of(message, every_redelivery=True))
            with cond:
                refused = self._refusing or self._closed
                if not refused:
                    self._buffer.append(received)
                    self._want -= 1
                    self._receiving = False
                    cond.notify_all()
            if refused:
                self._on_refused(received)  # before the receive counts as over: refuse(settle) waits for it
                with cond:
                    self._receiving = False
                    cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        try:
            self.consumer.close()
        except pulsar.PulsarException:
            logger.debug("closing a Pulsar consumer failed", exc_info=True)
        self._thread.join(5)


class Mover:
    """Moves due delayed messages of one queue to its ready topic; see the module docstring."""

    def __init__(self, consumer: pulsar.Consumer,
                 move: Callable[[Sequence[tuple[pulsar.Message, dict[str, str]]]], None]) -> None:
        self.consumer = consumer
        self._move = move  # publishes each body with its properties, in order; returns once all are stored
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
                got = [self.consumer.receive(max(1, int(wait * 1000)))]
                try:  # and what else the receiver queue holds, so a backlog moves in batches
                    while len(got) < MOVE_BATCH:
                        got.append(self.consumer.receive(0))
                except pulsar.Timeout:
                    pass
                got = [message for message in got if not noted(self.consumer, message, message.data())]
                with self._lock:
                    for message in got:
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
                due = self._due
                batch = [heapq.heappop(due) for _ in range(MOVE_BATCH) if due and due[0][0] <= now]
            if not batch:
                return
            try:
                self._move([(message, {k: v for k, v in message.properties().items() if k != DUE})
                            for _, _, message in batch])
                for _, _, message in batch:
                    self.consumer.acknowledge(message)
            except Exception as exc:  # noqa: BLE001 - kept, moved again later
                logger.warning("moving %d due delayed message(s) failed (%s); retrying", len(batch), exc)
                with self._lock:
                    for _, order, message in batch:
                        heapq.heappush(self._due, (now + 1.0, order, message))
                return

    def close(self) -> None:
        self._closed.set()
        try:
            self.consumer.close()  # what it held goes back to the server, for another mover
        except pulsar.PulsarException:
            logger.debug("closing a Pulsar consumer failed", exc_info=True)
        self._thread.join(5)


Settle = Callable[[pulsar.Consumer, list[pulsar.Message]], None]


def drain(client: pulsar.Client, topic: str, subscription: str, producer: Callable[[str], pulsar.Producer],
          settle: Settle | None = None) -> tuple[pulsar.Consumer, list[pulsar.Message], int]:
    """Every message ``subscription`` of ``topic`` can dispatch now, received by a new consumer, which
    is returned open with the messages: the caller acks what it keeps away and hands the rest back
    before closing it. With ``settle``, every :data:`DRAIN_BATCH` messages received are passed to it
    (it must ack them: the server sends a consumer at most 50,000 unacked messages) and only the rest
    are returned, with the number settled.

    "Now" is a marker published (with ``producer(topic)``) once the consumer exists: the drain ends
    when the marker comes back, or when another consumer of this process took it (everything before
    it was dispatched then), or after :data:`MARK_WAIT` seconds without a message (a consumer of
    another process took it). It never ends on a pause of the server, however long, before that.
    """
    consumer = client.subscribe(topic, subscription, consumer_type=pulsar.ConsumerType.Shared,
                                initial_position=pulsar.InitialPosition.Earliest, receiver_queue_size=1000)
    mark = MARK + uuid.uuid4().hex.encode()
    producer(topic).send(mark)
    got: list[pulsar.Message] = []
    settled = 0
    quiet_until = time.monotonic() + MARK_WAIT
    while True:
        try:
            message = consumer.receive(100)
        except pulsar.Timeout:
            pid, poll = pollers.get(topic, (0, None))
            if poll is not None and pid == os.getpid():
                poll()
            with _marks_lock:
                taken = _marks.pop(mark, None) is not None
            if taken or time.monotonic() >= quiet_until:
                return consumer, got, settled
            continue
        quiet_until = time.monotonic() + MARK_WAIT
        body = message.data()
        if body == mark:
            consumer.acknowledge(message)
            return consumer, got, settled
        if not noted(consumer, message, body):  # another drain's marker is acked and noted
            got.append(message)
            if settle is not None and len(got) >= DRAIN_BATCH:
                settle(consumer, got)
                settled += len(got)
                got = []


def ack_all(consumer: pulsar.Consumer, messages: list[pulsar.Message]) -> None:
    for message in messages:
        consumer.acknowledge(message)
