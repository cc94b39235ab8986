"""The ``PushBuffer`` adapter (DESIGN §3.2): consuming from push-style clients on the broker contract.

Push-style clients (RabbitMQ through pika, amqpstorm, rabbitpy or kombu; MQTT, NATS, Pulsar, ...)
deliver messages to a callback on an I/O thread rather than answering a fetch. :class:`PushConsuming`
(mixed into such a broker) owns that thread and everything around it; the client supplies a
:class:`Consumer` (subscribe, ack, change the prefetch, run its I/O, wake it):

* one I/O thread per process drives the consuming connection: it subscribes, sends acks and
  prefetch changes, runs the client's I/O, and reconnects (backing off from 0.5 s to 5 s) after a
  failure, subscribing every queue again. Client I/O never runs on a call thread, so heartbeats go
  on during long calls;
* one :class:`PushBuffer` per subscribed queue sits between the client's delivery callback and the
  base's ``fetch``: ``_get`` takes from it without blocking, ``_wait`` waits on it;
* the prefetch follows the consumer's free room (what it may take now, beside what it holds and the
  acks on their way), so a slow consumer never hoards messages another one could run;
* acks are queued by any thread and sent by the I/O thread, contiguous ones as one ``multiple`` ack;
  a delivery's token names its channel, so an ack after a reconnection is dropped (the server
  delivers that message again) instead of acking another message with the same number;
* what a lost channel held (running, finished with its ack unsent, buffered) is noted by body, so
  the broker can tell those messages, when the server delivers them to this process again, from
  messages whose consumer died (:mod:`.given_back`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from funboost_like.brokers.given_back import GivenBack

if TYPE_CHECKING:
    from funboost_like.brokers.base import Delivery

logger = logging.getLogger("funboost_like.broker")


class Signal:
    """A condition notified only while someone waits on it, and once per wait (a notification costs a
    lock and a wake-up; a burst of puts while the waiter is still waking would pay it each time)."""

    __slots__ = ("_cond", "_waiters", "_notified")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0
        self._notified = False

    def notify(self) -> None:
        """Wake the waiters, if any and not woken already (cheap otherwise)."""
        # A waiter counts itself and clears _notified before it looks at its condition: whatever was
        # done before a notify that sees _notified still set (from the previous wait), it sees.
        if self._waiters and not self._notified:
            with self._cond:
                self._notified = True
                self._cond.notify_all()

    def wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        """Return when ``done()`` may be true (a notification came), or after ``timeout`` seconds."""
        with self._cond:
            self._waiters += 1
            self._notified = False
            try:
                if not done():
                    self._cond.wait(timeout)
            finally:
                self._waiters -= 1

    def wake(self) -> None:
        """Wake every waiter (the connection was lost or the broker closes)."""
        with self._cond:
            self._notified = True
            self._cond.notify_all()


class PushBuffer(Signal):
    """A FIFO filled by one I/O thread and emptied by fetchers; cheap when nobody waits."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        super().__init__()
        self.items: deque[Any] = deque()

    def put(self, item: Any) -> None:
        """Called by the client's I/O thread for each message."""
        self.items.append(item)
        self.notify()

    def take(self, max_n: int) -> list[Any]:
        """Up to ``max_n`` items, oldest first; never blocks."""
        items = self.items
        taken: list[Any] = []
        try:
            while len(taken) < max_n:
                taken.append(items.popleft())
        except IndexError:
            pass
        return taken

    def wait(self, timeout: float) -> None:
        """Return when an item may be there, or after ``timeout`` seconds."""
        self.wait_until(lambda: bool(self.items), timeout)

    def clear(self) -> int:
        """Drop every item (their connection is gone: the server delivers them again); return how many."""
        n = len(self.items)
        self.items.clear()
        return n


# The callback of a subscription: deliver(tag, body, headers, priority, redelivered), on the I/O thread.
Deliver = Callable[[int, bytes, dict[str, Any], int, bool], None]


class Consumer(Protocol):
    """A client's consuming connection, driven by the broker's I/O thread only."""

    def subscribe(self, queue: str, prefetch: int, deliver: Deliver) -> Any:
        """Start consuming ``queue`` with ``prefetch``; ``deliver(tag, body, headers, priority, redelivered)``
        is called on the I/O thread. Returns the channel handle for :meth:`ack`."""

    def ack(self, channel: Any, tag: int, multiple: bool) -> None: ...

    def set_prefetch(self, channel: Any, prefetch: int, done: Callable[[], None]) -> None:
        """Start the channel's consumer again with this prefetch (0: stop it); ``done()`` on the I/O thread
        once the server confirmed. Messages already delivered stay unacked on the channel."""

    def pump(self, timeout: float) -> None:
        """Run the client's I/O for at most ``timeout`` seconds (returns early after :meth:`wake`)."""

    def wake(self) -> None:
        """From any thread: make a running :meth:`pump` return soon."""

    def channel_error(self, channel: Any) -> str | None:
        """Why the server closed this channel (the connection still open), or None while it is open."""

    def close(self) -> None: ...


