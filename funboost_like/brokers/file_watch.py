"""A cross-process wake-up for brokers kept in local files: wait until a file is written.

On Linux an inotify watch (through ``ctypes``, no dependency) on the file reports every write by any
process at once, so an idle consumer of the embedded broker starts a message published by another
process within about a millisecond, and costs nothing while nothing is written. Where inotify is
missing (other systems, a file system without it, the watch limit reached) :meth:`FileWatch.wait`
sleeps like a poll, backing off from 2 ms to 50 ms.

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

logger = logging.getLogger("funboost_like.broker")

_IN_MODIFY = 0x00000002
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_POLL_FIRST, _POLL_MAX = 0.002, 0.05
_LONGEST_WATCHED_WAIT = 0.5  # a watched wait still looks again this often (a missed watch costs no more)

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        _libc = None


class FileWatch:
    """Waits for writes to one file (see the module docstring)."""

    __slots__ = ("path", "_fd", "_pause")

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._pause = _POLL_FIRST
        self._arm()

    def _arm(self) -> None:
        if _libc is None or not os.path.exists(self.path):
            return
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return
        if _libc.inotify_add_watch(fd, os.fsencode(self.path), _IN_MODIFY) < 0:
            logger.debug("no inotify watch on %s (errno %d); polling", self.path, ctypes.get_errno())
            os.close(fd)
            return
        self._fd = fd

    @property
    def watching(self) -> bool:
        return self._fd >= 0

    def wait(self, timeout: float) -> None:
        """Return when the file was written since the last wait, or after ``timeout`` seconds."""
        if self._fd < 0:
            self._arm()
            if self._fd < 0:
                pause = self._pause
                time.sleep(min(pause, timeout))
                self._pause = min(pause * 2, _POLL_MAX)
                return
        readable, _, _ = select.select([self._fd], [], [], min(timeout, _LONGEST_WATCHED_WAIT))
        if readable:  # one read: events left over only end the next wait early (a loop until
            try:      # BlockingIOError would hang under eventlet, whose os.read waits instead)
                os.read(self._fd, 65536)
            except BlockingIOError:
                pass

    def written(self) -> None:
        """Something was found: the next poll (without a watch) starts short again."""
        self._pause = _POLL_FIRST

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
