"""How many messages wait in an MQTT queue: MQTT cannot say, so every process keeps its own totals.

Each process writes, for each queue it used, the retained record ``funboost_like/counts/<q>/<process>``
= ``[published, taken]``: messages it published to the queue (delayed ones and copies included) and
messages it took from it (handed to its consumer, copied, drained or purged). The queue's count is the
sum over the records, this process's own totals taken fresh. A record is written with the operation
that changes it (a fetch, a copy, a purge), or at most :data:`DELAY` seconds after a publish, so a push
stays one round trip: a process killed within that moment leaves the count that much low; one that
exits normally writes them at exit (a script that pushes and ends, the usual publisher). A record
stays after its process ended (one small retained message per process and queue).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import uuid
from collections import Counter
from typing import Any

from funboost_like.brokers.mqtt_client import Control, topic_part

logger = logging.getLogger("funboost_like.mqtt")

DELAY = 0.1  # a publishing process writes its totals at most this long after a publish


class Counts:
    """This process's totals per queue, and the sum of every process's."""

    def __init__(self, control: Control) -> None:
        self._control = control
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._sent: Counter[str] = Counter()
        self._taken: Counter[str] = Counter()
        self._unwritten: set[str] = set()
        self._at_exit = False  # write() registered to run at interpreter exit
        self._timer: threading.Timer | None = None
        self._failing = False  # the last write failed (logged once)

    def record(self, queue: str, sent: int = 0, taken: int = 0) -> tuple[str, bytes, bool, Any]:
        """Count messages that joined (``sent``) or left (``taken``) the waiting ones of ``queue``; return the
        retained record of this process's totals, to publish with the operation."""
        with self._lock:
            self._sent[queue] += sent
            self._taken[queue] += taken
            totals = [self._sent[queue], self._taken[queue]]
        return f"funboost_like/counts/{topic_part(queue)}/{self._owner}", json.dumps(totals).encode(), True, None

    def published(self, queue: str, sent: int) -> None:
        """Count published messages; their record is written within :data:`DELAY` seconds."""
        with self._lock:
            self._sent[queue] += sent
            self._unwritten.add(queue)
            if not self._at_exit:  # a script that pushes and ends: its daemon timer dies unwritten
                self._at_exit = True
                atexit.register(self.write)
            if self._timer is None:
                self._timer = threading.Timer(DELAY, self.write)
                self._timer.daemon = True
                self._timer.start()

    def write(self) -> None:
        """Write the records of the totals that changed since (at a timer, and when the broker closes)."""
        with self._lock:
            queues, self._unwritten, self._timer = self._unwritten, set(), None
        try:
            if queues:
                self._control.publish([self.record(queue) for queue in queues])
        except Exception as exc:  # noqa: BLE001 - written with the next operation on those queues
            if not self._failing:  # once per outage: every publish meanwhile tries again
                logger.warning("writing the message counts of %s failed (%s); trying again with the next "
                               "publish", sorted(queues), exc)
            self._failing = True
            with self._lock:
                self._unwritten |= queues
        else:
            self._failing = False

    def total(self, queue: str) -> int:
        """Published minus taken, summed over every process's record (this one's fresh), at least 0."""
        own = self.record(queue)[0]
        with self._lock:
            total = self._sent[queue] - self._taken[queue]
        for message in self._control.snapshot(f"funboost_like/counts/{topic_part(queue)}/+"):
            if message.topic != own:
                sent, taken = json.loads(message.payload)
                total += sent - taken
        return max(0, total)

    def close(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self.write()
