"""The hub of a ZEROMQ port: the one process that binds the port and keeps its queues in memory.

A hub is started by the first funboost_like process that needs the port on the hub's host (see
:mod:`~funboost_like.brokers.zeromq_broker`), or by hand::

    python -m funboost_like.brokers.zeromq_hub --port 30778 [--bind 127.0.0.1] [--idle-seconds 600]

It binds one ZeroMQ ``ROUTER`` socket on ``tcp://<bind>:<port>``. Publishers and consuming processes
connect ``DEALER`` sockets to it and send requests; every request gets one reply. The queues are
those of a :class:`~funboost_like.brokers.memory.MemoryBroker` (priorities, delays, dead letters)
living in the hub, so they last as long as the hub and no longer.

Wire protocol (multipart messages; JSON headers, bodies as raw frames):

* request ``[op, queue, header, *bodies]``; reply ``[b"ok", header, *bodies]`` or
  ``[b"error", message]``;
* ``put``: ``{"p": priority, "t": not_before or null}`` + bodies: appended, then answered (so a
  publish returns once the hub holds the message);
* ``get``: ``{"n": max_n, "w": seconds}``: up to ``n`` ready messages, highest priority first, then
  oldest, answered ``{"m": [[attempts, priority], ...]}`` + bodies. The messages leave the hub when
  they are sent (at-most-once). With ``w`` > 0 and nothing ready, the request waits in the hub until
  a message is ready or ``w`` seconds passed; waiting requests are served in arrival order, so
  several consumers share the work by asking for their free room. A reply the hub cannot send (its
  consumer is gone) puts its messages back in front;
* ``back``: ``{"d": delay, "f": front, "c": count_attempt, "m": [[attempts, priority], ...]}`` +
  bodies: messages a consumer gives back (nack, release);
* ``dead`` + one dead-letter envelope; ``dead?`` ``{"n": limit}`` (newest envelopes first);
  ``undead`` (purge the dead letters); ``undead1`` + one envelope as ``dead?`` listed it (remove
  that letter, answered ``{"n": 1}``, or ``{"n": 0}`` when it is gone); ``count``, ``purge``
  (answered ``{"n": ...}``); ``ping``
  (``{"pid": ...}``); ``stop`` (answered, then the hub exits).

The hub exits on SIGTERM, on ``stop``, or after ``--idle-seconds`` without any request while none
of its queues holds a message (0: never).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from funboost_like.brokers.base import DeadLetter, Delivery
from funboost_like.brokers.memory import MemoryBroker

logger = logging.getLogger("funboost_like.zeromq_hub")

PUT, GET, BACK, DEAD, LIST_DEAD, PURGE_DEAD = b"put", b"get", b"back", b"dead", b"dead?", b"undead"
COUNT, PURGE, PING, STOP, REMOVE_DEAD = b"count", b"purge", b"ping", b"stop", b"undead1"
OK, ERROR = b"ok", b"error"
PARKED_POLL_SECONDS = 0.05  # how often waiting requests look for messages that became due
EXIT_PORT_IN_USE = 3


def pack(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


class HubQueues(MemoryBroker):
    """The hub's queues: the memory broker's primitives, used by the hub's one thread."""

    def take(self, queue: str, max_n: int) -> list[Delivery]:
        return self._get(queue, max_n)

    def give_back(self, queue: str, marks: Sequence[Sequence[int]], bodies: Sequence[bytes], *, delay: float,
                  front: bool, count_attempt: bool) -> None:
        deliveries = [Delivery(queue, body, None, int(attempts), int(priority))
                      for (attempts, priority), body in zip(marks, bodies, strict=True)]
        if deliveries:
            self._requeue(deliveries, delay=delay, front=front, count_attempt=count_attempt)

    def bury(self, queue: str, envelope: bytes) -> None:
        self._dead_letter(Delivery(queue, b"", None), DeadLetter.from_envelope(queue, envelope))

    def waiting(self) -> int:
        return sum(self._size(queue) for queue in list(self._queues))


