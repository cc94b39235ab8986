"""Prometheus numbers, the exposition side: one collector, a function for the dashboard, a standalone endpoint.

Needs ``prometheus_client`` (the ``prometheus`` extra); imported only when an endpoint is made.

:class:`FunboostCollector` answers each scrape from two sources:

* the snapshot files of this host's processes (``METRICS_DIR``, :mod:`.metrics`), summed: published
  and finished totals, the run time and wait time histograms;
* the operations registry and the brokers (:class:`~funboost_like.ops.service.OpsService`): queue
  depth, live consumers, paused, the qps limit, and the oldest waiting message's age (read from the
  broker's head where it can be read without taking a message, else estimated from what this host's
  consumers finished last; see docs/metrics.md).

Labels are the queue, the broker kind and the outcome: never a task id or an argument.

* :func:`render_metrics` -> ``(body, content_type)``: what a web framework returns at ``/metrics``.
* :func:`serve` starts an HTTP endpoint (``funboost_like metrics --port N`` runs it in the foreground);
  :func:`start_worker_endpoint` is the ``METRICS_PORT`` setting's endpoint inside a consumer's process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from funboost_like.core.calls import OUTCOME_NAMES
from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError
from funboost_like.observability import metrics

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ConfigurationError("Prometheus metrics need prometheus-client: pip install 'funboost_like[prometheus]'") \
        from exc

logger = logging.getLogger("funboost_like.metrics")

PREFIX = "funboost_like"
FRESH_FLUSHES = 5  # a snapshot older than this many flush intervals is from a process that ended


def read_snapshots(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """The snapshots of ``folder`` (default ``METRICS_DIR``) summed per queue.

    Each queue: ``published``, ``finished`` (outcome -> count), ``run`` and ``wait`` (bucket counts,
    +Inf last), ``run_sum``, ``wait_sum``, and ``last_due`` (the latest due time a process still
    running reported; 0.0 if none). Unreadable files are skipped; histograms written with other
    buckets are left out.
    """
    folder = metrics.metrics_dir() if folder is None else folder
    fresh_after = time.time() - FRESH_FLUSHES * max(1.0, float(settings.get("METRICS_FLUSH_SECONDS")))
    totals: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            snapshot = json.loads(path.read_text(encoding="utf-8"))
            queues = snapshot["queues"]
            same_buckets = (tuple(snapshot["run_buckets"]) == metrics.RUN_BUCKETS
                            and tuple(snapshot["wait_buckets"]) == metrics.WAIT_BUCKETS)
            fresh = float(snapshot["written_at"]) >= fresh_after
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.debug("skipping metrics snapshot %s: %s", path, exc)
            continue
        for queue, numbers in queues.items():
            _add(totals.setdefault(queue, _empty()), numbers, same_buckets, fresh)
    return totals


def _empty() -> dict[str, Any]:
    return {"published": 0, "finished": dict.fromkeys(OUTCOME_NAMES, 0), "run": [0] * (len(metrics.RUN_BUCKETS) + 1),
            "run_sum": 0.0, "wait": [0] * (len(metrics.WAIT_BUCKETS) + 1), "wait_sum": 0.0, "last_due": 0.0}


def _add(total: dict[str, Any], numbers: dict[str, Any], same_buckets: bool, fresh: bool) -> None:
    total["published"] += int(numbers.get("published", 0))
    for outcome, n in numbers.get("finished", {}).items():
        if outcome in total["finished"]:
            total["finished"][outcome] += int(n)
    if same_buckets:
        for name in ("run", "wait"):
            total[name] = [a + int(b) for a, b in zip(total[name], numbers[name], strict=True)]
            total[f"{name}_sum"] += float(numbers[f"{name}_sum"])
    if fresh:
        total["last_due"] = max(total["last_due"], float(numbers.get("last_due", 0.0)))


def _histogram(name: str, documentation: str, bounds: Sequence[float], key: str,
               queues: dict[str, dict[str, Any]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["queue"])
    for queue, numbers in sorted(queues.items()):
        cumulative, buckets = 0, []
        for bound, n in zip([*bounds, float("inf")], numbers[key], strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(cumulative)))
        family.add_metric([queue], buckets, numbers[f"{key}_sum"])
    return family


def _queue_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(queues, workers, unread brokers) from the operations registry; empty when it cannot be read."""
    from funboost_like.ops.service import OpsService

    service = OpsService()
    try:
        return service.queues(), service.workers(), list(service.errors)
    except Exception as exc:  # noqa: BLE001 - the totals are still worth serving
        logger.warning("metrics: the operations registry could not be read: %s", exc)
        return [], [], [*service.errors, str(exc)]


