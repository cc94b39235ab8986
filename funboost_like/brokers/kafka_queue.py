"""A Kafka queue's state in one process (for :mod:`.kafka_base`): its group members, offset trackers,
buffers of records not handed out yet, delivered marks, and the delayed records waiting in memory."""

from __future__ import annotations

import itertools
import threading
from collections import deque

from funboost_like.brokers.kafka_client import GroupConsumer, Record
from funboost_like.brokers.offset_tracker import OffsetTracker
from funboost_like.core.config import settings

ATTEMPTS, CRASHES, DUE = "fl-attempts", "fl-crashes", "fl-due"  # record headers: runs and deaths before, due time


class GroupState:
    """One subscription of this process (a queue's topic, or its delay topic) and its bookkeeping."""

    def __init__(self, consumer: GroupConsumer | None = None) -> None:
        self.consumer = consumer
        self.tracker = OffsetTracker()
        self.fresh: list[int] = []  # assigned, not set up yet
        self.buffers: dict[int, deque[Record]] = {}
        self.seeks: dict[int, int] = {}
        self.owed: dict[int, int] = {}  # positions a refused hand-over could not commit: resumed if reassigned
        self.committed_at = 0.0  # time.monotonic() of the last commit that settle sent


class QueueState:
    """A queue's names on the server and what this process keeps for it."""

    def __init__(self, queue: str, partitions: list[int]) -> None:
        self.queue, self.group = queue, f"funboost_like.{queue}"
        self.delayed, self.dlq = f"{queue}.fl-delay", f"{queue}.dlq"
        self.partitions = partitions  # the ones publishers use
        self.turn = itertools.count()
        self.lock = threading.RLock()
        self.main: GroupState | None = None
        self.delay: GroupState | None = None
        self.heap: list[tuple[float, int, int, Record]] = []  # (due, offset, partition, record)
        self.crash_until: dict[int, int] = {}
        self.marks: dict[int, int] = {}  # the delivered marks committed
        self.running: dict[int, int] = {}
        self.generation: dict[int, int] = {}
        self.mover: threading.Thread | None = None
        self.stop = threading.Event()
        self.ordered = queue in {name.strip() for name in str(settings.get("KAFKA_ORDERED_QUEUES")).split(",")}


def counts(record: Record) -> tuple[int, int]:
    """(runs, deaths) before this record's delivery, from its headers (0, 0 for a first one)."""
    headers = record.headers
    return int(headers.get(ATTEMPTS, 0)), int(headers.get(CRASHES, 0))
