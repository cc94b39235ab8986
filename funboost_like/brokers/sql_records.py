"""The side tables of the SQLACHEMY broker: key-value records and exchange bindings.

Bindings (emulated routing, DESIGN §9): one table ``fl_bindings`` (exchange, exchange_type, queue,
key; unique per exchange, queue and key), created by the first bind or routed publish.
:func:`add_bindings` reads an exchange's rows and inserts the new ones in one transaction, so an
exchange keeps the type it was first declared with.

Key-value records (RPC results, task filters):

One table per queue, ``<queue table>_kv`` (namespace, key, value, expires_at), created on first use.
The statements are portable SQLAlchemy Core (no dialect's upsert): :meth:`SqlKeyValueStore.put` is
an ``UPDATE``, then an ``INSERT`` when no row matched (then the ``UPDATE`` again if another writer
inserted first); :meth:`SqlKeyValueStore.add_if_absent` is an ``INSERT`` that a primary-key conflict
turns into an ``UPDATE ... WHERE expires_at <= now``, so of concurrent callers exactly one wins.
Expired rows are invisible at once and deleted by a sweep every 1,000 writes or 60 seconds of a
writing process. Keys are at most 255 characters.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from funboost_like.brokers.routing import Binding, added_bindings
from funboost_like.core.errors import BrokerError
from funboost_like.core.stores import KeyValueStore, check_ttl

if TYPE_CHECKING:
    from funboost_like.brokers.sqlalchemy_broker import SqlAlchemyBroker

_KEY_LENGTH = 255
_PURGE_EVERY_WRITES = 1000
_PURGE_EVERY_SECONDS = 60.0


def kv_table(name: str, metadata: sa.MetaData, blob: Any) -> sa.Table:
    """The records table (binary collation on MySQL, so keys differing in case stay distinct)."""
    table = sa.Table(name, metadata, sa.Column("namespace", sa.String(64), primary_key=True),
                     sa.Column("key", sa.String(_KEY_LENGTH), primary_key=True),
                     sa.Column("value", blob, nullable=False), sa.Column("expires_at", sa.Double),
                     mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin")
    sa.Index(f"{name}_exp", table.c.expires_at)
    return table


BINDINGS = "fl_bindings"


def bindings_table(metadata: sa.MetaData) -> sa.Table:
    """The bindings of every exchange (191 characters per name: a unique index fits MySQL's limit)."""
    return sa.Table(BINDINGS, metadata, sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                                                  primary_key=True, autoincrement=True),
                    sa.Column("exchange", sa.String(191), nullable=False),
                    sa.Column("exchange_type", sa.String(16), nullable=False),
                    sa.Column("queue", sa.String(191), nullable=False),
                    sa.Column("key", sa.String(191), nullable=False),
                    sa.UniqueConstraint("exchange", "queue", "key", name=f"{BINDINGS}_unique"),
                    mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin", sqlite_autoincrement=True)


def read_bindings(conn: sa.Connection, table: sa.Table, exchange: str) -> list[Binding]:
    """The bindings of ``exchange``, in the order they were made."""
    query = (sa.select(table.c.exchange, table.c.exchange_type, table.c.queue, table.c.key)
             .where(table.c.exchange == exchange).order_by(table.c.id))
    return [Binding(*row) for row in conn.execute(query)]


def add_bindings(conn: sa.Connection, table: sa.Table, bindings: Sequence[Binding]) -> None:
    """Insert those of ``bindings`` (one exchange) that are new, with the exchange's first type."""
    rows = added_bindings(read_bindings(conn, table, bindings[0].exchange), bindings)
    if rows:
        conn.execute(sa.insert(table), [_row(row) for row in rows])


def _row(binding: Binding) -> dict[str, str]:
    return {"exchange": binding.exchange, "exchange_type": binding.exchange_type, "queue": binding.queue,
            "key": binding.key}


class SqlKeyValueStore(KeyValueStore):
    """The records of one (queue, namespace); see :mod:`funboost_like.core.stores` for the contract."""

    def __init__(self, broker: SqlAlchemyBroker, queue: str, namespace: str) -> None:
        self._broker, self._queue, self.namespace = broker, queue, namespace
        self._writes = 0
        self._next_purge = time.monotonic() + _PURGE_EVERY_SECONDS

    def __repr__(self) -> str:
        return f"SqlKeyValueStore({self._queue!r}, {self.namespace!r})"

    def _run(self, build: Any, *args: Any) -> Any:
        """``build(table, connection, *args)`` in one transaction, errors translated as the broker's."""
        broker = self._broker
        try:
            table = broker._kv_table(self._queue)
            return broker._tx(lambda conn: build(table, conn, *args))
        except broker._client_errors as exc:
            raise broker._translated(exc, f"using the records of queue {self._queue!r}") from exc

    def _key(self, table: sa.Table, key: str) -> Any:
        if len(key) > _KEY_LENGTH:
            raise ValueError(f"a key of the SQL records is at most {_KEY_LENGTH} characters, got {len(key)}")
        return sa.and_(table.c.namespace == self.namespace, table.c.key == key)

    @staticmethod
    def _live(table: sa.Table, now: float) -> Any:
        return sa.or_(table.c.expires_at.is_(None), table.c.expires_at > now)

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes >= _PURGE_EVERY_WRITES or time.monotonic() >= self._next_purge:
            self._writes, self._next_purge = 0, time.monotonic() + _PURGE_EVERY_SECONDS
            self.purge_expired()

    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        ttl = check_ttl(ttl)
        row = {"value": bytes(value), "expires_at": None if ttl is None else time.time() + ttl}

        def update(table: sa.Table, conn: sa.Connection) -> int:
            return int(conn.execute(sa.update(table).where(self._key(table, key)).values(row)).rowcount)

        def insert(table: sa.Table, conn: sa.Connection) -> None:
            conn.execute(sa.insert(table).values(namespace=self.namespace, key=key, **row))

        if not self._run(update):
            try:
                self._run(insert)
            except BrokerError as exc:
                if not isinstance(exc.__cause__, sa.exc.IntegrityError):
                    raise
                self._run(update)  # another writer inserted it meanwhile: last write wins
        self._wrote()

    def get(self, key: str) -> bytes | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}

        def select(table: sa.Table, conn: sa.Connection) -> dict[str, bytes]:
            query = sa.select(table.c.key, table.c.value).where(
                table.c.namespace == self.namespace, table.c.key.in_(list(keys)), self._live(table, time.time()))
            return {str(k): bytes(v) for k, v in conn.execute(query)}

        return dict(self._run(select))

    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        ttl = check_ttl(ttl)

        def insert(table: sa.Table, conn: sa.Connection) -> None:
            conn.execute(sa.insert(table).values(namespace=self.namespace, key=key, value=bytes(value),
                                                 expires_at=None if ttl is None else time.time() + ttl))

        def take_expired(table: sa.Table, conn: sa.Connection) -> int:
            now = time.time()
            statement = sa.update(table).where(self._key(table, key), table.c.expires_at.is_not(None),
                                               table.c.expires_at <= now)
            return int(conn.execute(statement.values(
                value=bytes(value), expires_at=None if ttl is None else now + ttl)).rowcount)

        try:
            self._run(insert)
        except BrokerError as exc:
            if not isinstance(exc.__cause__, sa.exc.IntegrityError):
                raise
            if not self._run(take_expired):
                return False
        self._wrote()
        return True

    def delete(self, key: str) -> None:
        self._run(lambda table, conn: conn.execute(sa.delete(table).where(self._key(table, key))))

    def purge_expired(self) -> int:
        """Delete the expired rows of every namespace of the queue now; return how many."""
        return int(self._run(lambda table, conn: conn.execute(
            sa.delete(table).where(table.c.expires_at.is_not(None), table.c.expires_at <= time.time())).rowcount))
