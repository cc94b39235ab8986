"""The tables of a PERSISTQUEUE queue file (see :mod:`.sqlite`) and the SQL the broker runs on them.

Each queue file holds ``messages`` (ready and leased rows: ``owner`` names the holding process,
``visible_at`` ends its lease), ``delayed`` (rows not due yet, indexed by due time) and
``dead_letters``; the exchanges file holds ``bindings``. Statements with ``{ids}`` are formatted by
:func:`~funboost_like.core.sqlite_files.execute_by_ids`. :func:`connect` opens a file with its schema.
"""

from __future__ import annotations

import sqlite3

from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.sqlite_files import open_sqlite

_WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is truncated back to this after a checkpoint
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS messages ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL DEFAULT 0, visible_at REAL NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0, owner TEXT, body BLOB NOT NULL, crashes INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS messages_next ON messages (priority DESC, id, visible_at)",
    "CREATE TABLE IF NOT EXISTS delayed ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, priority INTEGER NOT NULL DEFAULT 0, due REAL NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0, body BLOB NOT NULL, crashes INTEGER NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS delayed_due ON delayed (due)",
    "CREATE TABLE IF NOT EXISTS dead_letters ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, message_id INTEGER, body BLOB, reason TEXT, failed_at REAL,"
    " attempts INTEGER)",
)
INSERT = "INSERT INTO messages (priority, visible_at, body) VALUES (?, ?, ?)"
INSERT_DELAYED = "INSERT INTO delayed (priority, due, body) VALUES (?, ?, ?)"
NEXT_DUE = "SELECT min(due) FROM delayed"
# Due rows move to ``messages`` in due order; the two statements select the same rows because they
# run in one write transaction.
_DUE_IDS = "SELECT id FROM delayed WHERE due <= :now ORDER BY due, id LIMIT :n"
PROMOTE = ("INSERT INTO messages (priority, visible_at, attempts, body, crashes)"
           f" SELECT priority, due, attempts, body, crashes FROM delayed WHERE id IN ({_DUE_IDS}) ORDER BY due, id")
UNDELAY = f"DELETE FROM delayed WHERE id IN ({_DUE_IDS})"
HEADS = "SELECT priority, visible_at FROM messages WHERE visible_at <= ? ORDER BY priority DESC, id LIMIT ?"
DELAY = ("INSERT INTO delayed (priority, due, attempts, body, crashes)"
         " SELECT priority, ?, attempts, body, crashes FROM messages WHERE owner = ? AND id IN ({ids}) ORDER BY id")
DELETE_OWNED = "DELETE FROM messages WHERE owner = ? AND id IN ({ids})"
# One statement claims the batch under SQLite's write lock, so two processes never claim one row. A
# row that still has an owner was held by a consumer whose lease ran out: its death is counted.
CLAIM = ("UPDATE messages SET visible_at = :lease_until, crashes = crashes + (owner IS NOT NULL), owner = :owner,"
         " attempts = attempts + 1"
         " WHERE id IN (SELECT id FROM messages WHERE visible_at <= :now ORDER BY priority DESC, id LIMIT :n)"
         " RETURNING id, body, attempts, priority, crashes")
DELETE = "DELETE FROM messages WHERE id IN ({ids})"
# A nacked message goes to the back: a new row (a new id); a released one keeps its id, so its place at
# the front, and is visible since time 0, so the merge of several files puts it first too.
REQUEUE = ("INSERT INTO messages (priority, visible_at, attempts, body, crashes)"
           " SELECT priority, ?, attempts, body, crashes FROM messages WHERE owner = ? AND id IN ({ids}) ORDER BY id")
RELEASE = ("UPDATE messages SET owner = NULL, visible_at = 0, attempts = max(attempts - 1, 0)"
           " WHERE owner = ? AND id IN ({ids})")
BINDINGS_SCHEMA = ("CREATE TABLE IF NOT EXISTS bindings (exchange TEXT NOT NULL, exchange_type TEXT NOT NULL,"
                   " queue TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (exchange, queue, key))",)
BINDINGS = "SELECT exchange, exchange_type, queue, key FROM bindings WHERE exchange = ? ORDER BY rowid"
RENEW = "UPDATE messages SET visible_at = ? WHERE owner = ? AND id IN ({ids})"
WAITING = "owner IS NULL OR visible_at <= ?"  # not held, or held by a consumer whose lease ran out
COUNT = f"SELECT (SELECT count(*) FROM messages WHERE {WAITING}) + (SELECT count(*) FROM delayed)"


def _synchronous() -> str:
    value = str(settings.get("SQLITE_SYNCHRONOUS")).strip().upper()
    if value not in _SYNCHRONOUS:
        raise ConfigurationError(f"SQLITE_SYNCHRONOUS must be one of {', '.join(_SYNCHRONOUS)}, not {value!r}")
    return value


def connect(path: str, schema: tuple[str, ...] = SCHEMA) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL, the configured synchronous level and ``schema``
    (adding the ``crashes`` columns to queue files written by earlier versions)."""
    conn = open_sqlite(path, busy_timeout=float(settings.get("SQLITE_BUSY_TIMEOUT_SECONDS")),
                       synchronous=_synchronous(), schema=schema,
                       pragmas=[f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}"])
    for table in ("messages", "delayed") if schema is SCHEMA else ():
        if not any(row[1] == "crashes" for row in conn.execute(f"PRAGMA table_info({table})")):
            try:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process added it first
                    raise
    return conn
