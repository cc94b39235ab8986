"""No fork while a thread of this process is inside SQLite.

A child forked while another thread of its parent was inside an SQLite call inherits SQLite's
mutexes locked (the VFS's, taken to open and close a file; the memory allocator's): its first
``sqlite3.connect`` to that file, or its first statement, then waits forever. A child forked during
a write transaction inherits the process's record of the WAL write lock, so each of its writes to
that file waits for a lock nobody will release. Either way the child hangs silently: a consumer
process restarted by ``multi_process_consume`` while the parent's timer thread was publishing, say.

Every connection the framework opens (:func:`funboost_like.core.sqlite_files.open_sqlite`) is a
:class:`Connection`. Once this process is *armed*, its statements, fetches, transactions and closes
are passages (:func:`passage`), and a fork waits until no other thread is in one (at most
``_MOST_WAIT`` seconds, then it goes ahead with a warning). A process is armed as soon as the hazard
is possible: when a thread other than the main thread opens an SQLite connection, at the first fork,
or by :func:`arm` (the process supervisor arms before it starts children). A child starts unarmed.
Until then a statement pays one flag test, so a script publishing from its main thread runs at full
speed; armed, a statement costs about half a microsecond more (a fetch or an ack covers a batch of
messages). A fork from the main thread while only the main thread used SQLite is safe unarmed.

The bookkeeping is two plain structures, read and written under the GIL, in the order of Dekker's
algorithm: a thread first notes itself inside, then reads whether a fork is pending (and steps back
out to wait if so); the forking thread first notes the fork pending, then reads who is inside.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("funboost_like.sqlite")

_MOST_WAIT = 5.0  # seconds a fork waits for threads inside SQLite (a busy timeout is longer: not forever)
_get_ident = threading.get_ident
_inside: dict[int, int] = {}  # thread: depth of its passages
_forking = False
_fork_done = threading.Event()
_fork_done.set()
_armed = False


def arm() -> None:
    """Guard SQLite calls from now on: this process is going to fork."""
    global _armed
    _armed = True


def _enter() -> None:
    me = _get_ident()
    while True:
        _inside[me] = _inside.get(me, 0) + 1
        if not _forking:
            return
        _leave()  # a fork is pending: let it happen first
        _fork_done.wait(_MOST_WAIT)


def _leave() -> None:
    me = _get_ident()
    depth = _inside[me] - 1
    if depth:
        _inside[me] = depth
    else:
        del _inside[me]


@contextmanager
def passage() -> Iterator[None]:
    """Hold off forks for the duration (a write transaction, several statements); nests."""
    if not _armed:
        yield
        return
    _enter()
    try:
        yield
    finally:
        _leave()


def _guarded(name: str) -> Any:
    """``sqlite3.Cursor``'s method ``name`` as a passage."""
    plain = getattr(sqlite3.Cursor, name)

    def method(self: sqlite3.Cursor, *args: Any) -> Any:
        _enter()
        try:
            return plain(self, *args)
        finally:
            _leave()

    method.__name__ = name
    return method


class _Cursor(sqlite3.Cursor):
    """A cursor of an armed process: each call into SQLite is a passage."""

    execute = _guarded("execute")
    executemany = _guarded("executemany")
    fetchone = _guarded("fetchone")
    fetchmany = _guarded("fetchmany")
    fetchall = _guarded("fetchall")
    __next__ = _guarded("__next__")


class Connection(sqlite3.Connection):
    """``sqlite3.connect(..., factory=Connection)``: plain until the process is armed, then guarded."""

    def execute(self, *args: Any) -> sqlite3.Cursor:
        if not _armed:
            return super().execute(*args)
        cursor: sqlite3.Cursor = self.cursor(_Cursor)
        return cursor.execute(*args)

    def executemany(self, *args: Any) -> sqlite3.Cursor:
        if not _armed:
            return super().executemany(*args)
        cursor: sqlite3.Cursor = self.cursor(_Cursor)
        return cursor.executemany(*args)

    def close(self) -> None:
        with passage():
            super().close()

    def __del__(self) -> None:
        # A thread's connection goes with its thread-local state when the thread ends: closed here, inside
        # a passage, rather than by the collector outside one (and reported by Python 3.13 as unclosed)
        try:
            self.close()
        except Exception:  # noqa: BLE001 - another thread's, or the interpreter is shutting down
            pass


def connect(path: str, **options: Any) -> Connection:
    """``sqlite3.connect`` to a :class:`Connection`, opening the file inside a passage."""
    if not _armed and _get_ident() != threading.main_thread().ident:  # inside SQLite while main forks
        arm()
    with passage():
        return sqlite3.connect(path, factory=Connection, **options)


def _before_fork() -> None:
    global _forking, _armed
    _armed = True
    _fork_done.clear()
    _forking = True
    me = _get_ident()
    deadline = time.monotonic() + _MOST_WAIT
    while any(thread != me for thread in list(_inside)):
        if time.monotonic() > deadline:
            logger.warning("forking while another thread is inside SQLite (waited %.0f s): the child may hang on "
                           "its first use of that database", _MOST_WAIT)
            return
        time.sleep(0.0005)


def _after_fork_in_parent() -> None:
    global _forking
    _forking = False
    _fork_done.set()


def _after_fork_in_child() -> None:
    global _forking, _inside, _fork_done, _armed
    _inside, _forking, _armed = {}, False, False
    _fork_done = threading.Event()
    _fork_done.set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
