"""What one process consumes of one Pulsar queue: ready messages prefetched, suspects one at a time.

* The ready topic ``q`` (subscription ``fl``) is read through a consumer with a receiver queue of
  ``prefetch`` messages (the queue's first fetch size, at most :data:`MAX_PREFETCH`): the client
  grants the server permits in groups and keeps what arrives, so a message costs no round trip of
  its own. The fetcher takes from that queue without waiting (``receive(0)``) and waits on it when
  it is empty.
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

Stopping: what the receiver queue holds is taken and handed back, uncounted; taking it makes the
client grant the server new permits, and what the server sends for them before the consumer closes
comes back with one more redelivery. So a consumer stopped gracefully while the queue has a backlog
leaves up to ``prefetch`` messages counted one crash (each then runs alone once): measured 46-50 of
a 50-message prefetch (benchmarks/pulsar_stop_counts.py). Without a backlog nothing is counted.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import pulsar

from funboost_like.brokers.base import Delivery
from funboost_like.brokers.pulsar_feed import Feed, Received, counts_of

logger = logging.getLogger("funboost_like.pulsar")

MAX_PREFETCH = 50  # the ready consumer's receiver queue, at most (it bounds what a graceful stop counts)
WAIT_SLICE = 1.0  # seconds an idle fetch waits on the ready topic before it looks at the suspects again
ACK_GROUPING = 0.15  # the client sends acks in groups, every 100 ms (a process killed sooner loses them)
_tokens = itertools.count(1)  # delivery tokens, unique in the process (a queue may get a new intake)


class Intake:
    """One queue's consumers in this process; see the module docstring."""

    def __init__(self, queue: str, ready: pulsar.Consumer, suspects: Feed, prefetch: int,
                 hand_back: Callable[[Sequence[Received]], None]) -> None:
        self.queue = queue
        self.ready = ready
        self.suspects = suspects
        self.prefetch = prefetch
        self._hand_back = hand_back  # copies (counts kept) go back, the originals are acked
        self._waited: deque[pulsar.Message] = deque()  # received by wait(), not taken yet
        self.held: dict[int, Received] = {}  # handed to the fetcher, not settled yet
        self._suspect = 0  # the token of the suspect handed out and not settled yet (0: none)
        self._acked_at = 0.0  # monotonic time of the last acks this process sent

    def take(self, max_n: int) -> list[Delivery]:
        """Up to ``max_n`` messages, without waiting: a suspect alone, or ready messages."""
        suspects = self.suspects.take(1)
        if suspects:
            time.sleep(max(0.0, self._acked_at + ACK_GROUPING - time.monotonic()))  # see acked()
            delivery = self._hold(suspects[0])
            self._suspect = delivery.token
            return [delivery]
        got: list[Delivery] = []
        diverted: list[Received] = []
        for message in self._pull(max_n):
            received = Received(self.ready, message, *counts_of(message, every_redelivery=False))
            if received.crashes:
                diverted.append(received)
            else:
                got.append(self._hold(received))
        if diverted:
            self._hand_back(diverted)
        self.suspects.ask(1)
        return got

    def _hold(self, received: Received) -> Delivery:
        token = next(_tokens)
        self.held[token] = received
        return Delivery(self.queue, received.message.data(), token, received.attempts + 1, 0, received.crashes)

    def _pull(self, max_n: int) -> list[pulsar.Message]:
        """Up to ``max_n`` messages of the ready consumer's receiver queue, without waiting."""
        got: list[pulsar.Message] = []
        waited = self._waited
        while waited and len(got) < max_n:
            got.append(waited.popleft())
        receive = self.ready.receive
        try:
            while len(got) < max_n:
                got.append(receive(0))
        except pulsar.Timeout:
            pass
        return got

    def wait(self, timeout: float) -> None:
        """Return when a message arrived (kept for the next :meth:`take`), or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._waited and not self.suspects.buffered():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self._waited.append(self.ready.receive(max(1, int(min(left, WAIT_SLICE) * 1000))))
            except pulsar.Timeout:
                pass

    def buffered(self) -> int:
        """Messages received and not taken (the receiver queue aside: the client does not say)."""
        return len(self._waited) + self.suspects.buffered()

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
        """Receive no more; return what was received and not taken, the ready consumer's receiver queue
        included (the caller hands them back). With a backlog, taking from the receiver queue makes the
        client grant new permits: what arrives for them before the consumer closes, the server delivers
        again with one more redelivery."""
        left = self.suspects.refuse()
        messages = self._pull(self.prefetch)
        left += [Received(self.ready, m, *counts_of(m, every_redelivery=False)) for m in messages]
        return left

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
        self.suspects.close()
        try:
            self.ready.close()  # what its receiver queue held goes back to the server
        except pulsar.PulsarException:
            logger.debug("closing a Pulsar consumer failed", exc_info=True)
