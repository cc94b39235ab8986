"""GEVENT and EVENTLET modes: one greenlet per call, behind the same pool contract as threads.

The user monkey-patches at the top of the start script, as the seed says
(``from gevent import monkey; monkey.patch_all()`` or ``import eventlet; eventlet.monkey_patch()``);
the framework checks that the patch is there and refuses to start without it, because an unpatched
``time.sleep`` or socket call would block every greenlet at once.

Greenlets are cheap, so a call starts at once in a new greenlet (the fetcher already bounds how many
are in flight to ``concurrent_num``), and there is nothing to grow; calls wait in the pool only when
several consumers share it (``specify_concurrent_pool``), whose size then caps them all.
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
    """At most ``max_workers`` greenlets at once; a call submitted while all are busy waits in order.

    A consumer never has more calls outstanding than its pool's size, so calls wait here only when
    several consumers share one pool (``specify_concurrent_pool``). Greenlets of one hub never run at
    the same time, so the counts need no lock. A greenlet that finishes a call takes the next waiting one.
    """

    def __init__(self, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self._waiting: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._running = 0
        self._closed = False

    @property
    def worker_count(self) -> int:
        return self._running

    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        if self._closed:
            raise RuntimeError("pool is shut down")
        if self._running >= self.max_workers:
            self._waiting.append((fn, arg))
            return
        self._running += 1
        self._spawn(self._work, fn, arg)

    def _work(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            while True:
                try:
                    fn(arg)
                except BaseException:  # the submitted callable handles its own errors
                    logger.exception("unhandled error in a greenlet of the pool")
                if not self._waiting:
                    return
                fn, arg = self._waiting.popleft()
        finally:
            self._running -= 1

    def _spawn(self, work: Callable[..., None], fn: Callable[[Any], None], arg: Any) -> None:
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

    def _spawn(self, work: Callable[..., None], fn: Callable[[Any], None], arg: Any) -> None:
        self._group.spawn(work, fn, arg)

    def shutdown(self, timeout: float | None = None) -> bool:
        self._closed = True
        return bool(self._group.join(timeout=timeout))


class EventletPool(_GreenPool):
    def __init__(self, max_workers: int) -> None:
        import eventlet

        super().__init__(max_workers)
        self._pool = eventlet.GreenPool(max_workers)

    def _spawn(self, work: Callable[..., None], fn: Callable[[Any], None], arg: Any) -> None:
        self._pool.spawn_n(work, fn, arg)

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
