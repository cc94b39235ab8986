"""The key-value records of the DJANGO_ORM broker (RPC results, task filters): the app's ``Record`` table.

One row per (queue, namespace, key), unique. :meth:`DjangoKeyValueStore.put` is an ``UPDATE``, then
an ``INSERT`` when no row matched (then the ``UPDATE`` again if another writer inserted first);
:meth:`DjangoKeyValueStore.add_if_absent` is an ``INSERT`` that a unique-key conflict turns into an
``UPDATE ... WHERE expires_at <= now``, so of concurrent callers exactly one wins. Expired rows are
invisible at once and deleted by a sweep every 1,000 writes or 60 seconds of a writing process.
Keys are at most 255 characters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from django.db import IntegrityError, transaction
from django.db.models import Q

from funboost_like.core.stores import KeyValueStore, check_ttl

if TYPE_CHECKING:
    from funboost_like.brokers.django_orm import DjangoOrmBroker

_KEY_LENGTH = 255
_PURGE_EVERY_WRITES = 1000
_PURGE_EVERY_SECONDS = 60.0


class DjangoKeyValueStore(KeyValueStore):
    """The records of one (queue, namespace); see :mod:`funboost_like.core.stores` for the contract."""

    def __init__(self, broker: DjangoOrmBroker, queue: str, namespace: str) -> None:
        self._broker, self._queue, self.namespace = broker, queue, namespace
        self._writes = 0
        self._next_purge = time.monotonic() + _PURGE_EVERY_SECONDS

    def __repr__(self) -> str:
        return f"DjangoKeyValueStore({self._queue!r}, {self.namespace!r})"

    def _run(self, work: Callable[[Any], Any]) -> Any:
        """``work(records)`` (a queryset of this queue and namespace), errors translated as the broker's."""
        broker = self._broker
        try:
            return broker._run(lambda alias, m: work(m.Record.objects.using(alias).filter(
                queue=self._queue, namespace=self.namespace)))
        except broker._client_errors as exc:
            raise broker._translated(exc, f"using the records of queue {self._queue!r}") from exc

    @staticmethod
    def _checked(key: str) -> str:
        if len(key) > _KEY_LENGTH:
            raise ValueError(f"a key of the Django records is at most {_KEY_LENGTH} characters, got {len(key)}")
        return key

    def _insert(self, records: Any, key: str, value: bytes, expires_at: float | None) -> bool:
        """INSERT the row; False when the key exists (the transaction stays usable: a savepoint)."""
        try:
            with transaction.atomic(using=records.db):
                records.create(queue=self._queue, namespace=self.namespace, key=key, value=value,
                               expires_at=expires_at)
        except IntegrityError:
            return False
        return True

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes >= _PURGE_EVERY_WRITES or time.monotonic() >= self._next_purge:
            self._writes, self._next_purge = 0, time.monotonic() + _PURGE_EVERY_SECONDS
            self.purge_expired()

    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        ttl, key, value = check_ttl(ttl), self._checked(key), bytes(value)

        def put(records: Any) -> None:
            expires_at = None if ttl is None else time.time() + ttl
            mine = records.filter(key=key)
            if not mine.update(value=value, expires_at=expires_at) and not self._insert(records, key, value,
                                                                                         expires_at):
                mine.update(value=value, expires_at=expires_at)  # another writer inserted it: last write wins

        self._run(put)
        self._wrote()

    def get(self, key: str) -> bytes | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}

        def select(records: Any) -> dict[str, bytes]:
            live = Q(expires_at__isnull=True) | Q(expires_at__gt=time.time())
            return {str(k): bytes(v) for k, v in records.filter(live, key__in=list(keys)).values_list("key", "value")}

        return dict(self._run(select))

    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        ttl, key, value = check_ttl(ttl), self._checked(key), bytes(value)

        def add(records: Any) -> bool:
            now = time.time()
            expires_at = None if ttl is None else now + ttl
            if self._insert(records, key, value, expires_at):
                return True
            return bool(records.filter(key=key, expires_at__isnull=False, expires_at__lte=now).update(
                value=value, expires_at=expires_at))

        added = bool(self._run(add))
        if added:
            self._wrote()
        return added

    def delete(self, key: str) -> None:
        self._run(lambda records: records.filter(key=key).delete())

    def purge_expired(self) -> int:
        """Delete the expired rows of this namespace now; return how many."""
        return int(self._run(lambda records: records.filter(expires_at__isnull=False,
                                                             expires_at__lte=time.time()).delete()[0]))
