"""Offset bookkeeping for log brokers (Kafka): what may be committed, partition by partition.

A consumer group commits one offset per partition: every record below it counts as done. Calls of
one partition finish out of order, so :class:`OffsetTracker` keeps, per partition this process owns,
the offsets it took from the log and has not finished yet, and commits **the lowest unfinished
offset** (or, when none is left, one past the highest taken): the highest contiguous finished
position. Guarantees:

* nothing unfinished is ever below a committed offset, so a consumer that dies loses nothing: the
  next owner of the partition reads again from there (at-least-once);
* on a revoke, :meth:`OffsetTracker.revoke` returns the positions to commit before the partition
  moves, and forgets the partition: a later :meth:`finished` of one of its offsets is ignored (the
  new owner runs that record again), so finished work is not repeated by a rebalance;
* records below :meth:`floor` (a purge moved it) are to be dropped by the caller.

Thread-safe: consumers' threads finish offsets while the fetching thread takes and commits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class _Partition:
    __slots__ = ("pending", "next", "committed", "floor")

    def __init__(self, start: int) -> None:
        self.pending: set[int] = set()  # taken from the log, not finished
        self.next = start  # one past the highest offset taken (or the start)
        self.committed = start  # the last position committed (or read from the group at assignment)
        self.floor = start  # records below it are not taken (a purge moved it)

    def position(self) -> int:
        return min(self.pending) if self.pending else self.next


class OffsetTracker:
    """Per owned partition: offsets taken and not finished; the position safe to commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[int, _Partition] = {}

    def assign(self, partition: int, committed: int) -> None:
        """This process owns ``partition`` from now on; the group's committed position is ``committed``."""
        with self._lock:
            self._partitions[partition] = _Partition(max(committed, 0))

    def owned(self) -> list[int]:
        with self._lock:
            return list(self._partitions)

    def running(self) -> bool:
        """Whether some offset taken is not finished yet."""
        with self._lock:
            return any(state.pending for state in self._partitions.values())

    def owns(self, partition: int) -> bool:
        return partition in self._partitions

    def taken(self, partition: int, offsets: Iterable[int]) -> list[int]:
        """Record offsets read from the log; return those to use (owned partition, not below the floor)."""
        with self._lock:
            state = self._partitions.get(partition)
            if state is None:
                return []
            fresh = [offset for offset in offsets if offset >= state.floor and offset not in state.pending]
            if fresh:
                state.pending.update(fresh)
                state.next = max(state.next, fresh[-1] + 1, max(fresh) + 1)
            return fresh

    def finished(self, partition: int, offsets: Iterable[int]) -> bool:
        """Mark offsets done; False when the partition is no longer owned (the call is then ignored)."""
        with self._lock:
            state = self._partitions.get(partition)
            if state is None:
                return False
            state.pending.difference_update(offsets)
            return True

    def skip_to(self, partition: int, end: int, keep: Iterable[int] = ()) -> int:
        """Purge: everything below ``end`` counts as done except the offsets in ``keep`` (held by running
        calls); return how many taken-but-unfinished offsets were dropped."""
        keep = set(keep)
        with self._lock:
            state = self._partitions.get(partition)
            if state is None:
                return 0
            dropped = {offset for offset in state.pending if offset < end and offset not in keep}
            state.pending -= dropped
            state.next, state.floor = max(state.next, end), max(state.floor, end)
            return len(dropped)

    def floor(self, partition: int) -> int:
        state = self._partitions.get(partition)
        return state.floor if state is not None else 0

    def next_offset(self, partition: int) -> int | None:
        """One past the highest offset taken from ``partition`` (None when not owned)."""
        state = self._partitions.get(partition)
        return state.next if state is not None else None

    def due(self) -> dict[int, int]:
        """Positions that moved since they were last committed: {partition: offset to commit}."""
        with self._lock:
            return {p: pos for p, state in self._partitions.items() if (pos := state.position()) != state.committed}

    def committed(self, offsets: dict[int, int]) -> None:
        """Note that ``offsets`` were committed."""
        with self._lock:
            for partition, offset in offsets.items():
                state = self._partitions.get(partition)
                if state is not None:
                    state.committed = offset

    def committed_positions(self, partitions: Iterable[int]) -> dict[int, int]:
        """The last position committed (or read at assignment) of each owned partition of ``partitions``."""
        with self._lock:
            return {p: self._partitions[p].committed for p in partitions if p in self._partitions}

    def revoke(self, partitions: Iterable[int]) -> dict[int, int]:
        """Forget ``partitions``; return the position of each, to commit before it moves to another owner."""
        with self._lock:
            gone = [(p, self._partitions.pop(p)) for p in partitions if p in self._partitions]
        return {p: state.position() for p, state in gone}

    def clear(self) -> dict[int, int]:
        """Forget every partition (closing); return their positions to commit."""
        return self.revoke(self.owned())
