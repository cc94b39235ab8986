"""The files of one PERSISTQUEUE queue (``SQLITE_FILES_PER_QUEUE``), as one process sees them.

A queue spread over N files has file 0, ``<stem>.sqlite3`` (the only file when N is 1, so a queue
keeps its one file), and the extra files ``<stem>+1.sqlite3`` ... (see :func:`queue_file_name`).
This module holds what the broker needs to treat them as one queue:

* :class:`QueueFile`: one file's path, index and cached earliest due time; it makes the tokens of
  its rows (the row id in file 0, ``(index, row id)`` in another), so a settlement finds its file;
* :class:`FileSet`: the files of a queue: those this process is configured for plus any more that
  file 0 records (``PRAGMA user_version`` of file 0 holds the most files any process spread the
  queue over), the rotation a publish follows and the order a fetch claims in;
* :meth:`FileSet.claims` and :func:`merged`: how many rows a fetch
  claims from each file so that it takes the first ``max_n`` messages of the files merged by priority
  (higher first), then time, and the claimed rows in that merged order.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from funboost_like.brokers.base import Delivery
from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.sqlite_files import queue_file_name, write_transaction


class QueueFile:
    """Process-local state of one file of a queue: the earliest due time of its delayed messages, as last
    seen (only a cache: a stale value delays a due message by at most the broker's recheck, never loses it)."""

    __slots__ = ("path", "index", "next_due", "due_checked")

    def __init__(self, path: str, index: int = 0) -> None:
        self.path = path
        self.index = index
        self.next_due = math.inf
        self.due_checked = -math.inf

    def expect_due(self, due: float) -> None:
        """A delayed message due at ``due`` was written by this process."""
        if due < self.next_due:
            self.next_due = due

    def token(self, row_id: int) -> Any:
        """The delivery token of row ``row_id`` of this file."""
        return row_id if self.index == 0 else (self.index, row_id)


class FileSet:
    """The files of one queue: ``files[k]`` is file k (see the module docstring). Thread-safe."""

    __slots__ = ("folder", "name", "configured", "files", "checked", "_lock", "_publishes", "_fetches")

    def __init__(self, folder: Path, name: str) -> None:
        """This process's file count is the ``SQLITE_FILES_PER_QUEUE`` setting (``MIDDLEWARE_NUM`` is its
        second name)."""
        configured = settings.get("SQLITE_FILES_PER_QUEUE")
        if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
            raise ConfigurationError(f"SQLITE_FILES_PER_QUEUE must be a whole number of at least 1, not {configured!r}")
        self.folder = folder
        self.name = name
        self.configured = configured
        self.files = [QueueFile(str(folder / queue_file_name(name, k)), k) for k in range(configured)]
        self.checked = -math.inf  # when file 0's record of the file count was last read
        self._lock = threading.Lock()
        start = random.randrange(configured)  # processes do not all start writing the same file
        self._publishes = itertools.count(start)
        self._fetches = itertools.count(start)

    def file(self, index: int) -> QueueFile:
        """File ``index`` (known to this process from now on)."""
        if index >= len(self.files):
            self.seen(index + 1, self.checked)
        return self.files[index]

    def recount(self, conn: sqlite3.Connection, now: float) -> list[QueueFile]:
        """Read the file count recorded in file 0 (``conn``), first raising it to this process's count;
        return the files."""
        recorded = conn.execute("PRAGMA user_version").fetchall()[0][0]
        if self.configured > max(recorded, 1):
            with write_transaction(conn):
                recorded = conn.execute("PRAGMA user_version").fetchall()[0][0]
                if self.configured > recorded:
                    conn.execute(f"PRAGMA user_version = {self.configured}")
        self.seen(recorded, now)
        return self.files

    def seen(self, recorded: int, now: float) -> None:
        """File 0 records ``recorded`` files (read at ``now``): fetches read that many from now on."""
        with self._lock:
            known = len(self.files)
            if recorded > known:
                self.files = [*self.files, *(QueueFile(str(self.folder / queue_file_name(self.name, k)), k)
                                             for k in range(known, recorded))]
            self.checked = now

    def for_publish(self) -> QueueFile:
        """The file the next publish (or batch) writes: this process's rotation over the configured files."""
        return self.files[next(self._publishes) % self.configured]

    def claims(self, heads: Sequence[Sequence[tuple[int, float]]], max_n: int) -> list[tuple[int, int]]:
        """(file index, rows to claim) for a fetch of ``max_n`` whose files' heads are ``heads``, starting
        at a rotating file, so that the consumers of a queue do not all take the same file's write lock first.

        ``heads[k]``: the (priority, visible since) of the first ready rows of file k, in the file's order;
        each file claims as many rows as it holds among the first ``max_n`` rows of all files, by priority
        (higher first) then time."""
        counts = [0] * len(heads)
        keys = [(-priority, since, k) for k, rows in enumerate(heads) for priority, since in rows]
        for _, _, k in heapq.nsmallest(max_n, keys):
            counts[k] += 1
        start = next(self._fetches)
        return [(k, counts[k]) for k in ((start + i) % len(counts) for i in range(len(counts))) if counts[k]]


def by_file(deliveries: Sequence[Delivery]) -> dict[tuple[str, int], list[int]]:
    """The row ids of ``deliveries`` grouped by (queue, file index)."""
    groups: dict[tuple[str, int], list[int]] = {}
    for delivery in deliveries:
        token = delivery.token
        if type(token) is int:
            groups.setdefault((delivery.queue, 0), []).append(token)
        else:
            groups.setdefault((delivery.queue, token[0]), []).append(token[1])
    return groups


def merged(queue: str, files: FileSet, claimed: dict[int, list[Any]], heads: Sequence[Sequence[Any]]) -> list[Delivery]:
    """The deliveries of the rows ``claimed[k]`` (id, body, attempts, priority, crashes) of each file k,
    merged by priority (higher first), then the time of the head of ``heads[k]`` each took the place of
    (in the file's order: priority, then id), then file."""
    got = [(-priority, head[1], k, row_id, Delivery(queue, body, files.files[k].token(row_id), attempts, priority,
                                                   crashes))
           for k, rows in claimed.items()
           for (row_id, body, attempts, priority, crashes), head  # no more rows than heads (LIMIT counts[k])
           in zip(sorted(rows, key=lambda row: (-row[3], row[0])), heads[k], strict=False)]
    got.sort(key=lambda row: row[:4])
    return [row[4] for row in got]
