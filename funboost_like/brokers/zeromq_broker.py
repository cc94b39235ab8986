"""ZEROMQ: brokerless queues over ZeroMQ (pyzmq); the queue's name is the TCP port of its hub.

No server to install (seed 6.16): the queue ``"30778"`` lives in the *hub* of port 30778, a small
process (:mod:`~funboost_like.brokers.zeromq_hub`) that binds the port on the consumers' host and
keeps the queue in memory. Publishers and consumers connect to it; they never bind. The first
process that needs the port (normally the first consumer, as in the seed; a publisher too when it
comes first) starts the hub when nothing listens there and ``ZEROMQ_HOST`` is a loopback address;
two processes starting one at once is harmless (one binds, the other exits). Later processes use
the running hub, so any number of consumer processes, started in any order, share one port: each
asks the hub for up to its free room, and the hub answers waiting consumers in turn.

Guarantee: **at-most-once**, not persistent. A message leaves the hub when a consumer takes it, so
a consumer killed while it holds messages (running or fetched, at most its free room: about
``concurrent_num``) loses them; docs/guarantees.md gives the loss per kill measured by
``benchmarks/zeromq_loss.py``. A hub that stops loses every message it holds (waiting, delayed, dead
letters). A publish returns once the hub holds the message (one round trip; ``publish_many`` one
per 5,000 messages); with no hub reachable it raises ``BrokerConnectionError`` after
``ZEROMQ_TIMEOUT_SECONDS``, and the message was not sent.

Within those limits the hub is a full queue: priorities, delays (``countdown``, ``eta``, retries with
backoff), nack and release (kept by the hub in front or at the back, attempts counted), dead letters
(the newest 10,000 per queue, in the hub's memory), ``count`` and ``purge``. No key-value records (so
no RPC results or task filtering: refused at decoration time by the capabilities), no routing.

Names: a queue name is a port number from 1024 to 65535, checked at decoration time. Queues with
other names are accepted only when ``ZEROMQ_PORT`` names a hub port; they all share that hub.
Settings: ``ZEROMQ_HOST`` (where hubs are reached), ``ZEROMQ_BIND_HOST`` (what a started hub
binds; ``0.0.0.0`` to let other hosts publish), ``ZEROMQ_TIMEOUT_SECONDS``, ``ZEROMQ_HUB_IDLE_SECONDS``
(a started hub exits after that long without requests while it holds no message).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import zmq

from funboost_like.brokers import zeromq_hub as wire
from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.socket_spin import PollChoice, Sharing, spin
from funboost_like.core.config import settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.zeromq")

PORT_MIN, PORT_MAX = 1024, 65535
PUT_CHUNK = 5000  # bodies per put request
SPIN_SECONDS = 0.0003
"""How long a lone push polls for the hub's reply before a blocking poll takes over (0: block at once)."""
HUB_START_SECONDS = 10.0
LIVENESS_FIRST, LIVENESS_MAX = 0.1, 1.0  # a request waiting for its answer checks that the hub's port is open
_LOOPBACK = ("127.", "localhost")


class HubUnreachable(ConnectionError):
    """No hub answered on the queue's port in time."""


class HubRefused(Exception):
    """The hub answered a request with an error."""


def queue_port(queue: str) -> int | None:
    """The port a queue name is (``"30778"`` -> 30778), or None when the name is not a port number."""
    if queue.isascii() and queue.isdigit() and queue[0] != "0" and PORT_MIN <= int(queue) <= PORT_MAX:
        return int(queue)
    return None


def hub_port(queue: str) -> int:
    """The port of the hub that keeps ``queue``; ConfigurationError for a name that is no port."""
    port = queue_port(queue)
    if port is None:
        port = int(settings.get("ZEROMQ_PORT"))
        if not port:
            raise ConfigurationError(
                f"ZEROMQ queue names are the TCP port of the queue's hub, a number from {PORT_MIN} to {PORT_MAX} "
                f"(as in @task_deco('30778', broker_kind=BrokerEnum.ZEROMQ)), not {queue!r}; or set ZEROMQ_PORT "
                "to keep queues with other names in the hub of that port")
    return port