_epochs = itertools.count()
# Acks are written by the I/O thread at its next round, woken at once: a process killed within this long
# after an ack returned may see its message delivered again (capabilities.settle_delay).
ACK_WRITE_SECONDS = 0.05


class Subscription:
    __slots__ = ("queue", "buffer", "prefetch", "qos_sent", "qos_applied", "qos_changed", "boundary", "last_tag",
                 "channel", "generation", "epoch", "outstanding", "acks", "acking", "retry_at", "retry_delay")

    def __init__(self, queue: str, prefetch: int) -> None:
        self.queue = queue
        self.buffer = PushBuffer()
        # The consumer's prefetch: its free room (what it may take beside what it holds of this consumer),
        # 0 while paused. RabbitMQ fixes a consumer's prefetch when it starts, so a change starts it again.
        self.prefetch = prefetch
        self.qos_sent = prefetch
        self.qos_applied = True  # no change of consumer under way (False from its sending to its confirmation)
        self.qos_changed = Signal()  # notified by the I/O thread when a change of consumer is confirmed
        self.boundary = 0  # tags up to this one were delivered to earlier consumers of the channel
        self.last_tag = 0
        self.channel: Any = None
        self.generation = -1  # the connection generation its channel belongs to
        self.epoch = -1  # which channel: delivery tags are numbers of one channel, so tokens carry it
        self.outstanding: dict[int, bytes] = {}  # tag: body, delivered and not acked yet (I/O thread only)
        self.acks: list[int] = []  # tags to ack, appended by any thread, sent by the I/O thread
        self.acking = 0  # how many the last ack call settled (on their way to the server)
        self.retry_at = 0.0  # when a channel the server closed may be opened again (monotonic)
        self.retry_delay = 0.05