class FunboostCollector(Collector):
    """Every number of the module docstring, computed at each scrape."""

    def __init__(self, folder: Path | None = None,
                 read_queues: Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]] = _queue_rows,
                 ) -> None:
        self.folder = folder
        self.read_queues = read_queues

    def collect(self) -> Iterator[Any]:
        metrics.write_now()  # this process's own numbers, if it records any
        totals = read_snapshots(self.folder)
        published = CounterMetricFamily(f"{PREFIX}_published", "Messages published, by queue.", labels=["queue"])
        finished = CounterMetricFamily(f"{PREFIX}_finished", "Messages finished, by queue and outcome.",
                                       labels=["queue", "outcome"])
        for queue, numbers in sorted(totals.items()):
            published.add_metric([queue], numbers["published"])
            for outcome in OUTCOME_NAMES:
                finished.add_metric([queue, outcome], numbers["finished"][outcome])
        yield published
        yield finished
        yield _histogram(f"{PREFIX}_run_seconds", "Run time of the calls (in-place retries included).",
                         metrics.RUN_BUCKETS, "run", totals)
        yield _histogram(f"{PREFIX}_wait_seconds", "Time from when a message was due to the start of its call.",
                         metrics.WAIT_BUCKETS, "wait", totals)
        yield from self._queue_gauges(totals)

    def _queue_gauges(self, totals: dict[str, dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
        rows, workers, errors = self.read_queues()
        labels = ["queue", "broker"]
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Messages waiting in the queue.", labels=labels)
        age = GaugeMetricFamily(f"{PREFIX}_queue_oldest_message_age_seconds",
                                "Age of the ready message that has waited longest (read from the broker; estimated "
                                "from this host's consumers where the broker cannot read a queue's head).",
                                labels=labels)
        paused = GaugeMetricFamily(f"{PREFIX}_queue_paused", "1 while the queue is paused.", labels=labels)
        qps = GaugeMetricFamily(f"{PREFIX}_queue_qps_limit", "Calls per second the consumers allow (0: no limit).",
                                labels=labels)
        consumers = GaugeMetricFamily(f"{PREFIX}_queue_consumers", "Live consumers of the queue.", labels=labels)
        now = time.time()
        for row in rows:
            key = [str(row["queue"]), str(row["broker"])]
            if row.get("depth") is not None:
                depth.add_metric(key, float(row["depth"]))
                last_due = totals.get(key[0], {}).get("last_due", 0.0)
                if row.get("oldest_waiting_seconds") is not None:  # read from the broker
                    age.add_metric(key, float(row["oldest_waiting_seconds"]))
                elif row["depth"] == 0:
                    age.add_metric(key, 0.0)
                elif last_due > 0:  # the broker cannot read its head: estimated from this host's consumers
                    age.add_metric(key, max(0.0, now - last_due))
            paused.add_metric(key, 1.0 if row.get("paused") else 0.0)
            limit = _qps_limit(row, workers)
            if limit is not None:
                qps.add_metric(key, limit)
            consumers.add_metric(key, float(row.get("consumers", 0)))
        unread = GaugeMetricFamily(f"{PREFIX}_brokers_unreadable", "Brokers whose registry could not be read "
                                   "at this scrape (their queues are missing above).")
        unread.add_metric([], float(len(errors)))
        yield from (depth, age, paused, qps, consumers, unread)


def _qps_limit(row: dict[str, Any], workers: list[dict[str, Any]]) -> float | None:
    """What the live consumers apply; without any, the control record's qps (None: unknown)."""
    applied = [float(w.get("qps") or 0.0) for w in workers
               if w.get("queue") == row["queue"] and w.get("broker") == row["broker"] and not w.get("stale")]
    if applied:
        return max(applied)
    control = row.get("qps")
    return float(control) if isinstance(control, (int, float)) and not isinstance(control, bool) else None


def make_registry(folder: Path | None = None) -> CollectorRegistry:
    """A registry holding only :class:`FunboostCollector` (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FunboostCollector(folder))
    return registry


_registry: CollectorRegistry | None = None


def render_metrics() -> tuple[bytes, str]:
    """``(body, content_type)`` of a Prometheus scrape: what the web dashboard serves at ``/metrics``."""
    global _registry
    if _registry is None:
        _registry = make_registry()
    return generate_latest(_registry), CONTENT_TYPE_LATEST


def serve(port: int, host: str = "127.0.0.1") -> Any:
    """Serve every path with the scrape on ``host:port`` from a daemon thread; return the server.

    ``host`` defaults to the loopback address: give another one (``0.0.0.0``) for a Prometheus on
    another machine; the numbers carry no task id or argument, only queue names.
    """
    server, _thread = start_http_server(port, addr=host, registry=make_registry())
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the metrics endpoint listens on %s:%d, reachable from other machines", host, port)
    return server


_worker_endpoint_lock = threading.Lock()
_worker_endpoint: list[Any] = []


def start_worker_endpoint() -> None:
    """The ``METRICS_PORT`` endpoint of this process (started once; if another process of the host
    already serves that port, it serves this process's numbers too, and this one only logs so)."""
    with _worker_endpoint_lock:
        if _worker_endpoint:
            return
        port, host = int(settings.get("METRICS_PORT")), str(settings.get("METRICS_HOST"))
        try:
            _worker_endpoint.append(serve(port, host))
        except OSError as exc:
            _worker_endpoint.append(None)
            logger.info("metrics endpoint %s:%d not started here (%s); the process serving it reads this "
                        "process's numbers too", host, port, exc)
            return
        logger.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)


def stop_worker_endpoint() -> None:
    """Stop this process's ``METRICS_PORT`` endpoint, if it runs (the next consumer may start it again)."""
    with _worker_endpoint_lock:
        for server in _worker_endpoint:
            if server is not None:
                server.shutdown()
                server.server_close()
        _worker_endpoint.clear()
