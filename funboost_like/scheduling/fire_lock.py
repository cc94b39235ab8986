"""Fire-time locks: several schedulers, one publication per fire time.

APScheduler 3.x schedulers that share a job store (or that each hold the same job) all run a due
job. Before a job runs for a scheduled fire time, the executor of
:class:`~funboost_like.scheduling.timing.FsdfBackgroundScheduler` claims the key
``(job id, scheduled fire time)`` in a store that every scheduler sees; only the scheduler whose
claim inserted the key runs the job for that fire time, the others skip it.

``claim`` is an add-if-absent: an ``INSERT OR IGNORE`` of a primary key in a SQLite file (schedulers
on one host), or ``SET key NX EX`` in Redis (schedulers on several hosts). A claimed key is kept for
``retention_seconds`` (the ``SCHEDULER_FIRE_LOCK_RETENTION_SECONDS`` setting, one day by default),
which must exceed how late any scheduler may still run a fire time.

The fire time is the one APScheduler computed from the job's stored ``next_run_time`` and trigger,
so every scheduler that sees the same stored job derives the same key, to the microsecond.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from funboost_like.core.sqlite_files import open_sqlite

logger = logging.getLogger("funboost_like.scheduling")

DEFAULT_RETENTION_SECONDS = 86400.0
_PRUNE_EVERY_SECONDS = 600.0


def fire_time_key(fire_time: datetime) -> str:
    """The fire time as UTC text with microseconds (``2024-05-01T08:00:00.000000Z``)."""
    if fire_time.tzinfo is None:
        raise ValueError(f"fire time {fire_time!r} has no time zone")
    return fire_time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class FireTimeLock(ABC):
    """Hands out each ``(job id, fire time)`` once among every scheduler sharing the lock's store."""

    retention_seconds: float

    @abstractmethod
    def claim(self, job_id: str, fire_time: datetime) -> bool:
        """True for the first caller of this key anywhere; False for every later one (within retention)."""

    def close(self) -> None:
        """Release connections (a later claim reconnects)."""
        return None


class SqliteFireTimeLock(FireTimeLock):
    """Claims in a SQLite file: for schedulers on one host (the file must be on a local disk)."""

    def __init__(self, path: str | Path, retention_seconds: float = DEFAULT_RETENTION_SECONDS,
                 busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.retention_seconds = float(retention_seconds)
        self.busy_timeout = float(busy_timeout)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._next_prune = 0.0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SqliteFireTimeLock {str(self.path)!r}>"

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        conn = open_sqlite(self.path, busy_timeout=self.busy_timeout, check_same_thread=False, schema=(
            "CREATE TABLE IF NOT EXISTS fire_locks (job_id TEXT NOT NULL, fire_time TEXT NOT NULL,"
            " claimed_at REAL NOT NULL, owner TEXT NOT NULL, PRIMARY KEY (job_id, fire_time))",
            "CREATE INDEX IF NOT EXISTS fire_locks_age ON fire_locks (claimed_at)",
        ))
        self._conn, self._pid = conn, os.getpid()
        return conn

    def claim(self, job_id: str, fire_time: datetime) -> bool:
        key = fire_time_key(fire_time)
        now = time.time()
        with self._lock:
            conn = self._connect()
            cursor = conn.execute("INSERT OR IGNORE INTO fire_locks (job_id, fire_time, claimed_at, owner)"
                                  " VALUES (?, ?, ?, ?)", (job_id, key, now, _owner()))
            claimed = cursor.rowcount == 1
            if now >= self._next_prune:
                self._next_prune = now + _PRUNE_EVERY_SECONDS
                conn.execute("DELETE FROM fire_locks WHERE claimed_at < ?", (now - self.retention_seconds,))
        return claimed

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                conn.close()


class RedisFireTimeLock(FireTimeLock):
    """Claims in Redis (``SET key NX EX``): for schedulers on several hosts."""

    def __init__(self, url: str, retention_seconds: float = DEFAULT_RETENTION_SECONDS,
                 prefix: str = "funboost_like:fire_lock:") -> None:
        self.url = url
        self.retention_seconds = float(retention_seconds)
        self.prefix = prefix
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        from funboost_like.core.config import redact_url

        return f"<RedisFireTimeLock {redact_url(self.url)!r}>"

    def _redis(self) -> Any:
        with self._lock:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.url)
            return self._client

    def claim(self, job_id: str, fire_time: datetime) -> bool:
        key = f"{self.prefix}{job_id}:{fire_time_key(fire_time)}"
        ttl = max(1, int(self.retention_seconds))
        return bool(self._redis().set(key, _owner(), nx=True, ex=ttl))

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
