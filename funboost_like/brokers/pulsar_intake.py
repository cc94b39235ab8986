"""What one process consumes of one Pulsar queue: ready messages prefetched, suspects one at a time.

* The ready topic ``q`` (subscription ``fl``) is read through a consumer whose receiver queue holds
  two batches of ``prefetch`` messages (the queue's first fetch size, at most :data:`MAX_PREFETCH`):
  the client grants the server permits in groups and keeps what arrives, so a message costs no
  round trip of its own. The consumer has a message listener, kept paused: pulsar-client grants no
  permit while a listener is paused, and that is what lets a stop end the flow (below). The fetcher
  takes a batch with ``batch_receive`` (which works while paused, and waits at most
  :data:`RECEIVE_WAIT_MS` for a full batch), then resumes and pauses the listener at once, which
  sends the permits the batch earned; a message the listener catches in that instant is buffered.
  An idle fetch waits with the listener running, which buffers what arrives.
* A message the server delivers again on ``q`` (``redelivery_count`` > 0) was held by a process that
  died (or closed) with it: while running it, or while it only waited in that process's receiver
  queue; nobody can tell which. So such a redelivery counts one crash, however many holders the
  message outlived there, and the message is a *suspect*: before anything runs it, it is diverted,
  a copy carrying its counts going to the suspect topic and the original acked.
* The suspect topic ``q-fl-suspect`` (subscription ``fl-suspect``) is read through a zero-queue
  consumer (:class:`~funboost_like.brokers.pulsar_feed.Feed`), one message per receive, asked for
  again only once the fetcher took the last one. A suspect is taken alone and before ready
  messages, and the consumer runs it alone (DESIGN §3.3); its holder holds no other suspect, so
  on that topic every redelivery is a death while running it, and counts one crash.

The poison-message rule then sees at most one crash per trip through ``q`` for a message that never
ran (a nack, a retry or a release sends a copy on a new trip), and every death during a suspect's own
run. Copies of messages that count crashes go straight to the suspect topic (the mover's too).

Stopping: every message the server sent this consumer and nobody ran must be acked before the
consumer closes, or the server delivers it again counted (``redelivery_count`` + 1) like a death.
With the listener paused the client grants no permit, so :meth:`Intake.stop` receives what the
server sent for the permits already granted until nothing arrived for :data:`STOP_QUIET` seconds,
and the broker hands it all back (copies, counts unchanged) and acks it; it does so again at the
end of the stop, for what the server sent while the last calls ran. With a backlog the server fills
the granted permits at once, so the quiet means it had nothing more to send. Only a message the
server sends between that and the close (published in that instant, while permits are out) comes
back counted one crash. Before, taking the receiver queue made the client grant new permits, and a
graceful stop with a backlog left up to ``prefetch`` messages counted (46-50 of 50,
benchmarks/pulsar_stop_counts.py), each then run alone as a suspect.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import pulsar

from funboost_like.brokers.base import Delivery
from funboost_like.brokers.pulsar_feed import Feed, Received, counts_of, noted, pollers

logger = logging.getLogger("funboost_like.pulsar")

MAX_PREFETCH = 50  # the ready consumer's batch, at most (its receiver queue holds two)
WAIT_SLICE = 1.0  # seconds an idle fetch waits on the ready topic before it looks at the suspects again
STOP_QUIET = 0.1  # seconds without a message that end the receiving of a stopping consumer's receiver queue
RECEIVE_WAIT_MS = 1  # a batch_receive of the ready consumer waits at most this long for a full batch
ACK_GROUPING = 0.15  # the client sends acks in groups, every 100 ms (a process killed sooner loses them)
_tokens = itertools.count(1)  # delivery tokens, unique in the process (a queue may get a new intake)


class Intake:
    """One queue's consumers in this process; see the module docstring."""

    def __init__(self, queue: str, subscribe: Callable[..., pulsar.Consumer], suspects: Feed, prefetch: int,
                 hand_back: Callable[[Sequence[Received]], None]) -> None:
        """``subscribe(**options)`` makes the ready consumer with these options added (its listener and
        batch-receive policy)."""
        self.queue = queue
        self.suspects = suspects
        self.prefetch = prefetch
        self._hand_back = hand_back  # copies (counts kept) go back, the originals are acked
        self._buffer: deque[pulsar.Message] = deque()  # received, not taken yet
        self._cond = threading.Condition()  # guards the buffer; notified by the listener
        self._control = threading.Lock()  # one thread at a time receives, pauses or resumes
        self._stopping = False
        self._woken = False  # wait() just buffered what arrived: the next take does not wait for more
        self.held: dict[int, Received] = {}  # handed to the fetcher, not settled yet
        self._suspect = 0  # the token of the suspect handed out and not settled yet (0: none)
        self._acked_at = 0.0  # monotonic time of the last acks this process sent
        policy = pulsar.ConsumerBatchReceivePolicy(prefetch, -1, RECEIVE_WAIT_MS)
        self.ready = subscribe(message_listener=self._arrived, batch_receive_policy=policy)
        self.ready.pause_message_listener()
        pollers[self.ready.topic()] = (os.getpid(), self._take_marks)

    def _take_marks(self) -> None:
        """Ack and note the drains' markers among what the receiver queue holds (:func:`.drain`); the
        rest is buffered for the fetcher."""
        with self._control:
            if self._stopping:
                return
            received = self.ready.batch_receive()
        with self._cond:
            buffered = list(self._buffer) + received
            self._buffer.clear()
            self._buffer.extend(m for m in buffered if not noted(self.ready, m, m.data()))

    def _arrived(self, _: pulsar.Consumer, message: pulsar.Message) -> None:
        """The listener (on the client's listener thread, while :meth:`wait` waits, or in the instant
        :meth:`_pull` resumes it): buffer the message."""
        with self._cond:
            self._buffer.append(message)
            self._cond.notify()

    def take(self, max_n: int) -> list[Delivery]:
        """Up to ``max_n`` messages, without waiting: a suspect alone, or ready messages."""
        suspects = self.suspects.take(1)
        if suspects:
            time.sleep(max(0.0, self._acked_at + ACK_GROUPING - time.monotonic()))  # see acked()
            delivery = self._hold(suspects[0], suspects[0].message.data())
            self._suspect = delivery.token
            return [delivery]
        got: list[Delivery] = []
        diverted: list[Received] = []
        for message in self._pull(max_n):
            body = message.data()
            if noted(self.ready, message, body):  # a drain's marker (count, purge)
                continue
            received = Received(self.ready, message, *counts_of(message, every_redelivery=False))
            if received.crashes:
                diverted.append(received)
            else:
                got.append(self._hold(received, body))
        if diverted:
            self._hand_back(diverted)
        self.suspects.ask(1)
        return got

    def _hold(self, received: Received, body: bytes) -> Delivery:
        token = next(_tokens)
        self.held[token] = received
        return Delivery(self.queue, body, token, received.attempts + 1, 0, received.crashes)

    def _pull(self, max_n: int) -> list[pulsar.Message]:
        """Up to ``max_n`` messages, without waiting for the server: the buffer, then what the receiver
        queue holds (``batch_receive`` waits at most :data:`RECEIVE_WAIT_MS` for a full batch, so not
        right after :meth:`wait` buffered a message: an idle consumer's latency); then the listener is
        resumed and paused again, which sends the permits the receiving earned."""
        with self._control:
            woken, self._woken = self._woken, False
            if len(self._buffer) < max_n and not self._stopping and not woken:
                received = self.ready.batch_receive()
                if received:
                    self.ready.resume_message_listener()
                    self.ready.pause_message_listener()
                    with self._cond:
                        self._buffer.extend(received)
        with self._cond:
            buffer = self._buffer
            return [buffer.popleft() for _ in range(min(max_n, len(buffer)))]

    def wait(self, timeout: float) -> None:
        """Return when a message arrived (kept for the next :meth:`take`), or after ``timeout`` seconds:
        the listener runs meanwhile."""
        deadline = time.monotonic() + timeout
        with self._control:
            listening = not self._stopping
            if listening:
                self.ready.resume_message_listener()
        try:
            with self._cond:
                while not self._buffer and not self.suspects.buffered():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._cond.wait(min(left, WAIT_SLICE))
                self._woken = True
        finally:
            if listening:
                with self._control:
                    self.ready.pause_message_listener()

    def buffered(self) -> int:
        """Messages received and not taken (the receiver queue aside: the client does not say)."""
        return len(self._buffer) + self.suspects.buffered()

    def settle(self, deliveries: Sequence[Delivery]) -> list[Received]:
        """The held messages of these deliveries (forgotten here: being settled); the caller acks them,
        then calls :meth:`acked`."""
        held = self.held
        settled = [r for r in (held.pop(d.token, None) for d in deliveries) if r is not None]
        if self._suspect not in held:
            self._suspect = 0
        return settled

    def acked(self) -> None:
        """Acks were just sent. The client sends them in groups, every 100 ms: a process that dies sooner
        loses them, and the server delivers those messages again, counted. So no suspect runs less
        than :data:`ACK_GROUPING` seconds after acks: one taken waits that long (:meth:`take`), and acks
        sent while one waits to run (the consumer lets the calls running beside it end) wait here."""
        self._acked_at = time.monotonic()
        if self._suspect:
            time.sleep(ACK_GROUPING)

    def stop(self) -> list[Received]:
        """Receive no more; return every message the server sent and nobody took (the caller hands them
        back and acks them): what the receiver queue holds and receives, the listener (and so the
        permits) paused, until nothing came for :data:`STOP_QUIET` seconds, and the buffer. Called
        again at the end of the stop, it returns what the server sent in between."""
        left = self.suspects.refuse()
        with self._control:
            self._stopping = True
            self.ready.pause_message_listener()
            received = self._receive_all()
        with self._cond:
            messages = list(self._buffer) + received
            self._buffer.clear()
        return left + [Received(self.ready, m, *counts_of(m, every_redelivery=False)) for m in messages
                       if not noted(self.ready, m, m.data())]

    def _receive_all(self) -> list[pulsar.Message]:
        """What the ready consumer's receiver queue holds and receives until :data:`STOP_QUIET` seconds
        pass without a message."""
        got: list[pulsar.Message] = []
        quiet_until = time.monotonic() + STOP_QUIET
        while time.monotonic() < quiet_until:
            batch = self.ready.batch_receive()
            if batch:
                got += batch
                quiet_until = time.monotonic() + STOP_QUIET
        return got

    def purge(self) -> int:
        """Ack every message received and not taken, until the ready consumer's receiver queue is empty."""
        left = self.suspects.refuse()
        for consumer, message, _, _ in left:
            consumer.acknowledge(message)
        total = len(left)
        while messages := self._pull(self.prefetch):
            for message in messages:
                self.ready.acknowledge(message)
            total += len(messages)
        return total

    def close(self) -> None:
        if pollers.get(self.ready.topic()) == (os.getpid(), self._take_marks):
            del pollers[self.ready.topic()]
        self.suspects.close()
        try:
            self.ready.close()  # what its receiver queue held goes back to the server
        except pulsar.PulsarException:
            logger.debug("closing a Pulsar consumer failed", exc_info=True)
