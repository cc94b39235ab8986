"""Job stores for the timing scheduler, chosen by the ``SCHEDULER_JOB_STORE`` setting.

* ``"memory"`` (default): APScheduler's ``MemoryJobStore``; jobs live as long as the process.
* ``"sqlite"``: :class:`SQLiteJobStore`, a file ``jobs.sqlite3`` in ``SCHEDULER_SQLITE_DIR``, written
  with the standard library's ``sqlite3`` only. Several scheduler processes of one host may share it.
* ``"redis"``: :class:`RedisJobStore` at ``REDIS_URL`` (the ``redis`` extra), for schedulers on
  several hosts.
* a SQLAlchemy URL (``postgresql+psycopg://...``, ``mysql+pymysql://...``): :class:`SQLAlchemyJobStore`
  (the ``sql`` extra), the same table as the SQLite store in that database, for schedulers on several hosts.

The persistent stores keep each job's state as JSON text (job_codec.py), never in APScheduler's
binary object format, whose loading can run any code: whoever can write to the SQLite file, the
database table or the Redis keys can change when jobs fire and what they publish, but cannot make a
scheduler run code of their choosing. For the same reason APScheduler's own persistent stores (its
``RedisJobStore``, ``SQLAlchemyJobStore``, ...) are not offered. A stored job that does not decode is
logged, skipped and parked (its next run time cleared), never loaded by other means. The SQLite and
SQL stores share every statement (:class:`TableJobStore`); only how a statement runs differs.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore

from funboost_like.core.config import data_dir_setting, redact_url, settings
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.sqlite_files import open_sqlite
from funboost_like.scheduling.job_codec import JobStateError, decode_job, encode_job

logger = logging.getLogger("funboost_like.scheduling")

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
MEMORY, SQLITE, REDIS, SQL = "memory", "sqlite", "redis", "sql"
JOB_STORE_KINDS = (MEMORY, SQLITE, REDIS)
REDIS_KEY_PREFIX = "fl:scheduler:"
_LEGACY_REDIS_JOBS_KEY = "funboost_like:apscheduler.jobs"  # binary jobs of earlier versions: never read


def scheduler_sqlite_dir() -> Path:
    return data_dir_setting("SCHEDULER_SQLITE_DIR", "scheduler")


def job_store_kind(value: str | None = None) -> str:
    """Normalise a ``SCHEDULER_JOB_STORE`` value: ``memory``, ``sqlite``, ``redis`` or ``sql`` (a SQLAlchemy URL)."""
    raw = str(settings.get("SCHEDULER_JOB_STORE") if value is None else value).strip()
    lowered = raw.lower()
    if lowered in ("", MEMORY):
        return MEMORY
    if lowered in (SQLITE, REDIS):
        return lowered
    if "://" in raw:
        return SQL
    raise ConfigurationError(
        f"SCHEDULER_JOB_STORE={raw!r} is not one of {', '.join(map(repr, JOB_STORE_KINDS))} or a SQLAlchemy URL "
        "such as 'postgresql+psycopg://user:password@host/db' or 'mysql+pymysql://user:password@host/db'")


def make_job_store(value: str | None = None) -> BaseJobStore:
    """Build the job store that ``SCHEDULER_JOB_STORE`` (or ``value``) names."""
    kind = job_store_kind(value)
    if kind == MEMORY:
        return MemoryJobStore()
    if kind == SQLITE:
        return SQLiteJobStore(scheduler_sqlite_dir() / "jobs.sqlite3",
                              busy_timeout=float(settings.get("SQLITE_BUSY_TIMEOUT_SECONDS")))
    if kind == SQL:  # a SQLAlchemy URL; every message about it has the password masked
        return SQLAlchemyJobStore(str(settings.get("SCHEDULER_JOB_STORE") if value is None else value).strip())
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(f"a redis job store needs redis-py ({exc}); run: "
                                 "pip install 'funboost_like[redis]'") from exc
    return RedisJobStore(str(settings.get("REDIS_URL")))


def is_persistent(store: BaseJobStore) -> bool:
    return not isinstance(store, MemoryJobStore)


def _job_id_text(stored_id: object) -> tuple[str, str]:
    """The job id as text, and why it is not a valid one ('' when it is)."""
    if isinstance(stored_id, str):
        return stored_id, ""
    if not isinstance(stored_id, bytes):
        return repr(stored_id), "the job id is not text"
    try:
        return stored_id.decode("utf-8"), ""
    except UnicodeDecodeError:
        return stored_id.decode("utf-8", "backslashreplace"), "the job id is not UTF-8 text"


class JsonJobStore(BaseJobStore):
    """What the persistent stores share: JSON job state, and skipping a stored job that does not decode.

    A job whose state :func:`~funboost_like.scheduling.job_codec.decode_job` refuses (damaged,
    tampered with, binary from an earlier version) is logged once per process and state, left out of
    every answer, and parked: its next run time is cleared (only if the state is still the same), so
    the scheduler does not wake up for it again and again. Adding the job again with
    ``replace_existing=True``, or removing it, clears it up.
    """

    def __init__(self) -> None:
        super().__init__()
        self._reported: set[tuple[str, int]] = set()

    def _encode(self, job: Job) -> str:
        return encode_job(job)  # ConfigurationError for a job that cannot be stored as JSON

    def _restore(self, stored_id: str | bytes, state: str | bytes) -> Job | None:
        """The job stored under ``stored_id`` (text, or bytes from Redis), or None after logging why not."""
        job_id, reason = _job_id_text(stored_id)
        job = None
        if not reason:
            try:
                job = decode_job(state, job_id)
            except JobStateError as exc:
                reason = str(exc)
            except Exception as exc:  # a bug here must not stop the other jobs either
                logger.exception("decoding job %r in %r failed", job_id, self)
                reason = f"{type(exc).__name__}: {exc}"
        if job is None:
            self._skip(stored_id, job_id, state, reason)
            return None
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job

    def _skip(self, stored_id: str | bytes, job_id: str, state: str | bytes, reason: str) -> None:
        key = (job_id, hash(state))
        level = logging.DEBUG if key in self._reported else logging.ERROR
        self._reported.add(key)
        logger.log(level, "job %r in %r cannot be loaded and is skipped: %s. Its next run time is cleared; add "
                          "the job again with replace_existing=True, or remove it", job_id, self, reason)
        try:
            self._park(stored_id, state)
        except Exception:
            logger.exception("clearing the next run time of job %r in %r failed", job_id, self)

    def _park(self, stored_id: str | bytes, state: str | bytes) -> None:
        """Clear the next run time of the job stored under ``stored_id`` if its state is still ``state``."""
        raise NotImplementedError


class TableJobStore(JsonJobStore):
    """A job store in one SQL table: every statement is here, how they run is up to a subclass.

    Table ``<tablename>(id PRIMARY KEY, next_run_time REAL/FLOAT indexed, job_state TEXT)``:
    ``next_run_time`` is a UNIX time (NULL for a paused job, or a parked one that does not decode)
    used to find due jobs; ``job_state`` is the job's JSON state (job_codec.py), which keeps the exact
    run time. Statements name the table ``{table}`` and take named parameters (``:id``), which both
    ``sqlite3`` and SQLAlchemy's ``text()`` understand; each one runs atomically on its own.
    """

    tablename: str

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run one SELECT; return its rows."""
        raise NotImplementedError

    def _write(self, sql: str, params: dict[str, Any] | None = None) -> int:
        """Run one statement (atomic on its own); return the number of rows it changed."""
        raise NotImplementedError

    def _is_conflict(self, exc: Exception) -> bool:
        """Whether ``exc``, raised by an INSERT, means that the id is taken."""
        raise NotImplementedError

    # -- reading -----------------------------------------------------------------------------------
    def lookup_job(self, job_id: str) -> Job | None:
        rows = self._query("SELECT job_state FROM {table} WHERE id = :id", {"id": job_id})
        return self._restore(job_id, rows[0][0]) if rows else None

    def get_due_jobs(self, now: datetime) -> list[Job]:
        return self._jobs("WHERE next_run_time <= :now", {"now": now.timestamp()})

    def get_next_run_time(self) -> datetime | None:
        rows = self._query("SELECT min(next_run_time) FROM {table}")
        if not rows or rows[0][0] is None:
            return None
        return datetime.fromtimestamp(float(rows[0][0]), timezone.utc)

    def get_all_jobs(self) -> list[Job]:
        return self._jobs("", {})

    def _jobs(self, where: str, params: dict[str, Any]) -> list[Job]:
        sql = ("SELECT id, job_state FROM {table} " + where +
               " ORDER BY next_run_time IS NULL, next_run_time, id")  # paused jobs (NULL) last
        jobs = []
        for job_id, state in self._query(sql, params):
            job = self._restore(job_id, state)
            if job is not None:
                jobs.append(job)
        return jobs

    def _park(self, stored_id: str | bytes, state: str | bytes) -> None:
        self._write("UPDATE {table} SET next_run_time = NULL WHERE id = :id AND job_state = :state",
                    {"id": stored_id, "state": state})

    # -- writing -----------------------------------------------------------------------------------
    def _row(self, job: Job) -> dict[str, Any]:
        next_run = job.next_run_time.timestamp() if job.next_run_time is not None else None
        return {"id": job.id, "next_run_time": next_run, "state": self._encode(job)}

    def add_job(self, job: Job) -> None:
        row = self._row(job)
        try:
            self._write("INSERT INTO {table} (id, next_run_time, job_state) VALUES (:id, :next_run_time, :state)",
                        row)
        except Exception as exc:
            if self._is_conflict(exc):
                raise ConflictingIdError(job.id) from None
            raise

    def update_job(self, job: Job) -> None:
        if not self._write("UPDATE {table} SET next_run_time = :next_run_time, job_state = :state WHERE id = :id",
                           self._row(job)):
            raise JobLookupError(job.id)

    def remove_job(self, job_id: str) -> None:
        if not self._write("DELETE FROM {table} WHERE id = :id", {"id": job_id}):
            raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        self._write("DELETE FROM {table}")