class Hub:
    """One bound ROUTER socket and the queues behind it; :meth:`serve` runs until stopped or idle."""

    def __init__(self, port: int, bind_host: str = "127.0.0.1", idle_seconds: float = 0.0) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a consumer that is gone raises
        self.router.setsockopt(zmq.LINGER, 0)
        try:
            self.router.bind(f"tcp://{bind_host}:{port}")
        except zmq.ZMQError:
            self.context.destroy(linger=0)
            raise
        self.queues = HubQueues()
        self.idle_seconds = idle_seconds
        self.parked: list[tuple[bytes, str, int, float]] = []  # (consumer, queue, max_n, deadline)
        self.last_request = time.monotonic()
        self.running = True
        self.ops: dict[bytes, Callable[[bytes, str, dict[str, Any], list[bytes]], None]] = {
            PUT: self._put, GET: self._get, BACK: self._back, DEAD: self._dead, LIST_DEAD: self._list_dead,
            PURGE_DEAD: self._purge_dead, REMOVE_DEAD: self._remove_dead, COUNT: self._count, PURGE: self._purge,
            PING: self._ping, STOP: self._stop}

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        try:
            while self.running:
                if poller.poll(int(self._poll_timeout() * 1000)):
                    self._receive()
                if self.parked:
                    self._serve_parked()
                if self._idle():
                    logger.info("no request for %.0f s and no message waiting: exiting", self.idle_seconds)
                    return
        finally:
            self.context.destroy(linger=0)

    def _poll_timeout(self) -> float:
        if self.parked:
            return max(0.0, min(PARKED_POLL_SECONDS, min(p[3] for p in self.parked) - time.monotonic()))
        return 1.0

    def _idle(self) -> bool:
        return (self.idle_seconds > 0 and not self.parked and time.monotonic() - self.last_request > self.idle_seconds
                and self.queues.waiting() == 0)

    def _receive(self) -> None:
        for _ in range(1000):  # then serve parked requests and look at the clock again
            if not self.running:  # stopped: later requests go unanswered, to the next hub
                return
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.last_request = time.monotonic()
            if len(frames) < 4:
                continue  # not a request of this protocol
            consumer, op, queue, header = frames[:4]
            try:
                self.ops[op](consumer, queue.decode(), json.loads(header), frames[4:])
            except Exception as exc:  # noqa: BLE001 - answered to the requester; the hub goes on
                logger.warning("request %r on queue %r failed: %s", op, queue, exc)
                self._send(consumer, [ERROR, f"{type(exc).__name__}: {exc}".encode()])

    def _send(self, consumer: bytes, frames: list[bytes]) -> bool:
        try:
            self.router.send_multipart([consumer, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # the consumer is gone (EHOSTUNREACH) or not reading (EAGAIN)
            return False

    def _deliver(self, consumer: bytes, queue: str, got: list[Delivery]) -> None:
        header = pack({"m": [[d.attempts, d.priority] for d in got]})
        if not self._send(consumer, [OK, header, *(d.body for d in got)]) and got:
            self.queues.give_back(queue, [[d.attempts, d.priority] for d in got], [d.body for d in got],
                                  delay=0.0, front=True, count_attempt=False)

    def _serve_parked(self) -> None:
        now, still = time.monotonic(), []
        for consumer, queue, max_n, deadline in self.parked:
            got = self.queues.take(queue, max_n)
            if got or deadline <= now:
                self._deliver(consumer, queue, got)
            else:
                still.append((consumer, queue, max_n, deadline))
        self.parked = still

    # -- operations --------------------------------------------------------------------------------
    def _put(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        priority, due = int(header.get("p") or 0), header.get("t")
        if due is None:
            self.queues.publish_many(queue, bodies, priority=priority)
        else:
            for body in bodies:
                self.queues.publish(queue, body, priority=priority, not_before=float(due))
        self._send(consumer, [OK, b"{}"])

    def _get(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        max_n, wait = int(header["n"]), float(header.get("w") or 0.0)
        got = self.queues.take(queue, max_n) if not any(p[1] == queue for p in self.parked) else []
        if got or wait <= 0:
            self._deliver(consumer, queue, got)
        else:  # behind the requests already waiting on this queue
            self.parked.append((consumer, queue, max_n, time.monotonic() + wait))

    def _back(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        self.queues.give_back(queue, header["m"], bodies, delay=float(header.get("d") or 0.0),
                              front=bool(header.get("f")), count_attempt=bool(header.get("c")))
        self._send(consumer, [OK, b"{}"])

    def _dead(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        for envelope in bodies:
            self.queues.bury(queue, envelope)
        self._send(consumer, [OK, b"{}"])

    def _list_dead(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        letters = self.queues.list_dead_letters(queue, int(header.get("n", 100)))
        self._send(consumer, [OK, b"{}", *(letter.envelope() for letter in letters)])

    def _answer_n(self, consumer: bytes, n: int) -> None:
        self._send(consumer, [OK, pack({"n": n})])

    def _purge_dead(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        self._answer_n(consumer, self.queues.purge_dead_letters(queue))

    def _remove_dead(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        wanted = bodies[0] if bodies else b""
        found = next((letter for letter in self.queues.list_dead_letters(queue, 1 << 30)
                      if letter.envelope() == wanted), None)
        self._answer_n(consumer, int(found is not None and self.queues.remove_dead_letter(queue, found)))

    def _count(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        self._answer_n(consumer, self.queues.count(queue))

    def _purge(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        self._answer_n(consumer, self.queues.purge(queue))

    def _ping(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        self._send(consumer, [OK, pack({"pid": os.getpid()})])

    def _stop(self, consumer: bytes, queue: str, header: dict[str, Any], bodies: list[bytes]) -> None:
        self._send(consumer, [OK, pack({"pid": os.getpid()})])
        self.running = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The hub of a funboost_like ZEROMQ port.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.1", help="the address to bind (0.0.0.0: every interface)")
    parser.add_argument("--idle-seconds", type=float, default=0.0,
                        help="exit after this long without requests while no message waits (0: never)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s zeromq hub %(process)d: %(message)s")
    try:
        hub = Hub(args.port, args.bind, args.idle_seconds)
    except zmq.ZMQError as exc:
        logger.info("cannot bind tcp://%s:%d (%s); another hub may have it", args.bind, args.port, exc)
        return EXIT_PORT_IN_USE

    def stop(signum: int, frame: object) -> None:
        hub.running = False

    signal.signal(signal.SIGTERM, stop)
    logger.info("serving tcp://%s:%d", args.bind, args.port)
    hub.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
