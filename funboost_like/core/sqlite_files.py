"""Opening the framework's SQLite files, one way for every module (queues, stores, status, scheduler).

:func:`open_sqlite` gives an autocommit connection with the busy timeout, WAL and the synchronous
level set, the folder created, and the schema applied. Switching a brand-new file to WAL needs an
exclusive lock, and SQLite reports "database is locked" at once (without waiting) when another
process opens the same new file at the same moment, so that switch is retried up to the timeout.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger("funboost_like.sqlite")

_SQLITE_BUSY = 5  # SQLITE_BUSY; SQLITE_BUSY_SNAPSHOT etc. share the low byte


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """True when ``exc`` says the database was locked by another connection."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is None:
        return "locked" in str(exc)
    return int(code) & 0xFF == _SQLITE_BUSY


def enable_wal(conn: sqlite3.Connection, path: str, busy_timeout: float) -> None:
    """Switch the file to WAL (a lasting property of the file), retrying while another opener races us."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchall()[0][0]
            if str(mode).lower() != "wal":
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
            break
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
    if str(mode).lower() != "wal":
        logger.warning("%s: journal_mode is %s, not WAL; is it on a network file system?", path, mode)


def open_sqlite(path: str | Path, *, busy_timeout: float, synchronous: str = "NORMAL",
                schema: Iterable[str] = (), pragmas: Iterable[str] = (),
                check_same_thread: bool = True) -> sqlite3.Connection:
    """Open ``path`` (creating its folder) in autocommit mode with WAL, ``synchronous`` and ``schema``."""
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=check_same_thread)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        enable_wal(conn, path, busy_timeout)
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        for pragma in pragmas:
            conn.execute(pragma)
        for statement in schema:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn
