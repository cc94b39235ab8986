"""MONGOMQ: queues in MongoDB collections, through pymongo (MongoDB 4.2 or later).

Guarantee: at-least-once, the :class:`~funboost_like.brokers.leased_table.LeasedTable` way: a fetched
message is leased to its consumer process and the lease is renewed every ``lease / 3`` seconds; a
killed consumer's messages come back after at most ``MONGO_LEASE_SECONDS`` (its death counted for the
poison-message rule). Acked documents are deleted.

Settings: ``MONGO_URL`` (environment ``FUNBOOST_LIKE_MONGO_URL``; default
``mongodb://127.0.0.1:27017/funboost_like``; the URL's database is used, ``funboost_like`` when it
names none; pymongo's URL options such as ``serverSelectionTimeoutMS`` or ``replicaSet`` apply) and
``MONGO_LEASE_SECONDS``. The URL's password never appears in a log or an error message.

Collections of a queue ``Q`` (made on first use, never at import): ``fl.q.Q`` (the messages),
``fl.dl.Q`` (dead letters with their reason) and, with RPC results or task filtering, ``fl.kv.Q``
(records, with a TTL index; see :mod:`funboost_like.brokers.mongo_records`). ``fl.sequences`` holds one
counter per queue: a publish takes its ids with one ``$inc``, so ids increase in publish order and are
never reused (they order equal priorities and are the delivery tokens). Single publishes take theirs
from a block of 32 that their process reserved at most 0.1 s before (one ``$inc`` per block, not per
push): one process's messages keep their order; two processes' published within 0.1 s of each other
may be taken in a slightly different order than they were published. ``fl.bindings`` holds the
bindings of emulated routing. A queue name that is not a plain name (``$``, NUL, very long) gets a
hashed collection name (:func:`collection_base`).

A message document: ``_id``, ``priority``, ``visible_at`` (UNIX time), ``owner``, ``claim``,
``attempts``, ``crashes``, ``body`` (binary); one index ``(priority -1, _id 1, visible_at 1)`` serves
the take. Taking one message is one ``find_one_and_update`` (sorted by priority, then id, over
documents with ``visible_at <= now``: waiting ones and those whose lease ran out). Taking a batch is a
``find`` of candidate ids, an ``update_many`` on them that asserts ``visible_at <= now`` again per
document (so of two concurrent takers only one gets a document) and stamps this take's ``claim``, and
a ``find`` of what it claimed: three round trips whatever the batch size. Dead-lettering writes the
letter, then deletes the owned message (the letter is withdrawn when the message was no longer owned):
a crash between the two leaves the letter and a message that comes back, never a lost message. Idle
consumers poll (2 ms to 50 ms). See docs/mongo.md.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import bson.errors
import pymongo
import pymongo.errors
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database

from funboost_like.brokers.base import Capabilities, DeadLetter
from funboost_like.brokers.leased_table import Claimed, LeasedTable
from funboost_like.brokers.mongo_records import MongoKeyValueStore, add_bindings, read_bindings
from funboost_like.brokers.routing import Binding
from funboost_like.core.config import redact_url, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.stores import check_namespace

DEFAULT_DATABASE = "funboost_like"
SEQUENCES = "fl.sequences"
BINDINGS = "fl.bindings"
TAKE_ORDER = [("priority", pymongo.DESCENDING), ("_id", pymongo.ASCENDING)]
TAKE_INDEX = [*TAKE_ORDER, ("visible_at", pymongo.ASCENDING)]
_FIELDS = {"body": 1, "attempts": 1, "priority": 1, "crashes": 1, "owner": 1, "claim": 1}
_PLAIN = re.compile(r"[A-Za-z0-9_.\-:@]{1,100}")
ID_BLOCK, ID_BLOCK_SECONDS = 32, 0.1  # single publishes take ids from a block reserved this recently


def collection_base(queue: str) -> str:
    """The queue's part of its collection names: the name itself when plain (letters, digits and
    ``_.-:@``, at most 100 characters), else a cleaned prefix and 10 hex of its sha1."""
    if _PLAIN.fullmatch(queue):
        return queue
    safe = re.sub(r"[^A-Za-z0-9_.\-]+", "_", queue)[:60]
    return f"{safe}~{hashlib.sha1(queue.encode()).hexdigest()[:10]}"


def waiting(now: float) -> dict[str, Any]:
    """Documents without owner, or whose owner's lease ran out (what purge deletes and count counts)."""
    return {"$or": [{"owner": None}, {"visible_at": {"$lte": now}}]}


def _take(owner: str, lease_until: float, claim: int) -> list[dict[str, Any]]:
    """The take as a pipeline update: every expression reads the document as it was before it."""
    return [{"$set": {
        "crashes": {"$add": ["$crashes", {"$cond": [{"$eq": ["$owner", None]}, 0, 1]}]},
        "attempts": {"$add": ["$attempts", 1]}, "owner": {"$literal": owner}, "visible_at": lease_until,
        "claim": claim}}]


