"""ASYNC mode: ``async def`` consuming functions run on one event loop in one thread.

Every call of a consumer runs on the same loop (the seed insists on this: no temporary loop per
call). The fetcher stays a plain thread, so broker I/O never blocks the loop; it hands calls over
through a deque and one thread-safe wake-up per batch. ``concurrent_num`` caps the calls in flight
(the fetcher never has more outstanding). A user-supplied loop (``specify_async_loop``) is used as
given: if it is already running (in the user's thread), calls are scheduled onto it; if not, the
framework runs it in its own thread (and stops it at shutdown; only a loop the pool made is closed).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from funboost_like.concurrency.base import Pool

logger = logging.getLogger("funboost_like.pool")

AsyncCallable = Callable[[Any], Coroutine[Any, Any, None]]


class AsyncLoopPool(Pool):
    def __init__(self, max_workers: int, loop: asyncio.AbstractEventLoop | None = None, name: str = "asyncio") -> None:
        self.max_workers = max_workers
        self._pending: deque[tuple[AsyncCallable, Any]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._scheduled = False
        self._thread: threading.Thread | None = None
        self._own_loop = loop is None  # closed at shutdown; a loop of the user's is only stopped
        if loop is None:
            loop = asyncio.new_event_loop()
        self.loop = loop
        if not loop.is_running():
            self._thread = threading.Thread(target=self._run_loop, name=f"funboost_like-{name}", daemon=True)
            self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def worker_count(self) -> int:
        return len(self._tasks)

    def submit(self, fn: Callable[[Any], Any], arg: Any) -> None:
        if self._closed:
            raise RuntimeError("pool is shut down")
        self._pending.append((fn, arg))
        if not self._scheduled:  # the loop clears the flag before draining, so nothing is left behind
            self._scheduled = True
            self.loop.call_soon_threadsafe(self._start_pending)

    def _start_pending(self) -> None:
        self._scheduled = False
        pending = self._pending
        tasks = self._tasks
        while pending:
            fn, arg = pending.popleft()
            task = self.loop.create_task(fn(arg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def drain(self) -> list[Any]:
        drained = []
        while self._pending:
            drained.append(self._pending.popleft()[1])
        return drained

    def shutdown(self, timeout: float | None = None) -> bool:
        self._closed = True

        async def wait_all() -> bool:
            tasks = list(self._tasks)
            if not tasks:
                return True
            _, still = await asyncio.wait(tasks, timeout=timeout)
            return not still

        done = asyncio.run_coroutine_threadsafe(wait_all(), self.loop).result()
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            if self._own_loop and not self._thread.is_alive():
                self.loop.close()
        return done
