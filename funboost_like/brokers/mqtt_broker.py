"""MQTT (Mosquitto or any MQTT 5 server): QoS 1, shared subscriptions, persistent sessions, paho-mqtt 2.

Guarantee: at-least-once **while the server keeps the sessions** (Mosquitto: persistence on and no
crash since its last save, the session expiry not reached, ``max_queued_messages`` not exceeded;
docs/mqtt.md says the same for users). Each message runs in one consumer at a time: the consumers of
a queue are members of one MQTT shared subscription.

Layout (names in :mod:`~funboost_like.brokers.mqtt_sessions`), per queue ``q``:

* messages are published at QoS 1 to the topic named after the queue, ``<q>`` (another program, a web
  page, publishes a JSON body there and it runs); a message is acked (PUBACK) after its call;
* a consuming process holds one *slot* of the queue, a persistent session: it claims the lowest slot
  whose presence record is not a fresh ``live`` one (renewed every 5 s; the connection's will parks it
  the moment the process dies). The server keeps a slot's unacked and queued messages while nobody
  is connected with its id, and sends them again to the next process that claims it;
* MQTT drops a message nobody subscribed to, so the first publish to a queue makes slot 0's session
  if no slot exists; the process holding the lowest live slot (the *mover*) drains parked slots every
  5 s (it re-publishes their messages, acks them and ends those sessions; slot 0 stays, to hold
  messages while no consumer runs) and moves due delayed messages (:mod:`.mqtt_delays`);
* crash counting: before a fetch returns, the slot's ``held`` record lists the packet ids it hands
  out. The slot's next holder reads it first: a message the server sends again (DUP) with one of
  those ids was running when its consumer died. It is re-published with ``fl-crashes`` + 1 (MQTT 5
  user properties ``fl-attempts`` and ``fl-crashes`` carry the counts), acked, and the copy runs under
  the poison-message rule. A nack or release re-publishes a copy with its counts and acks the
  original (copies join the back of the queue; a delayed one becomes a delayed record);
* ``count`` sums the totals every process keeps in a retained record (:mod:`.mqtt_counts`).

Plain queue messages are published on MQTT's wire directly (:mod:`.mqtt_wire`, one blocking socket
per publishing thread); everything else goes through paho-mqtt.

Capabilities: native redelivery (the server's sessions), emulated delays, no priorities, no routing;
dead letters (``funboost_like/dlq/<q>/<id>``, :mod:`.mqtt_dead_letters`) and key-value records are
retained messages (:mod:`.mqtt_records`; an RPC result is published to
``funboost_like/kv/<q>/results/<task_id>``).

Limits, stated: ``purge`` removes delayed messages, what this process buffers and what parked slots
hold, not what the server is sending to other live consumers. Two processes claiming one slot at the
same moment: the server keeps the later, the earlier claims another slot, and what it was running may
run twice. Prefetched messages go back when the broker closes (the session keeps them unacked).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as paho

from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.mqtt_client import Control, MqttRefused, MqttUnreachable, close, parse_url, subscribe
from funboost_like.brokers.mqtt_counts import Counts
from funboost_like.brokers.mqtt_dead_letters import deletions, keep, newest_letters, records, remove, soonest_delayed
from funboost_like.brokers.mqtt_delays import DelayedMessages, Entry, delayed_record
from funboost_like.brokers.mqtt_records import MqttRecords
from funboost_like.brokers.mqtt_sessions import (
    Item,
    Publish,
    Sessions,
    Slot,
    anchor_seconds,
    check_queue_name,
    copies,
    queue_topic,
    shared_filter,
    take_until_idle,
)
from funboost_like.brokers.mqtt_wire import WirePublishers
from funboost_like.core.config import redact_url, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.mqtt")

HEARTBEAT = 5.0  # presence records are written again this often; parked slots are drained as often
IDLE = 1.0  # a drained session is empty once nothing came for this long (then a parked slot's session ends)
PURGE_IDLE = 0.1  # purging stops once nothing came for this long (what comes later stays)


class MqttBroker(Broker):
    """At-least-once MQTT broker on shared subscriptions and persistent sessions (see the module docstring)."""

    kind = BrokerEnum.MQTT
    capabilities = Capabilities(redelivery="native", delay="emulated", max_priority=0, dead_letters=True,
                                key_value=True, routing="none", persistent=True, cross_process=True,
                                cross_host=True, release_front=False, queue_names=check_queue_name)
    connection_errors = (MqttUnreachable, OSError, TimeoutError)
    errors = (MqttRefused,)

    def __init__(self) -> None:
        super().__init__()
        self._after_fork()

    def _after_fork(self) -> None:  # the parent's clients and threads are not ours: dropped, never closed
        self._control: Control | None = None
        self._wires: WirePublishers | None = None  # plain queue messages, on their own connections
        self._counts: Counts | None = None
        self._sessions: Sessions | None = None
        self._slots: dict[str, Slot] = {}
        self._anchored: dict[str, float] = {}  # queue -> when this process makes sure again it has a session
        self._records: dict[tuple[str, str], MqttRecords] = {}
        self._lock = threading.RLock()
        self._movers: set[str] = set()  # queues whose delayed messages this process moves (lowest live slot)
        self._parked: dict[str, set[tuple[str, int]]] = {}  # slots seen parked by the last maintenance round
        self._delays: DelayedMessages | None = None
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # -- connections, slots --------------------------------------------------------------------------
    def _url(self) -> str:
        return str(settings.get("MQTT_URL"))

    def _where(self) -> str:
        return f"MQTT at {redact_url(self._url())}"

    def maintenance_interval(self) -> float:
        return HEARTBEAT

    @property
    def control(self) -> Control:
        if self._control is None:
            with self._lock:
                if self._control is None:
                    self._control = Control(parse_url(self._url()))
                    self._sessions = Sessions(self._control)
                    self._counts = Counts(self._control)
                    self._delays = DelayedMessages(self._control, self._move_due, self._movers.__contains__)
        return self._control

    @property
    def sessions(self) -> Sessions:
        if self._sessions is None:
            self.control  # noqa: B018 - made with the control connection
        assert self._sessions is not None
        return self._sessions

    @property
    def counts(self) -> Counts:
        if self._counts is None:
            self.control  # noqa: B018 - made with the control connection
        assert self._counts is not None
        return self._counts

    def _counted(self, queue: str, sent: int = 0, taken: int = 0) -> Publish:
        """The totals record of this process (:mod:`.mqtt_counts`), counting these messages."""
        return self.counts.record(queue, sent, taken)

    def _held_of(self, queue: str) -> Any:
        return lambda: self._held.get(queue, ())

    def _slot(self, queue: str) -> Slot:
        slot = self._slots.get(queue)
        if slot is not None and not slot.lost:
            return slot
        with self._lock:
            slot = self._slots.get(queue)
            if slot is None or slot.lost:
                slot = self._claim(queue, {slot.index} if slot is not None else set())
            return slot

    def _claim(self, queue: str, avoid: set[int]) -> Slot:
        sessions = self.sessions
        index, live = sessions.claim(queue, avoid, self._owner)
        slot = Slot(queue, index, sessions.inherited(queue, index))
        slot.client, _ = sessions.open(queue, index, slot.buffer, slot.epoch, slot.inherited, slot.taken_over,
                                       self._held_of(queue), member=True, owner=self._owner, drops=slot.drops)
        try:
            subscribe(slot.client, shared_filter(queue), self._where())
            sessions.beat(queue, index, self._owner)
        except BaseException:
            close(slot.client)  # the next fetch claims again; this client must not reconnect meanwhile
            raise
        self._slots[queue] = slot
        self._note_mover(queue, slot, live)
        assert self._delays is not None
        self._delays.watch(queue)
        return slot

    def _note_mover(self, queue: str, slot: Slot, live: dict[int, bool]) -> bool:
        """Whether this process holds the lowest live slot of ``queue`` (it moves delayed messages, drains
        parked slots)."""
        mover = slot.index <= min((i for i, alive in live.items() if alive and i != slot.index), default=slot.index)
        (self._movers.add if mover else self._movers.discard)(queue)
        return mover

    def _anchor(self, queue: str) -> None:
        """Make sure the queue has a session (MQTT drops what nobody subscribed to): before the first message,
        and again every :func:`anchor_seconds`, so that a long-running publisher makes slot 0's session
        again before the last one expires (its parked record ends :func:`parked_margin` before it)."""
        with self._lock:
            if time.monotonic() < self._anchored.get(queue, 0.0):
                return
            sessions = self.sessions
            if queue not in self._slots and not sessions.presence(queue):  # a slot of ours: it has one
                sessions.anchor(queue, self._where())
            self._anchored[queue] = time.monotonic() + anchor_seconds()

    # -- publishing ----------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        if priority:
            raise ConfigurationError("MQTT has no message priorities")
        if time.monotonic() >= self._anchored.get(queue, 0.0):
            self._anchor(queue)
        if not_before is not None and not_before > time.time():
            self.control.publish([delayed_record(queue, body, not_before, 0, 0) for body in bodies])
        else:
            topic, wires = queue_topic(queue), self._wires
            if wires is None:
                wires = self._wires = WirePublishers(self.control.server)
            if not wires.publish(topic, bodies):
                self.control.publish([(topic, body, False, None) for body in bodies])
        self.counts.published(queue, len(bodies))

    def _copy(self, queue: str, originals: Sequence[tuple[int, bytes, int, int]], epoch: int, delay: float = 0.0,
              taken: int = 0) -> None:
        """Re-publish (packet id, body, attempts before, crashes) with their counts (after ``delay`` seconds:
        as delayed records), then ack the originals."""
        if delay > 0:
            due = time.time() + delay
            items = [delayed_record(queue, body, due, attempts, crashes) for _, body, attempts, crashes in originals]
        else:
            items = copies(queue, originals)
        self.control.publish([*items, self._counted(queue, sent=len(originals), taken=taken)])
        self._send_acks(queue, epoch, [mid for mid, *_ in originals])

    def _send_acks(self, queue: str, epoch: int, mids: Sequence[int]) -> None:
        slot = self._slots.get(queue)
        if slot is not None and slot.epoch == epoch and slot.client is not None:  # else its session moved on:
            for mid in mids:  # the server sends those messages to the slot's new holder
                slot.client.ack(mid, 1)

    def _move_due(self, queue: str, entries: list[Entry]) -> None:
        """Publish due delayed messages to ``queue`` with their counts, then delete their records."""
        due = copies(queue, [(0, body, attempts, crashes) for *_, body, attempts, crashes in entries])
        self.control.publish([*due, *((entry[3], b"", True, None) for entry in entries),
                              self._counted(queue, sent=len(entries), taken=len(entries))])

    # -- consuming -----------------------------------------------------------------------------------
    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        slot = self._slot(queue)
        if not self.control.client.is_connected():
            return []  # paho reconnects it; what is buffered waits (the held record cannot be written now)
        drops = len(slot.drops)
        items: list[Item] = slot.buffer.take(max_n)
        if not items:
            return []
        try:
            return self._hand_out(slot, items)
        except BaseException:  # unacked: back to the buffer, unless the server sends them again (a reconnection)
            if len(slot.drops) == drops:
                slot.buffer.items.extendleft(reversed([item for item in items if item[0] not in slot.copied]))
            slot.copied.clear()
            raise

    def _hand_out(self, slot: Slot, items: list[Item]) -> list[Delivery]:
        queue = slot.queue
        crashed = [(mid, body, attempts + 1, crashes + 1) for mid, body, attempts, crashes, dead in items if dead]
        if crashed:  # run later as copies counting the death, alone under the poison-message rule
            self._copy(queue, crashed, slot.epoch, taken=len(crashed))
            slot.inherited.difference_update(mid for mid, *_ in crashed)
            slot.copied.update(mid for mid, *_ in crashed)
        got = [Delivery(queue, body, (slot.epoch, mid), attempts + 1, 0, crashes)
               for mid, body, attempts, crashes, dead in items if not dead]
        if got:  # the held record first: if this process dies, the slot's next holder counts the crash
            with slot.lock:
                slot.fresh = {d.token[1] for d in got}
                held = slot.recorded = self._held_by(slot) | slot.fresh
                self.control.publish([self.sessions.record("held", queue, slot.index, sorted(held)),
                                      self._counted(queue, taken=len(got))])
        slot.copied.clear()
        return got

    def _wait(self, queue: str, timeout: float) -> None:
        slot = self._slots.get(queue)
        if slot is not None:
            slot.buffer.wait(timeout)

    # -- settling ------------------------------------------------------------------------------------
    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            epoch, mid = delivery.token
            self._send_acks(delivery.queue, epoch, (mid,))

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        for delivery in deliveries:
            epoch, mid = delivery.token
            original = [(mid, delivery.body, delivery.attempts - (0 if count_attempt else 1), delivery.crashes)]
            self._copy(delivery.queue, original, epoch, delay)

    # -- dead letters, delayed records: retained messages (:mod:`.mqtt_dead_letters`) ----------------
    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        keep(self.control, delivery.queue, letter)
        self._ack([delivery])

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        return newest_letters(queue, self._read(queue, "dlq"), limit)

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        """(due time, body) of the delayed records of ``queue``, soonest first."""
        return soonest_delayed(self._read(queue, "delayed"), limit)

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        """Delete the retained message of ``letter`` (its ``ref`` is its topic); False when it is gone."""
        try:
            return remove(self.control, str(letter.ref))
        except self._client_errors as exc:
            raise self._translated(exc, f"removing a dead letter of queue {queue!r}") from exc

    def purge_dead_letters(self, queue: str) -> int:
        found = self._read(queue, "dlq")
        if found:
            self.control.publish(deletions(found))
        return len(found)

    def _read(self, queue: str, kind: str) -> list[paho.MQTTMessage]:
        """The retained records of ``queue`` of one kind (``dlq``, ``delayed``, ``counts``)."""
        try:
            return records(self.control, queue, kind)
        except self._client_errors as exc:
            raise self._translated(exc, f"reading the {kind} records of queue {queue!r}") from exc

    def key_value_store(self, queue: str, namespace: str) -> MqttRecords:
        store = self._records.get((queue, namespace))
        return store or self._records.setdefault((queue, namespace), MqttRecords(self.control, queue, namespace))

    # -- maintenance: heartbeats, draining parked slots ----------------------------------------------
    def _held_by(self, slot: Slot) -> set[int]:
        """The packet ids of ``slot``'s session this process holds (fetched, not settled)."""
        return {token[1] for q, token in self.held() if q == slot.queue and token[0] == slot.epoch}

    def _renew(self, deliveries: Sequence[Delivery]) -> None:
        """Mark the slots live; shrink a slot's held record to what it still holds, so that a stale one does
        not make the next holder count a redelivery after a reconnection as a crash."""
        for slot in list(self._slots.values()):
            if not slot.lost:
                self.sessions.beat(slot.queue, slot.index, self._owner)
                with slot.lock:  # what the last fetch handed out may not be held yet (the base adds it next)
                    held, slot.fresh = self._held_by(slot) | slot.fresh, set()
                    if held != slot.recorded:
                        slot.recorded = held
                        self.control.publish([self.sessions.record("held", slot.queue, slot.index, sorted(held))])

    def _recover(self, queue: str) -> int:
        """The holder of the lowest live slot re-publishes what slots parked since its last round hold (a new
        consumer claims a slot parked moments ago itself), and ends their sessions."""
        slot = self._slots.get(queue)
        if slot is None or slot.lost:
            return 0
        live = self.sessions.presence(queue)
        parked = {(queue, i) for i, alive in live.items() if not alive and i != slot.index}
        seen, self._parked[queue] = self._parked.get(queue, set()), parked
        if not self._note_mover(queue, slot, live):
            return 0
        return sum(self._drain(queue, i, republish=True) for q, i in parked & seen)

    def _drain(self, queue: str, index: int, *, republish: bool) -> int:
        return self.sessions.drain(queue, index, self._owner, lambda sent, taken: self._counted(queue, sent, taken),
                                   republish=republish, idle=IDLE if republish else PURGE_IDLE)

    # -- counting, purging, closing ------------------------------------------------------------------
    def _size(self, queue: str) -> int:
        """Published minus taken, summed over every process's totals (:mod:`.mqtt_counts`)."""
        return self.counts.total(queue)

    def _purge(self, queue: str) -> int:
        """Delete the delayed records, what this process buffers and what parked slots hold."""
        delayed = self._read(queue, "delayed")
        purged = len(delayed)
        slot = self._slots.get(queue)
        if slot is not None and slot.client is not None:
            for items in take_until_idle(slot.buffer, slot.taken_over, PURGE_IDLE):
                for mid, *_ in items:
                    slot.client.ack(mid, 1)
                purged += len(items)
        self.control.publish([*deletions(delayed), self._counted(queue, taken=purged)])
        for index, alive in self.sessions.presence(queue).items():
            if not alive and (slot is None or index != slot.index):
                purged += self._drain(queue, index, republish=False)
        return purged

    def _close(self) -> None:
        if self._counts is not None:
            self._counts.close()
        if self._delays is not None:
            self._delays.stop()
        if self._wires is not None:
            self._wires.close()
        for slot in list(self._slots.values()):
            try:
                if not slot.lost:  # what it still runs (usually nothing): the slot's next holder counts those
                    self.control.publish([self.sessions.record("held", slot.queue, slot.index,
                                                               sorted(self._held_by(slot))),
                                          self.sessions.parked(slot.queue, slot.index)])
                if slot.client is not None:
                    close(slot.client)
            except Exception:  # noqa: BLE001 - closing anyway: its will parks the slot
                logger.debug("closing the session of queue %r failed", slot.queue, exc_info=True)
        if self._control is not None:
            try:
                self._control.close()
            except Exception:  # noqa: BLE001 - closing anyway
                logger.debug("closing the MQTT control connection failed", exc_info=True)
        self._after_fork()
