"""The tables of a SQLACHEMY queue and the statements on them, and the engine of a URL.

:class:`QueueTables` declares a queue's messages table (with the take index: priority descending,
then id, then ``visible_at``), its dead letters and its key-value records, and compiles the
statements :class:`~funboost_like.brokers.sqlalchemy_broker.SqlAlchemyBroker` runs on them once.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from funboost_like.brokers import sql_psycopg
from funboost_like.brokers.sql_records import kv_table
from funboost_like.core.config import redact_url
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.runtime import cooperative_psycopg

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: an INTEGER PRIMARY KEY is the rowid
BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")  # MySQL's BLOB stops at 64 KiB


def table_name(queue: str) -> str:
    """``fl_<lower-case queue name, other characters as _, at most 36>_<8 hex of its sha1>``: a plain
    identifier on every database (at most 48 characters), distinct for distinct queue names."""
    safe = re.sub(r"[^a-z0-9]+", "_", queue.lower()).strip("_")[:36]
    return f"fl_{safe}_{hashlib.sha1(queue.encode()).hexdigest()[:8]}"


class QueueTables:
    """The tables of one queue and the statements on them (compiled once, cached by SQLAlchemy)."""

    def __init__(self, queue: str) -> None:
        name = self.name = table_name(queue)
        meta = self.metadata = sa.MetaData()
        t = self.messages = sa.Table(
            name, meta, sa.Column("id", ID, primary_key=True, autoincrement=True),
            sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
            sa.Column("visible_at", sa.Double, nullable=False), sa.Column("owner", sa.String(64)),
            sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
            sa.Column("crashes", sa.Integer, nullable=False, server_default="0"),
            sa.Column("body", BLOB, nullable=False), sqlite_autoincrement=True)  # ids never reused
        take_index = sa.Index(f"{name}_take", t.c.priority.desc(), t.c.id, t.c.visible_at)
        d = self.dead = sa.Table(
            f"{name}_dl", meta, sa.Column("id", ID, primary_key=True, autoincrement=True),
            sa.Column("message_id", sa.BigInteger), sa.Column("body", BLOB, nullable=False),
            sa.Column("reason", sa.Text, nullable=False), sa.Column("failed_at", sa.Double, nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False), sqlite_autoincrement=True)
        self.kv = kv_table(f"{name}_kv", meta, BLOB)
        self.kv_created = False
        self.channel = name
        pick = t.alias("pick")
        ready = (sa.select(pick.c.id).where(pick.c.visible_at <= sa.bindparam("now"))
                 .order_by(pick.c.priority.desc(), pick.c.id).limit(sa.bindparam("n")))
        # crashes first: MySQL evaluates SET assignments left to right, each seeing the ones before
        claim: tuple[tuple[Any, Any], ...] = (
            (t.c.crashes, t.c.crashes + sa.case((t.c.owner.is_(None), 0), else_=1)), (t.c.owner, sa.bindparam("me")),
            (t.c.visible_at, sa.bindparam("until")), (t.c.attempts, t.c.attempts + 1))
        self.take = (sa.update(t).where(t.c.id.in_(ready.with_for_update(skip_locked=True).scalar_subquery()))
                     .ordered_values(*claim).returning(t.c.id, t.c.body, t.c.attempts, t.c.priority, t.c.crashes))
        self.lock_ready = (sa.select(t.c.id, t.c.body, t.c.attempts, t.c.priority, t.c.crashes, t.c.owner)
                           .where(t.c.visible_at <= sa.bindparam("now")).order_by(t.c.priority.desc(), t.c.id)
                           .limit(sa.bindparam("n")).with_for_update(skip_locked=True)
                           # not a full scan and a sort of the queue (MariaDB's choice once the body is selected)
                           .with_hint(t, f"FORCE INDEX ({take_index.name})", "mysql")
                           .with_hint(t, f"FORCE INDEX ({take_index.name})", "mariadb"))
        ids = t.c.id.in_(sa.bindparam("ids", expanding=True))
        self.mark = sa.update(t).where(ids).ordered_values(*claim)
        owned = sa.and_(t.c.owner == sa.bindparam("me"), ids)
        self.delete = sa.delete(t).where(owned)
        self.renew = sa.update(t).where(owned).values(visible_at=sa.bindparam("at"))
        self.disown = sa.update(t).where(owned).values(visible_at=sa.bindparam("at"), owner=None)
        columns = ("priority", "attempts", "crashes", "body")
        self.requeue = (  # at the back: the owned rows copied under new ids, then deleted
            sa.insert(t).from_select(["visible_at", *columns], sa.select(
                sa.bindparam("at", type_=sa.Float), *(t.c[name] for name in columns)).where(owned).order_by(t.c.id)),
            sa.delete(t).where(owned))
        self.release = sa.update(t).where(owned).values(
            visible_at=sa.bindparam("at"), owner=None, attempts=sa.case((t.c.attempts > 0, t.c.attempts - 1), else_=0))
        waiting = sa.or_(t.c.owner.is_(None), t.c.visible_at <= sa.bindparam("now"))
        self.purge = sa.delete(t).where(waiting)
        self.count = sa.select(sa.func.count()).select_from(t).where(waiting)
        self.bury = (sa.delete(t).where(t.c.owner == sa.bindparam("me"), t.c.id == sa.bindparam("row")),
                     sa.insert(d))


# A server that accepts and then says nothing (frozen, or a black hole on the way) must not hold a push
# or a fetch forever: the drivers' own defaults wait without end. Given in the URL, a driver's own value
# wins (psycopg: libpq's keepalives too, see sql_psycopg).
CONNECT_TIMEOUT = 10  # seconds to open a connection (psycopg: all of it; pymysql: the TCP connection)
READ_TIMEOUT = 60  # any one read, its handshake's included (longer than InnoDB's 50 s lock wait)


def driver_timeouts(parsed: sa.URL) -> dict[str, Any]:
    """The drivers' connect arguments that bound a silent server's wait, unless the URL sets them."""
    if parsed.get_driver_name() == "psycopg":
        wanted = {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT, **sql_psycopg.libpq_options()}
    elif parsed.get_driver_name() == "pymysql":
        wanted = {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT, "write_timeout": READ_TIMEOUT}
    else:
        return {}
    return {name: value for name, value in wanted.items() if name not in parsed.query}


def make_engine(url: str) -> sa.Engine:
    try:
        parsed = sa.make_url(url)
        # hide_parameters: bodies never reach an error message or a log; no reset on return: every use
        # of a connection ends with its own commit or rollback (pymysql would send one more ROLLBACK)
        options: dict[str, Any] = {"hide_parameters": True, "pool_reset_on_return": None,
                                   "connect_args": driver_timeouts(parsed)}
        if parsed.get_backend_name() in ("mysql", "mariadb"):
            options["isolation_level"] = "READ COMMITTED"  # no gap locks: publishers never wait on a take
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)  # first use: the folder too
        engine = sa.create_engine(parsed, **options)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError, ValueError) as exc:
        reason = str(exc).replace(url, redact_url(url)) if isinstance(exc, ImportError) else type(exc).__name__
        raise ConfigurationError(f"SQLALCHEMY_URL {redact_url(url)!r} cannot be used ({reason}); a driver may be "
                                 "missing: pip install 'funboost_like[sql]'") from None
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    if engine.dialect.driver == "psycopg":
        cooperative_psycopg()
        sa.event.listen(engine, "do_connect", _psycopg_connect)
    return engine


def _psycopg_connect(_dialect: Any, _record: Any, args: Any, params: dict[str, Any]) -> Any:
    """A connection whose waits for the server end after ``read_timeout`` seconds of silence."""
    return sql_psycopg.connect(*args, **params)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def create_tables(engine: sa.Engine, metadata: sa.MetaData, tables: list[sa.Table]) -> None:
    """Create ``tables`` unless they exist; another process creating them at the same time is fine."""
    for attempt in range(3):
        try:
            metadata.create_all(engine, tables=tables, checkfirst=True)
            return
        except sa.exc.DBAPIError:
            if attempt == 2:
                raise
            time.sleep(0.05)
