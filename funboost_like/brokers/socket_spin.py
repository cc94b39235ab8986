"""Waiting for a server's reply by polling its socket for a moment before a blocking read.

A loopback round trip is a few tens of microseconds of work, but a thread that blocks for it gives
its CPU back, and waking a halted virtual CPU again costs a VM exit: on the 2-core VM of
docs/performance.md, blocking reads held one-by-one Redis pushes to 4-8k/s while the same PING loop
polled ran 30-40k/s. So a publisher that waits for one reply (a Redis ``push``, a NATS PubAck) polls
for up to a small budget first; the blocking read that follows is unchanged, so nothing about what
the publish guarantees changes. Used by ``redis_common.DirectConnections``, ``nats_wire``, ``mqtt_wire``
and ``zeromq_broker`` (whose ZeroMQ sockets are polled with zmq's own ``poll``).

Only the standard library's plain sockets are polled (their class comes from module ``socket``):
under gevent or eventlet, whose sockets are their own classes even after monkey-patching, polling
would hold up the other greenlets, and a TLS socket may hold a reply in its buffer while nothing is
readable, so those wait as before. ``poll`` releases the GIL, so other threads run meanwhile; still,
a publisher polls only while it is alone on its connections (:class:`Sharing`): several threads
publishing together, or a consumer waiting on the server in the same process, block as before.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import Any

Ready = Callable[[int], Any]  # truthy once a reply (or the end of the stream) is there
SHARED_QUIET_SECONDS = 0.05
"""A publisher polls only if its connections had no other user for this long (see :class:`Sharing`)."""


class Sharing:
    """Whether a thread is alone on connections that several threads may use: not while another thread
    uses them, nor for ``SHARED_QUIET_SECONDS`` after (threads that share tend to go on sharing)."""

    __slots__ = ("_shared_at",)

    def __init__(self) -> None:
        self._shared_at = -SHARED_QUIET_SECONDS  # when a caller last found another thread there

    def alone(self, in_use: int) -> bool:
        """``in_use``: how many threads use the connections now, the caller included."""
        now = time.monotonic()
        if in_use > 1:
            self._shared_at = now
            return False
        return now - self._shared_at > SHARED_QUIET_SECONDS


def reply_poller(sock: object) -> Ready | None:
    """A zero-timeout readiness check of ``sock``, or None where polling it is not right (see above)."""
    if not isinstance(sock, socket.socket) or type(sock).__module__ != "socket" or not hasattr(select, "poll"):
        return None
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return poller.poll


def spin(ready: Ready, budget: float) -> None:
    """Poll until ``ready(0)`` reports a reply (or the end of the stream), for ``budget`` seconds at most."""
    deadline = time.perf_counter() + budget
    while not ready(0) and time.perf_counter() < deadline:
        pass


def spin_until_readable(sock: object, budget: float) -> None:
    """Poll ``sock`` for up to ``budget`` seconds, if it is a socket that may be polled."""
    ready = reply_poller(sock)
    if ready is not None:
        spin(ready, budget)
