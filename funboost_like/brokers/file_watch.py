"""A cross-process wake-up for brokers kept in local files: wait until one of some files is written.

On Linux one inotify instance watching the files (through ``ctypes``, no dependency) reports every
write by any process at once, so an idle consumer of the embedded broker starts a message published
by another process within about a millisecond, and costs nothing while nothing is written. Where
inotify is missing (other systems, a file system without it, the watch limit reached)
:meth:`FileWatch.wait` sleeps like a poll, backing off from 2 ms to 50 ms.

A write is not yet a commit: SQLite appends a transaction's frames to the WAL file, and only then
publishes the commit in the wal-index, a shared memory map whose writes inotify does not see. A reader
woken by the WAL write can look before that and find nothing, and no later event would come; so after
an event the next waits are short (1 ms doubling to 64 ms) before a watched wait is long again. On
a loaded machine the writer was seen descheduled between the two for a few milliseconds, and the
message then waited for the next long wait (0.5 s).

A watch belongs to one thread. Writes between two waits are not lost: the kernel queues their events
until the next :meth:`FileWatch.wait` drains them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import sys
import time
from collections.abc import Sequence

logger = logging.getLogger("funboost_like.broker")

_IN_MODIFY = 0x00000002
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_POLL_FIRST, _POLL_MAX = 0.002, 0.05
_LONGEST_WATCHED_WAIT = 0.5  # a watched wait still looks again this often (a missed watch costs no more)
_AFTER_EVENT_FIRST, _AFTER_EVENT_LAST = 0.001, 0.064  # the short waits after an event (see above)
_FD_SETSIZE = 1024  # select() takes no descriptor from this number on

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        _libc = None


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` seconds: select(), or poll() for a descriptor
    select() cannot take (a process with over a thousand files or sockets open)."""
    if fd < _FD_SETSIZE:
        return bool(select.select([fd], [], [], timeout)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


class FileWatch:
    """Waits for writes to any of ``paths`` (see the module docstring)."""

    __slots__ = ("paths", "_fd", "_pause", "_after_event")

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self._fd = -1
        self._pause = _POLL_FIRST
        self._after_event = 0.0  # the next short wait after an event (0: none pending)
        self._arm()

    def _arm(self) -> None:
        if _libc is None or not all(os.path.exists(path) for path in self.paths):
            return
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return
        if fd >= _FD_SETSIZE and not hasattr(select, "poll"):  # eventlet's patch removes poll: select() only
            os.close(fd)
            return
        if all(_libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) >= 0 for path in self.paths):
            self._fd = fd
        else:
            logger.debug("no inotify watch on %s (errno %d); polling", self.paths, ctypes.get_errno())
            os.close(fd)

    def wait(self, timeout: float) -> None:
        """Return when a file was written since the last wait, or after ``timeout`` seconds (much sooner
        right after an event: the commit it announced may not be visible yet)."""
        if self._fd < 0:
            self._arm()
            if self._fd >= 0:  # writes before the watch may be missed: the caller looks again first
                return
            pause = self._pause
            time.sleep(min(pause, timeout))
            self._pause = min(pause * 2, _POLL_MAX)
            return
        short = self._after_event
        longest = short if short else _LONGEST_WATCHED_WAIT
        if _readable(self._fd, min(timeout, longest)):
            try:  # one read: events left over only end the next wait early (a loop until BlockingIOError
                os.read(self._fd, 65536)  # would hang under eventlet, whose os.read waits instead)
            except BlockingIOError:
                pass
            self._after_event = _AFTER_EVENT_FIRST
        elif short:
            self._after_event = short * 2 if short < _AFTER_EVENT_LAST else 0.0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        # The thread that owned the watch ended and its thread-local state went: without this, every
        # consumer that started and stopped left an inotify instance open (a descriptor, and one of the
        # user's 128 inotify instances by default).
        self.close()
