"""The consumer side of operations: registration, heartbeats and run-time control.

A feature module of the middleware table (:data:`funboost_like.middleware.base.FEATURES`):
:func:`build` gives every consumer an :class:`OpsMiddleware` while the ``OPS_REGISTRY`` setting is on.
The middleware's only work on the consume path is :meth:`OpsMiddleware.pause_for` (before each
fetch, not per message), which returns an attribute. Everything else runs on one daemon thread per
process, the :class:`Agent`:

* every ``CONTROL_POLL_SECONDS`` it reads the control records of its consumers' queues (one
  ``get_many`` per broker) and applies them: a pause sets the middleware's flag, a ``qps`` change goes
  to :meth:`Consumer.set_qps <funboost_like.core.consumer.Consumer.set_qps>` (the fetcher rebuilds its
  rate limiter on its next tick);
* every ``OPS_HEARTBEAT_SECONDS`` it rewrites each consumer's worker record (rates, in flight, ...),
  and at once when a control change took effect, so the registry shows what the consumer does.

A failing store is logged (once per outage) and retried; it never stops a consumer.
:func:`queue_used` is the publisher's side: the queue is indexed the first time a publisher of this
process resolves its broker.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from enum import Enum
from typing import TYPE_CHECKING, Any

from funboost_like.core.calls import DEAD_LETTERED, FAILED, SKIPPED, SUCCEEDED, Middleware
from funboost_like.core.member_thread import MemberThread
from funboost_like.ops import registry

if TYPE_CHECKING:
    from funboost_like.brokers.base import Broker
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.stores import KeyValueStore

logger = logging.getLogger("funboost_like.ops")

CONTROL_POLL_SECONDS = 0.25
PAUSE_STEP_SECONDS = 0.1  # a paused fetcher looks again this often
_PARAMS = ("concurrent_num", "concurrent_mode", "qps", "max_retry_times", "function_timeout", "msg_expire_senconds",
           "is_using_distributed_frequency_control", "is_using_rpc_mode", "do_task_filtering", "retry_backoff",
           "max_crash_redeliveries", "is_do_not_run_by_specify_time_effect", "use_cache")


def public_params(consumer: Consumer) -> dict[str, Any]:
    """The consumer's parameters that are safe to show (plain values; no connection settings)."""
    params = consumer.params
    shown: dict[str, Any] = {name: getattr(params, name) for name in _PARAMS}
    shown["broker_kind"] = params.broker.name
    shown["function"] = getattr(consumer.function, "__qualname__", repr(consumer.function))
    shown["status_persistence"] = bool(params.function_result_status_persistance_conf.is_save_status)
    return {name: value.value if isinstance(value, Enum) else value for name, value in shown.items()}


class OpsMiddleware(Middleware):
    """One consumer's registration: pause flag, applied qps, worker slot and last counts."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.paused = False  # what the control record asks
        self.observed = False  # what the fetcher last saw (reported in the worker record)
        self.reported: tuple[bool, float] | None = None  # (paused, qps) of the last worker record
        self.pause = 0.0
        self.qps: float | None = None  # the qps a control record set (None: the decorator's)
        self.active = False
        self.worker_id = registry.worker_id()
        self.slot: int | None = None
        self.started_at = time.time()
        self.last_counts: tuple[float, int, int] = (time.monotonic(), 0, 0)
        self.rates = (0.0, 0.0)

    def pause_for(self) -> float:
        if not self.active:
            self.active = True
            self.started_at = time.time()
            self.worker_id = registry.worker_id()
            self._read_control()
            agent.add(self)
        if self.observed is not self.paused:
            self.observed = self.paused
            agent.wake()
        return self.pause

    def _read_control(self) -> None:
        """Before the first fetch: a consumer started on a paused or throttled queue obeys from its first
        call, not from the agent's first round (it ran a whole batch, or an unlimited burst, before)."""
        queue = self.consumer.queue_name
        try:
            control = registry.read_controls(registry.ops_store(self.consumer.broker), [queue]).get(queue, {})
        except Exception as exc:  # noqa: BLE001 - the agent applies it once the registry answers
            logger.warning("could not read the control record of queue %r before consuming (%s)", queue, exc)
            return
        apply_control(self, control)

    def close(self) -> None:
        agent.remove(self)

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.pause = PAUSE_STEP_SECONDS if paused else 0.0

    def state(self) -> tuple[bool, float]:
        """(paused, qps) as the fetcher applies them now."""
        return self.applied_pause(), self.consumer.qps_in_effect

    def applied_pause(self) -> bool:
        """The pause in effect: what the fetcher last saw, or what is asked while every slot is busy (the
        fetcher asks before its next fetch, so no call starts meanwhile: confirmed at once, not when a
        long call ends)."""
        return self.paused if self.consumer.waiting_for_a_slot else self.observed

    def record(self, interval: float) -> dict[str, Any]:
        """This consumer's worker record now (computes the rates since the previous record)."""
        consumer = self.consumer
        counts = consumer.stats.counts
        done, failed = counts[SUCCEEDED] + counts[SKIPPED], counts[FAILED] + counts[DEAD_LETTERED]
        now = time.monotonic()
        then, done_before, failed_before = self.last_counts
        if now - then >= interval / 2:
            span = now - then
            self.rates = ((done - done_before) / span, (failed - failed_before) / span)
            self.last_counts = (now, done, failed)
        try:
            in_flight = consumer.broker.in_flight(consumer.queue_name)
        except Exception:  # noqa: BLE001 - a number for display only
            in_flight = -1
        params = consumer.params
        return {
            "id": self.worker_id, "queue": consumer.queue_name, "kind": int(params.broker_kind),
            "broker": params.broker.name, "host": registry.HOST, "pid": os.getpid(),
            "script": sys.argv[0] if sys.argv else "",
            "started_at": self.started_at, "beat_at": time.time(), "interval": interval,
            "done_per_second": round(self.rates[0], 3), "failed_per_second": round(self.rates[1], 3),
            "rate_last_minute": round(consumer.stats.rate(), 3), "succeeded": counts[SUCCEEDED],
            "failed": counts[FAILED] + counts[DEAD_LETTERED], "in_flight": in_flight,
            "threads": consumer.worker_count, "concurrent_num": params.concurrent_num,
            "qps": consumer.qps_in_effect, "paused": self.applied_pause(), "params": public_params(consumer),
        }


