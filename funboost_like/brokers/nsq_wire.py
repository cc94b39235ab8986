"""A small raw-socket client of nsqd's TCP protocol V2 and of the HTTP calls the NSQ broker needs.

No gevent, tornado or asyncio: a :class:`Connection` is one blocking socket. A publishing connection
(:class:`Publisher`) is used by one thread at a time and waits for nsqd's answer to each command; a
consuming connection (:class:`Subscription`) has one reader thread that answers heartbeats with
``NOP`` and hands each message to a callback, while any thread may write ``RDY``, ``FIN``, ``REQ`` and
``TOUCH`` to it (writes are serialised by a lock; nsqd answers none of them unless they fail).

Frames (nsq.io's protocol spec): ``[size int32][frame type int32][data]``, type 0 a response, 1 an
error, 2 a message ``[timestamp int64 ns][attempts uint16][id 16 bytes][body]``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("funboost_like.nsq")

MAGIC = b"  V2"
RESPONSE, ERROR, MESSAGE = 0, 1, 2
HEARTBEAT = b"_heartbeat_"
MAX_PUB_BYTES = 1 << 20  # one MPUB's body at most (nsqd's --max-body-size is 5 MiB by default)
MAX_DEFER_MS = 3_600_000  # nsqd's default --max-req-timeout: the longest DPUB or REQ delay
_NAME = re.compile(r"^[.a-zA-Z0-9_-]+$")


class NsqError(Exception):
    """nsqd answered with an error frame (``E_BAD_TOPIC ...``); or its HTTP API refused a request."""


def valid_topic(name: str) -> bool:
    """A topic or channel name nsqd accepts: ``[.a-zA-Z0-9_-]``, 1 to 64 characters."""
    return 1 <= len(name) <= 64 and bool(_NAME.match(name))


def parse_addresses(value: str) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` -> [(host, port), ...] (ValueError on a malformed entry)."""
    addresses = []
    for item in str(value).split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"an nsqd address is host:port, not {item.strip()!r}")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


class Message:
    """A delivered message: nsqd's id (16 ASCII bytes), attempts (deliveries so far), timestamp (ns)."""

    __slots__ = ("id", "body", "attempts", "timestamp")

    def __init__(self, frame: bytes) -> None:
        self.timestamp, self.attempts = struct.unpack_from(">qH", frame)
        self.id, self.body = frame[10:26], frame[26:]


