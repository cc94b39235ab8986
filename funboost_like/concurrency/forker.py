"""The forker: a single-threaded process that forks a supervisor's children on request.

A process that forks while another of its threads holds a lock (a logging handler's, a broker
client's, the import lock, an allocator's) gives the child that lock held forever; Python 3.12+ warns
("This process is multi-threaded, use of fork() may lead to deadlocks"). A supervisor that replaces
dead children from a background thread would fork from such a process. So with the ``fork`` start
method the supervisor forks one process first, the forker, a copy of the caller at start, and has
it fork every child (the first ones and each replacement): the forker never starts a thread, so no
child is ever forked from a multi-threaded process, and every child is the same copy of the state
the supervisor had at start.

Protocol over one duplex pipe (small tuples, never from a broker): the supervisor sends
``("start", index)`` (answered ``("started", pid)`` or ``("failed", reason)``) and
``("signal", pid, signum)`` (sent only to a child the forker has not reaped, so never to a reused
pid); the forker reports ``("exited", pid, exitcode)`` for each child it reaps, exit codes as
``multiprocessing`` gives them (negative: the signal).

The forker ignores SIGINT and SIGTERM (it dies with its supervisor, not with a signal to the process
group). When the supervisor's end closes or the supervisor disappears it exits at once; its children
notice their parent is gone and stop gracefully on their own (``multiprocess._watch_supervisor``).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

logger = logging.getLogger("funboost_like.multiprocess")

FORKER_NAME = "funboost-forker"  # its process name on Linux (/proc/<pid>/comm; at most 15 characters)
START_TIMEOUT_SECONDS = 30.0  # a start request the forker has not answered by then failed
_CHECK_SECONDS = 1.0  # how often the forker checks that its supervisor still lives
_supervisor_ends: weakref.WeakSet[Connection] = weakref.WeakSet()  # closed in every forker (their copies)


class ForkedChild:
    """A child the forker forked, as the supervisor sees it: what it uses of ``multiprocessing.Process``."""

    def __init__(self, forker: Forker, pid: int, name: str) -> None:
        self._forker = forker
        self.pid: int | None = pid
        self.name = name
        self.exitcode: int | None = None  # set when the forker reports the exit (see Forker.poll)

    def __repr__(self) -> str:
        return f"<ForkedChild {self.name} pid {self.pid} exitcode {self.exitcode}>"

    @property
    def sentinel(self) -> int:
        """Readable when the forker has news (this child's exit among them)."""
        return self._forker.fileno()

    def terminate(self) -> None:
        self._forker.signal(self, signal.SIGTERM)

    def kill(self) -> None:
        self._forker.signal(self, getattr(signal, "SIGKILL", signal.SIGTERM))

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exitcode is None and self._forker.alive:
            remaining = None if deadline is None else deadline - time.monotonic()
            self._forker.poll(_CHECK_SECONDS if remaining is None else max(0.0, min(remaining, _CHECK_SECONDS)))
            if remaining is not None and remaining <= 0:
                return

    def close(self) -> None:
        """Nothing to release: the forker reaped the child."""


class Forker:
    """The supervisor's side of a forker process. Requests may come from any thread; news is read
    (:meth:`poll`, :meth:`start_child`, ``ForkedChild.join``) by one thread at a time."""

    def __init__(self, ctx: BaseContext, child_target: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        self._conn, forker_end = multiprocessing.Pipe(duplex=True)
        _supervisor_ends.add(self._conn)
        self._name = name
        self._children: dict[int, ForkedChild] = {}
        self._send_lock = threading.RLock()  # RLock: a signal handler may kill children while a request is sent
        self.alive = True
        self.process: BaseProcess = ctx.Process(  # type: ignore[attr-defined]
            target=_forker_main, args=(forker_end, child_target, args, name), name=f"{name}-forker", daemon=False)
        try:
            self.process.start()
        finally:
            forker_end.close()

    def fileno(self) -> int:
        return self._conn.fileno()

    def start_child(self, index: int) -> ForkedChild:
        """Have the forker fork child ``index``; raise ``RuntimeError`` if it could not."""
        self._send(("start", index))
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while self.alive and time.monotonic() < deadline:
            reply = self.poll(min(_CHECK_SECONDS, max(0.0, deadline - time.monotonic())))
            if reply is None:
                continue
            if reply[0] != "started":
                raise RuntimeError(f"the forker could not start child {index}: {reply[1]}")
            child = ForkedChild(self, reply[1], f"{self._name}-{index}")
            self._children[reply[1]] = child
            return child
        reason = "it did not answer in time" if self.alive else "it is gone"
        self.alive = False  # one that does not answer is replaced, with what it may have started
        raise RuntimeError(f"the forker (pid {self.process.pid}) did not start child {index}: {reason}")

    def signal(self, child: ForkedChild, signum: int) -> None:
        if child.exitcode is None and child.pid is not None:
            self._send(("signal", child.pid, signum))

    def poll(self, timeout: float = 0.0) -> tuple[Any, ...] | None:
        """Record the exits the forker reported within ``timeout``; return a reply to a start request if
        one came (then at once), else None. Marks the forker gone (``alive``) when it is."""
        deadline = time.monotonic() + timeout
        try:
            while self.alive and self._conn.poll(max(0.0, deadline - time.monotonic())):
                message = self._conn.recv()
                if message[0] != "exited":
                    return tuple(message)
                child = self._children.pop(message[1], None)
                if child is not None:
                    child.exitcode = message[2]
        except (EOFError, OSError):
            self.alive = False
        if self.alive and self.process.exitcode is not None:
            self.alive = False
        return None

    def close(self) -> None:
        """Let the forker go (it exits when its pipe closes) and reap it."""
        self.alive = False
        self._conn.close()
        self.process.join(5.0)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join(5.0)
        self.process.close()

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the forker is gone: its children stop on their own
            self.alive = False


def _forker_main(conn: Connection, child_target: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
    """The forker's loop: start children on request, report their exits, exit with the supervisor."""
    try:  # Linux: ps and top show what this copy of the script is
        with open("/proc/self/comm", "w") as comm:
            comm.write(FORKER_NAME)
    except OSError:
        pass
    for signum in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)):
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)
    for end in list(_supervisor_ends):  # copies of supervisors' ends: keep none open here, EOF must reach them
        end.close()
    gc.freeze()  # the copy of the parent stays shared with it: no collection touches its pages
    supervisor_pid = os.getppid()
    children: dict[int, BaseProcess] = {}
    try:
        while os.getppid() == supervisor_pid:
            multiprocessing.connection.wait([conn, *(p.sentinel for p in children.values())], _CHECK_SECONDS)
            for pid, process in list(children.items()):
                if process.exitcode is not None:
                    conn.send(("exited", pid, process.exitcode))
                    process.close()
                    del children[pid]
            while conn.poll():
                _serve(conn.recv(), conn, children, child_target, args, name)
    except (EOFError, OSError):  # the supervisor closed its end, or is gone
        pass
    os._exit(0)  # no atexit of the parent's copy; the children see their parent gone and stop


def _serve(request: tuple[Any, ...], conn: Connection, children: dict[int, BaseProcess],
           child_target: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
    """One request of the supervisor (see the module docstring)."""
    if request[0] == "start":
        process = multiprocessing.get_context("fork").Process(  # type: ignore[attr-defined]
            target=_run_child, args=(conn, child_target, args, os.getpid()), name=f"{name}-{request[1]}", daemon=False)
        try:
            process.start()
        except Exception as error:  # noqa: BLE001 - reported to the supervisor, which retries later
            conn.send(("failed", f"{type(error).__name__}: {error}"))
            return
        assert process.pid is not None
        children[process.pid] = process
        conn.send(("started", process.pid))
    elif request[0] == "signal" and request[1] in children and children[request[1]].exitcode is None:
        os.kill(request[1], request[2])  # not reaped yet: the pid is still this child's


def _run_child(conn: Connection, target: Callable[..., Any], args: tuple[Any, ...], forker_pid: int) -> None:
    """A child's first line: drop the forker's pipe (so the supervisor sees the forker's death), then
    ``target(*args, forker_pid)``."""
    conn.close()
    target(*args, forker_pid)
