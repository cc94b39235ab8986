"""Prometheus numbers, the recording side: what each process counts, and the snapshot files that carry them.

Nothing here imports ``prometheus_client`` (only the endpoint needs it, :mod:`.prometheus`), and
nothing runs unless the ``METRICS`` setting is on when a publisher or consumer is created.

**What a process counts, per queue** (:class:`QueueNumbers`):

* ``published``: messages its publishers sent (one locked addition per publish call, or per batch);
* finished messages by outcome: read from the consumers' own counters (``consumer.stats``), which the
  fetcher keeps anyway, so this costs the consume path nothing;
* run time and wait time histograms: the middleware's ``after_call`` (one per message) appends the
  two times to two lists, and a daemon thread sorts them into the buckets every ``DRAIN_SECONDS``
  (in C, a bisection per bucket bound: cheaper than a Python step per message). Run time is the
  call's duration, all in-place retries together (calls that did not run, e.g. skipped ones, are
  not in it); wait time is from the moment
  the message was due (its ``run_at``, else its ``publish_time``) to the start of the call, for
  messages that carry one (a body written without ``extra`` has none);
* when the message its consumers finished last was due, from which the endpoint estimates the age
  of the oldest waiting message (docs/metrics.md says how far that goes).

**How the numbers leave the process (multi-process safety).** A daemon thread writes the process's
numbers every ``METRICS_FLUSH_SECONDS`` (and at exit) to its own file in ``METRICS_DIR``,
``<host>-<pid>-<start>.json``, replaced atomically. An endpoint sums the files of the folder: a
counter of a process that ended keeps counting in the total, like prometheus-client's multiprocess
mode. No file is ever written by two processes, so nothing needs a lock across processes.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from funboost_like.core.calls import OUTCOME_NAMES, Call, Middleware
from funboost_like.core.config import data_dir_setting, settings

if TYPE_CHECKING:
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.publisher import Publisher

logger = logging.getLogger("funboost_like.metrics")

# Upper bounds (seconds) of the histogram buckets; Prometheus' "le" (inclusive), +Inf implied.
RUN_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)
SNAPSHOT_VERSION = 1
HOST = socket.gethostname()

_time = time.time


def enabled() -> bool:
    return bool(settings.get("METRICS"))


def metrics_dir() -> Path:
    """The folder of this host's snapshots (``METRICS_DIR``)."""
    return data_dir_setting("METRICS_DIR", "metrics")


DRAIN_SECONDS = 0.25  # how often the pending observations are added into the histograms


# ``time.time() - time.perf_counter()``: turns a call's ``run_started`` into wall time with one addition.
# Refreshed at every drain, since the two clocks drift apart slowly (e.g. under NTP).
_clock_offset = time.time() - time.perf_counter()


def _refresh_clock() -> None:
    global _clock_offset
    _clock_offset = time.time() - time.perf_counter()


