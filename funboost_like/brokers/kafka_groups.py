"""A Kafka queue's group subscriptions (for :mod:`.kafka_base`): joining a group, taking over the
partitions it assigns, polling the records not taken yet, and committing what is done.

A queue has two subscriptions in a process that consumes it: its topic ``q`` (group
``funboost_like.q``) and its delay topic ``q.fl-delay`` (group ``funboost_like.q.delay``, the
``delay=True`` one). Only the first keeps delivered marks (group ``funboost_like.q.delivered``) and
so counts deaths; a revoke of the second drops the delayed records of those partitions from memory.
Each subscription is polled, settled and committed by one thread at a time (its fetcher).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque

from funboost_like.brokers.kafka_client import KafkaClient, Record
from funboost_like.brokers.kafka_queue import GroupState, QueueState

logger = logging.getLogger("funboost_like.kafka")

WAIT_SLICE = 0.2  # a wait polls at most this long (commits go out between two polls)
COMMIT_EVERY = 0.1  # seconds between two commits of a busy group (an idle one commits at once)


def subscribe(client: KafkaClient, topic: str, group_id: str, q: QueueState, *, delay: bool) -> GroupState:
    """Join ``group_id`` on ``topic``. A revoke hands its partitions over (:func:`hand_over`): later acks
    of their records are ignored, the new owner runs them."""
    group = GroupState()

    def on_revoke(partitions: list[int]) -> None:
        with q.lock:
            for partition in partitions:
                group.buffers.pop(partition, None)
                if not delay:
                    q.generation[partition] = q.generation.get(partition, 0) + 1
                    q.running.pop(partition, None)
            if delay:
                q.heap = [entry for entry in q.heap if entry[2] not in partitions]
                heapq.heapify(q.heap)
        hand_over(client, q, group, partitions, delay=delay)

    group.consumer = client.group_consumer(topic, group_id, group.fresh.extend, on_revoke)
    return group


def hand_over(client: KafkaClient, q: QueueState, group: GroupState, partitions: list[int], *, delay: bool) -> None:
    """Give up ``partitions`` (a revoke, a close): commit their progress and forget them.

    The group refuses that commit when it rebalanced meanwhile (a slow member, a coordinator under
    load). Then what the group holds stays the position: the delivered marks come down to it, so the
    next owner runs the rest again as new work rather than as deaths (a rebalance must never count
    towards ``max_crash_redeliveries``), and this process keeps its positions as owed: if the
    partitions come back to it, it resumes there instead of running its finished calls again.
    """
    with q.lock:
        held = group.tracker.committed_positions(partitions)
        positions = group.tracker.revoke(partitions)
    logger.debug("queue %r%s: partitions %s handed over at %s", q.queue, " (delays)" if delay else "", partitions,
                 positions)
    if commit(client, q, group, positions):
        landed = positions
    else:  # refused: the group keeps what it held; this process resumes at its positions if they come back
        landed = held
        group.owed.update(positions)
    if not delay:
        lower_marks(client, q, landed)


def commit(client: KafkaClient, q: QueueState, group: GroupState, positions: dict[int, int]) -> bool:
    """Commit ``positions`` as the group's member; False when the group fenced this member off."""
    if not positions or group.consumer is None:
        return True
    if not group.consumer.commit(positions):  # fenced off: the next poll joins again
        logger.info("queue %r: the group rebalanced before this commit; joining it again", q.queue)
        return False
    group.tracker.committed(positions)
    return True


def lower_marks(client: KafkaClient, q: QueueState, positions: dict[int, int]) -> None:
    """Bring the delivered marks down to ``positions``: the records still held were not lost to a death,
    so the next owner runs them as new."""
    lowered = {p: pos for p, pos in positions.items() if q.marks.get(p, -1) != pos}
    if lowered:
        client.commit_offsets(f"{q.group}.delivered", q.queue, lowered)
        q.marks.update(lowered)


def set_up(client: KafkaClient, q: QueueState, group: GroupState, *, delay: bool) -> None:
    """Take over newly assigned partitions: their committed offsets and (main topic) delivered marks."""
    fresh, group.fresh[:] = list(group.fresh), []
    assert group.consumer is not None
    committed = group.consumer.committed(fresh)
    marks = {} if delay else client.group_offsets(f"{q.group}.delivered", q.queue, fresh)
    with q.lock:
        for partition in fresh:
            start, owed = committed.get(partition, -1), group.owed.pop(partition, -1)
            group.tracker.assign(partition, start)
            if owed > start:  # this process finished up to there before a refused hand-over: settle commits it
                group.tracker.skip_to(partition, owed)
                start = owed
            group.buffers[partition] = deque()
            if not delay:
                mark = marks.get(partition, -1)
                q.marks[partition] = mark
                if mark > max(start, 0):
                    q.crash_until[partition] = mark
    logger.debug("queue %r%s: partitions %s assigned at %s (delivered marks %s)", q.queue, " (delays)" if delay else "",
                 fresh, committed, marks)


def poll(client: KafkaClient, q: QueueState, group: GroupState, max_n: int, timeout: float, *,
         delay: bool) -> list[Record]:
    """Up to ``max_n`` records this process has not taken yet, blocking at most ``timeout`` seconds
    (partitions assigned during the poll are set up first)."""
    assert group.consumer is not None
    records = group.consumer.poll(max_n, timeout)
    if group.fresh:
        set_up(client, q, group, delay=delay)
    taken: list[Record] = []
    by_partition: dict[int, list[Record]] = {}
    for record in records:
        by_partition.setdefault(record.partition, []).append(record)
    for partition, items in by_partition.items():
        fresh = set(group.tracker.taken(partition, [r.offset for r in items]))
        taken += [r for r in items if r.offset in fresh]
    return taken


def settle(client: KafkaClient, q: QueueState, group: GroupState) -> None:
    """Apply the seeks purges asked for, then commit what is done: at once when nothing taken is still
    running, else at most every ``COMMIT_EVERY`` seconds (one round trip per batch of calls would
    cost a third of the consume rate; a death repeats at most that much more finished work)."""
    assert group.consumer is not None
    if group.seeks:
        seeks, group.seeks = group.seeks, {}
        for partition, offset in seeks.items():
            group.consumer.seek(partition, offset)
    now = time.monotonic()
    if now - group.committed_at >= COMMIT_EVERY or not group.tracker.running():
        due = group.tracker.due()
        if due:
            commit(client, q, group, due)
            group.committed_at = now
