"""A small keep-alive, pipelining client of the HTTPSQS protocol (httpsqs 1.7), on ``http.client``.

Every HTTPSQS verb is one ``GET /?name=Q&opt=VERB&auth=...`` (a put sends the message as the
request's body, which the server URL-decodes once: only ``%`` and ``+`` need escaping). Requests go
over persistent HTTP/1.1 connections, one per calling thread at a time, kept in a pool. A batch
(``publish_many``, a fetch of several messages, listing dead letters) is *pipelined*: a window of
requests is written at once on one connection, then their answers are read in order, so a batch
keeps its order and costs one round trip per window instead of one per message. libevent's evhttp,
which httpsqs is built on, answers pipelined requests one after another; that has been tested only
against the fixture server (``tests/httpsqs_server.py``), never against a real httpsqs.

Guarantees: an answer is matched to its request by order; a reused connection the server closed
while idle (its keep-alive timeout, 60 s by default) is replaced and the request sent again once,
only when no answer byte had arrived. Any other failure raises (``OSError`` or
``http.client.HTTPException``) and closes the connection: a put whose answer was lost may have
been stored, a get whose answer was lost has taken its message (at-most-once).
"""

from __future__ import annotations

import atexit
import http.client
import socket
import threading
import weakref
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit


class HttpsqsRefused(Exception):
    """The server answered with an HTTPSQS error word (HTTPSQS_PUT_END, HTTPSQS_AUTH_FAILED, ...)."""


class Reply:
    """One answer: its body and its ``Pos`` header (None when the server sent none)."""

    __slots__ = ("body", "pos")

    def __init__(self, body: bytes, pos: int | None) -> None:
        self.body, self.pos = body, pos


def read_reply(reader: Any) -> tuple[Reply, bool]:
    """Read one HTTP answer from ``reader`` (a buffered socket file); also whether the connection stays open.
    httpsqs answers carry a Content-Length (libevent's evhttp never chunks a reply)."""
    status = reader.readline(65537)
    if not status:
        raise http.client.RemoteDisconnected("the server closed the connection without an answer")
    version, _, rest = status.decode("latin-1").partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise http.client.BadStatusLine(status.decode("latin-1", "replace").strip())
    headers = http.client.parse_headers(reader)
    connection = (headers.get("Connection") or "").lower()
    keep = connection == "keep-alive" or (version == "HTTP/1.1" and connection != "close")
    length = headers.get("Content-Length")
    if length is None or not length.strip().isdigit():
        body, keep = reader.read(), False
    else:
        body = reader.read(int(length))
        if len(body) < int(length):
            raise http.client.IncompleteRead(body, int(length) - len(body))
    pos = headers.get("Pos")
    return Reply(body, int(pos) if pos is not None and pos.strip().isdigit() else None), keep


class _Connection:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self.used = False

    def exchange(self, requests: Sequence[bytes], replies: list[Reply]) -> bool:
        """Write ``requests`` at once and append their answers to ``replies`` as they are read;
        return whether the server keeps the connection open."""
        self.sock.sendall(b"".join(requests) if len(requests) > 1 else requests[0])
        keep = True
        for _ in requests:
            reply, open_after = read_reply(self.reader)
            replies.append(reply)
            keep = keep and open_after
        self.used = True
        return keep

    def close(self) -> None:
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


class HttpsqsClient:
    """The connection pool of one process to one HTTPSQS server, safe to share between threads."""

    def __init__(self, url: str, timeout: float, window: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"HTTPSQS_URL must look like http://host:1218/?auth=PASSWORD, not {parts.scheme}://...")
        self.host, self.port = parts.hostname, parts.port or 1218
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        auth = query.get("auth") or (parts.password or "")
        self.path = (parts.path or "/").encode()
        self.auth = b"&auth=" + quote(auth, safe="").encode() if auth else b""
        self.timeout, self.window = timeout, max(1, window)
        self.head = f" HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n".encode()
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        _clients.add(self)

    def request_bytes(self, queue: str, opt: str, extra: str = "", body: bytes | None = None) -> bytes:
        """The bytes of one request (a put carries ``body``, escaped for the server's URL-decoding)."""
        target = b"%s?name=%s&opt=%s%s%s" % (self.path, quote(queue, safe="").encode(), opt.encode(),
                                             extra.encode(), self.auth)
        if body is None:
            return b"GET " + target + self.head + b"\r\n"
        if not body:  # an empty body means "no body" to the server: the empty message goes as data=
            return b"GET " + target + b"&data=" + self.head + b"\r\n"
        escaped = body.replace(b"%", b"%25").replace(b"+", b"%2B")
        return b"POST " + target + self.head + b"Content-Length: %d\r\n\r\n" % len(escaped) + escaped

    def send(self, requests: Sequence[bytes]) -> list[Reply]:
        """Send ``requests`` in order (pipelined by windows on one connection); their answers in order."""
        replies: list[Reply] = []
        connection: _Connection | None = self._checkout()
        try:
            for start in range(0, len(requests), self.window):
                chunk = requests[start:start + self.window]
                if connection is None:
                    connection = _Connection(self.host, self.port, self.timeout)
                try:
                    keep = connection.exchange(chunk, replies)
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    if not connection.used or replies:
                        raise
                    connection.close()  # the server dropped an idle connection: once more on a new one
                    connection = _Connection(self.host, self.port, self.timeout)
                    keep = connection.exchange(chunk, replies)
                if not keep:
                    connection.close()
                    connection = None
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        if connection is not None:
            with self._lock:
                self._idle.append(connection)
        return replies

    def _checkout(self) -> _Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Connection(self.host, self.port, self.timeout)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def forget(self) -> None:
        """In a forked child: drop the parent's connections without closing them."""
        self._idle = []
        self._lock = threading.Lock()


# Every client of this process; their idle connections are closed at exit, while the interpreter is
# whole. Left to the teardown of modules, a connection's socket file may be freed after the socket
# module's globals are gone: Python 3.13 then prints "Exception ignored ... 'NoneType' object has no
# attribute 'RawIOBase'" for each connection when a publishing script ends.
_clients: weakref.WeakSet[HttpsqsClient] = weakref.WeakSet()


@atexit.register
def _close_all_clients() -> None:
    for client in list(_clients):
        client.close()
