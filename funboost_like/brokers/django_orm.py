"""DJANGO_ORM: queues in the tables of the Django app ``funboost_like.contrib.django``, through the ORM.

Add ``"funboost_like.contrib.django"`` to ``INSTALLED_APPS`` and run ``manage.py migrate``: the
queues live on the project's own database (the alias: framework setting ``DJANGO_DATABASE_ALIAS``,
else the Django setting ``FUNBOOST_LIKE_DATABASE``, else ``"default"``), one table for every queue
(:class:`~funboost_like.contrib.django.models.QueuedMessage`, its ``queue`` column the seeds' topic).
A process that has not set Django up gets it set up on first use (see
:mod:`funboost_like.contrib.django.conf`). See docs/django.md.

Guarantee: at-least-once, the :class:`~funboost_like.brokers.leased_table.LeasedTable` way: a fetched
message is leased to its consumer process and the lease renewed every ``lease / 3`` seconds; a killed
consumer's messages come back after at most ``DJANGO_LEASE_SECONDS``, its death counted for the
poison-message rule. Acked rows are deleted; dead letters keep their reason.

The take runs in ``transaction.atomic``: ``select_for_update(skip_locked=True)`` of the ready rows,
highest priority first, then an ``UPDATE`` marking them (PostgreSQL, MySQL 8, MariaDB 10.6+; a
blocking ``select_for_update`` on databases without SKIP LOCKED). On SQLite, whose writers take
turns, the take is one ``UPDATE ... WHERE id IN (SELECT ... LIMIT n)`` that marks the rows with a
lease end unique in the process, then reads back the rows so marked, in the same transaction.
A publish is one plain ``INSERT`` on the ORM's connection (without the ``RETURNING`` of ``save``),
``publish_many`` an ``executemany`` in one transaction.

Connections: on first use, the alias's ``OPTIONS`` get the bounds on a silent server they do not set
(:func:`_bound_waits`: libpq's keepalives, MySQL's read and write timeouts; see docs/django.md).

Threads and processes: Django keeps one connection per thread; each operation first closes this
thread's connection if it failed or outlived ``CONN_MAX_AGE`` (what ``close_old_connections`` does at
a request's edges), and runs again after a deadlock or a lock timeout. A call from a thread running an
event loop (an async view, a coroutine consumer), where Django refuses synchronous ORM calls, runs on
a helper thread of this broker while the caller waits. A forked child drops the Django connections
inherited from its parent (never closing them: they are the parent's) and opens its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.db import DatabaseError, IntegrityError, InterfaceError, OperationalError, connections, transaction
from django.db.models import Case, F, Q, Value, When

from funboost_like.brokers.base import Capabilities, DeadLetter
from funboost_like.brokers.django_records import DjangoKeyValueStore
from funboost_like.brokers.leased_table import Claimed, LeasedTable, claimed
from funboost_like.brokers.routing import Binding, added_bindings
from funboost_like.brokers.sql_psycopg import KEEPALIVES, TCP_USER_TIMEOUT_MS
from funboost_like.contrib.django import conf
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.runtime import cooperative_psycopg
from funboost_like.core.stores import check_namespace

T = TypeVar("T")
_BATCH = 1000  # rows per executemany of a bulk publish
_TRANSIENT_STATES = {"40001", "40P01"}  # PostgreSQL: serialization failure, deadlock
_TRANSIENT_CODES = {1205, 1213, "database is locked"}  # MySQL: lock wait timeout, deadlock; SQLite
_COLUMNS = ("id", "body", "attempts", "priority", "crashes")
# A server that says nothing must not hold a push or a fetch forever (see _bound_waits; OPTIONS win)
CONNECT_TIMEOUT = 10  # seconds to open a connection
READ_TIMEOUT = 60  # MySQL and MariaDB: any one read or write (longer than InnoDB's 50 s lock wait)


def _transient(exc: BaseException) -> bool:
    """A deadlock or lock timeout: the transaction was rolled back and may simply run again."""
    if getattr(exc.__cause__, "sqlstate", None) in _TRANSIENT_STATES:
        return True
    args: tuple[Any, ...] = getattr(exc, "args", ())
    return bool(args) and isinstance(args[0], (int, str)) and args[0] in _TRANSIENT_CODES


def _in_event_loop() -> bool:
    """Whether this thread runs an event loop (where Django refuses synchronous ORM calls)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _bound_waits(connection: Any) -> None:
    """Give the alias's ``OPTIONS`` the bounds on a silent server that it does not set itself (the drivers
    wait without end): libpq's keepalives on PostgreSQL, read and write timeouts on MySQL and MariaDB."""
    if connection.vendor == "postgresql":
        database = connection.Database  # psycopg or psycopg2
        pq = getattr(database, "pq", None)
        libpq = pq.version() if pq is not None else database.extensions.libpq_version()
        wanted: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT, **KEEPALIVES}
        if libpq >= 120000:
            wanted["tcp_user_timeout"] = TCP_USER_TIMEOUT_MS
    elif connection.vendor == "mysql":
        wanted = {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT, "write_timeout": READ_TIMEOUT}
    else:
        return
    connection.settings_dict["OPTIONS"] = {**wanted, **connection.settings_dict.get("OPTIONS", {})}


