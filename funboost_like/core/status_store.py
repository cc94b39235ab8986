"""Per-call status records (``function_result_status_persistance_conf``) kept in local SQLite files.

Lifecycle of a call (seed 002's ``TaskStatus``, plus two outcomes of this framework)::

    not_started -> running -> finished | failed -> callbacked
                           -> requeued -> running -> ...
    not_started -> skipped          (expired, misfired or filtered before it ran)

* ``not_started``: published (written by the publisher's process).
* ``running``: the consumer is about to call the function.
* ``finished`` / ``failed``: the call returned / failed for good (after in-place retries).
* ``requeued``: the function raised ``ExceptionForRequeue``; the message went back to the queue.
* ``skipped``: the consumer dropped the message without running it.
* ``callbacked``: the publisher ran its result callback (terminal; see ``record_callbacked``).

Storage: one file per queue, ``<STATUS_DB_PATH>/<safe queue name>.sqlite3`` (same file names as the
SQLite broker), created on the first write, with one table ``calls`` keyed by ``task_id``. Files are
in WAL mode and shared safely by every process of the host: each process has one background writer
thread per file, and every other thread that queries gets its own connection. A forked child never
uses its parent's connections, thread or unwritten records.

Writes are batched: :meth:`StatusStore.record` only appends to an in-memory deque (no I/O, no lock
in the common case); the writer commits what accumulated every ``FLUSH_INTERVAL_SECONDS`` or as soon
as ``FLUSH_EVERY_RECORDS`` are waiting, in one transaction. Records still in memory when a process is
killed with SIGKILL are lost (at most the last ~0.2 s); a normal exit, ``consumer.stop()`` and
:meth:`StatusStore.close` write them first.

Events of one call may come from several processes (publisher, consumers) and reach the file out of
order. Each event carries its time (``updated_at``); a write never moves a row back to an older
status, it only fills the fields the row does not know yet, and ``callbacked`` is final.

Expiry: every event sets ``expires_at = event time + expire_seconds`` (no expiry when
``expire_seconds <= 0``); the writer deletes rows past it once every ``EXPIRY_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from funboost_like.core import codec, sqlite_fork
from funboost_like.core.calls import Status
from funboost_like.core.config import data_dir_setting, settings
from funboost_like.core.sqlite_files import open_sqlite, queue_file_name

logger = logging.getLogger("funboost_like.status")

# The statuses (defined in core/calls.py), under the names this module has always exported.
NOT_STARTED = Status.NOT_STARTED
RUNNING = Status.RUNNING
FINISHED = Status.FINISHED
FAILED = Status.FAILED
CALLBACKED = Status.CALLBACKED
REQUEUED = Status.REQUEUED
SKIPPED = Status.SKIPPED
STATUSES = Status.ALL

FLUSH_INTERVAL_SECONDS = 0.2  # the writer commits at least this often while records wait
FLUSH_EVERY_RECORDS = 2000  # ... and at once when this many wait
MAX_PENDING_RECORDS = 200_000  # above this, record() waits (up to BACKPRESSURE_SECONDS) for the writer
BACKPRESSURE_SECONDS = 2.0
EXPIRY_INTERVAL_SECONDS = 60.0
IDLE_WRITER_EXIT_SECONDS = 30.0  # a writer with nothing to write for this long exits (the next record restarts one)
_BATCH = 5000  # records per transaction
_WAL_SIZE_LIMIT = 16 * 1024 * 1024


class StatusEvent(NamedTuple):
    """One change of a call's record; None means "this event does not know"."""

    task_id: str
    queue: str
    status: str
    updated_at: float  # when the event happened (UNIX time): orders events of one call
    kwargs: str | None = None  # JSON
    result: str | None = None  # JSON (the result, or the JSON string of its repr)
    exception: str | None = None
    attempts: int | None = None  # function runs in the last delivery (retries = attempts - 1)
    deliveries: int | None = None  # how many times the broker handed the message out
    host: str | None = None
    pid: int | None = None
    script: str | None = None
    publish_time: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None
    expires_at: float | None = None


COLUMNS = StatusEvent._fields

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS calls ("
    " task_id TEXT PRIMARY KEY, queue TEXT, status TEXT NOT NULL, updated_at REAL NOT NULL, kwargs TEXT,"
    " result TEXT, exception TEXT, attempts INTEGER, deliveries INTEGER, host TEXT, pid INTEGER, script TEXT,"
    " publish_time REAL, started_at REAL, finished_at REAL, duration REAL, expires_at REAL)",
    "CREATE INDEX IF NOT EXISTS calls_updated ON calls (updated_at)",
    "CREATE INDEX IF NOT EXISTS calls_status ON calls (status, updated_at)",
)

