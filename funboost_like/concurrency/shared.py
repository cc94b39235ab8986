"""``specify_concurrent_pool``: several consumers run their calls in one pool the user made.

The seed's promise: "use the given thread pool (or greenlet pool); several consumers may share one;
when it is given, the consumer's own size is ignored". So the pool's size caps the calls running at
once across every consumer that shares it, and each consumer fetches at most that many messages.

A shared pool is one of:

* :class:`~funboost_like.concurrency.threads.ThreadPool` (``concurrent_mode=THREADING``), the
  framework's own pool that grows while calls block and shrinks when idle;
* any :class:`concurrent.futures.Executor`, such as ``ThreadPoolExecutor(20)``
  (``concurrent_mode=THREADING``);
* :class:`~funboost_like.concurrency.greenlets.GeventPool` or
  :class:`~funboost_like.concurrency.greenlets.EventletPool` (``GEVENT`` / ``EVENTLET``).

An ``async def`` consumer shares an event loop instead (``specify_async_loop``).

Each consumer sees the shared pool through its own :class:`PoolShare`, so stopping one consumer
takes back only its own calls that have not started (they go back to the broker) and waits only
for its own running calls; the pool itself keeps serving the others and is never shut down by a
consumer. A forked child (``multi_process_consume``) starts with a fresh, empty copy of a
:class:`ThreadPool`, so a pool made at module level works in every process.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

from funboost_like.concurrency.base import Pool
from funboost_like.core.enums import ConcurrentModeEnum
from funboost_like.core.errors import ConfigurationError


def check_shared_pool(pool: Any, mode: ConcurrentModeEnum) -> int:
    """Raise ConfigurationError unless ``pool`` can serve consumers of ``mode``; return its size."""
    from funboost_like.concurrency.greenlets import EventletPool, GeventPool
    from funboost_like.concurrency.threads import ThreadPool

    if mode == ConcurrentModeEnum.ASYNC:
        raise ConfigurationError("specify_concurrent_pool is not used with concurrent_mode=ASYNC: share an event "
                                 "loop with specify_async_loop")
    wanted, names = {
        ConcurrentModeEnum.THREADING: ((ThreadPool, concurrent.futures.Executor),
                                       "funboost_like.ThreadPool or a concurrent.futures.ThreadPoolExecutor"),
        ConcurrentModeEnum.GEVENT: ((GeventPool,), "funboost_like.GeventPool"),
        ConcurrentModeEnum.EVENTLET: ((EventletPool,), "funboost_like.EventletPool"),
    }[mode]
    if not isinstance(pool, wanted):
        raise ConfigurationError(f"specify_concurrent_pool for concurrent_mode={mode.name} must be a {names}, "
                                 f"got {type(pool).__name__}")
    if isinstance(pool, Pool):
        return pool.max_workers
    size = getattr(pool, "_max_workers", None)  # ThreadPoolExecutor and ProcessPoolExecutor keep it there
    if isinstance(pool, concurrent.futures.ProcessPoolExecutor) or not isinstance(size, int) or size < 1:
        raise ConfigurationError(f"specify_concurrent_pool: {type(pool).__name__} is not a thread pool whose size "
                                 "can be read; use concurrent.futures.ThreadPoolExecutor or funboost_like.ThreadPool")
    return size


class ExecutorPool(Pool):
    """A :class:`concurrent.futures.Executor` behind the pool contract (``drain`` cancels what has not started)."""

    def __init__(self, executor: concurrent.futures.Executor, max_workers: int) -> None:
        self.executor = executor
        self.max_workers = max_workers

    @property
    def worker_count(self) -> int:
        return len(getattr(self.executor, "_threads", ()))

    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        self.executor.submit(fn, arg)

    def drain(self) -> list[Any]:
        return []  # PoolShare takes back its own calls

    def shutdown(self, timeout: float | None = None) -> bool:
        return True  # the user's executor: never shut down by a consumer


class PoolShare(Pool):
    """One consumer's view of a shared pool: its own unstarted calls and its own running count."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.max_workers = pool.max_workers
        self._lock = threading.Condition(threading.Lock())
        self._waiting: dict[int, Any] = {}  # id of a submitted item -> its arg, until a worker starts it
        self._running = 0
        self._closed = False

    @property
    def worker_count(self) -> int:
        return self.pool.worker_count

    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        if self._closed:
            raise RuntimeError("pool is shut down")
        item = (fn, arg)
        with self._lock:
            self._waiting[id(item)] = arg
        self.pool.submit(self._run, item)

    def _run(self, item: tuple[Callable[[Any], None], Any]) -> None:
        with self._lock:
            if self._waiting.pop(id(item), _TAKEN_BACK) is _TAKEN_BACK:
                return  # drained: the consumer gave this message back
            self._running += 1
        fn, arg = item
        try:
            fn(arg)
        finally:
            with self._lock:
                self._running -= 1
                if not self._running:
                    self._lock.notify_all()

    def drain(self) -> list[Any]:
        with self._lock:
            taken = list(self._waiting.values())
            self._waiting.clear()
        return taken

    def shutdown(self, timeout: float | None = None) -> bool:
        """Wait for this consumer's running calls only; the shared pool goes on serving the others."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._closed = True
            while self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def grow_if_stalled(self) -> bool:
        return self.pool.grow_if_stalled()

    def forget(self, thread_id: int) -> None:
        self.pool.forget(thread_id)


_TAKEN_BACK = object()


def share(pool: Any, mode: int) -> PoolShare:
    """The view of the user's ``pool`` for one consumer (``pool`` was checked by :func:`check_shared_pool`)."""
    size = check_shared_pool(pool, ConcurrentModeEnum(mode))
    return PoolShare(pool if isinstance(pool, Pool) else ExecutorPool(pool, size))
