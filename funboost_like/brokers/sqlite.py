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

import hashlib
import logging
import math
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.core.config import data_dir_setting, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import BrokerError, BrokerNotAvailable, ConfigurationError, DoubleAckError
from funboost_like.core.sqlite_files import open_sqlite
from funboost_like.core.stores import SqliteKeyValueStore, check_namespace

logger = logging.getLogger("funboost_like.sqlite")

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,120}")
_CHUNK = 500  # ids per IN (...) list, well below SQLite's bound-parameter limit
_POLL_MIN, _POLL_MAX = 0.005, 0.05  # how often an idle fetch looks for other processes' messages
_WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is truncated back to this after a checkpoint
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL DEFAULT 0, visible_at REAL NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0, owner TEXT, body BLOB NOT NULL)",
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
# One statement claims the batch under SQLite's write lock, so two processes never claim one row.
_CLAIM = (
    "UPDATE messages SET visible_at = :lease_until, owner = :owner, attempts = attempts + 1"
    " WHERE id IN (SELECT id FROM messages WHERE visible_at <= :now ORDER BY priority DESC, id LIMIT :n)"
    " RETURNING id, body, attempts, priority"
)
_ANY_READY = "SELECT 1 FROM messages WHERE visible_at <= ? LIMIT 1"
_DELETE = "DELETE FROM messages WHERE id IN ({ids})"
_REQUEUE = "UPDATE messages SET owner = NULL, visible_at = ? WHERE owner = ? AND id IN ({ids})"
_RELEASE = (
    "UPDATE messages SET owner = NULL, visible_at = ?, attempts = max(attempts - 1, 0)"
    " WHERE owner = ? AND id IN ({ids})"
)
_RENEW = "UPDATE messages SET visible_at = ? WHERE owner = ? AND id IN ({ids})"
_WAITING = "owner IS NULL OR visible_at <= ?"  # not held, or held by a consumer whose lease ran out

# Connections inherited from a parent process: kept referenced so they are never used nor closed here.
_ABANDONED: list[Any] = []
_LIVE_BROKERS: weakref.WeakSet[SqliteBroker] = weakref.WeakSet()