# A newer event sets the status; an older one (late from another process) only fills unknown fields.
_NEWER = f"(excluded.updated_at >= calls.updated_at AND calls.status != '{Status.CALLBACKED}')"
# The fields of one run. An event of a run (it carries ``started_at``: running, finished, failed,
# requeued) that is newer replaces them all, so a run after a redelivery never shows the previous
# run's result or exception; other events only fill them in.
_RUN_FIELDS = ("result", "exception", "attempts", "finished_at", "duration")
_RUN_INDEXES = tuple(COLUMNS.index(name) for name in _RUN_FIELDS)
_STARTED_AT = COLUMNS.index("started_at")


def _assignment(column: str) -> str:
    if column in ("status", "updated_at"):
        return f"{column} = CASE WHEN {_NEWER} THEN excluded.{column} ELSE calls.{column} END"
    run_case = f"WHEN {_NEWER} AND excluded.started_at IS NOT NULL THEN excluded.{column} " \
        if column in _RUN_FIELDS else ""
    return (f"{column} = CASE {run_case}WHEN {_NEWER} THEN coalesce(excluded.{column}, calls.{column}) "
            f"ELSE coalesce(calls.{column}, excluded.{column}) END")


def merge_events(old: StatusEvent, new: StatusEvent) -> StatusEvent:
    """One event with the effect of writing ``old`` then ``new`` (the rules of the upsert, in Python)."""
    if new.updated_at >= old.updated_at and old.status != CALLBACKED:
        values = [a if a is not None else b for a, b in zip(new, old, strict=True)]
        if new[_STARTED_AT] is not None:
            for index in _RUN_INDEXES:
                values[index] = new[index]
    else:
        values = [a if a is not None else b for a, b in zip(old, new, strict=True)]
    return StatusEvent._make(values)


def _coalesce(events: list[StatusEvent]) -> list[StatusEvent]:
    """Merge the events of each call within one batch (running + finished usually become one row)."""
    merged: dict[str, StatusEvent] = {}
    for event in events:
        previous = merged.get(event.task_id)
        merged[event.task_id] = event if previous is None else merge_events(previous, event)
    return list(merged.values()) if len(merged) < len(events) else events


_UPSERT = (
    f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    " ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(_assignment(column) for column in COLUMNS if column != "task_id")
)