class Histogram:
    """Counts per bucket (the last one +Inf's) and the sum of the observed values."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def add(self, values: list[float], ordered: bool = False) -> None:
        """Observe ``values`` (none negative; may reorder the list; ``ordered``: they are sorted). In C, not
        one Python step per value: when the largest falls in the first bucket (the usual case for run
        times) they all do; else they are sorted (a list of floats sorts with the fast float comparison)
        and each bound is bisected once."""
        bounds, counts = self.bounds, self.counts
        if (values[-1] if ordered else max(values)) <= bounds[0]:
            counts[0] += len(values)
        else:
            if not ordered:
                values.sort()
            below = 0
            for index, bound in enumerate(bounds):
                upto = bisect_right(values, bound)  # the values <= bound: Prometheus' "le"
                counts[index] += upto - below
                below = upto
            counts[-1] += len(values) - below
        self.total += sum(values)


class QueueNumbers:
    """One queue's numbers in this process.

    Recording a finished call appends its run time to ``runs`` and its wait time to ``waits``
    (``list.append`` is atomic, so no lock); :meth:`drain` (the snapshot thread, every
    ``DRAIN_SECONDS``, and every snapshot) sorts what is pending and adds it into the histograms in
    bulk. The two lists are independent: nothing needs to pair their entries. ``last_due``, when
    the message finished last was due, is estimated at the drain from its wait time (late by up to
    ``DRAIN_SECONDS`` plus its run time).
    """

    __slots__ = ("queue", "lock", "published", "runs", "waits", "run", "wait", "last_due", "consumers",
                 "finished_before")

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.lock = threading.Lock()  # guards published and the histograms
        self.consumers: list[Consumer] = []
        self.finished_before = [0] * len(OUTCOME_NAMES)  # counts a forked child inherited (subtracted)
        self.runs: list[float] = []  # pending run times
        self.waits: list[float] = []  # pending wait times
        self.reset()

    def reset(self) -> None:
        self.published = 0
        self.run = Histogram(RUN_BUCKETS)
        self.wait = Histogram(WAIT_BUCKETS)
        self.last_due: float = 0.0

    def reset_in_child(self) -> None:
        """After a fork: a new lock, and every number at zero."""
        self.lock = threading.Lock()
        del self.runs[:], self.waits[:]
        self.reset()
        self.finished_before = [0] * len(OUTCOME_NAMES)
        self.finished_before = self.finished()

    def add_published(self, n: int) -> None:
        with self.lock:
            self.published += n

    def finished(self) -> list[int]:
        totals = [-n for n in self.finished_before]
        for consumer in list(self.consumers):
            for index, n in enumerate(consumer.stats.counts):
                totals[index] += n
        return totals

    def drain(self) -> None:
        """Add the pending observations into the histograms; note when the last one finished was due."""
        with self.lock:
            n = len(self.runs)
            if n:
                runs = self.runs[:n]
                del self.runs[:n]  # observations appended meanwhile stay, after the first n
                self.run.add(runs)
            n = len(self.waits)
            if n:
                waits = self.waits[:n]
                del self.waits[:n]
                # The last one was appended at most DRAIN_SECONDS ago (or one snapshot).
                self.last_due = max(self.last_due, _time() - max(waits[-1], 0.0))
                waits.sort()
                if waits[0] < 0.0:  # the clocks of two hosts disagree: count as 0
                    negative = bisect_left(waits, 0.0)
                    waits[:negative] = [0.0] * negative
                self.wait.add(waits, ordered=True)

    def snapshot(self) -> dict[str, Any]:
        self.drain()
        with self.lock:
            return {"published": self.published, "run": list(self.run.counts), "run_sum": self.run.total,
                    "wait": list(self.wait.counts), "wait_sum": self.wait.total, "last_due": self.last_due,
                    "finished": dict(zip(OUTCOME_NAMES, self.finished(), strict=True))}


class MetricsMiddleware(Middleware):
    """A consumer's recorder: an append or two per finished call (the histograms are updated in bulk)."""

    def __init__(self, consumer: Consumer) -> None:
        numbers = self.numbers = numbers_for(consumer.queue_name)
        # The hook the consumer calls is a closure over the two appends, set on the instance: it costs a
        # message fewer lookups than a method reading them from ``self``.
        self.after_call = _recorder(numbers.runs.append, numbers.waits.append)  # type: ignore[method-assign, assignment]
        with numbers.lock:
            if consumer not in numbers.consumers:
                numbers.consumers.append(consumer)

    def after_call(self, call: Call) -> None:
        """Replaced per instance by :func:`_recorder`'s closure (declared here so the consumer calls it)."""


