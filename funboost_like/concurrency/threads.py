"""A thread pool that grows only while calls block and shrinks after an idle keep-alive.

``max_workers`` is a ceiling, not a number of threads to create: workers are added only when work
waits that no idle (or just starting) worker will take, and the queue of submitted calls has not
been empty for ``grow_after`` seconds (the workers do not keep up: calls block). Each such stall at
most doubles the pool, so blocking calls reach hundreds of threads in a few steps while trivial
calls are served by one or two threads. With ``grow_after=0`` (a rate-limited owner that submits
exactly when a call must start) any call that finds no idle worker gets one at once. The owner calls
:meth:`ThreadPool.grow_if_stalled` periodically. A thread idle for ``keep_alive`` seconds exits.

Several consumers may share one pool (``specify_concurrent_pool``, see
:mod:`funboost_like.concurrency.shared`); a forked child starts with an empty copy of every pool.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

from funboost_like.concurrency.base import Pool

logger = logging.getLogger("funboost_like.pool")

_STOP = object()
_pools: weakref.WeakSet[ThreadPool] = weakref.WeakSet()
_Item = tuple[Callable[[Any], None], Any]


class ThreadPool(Pool):
    def __init__(self, max_workers: int, *, keep_alive: float = 10.0, grow_after: float = 0.02,
                 name: str = "funboost_like") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self.keep_alive = keep_alive
        self.grow_after = grow_after
        self.name = name
        self._closed = False
        self._serial = 0
        self._empty()
        _pools.add(self)

    def _empty(self) -> None:
        """No worker and no work: a new pool, or a forked child's copy (the parent's threads do not exist
        there, and the calls queued were the parent's consumers')."""
        self._work: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._starting = 0  # threads started whose loop has not begun: capacity already on its way
        self._backlog_since = time.monotonic()  # when the work queue was last seen empty

    @property
    def worker_count(self) -> int:
        return len(self._threads)

    @property
    def idle_count(self) -> int:
        return self._idle

    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        if self._closed:
            raise RuntimeError("pool is shut down")
        work = self._work
        work.put((fn, arg))
        if work.qsize() == 1:  # the queue was empty: any backlog starts now
            self._backlog_since = time.monotonic()
        if not self._threads:
            self._start_worker()
        elif self._idle + self._starting < self._work.qsize():
            self.grow_if_stalled()

    def grow_if_stalled(self) -> bool:
        """Start workers for submitted calls that no worker picked up within ``grow_after`` (all busy).

        The owner calls this periodically while work may be waiting; return True if calls are waiting.
        """
        waiting = self._work.qsize() - self._idle - self._starting
        if waiting <= 0:
            return False
        if self._starting == 0 and time.monotonic() - self._backlog_since >= self.grow_after:
            # At most double per stall: blocking calls reach hundreds of threads in a few steps, while a
            # worker that was merely starved of CPU for a moment adds little.
            for _ in range(min(waiting, max(1, len(self._threads)), self.max_workers - len(self._threads))):
                self._start_worker()
        return True

    def forget(self, thread_id: int) -> None:
        """Stop counting a worker stuck in an abandoned call: a new one may start in its place, and the
        stuck one exits as soon as its call returns."""
        with self._lock:
            for thread in self._threads:
                if thread.ident == thread_id:
                    self._threads.discard(thread)
                    return

    def _start_worker(self) -> None:
        with self._lock:
            if len(self._threads) >= self.max_workers or self._closed:
                return
            self._serial += 1
            thread = threading.Thread(target=self._run, name=f"{self.name}-{self._serial}", daemon=True)
            self._threads.add(thread)
            self._starting += 1
        thread.start()

    def _run(self) -> None:
        work = self._work
        keep_alive = self.keep_alive
        lock = self._lock
        me = threading.current_thread()
        with lock:
            self._starting -= 1
        try:
            while True:
                try:
                    item = work.get_nowait()  # busy path: no bookkeeping while work keeps coming
                except queue.Empty:
                    with lock:
                        self._idle += 1
                    try:
                        item = work.get(timeout=keep_alive)
                    except queue.Empty:
                        with lock:  # idle for keep_alive: shrink
                            if self._closed or len(self._threads) > 1 or work.empty():
                                self._threads.discard(me)
                                return
                        continue
                    finally:
                        with lock:
                            self._idle -= 1
                if item is _STOP:
                    return
                if not work.qsize():  # drained: workers keep up, no reason to grow
                    self._backlog_since = time.monotonic()
                fn, arg = cast(_Item, item)
                try:
                    fn(arg)
                except BaseException:  # the submitted callable handles its own errors; never lose a worker
                    logger.exception("unhandled error in pool worker %s", me.name)
                if me not in self._threads:  # forgotten while stuck in an abandoned call
                    return
        finally:
            with lock:
                self._threads.discard(me)

    def drain(self) -> list[Any]:
        drained: list[Any] = []
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return drained
            if item is _STOP:
                continue
            drained.append(cast(_Item, item)[1])

    def shutdown(self, timeout: float | None = None) -> bool:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._work.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(t.is_alive() for t in threads)


def _empty_pools_in_child() -> None:
    for pool in list(_pools):
        pool._empty()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_empty_pools_in_child)