@dataclass(frozen=True)
class StatusRecord:
    """One call as stored: what :meth:`StatusStore.get` and :meth:`StatusStore.query` return."""

    task_id: str
    queue: str | None
    status: str
    updated_at: float
    kwargs: Any  # the call's keyword arguments (decoded), or None when not recorded
    result: Any  # the return value (decoded JSON, or its repr), or None when not saved
    result_saved: bool
    exception: str | None
    attempts: int | None
    deliveries: int | None
    host: str | None
    pid: int | None
    script: str | None
    publish_time: float | None
    started_at: float | None
    finished_at: float | None
    duration: float | None
    expires_at: float | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> StatusRecord:
        values = dict(zip(COLUMNS, row, strict=True))
        values["kwargs"] = _loads(values["kwargs"])
        raw_result = values.pop("result")
        return cls(result=_loads(raw_result), result_saved=raw_result is not None, **values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return codec.loads(text)
    except codec.DecodeFailure:
        return text


def to_json(value: Any) -> str:
    """JSON text of ``value``; the JSON string of its ``repr`` when it is not JSON-able."""
    try:
        return codec.dumps(value).decode("utf-8")
    except (TypeError, ValueError):
        return codec.dumps(repr(value)[:10_000]).decode("utf-8")


class _Flushed:
    """A marker in the pending deque: set by the writer once everything before it is committed."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = True


class StatusStore:
    """The call records of one queue in this host's status folder. Thread-safe; one per process and file.

    Get one with :func:`open_status_store`. Nothing touches the disk until the first record or query.
    """

    def __init__(self, queue_name: str, path: Path) -> None:
        self.queue_name = queue_name
        self.path = path
        self._reset()

    def _reset(self) -> None:
        """(Re)create the process-local state: at construction and in a forked child."""
        previous = getattr(self, "_local", None)
        if previous is not None:
            _ABANDONED.append(getattr(previous, "conn", None))
        self._pid = os.getpid()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: deque[StatusEvent | _Flushed] = deque()
        self._wake = threading.Event()
        self._drained = threading.Condition(threading.Lock())
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._failing = False

    def __repr__(self) -> str:
        return f"StatusStore(queue={self.queue_name!r}, path={str(self.path)!r})"

    # -- writing --------------------------------------------------------------------------------

    def record(self, event: StatusEvent) -> None:
        """Queue ``event`` for the background writer; returns at once (no I/O).

        Waits (at most ``BACKPRESSURE_SECONDS``) only when ``MAX_PENDING_RECORDS`` records are
        already waiting, so memory stays bounded when records come faster than the disk takes them.
        """
        pending = self._pending
        pending.append(event)
        if self._writer is None:  # checked after appending: an idle writer exits only with nothing pending
            self._start_writer()
        size = len(pending)
        if size >= FLUSH_EVERY_RECORDS:
            if not self._wake.is_set():
                self._wake.set()
            if size >= MAX_PENDING_RECORDS:
                self._wait_for_room()

    def _wait_for_room(self) -> None:
        if self._failing or threading.current_thread() is self._writer:
            return
        deadline = time.monotonic() + BACKPRESSURE_SECONDS
        with self._drained:
            while len(self._pending) >= MAX_PENDING_RECORDS:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning("status writer of %s is behind by %d records", self.path, len(self._pending))
                    return
                self._drained.wait(remaining)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every record queued before this call is committed; False on timeout or error."""
        if self._pid != os.getpid():
            self._reset()
        if not self._pending and self._writer is None:
            return True
        marker = _Flushed()
        self._pending.append(marker)
        if self._writer is None:
            self._start_writer()
        self._wake.set()
        return marker.event.wait(timeout) and marker.ok

    def _start_writer(self) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._reset()
            if self._writer is not None:
                return
            _register_atexit()
            self._stop = threading.Event()
            writer = threading.Thread(target=self._write_loop, args=(self._stop,), daemon=True,
                                      name=f"funboost_like-status-{self.queue_name}")
            self._writer = writer
            writer.start()

    def _write_loop(self, stop: threading.Event) -> None:
        """The writer thread: commit what is pending, delete expired rows; exit when stopped or idle."""
        conn: sqlite3.Connection | None = None
        next_expiry = 0.0
        failures = 0
        idle_since = time.monotonic()
        try:
            while True:
                if not stop.is_set():
                    self._wake.wait(min(5.0, FLUSH_INTERVAL_SECONDS * 2 ** failures))
                self._wake.clear()
                stopping = stop.is_set()
                if self._pending:
                    idle_since = time.monotonic()
                try:
                    with sqlite_fork.passage():
                        if self._pending:
                            if conn is None:
                                conn = _connect(self.path)
                            self._write_pending(conn)
                        if conn is not None and time.monotonic() >= next_expiry:
                            next_expiry = time.monotonic() + EXPIRY_INTERVAL_SECONDS
                            _delete_expired(conn, time.time())
                    failures, self._failing = 0, False
                except Exception:
                    failures += 1
                    self._failing = failures >= 3
                    logger.warning("writing call records to %s failed (%d in a row); %d record(s) kept for "
                                   "the next try", self.path, failures, len(self._pending), exc_info=True)
                    if stopping or failures >= 10:
                        self._drop_pending()
                        with self._drained:
                            self._drained.notify_all()
                if stopping and not self._pending:
                    return
                if time.monotonic() - idle_since >= IDLE_WRITER_EXIT_SECONDS and self._retire():
                    return
        finally:
            if conn is not None:
                with sqlite_fork.passage():
                    conn.close()

    def _retire(self) -> bool:
        """Let an idle writer exit, unless a record arrived meanwhile (see :meth:`record`)."""
        with self._lock:
            me = threading.current_thread()
            if self._writer is not me:
                return False
            self._writer = None
            if self._pending:
                self._writer = me
                return False
            return True

    def _write_pending(self, conn: sqlite3.Connection) -> None:
        """Commit everything pending, ``_BATCH`` records per transaction, then release flush markers."""
        pending = self._pending
        while pending:
            rows: list[StatusEvent] = []
            markers: list[_Flushed] = []
            while pending and len(rows) < _BATCH:
                item = pending.popleft()
                if isinstance(item, _Flushed):
                    markers.append(item)
                else:
                    rows.append(item)
            if rows:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany(_UPSERT, _coalesce(rows))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    pending.extendleft(reversed([*rows, *markers]))
                    raise
            for marker in markers:
                marker.event.set()
            with self._drained:
                self._drained.notify_all()

    def _drop_pending(self) -> None:
        dropped = 0
        while self._pending:
            item = self._pending.popleft()
            if isinstance(item, _Flushed):
                item.ok = False
                item.event.set()
            else:
                dropped += 1
        logger.error("dropped %d call record(s) that could not be written to %s", dropped, self.path)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, stop the writer and close this thread's connection.

        The store stays usable: a later record starts a new writer, a later query reconnects.
        """
        if self._pid != os.getpid():
            self._reset()
        with self._lock:
            writer, self._writer = self._writer, None
            self._stop.set()
            self._wake.set()
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout)
            if writer.is_alive():
                logger.warning("the status writer of %s did not finish within %.0fs", self.path, timeout)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    # -- reading --------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection | None:
        """This thread's connection, after writing what this process queued; None while no file exists."""
        if self._pid != os.getpid():
            self._reset()
        self.flush()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if not self.path.exists():
                return None
            conn = self._local.conn = _connect(self.path)
        return conn

    def get(self, task_id: str) -> StatusRecord | None:
        """The record of one call, or None."""
        conn = self._reader()
        if conn is None:
            return None
        rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM calls WHERE task_id = ?", (task_id,)).fetchall()
        return StatusRecord.from_row(rows[0]) if rows else None

    def query(self, status: str | Iterable[str] | None = None, since: float | None = None,
              until: float | None = None, limit: int | None = 100, newest_first: bool = True) -> list[StatusRecord]:
        """Records by status and by the time of their latest change (``since <= updated_at < until``)."""
        conn = self._reader()
        if conn is None:
            return []
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            unknown = sorted(set(wanted) - set(STATUSES))
            if unknown:
                raise ValueError(f"unknown status(es) {unknown}; known: {', '.join(STATUSES)}")
            where.append(f"status IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        if since is not None:
            where.append("updated_at >= ?")
            params.append(float(since))
        if until is not None:
            where.append("updated_at < ?")
            params.append(float(until))
        sql = f"SELECT {', '.join(COLUMNS)} FROM calls"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY updated_at {'DESC' if newest_first else 'ASC'}, task_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(0, int(limit)))
        return [StatusRecord.from_row(row) for row in conn.execute(sql, params).fetchall()]

    def counts_by_status(self) -> dict[str, int]:
        """How many records are in each status (every known status is a key)."""
        counts = dict.fromkeys(STATUSES, 0)
        conn = self._reader()
        if conn is not None:
            for status, n in conn.execute("SELECT status, count(*) FROM calls GROUP BY status").fetchall():
                counts[status] = int(n)
        return counts

    def delete_expired(self, now: float | None = None) -> int:
        """Delete the records whose ``expires_at`` passed (the writer also does it periodically)."""
        conn = self._reader()
        if conn is None:
            return 0
        return _delete_expired(conn, time.time() if now is None else now)

    def clear(self) -> int:
        """Delete every record of this queue; return how many."""
        conn = self._reader()
        if conn is None:
            return 0
        return int(conn.execute("DELETE FROM calls").rowcount)


def _delete_expired(conn: sqlite3.Connection, now: float) -> int:
    deleted = int(conn.execute("DELETE FROM calls WHERE expires_at < ?", (now,)).rowcount)
    if deleted:
        logger.debug("deleted %d expired call record(s)", deleted)
    return deleted


def _connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` (creating it and its folder) in autocommit mode with WAL and the schema."""
    return open_sqlite(path, busy_timeout=float(settings.get("SQLITE_BUSY_TIMEOUT_SECONDS")), schema=_SCHEMA,
                       pragmas=[f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}"])


# -- the per-process registry -------------------------------------------------------------------

_stores: dict[tuple[str, str], StatusStore] = {}
_stores_lock = threading.Lock()
_ABANDONED: list[Any] = []  # connections inherited from a parent process: never used nor closed here
_atexit_registered = False


def status_file_name(queue_name: str) -> str:
    """The file name of ``queue_name``'s records (the SQLite broker's naming, so names never collide)."""
    return queue_file_name(queue_name)


def open_status_store(queue_name: str) -> StatusStore:
    """The process-wide :class:`StatusStore` of ``queue_name`` in the current ``STATUS_DB_PATH`` folder.

    Cheap and without I/O: the file is created by the first write.
    """
    key = (str(settings.get("STATUS_DB_PATH") or ""), queue_name)
    store = _stores.get(key)
    if store is None:
        path = data_dir_setting("STATUS_DB_PATH", "status") / status_file_name(queue_name)
        with _stores_lock:
            store = _stores.setdefault(key, StatusStore(queue_name, path))
    return store


def close_all_status_stores() -> None:
    """Write every pending record of this process and stop the writers (runs at exit)."""
    with _stores_lock:
        stores = list(_stores.values())
    for store in stores:
        try:
            store.close()
        except Exception:
            logger.exception("closing %r failed", store)


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(close_all_status_stores)


def _reset_in_child() -> None:
    global _stores_lock
    _stores_lock = threading.Lock()
    for store in list(_stores.values()):
        store._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
