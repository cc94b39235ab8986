"""Supervised child processes: the machinery under ``run_consumer_with_multi_process(fn, n)``.

:class:`ProcessSupervisor` keeps ``n`` child processes running an opaque target, ``target(*args)``;
it knows nothing of boosters or consumers. :func:`funboost_like.core.booster.run_consumer_with_multi_process`
gives it a target that calls ``fn.consume()`` in each child (so each child has its own pool in the
booster's concurrency mode, its own broker connections and its own prefetch) and waits until it is
stopped. With the ``spawn`` and ``forkserver`` start methods the target and its arguments are pickled:
a module-level function and arguments that pickle by reference.

Supervision:

* A child that exits while the supervisor runs (killed by SIGKILL, out of memory, crashed) is
  started again at once. A child that keeps dying within ``fast_exit_seconds`` of its start is
  restarted after a growing pause (0.5 s, 1 s, 2 s, ... up to 30 s), so a broken deployment does not
  spin; one that lived longer resets the pause. Every exit and restart is logged.
* SIGINT or SIGTERM to the supervisor stops the children gracefully: each gets SIGTERM, stops
  fetching, hands unstarted messages back and lets running calls finish; the supervisor waits up to
  ``GRACEFUL_STOP_SECONDS`` plus :data:`STOP_MARGIN_SECONDS`, then SIGKILLs what is left and reaps
  every child. A second signal SIGKILLs the children at once (not a repeat within half a second of
  the first: that is the same signal sent twice). Nothing is left behind.
* Children ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and the supervisor
  alone decides how children stop. A child whose supervisor disappears (SIGKILL to the supervisor)
  notices within a second and stops gracefully on its own.

Start methods: ``fork`` and ``spawn`` both work (``forkserver`` too). With ``spawn`` and
``forkserver`` a booster travels to the child by reference (module and qualname of the decorated
function, see ``Booster.__reduce__``), so the child imports the user's module and finds the same
booster: decorate a function at the top level of a module and keep the start code under
``if __name__ == "__main__":``. ``fork`` copies the parent and also works for boosters defined
elsewhere. The start method comes from the ``start_method`` argument, else the
``MULTI_PROCESS_START_METHOD`` setting, else ``spawn`` when gevent or eventlet patched threading
(threads are greenlets then, and a fork copies all of them: the child would go on running the
parent's code beside its consumer), else the platform default.

With ``fork`` (and real threads) no child is forked by the supervisor's process: at start it forks one
single-threaded process, the forker (funboost_like/concurrency/forker.py), which forks every child,
first ones and replacements, on request. A replacement is thus never forked from a multi-threaded
process (the supervising thread beside the script's), and is the same copy of the start state as the
first children. The children are the forker's; the supervisor still signals, reaps and replaces them.

Graceful stop relies on POSIX signals; on Windows children are terminated.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from funboost_like.concurrency.forker import ForkedChild, Forker
from funboost_like.core import sqlite_fork
from funboost_like.core.config import settings
from funboost_like.core.log import ensure_console_handler
from funboost_like.core.runtime import install_exit_wait, is_second_signal, threads_are_green

logger = logging.getLogger("funboost_like.multiprocess")

STOP_MARGIN_SECONDS = 5.0  # added to GRACEFUL_STOP_SECONDS before stragglers are SIGKILLed
_POLL_SECONDS = 0.1  # how often the supervisor looks at its children and at stop requests
_PARENT_CHECK_SECONDS = 1.0  # how often a child checks that its supervisor still lives
_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


@dataclass
class _Slot:
    """One of the ``process_num`` places the supervisor keeps filled."""

    index: int
    process: BaseProcess | ForkedChild | None = None
    started_at: float = 0.0
    fast_exits: int = 0  # exits in a row, each within fast_exit_seconds of its start
    restart_at: float | None = None  # monotonic time of a pending (re)start


def _watch_under_gevent(pid: int | None) -> None:
    """Under gevent's patch of ``os``, have gevent watch a spawned child, as it does its own spawns: once
    it watches any child it reaps them all, and the exit of one it does not watch is never seen (waitpid
    fails; the supervisor spun, never restarting it). Call before anything yields to the hub."""
    monkey, gevent_os = sys.modules.get("gevent.monkey"), sys.modules.get("gevent.os")
    watch = getattr(gevent_os, "_watch_child", None)
    if pid is not None and watch is not None and monkey is not None and monkey.is_module_patched("os"):
        watch(pid)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class ProcessSupervisor:
    """Keeps ``process_num`` child processes running ``target(*args)`` until stopped.

    :meth:`run` supervises in the calling thread and returns once every child is gone;
    :meth:`start` does the same in a background (non-daemon) thread and returns at once. Either
    installs SIGINT/SIGTERM handlers when called in the main thread. :meth:`stop` asks for the
    graceful stop, :meth:`join` waits for it.
    """

    def __init__(self, target: Callable[..., Any], args: Sequence[Any] = (), process_num: int = 1, *,
                 start_method: str | None = None, name: str = "funboost_like-child",
                 fast_exit_seconds: float = 5.0, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 stop_timeout: float | None = None, log: logging.Logger | None = None) -> None:
        if isinstance(process_num, bool) or not isinstance(process_num, int) or process_num < 1:
            raise ValueError(f"process_num must be a positive int, not {process_num!r}")
        method = start_method or str(settings.get("MULTI_PROCESS_START_METHOD") or "") or None
        if method is None and threads_are_green():
            method = "spawn"  # a fork would copy every green thread into the child (see the module docstring)
        if method is not None and method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start method {method!r} is not available here; choose one of "
                             f"{', '.join(multiprocessing.get_all_start_methods())}")
        self._ctx: BaseContext = multiprocessing.get_context(method)
        self.start_method: str = self._ctx.get_start_method()
        self._target = target
        self._args = tuple(args)
        self.process_num = process_num
        self.name = name
        self.fast_exit_seconds = fast_exit_seconds
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stop_timeout = stop_timeout
        self.restarts = 0  # children started again after an exit
        self.logger = log or logger
        self._slots = [_Slot(i) for i in range(process_num)]
        self._stop_requested = threading.Event()
        self._done = threading.Event()
        self._started = False
        self._thread: threading.Thread | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._first_signal_at = 0.0
        self._lock = threading.Lock()
        self._forker: Forker | None = None  # with fork (and real threads): the process that forks the children
        # spawn and forkserver children import the script again by its path, which the interpreter takes
        # from __main__ once the script's last line ran (a replacement child started after it must find it)
        self._main_file = getattr(sys.modules.get("__main__"), "__file__", None)

    def __repr__(self) -> str:
        return f"<ProcessSupervisor {self.name!r} {len(self.pids)}/{self.process_num} children ({self.start_method})>"

    # -- public ------------------------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """PIDs of the children alive right now."""
        with self._lock:
            return [s.process.pid for s in self._slots
                    if s.process is not None and s.process.pid is not None and s.process.exitcode is None]

    @property
    def is_running(self) -> bool:
        return self._started and not self._done.is_set()

    def start(self) -> ProcessSupervisor:
        """Start the children and supervise them from a background thread; return at once."""
        self._begin()
        self._thread = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor")
        self._thread.start()
        return self

    def run(self) -> None:
        """Start the children and supervise them in this thread until stopped (signal or :meth:`stop`)."""
        self._begin()
        try:
            self._supervise()
        finally:
            self._restore_signal_handlers()

    def stop(self) -> None:
        """Ask for the graceful stop of every child (returns at once; see :meth:`join`)."""
        self._stop_requested.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every child is gone; True if that happened within ``timeout``."""
        return self._done.wait(timeout)

    def kill(self) -> None:
        """SIGKILL every child now (they are reaped by the supervising thread)."""
        self._stop_requested.set()
        for process in self._alive():
            try:
                process.kill()
            except (OSError, ValueError):
                pass

    # -- supervision -------------------------------------------------------------------------------
    def _begin(self) -> None:
        if self._started:
            raise RuntimeError(f"{self!r} was already started")
        self._started = True
        if self.start_method == "fork":
            sqlite_fork.arm()  # from now on, no child is forked while a thread here is inside SQLite
        ensure_console_handler()
        install_exit_wait()  # under eventlet: the script's end waits for the supervisor, as for a real thread
        self._install_signal_handlers()
        try:
            if self.start_method == "fork" and not threads_are_green():  # green threads: one OS thread anyway
                self._forker = Forker(self._ctx, _child_main, (self._target, self._args), self.name)
            for slot in self._slots:
                self._launch(slot)
        except BaseException:
            self._stop_children()
            self._close_forker()
            self._done.set()
            self._restore_signal_handlers()
            raise
        self.logger.info("started %d %s child process(es) with %s: pids %s", self.process_num, self.name,
                         self.start_method, self.pids)

    def _launch(self, slot: _Slot) -> None:
        main = sys.modules.get("__main__")
        if self._main_file and main is not None and getattr(main, "__file__", None) is None:
            main.__file__ = self._main_file
        process: BaseProcess | ForkedChild
        if self._forker is not None:
            process = self._forker.start_child(slot.index)
        else:
            started: BaseProcess = self._ctx.Process(  # type: ignore[attr-defined]
                target=_child_main, args=(self._target, self._args, os.getpid()), name=f"{self.name}-{slot.index}",
                daemon=False)
            started.start()
            if self.start_method == "spawn":
                _watch_under_gevent(started.pid)
            process = started
        with self._lock:
            slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None

    def _supervise(self) -> None:
        try:
            while not self._stop_requested.is_set():
                self._reap_and_restart()
                self._wait_for_change()
        except BaseException:
            self.logger.exception("the supervisor of %s failed; stopping its children", self.name)
            raise
        finally:
            self._stop_children()
            self._close_forker()
            self._done.set()

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        if self._forker is not None:
            self._forker.poll()
            if not self._forker.alive:
                self._replace_forker(now)
        for slot in self._slots:
            process = slot.process
            if process is not None and process.exitcode is not None:
                self._on_exit(slot, process, now)
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                if self._stop_requested.is_set():
                    return
                try:
                    self._launch(slot)
                except Exception:
                    slot.fast_exits += 1
                    slot.restart_at = now + self._backoff(slot)
                    self.logger.exception("could not start child %d of %s; trying again in %.1fs", slot.index,
                                          self.name, slot.restart_at - now)
                    continue
                self.restarts += 1
                pid = slot.process.pid if slot.process is not None else None
                self.logger.info("restarted child %d of %s: pid %s", slot.index, self.name, pid)

    def _replace_forker(self, now: float) -> None:
        """The forker died (someone SIGKILLed it): its children stop on their own, new ones replace them."""
        assert self._forker is not None
        self.logger.error("the forker of %s (pid %s) is gone; its children stop on their own. Forking a new forker "
                          "from this process, which runs %d thread(s)", self.name, self._forker.process.pid,
                          threading.active_count())
        with self._lock:
            for slot in self._slots:
                if slot.process is not None:
                    slot.process, slot.restart_at = None, now
        self._close_forker()
        self._forker = Forker(self._ctx, _child_main, (self._target, self._args), self.name)

    def _close_forker(self) -> None:
        if self._forker is not None:
            self._forker.close()

    def _on_exit(self, slot: _Slot, process: BaseProcess | ForkedChild, now: float) -> None:
        lived = now - slot.started_at
        slot.fast_exits = slot.fast_exits + 1 if lived < self.fast_exit_seconds else 0
        delay = self._backoff(slot)
        with self._lock:
            slot.process, slot.restart_at = None, now + delay
        self.logger.warning("child %d of %s (pid %s) exited with %s after %.1fs; restarting it%s", slot.index,
                            self.name, process.pid, _describe_exit(process.exitcode), lived,
                            f" in {delay:.1f}s ({slot.fast_exits} quick exit(s) in a row)" if delay else "")
        process.close()

    def _backoff(self, slot: _Slot) -> float:
        if slot.fast_exits <= 0:
            return 0.0
        return float(min(self.backoff_max, self.backoff_base * 2 ** (slot.fast_exits - 1)))

    def _wait_for_change(self) -> None:
        """Sleep until a child exits, a restart is due, a stop is asked for, or the poll interval ends."""
        timeout = _POLL_SECONDS
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is not None:
                timeout = min(timeout, max(0.0, slot.restart_at - now))
        sentinels = [p.sentinel for p in self._alive()]
        if self._forker is not None and self._forker.alive:
            sentinels += [self._forker.fileno(), self._forker.process.sentinel]
        if sentinels:
            multiprocessing.connection.wait(list(dict.fromkeys(sentinels)), timeout)  # forked children share one
        else:
            self._stop_requested.wait(timeout)

    def _alive(self) -> list[BaseProcess | ForkedChild]:
        with self._lock:
            return [s.process for s in self._slots if s.process is not None and s.process.exitcode is None]

    def _stop_children(self) -> None:
        """SIGTERM every child, wait for the graceful stop, SIGKILL stragglers, reap everything."""
        alive = self._alive()
        if alive:
            grace = self.stop_timeout
            if grace is None:
                grace = float(settings.get("GRACEFUL_STOP_SECONDS")) + STOP_MARGIN_SECONDS
            self.logger.info("stopping %d child process(es) of %s (pids %s); waiting up to %.0fs", len(alive),
                             self.name, [p.pid for p in alive], grace)
            for process in alive:
                try:
                    process.terminate()
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + grace
            for process in alive:
                process.join(max(0.0, deadline - time.monotonic()))
            for process in alive:
                if process.exitcode is None:
                    self.logger.warning("child %s (pid %s) did not stop within %.0fs; killing it", process.name,
                                        process.pid, grace)
                    process.kill()
            for process in alive:
                process.join(10.0)
        with self._lock:
            slots = [(s, s.process) for s in self._slots if s.process is not None]
            for slot, _ in slots:
                slot.process, slot.restart_at = None, None
        for _, process in slots:
            if process.exitcode is not None:
                self.logger.info("child %s (pid %s) ended with %s", process.name, process.pid,
                                 _describe_exit(process.exitcode))
                process.close()
            else:
                self.logger.error("child %s (pid %s) could not be reaped", process.name, process.pid)

    # -- signals -----------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        """In the main thread (elsewhere ``signal.signal`` refuses; no ``threading.main_thread()`` test,
        which eventlet's monkey patch answers wrongly even in the main thread)."""
        for signum in _SIGNALS:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):
                self.logger.debug("cannot install a handler for signal %s", signum)

    def _restore_signal_handlers(self) -> None:
        for signum, previous in list(self._previous_handlers.items()):
            try:
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, previous)
            except (ValueError, OSError):  # not the main thread: the handler stays, and passes signals on
                self.logger.debug("cannot restore the handler of signal %s", signum)
            del self._previous_handlers[signum]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Runs in the main thread: first signal stops gracefully, a second one kills."""
        name = signal.Signals(signum).name
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        if self._done.is_set():  # the children are gone: behave as before us
            _run_handler(previous, signum, frame)
            return
        if self._stop_requested.is_set():
            if is_second_signal(self._first_signal_at, signum):
                self.logger.warning("second signal %s: killing the children of %s now", name, self.name)
                self.kill()
        else:
            self._first_signal_at = time.monotonic()
            self.logger.info("signal %s: stopping the children of %s gracefully", name, self.name)
            self.stop()
        if isinstance(getattr(previous, "__self__", None), ProcessSupervisor):
            previous(signum, frame)  # another supervisor of this process: it stops its children at the same time


def _run_handler(handler: Any, signum: int, frame: FrameType | None) -> None:
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


# -- the child side --------------------------------------------------------------------------------


def _child_main(target: Callable[..., Any], args: tuple[Any, ...], supervisor_pid: int | None = None) -> None:
    """First code a child runs: forget the supervisor's signal handlers, watch the supervisor, run."""
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _watch_supervisor(supervisor_pid)
    target(*args)


def _watch_supervisor(supervisor_pid: int | None = None) -> None:
    """Stop this child (SIGTERM to itself) when its supervisor disappears.

    ``supervisor_pid`` (the supervisor's, or its forker's) comes from that parent itself: a parent killed
    before this child ran its first line is noticed too (the child's parent is then already someone else).
    """
    if sys.platform == "win32":
        parent = multiprocessing.parent_process()
        if parent is None:
            return

        def wait_for_parent() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            _supervisor_gone(parent.pid)

    else:
        parent_pid = os.getppid() if supervisor_pid is None else supervisor_pid

        def wait_for_parent() -> None:
            while os.getppid() == parent_pid:
                time.sleep(_PARENT_CHECK_SECONDS)
            _supervisor_gone(parent_pid)

    threading.Thread(target=wait_for_parent, name="funboost_like-supervisor-watch", daemon=True).start()


def _supervisor_gone(pid: int | None) -> None:
    logger.warning("the supervising process (pid %s) of process %d is gone; stopping", pid, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
