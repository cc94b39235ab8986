"""SQLACHEMY: queues in any SQL database SQLAlchemy 2 reaches (PostgreSQL, MySQL/MariaDB, SQLite, ...).

Guarantee: at-least-once, the :class:`~funboost_like.brokers.leased_table.LeasedTable` way: a fetched
message is leased to its consumer process and the lease is renewed every ``lease / 3`` seconds; a
killed consumer's messages come back after at most ``SQLALCHEMY_LEASE_SECONDS`` (its death counted
for the poison-message rule). Acked rows are deleted.

Settings: ``SQLALCHEMY_URL`` (environment ``FUNBOOST_LIKE_SQLALCHEMY_URL``; ``SQLACHEMY_ENGINE_URL``,
the seed's spelling, is an alias at every level; empty: ``sqlite:///<SQLITE_QUEUES_PATH
folder>/sqlalchemy_queues.sqlite3``, beside the embedded broker's files) and
``SQLALCHEMY_LEASE_SECONDS``. The URL's password never appears in a log or an error message.

Tables, created on first use of a queue (never at import), named from the queue
(:func:`table_name`: ``fl_<safe name>_<hash>``): the messages, ``..._dl`` (dead letters with their
reason) and, when RPC results or task filtering are used, ``..._kv`` (records with expiry). The take
is one ``UPDATE ... WHERE id IN (SELECT ... ORDER BY priority DESC, id LIMIT n FOR UPDATE SKIP
LOCKED) RETURNING ...`` where the database can (PostgreSQL; SQLite, whose write lock makes it
atomic), else a ``SELECT ... FOR UPDATE SKIP LOCKED`` and an ``UPDATE`` in one transaction (MySQL 8,
MariaDB 10.6+, in READ COMMITTED so publishers never wait on gap locks). The consumer's acks and its
next take share one transaction. ``publish_many`` is one executemany in one transaction (a ``COPY``
on PostgreSQL). Emulated routing: bindings in ``fl_bindings``, a routed publish inserts into every
matching queue's table in one transaction (see :mod:`funboost_like.brokers.sql_records`).

On PostgreSQL an idle consumer ``LISTEN``s: a statement trigger on the messages table notifies at
every insert, so a published message wakes it within milliseconds; it still looks every 250 ms, for
delayed messages coming due and leases running out (:mod:`funboost_like.brokers.sql_postgresql`).
Elsewhere the base polls (2 ms to 50 ms). See docs/sql.md.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa

from funboost_like.brokers.base import Capabilities, DeadLetter
from funboost_like.brokers.leased_table import Claimed, LeasedTable, claimed
from funboost_like.brokers.routing import Binding
from funboost_like.brokers.sql_postgresql import Listener, copy_rows, create_notify_trigger
from funboost_like.brokers.sql_records import SqlKeyValueStore, add_bindings, bindings_table, read_bindings
from funboost_like.brokers.sqlalchemy_tables import QueueTables, create_tables, make_engine
from funboost_like.core.config import data_dir_setting, redact_url, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import MessageTooLargeError
from funboost_like.core.stores import check_namespace

T = TypeVar("T")
KEPT_CONNECTIONS = 4  # idle autocommit connections kept for lone statements (the pool holds 5 + 10 overflow)
_TRANSIENT_STATES = {"40001", "40P01"}  # PostgreSQL: serialization failure, deadlock
_TRANSIENT_MYSQL = {1205, 1213}  # lock wait timeout, deadlock


def engine_url() -> str:
    """The configured URL (SQLALCHEMY_URL, alias SQLACHEMY_ENGINE_URL), else the default SQLite file."""
    url = str(settings.get("SQLALCHEMY_URL") or "")
    return url or f"sqlite:///{data_dir_setting('SQLITE_QUEUES_PATH', 'sqlite_queues') / 'sqlalchemy_queues.sqlite3'}"


def _transient(exc: sa.exc.DBAPIError) -> bool:
    """A deadlock or lock timeout (the transaction was rolled back and may simply run again)."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _TRANSIENT_STATES:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and (args[0] in _TRANSIENT_MYSQL or args[0] == "database is locked")


