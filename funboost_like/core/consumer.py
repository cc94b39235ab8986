"""The consume loop.

One fetcher thread per consumer takes batches of at most the free capacity from the broker (so the
prefetch is bounded and memory does not grow with the backlog), waits on the rate limiter, and
hands each message to the pool. A worker decodes the message, runs the middleware hooks, calls the
function with in-place retries, and reports the outcome through a deque. The fetcher settles every
outcome with the broker (ack in batches, requeue, dead letter): workers never touch the broker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from funboost_like.brokers import registry
from funboost_like.brokers.base import Broker, Delivery
from funboost_like.brokers.registry import get_broker
from funboost_like.concurrency import greenlets
from funboost_like.concurrency.asyncio_loop import AsyncLoopPool
from funboost_like.concurrency.base import Pool
from funboost_like.concurrency.shared import share
from funboost_like.concurrency.threads import ThreadPool
from funboost_like.concurrency.timeouts import TimedRun, watchdog
from funboost_like.core import runtime
from funboost_like.core.calls import (
    DEAD_LETTERED,
    FAILED,
    OUTCOME_NAMES,
    RELEASED,
    REQUEUED,
    SKIPPED,
    SUCCEEDED,
    Call,
    Middleware,
)
from funboost_like.core.config import settings
from funboost_like.core.distributed_ratelimit import DistributedRateLimiter
from funboost_like.core.enums import ConcurrentModeEnum
from funboost_like.core.errors import (
    ConfigurationError,
    DecodeError,
    ExceptionForRequeue,
    ExceptionForRetry,
    FunctionTimeoutError,
)
from funboost_like.core.inline import HAND_OVER_AFTER_SECONDS, InlineRunner
from funboost_like.core.log import ensure_console_handler, get_logger
from funboost_like.core.message import DecodedMessage, FunctionSignature, decode
from funboost_like.core.outage import Outage, retry_delay
from funboost_like.core.params import ConsumerParams
from funboost_like.core.publisher import Publisher
from funboost_like.core.ratelimit import RateLimiter
from funboost_like.middleware.base import build_middlewares, overriding

# What a worker reports: (outcome code, delivery, dead-letter reason, exception).
# The number is the runs of a failed call (its dead letter records them), the delay of a requeue.
Outcome = tuple[int, Delivery, str, "BaseException | None", float]

# The fetcher's pace: (qps, rate limiter, batch size, inline runner).
_Pace = tuple[float, "RateLimiter | DistributedRateLimiter | None", int, "InlineRunner | None"]

_BUSY_FETCH_TIMEOUT = 0.02  # while calls run, come back soon to flush their acks
_WINDOW = 60  # seconds of history behind the rate and the time-left estimate
_THREAD_MODES = (ConcurrentModeEnum.THREADING, ConcurrentModeEnum.SINGLE_THREAD)  # calls run on threads
_TICK = 0.25  # seconds between two looks of the fetcher at its periodic work (stats line, a new qps)
_ABANDON_GRACE = 0.2  # seconds a timed-out call gets to unwind before its thread is abandoned


def backoff_delay(params: ConsumerParams, runs: int) -> float:
    """Seconds before the retry that follows run ``runs``: exponential from ``retry_backoff``, capped at
    ``retry_backoff_max``, with "equal jitter" (between half and all of it) when ``retry_jitter``."""
    delay = min(float(params.retry_backoff_max), float(params.retry_backoff) * 2.0 ** (runs - 1))
    return delay * (0.5 + random.random() / 2) if params.retry_jitter else delay


class _Abandoned(BaseException):
    """Internal: this run was abandoned after a timeout; its continuation settles the message."""


def _fetch_size(broker: Broker, free: int, batch: int, capacity: int, inline: InlineRunner | None) -> int:
    """At most the free capacity (and the paced batch); more, up to the broker's ``inline_batch``, while
    fast calls run on the fetcher (the inline runner) and none is running: the calls still run one by
    one, and a broker whose every fetch is a transaction takes fewer of them."""
    size = min(free, batch)
    if inline is not None and inline.ready and free == capacity:
        size = max(size, broker.inline_batch)
    return size


class ConsumerStats:
    """Outcome counters and the finished-per-second history of the last minute.

    Written by the fetcher thread only (so no locks); read from anywhere.
    """

    def __init__(self) -> None:
        self.counts = [0] * len(OUTCOME_NAMES)
        self.started_at = time.monotonic()
        self._seconds: deque[list[float]] = deque()  # [second, finished in that second]

    def record(self, finished: int) -> None:
        second = float(int(time.monotonic()))
        seconds = self._seconds
        if seconds and seconds[-1][0] == second:
            seconds[-1][1] += finished
        else:
            seconds.append([second, float(finished)])
            while seconds and seconds[0][0] <= second - _WINDOW:
                seconds.popleft()

    def rate(self) -> float:
        """Messages finished per second over the last minute (or since start, if shorter)."""
        now = time.monotonic()
        span = min(float(_WINDOW), now - self.started_at)
        if span <= 0:
            return 0.0
        done = sum(n for second, n in list(self._seconds) if second > now - _WINDOW)
        return done / max(span, 1.0)

    def as_dict(self) -> dict[str, Any]:
        stats: dict[str, Any] = dict(zip(OUTCOME_NAMES, self.counts, strict=True))
        stats["rate_per_second_last_minute"] = round(self.rate(), 3)
        return stats

    def __repr__(self) -> str:  # the counts of the "stopped consuming queue" line
        return f"{type(self).__name__}({self.as_dict()})"


class Consumer:
    def __init__(self, params: ConsumerParams, signature: FunctionSignature | None = None) -> None:
        if params.consuming_function is None:
            raise ValueError("a consumer needs a consuming_function")
        self.params = params
        self.queue_name = params.queue_name
        self.function: Callable[..., Any] = params.consuming_function
        self.signature = signature or FunctionSignature(self.function, params.is_consuming_function_use_multi_params)
        self.logger = get_logger(params.queue_name, params.log_level, params.logger_prefix)
        self.publisher_of_same_queue = Publisher(params, self.signature)
        self.stats = ConsumerStats()
        self._completed: deque[Outcome] = deque()
        self._stop = threading.Event()
        self._capacity_freed = threading.Event()
        self._fetcher_waiting = False
        self._thread: threading.Thread | None = None
        self._pool: Pool | None = None
        self._bound = False  # the queue is bound to its exchange (broker_exclusive_config), or has none
        self._inline: InlineRunner | None = None
        self._handover_counts = (0, 0)  # the fetcher's (started, finished) when it last ran calls itself
        self._retired: list[threading.Thread] = []  # fetchers that handed over, stuck in a long call
        self._broker: Broker | None = None
        self._broker_generation = -1
        self._lock = threading.Lock()
        self.middlewares: list[Middleware] = build_middlewares(self)
        self._gates = overriding(self.middlewares, "pause_for")
        self._before = overriding(self.middlewares, "before_call")
        # Bound methods, looked up once: a hook costs one call per message, no attribute lookup.
        self._on_start: list[Callable[[Call], None]] = [m.on_start for m in overriding(self.middlewares, "on_start")]
        self._after: list[Callable[[Call], None]] = [m.after_call for m in overriding(self.middlewares, "after_call")]
        self._qps_target = float(params.qps)  # set_qps(); the fetcher applies it on its tick
        self.qps_in_effect = float(params.qps)
        self._fetch_outage = Outage(self.logger, f"fetching from queue {self.queue_name!r}", logging.ERROR,
                                     traceback=True)

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def broker(self) -> Broker:
        if self._broker is None or self._broker_generation != registry.generation:
            self._broker = get_broker(self.params.broker_kind)
            self._broker_generation = registry.generation
        return self._broker

    def start_consuming_message(self, *, wait: bool | None = None) -> None:
        """Start consuming in the background and return at once (idempotent).

        The fetcher thread is not a daemon: the process keeps consuming after the main thread ends,
        until SIGINT/SIGTERM or :meth:`stop`. With ``schedule_tasks_on_main_thread=True`` (or
        ``wait=True``) the call instead blocks the calling thread until the consumer has stopped, so
        that thread can start no other consumer (the seed's meaning of the parameter).
        """
        if wait is None:
            wait = bool(self.params.schedule_tasks_on_main_thread)
        if wait:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                raise ConfigurationError(f"queue {self.queue_name!r}: schedule_tasks_on_main_thread blocks the "
                                         "calling thread, which here runs an event loop; start it from a plain thread")
        self._start()
        if wait:
            with runtime.hold():  # after a signal's stop, its course (KeyboardInterrupt, termination) runs here
                while not self.join(1.0):
                    pass

    def _start(self) -> None:
        while True:
            with self._lock:
                stopping = self._thread
                if stopping is None or not stopping.is_alive():
                    break
                if not self._stop.is_set():
                    return  # consuming already
            stopping.join()  # a consume() right after stop(): once that graceful stop is over, start again
        with self._lock:
            if self._thread is not None:
                if self._thread.is_alive():
                    return
                self._stop = threading.Event()  # restarting after stop(): fresh signals
                self._capacity_freed = threading.Event()
            ensure_console_handler()
            log_file = ""
            if self.params.create_logger_file:
                from funboost_like.core.log import add_file_handler

                handler = add_file_handler(self.logger, f"{self.params.logger_prefix}{self.queue_name}.log")
                log_file = f"; log file {getattr(handler, 'baseFilename', '')}"
            self._bind_now()
            self._pool = self._make_pool()
            self._inline = self._make_inline_runner(self._pool)
            self.stats.started_at = time.monotonic()
            self._thread = threading.Thread(target=self._fetch_loop, name=f"funboost_like-fetch-{self.queue_name}")
            runtime.register(self)
            self._thread.start()
        self.logger.info("consuming queue %r on %s with up to %d concurrent calls%s%s", self.queue_name,
                         self.params.broker.name, self.params.concurrent_num,
                         f" at {self.params.qps:g} calls/s" if self.params.qps else "", log_file)

    def _make_pool(self) -> Pool:
        """The pool of the concurrency mode; also picks how a timed call is stopped in that mode."""
        mode = self.params.concurrent_mode
        size = self.params.concurrent_num
        shared = self.params.specify_concurrent_pool
        self._submit_target: Callable[[Any], Any] = self._process
        if mode == ConcurrentModeEnum.GEVENT:
            greenlets.check_gevent_patched()
            self._timed_call, self._green_deadline = self._green_timed_call, greenlets.gevent_deadline
            return share(shared, mode) if shared is not None else greenlets.GeventPool(size)
        if mode == ConcurrentModeEnum.EVENTLET:
            greenlets.check_eventlet_patched()
            self._timed_call, self._green_deadline = self._green_timed_call, greenlets.eventlet_deadline
            return share(shared, mode) if shared is not None else greenlets.EventletPool(size)
        if mode == ConcurrentModeEnum.ASYNC:
            self._submit_target = self._process_async
            return AsyncLoopPool(size, self.params.specify_async_loop, name=f"asyncio-{self.queue_name}")
        self._timed_call = self._thread_timed_call
        if shared is not None:
            return share(shared, mode)
        return ThreadPool(
            size,
            keep_alive=float(settings.get("THREAD_KEEP_ALIVE_SECONDS")),
            # Under a rate limit the fetcher submits exactly when a call must start: a call that
            # finds no idle worker gets a new one at once, or the start rate would slip.
            grow_after=0.0 if self.params.qps else 0.02,
            name=f"funboost_like-{self.queue_name}",
        )

    def _make_inline_runner(self, pool: Pool) -> InlineRunner | None:
        """Fast calls may run on the fetcher thread (see core/inline.py): THREADING (or SINGLE_THREAD) only, without a
        rate limit (which paces each start), a decorator-level timeout (which needs a worker thread) or a
        shared pool (whose size caps every call of the consumers sharing it)."""
        params = self.params
        if (params.concurrent_mode not in _THREAD_MODES or params.qps or params.function_timeout
                or params.specify_concurrent_pool is not None):
            return None
        return InlineRunner(self._process, self.signature, pool, self.logger, f"funboost_like-{self.queue_name}",
                            self._hand_over_fetching)

    def _hand_over_fetching(self) -> None:
        """The inline runner's rescuer found the fetcher stuck in a long call: a new thread fetches.

        The old thread finishes its call (its outcome is settled by the new fetcher) and ends; a
        graceful stop waits for it like for a pool worker.
        """
        started, finished = self._handover_counts
        with self._lock:
            if self._stop.is_set():
                return
            old = self._thread
            if old is not None:
                self._retired.append(old)
            self._thread = threading.Thread(target=self._fetch_loop, args=(started, finished),
                                            name=f"funboost_like-fetch-{self.queue_name}")
            self._thread.start()
        self.logger.info("a call of queue %r has run for over %.1f s on the fetcher thread; a new thread goes on "
                         "fetching", self.queue_name, HAND_OVER_AFTER_SECONDS)

    def stop(self) -> None:
        """Ask the consumer to stop: no more fetching; unstarted messages go back to the broker."""
        self._stop.set()
        self._capacity_freed.set()
        broker = self._broker
        if broker is not None:  # an idle fetch returns now, not at its timeout (1 s on a server's broker)
            broker.interrupt_fetch(self.queue_name)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the fetcher (and, through it, the graceful shutdown) to end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            thread = self._thread
            if thread is None or thread is threading.current_thread():
                return True
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
            if self._thread is thread:  # not handed over to a new fetcher meanwhile
                return True

    @property
    def worker_count(self) -> int:
        """Worker threads alive right now (the pool grows while calls block, shrinks when idle)."""
        return self._pool.worker_count if self._pool is not None else 0

    @property
    def waiting_for_a_slot(self) -> bool:
        """The fetcher waits for a free slot (every one busy); it asks its gates before its next fetch."""
        return self._fetcher_waiting

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def set_qps(self, qps: float) -> None:
        """Change the rate limit of this consumer (0: none) while it runs, e.g. from a control record.

        The fetcher rebuilds its rate limiter on its next tick (within ``_TICK`` seconds, or after the
        start it is waiting for); :attr:`qps_in_effect` says when it did.
        """
        if not 0 <= qps < float("inf"):
            raise ValueError(f"qps must be a finite number >= 0, got {qps!r}")
        self._qps_target = float(qps)

    def estimate(self) -> dict[str, Any]:
        """This consumer's rate over the last minute, the queue's backlog and the time left for it."""
        rate = self.stats.rate()
        try:
            waiting = self.broker.count(self.queue_name)
        except Exception:
            waiting = -1
        seconds_left = waiting / rate if rate > 0 and waiting >= 0 else None
        return {"rate_per_second_last_minute": rate, "waiting": waiting, "seconds_left": seconds_left}

    # -- the fetcher -------------------------------------------------------------------------------
    def _fetch_loop(self, started: int = 0, finished: int = 0) -> None:
        """The fetcher; ``started`` and ``finished`` carry on the counts of a fetcher it takes over from."""
        broker = self.broker
        pool = self._pool
        assert pool is not None
        capacity = self.params.concurrent_num
        stop = self._stop
        handed_over = False
        acks: list[Delivery] = []  # finished messages whose ack goes out with the next fetch
        suspects_alone = self.params.max_crash_redeliveries is not None
        try:  # everything from here on: a crash is logged and the consumer shut down, even before the loop
            self._first_look()
            qps, limiter, batch, inline = self._pacing(capacity)
            interval = float(settings.get("STATS_LOG_INTERVAL_SECONDS"))
            next_stats = time.monotonic() + interval if interval else float("inf")  # 0: no rate line
            next_tick = time.monotonic() + _TICK
            self._bind_queue(broker)
            while not stop.is_set():
                finished += self._flush_completed(broker, acks)
                pool.grow_if_stalled()
                now = time.monotonic()
                if now >= next_tick:  # also while waiting for capacity or paused
                    next_tick, next_stats = now + _TICK, self._log_rate_when_due(now, next_stats, interval)
                    qps, limiter, batch, inline = self._pacing(capacity, (qps, limiter, batch, inline))  # set_qps()
                free = capacity - (started - finished)
                if free <= 0:
                    if acks:
                        self._ack(broker, acks)
                        acks = []
                    self._wait_for_capacity(pool)
                    continue
                if self._gates and self._paused(started != finished, acks):
                    continue
                timeout = _BUSY_FETCH_TIMEOUT if started != finished else broker.idle_fetch_seconds
                to_ack, acks = acks, []
                size = _fetch_size(broker, free, batch, capacity, inline)
                deliveries = self._fetch(broker, to_ack, size, timeout)
                if deliveries is None:
                    continue
                if suspects_alone and any(d.crashes for d in deliveries):
                    started, finished = self._run_suspect(broker, pool, deliveries, started, finished)
                    continue
                if inline is not None and inline.ready:
                    started += len(deliveries)
                    self._handover_counts = (started, finished)
                    if not inline.run(deliveries, stop):
                        handed_over = True  # a long call ran here: another thread fetches now
                        return
                    continue
                started += self._submit(deliveries, limiter, pool, broker)
        except BaseException as exc:
            self._fetcher_crashed(exc)
        finally:
            if not handed_over:
                if acks:  # only after an exception between a flush and the fetch
                    self._ack(broker, acks)
                self._shutdown(broker, pool)

    def _fetcher_crashed(self, exc: BaseException) -> None:
        """Log a crash of the fetcher, once (the consumer then shuts down); an exit or a greenlet's kill goes on."""
        self.logger.exception("the fetcher of queue %r crashed; stopping this consumer", self.queue_name)
        if not isinstance(exc, Exception):
            raise exc

    def _bind_now(self) -> None:
        """Bind the queue to its exchange before ``consume()`` returns, so a routed publish right after it
        reaches this queue; if the broker is unreachable, the fetcher keeps trying (:meth:`_bind_queue`).
        The broker's own ``broker_exclusive_config`` keys (``capabilities.queue_options``) go to it first."""
        options = self.broker.capabilities.own_options(self.params.broker_exclusive_config)
        if options:
            self.broker.configure_queue(self.queue_name, options)
        routing = self.publisher_of_same_queue.routing
        self._bound = routing is None
        if routing is not None:
            try:
                self.broker.bind(self.queue_name, routing.exchange, routing.exchange_type, routing.bind_keys)
                self._bound = True
            except Exception as exc:  # noqa: BLE001 - logged; the fetcher retries
                self.logger.warning("binding queue %r to exchange %r failed (%s); the fetcher retries",
                                    self.queue_name, routing.exchange, exc)

    def _bind_queue(self, broker: Broker) -> None:
        """Bind the queue to its exchange (``broker_exclusive_config``) before the first fetch, trying
        again with a backoff while the broker refuses (or until stopped)."""
        routing = self.publisher_of_same_queue.routing
        if routing is None or self._bound:
            return
        outage = Outage(self.logger, f"binding queue {self.queue_name!r} to exchange {routing.exchange!r}",
                        logging.ERROR, traceback=True)
        while not self._stop.is_set():
            try:
                broker.bind(self.queue_name, routing.exchange, routing.exchange_type, routing.bind_keys)
            except Exception as exc:
                delay = retry_delay(outage.failures + 1)
                outage.failed(exc, delay)
                self._stop.wait(delay)
                continue
            self._bound = True
            outage.ended()
            return

    def _run_suspect(self, broker: Broker, pool: Pool, deliveries: list[Delivery], started: int,
                     finished: int) -> tuple[int, int]:
        """The poison-message rule (DESIGN §3.3). A delivery whose consumer died while it was in flight
        runs alone: the rest of the batch goes back, and nothing else runs or is held in this process
        until it ends, so a death during it is counted against it only. Once its consumer died
        ``max_crash_redeliveries`` times, it is dead-lettered without running. Returns the updated
        (started, finished) counts of the fetch loop."""
        suspect = next(d for d in deliveries if d.crashes)
        rest = [d for d in deliveries if d is not suspect]
        try:
            if rest:
                broker.release(rest)
        except Exception:
            self.logger.exception("handing back %d message(s) failed; the broker will deliver them again", len(rest))
        limit = self.params.max_crash_redeliveries
        if limit is not None and suspect.crashes >= limit:
            reason = (f"poison message: its consumer process died {suspect.crashes} time(s) while running it "
                      f"(max_crash_redeliveries={limit})")
            self.logger.error("dead-lettering a message of queue %r: %s", self.queue_name, reason)
            self._settle((DEAD_LETTERED, suspect, reason, None, suspect.attempts - 1))
            return started + 1, finished
        self.logger.warning("running a message of queue %r alone: its consumer process died %d time(s) while it "
                            "was in flight", self.queue_name, suspect.crashes)
        for run in (False, True):
            while started != finished and not self._stop.is_set():
                finished += self._flush_completed(broker)
                if started != finished:
                    self._wait_for_capacity(pool)
            if run:
                break
            if self._stop.is_set():
                broker.release([suspect])
                self.stats.counts[RELEASED] += 1
                return started, finished
            pool.submit(self._submit_target, suspect)
            started += 1
        return started, finished

    def _submit(self, deliveries: list[Delivery], limiter: RateLimiter | DistributedRateLimiter | None, pool: Pool,
                broker: Broker) -> int:
        """Hand ``deliveries`` to the pool, each when the rate limiter lets it start; return how many
        started (on stop, the others go back to the broker)."""
        process = self._submit_target
        for index, delivery in enumerate(deliveries):
            if limiter is not None and not limiter.wait(self._stop):  # stopping: the rest go back unstarted
                broker.release(deliveries[index:])
                self.stats.counts[RELEASED] += len(deliveries) - index
                return index
            pool.submit(process, delivery)
        return len(deliveries)

    def _fetch(self, broker: Broker, acks: list[Delivery], n: int, timeout: float) -> list[Delivery] | None:
        """Fetch up to ``n`` messages, sending ``acks`` first (in one round trip where the broker can);
        None when the fetch failed: logged once per outage, and waited out with a backoff (the acks were
        handled by the broker either way)."""
        outage = self._fetch_outage
        try:
            got = broker.ack_and_fetch(acks, self.queue_name, n, timeout) if acks else \
                broker.fetch(self.queue_name, n, timeout)
        except Exception as exc:
            delay = retry_delay(outage.failures + 1)
            outage.failed(exc, delay)
            self._stop.wait(delay)
            return None
        if outage.since is not None:
            outage.ended()
        return got

    def _first_look(self) -> None:
        """The gates' first look, before the pace is set: it may change it (a control record read at start)."""
        if self._gates:
            self._paused(False, [])

    def _pacing(self, capacity: int, current: _Pace | None = None) -> _Pace:
        """The fetcher's pace at the target qps: (qps, rate limiter, batch size, inline runner); ``current``
        when it is already at that qps."""
        if current is not None and current[0] == self._qps_target:
            return current
        qps = self.qps_in_effect = self._qps_target
        limiter = self._make_limiter(qps)
        # At a limited rate, prefetch only about 0.2 s of starts: messages wait in the broker, not here.
        batch = capacity if limiter is None else max(1, min(capacity, int(qps * 0.2)))
        return qps, limiter, batch, self._inline if limiter is None else None

    def _log_rate_when_due(self, now: float, due: float, interval: float) -> float:
        """Log the rate line if ``due``; return when the next one is due."""
        if now < due:
            return due
        self._log_rate()
        return now + interval

    def _make_limiter(self, qps: float) -> RateLimiter | DistributedRateLimiter | None:
        if not qps:
            return None
        if self.params.is_using_distributed_frequency_control:
            return DistributedRateLimiter(self.queue_name, qps)
        return RateLimiter(qps)

    def _paused(self, busy: bool, acks: list[Delivery]) -> bool:
        """Ask the gates (time windows) whether to fetch now; if not, send ``acks`` and wait a little."""
        pause = 0.0
        for gate in self._gates:
            try:
                pause = max(pause, gate.pause_for())
            except Exception:
                self.logger.exception("middleware %s failed in pause_for", type(gate).__name__)
        if pause <= 0:
            return False
        if acks:
            self._ack(self.broker, acks)
            acks.clear()
        self._stop.wait(min(pause, _BUSY_FETCH_TIMEOUT if busy else 1.0))
        return True

    def _wait_for_capacity(self, pool: Pool) -> None:
        stalled = pool.grow_if_stalled()
        self._fetcher_waiting = True
        try:
            if not self._completed:
                self._capacity_freed.wait(0.005 if stalled else 0.05)
            self._capacity_freed.clear()
        finally:
            self._fetcher_waiting = False

    def _flush_completed(self, broker: Broker, acks: list[Delivery] | None = None) -> int:
        """Settle every finished message with the broker: the one place that acks, nacks and dead-letters.

        With ``acks``, the messages to acknowledge are appended to it instead, for the caller to send
        with its next fetch; nacks and dead letters go out at once.
        """
        completed = self._completed
        if not completed:
            return 0
        counts = self.stats.counts
        to_ack: list[Delivery] = [] if acks is None else acks
        others: list[Outcome] = []
        n = 0
        while completed:
            outcome = completed.popleft()
            code = outcome[0]
            counts[code] += 1
            n += 1
            if code == SUCCEEDED or code == SKIPPED:
                to_ack.append(outcome[1])
            else:
                others.append(outcome)
        if to_ack and acks is None:
            self._ack(broker, to_ack)
        for code, delivery, reason, exc, number in others:
            try:
                if code == REQUEUED:
                    broker.nack(delivery, requeue=True, delay=number)
                else:
                    broker.dead_letter(delivery, reason, exc, attempts=int(number))
            except Exception:
                self.logger.exception("settling %r failed; the broker will deliver it again", delivery)
        self.stats.record(n)
        return n

    def _ack(self, broker: Broker, deliveries: list[Delivery]) -> None:
        try:
            broker.ack(deliveries)
        except Exception:
            self.logger.exception("acknowledging %d message(s) failed; the broker will deliver them again",
                                  len(deliveries))

    def _shutdown(self, broker: Broker, pool: Pool) -> None:
        unstarted: list[Delivery] = []
        if self._inline is not None:
            self._inline.close()
            unstarted += self._inline.take_rest()
        unstarted += pool.drain()
        if unstarted:
            try:
                broker.release(unstarted)
                self.logger.info("handed %d unstarted message(s) back to queue %r", len(unstarted), self.queue_name)
            except Exception:
                self.logger.exception("handing unstarted messages back failed; the broker will redeliver them")
            self.stats.counts[RELEASED] += len(unstarted)
        try:
            broker.stop_fetching(self.queue_name)  # what a push-style broker prefetched goes back, uncounted
        except Exception:
            self.logger.exception("handing prefetched messages of queue %r back failed", self.queue_name)
        grace = float(settings.get("GRACEFUL_STOP_SECONDS"))
        deadline = time.monotonic() + grace
        stuck = not pool.shutdown(timeout=grace)
        for thread in self._retired:  # earlier fetchers finishing a long call
            thread.join(max(0.0, deadline - time.monotonic()))
            stuck = stuck or thread.is_alive()
        self._retired = [thread for thread in self._retired if thread.is_alive()]
        if stuck:
            self.logger.warning("calls still running on queue %r after %.0fs; leaving them", self.queue_name, grace)
        self._flush_completed(broker)
        try:  # Kafka: the offsets of the calls that finished during the stop are committed only now
            broker.stopped_consuming(self.queue_name)
        except Exception:
            self.logger.exception("ending the subscription to queue %r failed; the broker may deliver finished "
                                  "messages again", self.queue_name)
        for middleware in self.middlewares:
            try:
                middleware.close()
            except Exception:
                self.logger.exception("middleware %s failed to close", type(middleware).__name__)
        runtime.unregister(self)
        self.logger.info("stopped consuming queue %r: %s", self.queue_name, self.stats.as_dict())

    def _log_rate(self) -> None:
        figures = self.estimate()
        left = figures["seconds_left"]
        self.logger.info("queue %r: %.1f calls/s over the last minute; %d waiting; estimated time left %s",
                         self.queue_name, figures["rate_per_second_last_minute"], figures["waiting"],
                         f"{left:.0f}s" if left is not None else "unknown")

    # -- a worker --------------------------------------------------------------------------------
    def _process(self, delivery: Delivery, message: DecodedMessage | None = None) -> None:
        outcome: Outcome | None = (REQUEUED, delivery, "", None, 0.0)  # if the call escapes with SystemExit & co.
        try:
            outcome = self._run(delivery, message)
        except Exception as exc:
            outcome = self._internal_failure(delivery, exc)
        finally:
            if outcome is not None:  # None: abandoned after a timeout, and settled by its continuation
                self._settle(outcome)

    def _internal_failure(self, delivery: Delivery, exc: Exception) -> Outcome:
        """The framework itself failed on a message (not the function): dead-lettered with the error, since
        handing it back would fail the same way at once, again and again."""
        self.logger.exception("dead-lettering a message of queue %r: handling it failed", self.queue_name)
        return DEAD_LETTERED, delivery, f"handling the message failed: {type(exc).__name__}: {exc}", exc, \
            delivery.attempts - 1

    def _settle(self, outcome: Outcome) -> None:
        self._completed.append(outcome)
        freed = self._capacity_freed
        if self._fetcher_waiting and not freed.is_set():  # one wake-up per wait, not one per message
            freed.set()

    def _run(self, delivery: Delivery, message: DecodedMessage | None = None) -> Outcome | None:
        """Decode, run the hooks and the call with in-place retries; say how the message must end."""
        call = self._prepare(delivery, message)
        if not isinstance(call, Call):
            return call
        outcome = self._call_with_retries(call)
        inline = self._inline
        if inline is not None:
            inline.record(call.duration)
        return self._finish(call, outcome)

    def _prepare(self, delivery: Delivery, message: DecodedMessage | None = None) -> Call | Outcome:
        """Decode and run the before-hooks: a Call to run, or the outcome of a message that will not run."""
        try:
            if message is None:  # the inline runner decodes a message before it decides where it runs
                message = decode(delivery.body, self.signature)
        except DecodeError as exc:
            self.logger.error("dead-lettering a message of queue %r: %s", self.queue_name, exc)
            return DEAD_LETTERED, delivery, str(exc), None, delivery.attempts - 1
        call = Call(self, delivery, message)
        for middleware in self._before:
            try:
                reason = middleware.before_call(call)
            except Exception:
                self.logger.exception("middleware %s failed before task %s", type(middleware).__name__, call.log_id)
                continue
            if reason:
                self.logger.info("skipping task %s: %s", call.log_id, reason)
                call.outcome, call.skip_reason = SKIPPED, reason
                self._hook(self._after, call)
                return SKIPPED, delivery, reason, None, 0.0
        if self._on_start:
            call.started_at = time.time()
            self._hook(self._on_start, call)
        return call

    def _finish(self, call: Call, outcome: Outcome | None) -> Outcome | None:
        if outcome is not None:
            for hook in self._after:  # inline, not through _hook: one frame less per message
                try:
                    hook(call)
                except Exception:
                    self._hook_failed(hook, call)
        return outcome

    def _call_with_retries(self, call: Call) -> Outcome | None:
        """Run the function until it succeeds or the retries are spent; None if a run was abandoned."""
        timeout = call.message.extra.get("function_timeout", self.params.function_timeout)
        function = self.function
        kwargs = call.message.kwargs
        multi = self.signature.multi_params
        started = time.perf_counter()
        if not call.attempts:
            call.run_started = started
        while True:
            call.attempts += 1
            try:
                if timeout:
                    call.result = self._timed_call(call, timeout)
                else:
                    call.result = function(**kwargs) if multi else function(kwargs)
            except _Abandoned:
                call.duration += time.perf_counter() - started
                return None
            except Exception as exc:
                outcome = self._after_exception(call, exc, started)
                if outcome is None:
                    continue
                return outcome
            call.outcome, call.duration = SUCCEEDED, call.duration + time.perf_counter() - started
            return SUCCEEDED, call.delivery, "", None, 0.0

    async def _process_async(self, delivery: Delivery) -> None:
        """ASYNC mode: the same path as :meth:`_process`, awaiting the coroutine on the event loop."""
        outcome: Outcome | None = (REQUEUED, delivery, "", None, 0.0)
        try:
            call = self._prepare(delivery)
            outcome = call if not isinstance(call, Call) else self._finish(call, await self._await_with_retries(call))
        except Exception as exc:
            outcome = self._internal_failure(delivery, exc)
        finally:
            if outcome is not None:
                self._settle(outcome)

    async def _await_with_retries(self, call: Call) -> Outcome:
        timeout = call.message.extra.get("function_timeout", self.params.function_timeout)
        function = self.function
        kwargs = call.message.kwargs
        multi = self.signature.multi_params
        started = time.perf_counter()
        if not call.attempts:
            call.run_started = started
        while True:
            call.attempts += 1
            try:
                coroutine = function(**kwargs) if multi else function(kwargs)
                if timeout:
                    try:
                        call.result = await asyncio.wait_for(coroutine, timeout)
                    except asyncio.TimeoutError:
                        raise FunctionTimeoutError(f"the call took longer than function_timeout={timeout}s") from None
                else:
                    call.result = await coroutine
            except Exception as exc:
                outcome = self._after_exception(call, exc, started)
                if outcome is None:
                    continue
                return outcome
            call.outcome, call.duration = SUCCEEDED, call.duration + time.perf_counter() - started
            return SUCCEEDED, call.delivery, "", None, 0.0

    def _after_exception(self, call: Call, exc: Exception, started: float) -> Outcome | None:
        """Classify a failed run: None to run again at once, or the message's outcome."""
        if isinstance(exc, ExceptionForRequeue):
            self.logger.info("task %s asked to be requeued", call.log_id)
            call.outcome, call.duration = REQUEUED, call.duration + time.perf_counter() - started
            return REQUEUED, call.delivery, "", None, 0.0
        retries = call.message.extra.get("max_retry_times", self.params.max_retry_times)
        if self.params.retry_backoff:  # a retry waits in the broker, not in a worker
            runs = call.runs
            if runs <= retries:
                delay = backoff_delay(self.params, runs)
                self.logger.warning("task %s of queue %r failed (run %d): %r; retrying in %.2fs", call.log_id,
                                    self.queue_name, runs, exc, delay)
                call.outcome, call.duration = REQUEUED, call.duration + time.perf_counter() - started
                return REQUEUED, call.delivery, "", None, delay
        elif call.attempts <= retries:
            self._log_failure(call, exc, final=False)
            return None
        return self._failed(call, exc, call.duration + time.perf_counter() - started)

    def _green_timed_call(self, call: Call, timeout: float) -> Any:
        """GEVENT/EVENTLET: the library's timeout stops the greenlet at its next cooperative switch."""
        kwargs = call.message.kwargs
        with self._green_deadline(float(timeout)):
            return self.function(**kwargs) if self.signature.multi_params else self.function(kwargs)

    def _failed(self, call: Call, exc: Exception, duration: float) -> Outcome:
        runs = call.runs
        self._log_failure(call, exc, final=True, runs=runs)
        call.exc, call.outcome, call.duration = exc, FAILED, duration
        return FAILED, call.delivery, self._failure_reason(call, exc, runs), exc, runs

    def _thread_timed_call(self, call: Call, timeout: float) -> Any:
        """One run under a deadline (see concurrency/timeouts.py for what stopping a thread means)."""
        run = TimedRun(float(timeout), _ABANDON_GRACE, lambda: self._abandoned(call, run))
        watchdog.watch(run)
        kwargs = call.message.kwargs
        try:
            result = self.function(**kwargs) if self.signature.multi_params else self.function(kwargs)
        except BaseException as exc:
            if run.finish():
                raise _Abandoned() from None
            if type(exc) is FunctionTimeoutError and not exc.args:  # the watchdog's (a class): say which limit
                raise FunctionTimeoutError(f"the call took longer than function_timeout={timeout}s").with_traceback(
                    exc.__traceback__) from None
            raise
        if run.finish():
            raise _Abandoned()
        if run.interrupted:  # the function swallowed the timeout exception and returned late
            raise FunctionTimeoutError(f"the call took longer than function_timeout={timeout}s")
        return result

    def _abandoned(self, call: Call, run: TimedRun) -> None:
        """Watchdog thread: a timed-out call is stuck in C code. Free its worker and carry on elsewhere."""
        self.logger.warning("task %s of queue %r still running %.1fs after its function_timeout=%ss; "
                            "abandoning the stuck thread", call.log_id, self.queue_name, run.grace, run.timeout)
        if self._pool is not None:
            self._pool.forget(run.thread_id)
            try:
                self._pool.submit(self._resume_after_timeout, call)
                return
            except RuntimeError:  # the pool is shut down: the broker gets the message back
                pass
        self._settle((REQUEUED, call.delivery, "", None, 0.0))

    def _resume_after_timeout(self, call: Call) -> None:
        """A fresh worker goes on with a message whose previous run was abandoned."""
        outcome: Outcome | None = (REQUEUED, call.delivery, "", None, 0.0)
        try:
            timeout = call.message.extra.get("function_timeout", self.params.function_timeout)
            exc = FunctionTimeoutError(f"the call took longer than function_timeout={timeout}s")
            retries = call.message.extra.get("max_retry_times", self.params.max_retry_times)
            if call.attempts <= retries:
                self._log_failure(call, exc, final=False)
                outcome = self._finish(call, self._call_with_retries(call))
            else:
                outcome = self._finish(call, self._failed(call, exc, call.duration))
        finally:
            if outcome is not None:
                self._settle(outcome)

    def _hook(self, hooks: list[Callable[[Call], None]], call: Call) -> None:
        for hook in hooks:
            try:
                hook(call)
            except Exception:
                self._hook_failed(hook, call)

    def _hook_failed(self, hook: Callable[[Call], None], call: Call) -> None:
        owner = type(getattr(hook, "__self__", hook)).__name__
        self.logger.exception("middleware %s failed in %s for task %s", owner, getattr(hook, "__name__", hook),
                              call.log_id)

    def _detailed(self, call: Call) -> bool:
        """Whether failures of this call show their traceback (the message's own setting, else the decorator's)."""
        return bool(call.message.extra.get("is_print_detail_exception", self.params.is_print_detail_exception))

    def _log_failure(self, call: Call, exc: Exception, *, final: bool, runs: int = 0) -> None:
        detail = self._detailed(call) and not isinstance(exc, ExceptionForRetry)
        if final:
            self.logger.error("task %s of queue %r failed for good after %d run(s): %r; dead-lettered",
                              call.log_id, self.queue_name, runs, exc, exc_info=exc if detail else None)
        else:
            self.logger.warning("task %s of queue %r failed (attempt %d): %r; retrying",
                                call.log_id, self.queue_name, call.attempts, exc, exc_info=exc if detail else None)

    def _failure_reason(self, call: Call, exc: BaseException, attempt: int) -> str:
        reason = f"failed {attempt} time(s); last error: {type(exc).__name__}: {exc}"
        if self._detailed(call):
            reason = reason + "\n" + "".join(traceback.format_exception(exc))[-4000:]
        return reason
