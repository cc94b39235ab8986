"""Kafka on the broker contract, written once over a small client interface (:mod:`.kafka_client`).

``kafka_python.py`` (KAFKA, kafka-python) and ``kafka_confluent.py`` (CONFLUENT_KAFKA,
confluent-kafka) only supply a client; every rule below is this module's. docs/kafka.md says the
same for users.

Guarantee: at-least-once. A queue ``q`` is the topic ``q``, consumed by the group ``funboost_like.q``.
A record is taken from the log, handed to a call, and counts as done only when its call ended;
the group's committed offset of a partition is the lowest record not done yet
(:class:`~funboost_like.brokers.offset_tracker.OffsetTracker`), committed before a fetch (at most
every 100 ms while calls run, at once when none does), on a revoke (the partition is then
forgotten: later acks of its records are ignored, the new owner runs them), at the end of a
consumer's graceful stop (which also leaves the groups) and on close. A killed
consumer's partitions go to the group's other members after ``KAFKA_SESSION_TIMEOUT_SECONDS``,
which read again from the committed offsets.

Calls of one partition run in parallel; a queue with ``broker_exclusive_config={"ordered": True}`` (or
named in ``KAFKA_ORDERED_QUEUES``) runs one call at a time per partition (records in log order).
Topics are created on first use (``q`` with ``KAFKA_PARTITIONS`` partitions, ``q.fl-delay`` likewise,
``q.dlq`` with one); a server that cannot
create topics (librdkafka's mock cluster) creates them on first reference. A publish goes to one
partition (round robin over the first ``KAFKA_PARTITIONS``), so one ``publish_many`` keeps its order.

Counting deaths (DESIGN §3.3): after handing records to calls, the fetch commits one past the
highest handed offset of each partition to a second group, ``funboost_like.q.delivered``. A new
owner that finds records below that mark and at or above the committed offset knows their consumer
died while holding them: it does not run them, it appends copies with the headers ``fl-attempts``
and ``fl-crashes`` raised by one and marks the originals done. Nacks, retries and delays likewise
append copies (a nack's copy joins the back of the partition). A revoke or a close lowers the mark,
so a rebalance is not counted as a death.

Delays (``not_before``, ``nack(delay=...)``, retries with backoff): the record goes to the topic
``q.fl-delay`` with its due time (UNIX seconds) in the header ``fl-due``. Every process that owns
partitions of ``q`` runs a mover thread: it reads its share of that topic (group
``funboost_like.q.delay``, joined after the first assignment of ``q``) into memory and appends each
record to ``q`` when due; a delay record is marked done once appended, so a killed process's delayed
records are read again by another. Delays never block a partition of ``q`` (:mod:`.kafka_delays`;
the group subscriptions are :mod:`.kafka_groups`).

Dead letters are JSON envelopes in the topic ``q.dlq``; listing reads it from the offset committed
to the group ``funboost_like.q.dlq-read``, which purging them moves to the end; removing one appends a
tombstone that listing skips (:mod:`.kafka_dead_letters`).

``count`` is, per partition, the end of the log minus the committed offset (minus what this process
took from the partitions it owns); a server whose reported end is the base of its last batch
(Tansu) is corrected by reading that batch. ``purge`` moves the committed offsets to the end; the
partitions owned by consumers in other processes are not purged (a warning says so).

Limits: no priorities, no key-value records (RPC results, task filters), no routing; ``release``
puts messages back in front within the process only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence

from funboost_like.brokers import kafka_dead_letters as dead_letters
from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.kafka_client import KafkaClient, Record, log_span
from funboost_like.brokers.kafka_delays import start_mover
from funboost_like.brokers.kafka_groups import COMMIT_EVERY, WAIT_SLICE, commit, hand_over, poll, settle, subscribe
from funboost_like.brokers.kafka_queue import ATTEMPTS, CRASHES, DUE, QueueState, counts
from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.kafka")

BUSY_WAIT_SLICE = 0.02  # a wait's slice while calls of the queue run (the commit after the last one)
POLL_RECORDS = 500  # a fetch that finds the buffer short polls this many (a poll costs kafka-python ~0.1 ms)


class KafkaBroker(Broker):
    """At-least-once Kafka broker over a :class:`KafkaClient`; see the module docstring."""

    capabilities = Capabilities(redelivery="native", delay="emulated", max_priority=0, dead_letters=True,
                                key_value=False, routing="none", persistent=True, cross_process=True,
                                cross_host=True, fifo=False,
                                queue_options=frozenset({"ordered"}), purges_delayed=False,
                                settle_delay=COMMIT_EVERY + 2 * BUSY_WAIT_SLICE)  # commits go with fetches
    inline_batch = POLL_RECORDS  # each fetch writes the delivered mark synchronously (see kafka_groups)
    _cannot_create: set[str] = set()  # bootstrap servers that refused to create topics

    def __init__(self) -> None:
        super().__init__()
        self._after_fork()

    def _after_fork(self) -> None:  # the parent's sockets and group memberships are dropped, never closed
        self._client_obj: KafkaClient | None = None
        self._queues: dict[str, QueueState] = {}
        self._lock = threading.Lock()

    def _new_client(self) -> KafkaClient:
        raise NotImplementedError

    @property
    def _client(self) -> KafkaClient:
        if self._client_obj is None:
            with self._lock:
                if self._client_obj is None:
                    self._client_obj = self._new_client()
        return self._client_obj

    def _where(self) -> str:
        return f"Kafka at {settings.get('KAFKA_BOOTSTRAP_SERVERS')}"

    def _queue(self, queue: str) -> QueueState:
        """The queue's topics, created at first use in this process."""
        q = self._queues.get(queue)
        if q is not None:
            return q
        client, servers = self._client, str(settings.get("KAFKA_BOOTSTRAP_SERVERS"))
        wanted = int(settings.get("KAFKA_PARTITIONS"))
        if wanted < 1:
            raise ConfigurationError(f"KAFKA_PARTITIONS must be at least 1, not {wanted}")
        for topic, count in ((queue, wanted), (f"{queue}.fl-delay", wanted), (f"{queue}.dlq", 1)):
            if servers not in self._cannot_create and not client.create_topic(topic, count):
                logger.warning("%s cannot create topics; they are made on first reference", self._where())
                self._cannot_create.add(servers)
        return self._queues.setdefault(queue, QueueState(queue, sorted(client.partitions(queue))[:wanted]))

    def _partition(self, q: QueueState) -> int:
        """The next partition a publish goes to (round robin); [0] until the topic's partitions are known
        (a server that makes topics on first reference)."""
        if not q.partitions:
            q.partitions = sorted(self._client.partitions(q.queue))[:int(settings.get("KAFKA_PARTITIONS"))]
            if not q.partitions:
                return 0
        return q.partitions[next(q.turn) % len(q.partitions)]

    # -- publishing ----------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        if priority:
            raise ConfigurationError("Kafka has no priorities")
        q = self._queue(queue)
        if not_before is not None and not_before > time.time():
            headers = {DUE: repr(float(not_before))}
            self._client.produce(q.delayed, [(body, headers, None) for body in bodies])
        else:
            partition = self._partition(q)
            self._client.produce(queue, [(body, None, partition) for body in bodies])

    # -- consuming -----------------------------------------------------------------------------------
    def configure_queue(self, queue: str, options: Mapping[str, object]) -> None:
        """``broker_exclusive_config={"ordered": True}``: one call at a time per partition of ``queue``
        (the same as naming it in ``KAFKA_ORDERED_QUEUES``). Call before the queue's first fetch."""
        if "ordered" in options:
            self._queue(queue).ordered = bool(options["ordered"])

    def _consuming(self, queue: str) -> QueueState:
        q = self._queue(queue)
        if q.main is None:
            with q.lock:
                if q.main is None:
                    q.main = subscribe(self._client, queue, q.group, q, delay=False)
        return q

    def _intake(self, q: QueueState, records: list[Record]) -> None:
        """Buffer records for calls; those whose consumer died holding them go back as counted copies."""
        group = q.main
        assert group is not None
        crash_until = q.crash_until
        dead = [r for r in records if r.offset < crash_until.get(r.partition, -1)] if crash_until else []
        if dead:
            copies = []
            for record in dead:
                attempts, crashes = counts(record)
                copies.append((record.value, {ATTEMPTS: str(attempts + 1), CRASHES: str(crashes + 1)},
                               record.partition))
            self._client.produce(q.queue, copies)
            for record in dead:
                group.tracker.finished(record.partition, [record.offset])
            commit(self._client, q, group, group.tracker.due())
            dead_ids = {(r.partition, r.offset) for r in dead}
            records = [r for r in records if (r.partition, r.offset) not in dead_ids]
        with q.lock:
            for record in records:
                buffer = group.buffers.get(record.partition)
                if buffer is not None:
                    buffer.append(record)

    def _housekeeping(self, q: QueueState) -> None:
        """Commit what moved and apply purges' seeks (the fetching thread); start the delay mover."""
        group = q.main
        assert group is not None and group.consumer is not None
        settle(self._client, q, group)
        if q.delay is None and group.tracker.owned():  # delayed records move where the queue is consumed
            start_mover(self._client, q, self._partition)

    def _buffered(self, q: QueueState) -> int:
        return sum(len(buffer) for buffer in q.main.buffers.values()) if q.main else 0

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        q = self._consuming(queue)
        self._housekeeping(q)
        assert q.main is not None
        if self._buffered(q) < max_n:
            self._intake(q, poll(self._client, q, q.main, max(max_n, POLL_RECORDS), 0, delay=False))
        return self._hand_out(q, max_n)

    def _wait(self, queue: str, timeout: float) -> None:
        q = self._consuming(queue)
        self._housekeeping(q)
        assert q.main is not None
        if not self._buffered(q):  # while calls run, a short slice: their commit follows them closely
            slice_ = BUSY_WAIT_SLICE if q.main.tracker.running() else WAIT_SLICE
            self._intake(q, poll(self._client, q, q.main, 256, min(timeout, slice_), delay=False))

    def _hand_out(self, q: QueueState, max_n: int) -> list[Delivery]:
        got: list[Delivery] = []
        group = q.main
        assert group is not None
        append, queue, raised = got.append, q.queue, {}
        with q.lock:
            for partition, buffer in group.buffers.items():
                room = min(max_n - len(got), len(buffer))
                if q.ordered and q.running.get(partition):
                    room = 0
                elif q.ordered:
                    room = min(room, 1)
                if room <= 0:
                    continue
                generation, highest = q.generation.get(partition, 0), -1
                for _ in range(room):
                    record = buffer.popleft()
                    offset = record.offset
                    attempts, crashes = counts(record) if record.headers else (0, 0)
                    append(Delivery(queue, record.value, (partition, offset, generation), attempts + 1, 0, crashes))
                    if offset > highest:  # in log order but for released records put back in front
                        highest = offset
                q.running[partition] = q.running.get(partition, 0) + room
                if highest + 1 > q.marks.get(partition, -1):
                    raised[partition] = highest + 1
                if len(got) >= max_n:
                    break
        if raised:  # before any of them runs: a death from now on is counted against them
            self._client.commit_offsets(f"{q.group}.delivered", q.queue, raised)
            q.marks.update(raised)
        return got

    # -- settling ------------------------------------------------------------------------------------
    def _done(self, deliveries: Sequence[Delivery]) -> None:
        q = self._queues.get(deliveries[0].queue)
        if q is None or q.main is None:
            return
        finished: dict[int, list[int]] = {}  # partition: offsets, those of a revoked generation left out
        with q.lock:
            generation = q.generation
            for delivery in deliveries:
                partition, offset, taken_in = delivery.token
                if generation.get(partition, 0) == taken_in:
                    finished.setdefault(partition, []).append(offset)
            for partition, offsets in finished.items():
                if q.main.tracker.finished(partition, offsets):
                    q.running[partition] = max(0, q.running.get(partition, 0) - len(offsets))

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        self._done(deliveries)

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        q = self._queue(deliveries[0].queue)
        if front and not count_attempt and delay <= 0 and q.main is not None:  # a release: back in front, here
            with q.lock:
                for delivery in reversed(deliveries):
                    partition, offset, generation = delivery.token
                    buffer = q.main.buffers.get(partition)
                    if buffer is not None and q.generation.get(partition, 0) == generation:
                        headers = {ATTEMPTS: str(delivery.attempts - 1), CRASHES: str(delivery.crashes)}
                        buffer.appendleft(Record(partition, offset, delivery.body, headers))
                        q.running[partition] = max(0, q.running.get(partition, 0) - 1)
            return
        before = (lambda d: d.attempts) if count_attempt else (lambda d: d.attempts - 1)
        if delay > 0:
            due = repr(time.time() + delay)
            self._client.produce(q.delayed, [(d.body, {ATTEMPTS: str(before(d)), CRASHES: str(d.crashes), DUE: due},
                                              None) for d in deliveries])
        else:
            self._client.produce(q.queue, [(d.body, {ATTEMPTS: str(before(d)), CRASHES: str(d.crashes)},
                                            d.token[0]) for d in deliveries])
        self._done(deliveries)

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        self._client.produce(self._queue(delivery.queue).dlq, [(letter.envelope(), None, None)])
        self._done([delivery])

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        letters = dead_letters.live_letters(self._client, self._queue(queue))
        return sorted(letters, key=lambda letter: letter.failed_at, reverse=True)[:limit]

    def purge_dead_letters(self, queue: str) -> int:
        return dead_letters.purge(self._client, self._queue(queue))

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        """Append a tombstone of ``letter`` to the dead-letter topic (:mod:`.kafka_dead_letters`)."""
        try:
            return dead_letters.remove(self._client, self._queue(queue), letter)
        except self._client_errors as exc:
            raise self._translated(exc, f"removing a dead letter of queue {queue!r}") from exc

    # -- inspection ----------------------------------------------------------------------------------
    def _size(self, queue: str) -> int:
        q, total = self._queue(queue), 0
        for topic, group, suffix in ((queue, q.main, ""), (q.delayed, q.delay, ".delay")):
            starts, ends = log_span(self._client, topic, q.group + suffix)
            for partition, end in ends.items():
                taken = group.tracker.next_offset(partition) if group is not None else None
                if taken is None:
                    total += end - starts[partition]
                else:
                    total += max(0, end - taken) + len(group.buffers.get(partition, ()))  # type: ignore[union-attr]
            if group is not None and topic == q.delayed:
                total += len(q.heap)
        return total

    def _purge(self, queue: str) -> int:
        q, count = self._queue(queue), self._size(queue)
        for topic, group, suffix in ((queue, q.main, ""), (q.delayed, q.delay, ".delay")):
            _, ends = log_span(self._client, topic, q.group + suffix)
            foreign = dict(ends)
            if group is not None:
                held = [token for name, token in self.held() if name == queue] if group is q.main else []
                with q.lock:
                    for partition in group.tracker.owned():
                        end = foreign.pop(partition, None)
                        if end is None:
                            continue
                        group.buffers.get(partition, deque()).clear()
                        group.tracker.skip_to(partition, end, [offset for p, offset, _ in held if p == partition])
                        group.seeks[partition] = end
                    if topic == q.delayed:
                        q.heap.clear()
            if foreign:
                try:
                    self._client.commit_offsets(q.group + suffix, topic, foreign)
                except self._client_errors as exc:
                    logger.warning("purging %s: partitions %s are owned by running consumers and were not purged "
                                   "(%s)", topic, sorted(foreign), type(exc).__name__)
        return count

    def _stop_fetching(self, queue: str) -> None:
        q = self._queues.get(queue)
        if q is not None and q.main is not None:
            with q.lock:
                for buffer in q.main.buffers.values():
                    buffer.clear()  # not handed out: uncommitted, read again by the next owner
            self._housekeeping(q)

    def _stopped_consuming(self, queue: str) -> None:
        """A graceful stop is over: commit what finished during it, lower the delivered marks and leave the
        groups (:meth:`_let_go`). Acks are bookkeeping that the next fetch commits, and a stopped consumer
        fetches no more: without this the calls that finished during the stop ran again after a restart,
        as deaths (one by one, counted towards ``max_crash_redeliveries``), once the group gave up waiting
        for the member that never left."""
        q = self._queues.get(queue)
        if q is not None and q.main is not None:
            self._let_go(q)

    def _let_go(self, q: QueueState) -> None:
        """Stop the delay mover, hand the partitions over (commit, lower the marks) and leave both groups;
        a later consume of ``q`` in this process joins again."""
        q.stop.set()
        if q.mover is not None:
            q.mover.join(WAIT_SLICE + 10)
        for group, delay in ((q.main, False), (q.delay, True)):
            if group is None or group.consumer is None:
                continue
            owned = group.tracker.owned()
            try:
                hand_over(self._client, q, group, owned, delay=delay)
            except Exception as exc:  # noqa: BLE001 - the next owner reads from the last commit
                logger.warning("%s: committing %s on close failed (%s); its finished calls may run again",
                               self._where(), q.queue, exc)
            finally:
                group.consumer.close()
            if not delay:
                with q.lock:  # acks of records still out (calls past the grace) are ignored from now on
                    for partition in owned:
                        q.generation[partition] = q.generation.get(partition, 0) + 1
        with q.lock:
            q.main = q.delay = q.mover = None
            q.running.clear()
            q.crash_until.clear()
            q.heap = []
            q.stop = threading.Event()

    def _close(self) -> None:
        queues, self._queues = list(self._queues.values()), {}
        for q in queues:
            self._let_go(q)
        client, self._client_obj = self._client_obj, None
        if client is not None:
            client.close()
