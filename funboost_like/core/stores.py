"""The key-value store contract, and its process-local and SQLite implementations.

Features that keep small records beside a queue (RPC results, task filtering) ask the queue's broker
for a store with :meth:`Broker.key_value_store(queue, namespace) <funboost_like.brokers.base.Broker.key_value_store>`,
so each broker keeps them where it keeps its messages: in memory, in a SQLite file beside the queue
file, in Redis. A broker says it keeps them with ``capabilities.key_value``; the features check that
flag at decoration time (:func:`require_key_value_store`).

Contract, for every implementation:

* keys are ``str``, values ``bytes``; ``ttl`` is seconds (``None``: no expiry; otherwise > 0);
* an expired key is invisible to every method at once and purged lazily (by later writes or reads);
* every method is thread-safe; :meth:`KeyValueStore.wait` blocks at most ``timeout`` seconds and
  returns ``None`` when the key did not appear in time;
* :meth:`KeyValueStore.add_if_absent` is atomic: of several concurrent callers (threads, or
  processes for a cross-process store), exactly one gets ``True``.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from funboost_like.core.config import settings
from funboost_like.core.errors import BrokerError, ConfigurationError
from funboost_like.core.sqlite_files import open_sqlite

if TYPE_CHECKING:
    from funboost_like.brokers.base import Capabilities

logger = logging.getLogger("funboost_like.stores")

_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_POLL_MIN, _POLL_MAX = 0.005, 0.05  # polling of stores that cannot notify across processes


def check_ttl(ttl: float | None) -> float | None:
    """``ttl`` as a float, or None; raise ValueError for a ttl that is not positive."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise ValueError(f"ttl must be None (no expiry) or a number of seconds > 0, got {ttl!r}")
    return float(ttl)


