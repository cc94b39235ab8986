"""GEVENT and EVENTLET modes: one greenlet per call, behind the same pool contract as threads.

The user monkey-patches at the top of the start script, as the seed says
(``from gevent import monkey; monkey.patch_all()`` or ``import eventlet; eventlet.monkey_patch()``);
the framework checks that the patch is there and refuses to start without it, because an unpatched
``time.sleep`` or socket call would block every greenlet at once.

A call starts as soon as the greenlet before it yields (the fetcher already bounds how many are in
flight to ``concurrent_num``); calls that never yield run one after another in one greenlet. Calls wait
for a free greenlet only when several consumers share the pool (``specify_concurrent_pool``), whose
size then caps them all.
A ``function_timeout`` raises the library's own timeout in the greenlet, which stops it at its next
cooperative switch (blocking I/O and sleep, with the patch).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from funboost_like.concurrency.base import Pool
from funboost_like.core.errors import ConfigurationError, FunctionTimeoutError

logger = logging.getLogger("funboost_like.pool")


def check_gevent_patched() -> None:
    try:
        from gevent import monkey
    except ImportError as exc:
        raise ConfigurationError("concurrent_mode=GEVENT needs gevent: pip install 'funboost_like[gevent]'") from exc
    if not (monkey.is_module_patched("socket") and monkey.is_module_patched("time")
            and monkey.is_module_patched("threading")):
        raise ConfigurationError(
            "concurrent_mode=GEVENT needs the gevent monkey patch: put "
            "'from gevent import monkey; monkey.patch_all()' as the first lines of your start script"
        )


def check_eventlet_patched() -> None:
    try:
        from eventlet import patcher
    except ImportError as exc:
        raise ConfigurationError(
            "concurrent_mode=EVENTLET needs eventlet: pip install 'funboost_like[eventlet]'"
        ) from exc
    if not (patcher.is_monkey_patched("socket") and patcher.is_monkey_patched("time")
            and patcher.is_monkey_patched("thread")):
        raise ConfigurationError(
            "concurrent_mode=EVENTLET needs the eventlet monkey patch: put "
            "'import eventlet; eventlet.monkey_patch()' as the first lines of your start script"
        )


class _GreenPool(Pool):
    """At most ``max_workers`` greenlets at once, each running submitted calls one after another.

    A greenlet is started only when no other one is about to start: the one that starts takes the oldest
    waiting call and, if calls still wait, starts the next greenlet before running its own. So calls that
    wait on I/O start one after another as each yields, up to ``max_workers`` running at once, while calls
    that never yield all run in the first greenlet, without a greenlet made per call. Greenlets of one hub
    never run at the same time, so the counts need no lock.
    """

    def __init__(self, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self._waiting: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._running = 0
        self._starting = False  # a greenlet was spawned and has not taken its first call yet
        self._closed = False

    @property
    def worker_count(self) -> int:
        return self._running

    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        if self._closed:
            raise RuntimeError("pool is shut down")
        self._waiting.append((fn, arg))
        if not self._starting and self._running < self.max_workers:
            self._start_one()

    def _start_one(self) -> None:
        self._starting = True
        self._running += 1
        self._spawn(self._work)

    def _work(self) -> None:
        self._starting = False
        waiting = self._waiting
        try:
            while waiting:
                fn, arg = waiting.popleft()
                if waiting and not self._starting and self._running < self.max_workers:
                    self._start_one()  # the next call starts as soon as this one yields
                try:
                    fn(arg)
                except BaseException:  # the submitted callable handles its own errors
                    logger.exception("unhandled error in a greenlet of the pool")
        finally:
            self._running -= 1

    def _spawn(self, work: Callable[[], None]) -> None:
        raise NotImplementedError

    def drain(self) -> list[Any]:
        drained = [arg for _, arg in self._waiting]
        self._waiting.clear()
        return drained


class GeventPool(_GreenPool):
    def __init__(self, max_workers: int) -> None:
        from gevent.pool import Group

        super().__init__(max_workers)
        self._group = Group()

    def _spawn(self, work: Callable[[], None]) -> None:
        self._group.spawn(work)

    def shutdown(self, timeout: float | None = None) -> bool:
        self._closed = True
        return bool(self._group.join(timeout=timeout))


class EventletPool(_GreenPool):
    def __init__(self, max_workers: int) -> None:
        import eventlet

        super().__init__(max_workers)
        self._pool = eventlet.GreenPool(max_workers)

    def _spawn(self, work: Callable[[], None]) -> None:
        self._pool.spawn_n(work)

    def shutdown(self, timeout: float | None = None) -> bool:
        import eventlet

        self._closed = True
        try:
            with eventlet.Timeout(timeout):
                self._pool.waitall()
        except eventlet.Timeout:
            return False
        return True


@contextlib.contextmanager
def gevent_deadline(seconds: float) -> Iterator[None]:
    """Raise FunctionTimeoutError in the current greenlet after ``seconds``."""
    import gevent

    with gevent.Timeout(seconds, FunctionTimeoutError(f"the call took longer than function_timeout={seconds}s")):
        yield


@contextlib.contextmanager
def eventlet_deadline(seconds: float) -> Iterator[None]:
    import eventlet

    with eventlet.Timeout(seconds, FunctionTimeoutError(f"the call took longer than function_timeout={seconds}s")):
        yield
