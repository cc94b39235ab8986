"""The one maintenance thread per process: lease renewals, heartbeats and sweeps of every broker.

A broker whose class defines ``_renew`` or ``_recover`` is added here at its first fetch (see
:class:`~funboost_like.brokers.base.Broker`); the thread calls its ``maintain()`` at once and then every
``maintenance_interval()`` seconds, until the broker is closed or garbage-collected. A failing round is
logged and tried again at the next interval. A forked child starts with no thread and no brokers.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Protocol

logger = logging.getLogger("funboost_like.broker")

_LONGEST_SLEEP = 60.0


class Maintained(Protocol):
    def maintain(self) -> None: ...
    def maintenance_interval(self) -> float: ...
    def _where(self) -> str: ...


class Maintenance:
    """Runs ``maintain()`` of each added broker every ``maintenance_interval()`` seconds, on one thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._due: weakref.WeakKeyDictionary[Maintained, float] = weakref.WeakKeyDictionary()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, broker: Maintained) -> None:
        with self._lock:
            self._due[broker] = time.monotonic()  # a first round at once: sweep what died before we came
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="funboost_like-broker-maintenance",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def discard(self, broker: Maintained) -> None:
        with self._lock:
            self._due.pop(broker, None)

    def _run(self) -> None:
        while True:
            self._wake.clear()  # before reading the brokers: an add from now on ends the sleep below
            with self._lock:
                brokers = list(self._due.items())
            next_round = time.monotonic() + _LONGEST_SLEEP
            for broker, due in brokers:
                if due <= time.monotonic():
                    try:
                        broker.maintain()
                    except Exception:
                        logger.warning("maintenance of %s failed; retrying", broker._where(), exc_info=True)
                    due = time.monotonic() + broker.maintenance_interval()
                    with self._lock:
                        if broker in self._due:  # not discarded meanwhile
                            self._due[broker] = due
                next_round = min(next_round, due)
            self._wake.wait(max(0.0, next_round - time.monotonic()))

    def reset_in_child(self) -> None:
        """In a forked child: the parent's thread does not exist here, nor do its brokers' rounds."""
        self._lock = threading.Lock()
        self._due = weakref.WeakKeyDictionary()
        self._wake = threading.Event()
        self._thread = None


maintenance = Maintenance()
