"""Delayed messages of the MQTT broker (MQTT has none): retained records, moved by a consumer when due.

A delayed message (``publish(not_before=...)``, ``nack(delay=...)``, a retry with backoff) is the
retained message of the topic ``funboost_like/delayed/<q>/<id>``: its body, with the MQTT 5 user
properties ``fl-due`` (UNIX seconds), ``fl-attempts`` and ``fl-crashes``. The server keeps it like
any retained message (on disk, with Mosquitto's persistence on). Every process consuming ``q``
watches those topics; the one holding the queue's lowest live slot (the *mover*) publishes each
message to the queue's topic when it is due, with its counts, then deletes its record.

So delayed messages move only while some process consumes the queue; a due message comes out within
milliseconds of its time while one does; and a mover killed between the two steps leaves the record,
which is moved again (at-least-once: that message may run twice).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes

from funboost_like.brokers.mqtt_client import Control, properties, topic_part, user_properties

logger = logging.getLogger("funboost_like.mqtt")

DUE, ATTEMPTS, CRASHES = "fl-due", "fl-attempts", "fl-crashes"
RECHECK = 1.0  # seconds before a process that is not the mover looks at a due message again
# (due, sequence, queue, record topic, body, attempts before, crashes)
Entry = tuple[float, int, str, str, bytes, int, int]


def delayed_prefix(queue: str) -> str:
    return f"funboost_like/delayed/{topic_part(queue)}/"


def delayed_record(queue: str, body: bytes, due: float, attempts: int, crashes: int) -> tuple[str, bytes, bool, Any]:
    """The retained publish that keeps ``body`` until ``due``."""
    props = properties(PacketTypes.PUBLISH, UserProperty=[(DUE, repr(due)), (ATTEMPTS, str(attempts)),
                                                          (CRASHES, str(crashes))])
    return delayed_prefix(queue) + uuid.uuid4().hex, bytes(body), True, props


class DelayedMessages:
    """This process's view of the delayed records of the queues it consumes, and the thread moving them.

    ``move(queue, entries)`` publishes the due ``entries`` to the queue and deletes their records;
    ``is_mover(queue)`` says whether this process moves the queue's messages now.
    """

    def __init__(self, control: Control, move: Callable[[str, list[Entry]], None],
                 is_mover: Callable[[str], bool]) -> None:
        self._control, self._move, self._is_mover = control, move, is_mover
        self._heap: list[Entry] = []
        self._pending: set[str] = set()  # record topics in the heap
        self._cond = threading.Condition()
        self._numbers = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, queue: str) -> None:
        """Start following the delayed records of ``queue`` (its retained ones arrive first)."""
        self._control.watch(delayed_prefix(queue) + "+", lambda message: self._arrived(queue, message))
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="funboost_like-mqtt-delays", daemon=True)
                self._thread.start()

    def _arrived(self, queue: str, message: paho.MQTTMessage) -> None:
        topic = message.topic
        with self._cond:
            if not message.payload:  # deleted: moved by someone, or purged
                self._pending.discard(topic)
            elif topic not in self._pending:
                props = user_properties(message)
                self._pending.add(topic)
                heapq.heappush(self._heap, (float(props.get(DUE, 0)), next(self._numbers), queue, topic,
                                            bytes(message.payload), int(props.get(ATTEMPTS, 0)),
                                            int(props.get(CRASHES, 0))))
            self._cond.notify()

    def _due(self) -> list[Entry]:
        """Wait until the earliest record is due (or stopped); pop the due ones still pending."""
        with self._cond:
            while not self._stopped:
                heap = self._heap
                wait = heap[0][0] - time.time() if heap else None
                if wait is not None and wait <= 0:
                    break
                self._cond.wait(wait)
            due: list[Entry] = []
            now = time.time()
            while self._heap and self._heap[0][0] <= now and len(due) < 1000:
                entry = heapq.heappop(self._heap)
                if entry[3] in self._pending:
                    due.append(entry)
            return due

    def _run(self) -> None:
        while not self._stopped:
            due = self._due()
            by_queue: dict[str, list[Entry]] = {}
            for entry in due:
                by_queue.setdefault(entry[2], []).append(entry)
            for queue, entries in by_queue.items():
                try:
                    if self._is_mover(queue):
                        self._move(queue, entries)
                        continue
                except Exception:  # noqa: BLE001 - tried again soon
                    logger.warning("moving %d due message(s) of queue %r failed; retrying", len(entries), queue,
                                   exc_info=True)
                with self._cond:  # another process moves them (its deletions come here); look again later
                    for entry in entries:
                        heapq.heappush(self._heap, (time.time() + RECHECK, *entry[1:]))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
