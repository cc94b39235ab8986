"""Delayed records of a Kafka queue (for :mod:`.kafka_base`): the topic ``q.fl-delay`` and its mover.

A delayed record (``not_before``, ``nack(delay=...)``, a retry with backoff) carries its due time
(UNIX seconds) in the header ``fl-due``. Every process that owns partitions of ``q`` runs one mover
thread: it reads its share of the delay topic (group ``funboost_like.q.delay``) into ``q.heap`` and
appends each record to ``q`` when due, without ``fl-due`` and with its other headers. A delay record
is marked done once appended, so a killed process's delayed records are read again by another (one
may then be appended twice: at-least-once).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable

from funboost_like.brokers.kafka_client import KafkaClient
from funboost_like.brokers.kafka_groups import WAIT_SLICE, poll, settle, subscribe
from funboost_like.brokers.kafka_queue import DUE, QueueState

logger = logging.getLogger("funboost_like.kafka")

Partitioner = Callable[[QueueState], int]  # the partition of ``q`` the next record goes to


def start_mover(client: KafkaClient, q: QueueState, partition: Partitioner) -> None:
    """Join the delay group of ``q`` and start its mover thread (once; it runs until ``q.stop`` is set)."""
    q.delay = subscribe(client, q.delayed, f"{q.group}.delay", q, delay=True)
    q.mover = threading.Thread(target=run_mover, args=(client, q, partition), daemon=True,
                               name=f"funboost_like-kafka-delay-{q.queue}")
    q.mover.start()


def run_mover(client: KafkaClient, q: QueueState, partition: Partitioner) -> None:
    """The mover thread: the only user of the delay group's consumer until ``q.stop`` is set."""
    while not q.stop.is_set():
        try:
            move_due(client, q, partition)
        except Exception as exc:  # noqa: BLE001 - logged; tried again
            logger.warning("moving due delayed records of %s failed (%s); retrying", q.queue, exc)
            q.stop.wait(1.0)


def move_due(client: KafkaClient, q: QueueState, partition: Partitioner) -> None:
    """One round: read new delayed records (waiting at most until the next is due), append the due
    ones to ``q`` and mark them done."""
    group = q.delay
    assert group is not None
    wait = min(WAIT_SLICE, max(0.0, q.heap[0][0] - time.time())) if q.heap else WAIT_SLICE
    for record in poll(client, q, group, 1000, wait, delay=True):
        with q.lock:
            heapq.heappush(q.heap, (float(record.headers.get(DUE, 0)), record.offset, record.partition, record))
    now, due = time.time(), []
    with q.lock:
        while q.heap and q.heap[0][0] <= now:
            due.append(heapq.heappop(q.heap)[3])
    if due:
        items = [(r.value, {k: v for k, v in r.headers.items() if k != DUE}, partition(q)) for r in due]
        client.produce(q.queue, items)
        for record in due:
            group.tracker.finished(record.partition, [record.offset])
    settle(client, q, group)