class Connection:
    """One TCP connection to nsqd, the magic sent and IDENTIFY done."""

    def __init__(self, address: tuple[str, int], timeout: float, identify: dict[str, Any]) -> None:
        self.address = address
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer, self._at = b"", 0
        self.write_lock = threading.Lock()
        self.closed = False
        identify = {**identify, "feature_negotiation": True}
        try:
            self.sock.sendall(MAGIC + b"IDENTIFY\n" + _sized(json.dumps(identify).encode()))
            self.server: dict[str, Any] = json.loads(self.response())
        except BaseException:
            self.close()
            raise

    def write(self, data: bytes) -> None:
        with self.write_lock:
            self.sock.sendall(data)

    def read_frame(self) -> tuple[int, bytes]:
        size = struct.unpack(">i", self._read(4))[0]
        frame = self._read(size)
        return struct.unpack_from(">i", frame)[0], frame[4:]

    def _read(self, n: int) -> bytes:
        at = self._at
        while len(self._buffer) - at < n:
            chunk = self.sock.recv(max(262144, n))
            if not chunk:
                raise ConnectionResetError(f"nsqd at {self.address[0]}:{self.address[1]} closed the connection")
            self._buffer, at = self._buffer[at:] + chunk, 0
        self._at = at + n
        return self._buffer[at:at + n]

    def response(self) -> bytes:
        """The next response frame (heartbeats answered and skipped); NsqError for an error frame."""
        while True:
            kind, data = self.read_frame()
            if kind == ERROR:
                raise NsqError(data.decode("utf-8", "replace"))
            if data == HEARTBEAT:
                self.write(b"NOP\n")
            elif kind == RESPONSE:
                return data

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def _sized(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


class Publisher(Connection):
    """A connection that only publishes (heartbeats disabled, so nsqd never closes it while idle)."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        super().__init__(address, timeout, {"heartbeat_interval": -1, "user_agent": "funboost_like"})

    def publish(self, topic: str, bodies: Sequence[bytes], defer_ms: int = 0) -> None:
        """PUB one body, MPUB several (in chunks of at most 1 MiB), or DPUB each with ``defer_ms``;
        returns once nsqd answered OK to every command."""
        topic_b = topic.encode()
        commands: list[bytes] = []
        if defer_ms > 0:
            commands = [b"DPUB %s %d\n" % (topic_b, defer_ms) + _sized(body) for body in bodies]
        elif len(bodies) == 1:
            commands = [b"PUB %s\n" % topic_b + _sized(bodies[0])]
        else:
            chunk: list[bytes] = []
            size = 4
            for body in bodies:
                if chunk and size + 4 + len(body) > MAX_PUB_BYTES:
                    commands.append(_mpub(topic_b, chunk))
                    chunk, size = [], 4
                chunk.append(body)
                size += 4 + len(body)
            commands.append(_mpub(topic_b, chunk))
        self.write(b"".join(commands))
        for _ in commands:
            self.response()


def _mpub(topic: bytes, bodies: list[bytes]) -> bytes:
    payload = struct.pack(">i", len(bodies)) + b"".join(_sized(body) for body in bodies)
    return b"MPUB %s\n" % topic + _sized(payload)


class Subscription(Connection):
    """A consuming connection: SUB topic channel, then a reader thread calling ``deliver(self, message)``
    for each message (``RDY`` 0 until :meth:`ready` is called). ``on_close(self)`` runs when it ends."""

    def __init__(self, address: tuple[str, int], topic: str, channel: str, *, timeout: float, msg_timeout: float,
                 heartbeat: float, deliver: Callable[[Subscription, Message], None],
                 on_close: Callable[[Subscription], None]) -> None:
        super().__init__(address, timeout, {"heartbeat_interval": int(heartbeat * 1000),
                                            "msg_timeout": int(msg_timeout * 1000), "user_agent": "funboost_like"})
        try:
            self.write(b"SUB %s %s\n" % (topic.encode(), channel.encode()))
            self.response()
        except BaseException:
            self.close()
            raise
        self.sock.settimeout(2 * heartbeat + timeout)  # nsqd beats every ``heartbeat``: silence means it is gone
        self.topic, self.rdy = topic, 0
        self.close_wait = threading.Event()
        self._deliver, self._on_close = deliver, on_close
        self._reader = threading.Thread(target=self._read_loop, name=f"funboost_like-nsq-{topic}", daemon=True)
        self._reader.start()

    def ready(self, count: int) -> None:
        count = max(0, min(count, int(self.server.get("max_rdy_count", 2500))))
        if count != self.rdy:
            self.rdy = count
            self.command(b"RDY %d\n" % count)

    def command(self, line: bytes) -> bool:
        """Write one command; False when the connection is gone (its in-flight messages come back)."""
        if self.closed:
            return False
        try:
            self.write(line)
            return True
        except OSError:
            self.close()
            return False

    def _read_loop(self) -> None:
        try:
            while not self.closed:
                kind, data = self.read_frame()
                if kind == MESSAGE:
                    self._deliver(self, Message(data))
                elif kind == ERROR:
                    text = data.decode("utf-8", "replace")
                    # E_FIN_FAILED after a timeout or a purge: the message was given to another consumer
                    late = text.startswith(("E_FIN_FAILED", "E_TOUCH_FAILED", "E_REQ_FAILED"))
                    (logger.info if late else logger.warning)("nsqd at %s:%d: %s", *self.address, text)
                elif data == HEARTBEAT:
                    self.command(b"NOP\n")
                elif data == b"CLOSE_WAIT":
                    self.close_wait.set()
        except (OSError, struct.error) as exc:
            if not self.closed:
                logger.warning("nsqd connection to %s:%d lost (%s)", self.address[0], self.address[1], exc)
        finally:
            self.close()
            self.close_wait.set()
            self._on_close(self)


def http(address: tuple[str, int], method: str, path: str, timeout: float) -> Any:
    """One call of nsqd's HTTP API; the decoded JSON answer (None for an empty one). NsqError for a 4xx
    answer (its ``message``), OSError when unreachable."""
    request = urllib.request.Request(f"http://{address[0]}:{address[1]}{path}", method=method,
                                     data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message", str(exc))
        except ValueError:
            message = str(exc)
        raise NsqError(f"{method} {path}: {message}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise reason if isinstance(reason, OSError) else ConnectionError(str(reason)) from exc
    if not raw.strip() or raw.strip() == b"OK":
        return None
    data = json.loads(raw)
    return data.get("data", data) if isinstance(data, dict) and "status_code" in data else data  # nsqd < 1.0 wraps it


def depth(address: tuple[str, int], topic: str, channel: str, timeout: float) -> int:
    """Messages ``topic`` keeps on one nsqd (HTTP ``/stats``): its own (while it has no channel) and
    ``channel``'s ready and deferred ones; 0 for a topic nsqd does not know."""
    stats = http(address, "GET", f"/stats?format=json&topic={topic}&channel={channel}", timeout) or {}
    total = 0
    for found in stats.get("topics") or ():
        if found.get("topic_name") == topic:
            total += int(found.get("depth", 0))
            for kept in found.get("channels") or ():
                if kept.get("channel_name") == channel:
                    total += int(kept.get("depth", 0)) + int(kept.get("deferred_count", 0))
    return total


def empty(address: tuple[str, int], topic: str, channel: str, timeout: float) -> int:
    """Empty ``channel`` (its in-flight messages too, as nsqd does) and ``topic``; how many waited."""
    total = depth(address, topic, channel, timeout)
    for path in (f"/channel/empty?topic={topic}&channel={channel}", f"/topic/empty?topic={topic}"):
        try:
            http(address, "POST", path, timeout)
        except NsqError as exc:
            if "NOT_FOUND" not in str(exc):
                raise
    return total


def browse(tcp: tuple[str, int], address: tuple[str, int], topic: str, channel: str, limit: int,
           remove: bytes | None, timeout: float) -> list[Message]:
    """Read up to ``limit`` waiting messages of ``channel`` on one nsqd and put them back (``REQ`` 0), but
    ``FIN`` the one whose id is ``remove``. NSQ cannot peek: a consumer of the channel meanwhile gets
    none of them, and another browser sees fewer."""
    expected = min(limit, 2500, depth(address, topic, channel, timeout))
    if expected <= 0:
        return []
    got: list[Message] = []
    arrived = threading.Event()

    def deliver(_: Subscription, msg: Message) -> None:
        got.append(msg)
        if len(got) >= expected:
            arrived.set()

    sub = Subscription(tcp, topic, channel, timeout=timeout, msg_timeout=1.0, heartbeat=5.0, deliver=deliver,
                       on_close=lambda _: arrived.set())
    try:
        sub.ready(expected)
        arrived.wait(timeout)
        sub.ready(0)
        sub.command(b"".join(b"FIN %s\n" % m.id if m.id == remove else b"REQ %s 0\n" % m.id for m in got))
        sub.command(b"CLS\n")
        sub.close_wait.wait(timeout)
    finally:
        sub.close()
    return got
