"""Key-value records in Redis, for the Redis brokers (RPC results, task filters).

A store of queue ``q`` and namespace ``ns`` keeps key ``k`` as the Redis string ``fl:{q}:ns:k``,
with the TTL as ``PX`` milliseconds, so Redis expires it by itself. The queue name is the Redis
Cluster hash tag, as for the queue's other keys; namespaces the brokers use themselves
(:data:`RESERVED_NAMESPACES`) are refused. :meth:`RedisKeyValueStore.wait` polls ``GET`` with sleeps
backing off from 5 ms to 50 ms (the contract's default). Setting: ``REDIS_URL``, read at each use
(through :func:`~funboost_like.brokers.redis_common.direct_connections`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from funboost_like.brokers.redis_common import direct_connections
from funboost_like.core.stores import KeyValueStore, check_namespace, check_ttl

if TYPE_CHECKING:
    from funboost_like.brokers.base import Broker

_MGET_CHUNK = 1000
# Names the Redis brokers use under ``fl:{<queue>}:`` themselves.
RESERVED_NAMESPACES = frozenset({"delayed", "inflight", "consumers", "attempts", "dead", "unack",
                                 "unack-consumers", "qps_next_slot", *(f"p{n}" for n in range(10))})


def _px(ttl: float | None) -> tuple[Any, ...]:
    """``SET``'s expiry arguments for ``ttl`` seconds (checked): PX milliseconds, none for no expiry."""
    ttl = check_ttl(ttl)
    return () if ttl is None else ("PX", max(1, math.ceil(ttl * 1000)))


class RedisKeyValueStore(KeyValueStore):
    """One (queue, namespace) of records in Redis; see the module docstring for the key layout."""

    def __init__(self, queue: str, namespace: str, broker: Broker) -> None:
        """``broker``: the Redis kind the store belongs to, which translates the client's errors."""
        if namespace in RESERVED_NAMESPACES:
            raise ValueError(f"{namespace!r} names keys of the Redis brokers; choose another namespace")
        self.prefix = f"fl:{{{queue}}}:{check_namespace(namespace)}:"
        self._broker = broker

    def __repr__(self) -> str:
        return f"RedisKeyValueStore(prefix={self.prefix!r})"

    def _run(self, action: str, *args: Any) -> Any:
        return self._broker._guard(f"{action} in {self.prefix}*", direct_connections().execute_command, *args)

    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        self._run("writing a record", "SET", self.prefix + key, bytes(value), *_px(ttl))

    def get(self, key: str) -> bytes | None:
        value = self._run("reading a record", "GET", self.prefix + key)
        return None if value is None else bytes(value)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), _MGET_CHUNK):
            part = keys[start:start + _MGET_CHUNK]
            values = self._run("reading records", "MGET", *[self.prefix + key for key in part])
            found.update((key, bytes(value)) for key, value in zip(part, values, strict=True) if value is not None)
        return found

    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        return self._run("writing a record", "SET", self.prefix + key, bytes(value), "NX", *_px(ttl)) is not None

    def delete(self, key: str) -> None:
        self._run("deleting a record", "DEL", self.prefix + key)

    def exists(self, key: str) -> bool:
        return bool(self._run("checking a record", "EXISTS", self.prefix + key))
