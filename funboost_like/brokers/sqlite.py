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

Capabilities: ack, persistent, delay, priority (higher first, then FIFO), cross_process, dead_letters.
Not cross_host: the files must be on a local disk (WAL needs shared memory; never a network share).

Durability: the files are in WAL mode. With ``synchronous=NORMAL`` (the default) every committed
publish or ack survives a crash of any process; with ``FULL`` it also survives power loss or an OS
crash, at the cost of an fsync per commit.

Layout: one database file per queue, ``<folder>/<safe name>.sqlite3`` (see :func:`queue_file_name`),
with the tables ``messages`` (ready and leased messages), ``delayed`` (messages not due yet, published
with ``not_before`` or nacked with a delay, indexed by due time) and ``dead_letters``. Row ids come
from AUTOINCREMENT and are never reused, so a stale token can never touch a newer message.

Delayed messages: a fetch moves the due rows of ``delayed`` into ``messages`` (at the back of their
priority, as a new row) in one transaction, but only when the earliest due time says something is
due. Each process caches that earliest due time per queue (lowered at once by its own delayed
publishes and nacks) and re-reads ``SELECT min(due)`` at most every 50 ms to see other processes'
ones; so any number of far-future messages costs a fetch nothing, and a waiting fetch picks up a
delayed message within about 50 ms of it being due (at once when it was published in the same
process). Files written by earlier versions may hold delayed rows in ``messages`` (``visible_at`` in
the future); they are still delivered when due.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.file_watch import FileWatch
from funboost_like.core.config import data_dir_setting, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import BrokerNotAvailable, ConfigurationError
from funboost_like.core.sqlite_files import open_sqlite, queue_file_name
from funboost_like.core.stores import SqliteKeyValueStore, check_namespace

logger = logging.getLogger("funboost_like.sqlite")

_CHUNK = 500  # ids per IN (...) list, well below SQLite's bound-parameter limit
_WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is truncated back to this after a checkpoint
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL DEFAULT 0, visible_at REAL NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0, owner TEXT, body BLOB NOT NULL, crashes INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS messages_next ON messages (priority DESC, id, visible_at)",
    "CREATE TABLE IF NOT EXISTS delayed ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL DEFAULT 0, due REAL NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS delayed_due ON delayed (due)",
    "CREATE TABLE IF NOT EXISTS dead_letters ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, message_id INTEGER, body BLOB, reason TEXT, failed_at REAL,"
    " attempts INTEGER)",
)
_INSERT = "INSERT INTO messages (priority, visible_at, body) VALUES (?, ?, ?)"
_INSERT_DELAYED = "INSERT INTO delayed (priority, due, body) VALUES (?, ?, ?)"
_NEXT_DUE = "SELECT min(due) FROM delayed"
# Due rows move to ``messages`` in due order; the two statements select the same rows because they
# run in one write transaction.
_DUE_IDS = "SELECT id FROM delayed WHERE due <= :now ORDER BY due, id LIMIT :n"
_PROMOTE = (
    "INSERT INTO messages (priority, visible_at, attempts, body)"
    f" SELECT priority, due, attempts, body FROM delayed WHERE id IN ({_DUE_IDS}) ORDER BY due, id"
)
_UNDELAY = f"DELETE FROM delayed WHERE id IN ({_DUE_IDS})"
_PROMOTE_BATCH = 5000  # rows moved per transaction, so the write lock is held briefly
_DUE_RECHECK = 0.05  # seconds between reads of the earliest due time (other processes' delayed rows)
_DELAY = (
    "INSERT INTO delayed (priority, due, attempts, body)"
    " SELECT priority, ?, attempts, body FROM messages WHERE owner = ? AND id IN ({ids}) ORDER BY id"
)
_DELETE_OWNED = "DELETE FROM messages WHERE owner = ? AND id IN ({ids})"
# One statement claims the batch under SQLite's write lock, so two processes never claim one row. A
# row that still has an owner was held by a consumer whose lease ran out: its death is counted.
_CLAIM = (
    "UPDATE messages SET visible_at = :lease_until, crashes = crashes + (owner IS NOT NULL), owner = :owner,"
    " attempts = attempts + 1"
    " WHERE id IN (SELECT id FROM messages WHERE visible_at <= :now ORDER BY priority DESC, id LIMIT :n)"
    " RETURNING id, body, attempts, priority, crashes"
)
_DELETE = "DELETE FROM messages WHERE id IN ({ids})"
_REQUEUE = "UPDATE messages SET owner = NULL, visible_at = ? WHERE owner = ? AND id IN ({ids})"
_RELEASE = (
    "UPDATE messages SET owner = NULL, visible_at = ?, attempts = max(attempts - 1, 0)"
    " WHERE owner = ? AND id IN ({ids})"
)
_RENEW = "UPDATE messages SET visible_at = ? WHERE owner = ? AND id IN ({ids})"
_WAITING = "owner IS NULL OR visible_at <= ?"  # not held, or held by a consumer whose lease ran out


