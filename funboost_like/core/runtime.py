"""Process-wide bookkeeping of running consumers, and graceful stop on SIGINT/SIGTERM.

Signal handlers are installed when the first consumer starts in the main thread, never at import.
On the first SIGINT or SIGTERM every consumer stops fetching, hands unstarted messages back, and
lets running calls finish within ``GRACEFUL_STOP_SECONDS``; then the signal's previous behaviour
runs (KeyboardInterrupt for SIGINT, termination for SIGTERM) if the main thread is still busy.
A second signal exits at once; a repeat that comes within :data:`REPEAT_SECONDS` of the first is that
same signal sent twice (``timeout`` signals both its command and the command's process group, and
the two do not merge while the process runs), and only logged.

A consumer's fetcher is a non-daemon thread, so the process keeps consuming after the main thread
ends (the seed's scripts end with ``f.consume()``). Under eventlet's monkey patch threads are
greenlets, and the interpreter's exit no longer waits for non-daemon ones: the hub would die with
the main greenlet. There the main greenlet waits for them at exit instead (:func:`_join_green_threads`).
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any, Protocol, cast

logger = logging.getLogger("funboost_like.runtime")


class Stoppable(Protocol):
    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...


_consumers: list[Stoppable] = []
_lock = threading.Lock()
_installed_in_pid = -1
_previous: dict[int, Any] = {}
_RUNNING, _STOPPING, _STOPPED = range(3)
_state = _RUNNING
_exit_wait_in_pid = -1
_main_ended = False  # the main greenlet reached interpreter exit and waits for the green threads
_holders = 0  # the main thread blocked in consume() (schedule_tasks_on_main_thread): it takes a signal's course
_signal_stop: tuple[int, threading.Event] | None = None  # (signal, set once its graceful stop is over)
REPEAT_SECONDS = 0.5
_first_signal_at = 0.0


def register(consumer: Stoppable) -> None:
    with _lock:
        _consumers.append(consumer)
    _install_signal_handlers()
    install_exit_wait()


def unregister(consumer: Stoppable) -> None:
    with _lock:
        if consumer in _consumers:
            _consumers.remove(consumer)


def running_consumers() -> list[Stoppable]:
    with _lock:
        return list(_consumers)


def stop_all(timeout: float | None = None) -> bool:
    """Stop every consumer of this process and wait for their graceful shutdown."""
    consumers = running_consumers()
    for consumer in consumers:
        consumer.stop()
    return all([consumer.join(timeout) for consumer in consumers])


def _install_signal_handlers() -> None:
    """Install the handlers once per process, from its main OS thread (under eventlet or gevent, from
    any greenlet of it); called from another thread, it does nothing and a later call may install."""
    global _installed_in_pid, _state
    if _installed_in_pid == os.getpid():
        return
    _state = _RUNNING
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            _previous[signum] = signal.signal(signum, _on_signal)
        except ValueError:  # not the main thread (or not the main interpreter): nothing was installed
            return
        except OSError:  # the signal cannot be caught here
            logger.debug("cannot install a handler for signal %s", signum)
    _installed_in_pid = os.getpid()


def install_exit_wait() -> None:
    """Under eventlet's patched threading, make the interpreter's exit wait for non-daemon threads (a
    consumer's fetcher, a process supervisor's thread)."""
    global _exit_wait_in_pid
    if _exit_wait_in_pid == os.getpid() or not _eventlet_patched_threads():
        return
    _exit_wait_in_pid = os.getpid()
    _mend_eventlet_join()
    atexit.register(_join_green_threads)


def _mend_eventlet_join() -> None:
    """On Python 3.13+, make eventlet's green ``Thread.join(timeout)`` return when the timeout passes, as a
    real one does, instead of raising ``eventlet.Timeout`` (its ``_ThreadHandle.join`` waits in
    ``with_timeout`` without a ``timeout_value``): a consumer's ``join(1.0)`` loop failed there."""
    if sys.version_info < (3, 13):  # before 3.13, Thread.join waits on a (green) lock, which times out well
        return
    handle = getattr(sys.modules.get("eventlet.green.thread"), "_ThreadHandle", None)
    if handle is None or getattr(handle.join, "_funboost_like_mended", False):
        return
    from eventlet.timeout import with_timeout

    join = handle.join

    def mended(self: Any, timeout: float | None = None) -> None:
        if timeout is None:
            join(self)
        else:
            with_timeout(timeout, join, self, timeout_value=None)

    mended._funboost_like_mended = True
    handle.join = mended


def _eventlet_patched_threads() -> bool:
    patcher = sys.modules.get("eventlet.patcher")  # never imports eventlet
    return patcher is not None and bool(patcher.is_monkey_patched("thread"))