def new_context() -> zmq.Context[Any]:
    """A ZeroMQ context; its sockets wait cooperatively when gevent or eventlet patched the socket module."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("socket"):
        from zmq import green as green_zmq

        return green_zmq.Context()  # type: ignore[no-any-return]
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("socket"):
        from eventlet.green import zmq as eventlet_zmq

        return eventlet_zmq.Context()  # type: ignore[no-any-return]
    return zmq.Context()


def listening(host: str, port: int) -> bool:
    """Something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class _Link:
    """The DEALER sockets of one process to one hub: one per request in progress, reused."""

    def __init__(self, context: zmq.Context[Any], host: str, port: int) -> None:
        self.context, self.host, self.port, self.endpoint = context, host, port, f"tcp://{host}:{port}"
        self.free: list[zmq.Socket[Any]] = []
        self.busy: set[zmq.Socket[Any]] = set()  # in a request now (set.add and discard hold the GIL)
        self.sharing = Sharing()
        self.poll_choice = PollChoice()  # whether a lone request polls for its reply (measured in turns)
        self.checked = False  # the hub was seen listening (or started) by this process

    def exchange(self, frames: list[bytes], timeout: float, lone: bool = False) -> list[bytes]:
        """Send one request and return its reply's frames; HubUnreachable after ``timeout`` seconds.
        ``lone``: a quick request (one message published) whose reply is polled for a moment first, when
        no other thread of the process talks to this hub and polling measures faster (:mod:`.socket_spin`)."""
        try:
            sock = self.free.pop()
        except IndexError:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
        busy = self.busy
        busy.add(sock)
        try:
            started = time.perf_counter()
            sock.send_multipart(frames, copy=len(frames) < 8)
            choice = self.poll_choice if lone and self.sharing.alone(len(busy)) else None
            if choice is not None and choice.polls():
                spin(functools.partial(sock.poll, flags=zmq.POLLIN), SPIN_SECONDS)
            deadline, check = time.monotonic() + timeout, LIVENESS_FIRST
            while not sock.poll(int(max(0.0, min(check, deadline - time.monotonic())) * 1000), zmq.POLLIN):
                if time.monotonic() >= deadline or not listening(self.host, self.port):
                    raise HubUnreachable(f"no answer from the hub at {self.endpoint} within {timeout:.1f} s")
                check = min(check * 2, LIVENESS_MAX)
            reply = sock.recv_multipart()
            if choice is not None:
                choice.took(time.perf_counter() - started)
        except BaseException:
            sock.close(linger=0)  # a late answer must never reach the next request
            raise
        finally:
            busy.discard(sock)
        self.free.append(sock)
        return reply

    def close(self) -> None:
        while self.free:
            self.free.pop().close(linger=0)


