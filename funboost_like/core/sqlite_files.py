"""Naming and opening the framework's SQLite files, one way for every module (queues, stores, status, scheduler).

:func:`queue_file_name` names a queue's file; the SQLite broker, its key-value stores and the status
records all use it, so names never collide. :func:`open_sqlite` gives an autocommit connection with
the busy timeout, WAL and the synchronous level set, the folder created, and the schema applied;
:func:`write_transaction` and :func:`execute_by_ids` write on it.
Switching a brand-new file to WAL needs an exclusive lock, and SQLite reports "database is locked" at
once (without waiting) when another process opens the same new file at the same moment, so that
switch is retried up to the timeout.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from funboost_like.core import sqlite_fork

logger = logging.getLogger("funboost_like.sqlite")

_SQLITE_BUSY = 5  # SQLITE_BUSY; SQLITE_BUSY_SNAPSHOT etc. share the low byte
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,120}")
_CHUNK = 500  # ids per IN (...) list, well below SQLite's bound-parameter limit


def queue_file_name(queue: str, part: int = 0) -> str:
    """The file name of ``queue``'s database: the name itself when it is plainly safe, else an encoded form.

    Safe means ``[A-Za-z0-9_.-]{1,120}`` without a leading dot. Other names are percent-encoded,
    truncated, and suffixed with ``~`` and a sha1 prefix; ``~`` never occurs in a safe name, so an
    encoded name never equals a plain one and different names never share a file.

    ``part`` k > 0 names the k-th extra file of a queue spread over several files
    (``SQLITE_FILES_PER_QUEUE``): ``<stem>+<k>.sqlite3``. ``+`` occurs in no queue's own file name
    (a safe name has none, an encoded one has ``%2B``) and the stem before it names one queue, so an
    extra file is never another queue's file; nor a key-value store's, whose name has an ``@``.
    """
    if _SAFE_NAME.fullmatch(queue) and not queue.startswith("."):
        stem = queue
    else:
        encoded = quote(queue, safe="")[:80]
        if encoded.startswith("."):
            encoded = "%2E" + encoded[1:]
        stem = f"{encoded}~{hashlib.sha1(queue.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
    return f"{stem}+{part}.sqlite3" if part else f"{stem}.sqlite3"


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
    conn = sqlite_fork.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=check_same_thread)
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


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on an autocommit connection, rolled back on any error (and no
    fork of this process meanwhile: :mod:`.sqlite_fork`)."""
    with sqlite_fork.passage():
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def execute_by_ids(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...], ids: Sequence[Any]) -> int:
    """Run ``sql`` (whose ``{ids}`` is an IN list) over ``ids`` in chunks, atomically; return rows changed."""
    if len(ids) <= _CHUNK:
        return conn.execute(sql.format(ids=", ".join(["?"] * len(ids))), (*params, *ids)).rowcount
    changed = 0
    with write_transaction(conn):
        for start in range(0, len(ids), _CHUNK):
            part = ids[start:start + _CHUNK]
            changed += conn.execute(sql.format(ids=", ".join(["?"] * len(part))), (*params, *part)).rowcount
    return changed