def _refresh(connection: Any) -> None:
    """Close this thread's connection when it failed or is older than CONN_MAX_AGE (0: kept, as in a script)."""
    if connection.connection is not None and (connection.errors_occurred or connection.settings_dict["CONN_MAX_AGE"]):
        connection.close_if_unusable_or_obsolete()


def _insert_rows(alias: str, m: Any, rows: Sequence[tuple[str, int, float, bytes, float]]) -> None:
    """INSERT (queue, priority, visible_at, body, created) rows on the ORM's connection: a plain INSERT,
    without the RETURNING of ``save`` and ``bulk_create`` (which halves the rate on PostgreSQL)."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(c) for c in ("queue", "priority", "visible_at", "owner", "attempts", "crashes", "body",
                                           "created"))
    sql = (f"INSERT INTO {quote(m.QueuedMessage._meta.db_table)} ({columns}) "
           "VALUES (%s, %s, %s, NULL, 0, 0, %s, %s)")
    with connection.cursor() as cursor:
        if len(rows) == 1:
            cursor.execute(sql, rows[0])
        else:
            for start in range(0, len(rows), _BATCH):
                cursor.executemany(sql, rows[start:start + _BATCH])


class DjangoOrmBroker(LeasedTable):
    """At-least-once queues in the Django project's database, shared by every process that reaches it.

    One instance serves a whole process; every method is thread-safe (each thread uses its own Django
    connection).
    """

    kind = BrokerEnum.DJANGO_ORM
    capabilities = Capabilities(redelivery="lease", delay="native", max_priority=2**31 - 1, dead_letters=True,
                                key_value=True, routing="emulated", persistent=True, cross_process=True,
                                cross_host=True)
    connection_errors = (OperationalError, InterfaceError)
    errors = (DatabaseError,)
    lease_setting = "DJANGO_LEASE_SECONDS"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._alias = ""
        self._models: Any = None
        self._sqlite = False
        self._skip_locked = False
        self._last_until = 0.0  # SQLite: the lease end of this process's latest take (each one is unique)
        self._executor: ThreadPoolExecutor | None = None
        self._stores: dict[tuple[str, str], DjangoKeyValueStore] = {}

    def _where(self) -> str:
        return f"the Django database {self._alias or '(not set up yet)'!r}"

    # -- plumbing -------------------------------------------------------------------------------
    def _ready(self) -> tuple[str, Any]:
        """(alias, models module), Django set up and the tables checked on first use."""
        if self._models is None:
            with self._lock:
                if self._models is None:
                    conf.ensure_django()
                    alias = conf.database_alias()
                    _bound_waits(connections[alias])
                    conf.ensure_tables(alias)
                    from funboost_like.contrib.django import models

                    # compile each kind of statement once (no query: nothing matches an empty IN), so the
                    # lazy imports of Django's compilers are done before this process forks
                    nothing = models.QueuedMessage.objects.using(alias).filter(pk__in=[])
                    with transaction.atomic(using=alias):
                        list(nothing.select_for_update().values_list("id"))
                    nothing.update(owner=None)
                    nothing.delete()
                    connection = connections[alias]
                    self._sqlite = connection.vendor == "sqlite"
                    if connection.vendor == "postgresql":
                        cooperative_psycopg()  # under eventlet, psycopg 3 would block every green thread
                    self._skip_locked = bool(connection.features.has_select_for_update_skip_locked)
                    self._alias = alias
                    self._models = models
        return self._alias, self._models

    def prepare(self) -> None:
        """Set Django up and check the tables now, rather than at the first publish or fetch (a
        process about to fork calls it, so its children inherit no half-done import)."""
        self._run(lambda alias, m: None)

    def _run(self, work: Callable[[str, Any], T], atomic: bool = False) -> T:
        """``work(alias, models)``, in one transaction when ``atomic``, on a thread where Django allows it."""
        if not _in_event_loop():
            return self._call(work, atomic)
        return self._orm_thread().submit(self._call, work, atomic).result()  # Django's async-unsafe guard

    def _call(self, work: Callable[[str, Any], T], atomic: bool) -> T:
        alias, models = self._ready()
        connection = connections[alias]
        outer = connection.in_atomic_block  # the caller's own transaction: no refresh, no retry
        if not outer:
            _refresh(connection)
        for attempt in range(3):
            try:
                if not atomic:
                    return work(alias, models)
                with transaction.atomic(using=alias):
                    return work(alias, models)
            except OperationalError as exc:
                if outer or attempt == 2 or not _transient(exc):
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _orm_thread(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(4, thread_name_prefix="funboost_like-django-orm")
            return self._executor

    def key_value_store(self, queue: str, namespace: str) -> DjangoKeyValueStore:
        """The records of ``namespace`` beside ``queue`` (the app's ``Record`` table)."""
        key = (queue, check_namespace(namespace))
        store = self._stores.get(key)
        if store is None:
            with self._lock:
                store = self._stores.setdefault(key, DjangoKeyValueStore(self, queue, namespace))
        return store

    # -- storage operations ----------------------------------------------------------------------
    def _insert(self, queue: str, priority: int, visible_at: float, bodies: Sequence[bytes]) -> None:
        now = time.time()
        rows = [(queue, priority, visible_at, bytes(b), now) for b in bodies]
        self._run(lambda alias, m: _insert_rows(alias, m, rows), atomic=len(rows) > 1)

    def _claim(self, queue: str, now: float, lease_until: float, max_n: int) -> list[Claimed]:
        return self._run(lambda alias, m: self._take_rows(alias, m, queue, now, lease_until, max_n), atomic=True)

    def _delete_and_claim(self, queue: str, ids: Sequence[Any], now: float, lease_until: float,
                          max_n: int) -> list[Claimed]:
        """Delete the owned rows ``ids`` and take up to ``max_n``, in one transaction."""
        def delete_and_take(alias: str, m: Any) -> list[Claimed]:
            m.QueuedMessage.objects.using(alias).filter(pk__in=list(ids), owner=self.owner).delete()
            return self._take_rows(alias, m, queue, now, lease_until, max_n)

        return self._run(delete_and_take, atomic=True)

    def _take_rows(self, alias: str, m: Any, queue: str, now: float, until: float, max_n: int) -> list[Claimed]:
        """The take, inside the caller's transaction (see the module docstring)."""
        messages = m.QueuedMessage.objects.using(alias)
        ready = messages.filter(queue=queue, visible_at__lte=now).order_by("-priority", "id")
        claim = {"owner": self.owner, "attempts": F("attempts") + 1}
        if self._sqlite:
            with self._lock:
                until = self._last_until = max(until, self._last_until + 1e-6)
            crashed = Case(When(owner__isnull=True, then=Value(0)), default=Value(1))
            if not messages.filter(pk__in=ready.values("id")[:max_n]).update(
                    **claim, visible_at=until, crashes=F("crashes") + crashed):
                return []
            rows = messages.filter(owner=self.owner, visible_at=until).values_list(*_COLUMNS)
            return [Claimed(row[0], bytes(row[1]), *row[2:]) for row in rows]
        locked = ready.select_for_update(skip_locked=self._skip_locked)
        taken = list(locked.values_list(*_COLUMNS, "owner")[:max_n])
        fresh = [row[0] for row in taken if row[5] is None]
        abandoned = [row[0] for row in taken if row[5] is not None]  # their consumer died: a crash counted
        if fresh:
            messages.filter(pk__in=fresh).update(**claim, visible_at=until)
        if abandoned:
            messages.filter(pk__in=abandoned).update(**claim, visible_at=until, crashes=F("crashes") + 1)
        return [claimed(row[0], row[1], row[2], row[3], row[4], had_owner=row[5] is not None) for row in taken]

    def _delete(self, queue: str, ids: Sequence[Any]) -> None:
        self._run(lambda alias, m: m.QueuedMessage.objects.using(alias).filter(
            pk__in=list(ids), owner=self.owner).delete())

    def _update_owned(self, queue: str, ids: Sequence[Any], *, visible_at: float, disown: bool,
                      attempts_delta: int) -> None:
        values: dict[str, Any] = {"visible_at": visible_at}
        if disown:
            values["owner"] = None
        if attempts_delta:
            values["attempts"] = Case(When(attempts__gt=-attempts_delta, then=F("attempts") + attempts_delta),
                                      default=Value(0))
        self._run(lambda alias, m: m.QueuedMessage.objects.using(alias).filter(
            pk__in=list(ids), owner=self.owner).update(**values))

    def _move_back(self, queue: str, ids: Sequence[Any], visible_at: float) -> None:
        def move(alias: str, m: Any) -> None:
            owned = m.QueuedMessage.objects.using(alias).filter(pk__in=list(ids), owner=self.owner)
            rows = list(owned.order_by("id").values("priority", "attempts", "crashes", "body", "created"))
            m.QueuedMessage.objects.using(alias).bulk_create([m.QueuedMessage(queue=queue, visible_at=visible_at,
                                                                               **row) for row in rows])
            owned.delete()

        self._run(move, atomic=True)

    def _bury(self, queue: str, row_id: Any, letter: DeadLetter) -> None:
        """Delete the owned row and keep the letter, in one transaction (nothing if no longer owned)."""
        def bury(alias: str, m: Any) -> None:
            deleted, _ = m.QueuedMessage.objects.using(alias).filter(pk=row_id, owner=self.owner).delete()
            if deleted:
                m.DeadLetter.objects.using(alias).create(queue=queue, message_id=row_id, body=bytes(letter.body),
                                                         reason=letter.reason, failed_at=letter.failed_at,
                                                         attempts=letter.attempts)

        self._run(bury, atomic=True)

    @staticmethod
    def _waiting(m: Any, alias: str, queue: str, now: float) -> Any:
        return m.QueuedMessage.objects.using(alias).filter(Q(owner__isnull=True) | Q(visible_at__lte=now), queue=queue)

    def _delete_waiting(self, queue: str, now: float) -> int:
        return int(self._run(lambda alias, m: self._waiting(m, alias, queue, now).delete()[0]))

    def _count_waiting(self, queue: str, now: float) -> int:
        return int(self._run(lambda alias, m: self._waiting(m, alias, queue, now).count()))

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        def letters(alias: str, m: Any) -> list[DeadLetter]:
            rows = (m.DeadLetter.objects.using(alias).filter(queue=queue).order_by("-id")
                    .values_list("body", "reason", "failed_at", "attempts", "id")[:max(0, limit)])
            return [DeadLetter(queue, bytes(body), reason, at, attempts, ref=row_id)
                    for body, reason, at, attempts, row_id in rows]

        return self._run(letters)

    def _heads(self, queue: str) -> list[bytes]:
        now = time.time()
        return self._run(lambda alias, m: [bytes(body) for body in (
            m.QueuedMessage.objects.using(alias).filter(queue=queue, owner=None, visible_at__lte=now)
            .order_by("id").values_list("body", flat=True)[:1])])

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        now = time.time()
        return self._run(lambda alias, m: [(float(at), bytes(body)) for at, body in (
            m.QueuedMessage.objects.using(alias).filter(queue=queue, owner=None, visible_at__gt=now)
            .order_by("visible_at", "id").values_list("visible_at", "body")[:max(0, limit)])])

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        return bool(self._run(lambda alias, m: m.DeadLetter.objects.using(alias)
                              .filter(queue=queue, id=letter.ref).delete()[0]))

    def purge_dead_letters(self, queue: str) -> int:
        return int(self._run(lambda alias, m: m.DeadLetter.objects.using(alias).filter(queue=queue).delete()[0]))

    # -- routing (emulated: DESIGN §9) ------------------------------------------------------------
    def _bind(self, bindings: Sequence[Binding]) -> None:
        def bind(alias: str, m: Any) -> None:
            rows = m.Binding.objects.using(alias)
            existing = [Binding(*row) for row in rows.filter(exchange=bindings[0].exchange).order_by("id")
                        .values_list("exchange", "exchange_type", "queue", "key")]
            rows.bulk_create([m.Binding(exchange=b.exchange, exchange_type=b.exchange_type, queue=b.queue, key=b.key)
                              for b in added_bindings(existing, bindings)])

        try:
            self._run(bind, atomic=True)
        except IntegrityError:  # another process added one of them at the same moment
            self._run(bind, atomic=True)

    def _bindings(self, exchange: str) -> list[Binding]:
        return self._run(lambda alias, m: [Binding(*row) for row in m.Binding.objects.using(alias).filter(
            exchange=exchange).order_by("id").values_list("exchange", "exchange_type", "queue", "key")])

    def _put_many(self, queues: Sequence[str], bodies: Sequence[bytes], *, priority: int,
                  not_before: float | None) -> None:
        """Insert into every queue in one transaction: all of them get the messages, or none."""
        now = time.time()
        visible_at = float(not_before) if not_before is not None and float(not_before) > now else now

        rows = [(queue, int(priority), visible_at, bytes(b), now) for queue in sorted(queues) for b in bodies]
        self._run(lambda alias, m: _insert_rows(alias, m, rows), atomic=True)

    # -- processes -------------------------------------------------------------------------------
    def _after_fork(self) -> None:
        """Forget the parent's Django connections (kept referenced, never closed) and helper threads."""
        super()._after_fork()
        self._executor = None
        self._lock = threading.Lock()
        conf.forget_inherited_connections()

    def _close(self) -> None:
        with self._lock:
            executor, self._executor, self._stores = self._executor, None, {}
        if executor is not None:
            executor.shutdown(wait=True)  # its threads end; their connections are closed with them
        if self._alias and not connections[self._alias].in_atomic_block:
            connections[self._alias].close()  # this thread's; the others' are closed when their threads end