class Agent(MemberThread[OpsMiddleware]):
    """The process's registration thread (started with the first consumer, ends with the last)."""

    thread_name = "funboost_like-ops"
    logger = logger
    service = "the operations registry"

    def remove(self, member: OpsMiddleware) -> None:
        self._discard(member)
        with self._io:
            member.active = False
            if member.slot is not None:
                try:
                    registry.release_worker_slot(self._store(member), member.slot, member.worker_id)
                except Exception as exc:  # noqa: BLE001
                    logger.debug("could not remove the worker record of queue %r: %s", member.consumer.queue_name, exc)
                member.slot = None

    @staticmethod
    def _store(member: OpsMiddleware) -> KeyValueStore:
        return registry.ops_store(member.consumer.broker)

    def _run(self) -> None:
        next_beat = 0.0
        while True:
            members = self._members_or_end()
            if not members:
                return
            interval = registry.heartbeat_seconds()
            failures: list[Exception] = []
            changed = self._apply_controls(members, failures) or any(m.reported != m.state() for m in members)
            if changed or time.monotonic() >= next_beat:
                next_beat = time.monotonic() + interval
                self._beat(members, interval, failures)
            pause = min(CONTROL_POLL_SECONDS, interval)
            self._outage.report(failures[0] if failures else None, pause)
            self._wake.wait(pause)
            self._wake.clear()

    def _apply_controls(self, members: list[OpsMiddleware], failures: list[Exception]) -> bool:
        """Read the control records (one round trip per store) and apply them; True if anything changed."""
        changed = False
        by_store: dict[int, tuple[KeyValueStore, list[OpsMiddleware]]] = {}
        for member in members:
            try:  # making a store may connect (MQTT): a server down at start must not end this thread
                store = self._store(member)
            except Exception as exc:  # noqa: BLE001 - retried on the next round
                failures.append(exc)
                continue
            by_store.setdefault(id(store), (store, []))[1].append(member)
        for store, group in by_store.values():
            try:
                controls = registry.read_controls(store, sorted({m.consumer.queue_name for m in group}))
            except Exception as exc:  # noqa: BLE001 - a store that fails is retried on the next round
                failures.append(exc)
                continue
            for member in group:
                changed = apply_control(member, controls.get(member.consumer.queue_name, {})) or changed
        return changed

    def _beat(self, members: list[OpsMiddleware], interval: float, failures: list[Exception]) -> None:
        for member in members:
            with self._io:
                try:
                    if member.active:
                        self._beat_one(member, interval)
                except Exception as exc:  # noqa: BLE001 - retried at the next beat
                    failures.append(exc)

    def _beat_one(self, member: OpsMiddleware, interval: float) -> None:
        store = self._store(member)
        record = member.record(interval)
        member.reported = (record["paused"], record["qps"])
        if member.slot is None:
            registry.note_queue(member.consumer.broker, member.consumer.queue_name)
            member.slot = registry.claim_worker_slot(store, record, interval)
        else:
            member.slot = registry.beat(store, member.slot, record, interval)


def apply_control(member: OpsMiddleware, control: dict[str, Any]) -> bool:
    """Apply one control record to one consumer; True when something changed.

    A new qps is applied before a resume: a queue resumed with a lower qps never runs at the old rate.
    """
    changed = False
    consumer = member.consumer
    raw = control.get("qps")
    qps = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw >= 0 else None
    wanted = float(consumer.params.qps if qps is None else qps)
    if qps != member.qps:
        member.qps = qps
        consumer.set_qps(wanted)
        consumer.logger.info("queue %r: qps set to %g by the operations registry", consumer.queue_name, wanted)
        changed = True
    paused = bool(control.get("paused", False))
    if paused != member.paused and (paused or consumer.qps_in_effect == wanted):
        member.set_paused(paused)
        consumer.logger.info("queue %r %s by the operations registry", consumer.queue_name,
                             "paused" if paused else "resumed")
        changed = True
    return changed


agent = Agent()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=agent.reset_in_child)


def build(consumer: Consumer) -> OpsMiddleware | None:
    return OpsMiddleware(consumer) if registry.enabled() else None


def queue_used(queue: str, broker: Broker) -> None:
    """A publisher of this process resolved its broker: index the queue (once; never raises)."""
    if registry.enabled():
        registry.note_queue(broker, queue)
