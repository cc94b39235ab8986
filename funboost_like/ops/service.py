"""The service layer of operations: what the CLI (and the JSON API and the web pages) ask and do.

Every method returns plain JSON-able values (dicts, lists, numbers, text), so each face only prints
or serialises them. Errors are :class:`~funboost_like.core.errors.FunboostLikeError`\\ s with a
sentence fit for a user: :class:`UnknownQueue` for a queue no registry knows, and the broker's own
:class:`~funboost_like.core.errors.BrokerConnectionError` for a broker that cannot be reached.

Which brokers are looked at: the kind given with ``broker=`` (the CLI's ``--broker``), else the kinds
given with ``kinds=``, else the kinds this host's processes used (:func:`registry.used_kinds`) plus
the default embedded SQLite broker. A queue's broker is the kind its registry record names.
"""

from __future__ import annotations

import math
import queue as queue_module
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from funboost_like.brokers.registry import BrokerKind, get_broker, resolve_kind
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import BrokerConnectionError, FunboostLikeError
from funboost_like.core.message import due_time
from funboost_like.ops import registry
from funboost_like.ops.records import CallRecords

if TYPE_CHECKING:
    from funboost_like.brokers.base import Broker
    from funboost_like.core.stores import KeyValueStore


T = TypeVar("T")

LOOKUP_GRACE = 1.0  # seconds the other stores get to answer once one knows a queue (see OpsService.kind_of)
READ_DEADLINE = 10.0  # seconds a listing waits for a broker's registry; one still silent then is named in
# the errors (a MongoDB that is down takes its client 30 s to give up)


def _ask(answers: queue_module.SimpleQueue[tuple[int, Any]], index: int, store: KeyValueStore, queue: str) -> None:
    try:
        answers.put((index, registry.known_queue(store, queue)))
    except Exception as exc:  # noqa: BLE001 - a store's error is an answer too (named in the errors)
        answers.put((index, exc))