class ZeroMqBroker(Broker):
    """At-most-once ZeroMQ queues in per-port hubs; see the module docstring."""

    kind = BrokerEnum.ZEROMQ
    capabilities = Capabilities(redelivery="none", delay="native", max_priority=2**31, dead_letters=True,
                                key_value=False, routing="none", persistent=False, cross_process=True,
                                cross_host=True, queue_names=hub_port)
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (HubUnreachable, OSError)
    errors: ClassVar[tuple[type[BaseException], ...]] = (HubRefused, zmq.ZMQError)

    def __init__(self) -> None:
        super().__init__()
        self._orphans: list[object] = []
        self._after_fork()

    def _after_fork(self) -> None:  # the parent's context and sockets are kept, never used or closed
        if getattr(self, "_context", None) is not None:
            self._orphans.append((self._context, self._links))
        self._context: zmq.Context[Any] | None = None
        self._links: dict[tuple[str, int], _Link] = {}  # (host, port) -> sockets to that hub
        self._lock = threading.Lock()
        self._stash: dict[str, deque[Delivery]] = {}  # taken by a waiting fetch, handed out by the next _get
        self._want: dict[str, int] = {}  # the last max_n asked per queue (what a waiting fetch asks for)
        self._tokens = itertools.count(1)
        self._started: list[subprocess.Popen[bytes]] = []

    def _host(self) -> str:
        return str(settings.get("ZEROMQ_HOST"))

    def _where(self) -> str:
        return f"ZeroMQ at {self._host()}"

    def _timeout(self) -> float:
        return float(settings.get("ZEROMQ_TIMEOUT_SECONDS"))

    # -- hubs ----------------------------------------------------------------------------------------
    def _link(self, port: int) -> _Link:
        host = self._host()
        link = self._links.get((host, port))
        if link is None:
            with self._lock:
                if self._context is None:
                    self._context = new_context()
                link = self._links.setdefault((host, port), _Link(self._context, host, port))
        if not link.checked:
            self._ensure_hub(link)
        return link

    def _ensure_hub(self, link: _Link) -> None:
        """Start the hub of ``link``'s port when nothing listens there and the host is this machine."""
        if not listening(link.host, link.port):
            if not link.host.startswith(_LOOPBACK):
                raise HubUnreachable(f"nothing listens on {link.endpoint}: start a consumer of that port on "
                                     f"{link.host}")
            self._start_hub(link.host, link.port)
        link.checked = True

    def _start_hub(self, host: str, port: int) -> None:
        for process in self._started:
            process.poll()  # reap hubs that exited
        log = Path(tempfile.gettempdir()) / f"funboost_like_zeromq_hub_{port}.log"
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "funboost_like.brokers.zeromq_hub", "--port", str(port),
                   "--bind", str(settings.get("ZEROMQ_BIND_HOST")),
                   "--idle-seconds", str(float(settings.get("ZEROMQ_HUB_IDLE_SECONDS")))]
        with open(log, "ab") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True, close_fds=True)
        self._started.append(process)
        logger.info("started the ZeroMQ hub of port %d (pid %d, log %s)", port, process.pid, log)
        deadline = time.monotonic() + HUB_START_SECONDS
        while not listening(host, port):
            if time.monotonic() > deadline or process.poll() not in (None, wire.EXIT_PORT_IN_USE):
                raise HubUnreachable(f"the ZeroMQ hub of port {port} did not start; see {log}")
            time.sleep(0.02)

    def _request(self, queue: str, op: bytes, header: dict[str, Any] | None = None,
                 bodies: Sequence[bytes] = (), wait: float = 0.0,
                 lone: bool = False) -> tuple[dict[str, Any], list[bytes]]:
        """One request to the hub of ``queue``: the reply's header and bodies.

        When the hub does not answer and its port is closed (it stopped, and what it held is gone), a
        new hub is started and the request sent to it once more.
        """
        link = self._link(hub_port(queue))
        frames = [op, queue.encode(), b"{}" if header is None else wire.pack(header), *bodies]
        try:
            reply = link.exchange(frames, wait + self._timeout(), lone)
        except HubUnreachable:
            if listening(link.host, link.port):
                raise
            link.checked = False
            self._ensure_hub(link)
            reply = link.exchange(frames, wait + self._timeout())
        if reply[0] != wire.OK:
            raise HubRefused(reply[1].decode("utf-8", "replace") if len(reply) > 1 else "no reason given")
        return json.loads(reply[1]), reply[2:]

    def ping(self, queue: str) -> int:
        """The pid of the hub keeping ``queue`` (started when missing)."""
        return int(self._request(queue, wire.PING)[0]["pid"])

    def stop_hub(self, queue: str) -> int:
        """Stop the hub keeping ``queue`` (and every queue of its port): what it holds is lost. Its pid."""
        return int(self._request(queue, wire.STOP)[0]["pid"])

    # -- primitives ----------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        header = {"p": priority, "t": not_before if not_before is not None and not_before > time.time() else None}
        for start in range(0, len(bodies), PUT_CHUNK):
            self._request(queue, wire.PUT, header, bodies[start:start + PUT_CHUNK], lone=len(bodies) == 1)

    def _deliveries(self, queue: str, header: dict[str, Any], bodies: list[bytes]) -> list[Delivery]:
        tokens = self._tokens
        return [Delivery(queue, body, next(tokens), attempts, priority)
                for (attempts, priority), body in zip(header["m"], bodies, strict=True)]

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        stash = self._stash.get(queue)
        if stash:
            with self._lock:
                return [stash.popleft() for _ in range(min(max_n, len(stash)))]
        self._want[queue] = max_n
        return self._deliveries(queue, *self._request(queue, wire.GET, {"n": max_n}))

    def _wait(self, queue: str, timeout: float) -> None:
        """Wait in the hub for up to the last ``max_n`` messages; they are kept for the next ``_get``."""
        if self._stash.get(queue):
            return
        got = self._deliveries(queue, *self._request(queue, wire.GET, {"n": self._want.get(queue, 1), "w": timeout},
                                                     wait=timeout))
        if got:
            with self._lock:
                self._stash.setdefault(queue, deque()).extend(got)

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        """Nothing to do: a message left its hub when it was fetched."""

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        self._request(deliveries[0].queue, wire.BACK,
                      {"d": delay, "f": front, "c": count_attempt, "m": [[d.attempts, d.priority] for d in deliveries]},
                      [d.body for d in deliveries])

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        self._request(delivery.queue, wire.DEAD, None, [letter.envelope()])

    def _take_stash(self, queue: str) -> list[Delivery]:
        with self._lock:
            stash = self._stash.pop(queue, None)
        return list(stash or ())

    def _stop_fetching(self, queue: str) -> None:
        """Give what a waiting fetch took back to the hub, in front, no attempt counted."""
        left = self._take_stash(queue)
        if left:
            self._requeue(left, delay=0.0, front=True, count_attempt=False)

    def _purge(self, queue: str) -> int:
        return len(self._take_stash(queue)) + int(self._request(queue, wire.PURGE)[0]["n"])

    def _size(self, queue: str) -> int:
        return int(self._request(queue, wire.COUNT)[0]["n"])

    # -- dead letters ----------------------------------------------------------------------------------
    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        try:
            _, envelopes = self._request(queue, wire.LIST_DEAD, {"n": limit})
        except self._client_errors as exc:
            raise self._translated(exc, f"listing dead letters of queue {queue!r}") from exc
        return [DeadLetter.from_envelope(queue, raw) for raw in envelopes]

    def purge_dead_letters(self, queue: str) -> int:
        try:
            return int(self._request(queue, wire.PURGE_DEAD)[0]["n"])
        except self._client_errors as exc:
            raise self._translated(exc, f"purging dead letters of queue {queue!r}") from exc

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        """Remove the letter whose envelope the hub listed (its ``ref``); False when it is gone."""
        try:
            return bool(self._request(queue, wire.REMOVE_DEAD, None, [bytes(letter.ref)])[0]["n"])
        except self._client_errors as exc:
            raise self._translated(exc, f"removing a dead letter of queue {queue!r}") from exc

    def _close(self) -> None:
        for queue in [q for q, stash in self._stash.items() if stash]:
            if not listening(self._host(), hub_port(queue)):  # its hub stopped: nothing to give back to
                continue
            try:
                self._stop_fetching(queue)
            except Exception as exc:  # the hub may be gone: its messages are gone with it
                logger.warning("could not give %r's prefetched messages back to its hub: %s", queue, exc)
        with self._lock:
            links, self._links = self._links, {}
            context, self._context = self._context, None
        for link in links.values():
            link.close()
        if context is not None:
            context.destroy(linger=0)
