"""Timeouts for calls running in threads.

A thread cannot be killed in Python. When a call passes its deadline, the :class:`Watchdog` raises
:class:`~funboost_like.core.errors.FunctionTimeoutError` inside the worker thread (CPython's
``PyThreadState_SetAsyncExc``): pure-Python code stops at its next bytecode. Code blocked inside C
(``time.sleep``, a socket read, a lock) only sees the exception when that C call returns, so if the
call has not ended ``grace`` seconds after the deadline it is *abandoned*: the watchdog runs the
``on_abandon`` callback (the consumer frees the call's slot and goes on with the message in a fresh
worker) and the stuck thread is left to end on its own, its late result ignored.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from funboost_like.core.errors import FunctionTimeoutError

logger = logging.getLogger("funboost_like.timeouts")

_RUNNING, _INTERRUPTED, _ABANDONED, _DONE = range(4)
MAX_WAIT = 3600.0  # the watchdog's longest single wait (well below threading.TIMEOUT_MAX)

_set_async_exc: Any
try:
    _set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    _set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
    _set_async_exc.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - not CPython: calls are abandoned, never interrupted
    _set_async_exc = None


def _clear(thread_id: int) -> None:
    """Drop an exception injected into ``thread_id`` that has not been raised yet."""
    if _set_async_exc is not None:
        _set_async_exc(thread_id, ctypes.py_object())  # NULL clears


class TimedRun:
    """One run of a call under a deadline; shared by the worker thread and the watchdog."""

    __slots__ = ("thread_id", "timeout", "grace", "on_abandon", "state", "lock", "deadline")

    def __init__(self, timeout: float, grace: float, on_abandon: Callable[[], None]) -> None:
        self.thread_id = threading.get_ident()
        self.timeout = timeout
        self.grace = grace
        self.on_abandon = on_abandon
        self.state = _RUNNING
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + timeout

    @property
    def interrupted(self) -> bool:
        return self.state in (_INTERRUPTED, _ABANDONED)

    def expire(self) -> float | None:
        """Watchdog: the deadline passed. Interrupt the thread; return when to abandon it, or None."""
        with self.lock:
            if self.state != _RUNNING:
                return None
            self.state = _INTERRUPTED
            if _set_async_exc is not None:
                _set_async_exc(self.thread_id, FunctionTimeoutError)
        return time.monotonic() + self.grace

    def abandon(self) -> bool:
        """Watchdog: still running after the grace period. Return True if the run is now abandoned."""
        with self.lock:
            if self.state != _INTERRUPTED:
                return False
            self.state = _ABANDONED
            _clear(self.thread_id)
        return True

    def finish(self) -> bool:
        """Worker: the call ended (or is unwinding). Idempotent; return True if it was abandoned."""
        with self.lock:
            if self.state == _INTERRUPTED:
                _clear(self.thread_id)  # an exception injected but not raised yet must not surface later
            abandoned = self.state == _ABANDONED
            if not abandoned:
                self.state = _DONE
            return abandoned


class Watchdog:
    """One daemon thread per process that watches the deadlines of every timed run."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimedRun, bool]] = []  # (when, seq, run, is_abandon_check)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._compact_at = 10_000

    def watch(self, run: TimedRun) -> None:
        with self._cond:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._heap = []
                self._thread = threading.Thread(target=self._loop, name="funboost_like-watchdog", daemon=True)
                self._thread.start()
            heap = self._heap
            if len(heap) > self._compact_at:  # finished runs stay until their deadline: drop them now
                heap[:] = [entry for entry in heap if entry[2].state in (_RUNNING, _INTERRUPTED)]
                heapq.heapify(heap)
                self._compact_at = max(10_000, 2 * len(heap))
            heapq.heappush(heap, (run.deadline, next(self._seq), run, False))
            if heap[0][2] is run:
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    # a deadline further than a thread can wait (a message's function_timeout=1e300) is
                    # waited for in steps: threading's wait raises OverflowError beyond TIMEOUT_MAX
                    self._cond.wait(None if not self._heap else min(self._heap[0][0] - time.monotonic(),
                                                                     MAX_WAIT))
                _, _, run, is_abandon_check = heapq.heappop(self._heap)
            try:
                if not is_abandon_check:
                    abandon_at = run.expire()
                    if abandon_at is not None:
                        with self._cond:
                            heapq.heappush(self._heap, (abandon_at, next(self._seq), run, True))
                elif run.abandon():
                    run.on_abandon()
            except Exception:
                logger.exception("timeout handling failed")


watchdog = Watchdog()
