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


class PollChoice:
    """Whether polling for a reply pays off right now: measured in turns, not assumed.

    Polling spares a waiting thread the wake-up of a halted CPU when the machine has an idle one (2x
    for a Redis push on the quiet VM), and costs when it has none: the polling CPU is one the server or
    other processes need (0.6-0.85x at a load average of 5). So the waits of one user alternate
    between a trial of ``TRIAL`` waits polling, a trial of ``TRIAL`` waits blocking, and ``KEEP`` waits
    the way whose trial had the lower median (send to reply). Polling is kept only when its median is
    at most ``POLL_GAIN`` times blocking's: the CPU it holds costs outside the measured wait too (the
    server's, other processes', and ZeroMQ's I/O threads'), so a tie, which under load is most trials,
    goes to blocking. Used by one thread at a time (the one :class:`Sharing` found alone); the
    benchmark ``push_wait.py`` compares it with either way alone.
    """

    __slots__ = ("_phase", "_count", "_trials", "_poll")
    TRIAL, KEEP = 32, 1024
    POLL_GAIN = 0.9

    def __init__(self) -> None:
        self._phase = 0  # 0: trial polling, 1: trial blocking, 2: keeping the faster way
        self._count = 0
        self._trials: tuple[list[float], list[float]] = ([], [])
        self._poll = True

    def polls(self) -> bool:
        """Whether the next wait polls first."""
        return self._phase == 0 if self._phase < 2 else self._poll

    def took(self, seconds: float) -> None:
        """Record the wait that :meth:`polls` was asked about: ``seconds`` from the send to the reply."""
        self._count += 1
        if self._phase == 2:
            if self._count >= self.KEEP:
                self._count, self._phase = 0, 0
            return
        trial = self._trials[self._phase]
        trial.append(seconds)
        if self._count >= self.TRIAL:
            self._count, self._phase = 0, self._phase + 1
            if self._phase == 2:
                polled, blocked = (sorted(t)[len(t) // 2] for t in self._trials)
                self._poll = polled <= blocked * self.POLL_GAIN
                self._trials = ([], [])


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