def queue_file_name(queue: str) -> str:
    """The file name of ``queue``'s database: the name itself when it is plainly safe, else an encoded form.

    Safe means ``[A-Za-z0-9_.-]{1,120}`` without a leading dot. Other names are percent-encoded,
    truncated, and suffixed with ``~`` and a sha1 prefix; ``~`` never occurs in a safe name, so an
    encoded name never equals a plain one and different names never share a file.
    """
    if _SAFE_NAME.fullmatch(queue) and not queue.startswith("."):
        return f"{queue}.sqlite3"
    encoded = quote(queue, safe="")[:80]
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    digest = hashlib.sha1(queue.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{encoded}~{digest}.sqlite3"


class _Queue:
    """Process-local state of one queue file: its wake-up condition, the tokens this process holds and
    the earliest due time of its delayed messages, as last seen."""

    __slots__ = ("path", "cond", "generation", "waiters", "held", "lock", "next_due", "due_checked")

    def __init__(self, path: str) -> None:
        self.path = path
        self.cond = threading.Condition(threading.Lock())
        self.generation = 0  # bumped by every local publish, so a fetch never sleeps through one
        self.waiters = 0
        self.held: set[int] = set()
        self.lock = threading.Lock()
        # Earliest due time in ``delayed`` (inf: none), and when it was last read from the file. Only
        # a cache: a stale value delays a due message by at most _DUE_RECHECK, never loses it.
        self.next_due = math.inf
        self.due_checked = -math.inf

    def expect_due(self, due: float) -> None:
        """A delayed message due at ``due`` was written by this process."""
        if due < self.next_due:
            self.next_due = due

    def wake(self, everyone: bool) -> None:
        with self.cond:
            self.generation += 1
            if self.waiters:
                if everyone:
                    self.cond.notify_all()
                else:
                    self.cond.notify()

    def wait(self, generation: int, seconds: float) -> bool:
        """Sleep up to ``seconds`` unless something was published since ``generation``; True if woken."""
        with self.cond:
            if self.generation != generation:
                return True
            self.waiters += 1
            try:
                return self.cond.wait(seconds)
            finally:
                self.waiters -= 1

    def take(self, deliveries: Iterable[Delivery], rejected: list[Delivery]) -> list[int]:
        """Stop holding these deliveries; those not held (settled already) go to ``rejected``."""
        ids: list[int] = []
        with self.lock:
            held = self.held
            for delivery in deliveries:
                if delivery.token in held:
                    held.remove(delivery.token)
                    ids.append(delivery.token)
                else:
                    rejected.append(delivery)
        return ids

    def restore(self, ids: Iterable[int]) -> None:
        with self.lock:
            self.held.update(ids)


class _Errors:
    """Context manager turning sqlite3 and file system errors into :class:`BrokerError` naming the file."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, (sqlite3.Error, OSError)):
            raise BrokerError(f"sqlite queue file {self.path}: {exc}") from exc


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


def _by_ids(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...], ids: Sequence[int]) -> int:
    """Run ``sql`` (whose ``{ids}`` is an IN list) over ``ids`` in chunks, atomically; return rows changed."""
    if len(ids) <= _CHUNK:
        return conn.execute(sql.format(ids=", ".join(["?"] * len(ids))), (*params, *ids)).rowcount
    changed = 0
    with _transaction(conn):
        for start in range(0, len(ids), _CHUNK):
            part = ids[start:start + _CHUNK]
            changed += conn.execute(sql.format(ids=", ".join(["?"] * len(part))), (*params, *part)).rowcount
    return changed


def _group(deliveries: Iterable[Delivery]) -> dict[str, list[Delivery]]:
    groups: dict[str, list[Delivery]] = {}
    for delivery in deliveries:
        groups.setdefault(delivery.queue, []).append(delivery)
    return groups


def _order(row: tuple[int, bytes, int, int]) -> tuple[int, int]:
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
    """Open ``path`` in autocommit mode with WAL, the configured synchronous level and the schema."""
    conn = open_sqlite(path, busy_timeout=float(settings.get("SQLITE_BUSY_TIMEOUT_SECONDS")),
                       synchronous=_synchronous(), schema=_SCHEMA,
                       pragmas=[f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}"])
    logger.debug("opened %s in thread %s", path, threading.current_thread().name)
    return conn


class SqliteBroker(Broker):
    """At-least-once queues in local SQLite files, shared by every process on the host.

    One instance serves a whole process (see the registry); every method is thread-safe. Each
    thread gets its own connection per queue file; a forked child never uses its parent's.
    """

    kind = BrokerEnum.PERSISTQUEUE
    capabilities = Capabilities(
        ack=True, persistent=True, delay=True, priority=True, cross_process=True, cross_host=False,
        dead_letters=True, max_priority=2**31,
    )

    def __init__(self) -> None:
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise BrokerNotAvailable(
                "the PERSISTQUEUE broker needs SQLite 3.35 or newer (for RETURNING); "
                f"this Python has {sqlite3.sqlite_version}"
            )
        self._kv_stores: dict[str, SqliteKeyValueStore] = {}
        self._reset()
        _LIVE_BROKERS.add(self)

    def _reset(self) -> None:
        """(Re)create the process-local state: at construction and in a forked child."""
        previous = getattr(self, "_local", None)
        if previous is not None:
            _ABANDONED.append(getattr(previous, "conns", None))
        self._pid = os.getpid()
        self._owner = f"{socket.gethostname()}:{self._pid}:{secrets.token_hex(4)}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def owner(self) -> str:
        """The id this process writes into the ``owner`` column of the messages it holds."""
        return self._owner

    # -- plumbing -------------------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        if os.getpid() != self._pid:
            self._reset()
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

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, queue: str, body: bytes, *, priority: int = 0, not_before: float | None = None) -> None:
        q = self._queue(queue)
        body = body if type(body) is bytes else bytes(body)
        if not_before is not None and float(not_before) > time.time():
            due = float(not_before)
            with _Errors(q.path):
                self._conn(q).execute(_INSERT_DELAYED, (int(priority), due, body))
            q.expect_due(due)
            return
        with _Errors(q.path):
            self._conn(q).execute(_INSERT, (int(priority), time.time(), body))
        q.wake(everyone=False)

    def publish_many(self, queue: str, bodies: Sequence[bytes], *, priority: int = 0) -> None:
        if not bodies:
            return
        q = self._queue(queue)
        now, level = time.time(), int(priority)
        rows = [(level, now, body if type(body) is bytes else bytes(body)) for body in bodies]
        with _Errors(q.path), _transaction(self._conn(q)) as conn:
            conn.executemany(_INSERT, rows)
        q.wake(everyone=True)

    # -- consuming ------------------------------------------------------------------------------

    def fetch(self, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        """Claim up to ``max_n`` ready messages, highest priority first, then oldest.

        Blocks at most ``timeout`` seconds: a publish in this process wakes it at once, other
        processes' publishes are noticed by polling (5 ms backing off to 50 ms, a cheap read first).
        """
        q = self._queue(queue)
        if max_n <= 0:
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        poll, probe = _POLL_MIN, False
        while True:
            generation = q.generation
            now = time.time()
            if (now >= q.next_due or now - q.due_checked >= _DUE_RECHECK) and self._promote_due(q, now):
                probe = False
            if not probe or self._any_ready(q):
                deliveries = self._claim(q, queue, max_n)
                if deliveries:
                    return deliveries
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            until_due = max(0.001, q.next_due - time.time())  # wake up when a known delayed message is due
            woken = q.wait(generation, min(poll, remaining, until_due))
            poll = _POLL_MIN if woken else min(poll * 2, _POLL_MAX)
            probe = not woken

    def _any_ready(self, q: _Queue) -> bool:
        with _Errors(q.path):
            return bool(self._conn(q).execute(_ANY_READY, (time.time(),)).fetchall())

    def _promote_due(self, q: _Queue, now: float) -> int:
        """Move the delayed messages due by ``now`` into ``messages``; return how many moved.

        Reads the earliest due time first (an index lookup) and takes the write lock only when
        something is due.
        """
        with _Errors(q.path):
            conn = self._conn(q)
            if now < q.next_due:  # a periodic re-read, for delayed messages of other processes
                q.due_checked = now
                first = conn.execute(_NEXT_DUE).fetchall()[0][0]
                q.next_due = math.inf if first is None else float(first)
                if q.next_due > now:
                    return 0
            params = {"now": now, "n": _PROMOTE_BATCH}
            with _transaction(conn):
                moved = int(conn.execute(_PROMOTE, params).rowcount)
                conn.execute(_UNDELAY, params)
                first = conn.execute(_NEXT_DUE).fetchall()[0][0]
        q.due_checked = now
        q.next_due = math.inf if first is None else float(first)
        if moved > 1:
            q.wake(everyone=True)  # other threads of this process fetching the same queue
        return moved

    def _claim(self, q: _Queue, queue: str, max_n: int) -> list[Delivery]:
        now = time.time()
        params = {"lease_until": now + _lease_seconds(), "owner": self._owner, "now": now, "n": max_n}
        with _Errors(q.path):
            rows = self._conn(q).execute(_CLAIM, params).fetchall()
        if not rows:
            return []
        rows.sort(key=_order)  # RETURNING order is not guaranteed
        q.restore(row[0] for row in rows)
        self._ensure_renewer()
        return [Delivery(queue, body, token, attempts, priority) for token, body, attempts, priority in rows]

    # -- settling -------------------------------------------------------------------------------

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete the messages (whoever holds them now). Raises DoubleAckError for one settled before,
        after settling the others of the batch."""
        self._settle(deliveries, _DELETE, lambda: (), wake=False)

    def nack(self, delivery: Delivery, *, requeue: bool = True, delay: float = 0.0) -> None:
        """Requeue (visible after ``delay`` seconds; the attempt counts) or, with requeue=False, delete.

        A requeue is skipped when the lease had already run out and another consumer took the message.
        """
        if not requeue:
            self._settle([delivery], _DELETE, lambda: (), wake=False)
        elif delay <= 0:
            self._settle([delivery], _REQUEUE, lambda: (time.time(), self._owner), wake=True)
        else:
            self._delay(delivery, time.time() + delay)

    def _delay(self, delivery: Delivery, due: float) -> None:
        """Move a held message to ``delayed`` (attempts kept), unless another consumer took it meanwhile."""
        q = self._queue(delivery.queue)
        rejected: list[Delivery] = []
        ids = q.take([delivery], rejected)
        if rejected:
            raise DoubleAckError(f"{delivery!r} was already acknowledged or rejected")
        try:
            with _Errors(q.path), _transaction(self._conn(q)) as conn:
                _by_ids(conn, _DELAY, (due, self._owner), ids)
                _by_ids(conn, _DELETE_OWNED, (self._owner,), ids)
        except BaseException:
            q.restore(ids)
            raise
        q.expect_due(due)

    def release(self, deliveries: Iterable[Delivery]) -> None:
        """Hand back messages that were never started: visible at once, the attempt not counted."""
        self._settle(deliveries, _RELEASE, lambda: (time.time(), self._owner), wake=True)

    def _settle(self, deliveries: Iterable[Delivery], sql: str, params: Any, *, wake: bool) -> None:
        rejected: list[Delivery] = []
        for queue, batch in _group(deliveries).items():
            q = self._queue(queue)
            ids = q.take(batch, rejected)
            if not ids:
                continue
            try:
                with _Errors(q.path):
                    _by_ids(self._conn(q), sql, params(), ids)
            except BaseException:
                q.restore(ids)
                raise
            if wake:
                q.wake(everyone=True)
        if rejected:
            raise DoubleAckError(f"{rejected[0]!r} was already acknowledged or rejected ({len(rejected)} in all)")

    def dead_letter(self, delivery: Delivery, reason: str, exc: BaseException | None = None) -> None:
        """Move the message to ``dead_letters`` with ``reason`` in one transaction (``exc`` is not stored)."""
        q = self._queue(delivery.queue)
        rejected: list[Delivery] = []
        ids = q.take([delivery], rejected)
        if rejected:
            raise DoubleAckError(f"{delivery!r} was already acknowledged or rejected")
        try:
            with _Errors(q.path), _transaction(self._conn(q)) as conn:
                conn.execute(
                    "INSERT INTO dead_letters (message_id, body, reason, failed_at, attempts) VALUES (?, ?, ?, ?, ?)",
                    (delivery.token, delivery.body, str(reason), time.time(), delivery.attempts),
                )
                conn.execute("DELETE FROM messages WHERE id = ?", (delivery.token,))
        except BaseException:
            q.restore(ids)
            raise

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        q = self._queue(queue)
        with _Errors(q.path):
            rows = self._conn(q).execute(
                "SELECT body, reason, failed_at, attempts FROM dead_letters ORDER BY id DESC LIMIT ?", (max(0, limit),)
            ).fetchall()
        return [DeadLetter(queue, bytes(body), reason, at, attempts) for body, reason, at, attempts in rows]

    def purge_dead_letters(self, queue: str) -> int:
        q = self._queue(queue)
        with _Errors(q.path):
            return int(self._conn(q).execute("DELETE FROM dead_letters").rowcount)

    # -- inspection -----------------------------------------------------------------------------

    def purge(self, queue: str) -> int:
        """Delete the waiting messages (ready, delayed, or with an expired lease); leased ones stay."""
        q = self._queue(queue)
        with _Errors(q.path), _transaction(self._conn(q)) as conn:
            deleted = conn.execute(f"DELETE FROM messages WHERE {_WAITING}", (time.time(),)).rowcount
            deleted += conn.execute("DELETE FROM delayed").rowcount
        q.next_due = math.inf
        return int(deleted)

    def count(self, queue: str) -> int:
        """Messages not held by a live consumer: ready, delayed, or left behind by a dead one."""
        q = self._queue(queue)
        with _Errors(q.path):
            rows = self._conn(q).execute(
                f"SELECT (SELECT count(*) FROM messages WHERE {_WAITING}) + (SELECT count(*) FROM delayed)",
                (time.time(),),
            ).fetchall()
        return int(rows[0][0])

    def in_flight(self, queue: str) -> int:
        """Messages this process fetched and has not settled yet."""
        q = self._queue(queue)
        with q.lock:
            return len(q.held)

    # -- leases ---------------------------------------------------------------------------------

    def _ensure_renewer(self) -> None:
        if self._renewer is not None:
            return
        with self._lock:
            if self._renewer is None:
                self._stop = threading.Event()
                self._renewer = threading.Thread(
                    target=self._renew_loop, args=(self._stop,), name="funboost_like-sqlite-lease", daemon=True
                )
                self._renewer.start()

    def _renew_loop(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(_lease_seconds() / 3):
                self.renew_leases()
        finally:
            self._close_thread_connections()

    def renew_leases(self) -> None:
        """Push the lease of every message this process holds to now + lease (the renewal thread's job)."""
        until = time.time() + _lease_seconds()
        for q in list(self._queues.values()):
            with q.lock:
                ids = sorted(q.held)
            if not ids:
                continue
            try:
                with _Errors(q.path):
                    _by_ids(self._conn(q), _RENEW, (until, self._owner), ids)
            except Exception:
                logger.warning("could not renew the leases of %d message(s) in %s", len(ids), q.path, exc_info=True)

    # -- shutdown -------------------------------------------------------------------------------

    def _close_thread_connections(self) -> None:
        conns: dict[str, sqlite3.Connection] = getattr(self._local, "conns", {})
        for conn in conns.values():
            try:
                conn.close()
            except sqlite3.Error:
                logger.debug("error closing a connection", exc_info=True)
        conns.clear()

    def close(self) -> None:
        """Stop lease renewal and close this thread's connections; later calls reconnect lazily.

        Messages still held stop being renewed until the next fetch and come back after the lease.
        """
        if os.getpid() != self._pid:
            self._reset()
        with self._lock:
            renewer, self._renewer = self._renewer, None
            self._stop.set()
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=5.0)
        self._close_thread_connections()


def _reset_brokers_in_child() -> None:
    for broker in list(_LIVE_BROKERS):
        broker._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_brokers_in_child)