class PushConsuming:
    """The consuming half of a push-style broker (see the module docstring); mixed in before ``Broker``."""

    _held: dict[str, set[Any]]

    if TYPE_CHECKING:  # the broker's

        def _where(self) -> str: ...

        def _url(self) -> str: ...

    def _open_consumer(self, url: str) -> Consumer:
        """The client's consuming connection (raise a connection error when the server is unreachable)."""
        raise NotImplementedError

    def _push_state(self) -> None:
        """Fresh state: at construction and in a forked child (the parent's thread and sockets are not ours)."""
        self._subs: dict[str, Subscription] = {}
        self._push_lock = threading.Lock()
        self._io: threading.Thread | None = None
        self._io_stop = False
        self._consumer: Consumer | None = None
        self._io_where = ""  # the I/O thread's server, named as in logs (set when the thread starts)
        self._generation = 0
        self._wake_pending = False
        self._acks_lock = threading.Lock()  # appends to a subscription's acks and the I/O thread's swap
        self._passes = 0  # rounds of the I/O thread completed (acks written), for :meth:`_flush_acks`
        self._passes_changed = threading.Condition(threading.Lock())
        self._given_back = GivenBack()  # what lost channels held: a redelivery here is no death

    def _take_pushed(self, queue: str, max_n: int) -> list[tuple[int, int, bytes, dict[str, Any], int, bool]]:
        """Up to ``max_n`` buffered deliveries of ``queue`` as (epoch, tag, body, headers, priority, redelivered),
        subscribing on first use and keeping the prefetch at the consumer's free room."""
        sub = self._subs.get(queue) or self._subscribe(queue, max_n)
        # The server counts against a consumer what it delivered and was not acked yet: what this process
        # holds of that consumer, what it buffers, and what finished but whose ack is on its way. So the
        # consumer's prefetch is the fetch's free room plus the first and the last of those.
        held: Collection[Any] = self._held.get(queue, ())
        if sub.boundary:
            epoch, boundary = sub.epoch, sub.boundary
            held = [token for token in held if token[0] == epoch and token[2] > boundary]
        wanted = len(held) + max_n + sub.acking
        if wanted > sub.prefetch or wanted < sub.prefetch // 2:
            sub.prefetch = wanted
            self._wake()
        epoch = sub.epoch
        return [item for item in sub.buffer.take(max_n) if item[0] == epoch]  # else its channel is gone

    def _pause(self, queue: str) -> list[tuple[int, int, bytes, dict[str, Any], int, bool]]:
        """Stop consuming ``queue`` until the next fetch, and return what was buffered when the server stopped."""
        sub = self._subs[queue]
        sub.prefetch = 0

        def stopped() -> bool:
            return sub.qos_sent == 0 and sub.qos_applied

        # Until the I/O thread sends the change, qos_applied still holds from the last one: waiting on a flag
        # that is up returns at once, a busy loop that under gevent or eventlet starves the I/O greenlet
        # till the deadline. The signal blocks; waking again every 10 ms covers a wake dropped mid-round.
        deadline = time.monotonic() + 5.0
        while not stopped() and (left := deadline - time.monotonic()) > 0:
            self._wake()
            sub.qos_changed.wait_until(stopped, min(left, 0.01))
        return [item for item in sub.buffer.take(len(sub.buffer.items)) if item[0] == sub.epoch]

    def _subscribe(self, queue: str, prefetch: int) -> Subscription:
        with self._push_lock:
            sub = self._subs.get(queue)
            if sub is None:
                sub = self._subs[queue] = Subscription(queue, max(1, prefetch))
            if self._io is None or not self._io.is_alive():
                self._io_stop = False
                name = f"funboost_like-{type(self).__name__}-io"
                self._io = threading.Thread(target=self._io_loop, name=name, daemon=True)
                self._io.start()
        self._wake()
        return sub

    def _wait(self, queue: str, timeout: float) -> None:
        sub = self._subs.get(queue)
        if sub is not None:
            sub.buffer.wait(timeout)

    def _interrupt(self, queue: str) -> None:
        sub = self._subs.get(queue)
        if sub is not None:
            sub.buffer.wake()

    def _wake(self) -> None:
        consumer = self._consumer
        if consumer is not None and not self._wake_pending:
            self._wake_pending = True
            try:
                consumer.wake()
            except Exception:  # noqa: BLE001 - a broken connection: the I/O thread reconnects
                self._wake_pending = False

    # -- the I/O thread ----------------------------------------------------------------------------
    def _io_loop(self) -> None:
        pause = 0.5
        # The server of this thread's life (settings changed since then do not move it), and its name
        # in logs: read together, since _where() reads the settings of the moment.
        url, self._io_where = self._url(), self._where()
        while not self._io_stop:
            try:
                self._consumer = self._open_consumer(url)
                self._generation += 1
                pause = 0.5
                self._serve(self._consumer)
            except Exception as exc:  # noqa: BLE001 - any client error: reconnect
                if self._io_stop:
                    break
                logger.warning("consuming from %s stopped (%s); reconnecting in %.1f s", self._io_where, exc, pause)
                self._lost_connection()
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        self._lost_connection()

    def _serve(self, consumer: Consumer) -> None:
        generation = self._generation
        channel_error = getattr(consumer, "channel_error", None)
        while not self._io_stop:
            for sub in list(self._subs.values()):
                try:
                    self._serve_one(consumer, sub, generation, channel_error)
                except Exception:
                    # The server closed this channel under the call (the connection still up): subscribe
                    # it again; anything else is the connection's and reconnects everything.
                    error = channel_error(sub.channel) if channel_error is not None and sub.channel else None
                    if error is None:
                        raise
                    self._check_channel(sub, error)
            self._wake_pending = False
            consumer.pump(1.0)
            with self._passes_changed:
                self._passes += 1
                self._passes_changed.notify_all()
        for sub in list(self._subs.values()):  # closing: what finished must not come back
            if sub.acks and sub.generation == generation:
                self._send_acks(consumer, sub)
        consumer.pump(0)

    def _serve_one(self, consumer: Consumer, sub: Subscription, generation: int,
                   channel_error: Callable[[Any], str | None] | None) -> None:
        """One round for one subscription: notice a closed channel, (re)subscribe, change the prefetch, ack."""
        if sub.generation == generation and channel_error is not None:
            self._check_channel(sub, channel_error(sub.channel))
        if sub.generation != generation and time.monotonic() >= sub.retry_at:
            sub.epoch = next(_epochs)
            sub.buffer.clear()
            sub.acks = []
            sub.channel = None
            # Paused (prefetch 0) stays paused: consume with 1, and the next round stops it again.
            sub.channel = consumer.subscribe(sub.queue, max(1, sub.prefetch), self._deliverer(sub, sub.epoch))
            sub.generation = generation
            sub.outstanding.clear()
            sub.qos_sent = max(1, sub.prefetch)
            sub.boundary = sub.last_tag = 0
            sub.qos_applied = True
        if sub.qos_sent != sub.prefetch and sub.qos_applied:
            sub.qos_applied = False
            sub.qos_sent = sub.prefetch
            consumer.set_prefetch(sub.channel, sub.prefetch, functools.partial(self._consumer_changed, sub))
        if sub.acks:
            self._send_acks(consumer, sub)

    def _check_channel(self, sub: Subscription, error: str | None) -> None:
        """A channel the server closed (the connection still up) is opened again by the next round; its
        unacked messages come back to the queue."""
        if error is not None:
            self._given_back.note(sub.queue, sub.outstanding.values())
            sub.generation = -1
            now = time.monotonic()
            # Closed again soon after opening (a deleted queue, say): wait longer each time, up to 5 s.
            sub.retry_delay = min(5.0, max(0.05, sub.retry_delay * 2)) if now - sub.retry_at < 10 else 0.0
            sub.retry_at = now + sub.retry_delay
            self._channel_closed(sub.queue, error)

    def _channel_closed(self, queue: str, error: str) -> None:
        """Say once why the server closed a channel (brokers name their known causes)."""
        logger.warning("%s closed the channel of queue %r (%s); subscribing again", self._io_where, queue, error)

    @staticmethod
    def _consumer_changed(sub: Subscription) -> None:
        """On the I/O thread, once the new consumer started (or the old one stopped): every delivery so far
        was to an earlier consumer, which the new prefetch does not count."""
        sub.boundary = sub.last_tag
        sub.qos_applied = True
        sub.qos_changed.notify()

    def _deliverer(self, sub: Subscription, epoch: int) -> Deliver:
        put, outstanding = sub.buffer.put, sub.outstanding

        def deliver(tag: int, body: bytes, headers: dict[str, Any], priority: int, redelivered: bool) -> None:
            outstanding[tag] = body
            sub.last_tag = tag
            put((epoch, tag, body, headers, priority, redelivered))

        return deliver

    def _send_acks(self, consumer: Consumer, sub: Subscription) -> None:
        """Ack the settled tags of ``sub``: those below every outstanding one in one ``multiple`` ack."""
        with self._acks_lock:
            tags, sub.acks = sub.acks, []
        outstanding = sub.outstanding
        for tag in tags:
            outstanding.pop(tag, None)
        lowest = min(outstanding) if outstanding else None
        tags.sort()
        below = [tag for tag in tags if lowest is None or tag < lowest]
        if below:
            consumer.ack(sub.channel, below[-1], True)
        for tag in itertools.islice(tags, len(below), None):
            consumer.ack(sub.channel, tag, False)

    def _lost_connection(self) -> None:
        consumer, self._consumer = self._consumer, None
        for sub in self._subs.values():
            self._given_back.note(sub.queue, sub.outstanding.values())
            sub.buffer.clear()
            sub.acks = []
            sub.generation = -1
        if consumer is not None:
            try:
                consumer.close()
            except Exception:  # noqa: BLE001 - it is broken already
                pass

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        subs = self._subs
        sub = None
        with self._acks_lock:
            for delivery in deliveries:
                epoch, queue, tag = delivery.token
                sub = subs.get(queue)
                if sub is not None and epoch == sub.epoch:  # else its channel is gone: the server delivers it again
                    sub.acks.append(tag)
        if sub is not None:
            sub.acking = len(deliveries)
        self._wake()

    def _flush_acks(self, timeout: float = 2.0) -> None:
        """Wait until the acks queued so far are written (a whole round of the I/O thread after now).

        For an ack that follows a re-publish of the same message (a release, a nack, a crash count): if
        the process died between the two, the message would exist twice."""
        with self._passes_changed:
            target = self._passes + 2  # the round under way may have swapped the acks before ours came
            deadline = time.monotonic() + timeout
            while self._passes < target and self._consumer is not None and time.monotonic() < deadline:
                self._wake()
                self._passes_changed.wait(0.05)

    def _stop_pushing(self) -> None:
        """Stop the I/O thread (it sends the acks queued so far first) and forget the subscriptions."""
        self._io_stop = True
        self._wake()
        io = self._io
        if io is not None and io is not threading.current_thread():
            io.join(5.0)
        self._io = None
        self._subs.clear()
