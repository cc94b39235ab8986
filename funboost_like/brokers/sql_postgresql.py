"""PostgreSQL extras of the SQLACHEMY broker (psycopg 3): LISTEN/NOTIFY wake-ups and COPY bulk inserts.

* :func:`create_notify_trigger`: a statement trigger on a queue's table that notifies the channel
  named like the table after every insert (one shared function ``funboost_like_notify``), so rows
  inserted by any client wake the consumers;
* :class:`Listener`: one autocommit psycopg connection per thread, outside SQLAlchemy's pool, that
  ``LISTEN``s on the channels of the queues the thread fetches from;
* :func:`copy_rows`: ``COPY ... FROM STDIN`` on the pooled connection, about ten times an executemany.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import sqlalchemy as sa

from funboost_like.brokers import sql_psycopg
from funboost_like.brokers import sqlalchemy_tables as tables

logger = logging.getLogger("funboost_like.sqlalchemy")

LISTEN_SLICE = 0.25  # an idle consumer looks at least this often (delays coming due, leases running out)


def create_notify_trigger(engine: sa.Engine, table: str) -> None:
    """Make the trigger of ``table`` unless it exists (a concurrent maker's error means it exists)."""
    exists = sa.text("SELECT 1 FROM pg_trigger WHERE tgname = :name AND tgrelid = to_regclass(:table)")
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                if conn.execute(exists, {"name": f"{table}_notify", "table": table}).first():
                    return
                if not conn.execute(sa.text("SELECT 1 FROM pg_proc WHERE proname = 'funboost_like_notify'")).first():
                    conn.execute(sa.text(
                        "CREATE OR REPLACE FUNCTION funboost_like_notify() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$ BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $$"))
                conn.execute(sa.text(f'CREATE TRIGGER "{table}_notify" AFTER INSERT ON "{table}" '
                                     f"FOR EACH STATEMENT EXECUTE FUNCTION funboost_like_notify('{table}')"))
            return
        except sa.exc.DBAPIError:
            if attempt == 2:
                raise
            time.sleep(0.05)


def copy_rows(conn: sa.Connection, table: str, rows: list[tuple[int, float, bytes]]) -> None:
    """``COPY`` (priority, visible_at, body) rows into ``table``, in order; a driver error as SQLAlchemy's."""
    import psycopg

    statement = f'COPY "{table}" (priority, visible_at, body) FROM STDIN'
    try:
        raw: Any = conn.connection.dbapi_connection
        with raw.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    except psycopg.Error as exc:
        raise sa.exc.DBAPIError.instance(statement, None, exc, psycopg.Error, hide_parameters=True) from exc


class Listener(threading.local):
    """This thread's LISTEN connection and the channels it listens on."""

    connection: Any = None
    channels: set[str]

    def wait(self, engine: sa.Engine, channel: str, timeout: float) -> None:
        """Return on a notification of any channel this thread listens on, or after ``min(timeout,
        LISTEN_SLICE)``. The first call for a channel only starts listening and returns at once (the
        caller fetches again, so nothing published before is missed). Never raises: on a database
        error it waits the slice and the next fetch reports the error."""
        try:
            if self.connection is None or self.connection.closed:
                params: dict[str, Any] = tables.driver_timeouts(engine.url)  # the URL's own stay in the URL
                params["read_timeout"] = engine.url.query.get("read_timeout", params.get("read_timeout", 0))
                url = engine.url.difference_update_query(["read_timeout"]).set(drivername="postgresql")
                self.connection = sql_psycopg.connect(url.render_as_string(hide_password=False), autocommit=True,
                                                      **params)
                self.channels = set()
            if channel not in self.channels:
                self.connection.execute(f'LISTEN "{channel}"')
                self.channels.add(channel)
                return
            for _ in self.connection.notifies(timeout=min(timeout, LISTEN_SLICE), stop_after=1):
                break
        except Exception as exc:
            logger.debug("LISTEN failed (%s); polling until the next fetch", type(exc).__name__)
            self.close()
            time.sleep(min(timeout, LISTEN_SLICE))

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()
