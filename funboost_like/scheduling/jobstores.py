"""Job stores for the timing scheduler, chosen by the ``SCHEDULER_JOB_STORE`` setting.

* ``"memory"`` (default): APScheduler's ``MemoryJobStore``; jobs live as long as the process.
* ``"sqlite"``: :class:`SQLiteJobStore`, a file ``jobs.sqlite3`` in ``SCHEDULER_SQLITE_DIR``, written
  with the standard library's ``sqlite3`` only (no SQLAlchemy). Several scheduler processes of one
  host may share it.
* ``"redis"``: APScheduler's ``RedisJobStore`` at ``REDIS_URL`` (the ``redis`` extra).
* any URL with ``://`` (``postgresql+psycopg://...``, ``mysql+pymysql://...``, ``sqlite:////abs/path``):
  APScheduler's ``SQLAlchemyJobStore`` (the ``sql`` extra).

Persistent stores keep each job's state pickled, as every APScheduler 3.x store does; a timing
publish job's state holds only a textual booster reference and the call's arguments (see
:func:`~funboost_like.scheduling.timing.publish_by_reference`), never a booster.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore

from funboost_like.core.config import data_dir_setting, settings
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.sqlite_files import open_sqlite

logger = logging.getLogger("funboost_like.scheduling")

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
MEMORY, SQLITE, REDIS = "memory", "sqlite", "redis"


def scheduler_sqlite_dir() -> Path:
    return data_dir_setting("SCHEDULER_SQLITE_DIR", "scheduler")


def job_store_kind(value: str | None = None) -> str:
    """Normalise a ``SCHEDULER_JOB_STORE`` value: ``memory``, ``sqlite``, ``redis`` or a URL."""
    raw = str(settings.get("SCHEDULER_JOB_STORE") if value is None else value).strip()
    lowered = raw.lower()
    if lowered in ("", MEMORY):
        return MEMORY
    if lowered in (SQLITE, REDIS):
        return lowered
    if "://" in raw:
        return raw
    raise ConfigurationError(f"SCHEDULER_JOB_STORE={raw!r} is not 'memory', 'sqlite', 'redis' or a SQLAlchemy URL")


def make_job_store(value: str | None = None) -> BaseJobStore:
    """Build the job store that ``SCHEDULER_JOB_STORE`` (or ``value``) names."""
    kind = job_store_kind(value)
    if kind == MEMORY:
        return MemoryJobStore()
    if kind == SQLITE:
        return SQLiteJobStore(scheduler_sqlite_dir() / "jobs.sqlite3",
                              busy_timeout=float(settings.get("SQLITE_BUSY_TIMEOUT_SECONDS")))
    if kind == REDIS:
        try:
            from apscheduler.jobstores.redis import RedisJobStore
            from redis.connection import parse_url
        except ImportError as exc:
            raise ConfigurationError(f"a redis job store needs redis-py ({exc}); run: "
                                     "pip install 'funboost_like[redis]'") from exc
        return RedisJobStore(jobs_key="funboost_like:apscheduler.jobs",
                             run_times_key="funboost_like:apscheduler.run_times",
                             **parse_url(str(settings.get("REDIS_URL"))))
    try:
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    except ImportError as exc:
        raise ConfigurationError(f"a SQL job store needs SQLAlchemy ({exc}); run: pip install 'funboost_like[sql]'") \
            from exc
    return SQLAlchemyJobStore(url=kind)


def is_persistent(store: BaseJobStore) -> bool:
    return not isinstance(store, MemoryJobStore)


class SQLiteJobStore(BaseJobStore):
    """An APScheduler 3.x job store in one SQLite file, using only the standard library.

    Table ``<tablename>(id TEXT PRIMARY KEY, next_run_time REAL, job_state BLOB)``: ``next_run_time`` is a
    UNIX time (NULL for a paused job) used to find due jobs; ``job_state`` is the pickled
    ``Job.__getstate__()``, which keeps the exact run time. The file is in WAL mode, so several
    processes of one host can share it; it must be on a local disk.
    A job whose state can no longer be restored (its function was renamed, say) is logged and removed.
    """

    def __init__(self, path: str | Path, tablename: str = "apscheduler_jobs",
                 pickle_protocol: int = pickle.HIGHEST_PROTOCOL, busy_timeout: float = 5.0) -> None:
        super().__init__()
        if not _TABLE_NAME.fullmatch(tablename):
            raise ValueError(f"invalid table name {tablename!r}")
        self.path = Path(path)
        self.tablename = tablename
        self.pickle_protocol = pickle_protocol
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.path)!r}>"

    # -- connection --------------------------------------------------------------------------------
    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        conn = open_sqlite(self.path, busy_timeout=self.busy_timeout, check_same_thread=False, schema=(
            f"CREATE TABLE IF NOT EXISTS {self.tablename} (id TEXT PRIMARY KEY, next_run_time REAL,"
            " job_state BLOB NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS {self.tablename}_next ON {self.tablename} (next_run_time)",
        ))
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._connect().execute(sql, params).fetchall()

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run one statement (atomic on its own); return the number of rows it changed."""
        with self._lock:
            return self._connect().execute(sql, params).rowcount

    def shutdown(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                conn.close()

    # -- reading -----------------------------------------------------------------------------------
    def lookup_job(self, job_id: str) -> Job | None:
        rows = self._query(f"SELECT job_state FROM {self.tablename} WHERE id = ?", (job_id,))
        return self._restore(job_id, rows[0][0]) if rows else None

    def get_due_jobs(self, now: datetime) -> list[Job]:
        return self._jobs("WHERE next_run_time <= ?", (now.timestamp(),))

    def get_next_run_time(self) -> datetime | None:
        rows = self._query(f"SELECT min(next_run_time) FROM {self.tablename}")
        if not rows or rows[0][0] is None:
            return None
        return datetime.fromtimestamp(rows[0][0], timezone.utc)

    def get_all_jobs(self) -> list[Job]:
        return self._jobs("", ())

    def _jobs(self, where: str, params: tuple[Any, ...]) -> list[Job]:
        sql = (f"SELECT id, job_state FROM {self.tablename} {where}"
               " ORDER BY next_run_time IS NULL, next_run_time, id")  # paused jobs (NULL) last
        jobs = []
        for job_id, state in self._query(sql, params):
            job = self._restore(job_id, state)
            if job is not None:
                jobs.append(job)
        return jobs

    def _restore(self, job_id: str, state: bytes) -> Job | None:
        try:
            job = Job.__new__(Job)
            job.__setstate__(pickle.loads(state))
        except Exception:
            logger.exception("cannot restore job %r from %s; removing it", job_id, self.path)
            self._write(f"DELETE FROM {self.tablename} WHERE id = ?", (job_id,))
            return None
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job

    # -- writing -----------------------------------------------------------------------------------
    def _row(self, job: Job) -> tuple[float | None, bytes]:
        next_run = job.next_run_time.timestamp() if job.next_run_time is not None else None
        return next_run, pickle.dumps(job.__getstate__(), self.pickle_protocol)

    def add_job(self, job: Job) -> None:
        next_run, state = self._row(job)
        try:
            self._write(f"INSERT INTO {self.tablename} (id, next_run_time, job_state) VALUES (?, ?, ?)",
                          (job.id, next_run, state))
        except sqlite3.IntegrityError:
            raise ConflictingIdError(job.id) from None

    def update_job(self, job: Job) -> None:
        next_run, state = self._row(job)
        if not self._write(f"UPDATE {self.tablename} SET next_run_time = ?, job_state = ? WHERE id = ?",
                           (next_run, state, job.id)):
            raise JobLookupError(job.id)

    def remove_job(self, job_id: str) -> None:
        if not self._write(f"DELETE FROM {self.tablename} WHERE id = ?", (job_id,)):
            raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        self._write(f"DELETE FROM {self.tablename}")
