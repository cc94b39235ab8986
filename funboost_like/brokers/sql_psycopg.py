"""psycopg 3 connections that give up on a silent server: :func:`connect`.

libpq waits for an answer without end. When the path to the server goes silent in the middle of a
statement (a proxy or a NAT that stops forwarding, a black hole: packets dropped, no reset), a consumer
waited in ``recv`` forever and never fetched again, even once the path came back. The broker's
connections are therefore made with

* libpq's TCP keepalives and ``tcp_user_timeout`` (:data:`KEEPALIVES`), so the kernel declares a dead
  path dead (an idle pooled connection too) within about 30 s;
* a bound on each wait for the server (``read_timeout`` seconds, as pymysql's): a statement whose
  server sent nothing for that long (a proxy that still acknowledges the packets it no longer forwards)
  fails with ``OperationalError`` and its connection is closed, so the pool drops it.

Settings the URL gives win (``read_timeout`` is read here and not passed to libpq; 0: no bound).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Generator
from typing import Any

KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 30_000  # unacknowledged data for this long: the path is dead (libpq 12 and later)


def libpq_options() -> dict[str, int]:
    """The libpq connection parameters that bound a dead path's wait, for this libpq."""
    from psycopg import pq

    return {**KEEPALIVES, "tcp_user_timeout": TCP_USER_TIMEOUT_MS} if pq.version() >= 120000 else dict(KEEPALIVES)


def connect(*args: Any, read_timeout: float | str = 0, **kwargs: Any) -> Any:
    """``psycopg.connect(*args, **kwargs)``, whose waits for the server end after ``read_timeout`` seconds
    in which nothing arrived (0: never)."""
    connection = _bounded_class().connect(*args, **kwargs)
    connection.read_timeout = float(read_timeout)
    return connection


@functools.cache
def _bounded_class() -> Any:
    import psycopg

    class SilentServerError(psycopg.OperationalError):
        """Nothing came from the server for ``read_timeout`` seconds."""

    def answered_within(gen: Generator[Any, Any, Any], seconds: float) -> Generator[Any, Any, Any]:
        """Drive ``gen`` (a psycopg wait generator); raise when ``seconds`` pass without the socket being
        ready. psycopg's wait functions resume it with ``Ready.NONE`` (0) every 0.1 s while waiting."""
        deadline = time.monotonic() + seconds
        try:
            state = next(gen)
            while True:
                ready = yield state
                if ready:
                    deadline = time.monotonic() + seconds
                elif time.monotonic() >= deadline:
                    raise SilentServerError(f"the server sent nothing for {seconds:g} s (read_timeout); "
                                            "connection closed")
                state = gen.send(ready)
        except StopIteration as done:
            return done.value

    class BoundedConnection(psycopg.Connection):  # type: ignore[type-arg]
        read_timeout = 0.0

        def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.read_timeout:
                return super().wait(gen, *args, **kwargs)
            try:
                return super().wait(answered_within(gen, self.read_timeout), *args, **kwargs)
            except SilentServerError:
                self.pgconn.finish()  # mid-statement: unusable; closed, so SQLAlchemy's pool drops it
                raise

    return BoundedConnection
