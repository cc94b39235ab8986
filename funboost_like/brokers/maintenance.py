"""The maintenance threads: lease renewals, heartbeats and sweeps, one thread per maintained broker.

A broker whose class defines ``_renew`` or ``_recover`` is added here at its first fetch (see
:class:`~funboost_like.brokers.base.Broker`); its thread calls its ``maintain()`` at once and then every
``maintenance_interval()`` seconds, until the broker is closed or garbage-collected. A failing round is
logged and tried again at the next interval. A forked child starts with no threads and no brokers.

A thread per broker, not one per process: a server that stops answering without closing the
connection (a network partition) blocks a round until the client's socket timeout, and no other
broker's leases may wait for it meanwhile, or their messages would be taken for a dead consumer's and
run again. A process normally holds one broker, so it normally has one maintenance thread.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

from funboost_like.core.outage import Outage

if TYPE_CHECKING:
    from funboost_like.brokers.base import Broker as Maintained

logger = logging.getLogger("funboost_like.broker")


class _Rounds:
    """One broker's thread's controls: ``poke`` starts a round now (a queue fetched for the first time
    is swept at once), ``stopped`` ends the thread after the round running now."""

    __slots__ = ("poke", "stopped", "thread")

    def __init__(self) -> None:
        self.poke = threading.Event()
        self.stopped = False
        self.thread: threading.Thread | None = None


class Maintenance:
    """Runs ``maintain()`` of each added broker every ``maintenance_interval()`` seconds, on a thread of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rounds: weakref.WeakKeyDictionary[Maintained, _Rounds] = weakref.WeakKeyDictionary()

    def add(self, broker: Maintained) -> None:
        """Maintain ``broker`` from now on, with a round at once (sweep what died before we came)."""
        with self._lock:
            rounds = self._rounds.get(broker)
            if rounds is None:
                rounds = self._rounds[broker] = _Rounds()
            if rounds.thread is not None and rounds.thread.is_alive():
                rounds.poke.set()
                return
            rounds.thread = threading.Thread(target=_run, args=(weakref.ref(broker), rounds), daemon=True,
                                             name=f"funboost_like-maintenance-{type(broker).__name__}")
            rounds.thread.start()  # under the lock: a second add meanwhile sees it alive

    def discard(self, broker: Maintained) -> None:
        """Stop ``broker``'s rounds (a round running now ends first)."""
        with self._lock:
            rounds = self._rounds.pop(broker, None)
        if rounds is not None:
            rounds.stopped = True
            rounds.poke.set()

    def reset_in_child(self) -> None:
        """In a forked child: the parent's threads do not exist here, nor do its brokers' rounds."""
        self._lock = threading.Lock()
        self._rounds = weakref.WeakKeyDictionary()


def _run(ref: weakref.ref[Maintained], rounds: _Rounds) -> None:
    """Rounds until stopped; no strong reference to the broker is kept between them, so a forgotten
    broker is collected and its thread ends."""
    outage: Outage | None = None
    while True:
        rounds.poke.clear()  # before the round: a poke from now on ends the wait below
        broker = ref()
        if broker is None or rounds.stopped:
            return
        interval = broker.maintenance_interval()
        try:
            broker.maintain()
        except Exception as exc:
            outage = outage or Outage(logger, "maintenance (leases, heartbeats, sweeps)", traceback=True)
            outage.failed(exc, interval)
        else:
            if outage is not None:
                outage.ended()
        del broker
        rounds.poke.wait(interval)


maintenance = Maintenance()