def _claimed(doc: dict[str, Any]) -> Claimed:
    return Claimed(doc["_id"], bytes(doc["body"]), int(doc["attempts"]), int(doc["priority"]), int(doc["crashes"]))


class _Queue:
    """The collections of one queue."""

    def __init__(self, db: Database[dict[str, Any]], queue: str) -> None:
        base = collection_base(queue)
        self.name = f"fl.q.{base}"
        self.messages: Collection[dict[str, Any]] = db[self.name]
        self.dead: Collection[dict[str, Any]] = db[f"fl.dl.{base}"]
        self.kv: Collection[dict[str, Any]] = db[f"fl.kv.{base}"]
        self.kv_ready = False


class MongoBroker(LeasedTable):
    """At-least-once queues in MongoDB, shared by processes on any host that reaches it.

    One instance serves a whole process; every method is thread-safe (pymongo's client is). A forked
    child makes its own client.
    """

    kind = BrokerEnum.MONGOMQ
    capabilities = Capabilities(redelivery="lease", delay="native", max_priority=2**31 - 1, dead_letters=True,
                                key_value=True, routing="emulated", persistent=True, cross_process=True,
                                cross_host=True)
    connection_errors = (pymongo.errors.ConnectionFailure,)  # AutoReconnect, NetworkTimeout, server selection
    errors = (pymongo.errors.PyMongoError, bson.errors.BSONError)
    lease_setting = "MONGO_LEASE_SECONDS"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._client: pymongo.MongoClient[dict[str, Any]] | None = None
        self._db: Database[dict[str, Any]] | None = None
        self._url = ""
        self._queues: dict[str, _Queue] = {}
        self._stores: dict[tuple[str, str], MongoKeyValueStore] = {}
        self._claims = itertools.count(1)  # this process's takes: (owner, claim) names one take
        self._bindings_ready = False
        self._id_blocks: dict[str, tuple[int, int, float]] = {}  # collection -> (next id, last id, good until)

    def _where(self) -> str:
        return f"MongoDB {redact_url(self._url or str(settings.get('MONGO_URL')))}"

    # -- plumbing -------------------------------------------------------------------------------
    def database(self) -> Database[dict[str, Any]]:
        """The database of ``MONGO_URL`` (``funboost_like`` when the URL names none); connects lazily."""
        db = self._db
        if db is None:
            with self._lock:
                if self._db is None:
                    self._url = str(settings.get("MONGO_URL"))
                    self._client = _make_client(self._url)
                    self._db = self._client.get_default_database(DEFAULT_DATABASE)
                db = self._db
        return db

    def _queue(self, queue: str) -> _Queue:
        """The queue's collections; the take index is made by the first use in this process."""
        q = self._queues.get(queue)
        if q is None:
            db = self.database()
            q = _Queue(db, queue)
            q.messages.create_index(TAKE_INDEX, name="take")
            q.dead.create_index([("failed_at", pymongo.DESCENDING)], name="failed_at")
            with self._lock:
                q = self._queues.setdefault(queue, q)
        return q

    def _next_ids(self, name: str, n: int) -> range:
        """``n`` new ids for the collection ``name``, never handed out twice: from this process's recent block
        when it has them, else from a new block (one ``$inc`` of the counter)."""
        if n >= ID_BLOCK:
            return self._reserve_ids(name, n)
        now = time.monotonic()
        with self._lock:
            first, last, until = self._id_blocks.get(name, (1, 0, 0.0))
            if until > now and last - first + 1 >= n:
                self._id_blocks[name] = (first + n, last, until)
                return range(first, first + n)
        block = self._reserve_ids(name, ID_BLOCK)
        with self._lock:
            self._id_blocks[name] = (block.start + n, block.stop - 1, now + ID_BLOCK_SECONDS)
        return range(block.start, block.start + n)

    def _reserve_ids(self, name: str, n: int) -> range:
        """``n`` new ids for the collection ``name``: one ``$inc`` of its counter."""
        sequences = self.database()[SEQUENCES]
        try:
            doc = sequences.find_one_and_update({"_id": name}, {"$inc": {"n": n}}, upsert=True,
                                                return_document=ReturnDocument.AFTER)
        except pymongo.errors.DuplicateKeyError:  # two first upserts at once: the other one made it
            doc = sequences.find_one_and_update({"_id": name}, {"$inc": {"n": n}}, return_document=ReturnDocument.AFTER)
        last = int(doc["n"]) if doc is not None else 0
        if last < n:
            raise pymongo.errors.OperationFailure(f"the id counter of {name!r} in {SEQUENCES!r} is corrupt: {doc!r}")
        return range(last - n + 1, last + 1)

    def key_value_store(self, queue: str, namespace: str) -> MongoKeyValueStore:
        """The records of ``namespace`` in the queue's ``fl.kv.<queue>`` collection (TTL index on first use)."""
        key = (queue, check_namespace(namespace))
        store = self._stores.get(key)
        if store is None:
            with self._lock:
                store = self._stores.setdefault(key, MongoKeyValueStore(self, queue, namespace))
        return store

    def _kv_collection(self, queue: str) -> Collection[dict[str, Any]]:
        q = self._queue(queue)
        if not q.kv_ready:
            q.kv.create_index("expires_at", name="ttl", expireAfterSeconds=0)  # the server's monitor: each 60 s
            q.kv_ready = True
        return q.kv

    # -- storage operations ----------------------------------------------------------------------
    def _insert(self, queue: str, priority: int, visible_at: float, bodies: Sequence[bytes]) -> None:
        self._insert_docs(self._queue(queue), priority, visible_at, bodies)

    def _insert_docs(self, q: _Queue, priority: int, visible_at: float, bodies: Sequence[bytes],
                     session: Any = None) -> None:
        docs = [{"_id": i, "priority": priority, "visible_at": visible_at, "owner": None, "claim": 0,
                 "attempts": 0, "crashes": 0, "body": bytes(b)}
                for i, b in zip(self._next_ids(q.name, len(bodies)), bodies, strict=True)]
        if len(docs) == 1:
            q.messages.insert_one(docs[0], session=session)
        else:
            q.messages.insert_many(docs, session=session)

    def _claim(self, queue: str, now: float, lease_until: float, max_n: int) -> list[Claimed]:
        messages = self._queue(queue).messages
        ready = {"visible_at": {"$lte": now}}
        claim = next(self._claims)
        if max_n == 1:
            doc = messages.find_one_and_update(ready, _take(self.owner, lease_until, claim), sort=TAKE_ORDER,
                                               projection=_FIELDS, return_document=ReturnDocument.AFTER)
            return [] if doc is None else [_claimed(doc)]
        ids = [doc["_id"] for doc in messages.find(ready, {"_id": 1}, sort=TAKE_ORDER, limit=max_n)]
        if not ids:
            return []
        # The filter is asserted again per document: one taken meanwhile by another process is not taken.
        if not messages.update_many({"_id": {"$in": ids}, **ready},
                                    _take(self.owner, lease_until, claim)).modified_count:
            return []
        mine = messages.find({"_id": {"$in": ids}, "owner": self.owner, "claim": claim}, _FIELDS)
        return [_claimed(doc) for doc in mine]

    def _delete(self, queue: str, ids: Sequence[Any]) -> None:
        self._queue(queue).messages.delete_many({"_id": {"$in": list(ids)}, "owner": self.owner})

    def _update_owned(self, queue: str, ids: Sequence[Any], *, visible_at: float, disown: bool,
                      attempts_delta: int) -> None:
        owned = {"_id": {"$in": list(ids)}, "owner": self.owner}
        messages = self._queue(queue).messages
        if not disown:
            messages.update_many(owned, {"$set": {"visible_at": visible_at}})
            return
        attempts = {"$max": [0, {"$add": ["$attempts", attempts_delta]}]}
        messages.update_many(owned, [{"$set": {"visible_at": visible_at, "owner": None, "attempts": attempts}}])

    def _move_back(self, queue: str, ids: Sequence[Any], visible_at: float) -> None:
        """Copied first, then deleted (no transaction here): a death in between leaves both, never neither."""
        q = self._queue(queue)
        owned = {"_id": {"$in": list(ids)}, "owner": self.owner}
        docs = list(q.messages.find(owned, sort=[("_id", 1)]))
        if docs:
            q.messages.insert_many([{**doc, "_id": new, "owner": None, "visible_at": visible_at}
                                    for doc, new in zip(docs, self._next_ids(q.name, len(docs)), strict=True)])
            q.messages.delete_many({"_id": {"$in": [doc["_id"] for doc in docs]}, "owner": self.owner})

    def _bury(self, queue: str, row_id: Any, letter: DeadLetter) -> None:
        """Keep the letter, then delete the owned message; withdraw the letter if it was no longer owned."""
        q = self._queue(queue)
        key = f"{row_id}:{self.owner}"  # sent again after an outage: the same letter, not a second one
        q.dead.replace_one({"_id": key}, {"message_id": row_id, "body": bytes(letter.body), "reason": letter.reason,
                                          "failed_at": letter.failed_at, "attempts": letter.attempts}, upsert=True)
        if not q.messages.delete_one({"_id": row_id, "owner": self.owner}).deleted_count:
            q.dead.delete_one({"_id": key})

    def _delete_waiting(self, queue: str, now: float) -> int:
        return int(self._queue(queue).messages.delete_many(waiting(now)).deleted_count)

    def _count_waiting(self, queue: str, now: float) -> int:
        return int(self._queue(queue).messages.count_documents(waiting(now)))

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        found = self._queue(queue).dead.find({}, sort=[("failed_at", pymongo.DESCENDING)], limit=limit)
        return [DeadLetter(queue, bytes(d["body"]), d["reason"], d["failed_at"], d["attempts"], ref=d["_id"])
                for d in found]

    def _heads(self, queue: str) -> list[bytes]:
        found = self._queue(queue).messages.find({"owner": None, "visible_at": {"$lte": time.time()}}, {"body": 1},
                                                 sort=[("_id", 1)], limit=1)
        return [bytes(d["body"]) for d in found]

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        if limit <= 0:
            return []
        found = self._queue(queue).messages.find({"owner": None, "visible_at": {"$gt": time.time()}},
                                                 {"visible_at": 1, "body": 1}, sort=[("visible_at", 1)], limit=limit)
        return [(float(d["visible_at"]), bytes(d["body"])) for d in found]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        return self._queue(queue).dead.delete_one({"_id": letter.ref}).deleted_count == 1

    def purge_dead_letters(self, queue: str) -> int:
        return int(self._queue(queue).dead.delete_many({}).deleted_count)

    def drop_collections(self, queue: str) -> None:
        """Drop the queue's collections and its id counter (messages, dead letters and records are
        lost). Stop the queue's consumers and publishers first, in every process."""
        q = self._queues.pop(queue, None) or _Queue(self.database(), queue)
        for collection in (q.messages, q.dead, q.kv):
            collection.drop()
        self.database()[SEQUENCES].delete_one({"_id": q.name})
        self._id_blocks.pop(q.name, None)  # the counter starts again: this block's ids will be handed out
        self._stores = {key: store for key, store in self._stores.items() if key[0] != queue}

    # -- routing (emulated: DESIGN §9) ------------------------------------------------------------
    def _bindings_collection(self) -> Collection[dict[str, Any]]:
        bindings = self.database()[BINDINGS]
        if not self._bindings_ready:
            bindings.create_index([("exchange", pymongo.ASCENDING), ("made", pymongo.ASCENDING)], name="exchange")
            self._bindings_ready = True
        return bindings

    def _bind(self, bindings: Sequence[Binding]) -> None:
        add_bindings(self._bindings_collection(), bindings)

    def _bindings(self, exchange: str) -> list[Binding]:
        return read_bindings(self._bindings_collection(), exchange)

    def _put_many(self, queues: Sequence[str], bodies: Sequence[bytes], *, priority: int,
                  not_before: float | None) -> None:
        """Insert into every queue; in one transaction where the server has them (a replica set), so all
        of them get the messages or none. On a standalone server the queues are written one by one."""
        now = time.time()
        visible_at = float(not_before) if not_before is not None and float(not_before) > now else now
        targets = [self._queue(queue) for queue in sorted(queues)]
        client = self._client
        if client is None or client.topology_description.topology_type_name not in ("ReplicaSetWithPrimary",
                                                                                      "Sharded"):
            for q in targets:
                self._insert_docs(q, int(priority), visible_at, bodies)
            return
        def insert_all(session: Any) -> None:
            for q in targets:
                self._insert_docs(q, int(priority), visible_at, bodies, session)

        with client.start_session() as session:
            session.with_transaction(insert_all)

    # -- process life ------------------------------------------------------------------------------
    def _after_fork(self) -> None:
        super()._after_fork()
        self._lock = threading.Lock()  # another thread of the parent may have held it at the fork
        # the parent's sockets stay the parent's: never closed here, only forgotten
        self._client, self._db, self._queues, self._stores = None, None, {}, {}
        self._bindings_ready = False
        self._claims = itertools.count(1)
        self._id_blocks = {}  # the parent hands out its blocks' ids itself

    def _close(self) -> None:
        with self._lock:
            client, self._client, self._db, self._queues, self._stores = self._client, None, None, {}, {}
            self._bindings_ready = False
        if client is not None:
            client.close()


def _make_client(url: str) -> pymongo.MongoClient[dict[str, Any]]:
    """A client for ``url`` (connecting lazily); a malformed URL raises ConfigurationError without its password."""
    try:
        return pymongo.MongoClient(url, connect=False, appname="funboost_like")
    except (pymongo.errors.ConfigurationError, pymongo.errors.InvalidURI, ValueError, TypeError) as exc:
        raise ConfigurationError(f"MONGO_URL {redact_url(url)!r} cannot be used ({type(exc).__name__})") from None
