"""NSQ: topics and channels of nsqd, over a raw-socket client of its TCP protocol (:mod:`nsq_wire`).

Guarantee: at-least-once while nsqd runs, cross-host; not persistent (nsqd keeps messages in memory
up to ``--mem-queue-size`` and loses those when it crashes). Tested against the protocol fixture
``tests/nsqd_server.py`` only, never against a real nsqd (docs/nsq.md says what that covers).

Layout, per queue ``q`` (a valid NSQ topic name, at most 60 characters):

* topic ``q``, channel ``fl`` shared by every consumer process, so each message runs once. The channel
  is made (HTTP ``/channel/create``) before the first publish of a process, so nothing published
  before the first consumer subscribes is lost to it. Another program publishes a JSON body to ``q``
  (``PUB``, ``/pub``) and it runs.
* A consumer holds one connection per nsqd (``NSQD_TCP_ADDRESSES``); its ``RDY`` count follows the
  consumer's free room (what it holds plus what it asks for), messages wait in a
  :class:`~funboost_like.brokers.push_buffer.PushBuffer` until fetched. A message is ``FIN``-ed after
  its call. While a process holds it (or has it buffered), the maintenance thread sends ``TOUCH`` every
  quarter of ``NSQ_MSG_TIMEOUT_SECONDS`` (sent in ``IDENTIFY``); a killed consumer's messages are
  delivered again by nsqd once that timeout passed, their ``attempts`` header incremented.
* Dead letters: JSON envelopes ``{"body", "reason", "failed_at", "attempts"}`` on topic ``q.dlq``,
  channel ``fl``. Listing subscribes, reads up to ``limit`` and requeues them (``REQ`` 0), so the
  order is by ``failed_at``, newest first.

Counting (DESIGN §3.3): nsqd's ``attempts`` counts deliveries but cannot tell a ``REQ`` from a
consumer's death, so this broker never sends ``REQ``: a nack, a retry or a release publishes a copy
of the body behind the prefix ``\\x00fl-copy <attempts> <crashes> <due>\\n`` (runs and deaths before
it, UNIX due time or 0), with ``DPUB`` for a delay, then ``FIN``-s the original. A message nsqd
delivers with ``attempts`` > 1 was held by a consumer that died (or stalled past the timeout, or
lost its connection): it is not run but copied with those deliveries counted as crashes, and the
copy runs later, alone while its crashes are not 0 (this process sends ``RDY 0`` and hands back
what it had buffered, uncounted). A death between a copy and its ``FIN`` runs the message twice.
A delay longer than nsqd's ``--max-req-timeout`` (one hour) is ``DPUB``-ed again when it arrives early.

Publishing: one connection per publishing thread, to the nsqds in turn (the next one when one is
unreachable), closed once its thread ended and another one connects; ``publish_many`` is one ``MPUB``
per MiB. ``count`` and ``purge`` use nsqd's HTTP API (``NSQD_HTTP_ADDRESSES``): depth plus deferred
messages of channel ``fl`` plus what the topic keeps; ``purge`` empties the channel, which in nsqd drops
its in-flight messages too (their ``FIN`` fails).

Limits: no priorities, no key-value records, no routing; a released message joins the back of the
queue; copies (nacks, releases) carry the prefix above, which other NSQ consumers would see.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from funboost_like.brokers import nsq_wire
from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.nsq_wire import MAX_DEFER_MS, Message, NsqError, Publisher, Subscription, http
from funboost_like.brokers.per_thread import PerThread
from funboost_like.brokers.push_buffer import PushBuffer
from funboost_like.core.config import settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.nsq")

CHANNEL = "fl"
COPY = b"\x00fl-copy "
TIMEOUT = 5.0
HEARTBEAT = 5.0
Address = tuple[str, int]


def check_queue_name(queue: str) -> None:
    """A queue is an NSQ topic (``[.a-zA-Z0-9_-]``), short enough for its ``.dlq`` topic (60 characters)."""
    if not nsq_wire.valid_topic(queue) or len(queue) > 60:
        raise ConfigurationError(f"NSQ queue names are 1 to 60 characters of [.a-zA-Z0-9_-], not {queue!r}")


def wrap(body: bytes, attempts: int, crashes: int, due: float = 0.0) -> bytes:
    """A copy of ``body`` carrying its counts (and due time) for the next delivery."""
    return COPY + b"%d %d %r\n" % (attempts, crashes, due) + body


def unwrap(body: bytes) -> tuple[int, int, float, bytes]:
    """(attempts, crashes, due, body) of a copy; (0, 0, 0.0, body) for any other body."""
    if body.startswith(COPY):
        head, sep, rest = body[len(COPY):].partition(b"\n")
        fields = head.split()
        if sep and len(fields) == 3:
            try:
                return int(fields[0]), int(fields[1]), float(fields[2]), rest
            except ValueError:
                pass
    return 0, 0, 0.0, body


class _Feed:
    """This process's subscription to one queue: a connection per nsqd, one buffer of (connection, message)."""

    def __init__(self, queue: str, addresses: list[Address]) -> None:
        self.queue, self.addresses = queue, addresses
        self.buffer = PushBuffer()
        self.subs: dict[Address, Subscription] = {}
        self.retry_at: dict[Address, float] = {}
        self.rdy = 0
        self.lock = threading.Lock()

    def deliver(self, sub: Subscription, msg: Message) -> None:
        self.buffer.put((sub, msg))

    def closed(self, sub: Subscription) -> None:
        self.buffer.wake()