def _recorder(record_run: Callable[[float], None], record_wait: Callable[[float], None]) -> Callable[[Call], None]:
    def after_call(call: Call) -> None:
        extra = call.message.extra
        try:  # a body written without extra, or with a time that is not a number: no wait time
            if call.attempts:  # it ran: waited until its first run began (a perf_counter time, made wall time)
                record_run(call.duration)
                record_wait(call.run_started + _clock_offset
                            - (extra["run_at"] if "run_at" in extra else extra["publish_time"]))
            else:  # skipped before it ran: waited until now
                record_wait(_time() - (extra["run_at"] if "run_at" in extra else extra["publish_time"]))
        except (KeyError, TypeError, OverflowError):
            pass

    return after_call


class SnapshotWriter:
    """The process's snapshot file and the daemon thread that rewrites it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failing = False
        self.name: str | None = None  # this process's file name in METRICS_DIR
        self._at_exit = False

    def ensure_started(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            if self.name is None:
                self.name = f"{HOST}-{os.getpid()}-{time.time_ns():x}.json"
            self._thread = threading.Thread(target=self._run, name="funboost_like-metrics", daemon=True)
            self._thread.start()
            if not self._at_exit:
                self._at_exit = True
                atexit.register(self.write)

    def _run(self) -> None:
        next_write = time.monotonic()
        while True:
            time.sleep(DRAIN_SECONDS)
            _refresh_clock()
            for numbers in list(_queues.values()):
                numbers.drain()
            if time.monotonic() >= next_write:
                next_write = time.monotonic() + float(settings.get("METRICS_FLUSH_SECONDS"))
                self.write()

    def write(self) -> None:
        """Write this process's numbers now, while ``METRICS`` is on (atomically; a failure is logged once
        per outage). The folder is read from the settings each time."""
        if self.name is None or not enabled():
            return
        path = metrics_dir() / self.name
        data = {"version": SNAPSHOT_VERSION, "host": HOST, "pid": os.getpid(), "written_at": time.time(),
                "run_buckets": RUN_BUCKETS, "wait_buckets": WAIT_BUCKETS,
                "queues": {queue: numbers.snapshot() for queue, numbers in list(_queues.items())}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
            temporary.write_text(json.dumps(data), encoding="utf-8")
            os.replace(temporary, path)
        except OSError as exc:
            if not self._failing:
                logger.warning("could not write the metrics snapshot %s: %s", path, exc)
            self._failing = True
            return
        self._failing = False

    def reset_in_child(self) -> None:
        self._lock = threading.Lock()
        self._thread = None
        self.name = None


_queues: dict[str, QueueNumbers] = {}
_queues_lock = threading.Lock()
writer = SnapshotWriter()


def numbers_for(queue: str) -> QueueNumbers:
    """This process's numbers of ``queue`` (created on first use; starts the snapshot writer)."""
    numbers = _queues.get(queue)
    if numbers is None:
        with _queues_lock:
            numbers = _queues.setdefault(queue, QueueNumbers(queue))
    writer.ensure_started()
    return numbers


def _reset_in_child() -> None:
    """A forked child counts from zero in a file of its own (its parent's numbers stay the parent's).

    No thread is started here: the child's snapshot thread starts with its first publisher or
    consumer (a forked consumer process creates its consumer anew, see ``booster._consume_in_child``).
    """
    global _queues_lock
    _queues_lock = threading.Lock()
    for numbers in _queues.values():
        numbers.reset_in_child()
    writer.reset_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


def build(consumer: Consumer) -> MetricsMiddleware | None:
    """The feature table's entry: a recorder for every consumer while ``METRICS`` is on."""
    if not enabled():
        return None
    middleware = MetricsMiddleware(consumer)
    if int(settings.get("METRICS_PORT")) > 0:
        from funboost_like.observability.prometheus import start_worker_endpoint

        start_worker_endpoint()
    return middleware


def publish_counter(publisher: Publisher) -> QueueNumbers | None:
    """The numbers a publisher adds its publishes to, or None while ``METRICS`` is off."""
    return numbers_for(publisher.queue_name) if enabled() else None


def write_now() -> None:
    """Write this process's snapshot now, if it records anything (an endpoint does so before reading)."""
    if _queues:
        writer.write()