def _read_side_by_side(read: Callable[[BrokerEnum, KeyValueStore], T],
                       stores: list[tuple[BrokerEnum, KeyValueStore]]) -> list[T | BaseException]:
    """``read(kind, store)`` for each of ``stores`` at once (one thread each); the answers, or the exceptions
    raised, in the order of ``stores``. A store that has not answered within :data:`READ_DEADLINE` seconds
    gets a :class:`BrokerConnectionError` as its answer (its thread is left to end on its own)."""
    answers: list[T | BaseException] = [RuntimeError("not read")] * len(stores)

    def one(index: int) -> None:
        try:
            answers[index] = read(*stores[index])
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises what is not a broker's
            answers[index] = exc

    threads = [threading.Thread(target=one, args=(index,), daemon=True, name="funboost_like-ops-read")
               for index in range(len(stores))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + READ_DEADLINE
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    silent = BrokerConnectionError(f"no answer within {READ_DEADLINE:g} s")
    return [silent if thread.is_alive() else answers[index] for index, thread in enumerate(threads)]


class UnknownQueue(FunboostLikeError, LookupError):
    """No registry of the brokers looked at knows this queue."""


class OpsService(CallRecords):
    """Queues, consumers and control of the brokers looked at (see the module docstring)."""

    def __init__(self, kinds: Sequence[BrokerKind] | None = None, broker: BrokerKind | None = None) -> None:
        self.explicit = resolve_kind(broker) if broker is not None else None
        self._kinds = [resolve_kind(kind) for kind in kinds] if kinds else None
        self.errors: list[str] = []  # brokers a listing could not read (the others were listed)
        self._records: dict[str, dict[str, Any]] = {}  # queue -> its registry record, once looked up
        self._down: dict[int, FunboostLikeError] = {}  # id of a store that failed -> its error: not asked again

    # -- where things are ---------------------------------------------------------------------
    def kinds(self) -> list[BrokerEnum]:
        if self.explicit is not None:
            return [self.explicit]
        if self._kinds is not None:
            return list(self._kinds)
        return list(dict.fromkeys([*registry.used_kinds(), BrokerEnum.PERSISTQUEUE]))

    @staticmethod
    def broker(kind: BrokerKind) -> Broker:
        return get_broker(kind)

    def store(self, kind: BrokerKind) -> KeyValueStore:
        return registry.ops_store(self.broker(kind))

    def _each_store(self, read: Callable[[BrokerEnum, KeyValueStore], T]) -> list[T]:
        """``read`` the store of every kind looked at, once per distinct store (kinds of one server may
        share one), each store on a thread of its own: a listing waits for the slowest store once, not for
        every one in turn. The answers come in the kinds' order. A broker that fails is named in
        :attr:`errors` and not asked again by this service; raised if every one failed."""
        kinds = self.kinds()
        pending: dict[int, tuple[BrokerEnum, KeyValueStore]] = {}
        failures: list[FunboostLikeError] = []
        for kind in kinds:
            try:
                store = self.store(kind)
            except FunboostLikeError as exc:
                failures.append(exc)
                self.errors.append(f"{kind.name}: {exc}")
                continue
            if id(store) in self._down:
                failures.append(self._down[id(store)])
            else:
                pending.setdefault(id(store), (kind, store))
        answers = _read_side_by_side(read, list(pending.values()))
        results: list[T] = []
        for (kind, store), answer in zip(pending.values(), answers, strict=True):
            if isinstance(answer, FunboostLikeError):
                failures.append(answer)
                self.errors.append(f"{kind.name}: {answer}")
                self._down[id(store)] = answer
            elif isinstance(answer, BaseException):
                raise answer
            else:
                results.append(answer)
        if failures and len(failures) == len(kinds):
            raise failures[0]
        return results

    def kind_of(self, queue: str) -> BrokerEnum:
        """The broker kind of ``queue``: ``broker=`` when given, else the kind its registry record names.

        The stores are asked at once, each on a thread of its own; once one knows the queue, the others
        get ``LOOKUP_GRACE`` seconds more. So a broker this host once used that is down now (30 s to
        fail, for MongoDB) does not hold up a command on a queue of another broker.
        """
        if self.explicit is not None:
            return self.explicit
        before = len(self.errors)
        stores = self._distinct_stores()
        answers: queue_module.SimpleQueue[tuple[int, Any]] = queue_module.SimpleQueue()
        for index, (_, store) in enumerate(stores):
            threading.Thread(target=_ask, args=(answers, index, store, queue), daemon=True,
                             name="funboost_like-ops-lookup").start()
        known: dict[int, Any] = {}
        deadline = None  # once a store knows the queue, the others get LOOKUP_GRACE seconds more
        while len(known) < len(stores):
            try:
                index, answer = answers.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
            except queue_module.Empty:
                break
            known[index] = answer
            if answer is True and deadline is None:
                deadline = time.monotonic() + LOOKUP_GRACE
        for index, (kind, _) in enumerate(stores):
            if isinstance(known.get(index), Exception):
                self.errors.append(f"{kind.name}: {known[index]}")
        holders = [index for index in sorted(known) if known[index] is True]
        if holders:  # brokers not read did not matter: no error for a command that worked
            del self.errors[before:]
            kind, store = stores[holders[0]]  # a name on two brokers: the first kind, as listings show them
            records = [record for record in registry.queues(store) if record.get("queue") == queue]
            self._records[queue] = records[0] if records else {"queue": queue, "kind": int(kind)}
            return resolve_kind(int(self._records[queue]["kind"]))
        names = ", ".join(kind.name for kind in self.kinds())
        unread = f" (not read: {'; '.join(self.errors)})" if self.errors else ""
        raise UnknownQueue(f"queue {queue!r} is not known on {names}{unread}: nothing was published to it or consumed "
                           "from it there with the registry on (OPS_REGISTRY); name its broker with --broker KIND")

    def _distinct_stores(self) -> list[tuple[BrokerEnum, KeyValueStore]]:
        """Each store of the kinds looked at once (kinds of one server may share one); a kind whose store
        cannot be made is named in :attr:`errors`."""
        stores: dict[int, tuple[BrokerEnum, KeyValueStore]] = {}
        for kind in self.kinds():
            try:
                store = self.store(kind)
            except FunboostLikeError as exc:
                self.errors.append(f"{kind.name}: {exc}")
                continue
            stores.setdefault(id(store), (kind, store))
        return list(stores.values())

    # -- reading ------------------------------------------------------------------------------
    def queue_names(self) -> list[str]:
        """The names of every known queue (without counting anything)."""
        names: dict[str, None] = {}
        for records in self._each_store(lambda _, store: registry.queues(store)):
            names.update((str(record.get("queue")), None) for record in records)
        return list(names)

    def queues(self) -> list[dict[str, Any]]:
        """Every known queue with its depth, consumers, rates and control state. The queues of each broker
        kind are counted on a thread of their own, so a broker that is down does not hold up the others."""
        found: dict[tuple[str, int], tuple[KeyValueStore, dict[str, Any], list[dict[str, Any]], dict[str, Any]]] = {}

        def read(_: BrokerEnum, store: KeyValueStore) -> tuple[KeyValueStore, list[dict[str, Any]],
                                                             list[dict[str, Any]], dict[str, dict[str, Any]]]:
            records = registry.queues(store)
            workers = registry.workers(store)
            return store, records, workers, registry.read_controls(store, [str(r.get("queue")) for r in records])

        for store, records, workers, controls in self._each_store(read):
            for record in records:
                key = (str(record.get("queue")), int(record.get("kind", -1)))
                if key not in found and key[1] in set(BrokerEnum):
                    found[key] = (store, record, workers, controls.get(key[0], {}))
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        down: dict[BrokerEnum, str] = {}  # kind -> why its broker could not be reached: not asked again

        def count(kind: BrokerEnum) -> None:
            for key, (store, record, workers, control) in found.items():
                if key[1] == kind:
                    rows[key] = self._summary(store, key[0], kind, record, workers, control, down)

        counters = [threading.Thread(target=count, args=(BrokerEnum(kind),), daemon=True,
                                     name="funboost_like-ops-count") for kind in {key[1] for key in found}]
        for counter in counters:
            counter.start()
        for counter in counters:
            counter.join()
        self.errors.extend(f"{kind.name}: depths not read: {why}" for kind, why in down.items())
        return sorted(rows.values(), key=lambda row: (row["queue"], row["broker"]))

    def _summary(self, store: KeyValueStore, queue: str, kind: BrokerEnum, record: dict[str, Any] | None = None,
                 all_workers: list[dict[str, Any]] | None = None,
                 control: dict[str, Any] | None = None, down: dict[BrokerEnum, str] | None = None) -> dict[str, Any]:
        """One queue's row. ``down``: kinds found unreachable during this listing, whose queues are not
        counted (each count would wait out the client's timeout: 10 s a queue on Pulsar)."""
        if all_workers is None:
            all_workers = registry.workers(store, queue)
        if control is None:
            control = registry.read_controls(store, [queue]).get(queue, {})
        workers = [w for w in all_workers if w.get("queue") == queue and int(w.get("kind", -1)) == kind]
        live = [w for w in workers if not w["stale"]]
        broker = self.broker(kind)
        depth: int | None = None
        error = (down or {}).get(kind)
        try:
            if error is None:
                depth = broker.count(queue)
        except BrokerConnectionError as exc:
            error = str(exc)
            if down is not None:
                down[kind] = error
        except FunboostLikeError as exc:
            error = str(exc)
        oldest = self._oldest_waiting(broker, queue) if depth else None
        done = sum(float(w.get("done_per_second", 0.0)) for w in live)
        row = {
            "queue": queue, "broker": kind.name, "depth": depth, "consumers": len(live),
            "stale_consumers": len(workers) - len(live), "done_per_second": round(done, 3),
            "failed_per_second": round(sum(float(w.get("failed_per_second", 0.0)) for w in live), 3),
            "in_flight": sum(max(0, int(w.get("in_flight", 0))) for w in live),
            "paused": bool(control.get("paused", False)), "qps": _qps_limit(control, live),
            "first_seen": (record or {}).get("first_seen"),
            # Seconds the ready message that has waited longest has waited (0 when the queue is empty), read
            # from the broker; None where the broker cannot read a queue's head without taking it.
            "oldest_waiting_seconds": 0.0 if depth == 0 else oldest,
        }
        if error is not None:
            row["error"] = error
        return row

    @staticmethod
    def _oldest_waiting(broker: Broker, queue: str) -> float | None:
        try:
            heads = broker.heads(queue)
        except (NotImplementedError, FunboostLikeError):
            return None
        if not heads:  # nothing ready (all delayed, or held)
            return 0.0
        dues = [due for due in map(due_time, heads) if due is not None]
        return round(max(0.0, time.time() - min(dues)), 3) if dues else None

    def workers(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Every consumer (of ``queue`` only, when given), live and stale, newest beat first."""
        found: dict[str, dict[str, Any]] = {}
        for workers in self._each_store(lambda _, store: registry.workers(store, queue)):
            for worker in workers:
                found.setdefault(str(worker.get("id")), worker)
        return sorted(found.values(), key=lambda w: -float(w.get("beat_at", 0.0)))

    def status(self, queue: str) -> dict[str, Any]:
        """One queue: depth, in flight, rates, failures (dead letters), time left, control, consumers."""
        kind = self.kind_of(queue)
        store = self.store(kind)
        summary = self._summary(store, queue, kind, self._records.get(queue))
        broker = self.broker(kind)
        try:
            summary["dead_letters"] = len(broker.list_dead_letters(queue, 10_000))
        except NotImplementedError:
            summary["dead_letters"] = None
        rate = summary["done_per_second"] + summary["failed_per_second"]  # a failure for good leaves the queue too
        depth = summary["depth"]
        summary["seconds_left"] = round(depth / rate, 1) if rate > 0 and depth else (0.0 if depth == 0 else None)
        # The queue's consumers are in its own broker's registry: a broker this host once used that is
        # down now (30 s to fail, for MongoDB) must not hold up the answer, nor turn it into an error.
        workers = [w for w in registry.workers(store, queue) if int(w.get("kind", -1)) == kind]
        summary["workers"] = sorted(workers, key=lambda w: -float(w.get("beat_at", 0.0)))
        return summary

    # -- control ------------------------------------------------------------------------------
    def pause(self, queue: str) -> dict[str, Any]:
        return self._control(queue, paused=True)

    def resume(self, queue: str) -> dict[str, Any]:
        return self._control(queue, paused=False)

    def set_qps(self, queue: str, qps: float | None) -> dict[str, Any]:
        """Set the queue's qps for its running consumers (None: back to the decorator's)."""
        if qps is not None and not 0 <= qps < math.inf:
            raise ValueError(f"qps must be a finite number >= 0 (0: no limit), got {qps!r}")
        return self._control(queue, qps=qps)

    def _control(self, queue: str, **changes: Any) -> dict[str, Any]:
        kind = self.kind_of(queue)
        record = registry.write_control(self.store(kind), queue, **changes)
        return {"queue": queue, "broker": kind.name, **record}

    def wait_applied(self, queue: str, timeout: float = 3.0) -> dict[str, Any]:
        """Wait until every live consumer of ``queue`` reports the control record's state (or ``timeout``).

        Returns ``{"consumers", "confirmed", "applied_in_seconds"}``: how many live consumers there are,
        how many apply it, and how long after the record was written the last of them reported it (None
        when some did not).
        """
        kind = self.kind_of(queue)
        store = self.store(kind)
        deadline = time.monotonic() + timeout
        while True:
            control = registry.read_controls(store, [queue]).get(queue, {})
            live = [w for w in registry.workers(store, queue) if not w["stale"]]
            confirmed = [w for w in live if _applies(w, control)]
            if len(confirmed) == len(live) or time.monotonic() >= deadline:
                applied = len(confirmed) == len(live) and "updated_at" in control
                return {"consumers": len(live), "confirmed": len(confirmed),
                        "applied_in_seconds": round(time.time() - control["updated_at"], 3) if applied else None}
            time.sleep(0.05)

    def purge(self, queue: str) -> dict[str, Any]:
        kind = self.kind_of(queue)
        return {"queue": queue, "broker": kind.name, "purged": self.broker(kind).purge(queue)}


def _applies(worker: dict[str, Any], control: dict[str, Any]) -> bool:
    if bool(worker.get("paused")) != bool(control.get("paused", False)):
        return False
    qps = control.get("qps")
    wanted = worker.get("params", {}).get("qps", 0) if qps is None else qps
    return abs(float(worker.get("qps") or 0.0) - float(wanted or 0.0)) < 1e-9



def _qps_limit(control: dict[str, Any], live: list[dict[str, Any]]) -> float | None:
    """The queue's qps limit: the control record's, else the highest its live consumers apply (their
    decorator's); None for no limit."""
    qps = control.get("qps")
    if qps is None:
        applied = [float(w.get("qps") or 0.0) for w in live]
        qps = max(applied) if applied else None
    return float(qps) if qps else None