class SQLiteJobStore(TableJobStore):
    """An APScheduler 3.x job store in one SQLite file, using only the standard library.

    Table ``<tablename>(id TEXT PRIMARY KEY, next_run_time REAL, job_state TEXT)`` (see
    :class:`TableJobStore`). The file is in WAL mode, so several processes of one host can share it;
    it must be on a local disk.
    """

    def __init__(self, path: str | Path, tablename: str = "apscheduler_jobs", busy_timeout: float = 5.0) -> None:
        super().__init__()
        if not _TABLE_NAME.fullmatch(tablename):
            raise ValueError(f"invalid table name {tablename!r}")
        self.path = Path(path)
        self.tablename = tablename
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.path)!r}>"

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # A file made by an earlier version has job_state BLOB: SQLite stores the JSON text in it all the same.
        conn = open_sqlite(self.path, busy_timeout=self.busy_timeout, check_same_thread=False, schema=(
            f"CREATE TABLE IF NOT EXISTS {self.tablename} (id TEXT PRIMARY KEY, next_run_time REAL,"
            " job_state TEXT NOT NULL)",
            f"CREATE INDEX IF NOT EXISTS {self.tablename}_next ON {self.tablename} (next_run_time)",
        ))
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        with self._lock:
            return self._connect().execute(sql.format(table=self.tablename), params or {}).fetchall()

    def _write(self, sql: str, params: dict[str, Any] | None = None) -> int:
        with self._lock:
            return self._connect().execute(sql.format(table=self.tablename), params or {}).rowcount

    def _is_conflict(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def shutdown(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                conn.close()


class SQLAlchemyJobStore(TableJobStore):
    """An APScheduler 3.x job store in a SQL database, through SQLAlchemy Core 2.x (the ``sql`` extra).

    The same table and JSON job state as :class:`SQLiteJobStore` (see :class:`TableJobStore`), with
    ``id VARCHAR(191)`` (191 characters of utf8mb4 fit in a MySQL index key; binary collation on
    MySQL/MariaDB, so that ids differing only in case stay distinct), ``next_run_time`` a double
    precision float (``FLOAT(25)``: a single precision one would round UNIX times by minutes) and
    ``job_state TEXT``. The table is created on first use. Never APScheduler's own
    ``SQLAlchemyJobStore``, whose binary job format can run any code when loaded.
    """

    def __init__(self, url: str, tablename: str = "apscheduler_jobs", **engine_options: Any) -> None:
        super().__init__()
        if not _TABLE_NAME.fullmatch(tablename):
            raise ValueError(f"invalid table name {tablename!r}")
        self.url = url
        self.tablename = tablename
        self._engine_options = {"pool_pre_ping": True, **engine_options}
        self._sa = _import_sqlalchemy()
        try:
            self._sa.engine.make_url(url).get_dialect()
        except Exception as exc:  # the message of a URL that does not parse quotes it, password included
            reason = f"no SQLAlchemy dialect {exc.args[0].rsplit(':', 1)[-1]!r}" if isinstance(
                exc, self._sa.exc.NoSuchModuleError) else "not a valid SQLAlchemy URL"
            raise ConfigurationError(f"{redact_url(url)!r}: {reason}") from None
        self._engine: Any = None
        self._table = tablename  # quoted for the database once the engine exists
        self._pid = -1
        self._engine_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)!r} {self.tablename!r}>"

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        try:
            self._ready()
        except ConfigurationError:
            raise
        except Exception as exc:  # unreachable now: the scheduler retries its stores on its own
            logger.warning("%r: cannot reach the database at start (%s: %s)", self, type(exc).__name__, exc)

    def _ready(self) -> Any:
        """The engine, made (and the table created) on first use; a forked child gets its own connections."""
        with self._engine_lock:
            if self._engine is not None:
                if self._pid != os.getpid():
                    self._engine.dispose(close=False)  # leave the parent's connections to the parent
                    self._pid = os.getpid()
                return self._engine
            sa = self._sa
            try:
                engine = sa.create_engine(self.url, **self._engine_options)
            except ImportError as exc:
                raise ConfigurationError(f"{redact_url(self.url)!r}: the database driver is missing ({exc}); run: "
                                         "pip install 'funboost_like[sql]'") from None
            except sa.exc.ArgumentError:
                raise ConfigurationError(f"{redact_url(self.url)!r} is not a valid SQLAlchemy URL") from None
            table = sa.Table(
                self.tablename, sa.MetaData(),
                sa.Column("id", sa.String(191), primary_key=True),
                sa.Column("next_run_time", sa.Float(25), index=True),
                sa.Column("job_state", sa.Text, nullable=False),
                mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin",
            )
            try:
                table.create(engine, checkfirst=True)
            except sa.exc.DBAPIError:  # another scheduler created it at the same moment?
                if not sa.inspect(engine).has_table(self.tablename):
                    engine.dispose()
                    raise
            self._table = engine.dialect.identifier_preparer.quote(self.tablename)
            self._engine, self._pid = engine, os.getpid()
            return engine

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        with self._ready().connect() as conn:
            return list(conn.execute(self._sa.text(sql.format(table=self._table)), params or {}).all())

    def _write(self, sql: str, params: dict[str, Any] | None = None) -> int:
        with self._ready().begin() as conn:
            return int(conn.execute(self._sa.text(sql.format(table=self._table)), params or {}).rowcount)

    def _is_conflict(self, exc: Exception) -> bool:
        return isinstance(exc, self._sa.exc.IntegrityError)

    def shutdown(self) -> None:
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()