_ABANDONED: list[Any] = []  # thread-local state inherited from a parent process


class _Queue:
    """Process-local state of one queue file: the earliest due time of its delayed messages, as last seen
    (only a cache: a stale value delays a due message by at most _DUE_RECHECK, never loses it)."""

    __slots__ = ("path", "next_due", "due_checked")

    def __init__(self, path: str) -> None:
        self.path = path
        self.next_due = math.inf
        self.due_checked = -math.inf

    def expect_due(self, due: float) -> None:
        """A delayed message due at ``due`` was written by this process."""
        if due < self.next_due:
            self.next_due = due


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _by_ids(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...], ids: Sequence[Any]) -> int:
    """Run ``sql`` (whose ``{ids}`` is an IN list) over ``ids`` in chunks, atomically; return rows changed."""
    if len(ids) <= _CHUNK:
        return conn.execute(sql.format(ids=", ".join(["?"] * len(ids))), (*params, *ids)).rowcount
    changed = 0
    with _transaction(conn):
        for start in range(0, len(ids), _CHUNK):
            part = ids[start:start + _CHUNK]
            changed += conn.execute(sql.format(ids=", ".join(["?"] * len(part))), (*params, *part)).rowcount
    return changed


def _order(row: tuple[int, bytes, int, int, int]) -> tuple[int, int]:
    return -row[3], row[0]


def _lease_seconds() -> float:
    lease = float(settings.get("SQLITE_LEASE_SECONDS"))
    if lease <= 0:
        raise ConfigurationError(f"SQLITE_LEASE_SECONDS must be positive, not {lease!r}")
    return lease


def _synchronous() -> str:
    value = str(settings.get("SQLITE_SYNCHRONOUS")).strip().upper()
    if value not in _SYNCHRONOUS:
        raise ConfigurationError(f"SQLITE_SYNCHRONOUS must be one of {', '.join(_SYNCHRONOUS)}, not {value!r}")
    return value


