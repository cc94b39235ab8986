"""One asyncio event loop in one daemon thread per process, for brokers whose client is asyncio-only.

Brokers built on asyncio clients (NATS, and later MQTT or Pulsar ones) keep the sync broker contract:
their primitives hand coroutines to :data:`bridge` and wait for the result
(``asyncio.run_coroutine_threadsafe(...).result(timeout)``), so no event loop ever runs in, or is
set on, a caller's thread. A user's own loop in the calling thread is not touched: calling
:meth:`AsyncBridge.run` from inside a coroutine blocks that loop for the duration of the call (as any
sync client would), and never deadlocks, because the work runs on the bridge's own loop.

* The thread and its loop start lazily, at the first :meth:`~AsyncBridge.run` (never at import or
  construction).
* Fork safety: a forked child starts with no loop; its first call starts its own. The parent's loop
  and everything bound to it (connections) are dropped in the child, never closed there.
* Calling :meth:`~AsyncBridge.run` on the bridge's own thread (from a coroutine or callback running
  there) raises :class:`RuntimeError` instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_ABANDONED: list[Any] = []  # loops inherited from a parent process: kept referenced, never closed here


class AsyncBridge:
    """Runs coroutines on one event loop in one daemon thread of this process."""

    def __init__(self, name: str = "funboost_like-asyncio") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop of this process's bridge thread (started on first use)."""
        loop = self._loop
        if loop is None or self._pid != os.getpid():
            loop = self._start()
        return loop

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._pid != os.getpid():
                self.reset_after_fork()
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()
                thread = threading.Thread(target=self._serve, args=(loop, started), name=self.name, daemon=True)
                thread.start()
                started.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)  # this thread only
        loop.call_soon(started.set)
        loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the bridge's loop; the caller may wait on the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the bridge's loop and return its result; raise ``TimeoutError`` (after
        cancelling it) when it takes more than ``timeout`` seconds, or what it raised."""
        if self._thread is threading.current_thread():
            coro.close()
            raise RuntimeError(f"{self.name}: run() called on the bridge's own thread (it would wait on itself)")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{self.name}: no result within {timeout} s") from None

    def in_loop_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's loop (its thread does not exist here)."""
        if self._loop is not None:
            _ABANDONED.append(self._loop)
        self._loop, self._thread, self._pid = None, None, os.getpid()
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Stop the loop and its thread (tests); the next call starts new ones."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None and self._pid == os.getpid():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)


bridge = AsyncBridge()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=bridge.reset_after_fork)
