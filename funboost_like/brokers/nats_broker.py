"""NATS: JetStream streams and durable pull consumers, through nats-py behind the sync contract.

Guarantee: at-least-once, persistent (JetStream file storage), cross-host. docs/nats.md says the
same for users.

Layout, per queue ``q`` (a valid NATS subject; its stream name ``fl_<q>`` has every character
outside ``[A-Za-z0-9_-]`` replaced by ``_``, plus a hash of ``q`` when one was):

* stream ``fl_<q>``: work-queue retention (a message is deleted when acked), file storage, subjects
  ``q`` (ready messages) and ``q.fl-delayed`` (delayed ones). Another program publishes a JSON body
  to the subject ``q`` (``js.publish("q", b'{"x": 1}')``, or plain ``nc.publish``) and it runs.
* durable pull consumer ``fl`` on ``q``, shared by every consumer process: explicit acks,
  ``ack_wait`` = ``NATS_ACK_WAIT_SECONDS`` (30), ``max_ack_pending`` 100,000, no ``max_deliver``.
  A fetch is one pull request (``no_wait``, batch = the consumer's free capacity); an idle fetch
  waits with a lingering pull of one message, kept for the fetch that follows (as is a message the
  server sends after its pull ended: renewed while kept, handed back when fetching stops). A
  message is acked after its call. While a process
  holds a message, the maintenance thread of the base sends ``+WPI`` (in progress) every quarter of
  ``ack_wait``, so a long call is never delivered again while its process lives; a killed process's
  messages are delivered again by the server once ``ack_wait`` has passed.
* durable pull consumer ``fl-delay`` on ``q.fl-delayed``; stream ``fl_<q>_dlq`` (subject ``q.dlq``,
  limits retention, the newest 10,000): dead letters as JSON envelopes
  ``{"body", "reason", "failed_at", "attempts"}``.

Counting (DESIGN §3.3): a message is never ``nak``-ed on the ready subject. A nack, a release or a
retry publishes a copy with the headers ``fl-attempts`` (deliveries before it) and ``fl-crashes``,
then acks the original; so a ready message the server delivers a second time was held by a process
that died (or lost its lease). Such a delivery is not run: the fetch publishes its copy with
``crashes = fl-crashes + num_delivered - 1`` (attempts likewise) and acks it, and the copy runs
alone under the poison-message rule (unless the fetching process holds that message itself: its
lease ran out during a stall, and its ack, valid still, settles it). Every copy of the stream
message ``seq`` carries the de-duplication id ``Nats-Msg-Id: fl.<seq>.<fl-attempts>``, so a death
between publishing a copy and acking the original cannot make a second copy (the stream's
duplicate window is at least two minutes and four times ``ack_wait``).

Delays (``not_before``, ``nack(delay=...)``) are held by the server: the message goes to
``q.fl-delayed`` (a subject of the queue's own stream, so the de-duplication covers copies made
into either subject) with its due time (UNIX seconds) in the header ``fl-due``. Every consuming process
runs a mover task on the ``fl-delay`` consumer: a message not yet due is ``nak``-ed with
``delay`` = the time left (the server redelivers it then; counts do not matter on that subject),
a due one is published to ``q`` with its headers and the id ``fl.d.<seq>``, then acked. Delayed
messages move only while some process consumes the queue.

Async: nats-py runs on the one event loop thread of :mod:`~funboost_like.brokers.async_bridge`,
connected lazily; a forked child gets its own loop and connection. Publishing goes through a
synchronous connection per publishing thread (:mod:`~funboost_like.brokers.nats_wire`: one round
trip, no thread hop), and fetching through a synchronous puller per queue on the fetching thread
(:mod:`~funboost_like.brokers.nats_pull`: the acks and the next pull request in one write), or both
through nats-py when the server needs TLS or nkeys.

The names, what a fetch makes of the messages it took, and the mover of delayed messages live in
:mod:`~funboost_like.brokers.nats_queues`.

``count`` is the messages waiting (not held) plus the delayed ones; ``purge`` purges the whole
stream (held messages too: their acks then do nothing). Capabilities: lease redelivery, native
delay, no priority, dead letters, key-value records (JetStream KV buckets, see
:mod:`~funboost_like.brokers.nats_records`), no routing.

Limits: no priorities; a copy joins the back of the queue (``release`` cannot put it in front);
give every process of a queue the same ``NATS_ACK_WAIT_SECONDS`` (the last to start sets it);
the queue name must be a valid subject (no spaces, ``*`` or ``>``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from funboost_like.brokers import nats_queues as nq
from funboost_like.brokers.async_bridge import bridge
from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.nats_jetstream import NO_WAIT_TIMEOUT, TIMEOUT, WINDOW, JetStream
from funboost_like.brokers.nats_pull import Pulled, WirePuller
from funboost_like.brokers.nats_records import NatsRecords
from funboost_like.brokers.nats_wire import PublishRefused, Unsupported, WirePublishers, redact_nats_url
from funboost_like.core.config import settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.nats")

class NatsBroker(Broker):
    """At-least-once NATS JetStream broker; see the module docstring for the layout and counting."""

    kind = BrokerEnum.NATS
    capabilities = Capabilities(redelivery="lease", delay="native", max_priority=0, dead_letters=True,
                                key_value=True, routing="none", persistent=True, cross_process=True,
                                cross_host=True, queue_names=nq.check_queue_name, release_front=False,
                                purge_spares_held=False)  # a stream purge takes the unacked too
    connection_errors = (nats.errors.ConnectionClosedError, nats.errors.NoServersError, nats.errors.TimeoutError,
                         nats.errors.StaleConnectionError, nats.errors.ConnectionReconnectingError,
                         nats.errors.OutboundBufferLimitError, TimeoutError, OSError)
    errors = (nats.errors.Error, nats.js.errors.Error, PublishRefused)

    def __init__(self) -> None:
        super().__init__()
        self._after_fork()

    def _after_fork(self) -> None:  # the parent's connection lives on the parent's loop: dropped, never closed
        self._jet: JetStream | None = None
        self._queues: dict[str, nq.Queue] = {}
        self._ready: set[str] = set()
        self._records: dict[tuple[str, str], NatsRecords] = {}
        self._wires: WirePublishers | None = None

    # -- connection, streams, consumers --------------------------------------------------------------
    def _url(self) -> str:
        return str(settings.get("NATS_URL"))

    def _where(self) -> str:
        return f"NATS at {redact_nats_url(self._url())}"

    def _ack_wait(self) -> float:
        return float(settings.get("NATS_ACK_WAIT_SECONDS"))

    def maintenance_interval(self) -> float:
        return self._ack_wait() / 4

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float = TIMEOUT + 5) -> Any:
        return bridge.run(coro, timeout)

    @property
    def jet(self) -> JetStream:
        if self._jet is None:
            where = self._where()
            self._jet = JetStream(self._url(), lambda exc: logger.warning("%s: %s", where, type(exc).__name__))
        return self._jet

    async def _queue(self, queue: str) -> nq.Queue:
        """The queue's streams and consumers, created (or updated) at first use in this process."""
        q = self._queues.get(queue)
        if q is not None and queue in self._ready:
            return q
        q = self._queues.setdefault(queue, nq.Queue(queue))
        jet, ack_wait = self.jet, self._ack_wait()
        await jet.connect()
        await self._add_stream(api.StreamConfig(
            name=q.stream, subjects=[queue, q.delayed], retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE, duplicate_window=max(120.0, 4 * ack_wait)))
        for puller, name, subject, wait in ((q.ready, nq.CONSUMER, queue, ack_wait),
                                            (q.delay, nq.DELAY_CONSUMER, q.delayed, 30.0)):
            await jet.js.add_consumer(q.stream, api.ConsumerConfig(
                durable_name=name, filter_subject=subject, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=wait,
                max_deliver=-1, max_ack_pending=nq.MAX_ACK_PENDING, max_waiting=512))
            await jet.subscribe(puller)
        self._ready.add(queue)
        return q

    async def _add_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.jet.js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:  # exists with another configuration: used as it is
            if exc.err_code != 10058:
                raise
            logger.warning("stream %r exists on %s with another configuration; using it as it is", config.name,
                           self._where())

    # -- publishing ----------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        if priority:
            raise ConfigurationError("NATS has no priorities")
        q = self._queues.get(queue)
        if q is None or queue not in self._ready:
            q = self._run(self._queue(queue))
        if not_before is not None and not_before > time.time():
            headers = {nq.DUE: repr(float(not_before))}
            items: list[tuple[str, bytes, dict[str, str] | None]] = [(q.delayed, body, headers) for body in bodies]
        else:
            items = [(queue, body, None) for body in bodies]
        if not self._publishers().publish(items, WINDOW):
            self._run(self.jet.publish(items))

    def _publishers(self) -> WirePublishers:
        wires = self._wires
        if wires is None:
            wires = self._wires = WirePublishers(self._url(), TIMEOUT)
        return wires

    # -- consuming -----------------------------------------------------------------------------------
    def _consuming(self, queue: str) -> nq.Queue:
        """The queue, ready to fetch from: its mover task running, its puller connected."""
        q = self._queues.get(queue)
        if q is None or queue not in self._ready or q.mover is None or q.mover.done():
            async def start() -> nq.Queue:
                q = await self._queue(queue)
                if q.mover is None or q.mover.done():
                    q.mover = asyncio.get_running_loop().create_task(nq.move_due(self.jet, q))
                return q
            q = self._run(start())
        if q.wire is None and (self._wires is None or self._wires.unsupported is None):
            try:
                q.wire = WirePuller(self._url(), TIMEOUT, q.ready.next, q.ready.stash)
            except Unsupported as exc:
                logger.info("pulling through nats-py: %s", exc)
                self._publishers().unsupported = str(exc)
        return q

    def _pull(self, queue: str, max_n: int, acks: Sequence[Delivery]) -> list[Delivery]:
        """Ack ``acks``, then take up to ``max_n`` messages: the stash first, then one ``no_wait`` pull."""
        q = self._consuming(queue)
        tokens = [d.token for d in acks]
        if q.wire is None:
            async def take() -> list[Pulled]:
                if tokens:
                    await self.jet.ack(tokens)
                return await self.jet.take(q.ready, max_n)
            taken = self._run(take())
        else:
            stash = q.ready.stash
            self._on_wire(q, lambda wire: wire.pull(tokens, {"batch": max_n - len(stash), "no_wait": True}, max_n,
                                                    NO_WAIT_TIMEOUT) if len(stash) < max_n else wire.ack(tokens))
            taken = q.ready.take(max_n)
        got, dead = nq.sort_out(queue, q, taken)
        if dead:  # unless this process still holds it (its lease ran out during a stall): its holder settles it
            mine = {nq.numbers(token)[1] for held_queue, token in self.held() if held_queue == queue}
            dead = [copy for copy in dead if nq.numbers(copy[0])[1] not in mine]
            if dead:
                self._run(self._copy(queue, dead, 0.0))
        return got

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        return self._pull(queue, max_n, ())

    def _ack_and_get(self, deliveries: Sequence[Delivery], queue: str, max_n: int) -> list[Delivery]:
        return self._pull(queue, max_n, deliveries)

    def _wait(self, queue: str, timeout: float) -> None:
        q = self._consuming(queue)
        if q.wire is None:
            self._run(self.jet.long_poll(q.ready, timeout), timeout + TIMEOUT)
        elif not q.ready.stash:
            expires = max(1_000_000, int((timeout - 0.005) * 1e9))
            self._on_wire(q, lambda wire: wire.pull((), {"batch": 1, "expires": expires}, 1, timeout))

    def _on_wire(self, q: nq.Queue, use: Callable[[WirePuller], None]) -> None:
        """``use(q.wire)``; on a broken connection, once more on a new one (a restarted server)."""
        for retry in (True, False):
            wire = q.wire
            if wire is None:
                wire = q.wire = WirePuller(self._url(), TIMEOUT, q.ready.next, q.ready.stash)
            with wire.lock:
                try:
                    use(wire)
                    return
                except OSError:
                    q.wire = None  # its stash is the queue's: kept
                    wire.close()
                    if not retry:
                        raise

    # -- settling ------------------------------------------------------------------------------------
    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        self._run(self.jet.ack([d.token for d in deliveries]))

    async def _copy(self, queue: str, copies: Sequence[nq.Copy], delay: float) -> None:
        """Publish each copy with its counts (delayed: to the delayed subject), then ack the originals,
        confirmed, so they are gone before anything else runs."""
        q = await self._queue(queue)
        items = []
        for _, body, attempts, crashes, dedup in copies:
            headers = {nq.ATTEMPTS: str(attempts), nq.CRASHES: str(crashes), nq.MSG_ID: dedup}
            if delay > 0:
                headers[nq.DUE] = repr(time.time() + delay)
            items.append((q.delayed if delay > 0 else queue, body, headers))
        await self.jet.publish(items)
        await self.jet.ack([token for token, *_ in copies], confirm=True)

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        copies = [(d.token, d.body, d.attempts if count_attempt else d.attempts - 1, d.crashes,
                   f"fl.{nq.numbers(d.token)[1]}.{d.attempts - 1}") for d in deliveries]
        self._run(self._copy(deliveries[0].queue, copies, delay))

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        envelope = letter.envelope()

        async def send() -> None:
            q = await self._queue(delivery.queue)
            if not q.dlq_made:  # made by the first dead letter; before it, listing and purging find none
                await self._add_stream(api.StreamConfig(name=q.dlq_stream, subjects=[q.dlq],
                                                        storage=api.StorageType.FILE, max_msgs=nq.DEAD_LETTER_LIMIT))
                q.dlq_made = True
            await self.jet.publish([(q.dlq, envelope, None)])
            await self.jet.ack([delivery.token], confirm=True)
        self._run(send())

    def _renew(self, deliveries: Sequence[Delivery]) -> None:
        """``+WPI`` for what this process holds, and for what a late pull left in a stash."""
        jet = self._jet
        if jet is not None:
            async def renew() -> None:  # list(): a fetching thread may change a stash meanwhile
                stashed = [pulled[0] for q in list(self._queues.values()) for pulled in list(q.ready.stash)]
                await jet.ack([*(d.token for d in deliveries), *stashed], verb=b"+WPI")
            self._run(renew())

    # -- counting, purging, dead letters, records ----------------------------------------------------
    def _size(self, queue: str) -> int:
        async def size() -> int:
            q, js = await self._queue(queue), self.jet.js
            ready, delayed = await asyncio.gather(js.consumer_info(q.stream, nq.CONSUMER),
                                                  js.consumer_info(q.stream, nq.DELAY_CONSUMER))
            return int(ready.num_pending + delayed.num_pending + delayed.num_ack_pending)
        return int(self._run(size()))

    def _purge_stream(self, queue: str, dlq: bool) -> int:
        async def purge() -> int:
            q = await self._queue(queue)
            answer = await self.jet.api(f"$JS.API.STREAM.PURGE.{q.dlq_stream if dlq else q.stream}")
            return int(answer.get("purged", 0))
        return int(self._run(purge()))

    def _purge(self, queue: str) -> int:
        return self._purge_stream(queue, dlq=False)

    def purge_dead_letters(self, queue: str) -> int:
        try:
            return self._purge_stream(queue, dlq=True)
        except nats.js.errors.NotFoundError:
            return 0  # no dead letter yet
        except self._client_errors as exc:
            raise self._translated(exc, f"purging dead letters of queue {queue!r}") from exc

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        async def newest() -> list[tuple[int, bytes]]:
            return await self.jet.newest((await self._queue(queue)).dlq_stream, limit)

        try:
            found = self._run(newest())
        except nats.js.errors.NotFoundError:
            return []  # no dead letter yet
        except self._client_errors as exc:
            raise self._translated(exc, f"listing dead letters of queue {queue!r}") from exc
        return [replace(DeadLetter.from_envelope(queue, raw), ref=seq) for seq, raw in found]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        async def delete() -> bool:
            return bool(await self.jet.js.delete_msg((await self._queue(queue)).dlq_stream, letter.ref))

        try:
            return self._run(delete())
        except nats.js.errors.APIError as exc:
            if exc.err_code != nq.NO_SUCH_SEQUENCE and not isinstance(exc, nats.js.errors.NotFoundError):
                raise self._translated(exc, f"removing a dead letter of queue {queue!r}") from exc
            return False  # deleted already
        except self._client_errors as exc:
            raise self._translated(exc, f"removing a dead letter of queue {queue!r}") from exc

    def key_value_store(self, queue: str, namespace: str) -> NatsRecords:
        """Records in the JetStream KV bucket ``fl_kv_<queue>_<namespace>`` (see
        :mod:`~funboost_like.brokers.nats_records`)."""
        store = self._records.get((queue, namespace))
        return store or self._records.setdefault((queue, namespace), NatsRecords(self, queue, namespace))

    def delete_queue(self, queue: str) -> None:
        """Delete the streams of ``queue`` (its messages, delayed ones and dead letters) and the KV buckets
        this process opened for it (tests, benchmarks)."""
        async def delete() -> None:
            q = self._queues.get(queue) or nq.Queue(queue)
            if q.mover is not None:
                q.mover.cancel()
                q.mover = None
            self._ready.discard(queue)
            q.dlq_made = False
            buckets = [f"KV_{self._records.pop(key).bucket}" for key in list(self._records) if key[0] == queue]
            await self.jet.delete_streams([q.stream, q.dlq_stream, *buckets])
        self._run(delete())

    # -- stopping ------------------------------------------------------------------------------------
    def _stop_fetching(self, queue: str) -> None:
        """Stop moving delayed messages; hand back what a late pull left in the stash (a copy each)."""
        q = self._queues.get(queue)
        wire = q.wire if q is not None else None
        if q is None or self._jet is None:
            return
        if wire is not None:
            with wire.lock:
                q.wire = None
                try:
                    wire.drain(NO_WAIT_TIMEOUT)  # what a late pull sent is read now
                except OSError:
                    pass  # lost with the connection: the server delivers it again
                wire.close()

        async def stop() -> None:
            if q.mover is not None:
                q.mover.cancel()
                q.mover = None
            left = [nq.copy_of(pulled) for pulled in q.ready.take(len(q.ready.stash))]
            if left:  # never run here: counts unchanged (or crashes, if the server had redelivered them)
                await self._copy(queue, left, 0.0)
        self._run(stop())

    def _close(self) -> None:
        jet = self._jet
        if self._wires is not None:
            self._wires.close()
        for queue in list(self._queues) if jet is not None else ():
            try:
                self._stop_fetching(queue)
            except Exception:  # noqa: BLE001 - closing anyway; the server delivers them again
                logger.warning("handing back the prefetched messages of queue %r failed", queue, exc_info=True)
        try:
            if jet is not None:
                self._run(jet.close())
        except Exception:  # noqa: BLE001 - closing anyway
            logger.debug("closing the NATS connection failed", exc_info=True)
        self._after_fork()