def _connect(path: str) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL, the configured synchronous level and the schema
    (adding the ``crashes`` column to files written by earlier versions)."""
    conn = open_sqlite(path, busy_timeout=float(settings.get("SQLITE_BUSY_TIMEOUT_SECONDS")),
                       synchronous=_synchronous(), schema=_SCHEMA,
                       pragmas=[f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}"])
    if not any(row[1] == "crashes" for row in conn.execute("PRAGMA table_info(messages)")):
        try:
            conn.execute("ALTER TABLE messages ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process added it first
                raise
    return conn


def _by_queue(deliveries: Sequence[Delivery]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for delivery in deliveries:
        groups.setdefault(delivery.queue, []).append(delivery.token)
    return groups


class SqliteBroker(Broker):
    """At-least-once queues in local SQLite files, shared by every process on the host.

    One instance serves a whole process (see the registry); every method is thread-safe. Each
    thread gets its own connection per queue file; a forked child never uses its parent's.
    """

    kind = BrokerEnum.PERSISTQUEUE
    capabilities = Capabilities(redelivery="lease", delay="native", max_priority=2**31, dead_letters=True,
                                key_value=True, persistent=True, cross_process=True)
    errors = (sqlite3.Error, OSError)

    def __init__(self) -> None:
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise BrokerNotAvailable(
                "the PERSISTQUEUE broker needs SQLite 3.35 or newer (for RETURNING); "
                f"this Python has {sqlite3.sqlite_version}"
            )
        self._kv_stores: dict[str, SqliteKeyValueStore] = {}
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, str], _Queue] = {}
        super().__init__()
        self._after_fork()

    def _after_fork(self) -> None:
        """A new identity and new thread-local connections. The parent's connections stay referenced,
        never used nor closed here (closing one could checkpoint or delete the parent's WAL file)."""
        previous = getattr(self, "_local", None)
        if previous is not None:
            _ABANDONED.append(previous)
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._local = threading.local()

    @property
    def owner(self) -> str:
        """The id this process writes into the ``owner`` column of the messages it holds."""
        return self._owner

    def _where(self) -> str:
        return f"the SQLite queue folder {data_dir_setting('SQLITE_QUEUES_PATH', 'sqlite_queues')}"

    # -- plumbing -------------------------------------------------------------------------------
    def _queue(self, name: str) -> _Queue:
        key = (str(settings.get("SQLITE_QUEUES_PATH") or ""), name)
        q = self._queues.get(key)
        if q is None:
            path = str(data_dir_setting("SQLITE_QUEUES_PATH", "sqlite_queues") / queue_file_name(name))
            with self._lock:
                q = self._queues.setdefault(key, _Queue(path))
        return q

    def _conn(self, q: _Queue) -> sqlite3.Connection:
        try:
            conns: dict[str, sqlite3.Connection] = self._local.conns
        except AttributeError:
            conns = self._local.conns = {}
        conn = conns.get(q.path)
        if conn is None:
            conn = conns[q.path] = _connect(q.path)
        return conn

    def path(self, queue: str) -> Path:
        """The database file of ``queue`` (it may not exist yet)."""
        return Path(self._queue(queue).path)

    def key_value_store(self, queue: str, namespace: str) -> SqliteKeyValueStore:
        """The store file beside the queue's: ``<folder>/<queue file stem>@<namespace>.sqlite3``.

        ``@`` never occurs in a queue file name, so a store file can never be some queue's file.
        """
        queue_path = self.path(queue)
        path = str(queue_path.with_name(f"{queue_path.name[:-len('.sqlite3')]}@{check_namespace(namespace)}.sqlite3"))
        store = self._kv_stores.get(path)
        if store is None:
            with self._lock:
                store = self._kv_stores.setdefault(path, SqliteKeyValueStore(path))
        return store

    # -- primitives ------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        q = self._queue(queue)
        conn = self._conn(q)
        now, level = time.time(), int(priority)
        if not_before is not None and float(not_before) > now:
            due = float(not_before)
            with _transaction(conn):
                conn.executemany(_INSERT_DELAYED, [(level, due, bytes(body)) for body in bodies])
            q.expect_due(due)
        elif len(bodies) == 1:
            body = bodies[0]
            conn.execute(_INSERT, (level, now, body if type(body) is bytes else bytes(body)))
        else:
            with _transaction(conn):
                conn.executemany(_INSERT, [(level, now, body if type(body) is bytes else bytes(body))
                                           for body in bodies])

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        """Claim up to ``max_n`` ready messages, highest priority first, then oldest."""
        q = self._queue(queue)
        now = time.time()
        if now >= q.next_due or now - q.due_checked >= _DUE_RECHECK:
            self._promote_due(q, now)
        params = {"lease_until": now + _lease_seconds(), "owner": self._owner, "now": now, "n": max_n}
        rows = self._conn(q).execute(_CLAIM, params).fetchall()
        if not rows:
            return []
        rows.sort(key=_order)  # RETURNING order is not guaranteed
        return [Delivery(queue, body, token, attempts, priority, crashes)
                for token, body, attempts, priority, crashes in rows]

    def _promote_due(self, q: _Queue, now: float) -> None:
        """Move the delayed messages due by ``now`` into ``messages``; take the write lock only when
        the earliest due time (an index lookup) says something is due."""
        conn = self._conn(q)
        if now < q.next_due:  # a periodic re-read, for delayed messages of other processes
            q.due_checked = now
            first = conn.execute(_NEXT_DUE).fetchall()[0][0]
            q.next_due = math.inf if first is None else float(first)
            if q.next_due > now:
                return
        params = {"now": now, "n": _PROMOTE_BATCH}
        with _transaction(conn):
            conn.execute(_PROMOTE, params)
            conn.execute(_UNDELAY, params)
            first = conn.execute(_NEXT_DUE).fetchall()[0][0]
        q.due_checked = now
        q.next_due = math.inf if first is None else float(first)

    def _wait(self, queue: str, timeout: float) -> None:
        """Sleep until another process (or thread) writes the queue's file, a known delayed message is
        due, or ``timeout``: an inotify watch on the WAL file where the system has one."""
        q = self._queue(queue)
        self._conn(q)  # the WAL file exists while a connection is open
        watches: dict[str, FileWatch] = self._local.__dict__.setdefault("watches", {})
        watch = watches.get(q.path)
        if watch is None:
            watch = watches[q.path] = FileWatch(q.path + "-wal")
        watch.wait(max(0.001, min(timeout, q.next_due - time.time())))

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete the messages (whoever holds them now)."""
        for queue, ids in _by_queue(deliveries).items():
            _by_ids(self._conn(self._queue(queue)), _DELETE, (), ids)

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        """Visible again (a released or requeued message keeps its id, so its place); skipped for a
        message whose lease ran out and that another consumer took meanwhile."""
        for queue, ids in _by_queue(deliveries).items():
            q = self._queue(queue)
            conn = self._conn(q)
            if delay > 0:
                due = time.time() + delay
                with _transaction(conn):
                    _by_ids(conn, _DELAY, (due, self._owner), ids)
                    _by_ids(conn, _DELETE_OWNED, (self._owner,), ids)
                q.expect_due(due)
            else:
                _by_ids(conn, _REQUEUE if count_attempt else _RELEASE, (time.time(), self._owner), ids)

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        """Move the message to ``dead_letters`` with the reason in one transaction (the error is not stored)."""
        with _transaction(self._conn(self._queue(delivery.queue))) as conn:
            conn.execute(
                "INSERT INTO dead_letters (message_id, body, reason, failed_at, attempts) VALUES (?, ?, ?, ?, ?)",
                (delivery.token, delivery.body, letter.reason, letter.failed_at, letter.attempts),
            )
            conn.execute("DELETE FROM messages WHERE id = ?", (delivery.token,))

    def _purge(self, queue: str) -> int:
        """Delete the waiting messages (ready, delayed, or with an expired lease); leased ones stay."""
        q = self._queue(queue)
        with _transaction(self._conn(q)) as conn:
            deleted = conn.execute(f"DELETE FROM messages WHERE {_WAITING}", (time.time(),)).rowcount
            deleted += conn.execute("DELETE FROM delayed").rowcount
        q.next_due = math.inf
        return int(deleted)

    def _size(self, queue: str) -> int:
        """Messages not held by a live consumer: ready, delayed, or left behind by a dead one."""
        rows = self._conn(self._queue(queue)).execute(
            f"SELECT (SELECT count(*) FROM messages WHERE {_WAITING}) + (SELECT count(*) FROM delayed)",
            (time.time(),),
        ).fetchall()
        return int(rows[0][0])

    def maintenance_interval(self) -> float:
        return _lease_seconds() / 3

    def _renew(self, deliveries: Sequence[Delivery]) -> None:
        """Push the lease of every message this process holds to now + lease."""
        until = time.time() + _lease_seconds()
        for queue, ids in _by_queue(deliveries).items():
            q = self._queue(queue)
            try:
                _by_ids(self._conn(q), _RENEW, (until, self._owner), sorted(ids))
            except (sqlite3.Error, OSError):
                logger.warning("could not renew the leases of %d message(s) in %s", len(ids), q.path, exc_info=True)

    def renew_leases(self) -> None:
        """Renew now what :meth:`_renew` renews every lease / 3 seconds."""
        self.maintain()

    # -- dead letters ---------------------------------------------------------------------------
    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        rows = self._conn(self._queue(queue)).execute(
            "SELECT body, reason, failed_at, attempts FROM dead_letters ORDER BY id DESC LIMIT ?", (max(0, limit),)
        ).fetchall()
        return [DeadLetter(queue, bytes(body), reason, at, attempts) for body, reason, at, attempts in rows]

    def purge_dead_letters(self, queue: str) -> int:
        return int(self._conn(self._queue(queue)).execute("DELETE FROM dead_letters").rowcount)

    # -- shutdown -------------------------------------------------------------------------------
    def _close(self) -> None:
        """Close this thread's connections and watches (messages still held come back after the lease)."""
        for watch in self._local.__dict__.pop("watches", {}).values():
            watch.close()
        for conn in self._local.__dict__.pop("conns", {}).values():
            try:
                conn.close()
            except sqlite3.Error:
                logger.debug("error closing a connection", exc_info=True)