def cooperative_psycopg() -> None:
    """Under eventlet's patch, make psycopg 3 wait in the patched ``select()``, which yields to the other
    green threads, instead of in its C wait, which blocks them all (the whole process froze on
    PostgreSQL). psycopg makes that choice by itself only for gevent; ``PSYCOPG_WAIT_FUNC`` still wins."""
    patcher, waiting = sys.modules.get("eventlet.patcher"), cast(Any, sys.modules.get("psycopg.waiting"))
    if patcher is None or waiting is None or "PSYCOPG_WAIT_FUNC" in os.environ:
        return
    if patcher.is_monkey_patched("select") and waiting.wait is not waiting.wait_select:
        waiting.wait = waiting.wait_select
        logger.debug("psycopg waits in select() under eventlet")


def _gevent_patched_threads() -> bool:
    monkey = sys.modules.get("gevent.monkey")  # never imports gevent
    return monkey is not None and bool(monkey.is_module_patched("threading"))


def threads_are_green() -> bool:
    """Whether gevent or eventlet patched threading here (a new thread is a greenlet of this OS thread)."""
    return _eventlet_patched_threads() or _gevent_patched_threads()


def _join_green_threads() -> None:
    """At exit, in the main greenlet: join every non-daemon thread, as CPython's exit does for real ones.

    Eventlet's ``threading._shutdown`` only knows the threads of its private copy of the module, so
    without this the seed's script (``f.consume()`` last) would exit at once and run nothing. Joining
    a green thread yields to the hub, so consumers go on running until SIGINT/SIGTERM stops them.
    """
    global _main_ended
    if _exit_wait_in_pid != os.getpid():  # a forked child that inherited the registration
        return
    _main_ended = True
    while True:
        waiting = [thread for thread in threading.enumerate()
                   if not thread.daemon and thread.is_alive() and thread is not threading.current_thread()
                   and thread is not threading.main_thread()]
        if not waiting:
            return
        for thread in waiting:
            thread.join()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Runs in the main thread."""
    global _state, _signal_stop, _first_signal_at
    if _state == _STOPPED:  # consumers are done: now behave as the signal did before us
        _run_previous(signum, frame)
        return
    if _state == _STOPPING:
        if not is_second_signal(_first_signal_at, signum):
            return
        logger.warning("second signal %s: exiting at once", signal.Signals(signum).name)
        os._exit(128 + signum)
    _state, _first_signal_at = _STOPPING, time.monotonic()
    _signal_stop = (signum, threading.Event())
    logger.info("signal %s: stopping consumers gracefully", signal.Signals(signum).name)
    # A bare thread, like a daemon one: Thread.start() waits until the thread runs, which a green hub
    # (eventlet, gevent), where this handler may run, must never do.
    _thread.start_new_thread(_graceful_stop, (signum,))


def is_second_signal(first_at: float, signum: int) -> bool:
    """Whether a signal that came while a graceful stop runs asks to stop at once: not when it came within
    :data:`REPEAT_SECONDS` of the first (the same signal sent twice); that one is only logged."""
    if time.monotonic() - first_at >= REPEAT_SECONDS:
        return True
    logger.info("signal %s again within %.1f s of the first: taken as the same one (send it again to stop at once)",
                signal.Signals(signum).name, REPEAT_SECONDS)
    return False


def _graceful_stop(signum: int) -> None:
    global _state
    stop_all()
    _state = _STOPPED
    assert _signal_stop is not None
    held = _holders  # read before the event lets them go
    _signal_stop[1].set()
    if held or _main_ended or not threading.main_thread().is_alive():
        return  # a thread held in consume() takes the signal's course (hold()); or the script is over
    hub = _gevent_hub()
    if hub is not None and _previous.get(signum, signal.SIG_DFL) is signal.default_int_handler:
        # in the main greenlet (the hub's parent): raised in this one, gevent would print it as a failure
        hub.loop.run_callback(hub.parent.throw, KeyboardInterrupt)
    else:
        signal.raise_signal(signum)  # the script still runs: let the signal reach it


def _gevent_hub() -> Any:
    """Under gevent's patch of threading, this thread's hub; else None."""
    if not _gevent_patched_threads():
        return None
    import gevent

    return gevent.get_hub()


@contextlib.contextmanager
def hold() -> Iterator[None]:
    """Around a thread's wait in ``consume()`` until its consumer stops: when a signal stopped it, the
    signal then takes its course in this thread (SIGINT raises KeyboardInterrupt out of ``consume()``,
    SIGTERM ends the process), never the code after ``consume()``."""
    global _holders
    if threading.current_thread() is not threading.main_thread():  # a signal's course belongs to the main one
        yield
        return
    before, signum = _signal_stop, None
    with _lock:
        _holders += 1
    try:
        yield
        stopped = _signal_stop
        if stopped is not None and stopped is not before:  # a signal stopped the consumer
            stopped[1].wait()
            signum = stopped[0]
    finally:
        with _lock:
            _holders -= 1
    if signum is not None:
        _run_previous(signum, None)


def _run_previous(signum: int, frame: FrameType | None) -> None:
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # e.g. default_int_handler raises KeyboardInterrupt
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
