"""A poller for amqpstorm's reading thread that its connection's close wakes at once.

amqpstorm's reader waits for its socket in ``select`` with a one-second timeout, and its connection's
``close()`` shuts the socket, closes it and waits for the reader to end. With real threads the
shutdown wakes the ``select``. Under eventlet (threads are green threads, ``select`` is the hub's)
nothing does: the socket is closed before the hub polls again, the hub forgets a closed descriptor
without waking who waits on it, and every connection's close waited out the whole second (a stop
of a consumer with its publishing connections took seconds).

:func:`install` gives a connection's I/O object a :class:`WakablePoller` under green threads: the
reader waits on its socket and on a pipe, and amqpstorm calls the poller's ``close()`` (which writes
to the pipe) right before it closes the socket. The pipe is closed when the poller is dropped.
"""

from __future__ import annotations

import contextlib
import os
import select
from errno import EINTR
from typing import Any

from amqpstorm.exception import AMQPConnectionError
from amqpstorm.io import POLL_TIMEOUT, BasePoller

from funboost_like.core.runtime import threads_are_green


class WakablePoller(BasePoller):
    """amqpstorm's ``SelectPoller``, also ready (and then not for reading) once :meth:`close` was called."""

    def __init__(self, fileno: int, exceptions: list[Exception]) -> None:
        super().__init__(fileno, exceptions)
        self._wake_read, self._wake_write = os.pipe()

    @property
    def is_ready(self) -> bool:
        try:
            ready, _, _ = select.select([self.fileno, self._wake_read], [], [], POLL_TIMEOUT)
        except OSError as why:
            if why.errno != EINTR:
                self._exceptions.append(AMQPConnectionError(why))
            return False
        return self.fileno in ready

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"\0")

    def __del__(self) -> None:
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)


def install(io: Any) -> None:
    """Under green threads, have amqpstorm's ``io`` (``connection._io``) read through a
    :class:`WakablePoller` from its next ``open()`` on; with real threads, leave it as it is."""
    if not threads_are_green():
        return
    open_io = io.open

    def open_with_wakable_poller() -> None:
        open_io()
        if io.poller is not None:
            io.poller.close()
            io.poller = WakablePoller(io.socket.fileno(), io._exceptions)

    io.open = open_with_wakable_poller
