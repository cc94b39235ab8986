"""NATS's text protocol on a blocking socket (:class:`WireConnection`), and the publisher built on it.

:mod:`.nats_pull` pulls on the same kind of connection. A minimal synchronous JetStream publisher, one
per thread:

Publishing one message through nats-py costs a hop to the bridge's event loop and several task
switches there (about 0.3 ms on a loaded two-core machine, on top of the server's 0.07 ms); this
publisher writes ``PUB``/``HPUB`` on the calling thread and reads the server's PubAcks back on the same
socket, so ``push`` costs one round trip. A batch is written at once and its acks are read together.
A lone message's PubAck is polled for a moment before the blocking read (:mod:`.socket_spin`) while that
measures faster (``PollChoice``), unless another thread of the process published through this broker in
the last ``socket_spin.SHARED_QUIET_SECONDS``.

It speaks only what it needs: ``CONNECT`` (user and password, or a token, from the URL), ``SUB`` of
its reply inbox, ``PUB``/``HPUB``, ``PING``/``PONG``; it refuses (:class:`Unsupported`) a server that
requires TLS or nkeys, or a URL scheme other than ``nats://``, and the broker then publishes through
nats-py. Errors: ``OSError``/``TimeoutError`` for the connection (the socket is then closed), and
:class:`PublishRefused` for a message the server did not store.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from funboost_like.brokers.per_thread import PerThread
from funboost_like.brokers.socket_spin import PollChoice, Sharing, reply_poller, spin
from funboost_like.core.config import redact_url

logger = logging.getLogger("funboost_like.nats")

HeadersT = dict[str, str] | None
SPIN_SECONDS = 0.0003
"""How long a lone publish polls for its PubAck before a blocking read takes over (0: block at once)."""


class Unsupported(Exception):
    """This server or URL needs more than this publisher speaks (TLS, nkeys, another scheme)."""


class PublishRefused(Exception):
    """The server answered a publish with an error, or no stream took it."""


def redact_nats_url(url: str) -> str:
    """Each URL of a comma-separated list with its password, or its token (``nats://token@host``), as ``***``."""
    shown = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        if parts.username and parts.password is None:
            one = urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
        shown.append(redact_url(one))
    return ",".join(shown)


def _headers(headers: dict[str, str]) -> bytes:
    return b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"


class WireConnection:
    """One blocking connection to the first reachable server of ``url`` (comma-separated URLs),
    subscribed to its own inbox ``self.inbox + ".*"``."""

    name = "funboost_like"

    def __init__(self, url: str, timeout: float) -> None:
        self.pid = os.getpid()
        self._buf = bytearray()
        self._chunk = memoryview(bytearray(65536))
        error: OSError | None = None
        for server in url.split(","):
            parts = urlsplit(server.strip() if "://" in server else f"nats://{server.strip()}")
            if parts.scheme != "nats":
                raise Unsupported(f"scheme {parts.scheme!r}")
            try:
                self._sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout)
                break
            except OSError as exc:
                error = exc
        else:
            raise error or OSError("no NATS server in the URL")
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ready = reply_poller(self._sock)
        try:
            self._handshake(parts.username, parts.password)
        except BaseException:
            self.close()
            raise

    def _handshake(self, user: str | None, password: str | None) -> None:
        line = self._line()
        info = json.loads(line[5:]) if line.startswith(b"INFO ") else {}
        if info.get("tls_required") or "nonce" in info:
            raise Unsupported("the server requires TLS or nkeys")
        options: dict[str, object] = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                                      "lang": "python3", "version": "funboost_like", "protocol": 1,
                                      "name": self.name}
        if user is not None and password is not None:
            options.update(user=unquote(user), **{"pass": unquote(password)})
        elif user is not None:
            options["auth_token"] = unquote(user)
        self.inbox = f"_INBOX.{uuid.uuid4().hex}"
        self._sock.sendall(b"CONNECT %s\r\nSUB %s.* 1\r\nPING\r\n" % (json.dumps(options).encode(),
                                                                     self.inbox.encode()))
        while (line := self._line()) != b"PONG":
            if line.startswith(b"-ERR"):
                raise PublishRefused(line.decode("utf-8", "replace"))

    def _line(self) -> bytes:
        buf = self._buf
        while (end := buf.find(b"\r\n")) < 0:
            self._recv()
        line = bytes(buf[:end])
        del buf[:end + 2]
        return line

    def _recv(self) -> None:
        got = self._sock.recv_into(self._chunk)  # into one buffer: recv(n) would allocate n bytes each time
        if not got:
            raise ConnectionResetError("the NATS server closed the connection")
        self._buf += self._chunk[:got]

    def send(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _payload(self, size: int) -> bytes:
        buf = self._buf
        while len(buf) < size + 2:
            self._recv()
        data = bytes(buf[:size])
        del buf[:size + 2]
        return data

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


class WirePublisher(WireConnection):
    """A connection that publishes and reads the PubAcks back."""

    name = "funboost_like-publisher"

    def publish(self, items: Sequence[tuple[str, bytes, HeadersT]], choice: PollChoice | None = None) -> None:
        """Publish (subject, body, headers) in order; return once the server stored every one (``choice``:
        given when no other thread publishes now; it says whether a lone message's PubAck is polled for,
        and is told how long that PubAck took)."""
        reply = f"{self.inbox}.1".encode()
        out = bytearray()
        for subject, body, headers in items:
            if headers is None:
                out += b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply, len(body), body)
            else:
                head = _headers(headers)
                out += b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject.encode(), reply, len(head), len(head) + len(body),
                                                        head, body)
        started = time.perf_counter()
        self._sock.sendall(out)
        if choice is not None and len(items) == 1 and self._ready is not None and not self._buf:
            if choice.polls():
                spin(self._ready, SPIN_SECONDS)
        else:
            choice = None
        refused = None
        for _ in range(len(items)):
            answer = self._answer()
            if (not answer or b'"error"' in answer) and refused is None:
                refused = answer
        if choice is not None:
            choice.took(time.perf_counter() - started)
        if refused is not None:
            raise PublishRefused(f"publish refused: {refused.decode('utf-8', 'replace') or 'no stream'}")

    def _answer(self) -> bytes:
        """The next answer to a publish: the PubAck's JSON, or b"" for a status without a body (503)."""
        while True:
            line = self._line()
            if line.startswith(b"MSG "):
                return self._payload(int(line.rsplit(b" ", 1)[1]))
            if line.startswith(b"HMSG "):
                fields = line.split()
                data = self._payload(int(fields[-1]))
                return data[int(fields[-2]):]
            if line == b"PING":
                self._sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise PublishRefused(line.decode("utf-8", "replace"))