class NsqBroker(Broker):
    """At-least-once NSQ broker; see the module docstring for the layout and counting."""

    kind = BrokerEnum.NSQ
    capabilities = Capabilities(redelivery="lease", delay="native", dead_letters=True, cross_process=True,
                                cross_host=True, fifo=False, queue_names=check_queue_name, purge_spares_held=False)
    connection_errors = (OSError,)
    errors = (NsqError,)

    def __init__(self) -> None:
        super().__init__()
        self._after_fork()

    def _after_fork(self) -> None:  # the parent's sockets are dropped, never closed
        self._lock = threading.Lock()
        self._feeds: dict[str, _Feed] = {}
        self._closing: list[Subscription] = []
        self._channels: set[str] = set()
        self._local = threading.local()
        self._publishers: PerThread[Publisher] = PerThread(Publisher.close)  # every thread's, for closing
        self._turn = itertools.count()

    # -- settings ------------------------------------------------------------------------------------
    def _tcp(self) -> list[Address]:
        return self._addresses("NSQD_TCP_ADDRESSES")

    def _http(self) -> list[Address]:
        addresses = self._addresses("NSQD_HTTP_ADDRESSES")
        if len(addresses) != len(self._tcp()):
            raise ConfigurationError("NSQD_HTTP_ADDRESSES must name the HTTP address of each of NSQD_TCP_ADDRESSES")
        return addresses

    @staticmethod
    def _addresses(name: str) -> list[Address]:
        try:
            return nsq_wire.parse_addresses(settings.get(name))
        except ValueError as exc:
            raise ConfigurationError(f"{name}: {exc}") from None

    def _msg_timeout(self) -> float:
        return max(1.0, float(settings.get("NSQ_MSG_TIMEOUT_SECONDS")))

    def _where(self) -> str:
        return "nsqd at " + ",".join(f"{host}:{port}" for host, port in self._tcp())

    def maintenance_interval(self) -> float:
        return self._msg_timeout() / 4

    # -- publishing ----------------------------------------------------------------------------------
    def _ensure_channel(self, topic: str) -> None:
        if topic not in self._channels:
            for address in self._http():
                http(address, "POST", f"/channel/create?topic={topic}&channel={CHANNEL}", TIMEOUT)
            self._channels.add(topic)

    def _publish(self, topic: str, bodies: Sequence[bytes], defer: float = 0.0) -> None:
        """Publish on this thread's connection (a new one, to the next nsqd, after a failure)."""
        check_queue_name(topic.removesuffix(".dlq"))
        self._ensure_channel(topic)
        defer_ms = min(int(defer * 1000), MAX_DEFER_MS) if defer > 0 else 0
        publisher: Publisher | None = getattr(self._local, "publisher", None)
        addresses = self._tcp()
        for attempt in range(len(addresses) + 1):
            if publisher is None or publisher.closed:
                address = addresses[next(self._turn) % len(addresses)]
                publisher = self._local.publisher = Publisher(address, TIMEOUT)
                self._publishers.add(publisher)
            try:
                publisher.publish(topic, bodies, defer_ms)
                return
            except NsqError:
                self._publishers.forget(publisher)
                publisher.close()  # nsqd closes the connection after a fatal error
                raise
            except OSError:
                self._publishers.forget(publisher)
                publisher.close()
                if attempt == len(addresses):
                    raise
                logger.warning("publishing to %s:%d failed; trying again on a new connection", *publisher.address)

    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        if priority:
            raise ConfigurationError("NSQ has no priorities")
        defer = not_before - time.time() if not_before is not None else 0.0
        if defer * 1000 > MAX_DEFER_MS:  # nsqd defers one hour at most: the rest on arrival
            assert not_before is not None
            bodies = [wrap(body, 0, 0, not_before) for body in bodies]
        self._publish(queue, bodies, defer)

    # -- consuming -----------------------------------------------------------------------------------
    def _feed(self, queue: str) -> _Feed:
        feed = self._feeds.get(queue)
        if feed is None:
            check_queue_name(queue)
            self._ensure_channel(queue)
            with self._lock:
                feed = self._feeds.setdefault(queue, _Feed(queue, self._tcp()))
        now = time.monotonic()
        for address in feed.addresses:
            sub = feed.subs.get(address)
            if (sub is None or sub.closed) and now >= feed.retry_at.get(address, 0.0):
                self._connect(feed, address, now)
        return feed

    def _connect(self, feed: _Feed, address: Address, now: float) -> None:
        with feed.lock:  # one connection per nsqd even when two threads fetch at once
            sub = feed.subs.get(address)
            if sub is None or sub.closed:
                try:
                    feed.subs[address] = Subscription(address, feed.queue, CHANNEL, timeout=TIMEOUT,
                                                      msg_timeout=self._msg_timeout(), heartbeat=HEARTBEAT,
                                                      deliver=feed.deliver, on_close=feed.closed)
                    feed.rdy = 0
                except OSError as exc:
                    feed.retry_at[address] = now + 2.0
                    if len(feed.addresses) == 1:
                        raise
                    logger.warning("cannot consume from nsqd at %s:%d (%s); trying again in 2 s", *address, exc)

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        feed = self._feed(queue)
        live = [sub for sub in feed.subs.values() if not sub.closed]
        wanted = len(self._held.get(queue, ())) + max_n  # the consumer's free room: nsqd counts what it holds too
        if live and (wanted > feed.rdy or wanted < feed.rdy // 2):
            feed.rdy = wanted
            for sub in live:
                sub.ready(-(-wanted // len(live)))
        got: list[Delivery] = []
        back: list[tuple[Subscription, Message]] = []
        now = time.time()
        for sub, msg in feed.buffer.take(max_n):
            if sub.closed:
                continue  # nsqd delivers it again once its timeout passes
            attempts, crashes, due, body = unwrap(msg.body)
            if msg.attempts > 1 or due > now + 0.001:
                back.append((sub, msg))  # its consumer died (counted in a copy), or not due yet
            else:
                got.append(Delivery(queue, body, (sub, msg.id), attempts + 1, 0, crashes))
        if back:
            self._hand_back(queue, back)
        if any(d.crashes for d in got):
            self._hold_only_suspects(feed)
        return got

    def _hand_back(self, queue: str, items: Sequence[tuple[Subscription, Message]]) -> None:
        """Publish a copy of each message counting its earlier deliveries (each one ended by a timeout:
        a crash), deferred while not due, then ``FIN`` the originals. A delivery of nsqd counts as a run
        only once this broker hands it to the consumer, which it does for first deliveries alone."""
        now = time.time()
        ready: list[tuple[bytes, float]] = []
        deferred: list[tuple[bytes, float]] = []
        for _, msg in items:
            attempts, crashes, due, body = unwrap(msg.body)
            copy = wrap(body, attempts + msg.attempts - 1, crashes + msg.attempts - 1, due)
            (deferred if due > now + 0.001 else ready).append((copy, due - now))
        if ready:
            self._publish(queue, [copy for copy, _ in ready])
        for copy, left in deferred:
            self._publish(queue, [copy], left)
        self._finish([(sub, msg.id) for sub, msg in items])

    def _hold_only_suspects(self, feed: _Feed) -> None:
        """The consumer runs a message whose consumer died alone (DESIGN §3.3), so nothing else may wait
        in this process meanwhile, or a death during it would count against those too: ``RDY 0`` (the
        next fetch resumes) and what arrived meanwhile goes back to the queue, uncounted."""
        feed.rdy = 0
        for sub in feed.subs.values():
            sub.ready(0)
        time.sleep(0.05)  # nsqd answers no RDY: what it sent before reading ours arrives meanwhile
        rest = [(sub, msg) for sub, msg in feed.buffer.take(len(feed.buffer.items)) if not sub.closed]
        if rest:
            self._hand_back(feed.queue, rest)

    def _wait(self, queue: str, timeout: float) -> None:
        feed = self._feeds.get(queue)
        if feed is not None:
            feed.buffer.wait(timeout)
        else:
            time.sleep(min(timeout, 0.05))

    # -- settling ------------------------------------------------------------------------------------
    def _finish(self, tokens: Sequence[tuple[Subscription, bytes]]) -> None:
        """``FIN`` each message on its connection (one write per connection); a gone connection's
        message is delivered again by nsqd."""
        by_sub: dict[Subscription, list[bytes]] = {}
        for sub, msg_id in tokens:
            by_sub.setdefault(sub, []).append(b"FIN %s\n" % msg_id)
        for sub, lines in by_sub.items():
            sub.command(b"".join(lines))
        if self._closing:
            self._close_finished()

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        self._finish([d.token for d in deliveries])

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        due = time.time() + delay if delay * 1000 > MAX_DEFER_MS else 0.0
        copies = [wrap(d.body, d.attempts if count_attempt else d.attempts - 1, d.crashes, due) for d in deliveries]
        self._publish(deliveries[0].queue, copies, delay)
        self._finish([d.token for d in deliveries])

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        self._publish(f"{delivery.queue}.dlq", [letter.envelope()])
        self._finish([delivery.token])

    def _renew(self, deliveries: Sequence[Delivery]) -> None:
        """``TOUCH`` what this process holds and what waits in its buffers."""
        by_sub: dict[Subscription, list[bytes]] = {}
        for delivery in deliveries:
            sub, msg_id = delivery.token
            by_sub.setdefault(sub, []).append(b"TOUCH %s\n" % msg_id)
        for feed in list(self._feeds.values()):
            for sub, msg in list(feed.buffer.items):
                by_sub.setdefault(sub, []).append(b"TOUCH %s\n" % msg.id)
        for sub, lines in by_sub.items():
            sub.command(b"".join(lines))

    # -- stopping ------------------------------------------------------------------------------------
    def _stop_fetching(self, queue: str) -> None:
        """``CLS`` the queue's connections; hand back what they buffered (a copy each, counts unchanged).
        A connection stays open until what this process holds from it is settled."""
        with self._lock:
            feed = self._feeds.pop(queue, None)
        if feed is None:
            return
        subs = [sub for sub in feed.subs.values() if not sub.closed]
        for sub in subs:
            sub.command(b"CLS\n")
        for sub in subs:
            sub.close_wait.wait(2.0)
        left = [(sub, msg) for sub, msg in feed.buffer.take(len(feed.buffer.items)) if not sub.closed]
        if left:
            self._hand_back(queue, left)
        with self._lock:
            self._closing += subs
        self._close_finished()

    def _close_finished(self) -> None:
        held = {token[0] for _, token in self.held()}
        with self._lock:
            done = [sub for sub in self._closing if sub not in held]
            self._closing = [sub for sub in self._closing if sub in held]
        for sub in done:
            sub.close()

    def _close(self) -> None:
        for queue in list(self._feeds):
            try:
                self._stop_fetching(queue)
            except Exception:  # noqa: BLE001 - closing anyway; nsqd delivers them again
                logger.warning("handing back the buffered messages of queue %r failed", queue, exc_info=True)
        with self._lock:
            subs, self._closing = self._closing, []
        for sub in subs:
            sub.close()
        self._publishers.close_all(self._publishers.take_all())
        self._local = threading.local()

    # -- counting, purging, dead letters -------------------------------------------------------------
    def _size(self, queue: str) -> int:
        check_queue_name(queue)
        return sum(nsq_wire.depth(address, queue, CHANNEL, TIMEOUT) for address in self._http())

    def _empty(self, topic: str) -> int:
        return sum(nsq_wire.empty(address, topic, CHANNEL, TIMEOUT) for address in self._http())

    def _purge(self, queue: str) -> int:
        check_queue_name(queue)
        feed = self._feeds.get(queue)
        if feed is not None:  # nsqd dropped them from the channel's in-flight messages too
            feed.buffer.clear()
        return self._empty(queue)

    def purge_dead_letters(self, queue: str) -> int:
        check_queue_name(queue)
        try:
            return self._empty(f"{queue}.dlq")
        except self._client_errors as exc:
            raise self._translated(exc, f"purging dead letters of queue {queue!r}") from exc

    def _browse(self, topic: str, limit: int, remove: bytes | None = None) -> list[Message]:
        return [msg for tcp, address in zip(self._tcp(), self._http(), strict=True)
                for msg in nsq_wire.browse(tcp, address, topic, CHANNEL, limit, remove, TIMEOUT)]

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        check_queue_name(queue)
        try:
            found = self._browse(f"{queue}.dlq", max(limit, 2500))  # read from the oldest: the newest are later
        except self._client_errors as exc:
            raise self._translated(exc, f"listing dead letters of queue {queue!r}") from exc
        letters = [DeadLetter.from_envelope(queue, msg.body) for msg in found]
        letters = [DeadLetter(queue, letter.body, letter.reason, letter.failed_at, letter.attempts, ref=msg.id)
                   for msg, letter in zip(found, letters, strict=True)]
        return sorted(letters, key=lambda letter: letter.failed_at, reverse=True)[:limit]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        check_queue_name(queue)
        ref: Any = letter.ref
        try:
            return any(msg.id == ref for msg in self._browse(f"{queue}.dlq", 2500, remove=ref))
        except self._client_errors as exc:
            raise self._translated(exc, f"removing a dead letter of queue {queue!r}") from exc
