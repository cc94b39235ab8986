"""The registry of queues and consumers, and the control records, kept beside each broker.

**Where** (one rule): the records of the queues of broker kind K live in K's own key-value records,
``broker.key_value_store("funboost_like_ops", "ops")``, so whoever reaches the broker reaches its
registry (every host of a Redis or RabbitMQ deployment sees the same one). A broker without
key-value records (``capabilities.key_value`` false: Kafka, Pulsar, ZeroMQ, NSQ, HTTPSQS) has its
registry in the records of the broker kind named by the setting ``OPS_STORE_BROKER`` (for instance
``"REDIS"``: every host pointing at that Redis shares it), or, when that setting is empty, in the
embedded SQLite store of this host (:func:`local_store`: seen and controlled from this host only).
Each host also keeps, in its embedded store, the list of broker kinds its processes used, so the CLI
of that host knows where to look without being told; with ``OPS_STORE_BROKER`` set, that list is
kept in the shared store too, so the CLI of any host finds the kinds every host used.

**Layout** (the store contract has no key listing, so every list is a run of numbered slots):

* ``q:<n>``: the n-th queue seen on the broker, JSON ``{"queue", "kind", "first_seen", "host"}``,
  no expiry; slots are taken in order with ``add_if_absent``, so they form an unbroken run from 0
  (``q:next``, a hint, says where the search for a free one starts).
  ``seen:<queue>`` marks a queue as indexed (written once per process and queue, never per message).
* ``w:<n>``: one running consumer (:func:`worker_record` fields), rewritten at every heartbeat with an
  expiry of ``WORKER_TTL_BEATS`` heartbeats; a consumer takes the lowest free slot. Slots come in
  blocks of ``BLOCK``; ``wb:<b>`` marks that block b > 0 was ever used, so a reader scans only those.
* ``ctl:<queue>``: the queue's control record ``{"paused", "qps", "updated_at", "by"}``, no expiry.
* on the local store: ``kind:<number>``, the broker kinds this host used.

A record is stale after ``STALE_BEATS`` heartbeats without a beat (shown so), and gone after
``WORKER_TTL_BEATS``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from funboost_like.brokers.registry import get_broker, resolve_kind
from funboost_like.core import codec
from funboost_like.core.config import data_dir_setting, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.sqlite_files import queue_file_name
from funboost_like.core.stores import KeyValueStore, SqliteKeyValueStore

if TYPE_CHECKING:
    from funboost_like.brokers.base import Broker

logger = logging.getLogger("funboost_like.ops")

OPS_QUEUE = "funboost_like_ops"
NAMESPACE = "ops"
BLOCK = 64  # slots read in one get_many
STALE_BEATS = 3
WORKER_TTL_BEATS = 10
HOST = socket.gethostname()
RETRY_SECONDS = 5.0  # the first retry of a queue record that failed; doubled up to RETRY_MAX_SECONDS
RETRY_MAX_SECONDS = 60.0

_local_stores: dict[str, SqliteKeyValueStore] = {}
_noted: weakref.WeakKeyDictionary[Broker, set[str]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def enabled() -> bool:
    """Whether consumers register and publishers note their queues (setting ``OPS_REGISTRY``)."""
    return bool(settings.get("OPS_REGISTRY"))


def heartbeat_seconds() -> float:
    return max(0.05, float(settings.get("OPS_HEARTBEAT_SECONDS")))


def local_store(namespace: str = "local") -> SqliteKeyValueStore:
    """The embedded SQLite store of this host (beside the SQLite broker's queue files)."""
    folder = data_dir_setting("SQLITE_QUEUES_PATH", "sqlite_queues")
    path = str(folder / f"{queue_file_name(OPS_QUEUE)[:-len('.sqlite3')]}@{namespace}.sqlite3")
    store = _local_stores.get(path)
    if store is None:
        with _lock:
            store = _local_stores.setdefault(path, SqliteKeyValueStore(path))
    return store


def ops_store(broker: Broker) -> KeyValueStore:
    """The store holding the registry of ``broker``'s queues (see the module docstring for the rule)."""
    if broker.capabilities.key_value:
        return broker.key_value_store(OPS_QUEUE, NAMESPACE)
    shared = shared_broker()
    if shared is not None:
        return shared.key_value_store(OPS_QUEUE, f"{NAMESPACE}-kind{int(broker.kind)}")
    return local_store(f"kind{int(broker.kind)}")


def shared_broker() -> Broker | None:
    """The broker named by ``OPS_STORE_BROKER`` (None when it is empty); it must have key-value records."""
    name = str(settings.get("OPS_STORE_BROKER") or "").strip()
    if not name:
        return None
    kind = resolve_kind(int(name) if name.isdigit() else name)
    broker = get_broker(kind)
    if not broker.capabilities.key_value:
        raise ConfigurationError(f"OPS_STORE_BROKER={name!r}: broker kind {kind.name} has no key-value records "
                                 "to hold the registry; name one that has (REDIS, SQLACHEMY, MONGOMQ, ...)")
    return broker


def dumps(record: dict[str, Any]) -> bytes:
    return codec.dumps(record)


def loads(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = codec.loads(raw)
    except codec.DecodeFailure:
        return None
    return value if isinstance(value, dict) else None


def _slots(store: KeyValueStore, prefix: str, start: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """``(n, record)`` for slots ``prefix<n>`` from ``start``, one block per round trip, forever."""
    while True:
        keys = [f"{prefix}{n}" for n in range(start, start + BLOCK)]
        found = store.get_many(keys)
        for n, key in enumerate(keys, start):
            yield n, loads(found.get(key))
        start += BLOCK


def _claim(store: KeyValueStore, prefix: str, value: bytes, ttl: float | None, start: int = 0) -> int:
    """Take the lowest free slot ``prefix<n>`` from ``start`` with ``value``; return n."""
    for n, record in _slots(store, prefix, start):
        if record is None and store.add_if_absent(f"{prefix}{n}", value, ttl):
            return n
    raise AssertionError("unreachable")  # pragma: no cover


# -- queues -----------------------------------------------------------------------------------------


def note_queue(broker: Broker, queue: str) -> None:
    """Record that ``queue`` exists on ``broker`` (once per process, broker and queue; never raises).

    A record that fails (the store is unreachable) is tried again by :data:`retries`, on a thread of
    its own, so neither a publish nor a consumer ever waits for it again.
    """
    noted = _noted.get(broker)
    if noted is not None and queue in noted:
        return
    with _lock:
        noted = _noted.setdefault(broker, set())
        if queue in noted:
            return
        noted.add(queue)
    try:
        _record_queue(broker, queue)
    except Exception as exc:  # noqa: BLE001 - the registry never stops a publish or a consumer
        logger.warning("could not record queue %r in the operations registry (trying again in the "
                       "background): %s", queue, exc)
        retries.add(broker, queue)


def _record_queue(broker: Broker, queue: str) -> None:
    index_queue(ops_store(broker), queue, int(broker.kind))
    if broker.capabilities.cross_process:
        note_kind(int(broker.kind))


class Retries:
    """Queues whose record failed, written again every ``RETRY_SECONDS`` (doubling up to
    ``RETRY_MAX_SECONDS``) on a daemon thread that ends once all are written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: weakref.WeakKeyDictionary[Broker, set[str]] = weakref.WeakKeyDictionary()
        self._thread: threading.Thread | None = None

    def add(self, broker: Broker, queue: str) -> None:
        with self._lock:
            self._pending.setdefault(broker, set()).add(queue)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="funboost_like-ops-retries", daemon=True)
                self._thread.start()

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(queue for queues in self._pending.values() for queue in queues)

    def _run(self) -> None:
        pause = RETRY_SECONDS
        while True:
            time.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_SECONDS)
            with self._lock:
                work = [(broker, queue) for broker, queues in self._pending.items() for queue in queues]
            for broker, queue in work:
                try:
                    _record_queue(broker, queue)
                except Exception as exc:  # noqa: BLE001 - tried again later
                    logger.debug("recording queue %r in the operations registry failed again: %s", queue, exc)
                    continue
                logger.info("recorded queue %r in the operations registry", queue)
                with self._lock:
                    self._pending.get(broker, set()).discard(queue)
            with self._lock:
                if not any(self._pending.values()):
                    self._pending.clear()
                    self._thread = None
                    return

    def reset_in_child(self) -> None:
        """In a forked child: the parent's thread does not exist here; its pending records stay the parent's."""
        self._lock = threading.Lock()
        self._pending = weakref.WeakKeyDictionary()
        self._thread = None


retries = Retries()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=retries.reset_in_child)


def index_queue(store: KeyValueStore, queue: str, kind: int) -> None:
    if store.get(f"seen:{queue}") is not None:
        return
    record = {"queue": queue, "kind": kind, "first_seen": time.time(), "host": HOST}
    try:  # queue slots are never freed: every slot below the hint is taken, so the search starts there
        start = max(0, int(store.get("q:next") or 0))
    except ValueError:
        start = 0
    slot = _claim(store, "q:", dumps(record), None, start)
    store.put("q:next", str(slot + 1).encode(), None)
    store.put(f"seen:{queue}", str(slot).encode(), None)


def _kind_stores() -> list[KeyValueStore]:
    """Where the list of used broker kinds is kept: this host's store, and the shared one when set."""
    shared = shared_broker()
    return [local_store()] if shared is None else [local_store(), shared.key_value_store(OPS_QUEUE, NAMESPACE)]


def note_kind(kind: int) -> None:
    for store in _kind_stores():
        if store.get(f"kind:{kind}") is None:
            store.put(f"kind:{kind}", b"1", None)


def used_kinds() -> list[BrokerEnum]:
    """The broker kinds processes of this host used (that reach across processes), and with
    ``OPS_STORE_BROKER`` set, those processes of every host sharing that store used."""
    keys = [f"kind:{int(kind)}" for kind in BrokerEnum]
    found: set[str] = set()
    for store in _kind_stores():
        found.update(store.get_many(keys))
    return [kind for kind in BrokerEnum if f"kind:{int(kind)}" in found]


def known_queue(store: KeyValueStore, queue: str) -> bool:
    return store.exists(f"seen:{queue}")


def queues(store: KeyValueStore) -> list[dict[str, Any]]:
    """Every queue seen on the store's broker, in the order first seen."""
    found: dict[str, dict[str, Any]] = {}
    for _, record in _slots(store, "q:", 0):
        if record is None:
            break
        name = record.get("queue")
        if isinstance(name, str) and name not in found:
            found[name] = record
    return list(found.values())


# -- workers ----------------------------------------------------------------------------------------


def worker_ttl(interval: float) -> float:
    return interval * WORKER_TTL_BEATS


def claim_worker_slot(store: KeyValueStore, record: dict[str, Any], interval: float) -> int:
    """Write a consumer's first record in the lowest free worker slot; return the slot."""
    slot = _claim(store, "w:", dumps(record), worker_ttl(interval))
    if slot >= BLOCK:
        store.put(f"wb:{slot // BLOCK}", b"1", None)
    return slot


def beat(store: KeyValueStore, slot: int, record: dict[str, Any], interval: float) -> int:
    """Rewrite a consumer's record; if its slot expired and was taken by another one, take a new slot."""
    current = loads(store.get(f"w:{slot}"))
    if current is not None and current.get("id") != record["id"]:
        return claim_worker_slot(store, record, interval)
    store.put(f"w:{slot}", dumps(record), worker_ttl(interval))
    return slot


def release_worker_slot(store: KeyValueStore, slot: int, worker_id: str) -> None:
    current = loads(store.get(f"w:{slot}"))
    if current is None or current.get("id") == worker_id:
        store.delete(f"w:{slot}")


def workers(store: KeyValueStore, queue: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
    """The consumers of the store's broker (of ``queue`` only, when given), each with ``stale`` and ``age``."""
    now = time.time() if now is None else now
    found: list[dict[str, Any]] = []
    block = 0
    while True:
        base = block * BLOCK
        keys = [f"w:{n}" for n in range(base, base + BLOCK)]
        records = store.get_many(keys)
        for key in keys:
            record = loads(records.get(key))
            if record is not None and (queue is None or record.get("queue") == queue):
                age = now - float(record.get("beat_at", 0.0))
                record["age"] = round(age, 3)
                record["stale"] = age > STALE_BEATS * float(record.get("interval", 2.0))
                found.append(record)
        block += 1
        if not store.exists(f"wb:{block}"):
            return found


def worker_id() -> str:
    """A new consumer's id: host, pid and a clock reading (unique while clocks do not go back)."""
    return f"{HOST}:{os.getpid()}:{time.time_ns():x}"


# -- control ----------------------------------------------------------------------------------------


def read_controls(store: KeyValueStore, queues: list[str]) -> dict[str, dict[str, Any]]:
    """The control records of ``queues`` (one round trip); queues without one are left out."""
    raw = store.get_many([f"ctl:{queue}" for queue in queues])
    found: dict[str, dict[str, Any]] = {}
    for queue in queues:
        record = loads(raw.get(f"ctl:{queue}"))
        if record is not None:
            found[queue] = record
    return found


def write_control(store: KeyValueStore, queue: str, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` (``paused``, ``qps``) into the queue's control record; return the new record.

    Last writer wins: two operators changing one queue at the same moment may lose one change.
    """
    record = read_controls(store, [queue]).get(queue) or {"paused": False, "qps": None}
    record.update(changes)
    record["updated_at"] = time.time()
    record["by"] = f"{HOST}:{os.getpid()}"
    store.put(f"ctl:{queue}", dumps(record), None)
    return record