class WirePublishers:
    """The publishers of one broker in this process, one per thread, made at first use; a publish that
    fails on a broken connection is sent once more on a new one (a restarted server: it may then be
    stored twice)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        self.unsupported: str | None = None  # why publishing must go through nats-py instead
        self._local = threading.local()
        self._all: PerThread[WirePublisher] = PerThread(WirePublisher.close)  # every thread's, for closing
        self._busy: set[WirePublisher] = set()  # publishing now (set.add and discard hold the GIL)
        self.sharing = Sharing()  # whether a publish is alone: no other thread publishes
        self.poll_choice = PollChoice()  # whether a lone publish polls for its PubAck (measured in turns)

    def publish(self, items: Sequence[tuple[str, bytes, HeadersT]], window: int) -> bool:
        """Publish ``items`` ``window`` at a time; False (nothing sent) when this server needs nats-py."""
        for retry in (True, False):
            wire: WirePublisher | None = getattr(self._local, "wire", None)
            if wire is None or wire.pid != os.getpid():
                if self.unsupported is not None:
                    return False
                try:
                    wire = self._local.wire = WirePublisher(self.url, self.timeout)
                except Unsupported as exc:
                    logger.info("publishing through nats-py: %s", exc)
                    self.unsupported = str(exc)
                    return False
                self._all.add(wire)
            busy = self._busy
            busy.add(wire)
            try:
                choice = self.poll_choice if self.sharing.alone(len(busy)) else None
                for start in range(0, len(items), window):
                    wire.publish(items[start:start + window], choice)
                return True
            except OSError:
                self._local.wire = None
                self._all.forget(wire)
                wire.close()
                if not retry:
                    raise
            finally:
                busy.discard(wire)
        return True

    def close(self) -> None:
        self._all.close_all([wire for wire in self._all.take_all() if wire.pid == os.getpid()])
        self._local = threading.local()
