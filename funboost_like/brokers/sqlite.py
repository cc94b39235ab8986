"""PERSISTQUEUE: durable queues in embedded SQLite files; the framework's default broker.

Guarantee: at-least-once. A fetched message is leased to its consumer process (``visible_at`` is
pushed into the future and ``owner`` names the process); a daemon thread renews the leases of
every message the process holds every ``lease / 3`` seconds. A message is removed only by
:meth:`SqliteBroker.ack`, ``nack(requeue=False)`` or :meth:`SqliteBroker.dead_letter`. When the
process dies (even by SIGKILL) renewal stops and its messages become fetchable again after at most
the lease; a long-running call is never redelivered while its process lives and renews.

Settings used:

* ``SQLITE_QUEUES_PATH``: the folder of the queue files (empty: ``<per-user data dir>/sqlite_queues``);
  created on first use, never at import or construction.
* ``SQLITE_LEASE_SECONDS``: the lease; a killed consumer's messages come back after at most this long.
* ``SQLITE_BUSY_TIMEOUT_SECONDS``: how long a statement waits for another process's write lock.
* ``SQLITE_SYNCHRONOUS``: ``OFF``, ``NORMAL``, ``FULL`` or ``EXTRA`` (SQLite's ``PRAGMA synchronous``).
* ``SQLITE_FILES_PER_QUEUE`` (second name ``MIDDLEWARE_NUM``, the seed's): how many files each queue is
  spread over (default 1), so that processes publishing and consuming at once take different files'
  write locks (see "Several files per queue" below).

Capabilities: ack, persistent, delay, priority (higher first, then FIFO), cross_process, dead_letters,
emulated routing.
Not cross_host: the files must be on a local disk (WAL needs shared memory; never a network share).

Durability: the files are in WAL mode. With ``synchronous=NORMAL`` (the default) every committed
publish or ack survives a crash of any process; with ``FULL`` it also survives power loss or an OS
crash, at the cost of an fsync per commit.

Layout: one database file per queue, ``<folder>/<safe name>.sqlite3`` (see :func:`queue_file_name`;
plus ``<safe name>+1.sqlite3`` ... when the queue is spread over several files), each with the tables
``messages`` (ready and leased messages), ``delayed`` (messages not due yet, published with
``not_before`` or nacked with a delay, indexed by due time) and ``dead_letters`` (the schema and the
statements are :mod:`.sqlite_tables`). Row ids come from
AUTOINCREMENT and are never reused, so a stale token can never touch a newer message.

Delayed messages: a fetch moves the due rows of ``delayed`` into ``messages`` (at the back of their
priority, as a new row) in one transaction, but only when the earliest due time says something is
due. Each process caches that earliest due time per queue (lowered at once by its own delayed
publishes and nacks) and re-reads ``SELECT min(due)`` at most every 50 ms to see other processes'
ones; so any number of far-future messages costs a fetch nothing, and a waiting fetch picks up a
delayed message within about 50 ms of it being due (at once when it was published in the same
process). Files written by earlier versions may hold delayed rows in ``messages`` (``visible_at`` in
the future); they are still delivered when due.

Routing (exchanges and routing keys, emulated; see docs/routing.md): the bindings of every exchange
are rows of the table ``bindings`` in ``<folder>/@exchanges.sqlite3`` (``@`` never starts a queue's
or a store's file name), created by the first bind (or routed publish). A bind inserts its new rows
in one transaction, so an exchange keeps the type it was first declared with, whichever process
binds. A routed publish reads the bindings, then writes to the matching queue files with
:meth:`SqliteBroker._put_many`: it begins a write transaction on every file (in queue name order, so
two routed publishes never wait on each other in a cycle), inserts the rows into each (``messages``,
or ``delayed`` for ``not_before``), and commits them one by one only once every insert succeeded.
What holds:

* an error before the first commit (a file locked past the busy timeout, disk full, a bad file)
  rolls every file back: no queue gets the message and the publish raises;
* after the publish returns, every matching queue has it;
* a process killed (or a commit failing, e.g. on an I/O error) between two commits leaves the
  message in the queues whose files were committed and not in the others, and nothing repairs that.
  This is also what an ``ATTACH``-ed multi-file transaction gives in WAL mode (atomic per file, not
  as a set, after a crash), so one connection per file is used, with no limit on the number of
  queues (SQLite attaches at most 10 files) and each queue file's own connection, already open;
* the commits follow one another, so for the time of one commit a consumer of a queue already
  committed may run the message while another queue does not show it yet.

Each commit writes that queue's WAL file, so a consumer waiting on a routed queue wakes at once.

Several files per queue (``SQLITE_FILES_PER_QUEUE`` = N > 1; the code is in
:mod:`funboost_like.brokers.sqlite_file_set`): file 0 is the queue's usual file, so N = 1 is the
one-file layout and a queue made before keeps its messages; the extra files are
``<safe name>+<k>.sqlite3``. What changes, and what holds:

* a publish, or a whole ``publish_many`` batch, or a delayed publish, writes one file: the next of its
  process's rotation over the N files (starting at a random one); a routed publish writes one file of
  each matching queue, as above;
* a fetch of ``max_n`` reads the keys (priority, time since visible) of the first ``max_n`` ready rows
  of every file, merges them, and claims from each file as many rows as it has among the first
  ``max_n`` (each file's claim is the usual one-statement claim of its first rows, so no two
  consumers ever claim one row), starting at a rotating file; the batch comes back in the merged
  order. So, for one consumer, **messages come out highest priority first, then in order of the time
  they became ready** (publish time; due time for a delayed message; the time of the nack for a
  nacked one; a released one comes first, as with one file), whichever files hold them: the
  order of one file is kept, and across files the order is that of the publish clocks of the
  processes (one host, so one clock). Consumers fetching at the same time share the first messages
  between them, as with one file. A fetch costs N reads and one claim per file that has a share, and
  an ack one write per file of the batch, so N > 1 pays off only when waiting for the write lock,
  not CPU, is what limits (see docs/performance.md);
* a token names its file (the row id in file 0, ``(k, row id)`` in file k), so acks, nacks, releases,
  dead letters and lease renewals go to the row's own file; leases, crash counting and delays work per
  file exactly as with one file; ``count`` and ``purge`` add up every file (one transaction per file);
  dead letters stay in the file of their message and are listed newest first over all files;
* an idle fetch watches the WAL files of all N files at once (one inotify instance), so a publish to any
  of them wakes it as with one file;
* changing N while messages wait loses none: ``PRAGMA user_version`` of file 0 holds the most files any
  process spread the queue over (raised before a process first writes another file), and every process
  re-reads it at least every second and fetches from (and counts, purges) that many files. A process
  with a smaller N thus drains the extra files; they are never deleted (another process may still
  write them).

Contract notes: times are wall-clock UNIX times shared by all processes (a clock jump moves leases
and due times); changing ``SQLITE_QUEUES_PATH`` while messages are in flight is not supported.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import astuple
from pathlib import Path
from typing import Any

from funboost_like.brokers import sqlite_tables as tables
from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.file_watch import FileWatch
from funboost_like.brokers.routing import Binding, added_bindings
from funboost_like.brokers.sqlite_file_set import FileSet, QueueFile, by_file, merged
from funboost_like.core.config import data_dir_setting, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import BrokerNotAvailable, ConfigurationError
from funboost_like.core.sqlite_files import execute_by_ids, is_busy, write_transaction
from funboost_like.core.stores import SqliteKeyValueStore, check_namespace

logger = logging.getLogger("funboost_like.sqlite")

_PROMOTE_BATCH = 5000  # rows moved per transaction, so the write lock is held briefly
_DUE_RECHECK = 0.05  # seconds between reads of the earliest due time (other processes' delayed rows)
_FILES_RECHECK = 1.0  # seconds between reads of the file count recorded in file 0 (other processes' files)
_EXCHANGES_FILE = "@exchanges.sqlite3"  # the binding table's file: "@" never starts a queue's or a store's file
# Connections one thread keeps open (three descriptors each, with the WAL): a long-lived thread that
# publishes to, or renews leases in, ever more queues closes its oldest one beyond this.
_CONNECTIONS_PER_THREAD = 64


_ABANDONED: list[Any] = []  # thread-local state inherited from a parent process


def _close_oldest(conns: dict[str, sqlite3.Connection]) -> None:
    """Close the connection this thread opened first, unless it is in a transaction (a routed publish
    holds one per target queue until all commit)."""
    for path, conn in conns.items():
        if not conn.in_transaction:
            del conns[path]
            conn.close()
            return


def _order(row: tuple[int, bytes, int, int, int]) -> tuple[int, int]:
    return -row[3], row[0]


def _lease_seconds() -> float:
    lease = float(settings.get("SQLITE_LEASE_SECONDS"))
    if lease <= 0:
        raise ConfigurationError(f"SQLITE_LEASE_SECONDS must be positive, not {lease!r}")
    return lease


class SqliteBroker(Broker):
    """At-least-once queues in local SQLite files, shared by every process on the host.

    One instance serves a whole process (see the registry); every method is thread-safe. Each
    thread gets its own connection per queue file; a forked child never uses its parent's.
    """

    kind = BrokerEnum.PERSISTQUEUE
    capabilities = Capabilities(redelivery="lease", delay="native", max_priority=2**31, dead_letters=True,
                                key_value=True, routing="emulated", persistent=True, cross_process=True)
    errors = (sqlite3.Error, OSError)
    idle_fetch_seconds = 0.25  # an empty claim is a local statement of some 20 µs: a stop waits 0.25 s at most

    def __init__(self) -> None:
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise BrokerNotAvailable("the PERSISTQUEUE broker needs SQLite 3.35 or newer (for RETURNING); "
                                     f"this Python has {sqlite3.sqlite_version}")
        self._lock = threading.Lock()
        super().__init__()
        self._after_fork()

    def _retryable(self, exc: BaseException) -> bool:
        """A settlement refused with "database is locked" (another process held the file's write lock past
        the busy timeout) is sent again before the next fetch, its lease renewed meanwhile."""
        return isinstance(exc, sqlite3.OperationalError) and is_busy(exc)

    def _after_fork(self) -> None:
        """A new identity and new thread-local connections. The parent's connections stay referenced,
        never used nor closed here (closing one could checkpoint or delete the parent's WAL file)."""
        previous = getattr(self, "_local", None)
        if previous is not None:
            _ABANDONED.append(previous)
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._local = threading.local()
        self._sets: dict[tuple[Any, Any, str], FileSet] = {}  # a new publish rotation, from a new random file

    @property
    def owner(self) -> str:
        """The id this process writes into the ``owner`` column of the messages it holds."""
        return self._owner

    def _where(self) -> str:
        return f"the SQLite queue folder {data_dir_setting('SQLITE_QUEUES_PATH', 'sqlite_queues')}"

    # -- plumbing -------------------------------------------------------------------------------
    def _files(self, name: str) -> FileSet:
        key = (settings.get("SQLITE_QUEUES_PATH"), settings.get("SQLITE_FILES_PER_QUEUE"), name)
        files = self._sets.get(key)
        if files is None:
            new = FileSet(data_dir_setting("SQLITE_QUEUES_PATH", "sqlite_queues"), name)
            with self._lock:
                files = self._sets.setdefault(key, new)
        return files

    def _every_file(self, name: str) -> list[QueueFile]:
        """The files of ``name``, file 0's record of their count read now."""
        files = self._files(name)
        return files.recount(self._conn(files.files[0]), time.time())

    def _publish_file(self, name: str) -> QueueFile:
        """The file a publish to ``name`` writes: file 0, or the next of this process's rotation."""
        files = self._files(name)
        if files.checked < 0:  # the file count is recorded in file 0 before any other file is written
            files.recount(self._conn(files.files[0]), time.time())
        return files.for_publish()

    def _conn(self, q: QueueFile, schema: tuple[str, ...] = tables.SCHEMA) -> sqlite3.Connection:
        try:
            conns: dict[str, sqlite3.Connection] = self._local.conns
        except AttributeError:
            conns = self._local.conns = {}
        conn = conns.get(q.path)
        if conn is None:
            if len(conns) >= _CONNECTIONS_PER_THREAD:
                _close_oldest(conns)
            conn = conns[q.path] = tables.connect(q.path, schema)
        return conn

    def path(self, queue: str) -> Path:
        """The database file of ``queue`` (file 0 when it is spread over several; it may not exist yet)."""
        return Path(self._files(queue).files[0].path)

    def key_value_store(self, queue: str, namespace: str) -> SqliteKeyValueStore:
        """The store file beside the queue's: ``<folder>/<queue file stem>@<namespace>.sqlite3``.

        ``@`` never occurs in a queue file name, so a store file can never be some queue's file.
        """
        queue_path = self.path(queue)
        path = str(queue_path.with_name(f"{queue_path.name[:-len('.sqlite3')]}@{check_namespace(namespace)}.sqlite3"))
        return self._kv_store(path, lambda: SqliteKeyValueStore(path))

    # -- primitives ------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        if len(bodies) != 1 or not_before is not None:  # a batch or a delayed message: one transaction
            return self._put_many((queue,), bodies, priority=priority, not_before=not_before)
        body = bodies[0]
        self._conn(self._publish_file(queue)).execute(tables.INSERT, (int(priority), time.time(),
                                                                       body if type(body) is bytes else bytes(body)))

    def _put_many(self, queues: Sequence[str], bodies: Sequence[bytes], *, priority: int,
                  not_before: float | None) -> None:
        """Insert into one file of every queue, committing only once all inserts succeeded (see the module
        docstring)."""
        now = time.time()
        due = float(not_before) if not_before is not None and float(not_before) > now else None
        sql, at = (tables.INSERT, now) if due is None else (tables.INSERT_DELAYED, due)
        rows = [(int(priority), at, body if type(body) is bytes else bytes(body)) for body in bodies]
        targets = [self._publish_file(name) for name in sorted(queues)]
        if len(targets) == 1:  # publish_many or a delayed publish
            with write_transaction(self._conn(targets[0])) as conn:
                conn.executemany(sql, rows)
        else:
            with ExitStack() as transactions:  # write locks taken in name order, commits in reverse order
                for target in targets:
                    transactions.enter_context(write_transaction(self._conn(target))).executemany(sql, rows)
        for target in targets if due is not None else ():
            target.expect_due(at)

    def _bind(self, bindings: Sequence[Binding]) -> None:
        """Insert the new rows in one transaction (an exchange keeps the type it was first declared with)."""
        with write_transaction(self._exchanges()) as conn:
            existing = [Binding(*row) for row in conn.execute(tables.BINDINGS, (bindings[0].exchange,))]
            conn.executemany("INSERT INTO bindings VALUES (?,?,?,?)", map(astuple, added_bindings(existing, bindings)))

    def _bindings(self, exchange: str) -> list[Binding]:
        return [Binding(*row) for row in self._exchanges().execute(tables.BINDINGS, (exchange,))]

    def _exchanges(self) -> sqlite3.Connection:
        """This thread's connection to the binding table (its file is created by the first bind or routed publish)."""
        return self._conn(QueueFile(str(data_dir_setting("SQLITE_QUEUES_PATH", "sqlite_queues") / _EXCHANGES_FILE)),
                          tables.BINDINGS_SCHEMA)

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        """Claim up to ``max_n`` ready messages, highest priority first, then oldest."""
        files = self._files(queue)
        now = time.time()
        if now - files.checked >= _FILES_RECHECK:
            files.recount(self._conn(files.files[0]), now)
        for q in files.files:
            self._promote_due(q, now)
        params = {"lease_until": now + _lease_seconds(), "owner": self._owner, "now": now, "n": max_n}
        if len(files.files) == 1:
            rows = self._conn(files.files[0]).execute(tables.CLAIM, params).fetchall()
            rows.sort(key=_order)  # RETURNING order is not guaranteed
            return [Delivery(queue, body, token, attempts, priority, crashes)
                    for token, body, attempts, priority, crashes in rows]
        # Several files: read the first ``max_n`` ready rows' keys of every file, then claim from each file as
        # many as it has among the first ``max_n`` of them all (see the module docstring).
        heads = [self._conn(q).execute(tables.HEADS, (now, max_n)).fetchall() for q in files.files]
        claimed = {k: self._conn(files.files[k]).execute(tables.CLAIM, {**params, "n": n}).fetchall()
                   for k, n in files.claims(heads, max_n)}
        return merged(queue, files, claimed, heads)

    def _promote_due(self, q: QueueFile, now: float) -> None:
        """Move the delayed messages due by ``now`` into ``messages``; take the write lock only when
        the earliest due time (an index lookup) says something is due. Nothing to do before the cached
        earliest due time, unless it is time to re-read it (other processes' delayed messages)."""
        if now < q.next_due and now - q.due_checked < _DUE_RECHECK:
            return
        conn = self._conn(q)
        if now < q.next_due:  # a periodic re-read, for delayed messages of other processes
            q.due_checked = now
            first = conn.execute(tables.NEXT_DUE).fetchall()[0][0]
            q.next_due = math.inf if first is None else float(first)
            if q.next_due > now:
                return
        params = {"now": now, "n": _PROMOTE_BATCH}
        with write_transaction(conn):
            conn.execute(tables.PROMOTE, params)
            conn.execute(tables.UNDELAY, params)
            first = conn.execute(tables.NEXT_DUE).fetchall()[0][0]
        q.due_checked = now
        q.next_due = math.inf if first is None else float(first)

    def _wait(self, queue: str, timeout: float) -> None:
        """Sleep until another process (or thread) writes one of the queue's files, a known delayed message
        is due, or ``timeout``: an inotify watch on each WAL file where the system has one."""
        files = self._files(queue).files
        watches: dict[tuple[str, ...], FileWatch] = self._local.__dict__.setdefault("watches", {})
        paths = tuple(q.path for q in files)
        watch = watches.get(paths)
        if watch is None:  # the caller fetches again before the next wait, so a write made before this is not missed
            for q in files:
                self._conn(q)  # the WAL file exists while a connection is open
            watches[paths] = FileWatch([path + "-wal" for path in paths])
            return
        watch.wait(max(0.001, min(timeout, min(q.next_due for q in files) - time.time())))

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete the messages (whoever holds them now)."""
        for (queue, k), ids in by_file(deliveries).items():
            execute_by_ids(self._conn(self._files(queue).file(k)), tables.DELETE, (), ids)

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        """Visible again: a released message keeps its id, so its place at the front; a nacked one is
        written anew at the back (or into ``delayed``). Skipped for a message whose lease ran out and
        that another consumer took meanwhile."""
        for (queue, k), ids in by_file(deliveries).items():
            q = self._files(queue).file(k)
            conn = self._conn(q)
            if front and not count_attempt and delay <= 0:
                execute_by_ids(conn, tables.RELEASE, (self._owner,), ids)
                continue
            due = time.time() + delay
            with write_transaction(conn):
                execute_by_ids(conn, tables.DELAY if delay > 0 else tables.REQUEUE, (due, self._owner), ids)
                execute_by_ids(conn, tables.DELETE_OWNED, (self._owner,), ids)
            if delay > 0:
                q.expect_due(due)

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        """Move the message to ``dead_letters`` with the reason in one transaction (the error is not stored)."""
        [((queue, k), [row_id])] = by_file([delivery]).items()
        with write_transaction(self._conn(self._files(queue).file(k))) as conn:
            conn.execute("INSERT INTO dead_letters (message_id, body, reason, failed_at, attempts)"
                         " VALUES (?, ?, ?, ?, ?)",
                         (row_id, delivery.body, letter.reason, letter.failed_at, letter.attempts))
            conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))

    def _purge(self, queue: str) -> int:
        """Delete the waiting messages (ready, delayed, or with an expired lease); leased ones stay. One
        transaction per file."""
        deleted = 0
        for q in self._every_file(queue):
            with write_transaction(self._conn(q)) as conn:
                deleted += conn.execute(f"DELETE FROM messages WHERE {tables.WAITING}", (time.time(),)).rowcount
                deleted += conn.execute("DELETE FROM delayed").rowcount
            q.next_due = math.inf
        return deleted

    def _size(self, queue: str) -> int:
        """Messages not held by a live consumer: ready, delayed, or left behind by a dead one."""
        now = time.time()
        return sum(int(self._conn(q).execute(tables.COUNT, (now,)).fetchall()[0][0]) for q in self._every_file(queue))

    def maintenance_interval(self) -> float:
        return _lease_seconds() / 3

    def _renew(self, deliveries: Sequence[Delivery]) -> None:
        """Push the lease of every message this process holds to now + lease."""
        until = time.time() + _lease_seconds()
        for (queue, k), ids in by_file(deliveries).items():
            q = self._files(queue).file(k)
            try:
                execute_by_ids(self._conn(q), tables.RENEW, (until, self._owner), sorted(ids))
            except (sqlite3.Error, OSError):
                logger.warning("could not renew the leases of %d message(s) in %s", len(ids), q.path, exc_info=True)

    # -- dead letters ---------------------------------------------------------------------------
    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters (of all the queue's files, by time), newest first."""
        files = self._every_file(queue)
        rows = [(*row, q.path) for q in files for row in self._conn(q).execute(
            "SELECT body, reason, failed_at, attempts, id FROM dead_letters ORDER BY id DESC LIMIT ?",
            (max(0, limit),))]
        if len(files) > 1:
            rows.sort(key=lambda row: -row[2])
        return [DeadLetter(queue, bytes(body), reason, at, attempts, ref=(path, row_id))
                for body, reason, at, attempts, row_id, path in rows[:limit]]

    def _heads(self, queue: str) -> list[bytes]:
        now = time.time()
        return [bytes(body) for q in self._every_file(queue) for (body,) in self._conn(q).execute(
            f"SELECT body FROM messages WHERE {tables.WAITING} ORDER BY id LIMIT 1", (now,))]

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        rows = [(float(due), bytes(body)) for q in self._every_file(queue) for due, body in self._conn(q).execute(
            "SELECT due, body FROM delayed ORDER BY due, id LIMIT ?", (max(0, limit),))]
        return sorted(rows, key=lambda row: row[0])[:limit]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        path, row_id = letter.ref
        [q] = [q for q in self._every_file(queue) if q.path == path]
        return self._conn(q).execute("DELETE FROM dead_letters WHERE id = ?", (row_id,)).rowcount == 1

    def purge_dead_letters(self, queue: str) -> int:
        return sum(int(self._conn(q).execute("DELETE FROM dead_letters").rowcount) for q in self._every_file(queue))

    # -- shutdown -------------------------------------------------------------------------------
    def _close(self) -> None:
        """Close this thread's connections and watches (messages still held come back after the lease)."""
        for watch in self._local.__dict__.pop("watches", {}).values():
            watch.close()
        for conn in self._local.__dict__.pop("conns", {}).values():
            conn.close()  # this thread's own connections: closing cannot fail (sqlite3_close_v2)
