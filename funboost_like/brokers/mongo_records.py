"""The side collections of the MONGOMQ broker: key-value records and exchange bindings.

Key-value records (RPC results, task filters): one collection per queue, ``fl.kv.<queue>``, one
document per record: ``_id`` ``"<namespace>:<key>"`` (a namespace has no ``:``), ``value`` (binary),
``expires_at`` (a BSON date, or null for no expiry). A TTL index (``expireAfterSeconds=0``) lets the
server delete expired records, but its monitor runs only every 60 seconds, so every read also filters
on ``expires_at``: an expired record is invisible at once. :meth:`MongoKeyValueStore.add_if_absent` is
an insert that a duplicate ``_id`` turns into an update asserting ``expires_at <= now``: of concurrent
callers exactly one wins. Dates have millisecond precision.

Bindings (emulated routing, DESIGN §9): one collection ``fl.bindings``, a document per (exchange,
queue, key) with that triple as its ``_id``, so binding twice is a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pymongo.errors
from pymongo.collection import Collection

from funboost_like.brokers.routing import Binding, added_bindings
from funboost_like.core.stores import KeyValueStore, check_ttl

if TYPE_CHECKING:
    from funboost_like.brokers.mongo import MongoBroker


def _date(at: float) -> datetime:
    return datetime.fromtimestamp(at, timezone.utc)


def _live(now: float) -> dict[str, Any]:
    return {"$or": [{"expires_at": None}, {"expires_at": {"$gt": _date(now)}}]}


class MongoKeyValueStore(KeyValueStore):
    """The records of one (queue, namespace); see :mod:`funboost_like.core.stores` for the contract."""

    def __init__(self, broker: MongoBroker, queue: str, namespace: str) -> None:
        self._broker, self._queue, self.namespace = broker, queue, namespace

    def __repr__(self) -> str:
        return f"MongoKeyValueStore({self._queue!r}, {self.namespace!r})"

    def _run(self, action: Any, *args: Any) -> Any:
        """``action(collection, *args)``, errors translated as the broker's."""
        broker = self._broker
        try:
            return action(broker._kv_collection(self._queue), *args)
        except broker._client_errors as exc:
            raise broker._translated(exc, f"using the records of queue {self._queue!r}") from exc

    def _id(self, key: str) -> str:
        return f"{self.namespace}:{key}"

    @staticmethod
    def _doc(value: bytes, ttl: float | None) -> dict[str, Any]:
        return {"value": bytes(value), "expires_at": None if ttl is None else _date(time.time() + ttl)}

    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        doc = self._doc(value, check_ttl(ttl))

        def replace(kv: Collection[dict[str, Any]]) -> None:
            try:
                kv.replace_one({"_id": self._id(key)}, doc, upsert=True)
            except pymongo.errors.DuplicateKeyError:  # two first upserts at once: last write wins
                kv.replace_one({"_id": self._id(key)}, doc, upsert=True)

        self._run(replace)

    def get(self, key: str) -> bytes | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        prefix = len(self.namespace) + 1

        def find(kv: Collection[dict[str, Any]]) -> dict[str, bytes]:
            ids = [self._id(key) for key in keys]
            found = kv.find({"_id": {"$in": ids}, **_live(time.time())}, {"value": 1})
            return {str(doc["_id"])[prefix:]: bytes(doc["value"]) for doc in found}

        return dict(self._run(find))

    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        ttl = check_ttl(ttl)

        def add(kv: Collection[dict[str, Any]]) -> bool:
            try:
                kv.insert_one({"_id": self._id(key), **self._doc(value, ttl)})
                return True
            except pymongo.errors.DuplicateKeyError:  # there: take it over only if it expired
                expired = {"_id": self._id(key), "expires_at": {"$ne": None, "$lte": _date(time.time())}}
                return bool(kv.update_one(expired, {"$set": self._doc(value, ttl)}).modified_count)

        return bool(self._run(add))

    def delete(self, key: str) -> None:
        self._run(lambda kv: kv.delete_one({"_id": self._id(key)}))

    def purge_expired(self) -> int:
        """Delete the expired records of every namespace of the queue now (the TTL monitor's job,
        without its delay); return how many."""
        return int(self._run(lambda kv: kv.delete_many({"expires_at": {"$lte": _date(time.time())}}).deleted_count))


def read_bindings(bindings: Collection[dict[str, Any]], exchange: str) -> list[Binding]:
    """The bindings of ``exchange``, in the order they were made."""
    found = bindings.find({"exchange": exchange}, sort=[("made", 1), ("_id", 1)])
    return [Binding(d["exchange"], d["exchange_type"], d["queue"], d["key"]) for d in found]


def add_bindings(bindings: Collection[dict[str, Any]], new: Sequence[Binding]) -> None:
    """Insert those of ``new`` (one exchange) that are not there, with the exchange's first type."""
    rows = added_bindings(read_bindings(bindings, new[0].exchange), new)
    if not rows:
        return
    made = time.time()
    docs = [{"_id": {"exchange": b.exchange, "queue": b.queue, "key": b.key}, "exchange": b.exchange,
             "exchange_type": b.exchange_type, "queue": b.queue, "key": b.key, "made": made} for b in rows]
    try:
        bindings.insert_many(docs, ordered=False)
    except pymongo.errors.BulkWriteError as exc:  # another process added some of them at the same moment
        if any(error.get("code") != 11000 for error in exc.details.get("writeErrors", [])):
            raise