class SqlAlchemyBroker(LeasedTable):
    """At-least-once queues in a SQL database, shared by processes on any host that reaches it.

    One instance serves a whole process; every method is thread-safe (SQLAlchemy's pool gives each
    call its own connection). A forked child opens its own connections.
    """

    kind = BrokerEnum.SQLACHEMY
    capabilities = Capabilities(redelivery="lease", delay="native", max_priority=2**31 - 1, dead_letters=True,
                                key_value=True, routing="emulated", persistent=True, cross_process=True,
                                cross_host=True)
    connection_errors = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError,
                         sa.exc.TimeoutError)
    errors = (sa.exc.SQLAlchemyError,)
    lease_setting = "SQLALCHEMY_LEASE_SECONDS"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._engine: sa.Engine | None = None
        self._single: sa.Engine | None = None
        self._kept: deque[sa.Connection] = deque()  # idle autocommit connections (see _autocommit)
        self._psycopg = False
        self._url = ""
        self._queues: dict[str, QueueTables] = {}
        self._stores: dict[tuple[str, str], SqlKeyValueStore] = {}
        self._bindings_table: sa.Table | None = None
        self._listener = Listener()  # PostgreSQL: each thread's LISTEN connection

    def _where(self) -> str:
        return f"the SQL database {redact_url(self._url or engine_url())}"

    # -- plumbing -------------------------------------------------------------------------------
    def engine(self) -> sa.Engine:
        """The engine for the configured URL, made on first use."""
        engine = self._engine
        if engine is None:
            with self._lock:
                if self._engine is None:
                    self._url = engine_url()
                    engine = make_engine(self._url)
                    postgresql = engine.dialect.name == "postgresql"
                    # A lone statement in autocommit mode is one round trip, not two or three (SQLite: no
                    # network, and its own transaction handling: left as it is)
                    self._single = (engine.execution_options(isolation_level="AUTOCOMMIT")
                                    if engine.dialect.name != "sqlite" else None)
                    self._psycopg = postgresql and engine.driver == "psycopg"  # LISTEN/NOTIFY and COPY
                    self._waits = self._psycopg  # the base polls the other databases
                    self._engine = engine
                engine = self._engine
        return engine

    def _queue(self, queue: str) -> QueueTables:
        """The queue's tables, created on first use (by whichever process comes first)."""
        q = self._queues.get(queue)
        if q is None:
            engine = self.engine()
            with self._lock:
                q = self._queues.get(queue)
                if q is None:
                    q = QueueTables(queue)
                    create_tables(engine, q.metadata, [q.messages, q.dead])
                    if engine.dialect.name == "postgresql":
                        create_notify_trigger(engine, q.name)
                    self._queues[queue] = q
        return q

    def _tx(self, work: Callable[[sa.Connection], T], single: bool = False) -> T:
        """``work(connection)`` in one transaction, run again (up to 3 times) after a deadlock, or on a
        fresh connection when the server had closed the one taken (a restart, an idle timeout such as
        MariaDB's ``wait_timeout``, a proxy): the pool drops it, and every kept connection is let go.
        ``single``: ``work`` runs one statement, in autocommit mode on a kept connection (one round trip,
        and no pool checkout: about half the cost of a one-by-one push)."""
        engine = self.engine()
        for attempt in range(3):
            try:
                if single and self._single is not None:
                    return self._autocommit(work)
                with engine.begin() as conn:
                    return work(conn)
            except sa.exc.DBAPIError as exc:
                if attempt == 2 or not (exc.connection_invalidated or _transient(exc)):
                    raise
                if exc.connection_invalidated:
                    self._let_kept_go()
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _let_kept_go(self) -> None:
        """Close the kept connections (older than a disconnect the pool saw: likely closed too)."""
        while True:
            try:
                self._kept.pop().close()
            except IndexError:
                return

    def _autocommit(self, work: Callable[[sa.Connection], T]) -> T:
        """``work`` on an autocommit connection of :attr:`_kept` (at most ``KEPT_CONNECTIONS`` wait there
        between uses, checked out of the pool; any thread takes one). One that failed is not kept."""
        kept = self._kept
        try:
            conn = kept.pop()
        except IndexError:
            assert self._single is not None
            conn = self._single.connect()
        try:
            result = work(conn)
        except BaseException:
            conn.close()  # maybe broken (the pool invalidates it on a disconnect)
            raise
        if len(kept) < KEPT_CONNECTIONS:
            kept.append(conn)
        else:
            conn.close()
        return result

    def key_value_store(self, queue: str, namespace: str) -> SqlKeyValueStore:
        """The records of ``namespace`` in the queue's ``..._kv`` table (created on first use)."""
        key = (queue, check_namespace(namespace))
        store = self._stores.get(key)
        if store is None:
            with self._lock:
                store = self._stores.setdefault(key, SqlKeyValueStore(self, queue, namespace))
        return store

    def _kv_table(self, queue: str) -> sa.Table:
        q = self._queue(queue)
        if not q.kv_created:
            create_tables(self.engine(), q.metadata, [q.kv])
            q.kv_created = True
        return q.kv

    # -- storage operations ----------------------------------------------------------------------
    def _insert(self, queue: str, priority: int, visible_at: float, bodies: Sequence[bytes]) -> None:
        try:
            self._insert_rows(queue, priority, visible_at, bodies)
        except sa.exc.OperationalError:
            self._check_size(bodies)
            raise

    def _check_size(self, bodies: Sequence[bytes]) -> None:
        """After a failed insert: MySQL and MariaDB drop the connection of a statement longer than their
        ``max_allowed_packet``, which reads as an outage; raise MessageTooLargeError when that was it."""
        engine = self.engine()
        largest = max(bodies, key=len)
        if engine.dialect.name not in ("mysql", "mariadb") or len(largest) < 1 << 20:
            return
        escaped = len(largest) + sum(largest.count(c) for c in (b"\\", b"'", b'"', b"\0", b"\n", b"\r", b"\x1a"))
        try:
            with engine.connect() as conn:
                limit = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar() or 0)
        except sa.exc.SQLAlchemyError:
            return  # the server is in fact unreachable: the caller's error says so
        if escaped + 1024 > limit:
            raise MessageTooLargeError(f"{self._where()} refused a message of {len(largest):,} bytes ({escaped:,} as "
                                       f"sent): over the server's max_allowed_packet of {limit:,} bytes; raise it "
                                       "on the server or publish a smaller message")

    def _insert_rows(self, queue: str, priority: int, visible_at: float, bodies: Sequence[bytes]) -> None:
        q = self._queue(queue)
        if len(bodies) > 1 and self._psycopg:  # COPY: about ten times an executemany
            self._tx(lambda conn: copy_rows(conn, q.name, [(priority, visible_at, bytes(b)) for b in bodies]))
            return
        if len(bodies) == 1 and self._single is not None and self.engine().dialect.paramstyle in ("format", "pyformat"):
            # One push: the driver's own statement, in autocommit (no compiled INSERT ... RETURNING id,
            # which SQLAlchemy adds to hand back an id nobody needs here)
            sql = f"INSERT INTO {q.name} (priority, visible_at, body) VALUES (%s, %s, %s)"
            self._tx(lambda conn: conn.exec_driver_sql(sql, (priority, visible_at, bytes(bodies[0]))), True)
            return
        rows = [{"priority": priority, "visible_at": visible_at, "body": bytes(b)} for b in bodies]
        self._tx(lambda conn: conn.execute(q.messages.insert(), rows if len(rows) > 1 else rows[0]), len(rows) == 1)

    def _claim(self, queue: str, now: float, lease_until: float, max_n: int) -> list[Claimed]:
        return self._delete_and_claim(queue, (), now, lease_until, max_n)

    def _delete_and_claim(self, queue: str, ids: Sequence[Any], now: float, lease_until: float,
                          max_n: int) -> list[Claimed]:
        """Delete the owned rows ``ids`` and take up to ``max_n``, in one transaction."""
        q = self._queue(queue)
        params = {"now": now, "n": max_n, "me": self.owner, "until": lease_until}
        returning = self.engine().dialect.update_returning

        def delete_and_claim(conn: sa.Connection) -> list[Claimed]:
            if ids:
                conn.execute(q.delete, {"me": self.owner, "ids": list(ids)})
            if returning:
                return [Claimed(r[0], bytes(r[1]), *r[2:]) for r in conn.execute(q.take, params)]
            rows = conn.execute(q.lock_ready, params).all()
            if rows:
                conn.execute(q.mark, {**params, "ids": [r[0] for r in rows]})
            return [claimed(*r[:5], had_owner=r[5] is not None) for r in rows]

        return self._tx(delete_and_claim, single=returning and not ids)

    def _delete(self, queue: str, ids: Sequence[Any]) -> None:
        q = self._queue(queue)
        self._tx(lambda conn: conn.execute(q.delete, {"me": self.owner, "ids": list(ids)}), single=True)

    def _update_owned(self, queue: str, ids: Sequence[Any], *, visible_at: float, disown: bool,
                      attempts_delta: int) -> None:
        q = self._queue(queue)
        statement = q.renew if not disown else q.disown if attempts_delta >= 0 else q.release
        self._tx(lambda conn: conn.execute(statement, {"me": self.owner, "ids": list(ids), "at": visible_at}), True)

    def _move_back(self, queue: str, ids: Sequence[Any], visible_at: float) -> None:
        copy, delete = self._queue(queue).requeue
        values = {"me": self.owner, "ids": list(ids), "at": visible_at}
        self._tx(lambda conn: (conn.execute(copy, values), conn.execute(delete, values)))

    def _bury(self, queue: str, row_id: Any, letter: DeadLetter) -> None:
        """Delete the owned row and keep the letter, in one transaction (nothing if no longer owned)."""
        q = self._queue(queue)
        delete, insert = q.bury

        def bury(conn: sa.Connection) -> None:
            if conn.execute(delete, {"me": self.owner, "row": row_id}).rowcount:
                conn.execute(insert, {"message_id": row_id, "body": letter.body, "reason": letter.reason,
                                      "failed_at": letter.failed_at, "attempts": letter.attempts})

        self._tx(bury)

    def _delete_waiting(self, queue: str, now: float) -> int:
        q = self._queue(queue)
        return int(self._tx(lambda conn: conn.execute(q.purge, {"now": now}).rowcount, single=True))

    def _count_waiting(self, queue: str, now: float) -> int:
        q = self._queue(queue)
        return int(self._tx(lambda conn: conn.execute(q.count, {"now": now}).scalar_one(), single=True))

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        d = self._queue(queue).dead
        query = (sa.select(d.c.body, d.c.reason, d.c.failed_at, d.c.attempts, d.c.id).order_by(d.c.id.desc())
                 .limit(max(0, limit)))
        rows = self._tx(lambda conn: conn.execute(query).all())
        return [DeadLetter(queue, bytes(body), reason, at, attempts, ref=row_id)
                for body, reason, at, attempts, row_id in rows]

    def _heads(self, queue: str) -> list[bytes]:
        t = self._queue(queue).messages
        query = sa.select(t.c.body).where(t.c.owner.is_(None), t.c.visible_at <= time.time()).order_by(t.c.id).limit(1)
        return [bytes(body) for (body,) in self._tx(lambda conn: conn.execute(query).all())]

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        t = self._queue(queue).messages
        query = (sa.select(t.c.visible_at, t.c.body).where(t.c.owner.is_(None), t.c.visible_at > time.time())
                 .order_by(t.c.visible_at, t.c.id).limit(max(0, limit)))
        return [(float(at), bytes(body)) for at, body in self._tx(lambda conn: conn.execute(query).all())]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        d = self._queue(queue).dead
        return int(self._tx(lambda conn: conn.execute(sa.delete(d).where(d.c.id == letter.ref)).rowcount)) == 1

    def purge_dead_letters(self, queue: str) -> int:
        d = self._queue(queue).dead
        return int(self._tx(lambda conn: conn.execute(sa.delete(d)).rowcount))

    def drop_tables(self, queue: str) -> None:
        """Drop every table of ``queue`` (its messages, dead letters and records are lost). Stop the
        queue's consumers and publishers first, in every process: they keep using the tables they made."""
        q = self._queues.pop(queue, None) or QueueTables(queue)
        q.metadata.drop_all(self.engine(), checkfirst=True)

    # -- routing (emulated: DESIGN §9) ------------------------------------------------------------
    def _routes(self) -> sa.Table:
        """The bindings table, created on first use."""
        table = self._bindings_table
        if table is None:
            table = bindings_table(sa.MetaData())
            create_tables(self.engine(), table.metadata, [table])
            self._bindings_table = table
        return table

    def _bind(self, bindings: Sequence[Binding]) -> None:
        table = self._routes()
        try:
            self._tx(lambda conn: add_bindings(conn, table, bindings))
        except sa.exc.IntegrityError:  # another process added one of them at the same moment
            self._tx(lambda conn: add_bindings(conn, table, bindings))

    def _bindings(self, exchange: str) -> list[Binding]:
        table = self._routes()
        return self._tx(lambda conn: read_bindings(conn, table, exchange))

    def _put_many(self, queues: Sequence[str], bodies: Sequence[bytes], *, priority: int,
                  not_before: float | None) -> None:
        """Insert into every queue's table in one transaction: all of them get the messages, or none."""
        now = time.time()
        visible_at = float(not_before) if not_before is not None and float(not_before) > now else now
        rows = [{"priority": int(priority), "visible_at": visible_at, "body": bytes(b)} for b in bodies]
        tables = [self._queue(queue).messages for queue in sorted(queues)]

        def insert_all(conn: sa.Connection) -> None:
            for table in tables:
                conn.execute(table.insert(), rows)

        try:
            self._tx(insert_all)
        except sa.exc.OperationalError:
            self._check_size(bodies)
            raise

    # -- waiting (PostgreSQL) ----------------------------------------------------------------------
    def _wait(self, queue: str, timeout: float) -> None:
        """PostgreSQL with psycopg 3: block until the queue's trigger notifies (a publish), at most 250 ms.
        Other databases never get here: the base polls them (see :meth:`engine`)."""
        self._listener.wait(self.engine(), self._queue(queue).channel, timeout)

    def _after_fork(self) -> None:
        super()._after_fork()
        if self._engine is not None:
            self._engine.dispose(close=False)  # the parent's connections stay the parent's
        self._kept = deque()  # the parent's too (not closed: they are its sockets)
        self._listener = Listener()  # so does its LISTEN connection

    def _close(self) -> None:
        with self._lock:
            engine, self._engine, self._single, self._queues, self._stores = self._engine, None, None, {}, {}
            self._bindings_table = None
        self._let_kept_go()
        self._listener.close()  # this thread's; the others' are closed with their threads
        self._listener = Listener()
        if engine is not None:
            engine.dispose()
