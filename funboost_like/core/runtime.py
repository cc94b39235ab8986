"""Process-wide bookkeeping of running consumers, and graceful stop on SIGINT/SIGTERM.

Signal handlers are installed when the first consumer starts in the main thread, never at import.
On the first SIGINT or SIGTERM every consumer stops fetching, hands unstarted messages back, and
lets running calls finish within ``GRACEFUL_STOP_SECONDS``; then the signal's previous behaviour
runs (KeyboardInterrupt for SIGINT, termination for SIGTERM) if the main thread is still busy.
A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Protocol

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


def register(consumer: Stoppable) -> None:
    with _lock:
        _consumers.append(consumer)
    _install_signal_handlers()


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
    global _installed_in_pid, _state
    if _installed_in_pid == os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    _installed_in_pid = os.getpid()
    _state = _RUNNING
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            _previous[signum] = signal.signal(signum, _on_signal)
        except (ValueError, OSError):  # not the main interpreter, or the signal cannot be caught
            logger.debug("cannot install a handler for signal %s", signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Runs in the main thread."""
    global _state
    if _state == _STOPPED:  # consumers are done: now behave as the signal did before us
        _run_previous(signum, frame)
        return
    if _state == _STOPPING:
        logger.warning("second signal %s: exiting at once", signal.Signals(signum).name)
        os._exit(128 + signum)
    _state = _STOPPING
    logger.info("signal %s: stopping consumers gracefully", signal.Signals(signum).name)
    threading.Thread(target=_graceful_stop, args=(signum,), name="funboost_like-graceful-stop", daemon=True).start()


def _graceful_stop(signum: int) -> None:
    global _state
    stop_all()
    _state = _STOPPED
    if threading.main_thread().is_alive():  # the script is still running: let the signal reach it
        signal.raise_signal(signum)


def _run_previous(signum: int, frame: FrameType | None) -> None:
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # e.g. default_int_handler raises KeyboardInterrupt
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