def check_namespace(namespace: str) -> str:
    """A namespace is a short plain name (it becomes part of file names and Redis keys)."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"a store namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
    return namespace


def require_key_value_store(capabilities: Capabilities, broker_name: str, feature: str) -> None:
    """Raise ConfigurationError when a broker with these ``capabilities`` keeps no key-value records."""
    if not capabilities.key_value:
        raise ConfigurationError(f"{feature}: broker {broker_name} keeps no key-value records "
                                 "(results and task filters need them)")


class KeyValueStore(ABC):
    """Small expiring records (see the module docstring for the contract)."""

    @abstractmethod
    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        """Set ``key`` to ``value``, replacing any value and expiry it had."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None when it is absent or expired."""

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The values of those ``keys`` that exist (absent and expired ones are left out)."""
        found: dict[str, bytes] = {}
        for key in keys:
            value = self.get(key)
            if value is not None:
                found[key] = value
        return found

    def wait(self, key: str, timeout: float | None) -> bytes | None:
        """Block until ``key`` exists and return its value; None after ``timeout`` seconds (None: no limit).

        The default polls :meth:`get`, backing off from 5 ms to 50 ms.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        pause = _POLL_MIN
        while True:
            value = self.get(key)
            if value is not None:
                return value
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            time.sleep(pause if remaining is None else min(pause, remaining))
            pause = min(pause * 2, _POLL_MAX)

    @abstractmethod
    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Set ``key`` only if it is absent or expired; True if this call set it. Atomic."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing happens when it is absent)."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` is present and not expired."""
        return self.get(key) is not None

    def close(self) -> None:  # noqa: B027 - optional hook; stores without connections keep it
        """Release this thread's connections; the store may be used again afterwards."""


class MemoryKeyValueStore(KeyValueStore):
    """Records in the memory of this process (monotonic clock); :meth:`wait` is woken by :meth:`put`."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._expiries: list[tuple[float, str]] = []  # heap of (expires_at, key); stale entries are skipped
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0

    def __len__(self) -> int:
        """Keys held, expired ones included until purged (for tests and introspection)."""
        return len(self._data)

    def _live(self, key: str, now: float) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires_at = entry
        if expires_at is not None and expires_at <= now:
            del self._data[key]
            return None
        return value

    def _purge(self, now: float) -> None:
        expiries, data = self._expiries, self._data
        while expiries and expiries[0][0] <= now:
            expires_at, key = heapq.heappop(expiries)
            entry = data.get(key)
            if entry is not None and entry[1] == expires_at:
                del data[key]

    def _set(self, key: str, value: bytes, ttl: float | None, now: float) -> None:
        expires_at = None if ttl is None else now + ttl
        self._data[key] = (bytes(value), expires_at)
        if expires_at is not None:
            heapq.heappush(self._expiries, (expires_at, key))
        self._purge(now)
        if self._waiters:
            self._cond.notify_all()

    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        ttl = check_ttl(ttl)
        with self._cond:
            self._set(key, value, ttl, time.monotonic())

    def get(self, key: str) -> bytes | None:
        with self._cond:
            return self._live(key, time.monotonic())

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        with self._cond:
            now = time.monotonic()
            for key in keys:
                value = self._live(key, now)
                if value is not None:
                    found[key] = value
        return found

    def wait(self, key: str, timeout: float | None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                now = time.monotonic()
                value = self._live(key, now)
                if value is not None:
                    return value
                remaining = None if deadline is None else deadline - now
                if remaining is not None and remaining <= 0:
                    return None
                self._waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiters -= 1

    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        ttl = check_ttl(ttl)
        with self._cond:
            now = time.monotonic()
            if self._live(key, now) is not None:
                return False
            self._set(key, value, ttl, now)
            return True

    def delete(self, key: str) -> None:
        with self._cond:
            self._data.pop(key, None)


# -- SQLite ------------------------------------------------------------------------------------------

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL)",
    "CREATE INDEX IF NOT EXISTS kv_expires_at ON kv (expires_at) WHERE expires_at IS NOT NULL",
)
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_PUT = (
    "INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)
# Inserts, or replaces a row only when it has expired: one statement, so it is atomic across processes.
_ADD_IF_ABSENT = (
    "INSERT INTO kv (key, value, expires_at) VALUES (?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
    " WHERE kv.expires_at IS NOT NULL AND kv.expires_at <= ?"
)
_GET = f"SELECT value FROM kv WHERE key = ? AND {_LIVE}"
_EXISTS = f"SELECT 1 FROM kv WHERE key = ? AND {_LIVE}"
_PURGE = "DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?"
_CHUNK = 500  # keys per IN (...) list
_PURGE_EVERY_WRITES = 1000
_PURGE_EVERY_SECONDS = 60.0

# Connections inherited from a parent process: kept referenced so they are never used nor closed here.
_ABANDONED: list[Any] = []


class SqliteKeyValueStore(KeyValueStore):
    """Records in one SQLite file (table ``kv``), shared by every process on the host.

    The file is created on first use, in WAL mode, with the ``SQLITE_BUSY_TIMEOUT_SECONDS`` and
    ``SQLITE_SYNCHRONOUS`` settings. Each thread gets its own connection; a forked child never uses
    its parent's. Times are wall-clock UNIX times, shared by all processes. :meth:`wait` is woken
    at once by a :meth:`put` of this process, and polls (5 ms backing off to 50 ms) for the others.
    Expired rows are deleted by a sweep every 1,000 writes or 60 seconds of a writing process (or by
    :meth:`purge_expired`); until then they are only invisible.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._pid = -1
        self._reset()

    def __repr__(self) -> str:
        return f"SqliteKeyValueStore({self.path!r})"

    def _reset(self) -> None:
        previous = getattr(self, "_local", None)
        if previous is not None:
            _ABANDONED.append(getattr(previous, "conn", None))
        self._pid = os.getpid()
        self._local = threading.local()
        self._cond = threading.Condition(threading.Lock())
        self._generation = 0
        self._writes = 0
        self._next_purge = time.monotonic() + _PURGE_EVERY_SECONDS

    def _conn(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            self._reset()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _connect(self) -> sqlite3.Connection:
        synchronous = str(settings.get("SQLITE_SYNCHRONOUS")).strip().upper()
        return open_sqlite(self.path, busy_timeout=float(settings.get("SQLITE_BUSY_TIMEOUT_SECONDS")),
                           synchronous=synchronous if synchronous in ("OFF", "NORMAL", "FULL", "EXTRA") else "NORMAL",
                           schema=_SCHEMA)

    def _execute(self, sql: str, params: Sequence[Any]) -> sqlite3.Cursor:
        try:
            return self._conn().execute(sql, params)
        except (sqlite3.Error, OSError) as exc:
            raise BrokerError(f"key-value store {self.path}: {exc}") from exc

    def _wrote(self, now: float) -> None:
        """After a write: wake local waiters, and now and then sweep expired rows."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
        self._writes += 1
        if self._writes >= _PURGE_EVERY_WRITES or time.monotonic() >= self._next_purge:
            self._writes = 0
            self._next_purge = time.monotonic() + _PURGE_EVERY_SECONDS
            try:
                self._execute(_PURGE, (now,))
            except BrokerError:
                logger.warning("could not purge expired keys of %s", self.path, exc_info=True)

    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        ttl = check_ttl(ttl)
        now = time.time()
        self._execute(_PUT, (key, bytes(value), None if ttl is None else now + ttl))
        self._wrote(now)

    def get(self, key: str) -> bytes | None:
        now = time.time()
        row = self._execute(_GET, (key, now)).fetchone()
        if row is not None:
            return bytes(row[0])
        return None

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        now = time.time()
        for start in range(0, len(keys), _CHUNK):
            part = list(keys[start:start + _CHUNK])
            marks = ", ".join(["?"] * len(part))
            rows = self._execute(f"SELECT key, value FROM kv WHERE key IN ({marks}) AND {_LIVE}", (*part, now))
            found.update((str(key), bytes(value)) for key, value in rows.fetchall())
        return found

    def wait(self, key: str, timeout: float | None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        pause = _POLL_MIN
        while True:
            generation = self._generation
            value = self.get(key)
            if value is not None:
                return value
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            with self._cond:
                woken = self._generation != generation or self._cond.wait(
                    pause if remaining is None else min(pause, remaining))
            pause = _POLL_MIN if woken else min(pause * 2, _POLL_MAX)

    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        ttl = check_ttl(ttl)
        now = time.time()
        cursor = self._execute(_ADD_IF_ABSENT, (key, bytes(value), None if ttl is None else now + ttl, now))
        if cursor.rowcount > 0:
            self._wrote(now)
            return True
        return False

    def delete(self, key: str) -> None:
        self._execute("DELETE FROM kv WHERE key = ?", (key,))

    def exists(self, key: str) -> bool:
        return self._execute(_EXISTS, (key, time.time())).fetchone() is not None

    def purge_expired(self) -> int:
        """Delete every expired row now; return how many."""
        return int(self._execute(_PURGE, (time.time(),)).rowcount)

    def keys(self) -> list[str]:
        """Every live key (for tests and introspection)."""
        return [str(row[0]) for row in self._execute(f"SELECT key FROM kv WHERE {_LIVE}", (time.time(),))]

    def close(self) -> None:
        if self._pid != os.getpid():
            self._reset()
            return
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                logger.debug("error closing %s", self.path, exc_info=True)