def _import_sqlalchemy() -> Any:
    try:
        import sqlalchemy
    except ImportError as exc:
        raise ConfigurationError(f"a SQL job store needs SQLAlchemy 2 ({exc}); run: "
                                 "pip install 'funboost_like[sql]'") from None
    if int(sqlalchemy.__version__.split(".")[0]) < 2:
        raise ConfigurationError(f"a SQL job store needs SQLAlchemy 2, not {sqlalchemy.__version__}; run: "
                                 "pip install 'funboost_like[sql]'")
    return sqlalchemy


# KEYS[1]: the jobs hash, KEYS[2]: the run-times sorted set; ARGV[1]: job id, ARGV[2]: JSON state,
# ARGV[3]: next run time as a UNIX time ('' for none). Each script is atomic.
_ADD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) end
return 1
"""
_UPDATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) else redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
"""
_REMOVE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
_PARK = """
local state = redis.call('HGET', KEYS[1], ARGV[1])
if state == false or state == ARGV[2] then redis.call('ZREM', KEYS[2], ARGV[1]) return 1 end
return 0
"""


class RedisJobStore(JsonJobStore):
    """An APScheduler 3.x job store in Redis, with the same JSON job state as :class:`SQLiteJobStore`.

    The HASH ``fl:scheduler:<jobs_key>`` maps each job id to its JSON state; the ZSET
    ``fl:scheduler:<jobs_key>:run_times`` holds the id of every job that has a next run time, scored
    by that time as a UNIX time (the exact time is in the state). Adding, updating and removing a job
    change both in one Lua script.
    """

    def __init__(self, url: str, jobs_key: str = "jobs") -> None:
        super().__init__()
        if not jobs_key or any(c.isspace() for c in jobs_key):
            raise ValueError(f"invalid jobs key {jobs_key!r}")
        self.url = url
        self.jobs_key = f"{REDIS_KEY_PREFIX}{jobs_key}"
        self.run_times_key = f"{self.jobs_key}:run_times"
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)!r} {self.jobs_key!r}>"

    # -- connection --------------------------------------------------------------------------------
    def _connection(self) -> tuple[Any, dict[str, Any]]:
        """The client (connecting lazily) and its registered scripts, taken together."""
        with self._client_lock:
            if self._client is None:
                import redis

                try:
                    client = redis.Redis.from_url(self.url)
                except ValueError:  # redis-py's message may quote the URL with its password
                    raise ConfigurationError(f"{redact_url(self.url)!r} is not a valid Redis URL") from None
                self._scripts = {name: client.register_script(script) for name, script in
                                 (("add", _ADD), ("update", _UPDATE), ("remove", _REMOVE), ("park", _PARK))}
                self._client = client
            return self._client, self._scripts

    def _redis(self) -> Any:
        return self._connection()[0]

    def _run(self, script: str, job_id: str | bytes, state: str | bytes = "", next_run: str = "") -> int:
        client, scripts = self._connection()
        return int(scripts[script](keys=[self.jobs_key, self.run_times_key], args=[job_id, state, next_run],
                                   client=client))

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        try:
            legacy = self._redis().exists(_LEGACY_REDIS_JOBS_KEY)
        except ConfigurationError:
            raise
        except Exception as exc:  # unreachable now: the scheduler retries its stores on its own
            logger.warning("%r: cannot reach Redis at start (%s: %s)", self, type(exc).__name__, exc)
            return
        if legacy:
            logger.warning("Redis key %r holds jobs in the binary format of an earlier version of funboost_like; "
                           "they are never loaded. Add those jobs again, then delete that key and "
                           "'funboost_like:apscheduler.run_times'", _LEGACY_REDIS_JOBS_KEY)

    def shutdown(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
            self._scripts = {}
        if client is not None:
            client.close()

    # -- reading -----------------------------------------------------------------------------------
    def lookup_job(self, job_id: str) -> Job | None:
        state = self._redis().hget(self.jobs_key, job_id)
        return self._restore(job_id, state) if state is not None else None

    def get_due_jobs(self, now: datetime) -> list[Job]:
        client = self._redis()
        ids = client.zrangebyscore(self.run_times_key, "-inf", repr(now.timestamp()))
        if not ids:
            return []
        jobs = []
        for job_id, state in zip(ids, client.hmget(self.jobs_key, ids), strict=True):
            if state is None:  # a run time without a job (written by hand?): drop it, or it is due forever
                logger.warning("%r has a run time for job %r but no such job; removing the run time", self, job_id)
                self._run("park", job_id)
                continue
            job = self._restore(job_id, state)
            if job is not None:
                jobs.append(job)
        return jobs

    def get_next_run_time(self) -> datetime | None:
        first = self._redis().zrange(self.run_times_key, 0, 0, withscores=True)
        if not first:
            return None
        return datetime.fromtimestamp(float(first[0][1]), timezone.utc)

    def get_all_jobs(self) -> list[Job]:
        jobs = []
        for job_id, state in self._redis().hgetall(self.jobs_key).items():
            job = self._restore(job_id, state)
            if job is not None:
                jobs.append(job)
        never = datetime.max.replace(tzinfo=timezone.utc)
        jobs.sort(key=lambda job: (job.next_run_time is None, job.next_run_time or never, job.id))
        return jobs

    def _park(self, stored_id: str | bytes, state: str | bytes) -> None:
        self._run("park", stored_id, state)

    # -- writing -----------------------------------------------------------------------------------
    @staticmethod
    def _score(job: Job) -> str:
        return repr(job.next_run_time.timestamp()) if job.next_run_time is not None else ""

    def add_job(self, job: Job) -> None:
        if not self._run("add", job.id, self._encode(job), self._score(job)):
            raise ConflictingIdError(job.id)

    def update_job(self, job: Job) -> None:
        if not self._run("update", job.id, self._encode(job), self._score(job)):
            raise JobLookupError(job.id)

    def remove_job(self, job_id: str) -> None:
        if not self._run("remove", job_id):
            raise JobLookupError(job_id)

    def remove_all_jobs(self) -> None:
        self._redis().delete(self.jobs_key, self.run_times_key)

